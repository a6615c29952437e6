"""Hand poses from a file for procedural_hands' ``poses_file`` option: the file is the interface.

Accepted: a ``.npz`` with ``right`` and/or ``left`` (N, 45) float arrays (what ``handforge
sample-poses`` writes), or a folder holding ``right.npy`` and/or ``left.npy`` (a split of a
``handforge prepare mocap`` folder, e.g. ``prepared/test``). Values are axis-angle, 15 joints in
MANO order, each hand in its own frame (a left hand's in the mirrored left-hand frame, the
``hand_pose`` convention). No pickles are read.
"""
from __future__ import annotations

import pathlib

import numpy as np
import torch

from handforge.data import non_finite
from handforge.errors import DataError

HANDS = ("left", "right")


def _check(array, where: str) -> torch.Tensor:
    if array.ndim != 2 or array.shape[1] != 45 or array.shape[0] == 0 or not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{where}: expected (N, 45) float axis-angle poses with N >= 1, got {array.shape} {array.dtype}")
    values = np.asarray(array, dtype=np.float32)
    problem = non_finite(values, axes=("pose", "value"))
    if problem:
        raise DataError(f"{where}: {problem}")
    return torch.from_numpy(values.copy())


def load_poses(path) -> dict[str, torch.Tensor]:
    """``{"left"?: (N, 45), "right"?: (N, 45)}`` float32 tensors from a poses file or folder."""
    path = pathlib.Path(path)
    found = {}
    if path.is_dir():
        for hand in HANDS:
            file = path / f"{hand}.npy"
            if file.is_file():
                try:
                    array = np.load(file, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as exc:
                    raise DataError(f"poses_file {file}: cannot read as a plain .npy array ({exc})") from None
                found[hand] = _check(array, f"poses_file {file}")
        what = "right.npy or left.npy"
    else:
        try:
            with np.load(path, allow_pickle=False) as npz:
                if not hasattr(npz, "files"):
                    raise DataError(f"poses_file {path}: not an .npz archive (a single array)")
                for hand in HANDS:
                    if hand in npz.files:
                        found[hand] = _check(npz[hand], f"poses_file {path}: key '{hand}'")
                keys = list(npz.files)
        except DataError:
            raise
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"poses_file {path}: cannot read as an .npz of arrays ({exc})") from None
        what = f"key 'right' or 'left' (it has {', '.join(keys) or 'no keys'})"
    if not found:
        raise DataError(f"poses_file {path}: no hand poses, expected {what}")
    return found
