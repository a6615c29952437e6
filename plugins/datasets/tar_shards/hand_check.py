"""Do the hand points look like hands? A check of a layout's hand mapping on the user's own data.

The stored keypoints are a body layout (SynthSL: SMPL-X joints; Bosphorus: MediaPipe landmarks)
and ``hand_points`` says which 42 of them are the left and the right hand. A wrong mapping raises
no error by itself: the hand boxes, the hand-weighted loss and the hand metrics would quietly
measure a patch of face or shoulder. So the dataset checks it on the reference poses when it opens:
a detected hand (most of its 21 points inside the frame) spans a small part of the whole skeleton,
while 21 points that mix a hand with face or body points span much of it. When more than a quarter
of the judged hands spread over more than half the skeleton's extent (a mapping off for one hand
makes half of them), the mapping is refused, naming the option.
"""
from __future__ import annotations

import numpy as np

from handforge.data import N_KEYPOINTS
from handforge.errors import DataError

MAX_SHARE = 0.5  # a hand's box diagonal over the whole skeleton's, above which it is no hand
MIN_VISIBLE = 15  # of a hand's 21 points, for the hand to be judged (MediaPipe zeroes lost hands)
MIN_OTHERS = 10  # visible points outside both hands, for a skeleton to compare the hand with
MIN_JUDGED = 4  # hands judged before the check says anything
MAX_WIDE = 0.25  # share of judged hands that may look wide (a stray detection, a tiny skeleton)
SAMPLE = 256  # reference poses looked at (the first ones, by sequence name)


def _diagonal(points: np.ndarray) -> float:
    return float(np.linalg.norm(points.max(axis=0) - points.min(axis=0)))


def hand_spreads(points: np.ndarray, hand_points) -> list[float]:
    """Each judged hand's box diagonal as a share of the box of all visible points (0, 1, or 2 values)."""
    if points.ndim != 2 or points.shape[1] < 2 or points.shape[0] <= max(hand_points):
        return []
    xy = points[:, :2]
    visible = np.isfinite(xy).all(axis=1) & (xy > 0).all(axis=1) & (xy < 1).all(axis=1)
    hands = np.asarray(hand_points)
    others = visible.copy()
    others[hands] = False
    if others.sum() < MIN_OTHERS:
        return []
    whole = _diagonal(xy[visible])
    spreads = []
    for hand in (hands[:N_KEYPOINTS], hands[N_KEYPOINTS:]):
        seen = hand[visible[hand]]
        if len(seen) >= MIN_VISIBLE and whole > 0:
            spreads.append(_diagonal(xy[seen]) / whole)
    return spreads


def check_hand_points(poses, hand_points, where: str, option: str) -> None:
    """``poses``: (N, >= 2) keypoint arrays normalised to the frame. A :class:`DataError` naming
    ``where`` and ``option`` when more than ``MAX_WIDE`` of the judged hands are spread like no hand is."""
    spreads = [s for points in poses for s in hand_spreads(points, hand_points)]
    if len(spreads) < MIN_JUDGED:
        return
    wide = sum(s > MAX_SHARE for s in spreads)
    if wide > MAX_WIDE * len(spreads):
        raise DataError(
            f"{where}: the hand points ({option}) do not look like hands: in {wide} of the {len(spreads)} hands "
            f"judged, the 21 points spread over more than {MAX_SHARE:.0%} of the whole skeleton (median "
            f"{np.median(spreads):.0%}; a signer's hand covers a small part of it). Set the dataset option "
            f"hand_points to the {2 * N_KEYPOINTS} indices of the left hand then the right hand in these "
            f"keypoint files (wrist, then thumb, index, middle, ring, pinky from base to tip)")
