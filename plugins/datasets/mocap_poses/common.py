"""What every mocap reader returns, the checks they share, and the dispatch by file layout."""
from __future__ import annotations

import pathlib

import attrs
import numpy as np

from handforge.data import require_finite
from handforge.errors import DataError

N_POSE = 45  # 15 MANO joints x axis-angle


@attrs.frozen
class HandSequence:
    left: np.ndarray         # (N, 45) float32
    right: np.ndarray        # (N, 45) float32
    source: str              # the reader's format name, e.g. "amass_smplh"
    frame_rate: float | None
    # True: poses are relative to the flat hand (MANO flat_hand_mean=True, as SMPL+H / SMPL-X fits
    # store them); False: relative to MANO's mean hand (ARCTIC). Converting needs MANO's mean pose,
    # which handforge does not ship, so the convention travels with the poses instead.
    flat_hand_mean: bool
    path: str

    def __len__(self) -> int:
        return len(self.left)


def hand_block(values, path, key: str, cols: slice | None = None) -> np.ndarray:
    """``values[:, cols]`` as a checked (N, 45) float32 array; ``key`` names it in errors."""
    array = np.asarray(values)
    if array.dtype.kind not in "fiu" or array.ndim != 2:
        raise DataError(f"{path} {key!r}: expected a 2-D numeric array, got {array.dtype} {array.shape}")
    block = array[:, cols] if cols is not None else array
    if block.shape[1] != N_POSE:
        raise DataError(f"{path} {key!r}: expected {N_POSE} hand pose values per frame, got shape "
                        f"{array.shape}")
    block = np.ascontiguousarray(block, dtype=np.float32)
    require_finite(block, f"{path} {key!r}", axes=("frame", "value"))
    return block


def frame_rate(found: dict, path, *keys: str) -> float | None:
    for key in keys:
        if key in found:
            value = np.asarray(found[key])
            if value.size != 1 or value.dtype.kind not in "fiu" or not np.isfinite(value).all():
                raise DataError(f"{path} {key!r}: expected one finite frame rate, got {value!r}")
            return float(value.reshape(()))
    return None


def refuse_pca(path, key: str, array) -> None:
    """PCA-compressed hand poses need MANO's hand components, which handforge does not ship."""
    raise DataError(f"{path} {key!r}: holds PCA-compressed hand poses ({np.shape(array)[-1]} components); "
                    "decoding them needs the MANO model files, which handforge does not ship: export "
                    "full 45-D axis-angle poses (use_pca=False) instead")


def read_sequence(path) -> HandSequence:
    """The hand poses in one sequence file, the reader picked by its name and its keys."""
    from . import amass, arctic, grab, motionx
    path = pathlib.Path(path)
    name = path.name
    if name.endswith(".mano.npy"):
        return arctic.read(path)
    if name.endswith(".npy"):
        return motionx.read(path)
    if name.endswith(".npz"):
        from handforge import safe_pickle
        found = safe_pickle.load_npz(path)
        if "lhand" in found or "rhand" in found:
            return grab.from_members(found, path)
        return amass.from_members(found, path)
    raise DataError(f"{path}: not a mocap sequence file (expected .npz, .npy or .mano.npy)")
