"""The two shard layouts: where the shards and reference archives are, how members are keyed, and
which of the stored body keypoints are the hands.

**SynthSL** (verified against the seed project's loader, ``ReadData_SynthSL`` / ``DS_SynthSL``):
``training.tar`` and ``test.tar`` hold ``SEQ.FRAME.<what>`` members (``rgb.png``, ``keypoints.pkl``,
depth, segmentation and normal maps), grouped by the first two dot-separated parts; the sequence
is the first. ``base_imgs_tar.tar`` holds ``SEQ.png`` and ``base_kps_tar.tar`` ``SEQ.pkl``, one per
sequence, keyed by the name before the first dot. Frames are 256x256 and keypoints are pickled
(N, 2) arrays normalised to [0, 1] (the seed multiplies them by 256). The seed's alternative path
builds the same points from the SMPL-X joints of the metadata with a list of 96 joint indices
(``useful_keys``: pelvis, spine3, neck, shoulders, elbows, wrists, the 30 finger joints, the 10
finger tips and 51 face points); the stored keypoints are read in that order here, so the hands are
mapped through the SMPL-X joint names (smplx ``JOINT_NAMES``: 20/21 wrists, 25..39 left and 40..54
right finger joints as index, middle, pinky, ring, thumb x 3, 66..75 the tips thumb..pinky).

**Bosphorus** (verified against the seed's ``ReadData_Bosphorus`` / ``DS_Bosphorus``, folder
``mp96``): ``train/`` and ``test/`` hold one ``SIGNER.SESSION.CLIP.tar.gz`` per clip, each frame
``FRAME.rgb.<ext>``, ``FRAME.keypoints.pkl`` and ``FRAME.depth.pkl`` (keyed by the first part);
``base_images`` / ``base_kps`` hold ``SIGNER.SESSION.CLIP.png`` / ``.pickle`` (here as the archives
``base_images.tar.gz`` and ``base_kps.tar.gz``). Frames are 1920x1080 and cropped to x 480..1440
before resizing; keypoints are normalised to the full frame (the seed maps x by (x - 0.25) / 0.5).
The seed knew some shards to be corrupt and listed them by hand; here they are found and counted.
The 96 points are MediaPipe landmarks ("mp96"); which of them are the hands is NOT stated in the
seed: the default takes the 33 pose landmarks first, then the left and right hand's 21 (MediaPipe
hand order, which is ours). Set ``hand_points`` when a data set's order differs; the dataset checks
the mapping on the reference poses when it opens (:mod:`.hand_check`).
"""
from __future__ import annotations

import pathlib

import attrs

from handforge.data import N_KEYPOINTS
from handforge.errors import DataError

# SMPL-X joint ids of the seed's 96 selected points, in the stored order.
SYNTHSL_JOINTS = (0, 9, 12, *range(16, 22), *range(25, 55), *range(66, 86), *range(88, 119),
                  120, 121, 122, 124, 125, 126)
# One hand in our 21-point order (wrist; thumb, index, middle, ring, pinky base to tip) as SMPL-X
# joint ids: the wrist, each finger's three joints, and its tip from the extra joints 66..75.
_SMPLX_LEFT = (20, 37, 38, 39, 66, 25, 26, 27, 67, 28, 29, 30, 68, 34, 35, 36, 69, 31, 32, 33, 70)
_SMPLX_RIGHT = (21, 52, 53, 54, 71, 40, 41, 42, 72, 43, 44, 45, 73, 49, 50, 51, 74, 46, 47, 48, 75)
SYNTHSL_HANDS = tuple(SYNTHSL_JOINTS.index(j) for j in _SMPLX_LEFT + _SMPLX_RIGHT)
# Bosphorus mp96, assumed (see above): 33 pose landmarks, then the left hand, then the right.
BOSPHORUS_HANDS = tuple(range(33, 33 + 2 * N_KEYPOINTS))


@attrs.frozen
class Layout:
    name: str
    key_parts: int  # dot-separated parts of a member's base name that make its sample key
    reference_images: str  # archive names under root
    reference_keypoints: str
    hand_points: tuple  # default: left 21 then right 21 indices into the stored points
    crop: tuple | None = None  # (x0, y0, x1, y1) in pixels of the stored frame, before resizing
    frame_size: tuple | None = None  # (width, height) the crop and the keypoints refer to

    def shards(self, root: pathlib.Path, split: str) -> list[pathlib.Path]:
        raise NotImplementedError

    def sequence(self, shard: pathlib.Path, key: str) -> str:
        raise NotImplementedError


class SynthSL(Layout):
    def shards(self, root, split):
        shard = root / ("training.tar" if split == "train" else "test.tar")
        if not shard.is_file():
            raise DataError(f"{shard}: shard not found (dataset synthsl, option root: the folder holding "
                            "training.tar, test.tar, base_imgs_tar.tar and base_kps_tar.tar)")
        return [shard]

    def sequence(self, shard, key):
        return key.rpartition("/")[2].split(".")[0]


class Bosphorus(Layout):
    def shards(self, root, split):
        folder = root / ("train" if split == "train" else "test")
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found (dataset bosphorus, option root: the folder holding "
                            "train/, test/, base_images.tar.gz and base_kps.tar.gz)")
        shards = sorted(p for p in folder.iterdir() if p.name.endswith((".tar.gz", ".tar")) and p.is_file())
        if not shards:
            raise DataError(f"{folder}: no SIGNER.SESSION.CLIP.tar.gz shards")
        return shards

    def sequence(self, shard, key):
        return shard.name.removesuffix(".gz").removesuffix(".tar")


LAYOUTS = {
    "synthsl": SynthSL("synthsl", 2, "base_imgs_tar.tar", "base_kps_tar.tar", SYNTHSL_HANDS),
    "bosphorus": Bosphorus("bosphorus", 1, "base_images.tar.gz", "base_kps.tar.gz", BOSPHORUS_HANDS,
                           crop=(480, 0, 1440, 1080), frame_size=(1920, 1080)),
}
