"""Standardized hand poses of a prepared mocap folder: written once by ``handforge prepare mocap``,
read by the ``hand_poses`` dataset (the folder is the interface; neither imports the other).

What it adds to the folder:

- ``standardization.json``: ``mean`` and ``std`` (90 values each, left 45 then right 45) of the
  train split, a std below ``min_std`` replaced by 1 (a value constant over train: divide by 1,
  not by ~0), and ``poses``, the train split's size.
- ``<split>/x90_standardized.npy`` (N, 90) float32 for every split: bit for bit the float32
  ``(concat(left, right) - mean) / std`` of that split's rows, always with the train statistics.

Why a file rather than standardizing each batch: a standardized batch is then one gather of
whole 360-byte rows from one memory map (a median of 24M poses/s with torch's two threads here,
against 8.5M for gathering the two 180-byte halves and standardizing them per batch), and every
process, DataLoader worker and DDP rank reads the same page cache instead of holding its own copy.
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from .data import require_finite
from .errors import DataError

STATISTICS_FILE = "standardization.json"
STANDARDIZED_FILE = "x90_standardized.npy"
MIN_STD = 1e-6
CHUNK = 1 << 16  # rows per pass: the statistics never hold a float64 copy of the whole split
WIDTH = 90


def _halves(folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.load(folder / f"{side}.npy", mmap_mode="r", allow_pickle=False) for side in ("left", "right"))


def _rows(left, right, start: int, stop: int) -> np.ndarray:
    return np.concatenate([left[start:stop], right[start:stop]], axis=1)


def train_statistics(left: np.ndarray, right: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (float32, (90,)) of the rows ``concat(left, right)``, two passes in float64."""
    n = len(left)
    if n == 0:
        raise DataError(f"{where}: empty, no statistics to standardize with")
    total = np.zeros(WIDTH)
    for start in range(0, n, CHUNK):
        x = _rows(left, right, start, start + CHUNK).astype(np.float64)
        require_finite(x, f"{where} (rows from {start})", axes=("frame", "value"))
        total += x.sum(axis=0)
    mean = total / n
    squares = np.zeros(WIDTH)
    for start in range(0, n, CHUNK):
        squares += np.square(_rows(left, right, start, start + CHUNK).astype(np.float64) - mean).sum(axis=0)
    std = np.sqrt(squares / n)
    return mean.astype(np.float32), np.where(std < MIN_STD, 1.0, std).astype(np.float32)


def write_standardization(root: pathlib.Path, splits) -> None:
    """Add ``standardization.json`` and each split's ``x90_standardized.npy`` to the prepared folder
    ``root`` (whose ``train`` split must hold poses); chunked, so memory stays small."""
    root = pathlib.Path(root)
    mean, std = train_statistics(*_halves(root / "train"), where=str(root / "train"))
    for split in splits:
        left, right = _halves(root / split)
        if len(left) == 0:  # a map of no rows cannot be opened for writing
            np.save(root / split / STANDARDIZED_FILE, np.zeros((0, WIDTH), np.float32))
            continue
        out = np.lib.format.open_memmap(root / split / STANDARDIZED_FILE, mode="w+", dtype=np.float32,
                                        shape=(len(left), WIDTH))
        for start in range(0, len(left), CHUNK):
            block = _rows(left, right, start, start + CHUNK)
            np.subtract(block, mean, out=block)
            np.divide(block, std, out=block)
            out[start:start + len(block)] = block
        out.flush()
        del out
    text = json.dumps({"from_split": "train", "poses": len(_halves(root / "train")[0]), "min_std": MIN_STD,
                       "mean": mean.tolist(), "std": std.tolist()}, indent=1)
    (root / STATISTICS_FILE).write_text(text + "\n")


def read_statistics(root: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """The train split's (mean, std) as written by :func:`write_standardization`."""
    path = pathlib.Path(root) / STATISTICS_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing, so this folder has no standardized poses (`handforge prepare mocap` "
                        f"writes them whenever the train split holds poses); prepare the folder again, or set "
                        f"standardize = false")
    try:
        meta = json.loads(path.read_text())
        mean, std = (np.asarray(meta[key], dtype=np.float32) for key in ("mean", "std"))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise DataError(f"{path}: expected an object with 'mean' and 'std' lists of {WIDTH} numbers ({exc})") from None
    for key, values in (("mean", mean), ("std", std)):
        if values.shape != (WIDTH,) or not all(math.isfinite(v) for v in values.tolist()):
            raise DataError(f"{path}: '{key}' must be {WIDTH} finite numbers, got shape {values.shape}")
    if (std <= 0).any():
        raise DataError(f"{path}: 'std' must be positive")
    return mean, std


def open_standardized(root: pathlib.Path, split: str, poses: int) -> np.ndarray:
    """The split's standardized (poses, 90) float32 rows, memory-mapped copy-on-write (writable for
    torch, never written back)."""
    path = pathlib.Path(root) / split / STANDARDIZED_FILE
    try:
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as a plain .npy array ({exc}); prepare the folder again") from None
    if array.dtype != np.float32 or array.shape != (poses, WIDTH):
        raise DataError(f"{path}: expected ({poses}, {WIDTH}) float32 (the split's poses), got {array.shape} "
                        f"{array.dtype}")
    return array
