"""The sample contract (docs/architecture.md) and loader building.

A dataset is a map-style ``torch.utils.data.Dataset`` whose items are dicts of tensors with
the field names below. A dataset that renders or decodes faster in batches may also define
``__getitems__(indices) -> dict`` returning already-batched tensors; the loader then fetches
whole batches in one call. Datasets expose ``class_names`` (list of str) when they yield labels.
"""
import math

import attrs
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from .errors import DataError


@attrs.frozen
class Field:
    shape: tuple  # None = any size (image height/width)
    dtype: torch.dtype
    meaning: str


N_KEYPOINTS = 21
KEYPOINT_NAMES = (
    "wrist",
    "thumb1", "thumb2", "thumb3", "thumb4",
    "index1", "index2", "index3", "index4",
    "middle1", "middle2", "middle3", "middle4",
    "ring1", "ring2", "ring3", "ring4",
    "pinky1", "pinky2", "pinky3", "pinky4",
)
# Parent of each keypoint in the 21-joint skeleton (wrist is the root): the 20 bones.
KEYPOINT_PARENTS = (-1, 0, 1, 2, 3, 0, 5, 6, 7, 0, 9, 10, 11, 0, 13, 14, 15, 0, 17, 18, 19)

FIELDS = {
    "image": Field((3, None, None), torch.float32, "RGB in [-1, 1]"),
    "label": Field((), torch.int64, "class id; the dataset exposes class_names"),
    "keypoints": Field((N_KEYPOINTS, 3), torch.float32,
                       "x, y normalized to [0, 1] of the image, visibility in {0, 1}; MediaPipe order"),
    "joints3d": Field((N_KEYPOINTS, 3), torch.float32, "camera space, metres"),
    "hand_pose": Field((45,), torch.float32, "15 finger joints x axis-angle, MANO joint order"),
    "hand_pose90": Field((90,), torch.float32, "left 45 + right 45"),
    "identity": Field((), torch.int64, "which person / synthetic individual"),
    "reference": Field((3, None, None), torch.float32, "another image of the same identity"),
    "reference_keypoints": Field((N_KEYPOINTS, 3), torch.float32, "the keypoints of `reference`, as `keypoints`"),
    "handedness": Field((), torch.int64, "0 left, 1 right"),
}


def check_sample(sample: dict, where: str = "sample", batched: bool = False) -> None:
    """Raise DataError if ``sample`` breaks the contract (unknown field, shape, dtype, range)."""
    problems = []
    for name, value in sample.items():
        field = FIELDS.get(name)
        if field is None:
            problems.append(f"unknown field '{name}' (fields: {', '.join(FIELDS)})")
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"field '{name}' is {type(value).__name__}, not a tensor")
            continue
        shape = tuple(value.shape[1:] if batched else value.shape)
        if len(shape) != len(field.shape) or any(e is not None and e != s for e, s in zip(field.shape, shape)):
            expected = "(" + ", ".join("*" if e is None else str(e) for e in field.shape) + ")"
            problems.append(f"field '{name}' has shape {shape}, expected {expected}")
        elif value.dtype != field.dtype:
            problems.append(f"field '{name}' has dtype {value.dtype}, expected {field.dtype}")
        elif name in ("image", "reference") and value.numel() and (value.min() < -1.0001 or value.max() > 1.0001):
            problems.append(f"field '{name}' has values outside [-1, 1]")
    if problems:
        raise DataError(f"{where}: " + "; ".join(problems))


def collate(items):
    """Default collation, except that a batch a dataset already built (a dict) passes through."""
    return items if isinstance(items, dict) else default_collate(items)


class EpochSampler(Sampler):
    """The indices one process reads in one epoch.

    The order depends on (seed, epoch) alone, and each of ``num_replicas`` processes takes every
    ``num_replicas``-th index from ``rank`` on, in whole batches. ``set_position(epoch, skip)``
    starts an epoch ``skip`` indices in, so a resumed run reads exactly what an uninterrupted
    one would have, without loading the skipped samples.
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True, rank: int = 0, num_replicas: int = 1,
                 batch_size: int = 1):
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.rank, self.num_replicas, self.batch_size = rank, num_replicas, batch_size
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    @property
    def per_epoch(self) -> int:
        """Indices per process per epoch (whole batches only)."""
        return (self.length // self.num_replicas) // self.batch_size * self.batch_size

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        mine = order[self.rank::self.num_replicas][: self.per_epoch]
        return iter(mine[self.skip:].tolist())

    def __len__(self) -> int:
        return self.per_epoch - self.skip


def build_loader(dataset, batch_size: int, seed: int, num_workers: int = 0, shuffle: bool = True,
                 rank: int = 0, num_replicas: int = 1) -> DataLoader:
    """A loader of whole batches for one process. Its sampler is ``loader.sampler`` (EpochSampler)."""
    sampler = EpochSampler(len(dataset), seed, shuffle, rank, num_replicas, batch_size)
    if sampler.per_epoch == 0:
        raise DataError(f"dataset has {len(dataset)} samples: fewer than one batch of {batch_size} "
                        f"for each of {num_replicas} process(es)")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=True,
        persistent_workers=False,
        # Worker seeds come from this generator, not the global RNG the task draws noise from,
        # so creating an iterator (new epoch, resume) leaves the training randomness untouched.
        generator=torch.Generator().manual_seed(seed),
    )


SPLITS = ("train", "val")  # what dataset factories are called with: factory(config, split=...)


def non_finite(values, axes: tuple = ()) -> str | None:
    """The one check of keypoints and poses read from files: ``"NaN at joint 3, coordinate 0, not
    a finite number"`` for the first NaN or infinite number in ``values``, or None when all are finite.

    ``values`` is an array (or nested lists) of numbers; a format whose missing value is JSON null
    replaces its nulls before asking (Python's JSON reader turns the non-standard ``NaN`` and
    ``Infinity`` into floats, so they reach here). ``axes`` names the leading dimensions for the
    message (``("joint", "coordinate")``); the others are given as ``[i, j]``."""
    array = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(array)
    if finite.all():
        return None
    position = [int(i) for i in np.argwhere(~finite)[0]]
    value = float(array[tuple(position)])
    shown = "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    named = [f"{name} {i}" for name, i in zip(axes, position)]
    rest = position[len(axes):]
    at = ", ".join(named) + (f"{' ' if named else ''}[{', '.join(map(str, rest))}]" if rest else "")
    return f"{shown}{' at ' + at if at else ''}, not a finite number"


def require_finite(values, where: str, axes: tuple = ()) -> None:
    """A :class:`DataError` ``where: NaN at ...`` when :func:`non_finite` finds a problem in ``values``.
    What every reader of keypoints and poses from a file calls (a dataset with an ``on_error``
    policy goes through its own counting wrapper instead)."""
    problem = non_finite(values, axes)
    if problem is not None:
        raise DataError(f"{where}: {problem}")


def check_split(dataset: str, split: str) -> None:
    """A dataset factory's guard: ``split`` must be one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise DataError(f"{dataset}: split must be 'train' or 'val', got {split!r}")


def check_index(dataset: str, i: int, length: int, noun: str = "samples") -> int:
    """``i`` as an index into ``length`` samples (negative ones count from the end, as in a list);
    IndexError naming the dataset otherwise."""
    if not -length <= i < length:
        raise IndexError(f"{dataset}: index {i} out of range for {length} {noun}")
    return i % length


def square_image_size(dataset, who: str) -> int:
    """The side of a dataset's square images: its ``image_size`` attribute (an int or (H, W)), else
    the first sample's. ``who`` (e.g. "task 'gan'") is named when the images are not square."""
    size = getattr(dataset, "image_size", None)
    if size is None:
        size = tuple(dataset[0]["image"].shape[-2:])
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise DataError(f"{who} needs square images, the dataset's are {tuple(size)}")
    return int(size[0])


def first_samples(dataset, count: int) -> dict:
    """The first ``count`` samples as one batch (fixed conditions for sample grids)."""
    indices = list(range(min(count, len(dataset))))
    if hasattr(dataset, "__getitems__"):
        return collate(dataset.__getitems__(indices))
    return collate([dataset[i] for i in indices])
