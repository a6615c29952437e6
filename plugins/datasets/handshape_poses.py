"""``handshape_poses``: hand poses alone, from procedural_hands' handshape templates plus joint noise.

The poses procedural_hands renders, without the rendering: a sample is a template of the class
set (HaGRID gestures or fingerspelling) plus Gaussian-like noise within the joint limits, in
anatomical angles, turned into the 45-D axis-angle ``hand_pose`` (MANO order). ``hand_pose90``
holds two independent draws, left (in the mirrored left-hand frame, as procedural_hands writes a
left hand's pose) then right. Every sample is a pure function of (seed, split, index), so a pose
prior trains offline on it as shipped. Thousands of poses per millisecond: no need to cache.
"""
from __future__ import annotations

from typing import Literal

import attrs
import torch
from attrs.validators import ge, in_, le

from handforge import hookimpl
from handforge.data import check_index, check_split

from .procedural_hands import LEFT_POSE_SIGN
from .procedural_hands import counter_rng as rng
from .procedural_hands import kinematics as kin
from .procedural_hands.handshapes import ANGLE_HI, ANGLE_LO, ANGLE_NOISE, CLASS_SETS, ClassSet

_STREAM = 40  # stream kinds apart from procedural_hands' own (0-6)
_DRAWS = 2 * (1 + 45 * 3)  # per hand: the class, then three uniforms per angle


@attrs.define
class HandshapePosesConfig:
    classes: Literal["hagrid", "fingerspelling"] = attrs.field(default="hagrid", validator=in_(tuple(CLASS_SETS)))
    pose_noise: float = attrs.field(default=1.0, validator=[ge(0.0), le(3.0)], metadata={
        "help": "joint noise as a multiple of procedural_hands' (0: the templates exactly)"})
    length: int = attrs.field(default=100_000, validator=ge(1), metadata={"help": "poses per split"})
    seed: int = 0


class HandshapePoses(torch.utils.data.Dataset):
    """Handshape templates plus joint noise as axis-angle hand poses (no images)."""

    def __init__(self, config: HandshapePosesConfig, split: str = "train"):
        check_split("handshape_poses", split)
        self.config, self.split = config, split
        self.classes = ClassSet(config.classes)
        self._key = rng.stream(config.seed, _STREAM + (split == "val"))

    def __len__(self) -> int:
        return self.config.length

    def _hand(self, u: torch.Tensor) -> torch.Tensor:
        n_classes = len(self.classes.names)
        label = (u[:, 0] * n_classes).long().clamp(max=n_classes - 1)
        noise = rng.normal(u[:, 1:].reshape(-1, 15, 3, 3)) * (ANGLE_NOISE * self.config.pose_noise)
        angles = torch.minimum(torch.maximum(self.classes.templates[label] + noise, ANGLE_LO), ANGLE_HI)
        return kin.anatomical_to_pose(angles)

    def __getitems__(self, indices) -> dict:
        n = len(self)
        idx = torch.as_tensor([check_index("handshape_poses", int(i), n, "poses") for i in indices], dtype=torch.int64)
        left_u, right_u = rng.uniform(self._key, idx, _DRAWS).chunk(2, dim=1)
        right = self._hand(right_u)
        left = self._hand(left_u) * LEFT_POSE_SIGN
        return {"hand_pose": right, "hand_pose90": torch.cat([left, right], 1)}

    def __getitem__(self, i: int) -> dict:
        return {k: t[0] for k, t in self.__getitems__([i]).items()}


@hookimpl
def register_datasets(register):
    register("handshape_poses", HandshapePoses, config=HandshapePosesConfig, provides=("hand_pose", "hand_pose90"))
