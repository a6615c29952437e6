"""procedural_hands: the built-in dataset, a procedural renderer of labelled hands.

Each sample is drawn from a counter-based random stream keyed by (seed, split, index): a
handshape template plus joint noise within joint limits gives the 45-D ``hand_pose``;
forward kinematics poses an individual's skeleton; a pinhole camera sees it from a random
view; the rasteriser draws shaded capsules (phalanges), a rounded slab (palm) and the forearm
over a solid, gradient, noise or cluttered background, anti-aliased. A batch is one vectorised
pass over (batch, parts, pixels), and only element-wise arithmetic touches per-sample values,
so a sample is bit-identical alone or anywhere in any batch.
"""
import math
from typing import Literal

import attrs
import torch
from attrs.validators import ge, in_, le

from handforge import hookimpl
from handforge.errors import HandforgeError
from handforge.pose_files import load_poses

from . import counter_rng as rng
from . import kinematics as kin
from . import raster, scene
from .creases import crease_params
from .handshapes import ANGLE_HI, ANGLE_LO, ANGLE_NOISE, CLASS_SETS, PALM_VIEW, ClassSet

BACKGROUNDS = ("mixed", "solid", "gradient", "noise", "clutter")
VIEWS = ("gestures", "palm")
# Skin tones from light to dark (sRGB in [0, 1]); an individual's tone lies between two stops.
SKIN_TONES = torch.tensor([[0.98, 0.84, 0.74], [0.93, 0.74, 0.60], [0.82, 0.60, 0.45],
                           [0.65, 0.45, 0.31], [0.45, 0.29, 0.19], [0.30, 0.19, 0.12]])
# Left hands' hand_pose is in the mirrored (left-hand, MANO-style) frame: x flips, so each
# rotation vector becomes (x, -y, -z).
LEFT_POSE_SIGN = torch.tensor([1.0, -1.0, -1.0]).repeat(15)


def _size_range(_, attribute, value):
    if (len(value) != 2 or not all(isinstance(v, (int, float)) for v in value)
            or not 0.1 <= value[0] <= value[1] <= 1.2):
        raise ValueError(f"{attribute.name}: must be [min, max] with 0.1 <= min <= max <= 1.2, got {value!r}")


@attrs.define
class ProceduralHandsConfig:
    """Options of the procedural hand renderer."""

    size: int = attrs.field(default=32, validator=[ge(16), le(256)])  # image side, pixels
    length: int = attrs.field(default=50_000, validator=ge(1))  # samples per epoch (the data is virtual)
    seed: int = 0  # which data set; val draws from its own stream
    # "hagrid": the 18 HaGRID gestures; "fingerspelling": 16 static ASL letters
    classes: Literal["hagrid", "fingerspelling"] = attrs.field(default="hagrid", validator=in_(tuple(CLASS_SETS)))
    left_fraction: float = attrs.field(default=0.5, validator=[ge(0.0), le(1.0)])  # share of left hands
    identities: int = attrs.field(default=1000, validator=ge(1))  # individuals: proportions, skin tone
    pose_noise: float = attrs.field(default=1.0, validator=[ge(0.0), le(3.0)])  # 0: exact handshape templates
    view_jitter: float = attrs.field(default=25.0, validator=[ge(0.0), le(80.0)])  # max out-of-plane turn, deg
    roll_jitter: float = attrs.field(default=30.0, validator=[ge(0.0), le(180.0)])  # max in-plane turn, deg
    # "mixed" draws solid, gradient, noise and clutter backgrounds alike
    background: Literal["mixed", "solid", "gradient", "noise", "clutter"] = attrs.field(
        default="mixed", validator=in_(BACKGROUNDS))
    # hand length (wrist to middle fingertip) over the image side, drawn between these two
    hand_size: list[float] = attrs.field(factory=lambda: [0.3, 0.5], validator=_size_range)
    # also render `reference` (with its `reference_keypoints`): the same individual in another pose and view
    reference: bool = False
    # "gestures": each class's handshape in its view; "palm": one class, the open hand with the palm
    # to the camera, centred, with the individual's palm creases (`classes` is then not used)
    view: Literal["gestures", "palm"] = attrs.field(default="gestures", validator=in_(VIEWS))
    # Poses from a file instead of handshape templates: an .npz with right / left (N, 45) (handforge
    # sample-poses) or a prepared mocap split folder (right.npy / left.npy). Each sample takes a random
    # row; there is no handshape class then, so no `label`.
    poses_file: str = ""  # "" = handshape templates


# Uniform draws per sample, by use (see sample_params).
_GENERAL, _POSE, _COLOUR, _BG_NOISE, _RASTER = 24, 45 * 3, 12, 25 + 81, 64
_DRAWS = _GENERAL + _POSE + _COLOUR + _BG_NOISE + _RASTER


def _color(u):
    """Random background colours from uniforms (..., 4): grey level, then a saturated tint."""
    grey = rng.between(u[..., :1], 0.08, 0.95)
    return (grey + (u[..., 1:] - 0.5) * (0.8 * u[..., :1].clamp(0.2, 0.8))).clamp(0.0, 1.0)


class ProceduralHands(torch.utils.data.Dataset):
    """Procedurally rendered hands: HaGRID gestures or fingerspelling, keypoints, 3D joints, poses."""

    def __init__(self, config: ProceduralHandsConfig, split: str = "train"):
        if split not in ("train", "val"):
            raise ValueError(f"procedural_hands: split must be 'train' or 'val', got {split!r}")
        self.config, self.split = config, split
        self.palm_view = config.view == "palm"
        if self.palm_view and config.poses_file:
            # The palm view is one open-hand pose by definition; a poses file sets every pose.
            raise HandforgeError("procedural_hands: view = \"palm\" and poses_file are exclusive; drop one of them")
        self.classes = ClassSet("palm", PALM_VIEW) if self.palm_view else ClassSet(config.classes)
        self.class_names = list(self.classes.names)
        self.image_size = config.size
        part = 1 if split == "val" else 0  # disjoint streams per split
        self._sample_key = rng.stream(config.seed, part)
        self._reference_key = rng.stream(config.seed, part + 4)
        self._identity_key = rng.stream(config.seed, 2)
        self._crease_key = rng.stream(config.seed, 7)  # the palm view's creases, per identity
        self.file_poses = load_poses(config.poses_file, "poses_file") if config.poses_file else None

    def __len__(self) -> int:
        return self.config.length

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}

    def __getitems__(self, indices) -> dict:
        params = self.sample_params(indices)
        out = self.render(params)
        if self.config.reference:
            reference = self.render(self.reference_params(params))
            out["reference"], out["reference_keypoints"] = reference["image"], reference["keypoints"]
        return out

    # -- parameters ----------------------------------------------------------------------------
    def _indices(self, indices) -> torch.Tensor:
        n = self.config.length
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        idx = torch.where(idx < 0, idx + n, idx)
        if idx.numel() and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"procedural_hands: index out of range for length {n}")
        return idx

    def sample_params(self, indices, key=None) -> dict:
        """Every random choice of the given samples, as (B, ...) tensors."""
        cfg = self.config
        idx = self._indices(indices)
        draws = rng.uniform(self._sample_key if key is None else key, idx, _DRAWS)
        u, pose_u, colour_u, bg_noise, raster_u = draws.split([_GENERAL, _POSE, _COLOUR, _BG_NOISE, _RASTER], 1)
        n_classes = len(self.class_names)
        label = (u[:, 0] * n_classes).long().clamp(max=n_classes - 1)
        identity = (u[:, 1] * cfg.identities).long().clamp(max=cfg.identities - 1)
        noise = rng.normal(pose_u.reshape(-1, 15, 3, 3)) * (ANGLE_NOISE * cfg.pose_noise)
        angles = torch.minimum(torch.maximum(self.classes.templates[label] + noise, ANGLE_LO), ANGLE_HI)
        view = self.classes.views[label]
        if self.file_poses is not None:  # no class, so no class view either
            view = torch.zeros_like(view)
        scale = rng.between(u[:, 6], *cfg.hand_size)  # hand length over image side
        # How far the hand's box centre may move; the palm view keeps it centred.
        room = torch.zeros_like(scale) if self.palm_view else (0.45 - 0.55 * scale).clamp_min(0.0)
        kinds = len(BACKGROUNDS) - 1
        if cfg.background == "mixed":
            bg_kind = (u[:, 13] * kinds).long().clamp(max=kinds - 1)
        else:
            bg_kind = torch.full_like(label, BACKGROUNDS.index(cfg.background) - 1)
        params = {
            "index": idx,
            "label": label,
            "identity": identity,
            "handedness": (u[:, 2] >= cfg.left_fraction).long(),
            "angles": angles,
            "roll": (view[:, 0] + (u[:, 3] * 2.0 - 1.0) * cfg.roll_jitter) * kin.DEG,
            "yaw": (view[:, 1] + (u[:, 4] * 2.0 - 1.0) * cfg.view_jitter) * kin.DEG,
            "pitch": (view[:, 2] + (u[:, 5] * 2.0 - 1.0) * cfg.view_jitter) * kin.DEG,
            "scale": scale,
            "shift": (u[:, 7:9] * 2.0 - 1.0) * room[:, None],
            "light_azimuth": u[:, 9] * (2 * math.pi),
            "light_elevation": rng.between(u[:, 10], 30.0, 75.0) * kin.DEG,
            "ambient": rng.between(u[:, 11], 0.25, 0.45),
            "gain": rng.between(u[:, 12], 0.85, 1.15),
            "bg_kind": bg_kind,
            "bg_colors": _color(colour_u[:, :8].reshape(-1, 2, 4)),
            "bg_angle": u[:, 14] * (2 * math.pi),
            "bg_noise": bg_noise,
            "sleeve": u[:, 15] < 0.6,
            "sleeve_color": _color(colour_u[:, 8:]),
            "sleeve_start": rng.between(u[:, 16], 0.15, 0.6),  # hand lengths below the wrist
            "raster_rand": raster_u,
        }
        if self.file_poses is not None:
            params["pose_u"] = u[:, _GENERAL - 1]  # which row of the file; the last general draw
        params.update(self.identity_params(identity))
        return params

    def identity_params(self, identity: torch.Tensor) -> dict:
        """Proportions and skin tone of synthetic individuals (the same in both splits); in the
        palm view also their palm creases."""
        u = rng.uniform(self._identity_key, identity, 16)
        tone = u[:, 0] * (len(SKIN_TONES) - 1.001)
        lo = tone.floor().long()
        w = (tone - lo)[:, None]
        skin = SKIN_TONES[lo] * (1.0 - w) + SKIN_TONES[lo + 1] * w
        skin = (skin * rng.between(u[:, 1:4], 0.95, 1.05)).clamp(0.0, 1.0)
        params = {
            "hand_length": rng.between(u[:, 4], 0.165, 0.205),  # metres, wrist to middle fingertip
            "finger_scale": rng.between(u[:, 5], 0.92, 1.08),
            "palm_scale": rng.between(u[:, 6], 0.92, 1.1),
            "thickness": rng.between(u[:, 7], 0.9, 1.15),
            "digit_scale": rng.between(u[:, 8:13], 0.95, 1.05),  # thumb, index, middle, ring, pinky
            "skin": skin,
        }
        if self.palm_view:
            params.update(crease_params(self._crease_key, identity))
        return params

    def reference_params(self, params: dict) -> dict:
        """The same individuals, hands, clothes and backgrounds in another pose, view and light."""
        ref = self.sample_params(params["index"], key=self._reference_key)
        keep = ("identity", "handedness", "bg_kind", "bg_colors", "bg_angle", "bg_noise", "sleeve",
                "sleeve_color", "sleeve_start", "raster_rand")
        ref.update({k: params[k] for k in keep})
        ref.update(self.identity_params(params["identity"]))
        return ref

    # -- rendering -----------------------------------------------------------------------------
    def rest_skeletons(self, p: dict) -> torch.Tensor:
        """(B, 21, 3) flat right hands of the sampled individuals, hand-length units."""
        return kin.rest_skeleton(p["finger_scale"], p["palm_scale"], p["digit_scale"])

    def render(self, p: dict, with_mask: bool = False) -> dict:
        """Contract fields for sampled parameters (plus "mask", the hand's coverage, if asked)."""
        size = self.image_size
        hand_pose = kin.anatomical_to_pose(p["angles"]) if self.file_poses is None else self._file_pose(p)
        joints, frames = kin.forward_kinematics(hand_pose, self.rest_skeletons(p))
        view, pixels, visible, cam = scene.build(p, joints, frames, size)
        image, mask = raster.rasterize(view, size)

        # Left hands are mirrored right hands: mirror the finished view.
        left = p["handedness"] == 0
        lefts = left.nonzero().squeeze(1)
        if lefts.numel():
            image[lefts] = image[lefts].flip(-1)
            mask[lefts] = mask[lefts].flip(-1)
        x = pixels[..., 0] / size
        x = torch.where(left[:, None], 1.0 - x, x)
        mirror = torch.where(left, -1.0, 1.0)[:, None]
        out = {
            "image": image.mul_(2.0).sub_(1.0),  # [0, 1] -> [-1, 1]
            "label": p["label"],
            "keypoints": torch.stack([x, pixels[..., 1] / size, visible.float()], -1),
            "joints3d": torch.stack([cam[..., 0] * mirror, cam[..., 1], cam[..., 2]], -1),
            "hand_pose": torch.where(left[:, None], hand_pose * LEFT_POSE_SIGN, hand_pose),
            "handedness": p["handedness"],
            "identity": p["identity"],
        }
        if with_mask:
            out["mask"] = mask
        if self.file_poses is not None:
            del out["label"]
        return out

    def _file_pose(self, p: dict) -> torch.Tensor:
        """(B, 45) right-hand-frame poses from the poses file: a left hand takes a row of the file's
        left poses (mirrored into the right-hand frame the renderer poses), a right hand one of its
        right poses; a file with one hand serves both."""
        poses = self.file_poses
        left_rows = poses.get("left", poses.get("right"))
        right_rows = poses.get("right", poses.get("left"))
        left_sign = LEFT_POSE_SIGN if "left" in poses else torch.ones(45)
        right_sign = LEFT_POSE_SIGN if "right" not in poses else torch.ones(45)
        pick = lambda rows: rows[(p["pose_u"] * len(rows)).long().clamp(max=len(rows) - 1)]  # noqa: E731
        left = p["handedness"] == 0
        return torch.where(left[:, None], pick(left_rows) * left_sign, pick(right_rows) * right_sign)


def provides(config: ProceduralHandsConfig) -> tuple:
    fields = ("image", "label", "keypoints", "joints3d", "hand_pose", "handedness", "identity")
    if config.poses_file:
        fields = tuple(f for f in fields if f != "label")
    return fields + ("reference", "reference_keypoints") if config.reference else fields


@hookimpl
def register_datasets(register):
    register("procedural_hands", ProceduralHands, config=ProceduralHandsConfig, provides=provides)
