"""The shared reader behind ``synthsl`` and ``bosphorus``: pairs of (reference, target) frames of
one signing sequence, from tar shards (layouts in :mod:`.layouts`, member reading in :mod:`.members`).

Two ways to read the same samples:

- :class:`TarPairs` is a map-style dataset (what ``train.read = "index"`` samples and the metrics index):
  building it scans each shard once for where every sample's members are (a plain tar header by
  header, a ``.tar.gz`` decompressed once), and ``dataset[i]`` then reads just those bytes;
- :meth:`TarPairs.stream` is an ``IterableDataset`` over the same shards read front to back, split
  across ranks and DataLoader workers, through a shuffle buffer: the fast path for compressed
  shards, which cannot be read at random cheaply (``train.read = "stream"``, the shipped recipes').

Keypoint pickles go through :mod:`handforge.safe_pickle` only (numpy arrays, nothing run). The
``webdataset`` library is not used: its default ``.pkl`` decoder is ``pickle.loads``, and what we
need of it (members grouped by key, shards split over workers, a shuffle buffer) is a few lines
over ``tarfile``'s forward-only stream mode.
"""
from __future__ import annotations

import copy
import io
import pathlib
import random
from collections import OrderedDict
from typing import Literal

import attrs
import numpy as np
import torch
from attrs import validators as v
from PIL import Image, UnidentifiedImageError

from handforge import safe_pickle
from handforge.data import N_KEYPOINTS, check_index, check_split, non_finite
from handforge.errors import DataError

from ..bad_data import ON_ERROR_HELP, BadData, OnError
from . import hand_check
from .layouts import LAYOUTS, Layout
from .members import MemberReader, index_members, iter_groups, read_all

KEYPOINTS_SUFFIX = "keypoints.pkl"
REFERENCE_CACHE = 64  # decoded reference images kept per process (one per sequence)


def _is_image_suffix(suffix: str) -> bool:
    return suffix.startswith("rgb.")


def _wanted(suffix: str) -> bool:
    return suffix == KEYPOINTS_SUFFIX or _is_image_suffix(suffix)


def _hand_points(instance, attribute, value) -> None:
    if value and (len(value) != 2 * N_KEYPOINTS or min(value) < 0):
        raise ValueError(f"hand_points: give {2 * N_KEYPOINTS} non-negative indices into the stored keypoints "
                         f"(left hand's 21, then the right's, each in wrist, thumb .. pinky order), or [] for the "
                         f"layout's default; got {len(value)}")


@attrs.define
class TarPairsConfig:
    root: str = attrs.field(metadata={"help": "the folder holding the layout's shards and reference archives"})
    size: int = attrs.field(default=256, validator=[v.ge(8), v.le(2048)], metadata={
        "help": "side of the square output images, pixels"})
    hand: Literal["right", "left"] = attrs.field(default="right", validator=v.in_(("right", "left")), metadata={
        "help": "which hand's 21 points are `keypoints` and `reference_keypoints`"})
    hand_points: list[int] = attrs.field(factory=list, validator=_hand_points, metadata={
        "help": "42 indices into the stored keypoints: left hand then right (empty: the layout's default)"})
    reference: Literal["base", "frame"] = attrs.field(default="base", validator=v.in_(("base", "frame")), metadata={
        "help": "the reference: the sequence's base frame, or another frame of the sequence (seeded per sample; "
                "map-style reading only)"})
    shuffle_buffer: int = attrs.field(default=512, validator=v.ge(1), metadata={
        "help": "stream(): samples held to shuffle the shards' order (1: the order of the shards)"})
    seed: int = attrs.field(default=0, validator=v.ge(0), metadata={"help": "seed of stream()'s shuffling"})
    on_error: OnError = attrs.field(default="raise", validator=v.in_(("raise", "skip")), metadata={
        "help": ON_ERROR_HELP + "; damaged shards and refused members are skipped and counted too"})


@attrs.frozen
class Entry:
    """Where one sample's members are."""

    shard: int  # index into TarPairs.shards
    key: str
    sequence: str
    image: tuple  # (suffix, offset, size)
    keypoints: tuple  # (offset, size)


class TarPairs(torch.utils.data.Dataset):
    """Target frames with their sequence's reference frame and both sets of hand keypoints."""

    layout_name = "synthsl"  # which of LAYOUTS; one subclass per registered dataset

    def __init__(self, config: TarPairsConfig, split: str = "train"):
        self.layout: Layout = LAYOUTS[self.layout_name]
        self.name = self.layout.name
        check_split(self.name, split)
        self.config, self.split = config, split
        self.root = pathlib.Path(config.root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: folder not found (dataset {self.name}, option root)")
        points = list(config.hand_points) or list(self.layout.hand_points)
        self.hand_points = points
        self.points = points[N_KEYPOINTS:] if config.hand == "right" else points[:N_KEYPOINTS]
        self.image_size = config.size
        self.bad = BadData(f"{self.name} {self.root}", config.on_error)
        self.stream_bad = BadData(f"{self.name} {self.root} (stream)", config.on_error)  # what streams skip
        self.shards = self.layout.shards(self.root, split)
        self._reference_bytes = self._read_references()
        self._check_hand_points()
        self._references: OrderedDict = OrderedDict()
        self._reader = MemberReader()
        self.entries: list[Entry] | None = None  # built on first use: a stream never needs it
        self.by_sequence: dict[str, list[int]] = {}

    # -- the references -----------------------------------------------------------------------------

    def _archive(self, name: str) -> pathlib.Path:
        path = self.root / name
        if not path.is_file():
            raise DataError(f"{path}: reference archive not found (dataset {self.name}, option root)")
        return path

    def _read_references(self) -> dict:
        """{sequence: (image bytes, keypoint bytes, where)}; decoded when first used."""
        images = read_all(self._archive(self.layout.reference_images), self._refused)
        keypoints = read_all(self._archive(self.layout.reference_keypoints), self._refused)
        return {seq: (images[seq], keypoints[seq]) for seq in images if seq in keypoints}

    def _check_hand_points(self) -> None:
        """The hand mapping against the first reference poses (see :mod:`.hand_check`); a pickle
        that does not decode is left to the sample that uses it (and its on_error policy)."""
        poses = []
        for sequence in sorted(self._reference_bytes)[:hand_check.SAMPLE]:
            try:
                poses.append(np.asarray(safe_pickle.loads(self._reference_bytes[sequence][1], sequence),
                                        dtype=np.float64))
            except (DataError, TypeError, ValueError):
                continue
        option = "option hand_points" if self.config.hand_points else f"the {self.name} layout's default"
        hand_check.check_hand_points(poses, self.hand_points, str(self.root / self.layout.reference_keypoints), option)

    def reference(self, sequence: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's reference image and keypoints, decoded (a few kept per process)."""
        if sequence in self._references:
            self._references.move_to_end(sequence)
            return self._references[sequence]
        found = self._reference_bytes.get(sequence)
        if found is None:
            raise DataError(f"{self.root}: sequence {sequence!r} has no reference image and keypoints in "
                            f"{self.layout.reference_images} / {self.layout.reference_keypoints}")
        where = f"{self.root / self.layout.reference_images} member {sequence!r}"
        decoded = (self._image(found[0], where),
                   self._keypoints(found[1], f"{self.root / self.layout.reference_keypoints} member {sequence!r}"))
        self._references[sequence] = decoded
        if len(self._references) > REFERENCE_CACHE:
            self._references.popitem(last=False)
        return decoded

    # -- decoding -----------------------------------------------------------------------------------

    def _image(self, data: bytes, where: str) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{where}: cannot decode the image ({type(exc).__name__}: {exc})") from None
        if self.layout.crop is not None:
            # The keypoints are normalised to the whole frame: another frame size would misplace them.
            if image.size != self.layout.frame_size:
                raise DataError(f"{where}: {image.width}x{image.height} pixels; {self.name} frames are "
                                f"{self.layout.frame_size[0]}x{self.layout.frame_size[1]}")
            image = image.crop(self.layout.crop)
        size = self.config.size
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR, reducing_gap=None)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        return pixels.float().div_(127.5).sub_(1.0)

    def _keypoints(self, data: bytes, where: str, frame_size=None) -> torch.Tensor:
        """The chosen hand's (21, 3) keypoints from a pickled (N, >= 2) array normalised to the
        stored frame; points at or below 0 or past 1 (the seed's "not found") are invisible."""
        value = safe_pickle.loads(data, where)
        try:
            points = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{where}: expected an (N, 2) array of keypoints, got {type(value).__name__}") from None
        if points.ndim != 2 or points.shape[1] < 2 or points.shape[0] <= max(self.points):
            raise DataError(f"{where}: keypoints of shape {points.shape}; the hand points need (N, 2) with N > "
                            f"{max(self.points)} (option hand_points)")
        hand = points[self.points, :2].copy()
        problem = non_finite(hand, ("joint", "coordinate"))
        if problem is not None:
            raise DataError(f"{where}: {problem}")
        if self.layout.crop is not None:
            hand = self._crop_keypoints(hand)
        visible = (hand > 0).all(axis=1) & (hand < 1).all(axis=1)
        out = np.concatenate([hand, visible[:, None]], axis=1).astype(np.float32)
        out[~visible, :2] = 0.0
        return torch.from_numpy(out)

    def _crop_keypoints(self, hand: np.ndarray) -> np.ndarray:
        """Normalised to the whole frame -> normalised to the crop (for Bosphorus the seed's
        x -> (x - 0.25) / 0.5; y is unchanged)."""
        x0, y0, x1, y1 = self.layout.crop
        width, height = self.layout.frame_size
        x = (hand[:, 0] * width - x0) / (x1 - x0)
        y = (hand[:, 1] * height - y0) / (y1 - y0)
        return np.stack([x, y], axis=1)

    def _sample(self, sequence: str, image: bytes, keypoints: bytes, where: str) -> dict:
        reference, reference_keypoints = self.reference(sequence)
        return {"image": self._image(image, f"{where}.rgb"),
                "keypoints": self._keypoints(keypoints, f"{where}.{KEYPOINTS_SUFFIX}"),
                "reference": reference, "reference_keypoints": reference_keypoints}

    def _shard_failed(self, exc: DataError) -> None:
        """A shard that broke off (or, with on_error = "raise", a refused member in it): raise it as
        it is, or count the rest of the shard as skipped."""
        if not self.bad.skipping and "on_error" in str(exc):
            raise exc  # already the policy's message (a refused member)
        self.bad.problem(str(exc), "the rest of the shard is skipped", "damaged shard")

    def _refused(self, exc) -> None:
        self.bad.problem(str(exc), "the member is left out", "refused member")

    # -- map-style ----------------------------------------------------------------------------------

    def _index(self) -> list[Entry]:
        if self.entries is not None:
            return self.entries
        entries, total = [], 0
        for number, shard in enumerate(self.shards):
            try:
                for key, members in index_members(shard, self.layout.key_parts, _wanted, self._refused):
                    total += 1
                    images = [s for s in members if _is_image_suffix(s)]
                    if not images or KEYPOINTS_SUFFIX not in members:
                        missing = "rgb image" if not images else KEYPOINTS_SUFFIX
                        self.bad.problem(f"{shard}: sample {key!r}", f"has no {missing} member", "incomplete sample")
                        continue
                    sequence = self.layout.sequence(shard, key)
                    if sequence not in self._reference_bytes:
                        self.bad.problem(f"{shard}: sample {key!r}", f"sequence {sequence!r} has no reference",
                                         "no reference")
                        continue
                    entries.append(Entry(number, key, sequence, (images[0], *members[images[0]]),
                                         members[KEYPOINTS_SUFFIX]))
            except DataError as exc:  # a damaged shard: what was indexed before the damage is kept
                self._shard_failed(exc)
        self.bad.print_summary(total)
        for i, entry in enumerate(entries):
            self.by_sequence.setdefault(entry.sequence, []).append(i)
        if not entries:
            why = f" ({self.bad.summary()})" if self.bad.counts else ""
            raise DataError(f"{self.name} {self.root}: no usable samples in the {self.split} split{why}")
        self.entries = entries
        return entries

    def __len__(self) -> int:
        return len(self._index())

    def _read_entry(self, entry: Entry) -> tuple[bytes, bytes, str]:
        shard = self.shards[entry.shard]
        image = self._reader.read(shard, entry.image[1], entry.image[2])
        return image, self._reader.read(shard, *entry.keypoints), f"{shard}: {entry.key}"

    def _read(self, i: int) -> dict:
        entry = self._index()[i]
        image, keypoints, where = self._read_entry(entry)
        sample = self._sample(entry.sequence, image, keypoints, where)
        if self.config.reference == "frame":
            others = [j for j in self.by_sequence[entry.sequence] if j != i] or [i]
            # the same reference for sample i in every epoch and process: seeded by (seed, i)
            j = others[int(np.random.default_rng(self.config.seed * 1_000_003 + i).integers(len(others)))]
            image, keypoints, where = self._read_entry(self.entries[j])
            sample["reference"] = self._image(image, f"{where}.rgb")
            sample["reference_keypoints"] = self._keypoints(keypoints, f"{where}.{KEYPOINTS_SUFFIX}")
        return sample

    def __getitem__(self, i: int) -> dict:
        i = check_index(self.name, i, len(self), "frames")
        return self.bad.read_or_skip(i, len(self), self._read)

    # -- streaming ----------------------------------------------------------------------------------

    def stream(self, rank: int = 0, world: int = 1, epoch: int = 0, shuffle: bool = True) -> "TarStream":
        if self.config.reference != "base":
            raise DataError(f"{self.name}: reference = {self.config.reference!r} picks frames at random and needs "
                            f"the map-style reading (train.read = \"index\"); a stream pairs each frame with its "
                            f"sequence's base frame")
        # Streams count what they skip apart from the map-style reads (TarStream.skipped), all
        # streams of this dataset together (one summary at exit, and counts that only grow).
        view = copy.copy(self)
        view.bad = self.stream_bad
        return TarStream(view, rank, world, epoch, shuffle)

    def iter_groups(self, reader: int, readers: int, epoch: int, shuffle: bool):
        """This reader's samples as undecoded ``(sequence, image bytes, keypoint bytes, where)``,
        shard by shard in archive order: with at least as many shards as readers each reader takes
        whole shards, else every reader goes through every shard and keeps every ``readers``-th
        sample. (The shuffle buffer holds these: encoded frames are a fraction of decoded ones.)"""
        shards = list(range(len(self.shards)))
        if shuffle:
            random.Random(self.config.seed * 1_000_003 + epoch).shuffle(shards)
        by_shard = len(shards) >= readers
        mine = shards[reader::readers] if by_shard else shards
        count = 0
        for number in mine:
            shard = self.shards[number]
            try:
                for key, members in iter_groups(shard, self.layout.key_parts, _wanted, self._refused):
                    if not by_shard:
                        count += 1
                        if (count - 1) % readers != reader:
                            continue
                    images = [s for s in members if _is_image_suffix(s)]
                    if not images or KEYPOINTS_SUFFIX not in members:
                        self.bad.problem(f"{shard}: sample {key!r}", "is incomplete", "incomplete sample")
                        continue
                    yield (self.layout.sequence(shard, key), members[images[0]], members[KEYPOINTS_SUFFIX],
                           f"{shard}: {key}")
            except DataError as exc:  # damaged midway: the samples before it were yielded
                self._shard_failed(exc)
                self.bad.at_exit()

    def decode(self, group) -> dict | None:
        """The sample of one :meth:`iter_groups` item; None (counted) when it cannot be decoded under
        on_error = "skip"."""
        try:
            return self._sample(*group)
        except DataError as exc:
            self.bad.problem(str(exc), "skipped", "unreadable sample")
            self.bad.at_exit()
            return None


class SynthSLPairs(TarPairs):
    """SynthSL frames, each with its sequence's reference frame (``training.tar`` / ``test.tar``)."""

    layout_name = "synthsl"


class BosphorusPairs(TarPairs):
    """Bosphorus frames, each with its clip's reference frame (``train/`` / ``test/`` clip shards)."""

    layout_name = "bosphorus"


class TarStream(torch.utils.data.IterableDataset):
    """:meth:`TarPairs.stream`: the samples of one rank, split over the DataLoader's workers and
    mixed through a shuffle buffer of ``shuffle_buffer`` samples (held encoded, decoded as they
    leave it). ``set_epoch`` reshuffles. ``skipped()`` counts, by kind, what the dataset's streams
    left out so far in this process (damaged shards, refused members, undecodable samples); each
    pass through a stream ends with that summary on stderr (a DataLoader worker's counts would not
    outlive the worker)."""

    def __init__(self, pairs: TarPairs, rank: int, world: int, epoch: int, shuffle: bool):
        if not 0 <= rank < world:
            raise DataError(f"{pairs.name}: rank {rank} outside a world of {world} processes")
        self.pairs, self.rank, self.world, self.epoch, self.shuffle = pairs, rank, world, epoch, shuffle

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skipped(self) -> dict[str, int]:
        return dict(self.pairs.bad.counts)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        reader, readers = self.rank * workers + worker, self.world * workers
        groups = self.pairs.iter_groups(reader, readers, self.epoch, self.shuffle)
        size = self.pairs.config.shuffle_buffer if self.shuffle else 1
        rng = random.Random((self.pairs.config.seed * 1_000_003 + self.epoch) * 65_537 + reader)
        buffer = []
        for group in groups:
            if len(buffer) < size:
                buffer.append(group)
                continue
            slot = rng.randrange(size)
            chosen, buffer[slot] = buffer[slot], group
            sample = self.pairs.decode(chosen)
            if sample is not None:
                yield sample
        rng.shuffle(buffer)
        for group in buffer:
            sample = self.pairs.decode(group)
            if sample is not None:
                yield sample
        self.pairs.bad.print_summary()
