"""Motion-X ``.npy`` (N, 322): root 0:3, body 3:66, hands 66:156 (left 66:111, right 111:156),
jaw, face expression, face shape, translation, betas. SMPL-X poses, flat_hand_mean=True."""
from __future__ import annotations

import numpy as np

from handforge import safe_pickle
from handforge.errors import DataError

from .common import HandSequence, hand_block

WIDTH = 322
LEFT, RIGHT = slice(66, 111), slice(111, 156)


def read(path) -> HandSequence:
    try:
        with open(path, "rb") as file:
            array = safe_pickle.load_npy(file, str(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != WIDTH:
        shape = getattr(array, "shape", type(array).__name__)
        raise DataError(f"{path}: expected a Motion-X (N, {WIDTH}) array, got {shape}")
    # Motion-X motions are at 30 fps (the release's own loader assumes it; the file does not say).
    return HandSequence(hand_block(array, path, "hands", LEFT), hand_block(array, path, "hands", RIGHT),
                        "motionx", 30.0, True, str(path))
