"""GRAB sequence ``.npz``: members are pickled nested dicts. Full MANO hand poses at
``lhand/params/fullpose`` and ``rhand/params/fullpose`` (N, 45); ``hand_pose`` (N, 24) beside
them is PCA-compressed and refused when it is all there is. Frame rate in ``framerate``; GRAB was
captured at 120 fps throughout, which a file without the key is taken to be.
GRAB's hands are fitted with flat_hand_mean=True."""
from __future__ import annotations

import numpy as np

from handforge import safe_pickle
from handforge.errors import DataError

from .common import HandSequence, frame_rate, hand_block, refuse_pca

FRAME_RATE = 120.0  # GRAB's capture rate, for files that do not store it


def read(path) -> HandSequence:
    return from_members(safe_pickle.load_npz(path), path)


def _hand(found: dict, path, side: str) -> np.ndarray:
    hand = found.get(side)
    if not isinstance(hand, dict) or not isinstance(hand.get("params"), dict):
        raise DataError(f"{path}: no '{side}/params' dict (a GRAB sequence has lhand and rhand)")
    params = hand["params"]
    if "fullpose" in params:
        return hand_block(params["fullpose"], path, f"{side}/params/fullpose")
    for key in ("hand_pose", "pose"):
        if key in params and np.shape(params[key])[-1:] in ((12,), (24,)):
            refuse_pca(path, f"{side}/params/{key}", params[key])
    raise DataError(f"{path}: no '{side}/params/fullpose'; found {sorted(params)}")


def from_members(found: dict, path) -> HandSequence:
    left, right = _hand(found, path, "lhand"), _hand(found, path, "rhand")
    if len(left) != len(right):
        raise DataError(f"{path}: lhand has {len(left)} frames, rhand {len(right)}")
    rate = frame_rate(found, path, "framerate")
    return HandSequence(left, right, "grab", FRAME_RATE if rate is None else rate, True, str(path))
