"""Hand poses files, the one reader every command and dataset that takes such a file uses.

Accepted: a ``.npz`` with ``right`` and/or ``left`` (N, 45) float arrays, or a folder holding
``right.npy`` and/or ``left.npy`` (one split of a prepared mocap folder, e.g. ``prepared/test``).
Values are axis-angle, 15 joints in MANO order, each hand in its own frame (a left hand's in the
mirrored left-hand frame, the ``hand_pose`` convention). Other keys of an ``.npz`` are ignored.
No pickles are read (``allow_pickle=False``): an object array is refused naming the file.
"""
from __future__ import annotations

import pathlib

import numpy as np
import torch

from .data import non_finite
from .errors import DataError

HANDS = ("left", "right")


def _check(array, where: str) -> torch.Tensor:
    if array.ndim != 2 or array.shape[1] != 45 or array.shape[0] == 0 or not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{where}: expected (N, 45) float axis-angle poses with N >= 1, got {array.shape} {array.dtype}")
    values = np.asarray(array, dtype=np.float32)
    problem = non_finite(values, axes=("pose", "value"))
    if problem:
        raise DataError(f"{where}: {problem}")
    return torch.from_numpy(values.copy())


def _reason(exc: Exception) -> str:
    # numpy's own message about pickles suggests loading unsafely; say what handforge does instead.
    text = str(exc)
    return "it holds pickled objects, which handforge never unpickles" if "pickle" in text.lower() else text


def load_poses(path, what: str = "poses file") -> dict[str, torch.Tensor]:
    """``{"left"?: (N, 45), "right"?: (N, 45)}`` float32 tensors from a poses file or folder.

    ``what`` opens every error message (the option or argument that named ``path``), followed by
    the file and, in an ``.npz``, the key: ``poses_file x.npz: key 'right': NaN at pose 0, value 3``."""
    path = pathlib.Path(path)
    found = {}
    if not path.exists():
        raise DataError(f"{what} {path}: no such file or folder")
    if path.is_dir():
        for hand in HANDS:
            file = path / f"{hand}.npy"
            if file.is_file():
                try:
                    array = np.load(file, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as exc:
                    raise DataError(f"{what} {file}: cannot read as a plain .npy array ({_reason(exc)})") from None
                found[hand] = _check(array, f"{what} {file}")
        expected = "right.npy or left.npy"
    else:
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{what} {path}: cannot read as an .npz of arrays ({_reason(exc)})") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{what} {path}: a single array, not an .npz archive with keys 'right' / 'left'")
        with archive:
            keys = list(archive.files)
            for hand in HANDS:
                if hand in keys:
                    try:
                        array = archive[hand]
                    except (OSError, ValueError, EOFError) as exc:
                        raise DataError(f"{what} {path}: key '{hand}': cannot read ({_reason(exc)})") from None
                    found[hand] = _check(array, f"{what} {path}: key '{hand}'")
        expected = f"key 'right' or 'left' (it has {', '.join(keys) or 'no keys'})"
    if not found:
        raise DataError(f"{what} {path}: no hand poses, expected {expected}")
    return found
