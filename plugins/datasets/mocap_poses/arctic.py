"""ARCTIC ``raw_seqs/sXX/<seq>.mano.npy``: a pickled dict ``{"right"|"left": {"rot", "pose"
(N, 45), "trans", "shape", ...}}``, fitted with MANO's flat_hand_mean=False: the poses are
relative to MANO's mean hand and are kept so (the convention is recorded, never converted here).
The file stores no frame rate, nor do ARCTIC's data docs. Its rows are the video's frames
(ARCTIC's own loader indexes them by image number minus the sequence's sync offset, ``ioi_offset``
in ``meta/misc.json``), so the rate is taken to be that of ARCTIC's videos, 30 fps."""
from __future__ import annotations

from handforge import safe_pickle
from handforge.errors import DataError

from .common import HandSequence, hand_block, refuse_pca

FRAME_RATE = 30.0


def read(path) -> HandSequence:
    try:
        with open(path, "rb") as file:
            found = safe_pickle.load_npy(file, str(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(found, dict):
        raise DataError(f"{path}: expected a pickled dict with 'left' and 'right', got {type(found).__name__}")
    hands = {}
    for side in ("left", "right"):
        hand = found.get(side)
        if not isinstance(hand, dict) or "pose" not in hand:
            raise DataError(f"{path}: no '{side}/pose' (an ARCTIC .mano.npy holds left and right dicts)")
        pose = hand["pose"]
        if getattr(pose, "ndim", 0) == 2 and pose.shape[1] in (12, 24):
            refuse_pca(path, f"{side}/pose", pose)
        hands[side] = hand_block(pose, path, f"{side}/pose")
    if len(hands["left"]) != len(hands["right"]):
        raise DataError(f"{path}: left has {len(hands['left'])} frames, right {len(hands['right'])}")
    return HandSequence(hands["left"], hands["right"], "arctic", FRAME_RATE, False, str(path))
