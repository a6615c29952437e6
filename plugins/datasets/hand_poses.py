"""The ``hand_poses`` dataset: hand poses from a prepared mocap folder (``handforge prepare mocap``).

Layout: ``DIR/<split>/left.npy`` (N, 45) float32, ``right.npy`` (N, 45) float32, ``source.npy``
(N,) int16 (an index into ``DIR/dataset_metadata.json`` ``"sources"``), ``frame.npy`` (N,) int32.
Arrays are memory-mapped plain ``.npy`` files (no pickles are read). Each sample is
``hand_pose90`` (90,): left 45 then right 45. With ``standardize = true`` poses are
``(x - mean) / std`` with the train split's statistics, whichever split is read: the rows
``prepare mocap`` standardized once (``DIR/<split>/x90_standardized.npy``, statistics in
``DIR/standardization.json``; see ``handforge.pose_standardization``).

Two faces, one gather: ``dataset[i]`` / ``__getitems__`` follow handforge's sample contract
(``hand_pose90``, what the tasks read); ``batch(indices)`` gives the (B, 90) tensor, or with
``return_dict`` the seed's dict (lhand_pose, rhand_pose, x90, dataset_name, frame_idx, mean/std).
:func:`batch_loader` is a DataLoader whose sampler yields whole index arrays, one gather per batch.
"""
from __future__ import annotations

import json
import pathlib

import attrs
import numpy as np
import torch

from handforge import hookimpl
from handforge.data import SPLITS, check_index
from handforge.errors import DataError
from handforge.pose_standardization import open_standardized, read_statistics

ARRAYS = {"left": ((45,), np.float32), "right": ((45,), np.float32),
          "source": ((), np.int16), "frame": ((), np.int32)}
READABLE_SPLITS = (*SPLITS, "test")  # the run loop asks for train / val; prepare also writes test


@attrs.define
class HandPosesConfig:
    root: str | None = attrs.field(default=None, metadata={"help": "folder written by `handforge prepare mocap`"})
    standardize: bool = attrs.field(default=False, metadata={
        "help": "subtract the train split's mean, divide by its std"})
    return_dict: bool = attrs.field(default=False, metadata={
        "help": "batch() returns the seed's dict (lhand_pose, rhand_pose, x90, dataset_name, frame_idx, "
                "mean/std) instead of the (B, 90) tensor; samples keep the hand_pose90 field either way"})


def _open(folder: pathlib.Path, name: str) -> np.ndarray:
    path = folder / f"{name}.npy"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as a plain .npy array ({exc})") from None
    shape, dtype = ARRAYS[name]
    if array.dtype != dtype or array.ndim != 1 + len(shape) or array.shape[1:] != shape:
        raise DataError(f"{path}: expected ({'N, ' + str(shape[0]) if shape else 'N,'}) {np.dtype(dtype)}, "
                        f"got {array.shape} {array.dtype}")
    return array


def read_split(root: pathlib.Path, split: str) -> dict[str, np.ndarray]:
    folder = root / split
    arrays = {name: _open(folder, name) for name in ARRAYS}
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{folder}: arrays differ in length {lengths}")
    return arrays


def read_sources(root: pathlib.Path) -> list[str]:
    """``dataset_metadata.json`` ``"sources"``: the dataset name of each ``source.npy`` value."""
    meta_path = root / "dataset_metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{meta_path}: cannot read ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sources"), list):
        raise DataError(f"{meta_path}: expected an object with a 'sources' list")
    return [str(s) for s in meta["sources"]]


class HandPoses(torch.utils.data.Dataset):
    """Left + right MANO hand poses (90 values) from a prepared mocap folder."""

    def __init__(self, config: HandPosesConfig, split: str = "train"):
        if split not in READABLE_SPLITS:
            raise DataError(f"hand_poses: split must be one of {', '.join(READABLE_SPLITS)}, got {split!r}")
        if not config.root:
            raise DataError('hand_poses: set the dataset option root = "path/to/prepared"')
        self.config, self.split = config, split
        self.root = pathlib.Path(config.root)
        self.sources = read_sources(self.root)
        self.arrays = read_split(self.root, split)
        source = self.arrays["source"]
        if len(source) and (source.min() < 0 or source.max() >= len(self.sources)):
            raise DataError(f"{self.root / split / 'source.npy'}: values {source.min()}..{source.max()}, "
                            f"but dataset_metadata.json lists {len(self.sources)} sources")
        self._names = np.array(self.sources, dtype=object)  # source value -> name, in one take
        # Plain ndarray views of the maps: np.take on them skips the memmap subclass's wrapping.
        self._plain = {name: np.asarray(a) for name, a in self.arrays.items()}
        self.mean = self.std = self._standardized = None
        if config.standardize:
            self.mean, self.std = (torch.from_numpy(a) for a in read_statistics(self.root))
            self._standardized = torch.from_numpy(np.asarray(open_standardized(self.root, split, len(self))))

    def __getstate__(self) -> dict:
        # A DataLoader worker started by spawn gets the folder, not a copy of the mapped arrays
        # (pickling a map would write out its whole content).
        return {"config": self.config, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"], state["split"])

    def __len__(self) -> int:
        return len(self.arrays["left"])

    def _checked(self, indices) -> np.ndarray:
        """``indices`` as int64 rows in [0, N) (negative ones count from the end, as in a list)."""
        index = np.asarray(indices).reshape(-1)
        if index.size and index.dtype.kind not in "iu":
            raise IndexError(f"hand_poses: indices must be integers, got {index.dtype}")
        index = index.astype(np.int64, copy=False)
        n = len(self)
        if index.size:
            low, high = index.min(), index.max()
            if low < -n or high >= n:
                bad = index[(index < -n) | (index >= n)][0]
                raise IndexError(f"hand_poses: index {bad} out of range for {n} poses")
            if low < 0:
                index = index % n
        return index

    def _take(self, name: str, index: np.ndarray) -> np.ndarray:
        # mode="clip" never clips (the indices are checked) but, unlike "raise", does not buffer.
        return np.take(self._plain[name], index, axis=0, mode="clip")

    def _x90(self, index: np.ndarray) -> torch.Tensor:
        if self._standardized is not None:
            # Whole 360-byte rows from one map, on torch's intra-op threads (one in a DataLoader
            # worker): a median of 24M rows/s on two idle cores here, about 1.5x np.take's one thread.
            return self._standardized.index_select(0, torch.from_numpy(index))
        x90 = np.empty((len(index), 90), dtype=np.float32)
        x90[:, :45] = self._take("left", index)
        x90[:, 45:] = self._take("right", index)
        return torch.from_numpy(x90)

    def _seed_dict(self, index: np.ndarray) -> dict:
        left, right = self._take("left", index), self._take("right", index)
        standardized = self._standardized is not None
        x90 = self._x90(index) if standardized else torch.from_numpy(np.concatenate((left, right), axis=1))
        batch = {"lhand_pose": torch.from_numpy(left), "rhand_pose": torch.from_numpy(right), "x90": x90,
                 "dataset_name": self._names.take(self._take("source", index)).tolist(),
                 "frame_idx": torch.from_numpy(self._take("frame", index).astype(np.int64))}
        if standardized:
            batch["mean"], batch["std"] = self.mean.clone(), self.std.clone()
        return batch

    def batch(self, indices, return_dict: bool | None = None):
        """Rows ``indices`` (in that order) in one gather: the (B, 90) ``x90`` tensor, or the seed's
        dict when ``return_dict`` (default: the ``return_dict`` option). Each call returns new
        tensors; nothing is reused between batches."""
        index = self._checked(indices)
        as_dict = self.config.return_dict if return_dict is None else return_dict
        return self._seed_dict(index) if as_dict else self._x90(index)

    def __getitem__(self, i: int) -> dict:
        i = check_index("hand_poses", i, len(self), "poses")
        return {"hand_pose90": self._x90(np.array([i]))[0]}

    def __getitems__(self, indices) -> dict:
        return {"hand_pose90": self._x90(self._checked(indices))}


class IndexBatchSampler(torch.utils.data.Sampler):
    """Whole batches as int64 index arrays: a DataLoader over it (``batch_size=None``) makes one
    ``batch()`` call per batch instead of 8192 ``__getitem__`` calls and a collate.

    ``shuffle``: a new permutation each epoch, from (seed, epoch) alone; the epoch advances by one
    each time the sampler is iterated, or is set by ``set_epoch`` (which Lightning calls)."""

    def __init__(self, length: int, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"hand_poses: batch_size must be at least 1, got {batch_size}")
        self.length, self.batch_size, self.shuffle = length, batch_size, shuffle
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.length, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self):
        if self.shuffle:
            # torch's permutation: 2x faster than numpy's, which at 8192 poses a batch was a quarter
            # of a batch's cost. Seeded from (seed, epoch) alone, so any rank or restart agrees.
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence((self.seed, self.epoch))
                                                          .generate_state(1, np.uint64)[0] >> 1))
            order = torch.randperm(self.length, generator=generator).numpy()
        else:
            order = np.arange(self.length)
        self.epoch += 1
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start:start + self.batch_size]


class _Batches(torch.utils.data.Dataset):
    """What a ``batch_size=None`` DataLoader indexes with each index array the sampler yields."""

    def __init__(self, poses: HandPoses, return_dict: bool | None):
        self.poses, self.return_dict = poses, return_dict

    def __len__(self) -> int:
        return len(self.poses)

    def __getitem__(self, indices):
        return self.poses.batch(indices, self.return_dict)


def _as_is(batch):
    return batch  # the batch is built already; default_convert would walk the 8192 dataset names


def batch_loader(poses: HandPoses, batch_size: int = 8192, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, return_dict: bool | None = None, **loader_options):
    """A ``torch.utils.data.DataLoader`` of ``poses.batch(...)`` batches, one gather each."""
    sampler = IndexBatchSampler(len(poses), batch_size, shuffle, seed, drop_last)
    return torch.utils.data.DataLoader(_Batches(poses, return_dict), batch_size=None, sampler=sampler,
                                       collate_fn=_as_is, **loader_options)


@hookimpl
def register_datasets(register):
    register("hand_poses", HandPoses, config=HandPosesConfig, provides=("hand_pose90",))
