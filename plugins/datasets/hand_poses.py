"""The ``hand_poses`` dataset: hand poses from a prepared mocap folder (``handforge prepare mocap``).

Layout: ``DIR/<split>/left.npy`` (N, 45) float32, ``right.npy`` (N, 45) float32, ``source.npy``
(N,) int16 (an index into ``DIR/dataset_metadata.json`` ``"sources"``), ``frame.npy`` (N,) int32.
Arrays are memory-mapped plain ``.npy`` files (no pickles are read). Each sample is
``hand_pose90`` (90,): left 45 then right 45. With ``standardize = true`` poses are
``(x - mean) / std`` with the train split's statistics, whichever split is read.
A batch is one gather from the memory maps (``__getitems__``), no per-sample Python.
"""
from __future__ import annotations

import json
import pathlib

import attrs
import numpy as np
import torch

from handforge import hookimpl
from handforge.data import check_index, check_split, require_finite
from handforge.errors import DataError

ARRAYS = {"left": ((45,), np.float32), "right": ((45,), np.float32),
          "source": ((), np.int16), "frame": ((), np.int32)}
MIN_STD = 1e-6  # a joint value constant over the train split: divide by 1, not by ~0


@attrs.define
class HandPosesConfig:
    root: str | None = attrs.field(default=None, metadata={"help": "folder written by `handforge prepare mocap`"})
    standardize: bool = attrs.field(default=False, metadata={
        "help": "subtract the train split's mean, divide by its std"})


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


def train_statistics(root: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    train = read_split(root, "train")
    if len(train["left"]) == 0:
        raise DataError(f"{root / 'train'}: empty, no statistics to standardize with")
    x = np.concatenate([train["left"], train["right"]], axis=1).astype(np.float64)
    require_finite(x, str(root / "train"), axes=("frame", "value"))
    mean, std = x.mean(axis=0), x.std(axis=0)
    return mean.astype(np.float32), np.where(std < MIN_STD, 1.0, std).astype(np.float32)


class HandPoses(torch.utils.data.Dataset):
    """Left + right MANO hand poses (90 values) from a prepared mocap folder."""

    def __init__(self, config: HandPosesConfig, split: str = "train"):
        check_split("hand_poses", split)
        if not config.root:
            raise DataError('hand_poses: set the dataset option root = "path/to/prepared"')
        self.config, self.split = config, split
        self.root = pathlib.Path(config.root)
        meta_path = self.root / "dataset_metadata.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{meta_path}: cannot read ({exc})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("sources"), list):
            raise DataError(f"{meta_path}: expected an object with a 'sources' list")
        self.sources = [str(s) for s in meta["sources"]]
        self.arrays = read_split(self.root, split)
        self.mean = self.std = None
        if config.standardize:
            self._stats = train_statistics(self.root)
            self.mean, self.std = (torch.from_numpy(a) for a in self._stats)

    def __len__(self) -> int:
        return len(self.arrays["left"])

    def _poses(self, index: np.ndarray) -> torch.Tensor:
        # Sorted reads from the memory map are sequential; the result is put back in the asked order.
        order = np.argsort(index, kind="stable")
        gathered = np.empty((len(index), 90), dtype=np.float32)
        sorted_index = index[order]
        gathered[order, :45] = self.arrays["left"][sorted_index]
        gathered[order, 45:] = self.arrays["right"][sorted_index]
        if self.mean is not None:
            # In place on the gathered block: the same float32 operations as (x - mean) / std, without
            # the two temporaries that made standardizing cost ten times the gather.
            np.subtract(gathered, self._stats[0], out=gathered)
            np.divide(gathered, self._stats[1], out=gathered)
        return torch.from_numpy(gathered)

    def batch(self, indices) -> torch.Tensor:
        """(B, 90) poses for ``indices`` in one gather."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if index.size and (index.min() < -n or index.max() >= n):
            bad = index[(index < -n) | (index >= n)][0]
            raise IndexError(f"hand_poses: index {bad} out of range for {n} poses")
        return self._poses(index % max(n, 1))

    def __getitem__(self, i: int) -> dict:
        i = check_index("hand_poses", i, len(self), "poses")
        return {"hand_pose90": self._poses(np.array([i]))[0]}

    def __getitems__(self, indices) -> list[dict]:
        return [{"hand_pose90": row} for row in self.batch(indices)]


@hookimpl
def register_datasets(register):
    register("hand_poses", HandPoses, config=HandPosesConfig, provides=("hand_pose90",))
