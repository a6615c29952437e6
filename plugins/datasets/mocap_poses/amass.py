"""AMASS ``.npz`` sequences, SMPL+H and SMPL-X.

SMPL+H (``poses`` (N, 156)): root 3, body 63, left hand 66:111, right hand 111:156; frame rate
in ``mocap_framerate``. SMPL-X (``poses`` (N, 165)): root 3, body 63, jaw 3, eyes 6, left hand
75:120, right hand 120:165, or the split key ``pose_hand`` (N, 90) left then right; frame rate in
``mocap_frame_rate``. Both store hand poses relative to the flat hand (flat_hand_mean=True).
"""
from __future__ import annotations

import numpy as np

from handforge import safe_pickle
from handforge.errors import DataError

from .common import HandSequence, frame_rate, hand_block

SMPLH = {"width": 156, "left": slice(66, 111), "right": slice(111, 156)}
SMPLX = {"width": 165, "left": slice(75, 120), "right": slice(120, 165)}


def read(path) -> HandSequence:
    return from_members(safe_pickle.load_npz(path), path)


def from_members(found: dict, path) -> HandSequence:
    rate = frame_rate(found, path, "mocap_framerate", "mocap_frame_rate")
    if "pose_hand" in found:
        hands = np.asarray(found["pose_hand"])
        if hands.ndim != 2 or hands.shape[1] != 90:
            raise DataError(f"{path} 'pose_hand': expected (N, 90) left then right, got {hands.shape}")
        return HandSequence(hand_block(hands, path, "pose_hand", slice(0, 45)),
                            hand_block(hands, path, "pose_hand", slice(45, 90)),
                            "amass_smplx", rate, True, str(path))
    if "poses" not in found:
        raise DataError(f"{path}: no hand poses: expected 'poses' (AMASS SMPL+H / SMPL-X) or "
                        f"'pose_hand'; found keys {sorted(found)}")
    poses = np.asarray(found["poses"])
    width = poses.shape[1] if poses.ndim == 2 else None
    for name, layout in (("amass_smplh", SMPLH), ("amass_smplx", SMPLX)):
        if width == layout["width"]:
            return HandSequence(hand_block(poses, path, "poses", layout["left"]),
                                hand_block(poses, path, "poses", layout["right"]),
                                name, rate, True, str(path))
    raise DataError(f"{path} 'poses': expected (N, 156) SMPL+H or (N, 165) SMPL-X, got {poses.shape}")
