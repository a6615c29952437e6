"""procedural_hands: the built-in dataset, a procedural renderer of labelled hands.

Each sample is drawn from a counter-based random stream keyed by (seed, split, index), posed
by the kinematic hand of :mod:`hand_geometry`, seen by a pinhole camera, and rendered as
signed-distance capsules (phalanges) and a rounded polygon (palm), anti-aliased and shaded,
composited far to near over a solid, gradient or noise background. A batch is one vectorised
pass over (batch, parts, pixels). Only element-wise arithmetic touches per-sample values, so a
sample is bit-identical alone or anywhere in any batch.
"""
import math
from typing import Literal

import attrs
import torch
from attrs.validators import ge, in_, le

from handforge import hookimpl

from . import hand_geometry as geo
from . import hand_render

BACKGROUNDS = ("mixed", "solid", "gradient", "noise")
FOCAL = 1.6  # focal length in image widths (a ~35 degree field of view)
# Skin tones from light to dark (sRGB in [0, 1]); an individual's tone lies between two stops.
SKIN_TONES = torch.tensor([[0.98, 0.84, 0.74], [0.93, 0.74, 0.60], [0.82, 0.60, 0.45],
                           [0.65, 0.45, 0.31], [0.45, 0.29, 0.19], [0.30, 0.19, 0.12]])


@attrs.define
class ProceduralHandsConfig:
    """Options of the procedural hand renderer."""

    size: int = attrs.field(default=32, validator=[ge(16), le(256)])  # image side, pixels
    length: int = attrs.field(default=50_000, validator=ge(1))  # samples per epoch (the data is virtual)
    seed: int = 0  # which data set; val draws from its own stream
    left_fraction: float = attrs.field(default=0.5, validator=[ge(0.0), le(1.0)])  # share of left hands
    identities: int = attrs.field(default=1000, validator=ge(1))  # individuals: proportions, skin tone
    pose_noise: float = attrs.field(default=1.0, validator=[ge(0.0), le(3.0)])  # 0: exact handshape templates
    view_jitter: float = attrs.field(default=35.0, validator=[ge(0.0), le(80.0)])  # max out-of-plane, deg
    # "mixed" draws solid, gradient and noise backgrounds alike
    background: Literal["mixed", "solid", "gradient", "noise"] = attrs.field(
        default="mixed", validator=in_(BACKGROUNDS))


# -- counter-based random numbers ---------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, without overflowing int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser: a bijective hash of uint32 values held in int64."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _salt(*salts: int) -> torch.Tensor:
    """A uint32 stream key from integers (seed, stream kind)."""
    h = torch.zeros((), dtype=torch.int64)
    for salt in salts:
        h = _mix(_mix(h ^ (salt & _M32)) ^ ((salt >> 32) & _M32))
    return h


def _uniform(salt: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) uniforms in [0, 1): value j of id i is hash(salt, i, j), whatever the batch."""
    key = _mix(_mix((ids & _M32) ^ salt) ^ ((ids >> 32) & _M32))[:, None]
    counter = _COUNTERS[:n] if n <= len(_COUNTERS) else _mix(torch.arange(n, dtype=torch.int64) + 0x2545F491)
    h = _mix(_mix((key + counter) & _M32) ^ key)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


_COUNTERS = _mix(torch.arange(256, dtype=torch.int64) + 0x2545F491)


def _normal(u: torch.Tensor) -> torch.Tensor:
    """Approximately standard normal from (..., 3) uniforms (Irwin-Hall), bounded by +-3."""
    return (u[..., 0] + u[..., 1] + u[..., 2] - 1.5) * 2.0


def _between(u, lo, hi):
    return lo + u * (hi - lo)


def _color(u):
    """Random background colours from uniforms (..., 4): grey level, then a saturated tint."""
    grey = _between(u[..., :1], 0.08, 0.95)
    return (grey + (u[..., 1:] - 0.5) * (0.8 * u[..., :1].clamp(0.2, 0.8))).clamp(0.0, 1.0)


class ProceduralHands(torch.utils.data.Dataset):
    """Procedurally rendered hands: 10 HaGRID gestures, keypoints, 3D joints, identities."""

    def __init__(self, config: ProceduralHandsConfig, split: str = "train"):
        if split not in ("train", "val"):
            raise ValueError(f"procedural_hands: split must be 'train' or 'val', got {split!r}")
        self.config, self.split = config, split
        self.class_names = list(geo.CLASS_NAMES)
        self.image_size = config.size
        self._sample_salt = _salt(config.seed, 1 if split == "val" else 0)  # disjoint streams per split
        self._identity_salt = _salt(config.seed, 2)

    def __len__(self) -> int:
        return self.config.length

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}

    def __getitems__(self, indices) -> dict:
        return self.render(self.sample_params(indices))

    # -- parameters ----------------------------------------------------------------------------
    def sample_params(self, indices) -> dict:
        """Every random choice of the given samples, as (B, ...) tensors."""
        cfg = self.config
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        idx = torch.where(idx < 0, idx + cfg.length, idx)
        if idx.numel() and (idx.min() < 0 or idx.max() >= cfg.length):
            raise IndexError(f"procedural_hands: index out of range for length {cfg.length}")
        draws = _uniform(self._sample_salt, idx, _DRAWS)
        u = draws[:, :24]
        pose_u = draws[:, 24:24 + 3 * geo.N_ANGLES].view(-1, geo.N_ANGLES, 3)
        colour_u = draws[:, 84:96].view(-1, 3, 4)
        n_classes = len(self.class_names)
        label = (u[:, 0] * n_classes).long().clamp(max=n_classes - 1)
        identity = (u[:, 1] * cfg.identities).long().clamp(max=cfg.identities - 1)
        angles = geo.TEMPLATES[label] + _normal(pose_u) * (geo.ANGLE_NOISE * cfg.pose_noise)
        angles = torch.minimum(torch.maximum(angles, geo.ANGLE_LO), geo.ANGLE_HI)
        scale = _between(u[:, 6], 0.55, 0.85)  # hand length over image size
        room = (0.5 - 0.6 * scale).clamp_min(0.0) + 0.04  # how far the palm centre may move
        if cfg.background == "mixed":
            bg_kind = (u[:, 13] * 3).long().clamp(max=2)
        else:
            bg_kind = torch.full_like(label, BACKGROUNDS.index(cfg.background) - 1)
        params = {
            "label": label,
            "identity": identity,
            "handedness": (u[:, 2] >= cfg.left_fraction).long(),
            "angles": angles,
            "roll": u[:, 3] * (2 * math.pi),
            "yaw": (geo.CLASS_YAW[label] + (u[:, 4] * 2.0 - 1.0) * cfg.view_jitter) * geo.DEG,
            "pitch": (u[:, 5] * 2.0 - 1.0) * (cfg.view_jitter * geo.DEG),
            "scale": scale,
            "shift": (u[:, 7:9] * 2.0 - 1.0) * room[:, None],
            "light_azimuth": u[:, 9] * (2 * math.pi),
            "light_elevation": _between(u[:, 10], 30.0, 75.0) * geo.DEG,
            "ambient": _between(u[:, 11], 0.25, 0.45),
            "gain": _between(u[:, 12], 0.85, 1.15),
            "bg_kind": bg_kind,
            "bg_colors": _color(colour_u[:, :2]),
            "bg_angle": u[:, 14] * (2 * math.pi),
            "bg_noise": draws[:, 96:],
            "sleeve": u[:, 15] < 0.6,
            "sleeve_color": _color(colour_u[:, 2]),
            "sleeve_start": _between(u[:, 16], 0.15, 0.6),  # hand lengths below the wrist
        }
        params.update(self.identity_params(identity))
        return params

    def identity_params(self, identity: torch.Tensor) -> dict:
        """Proportions and skin tone of synthetic individuals (the same in both splits)."""
        u = _uniform(self._identity_salt, identity, 8)
        tone = u[:, 0] * (len(SKIN_TONES) - 1.001)
        lo = tone.floor().long()
        w = (tone - lo)[:, None]
        skin = SKIN_TONES[lo] * (1.0 - w) + SKIN_TONES[lo + 1] * w
        skin = (skin * _between(u[:, 1:4], 0.95, 1.05)).clamp(0.0, 1.0)
        return {
            "hand_length": _between(u[:, 4], 0.165, 0.205),  # metres, wrist to middle fingertip
            "finger_scale": _between(u[:, 5], 0.92, 1.08),
            "palm_scale": _between(u[:, 6], 0.92, 1.1),
            "thickness": _between(u[:, 7], 0.9, 1.15),
            "skin": skin,
        }

    # -- rendering -----------------------------------------------------------------------------
    def render(self, p: dict, with_mask: bool = False) -> dict:
        """Contract fields for sampled parameters (plus "mask", the hand's coverage, if asked)."""
        size = self.image_size
        focal = FOCAL * size
        sin, cos = geo.sincos(torch.stack([p["roll"], p["yaw"], p["pitch"], p["light_azimuth"],
                                           p["light_elevation"], p["bg_angle"]], -1))
        cam, rot = self._pose(p, sin[:, :3], cos[:, :3], focal)
        z = cam[..., 2]
        u = cam[..., 0] / z * focal + size / 2.0
        v = cam[..., 1] / z * focal + size / 2.0
        hl = p["hand_length"]
        radii = geo.joint_radii(p["thickness"]) * hl[:, None]
        radii = torch.cat([radii, radii[:, _TIP_JOINTS]], 1)  # tip ends share the tip's radius
        za, zb = z[:, _SEG_A], z[:, _SEG_B]
        caps = torch.stack([u[:, _SEG_A], v[:, _SEG_A], u[:, _SEG_B], v[:, _SEG_B],
                            radii[:, _SEG_A] * focal / za, radii[:, _SEG_B] * focal / zb], -1)
        normal = rot[..., 2]  # out of the palm; seen from the side that faces the camera
        visible_normal = normal * torch.where(normal[:, 2] < 0, 1.0, -1.0)[:, None]
        palm_point = cam[:, _CENTRE] + visible_normal * (geo.PALM_HALF_THICKNESS * hl)[:, None]
        light = torch.stack([cos[:, 4] * cos[:, 3], cos[:, 4] * sin[:, 3], -sin[:, 4]], -1)

        # Painter's order: capsules by mean depth (the thenar bulge sits on the palm), the palm
        # by its visible surface.
        key = (za + zb) * 0.5 - _THENAR_BIAS * hl[:, None]
        order = torch.argsort(key, dim=1, descending=True, stable=True)
        scene = {
            "caps": caps.gather(1, order[..., None].expand(-1, -1, 6)),
            "palm_rank": (key > palm_point[:, 2, None]).sum(1),
            "palm_verts": torch.stack([u[:, _PALM], v[:, _PALM]], -1),
            "palm_round": geo.PALM_HALF_THICKNESS * hl * focal / z[:, _CENTRE],
            "palm_centre": torch.stack([u[:, _CENTRE], v[:, _CENTRE]], -1),
            "palm_extent": 0.3 * hl * focal / z[:, _CENTRE],
            "palm_lit": geo.dot(visible_normal, light),
            "arm": self._arm(p, u, v, z, focal),
            "sleeve_color": p["sleeve_color"],
            "light": light, "ambient": p["ambient"], "gain": p["gain"], "skin": p["skin"],
            "bg_kind": p["bg_kind"], "bg_colors": p["bg_colors"], "bg_noise": p["bg_noise"],
            "bg_dir": torch.stack([cos[:, 5], sin[:, 5]], -1),
        }
        image, mask = hand_render.rasterize(scene, size)
        pixels = torch.stack([u[:, :21], v[:, :21]], -1)
        visible = hand_render.keypoint_visibility(
            pixels, z[:, :21], radii[:, :21], caps, torch.stack([za, zb], -1), _ADJACENT, scene["palm_verts"],
            scene["palm_round"], palm_point, visible_normal, focal, size, _PALM_EXEMPT)

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
            "joints3d": torch.stack([cam[:, :21, 0] * mirror, cam[:, :21, 1], cam[:, :21, 2]], -1),
            "handedness": p["handedness"],
            "identity": p["identity"],
        }
        if with_mask:
            out["mask"] = mask
        return out

    def _pose(self, p, sin, cos, focal):
        """Camera-frame points (x right, y down, z forward; metres) of the posed right hands, in
        the layout below, and the (B, 3, 3) rotation from the hand frame."""
        b = sin.shape[0]
        joints, tip_ends = geo.forward_kinematics(p["angles"], p["finger_scale"], p["palm_scale"])
        palm = torch.tensor(geo.PALM_POLYGON) * torch.stack([p["palm_scale"], torch.ones(b)], -1)[:, None]
        zero = torch.zeros(b)
        centre = torch.tensor((*geo.PALM_CENTRE, 0.0))
        sleeve = torch.stack([zero, -p["sleeve_start"], zero], -1)
        fixed = torch.tensor([geo.ARM_START, geo.ARM_END]).expand(b, 2, 3)
        points = torch.cat([joints, tip_ends, torch.cat([palm, torch.zeros(b, _N_PALM, 1)], -1),
                            centre.expand(b, 1, 3), fixed, sleeve[:, None]], 1)
        # The palm faces the camera (hand y up the image, z towards the camera), then the view
        # turns it; the palm centre sits at the depth where the hand spans `scale` of the image.
        rot = geo.rotation(sin, cos)
        rot = torch.stack([rot[..., 0], -rot[..., 1], -rot[..., 2]], -1)
        hl = p["hand_length"]
        depth = focal * hl / (p["scale"] * self.image_size)
        shift = p["shift"] * (self.image_size / focal) * depth[:, None]
        offset = torch.stack([shift[:, 0], shift[:, 1], depth], -1)
        return geo.rotate(rot, (points - centre) * hl[:, None, None]) + offset[:, None], rot

    @staticmethod
    def _arm(p, u, v, z, focal):
        """(B, 11) forearm and sleeve for :func:`hand_render.rasterize`."""
        arm_r = torch.tensor(geo.ARM_RADIUS) * (p["thickness"] * p["hand_length"])[:, None] * focal
        ax, ay, bx, by = u[:, _ARM], v[:, _ARM], u[:, _ARM + 1], v[:, _ARM + 1]
        length = torch.sqrt((bx - ax) * (bx - ax) + (by - ay) * (by - ay)).clamp_min(1e-6)
        ex, ey = (bx - ax) / length, (by - ay) / length
        start = (u[:, _ARM + 2] - ax) * ex + (v[:, _ARM + 2] - ay) * ey  # the sleeve, along the axis
        ra = arm_r[:, 0] / z[:, _ARM]
        return torch.stack([ax, ay, bx, by, ra, arm_r[:, 1] / z[:, _ARM + 1], 0.25 * ra, p["sleeve"].float(),
                            ex, ey, 0.5 - (ax * ex + ay * ey) - start], -1)


# Point layout of a posed hand: 21 joints, 5 tip ends, the palm polygon, palm centre, arm.
_N_PALM = len(geo.PALM_POLYGON)
_PALM = torch.arange(26, 26 + _N_PALM)
_CENTRE = 26 + _N_PALM
_ARM = _CENTRE + 1  # arm start, arm end, sleeve start
_TIP_JOINTS = torch.tensor([4, 8, 12, 16, 20])
_SEG_A = torch.tensor([a for a, _ in geo.SEGMENTS])
_SEG_B = torch.tensor([21 + geo.TIP_SEGMENTS.index(s) if s in geo.TIP_SEGMENTS else end
                       for s, (_, end) in enumerate(geo.SEGMENTS)])
_ADJACENT = torch.tensor([[k in seg for seg in geo.SEGMENTS] for k in range(21)])
_PALM_EXEMPT = torch.tensor([k in (0, 1, 5, 9, 13, 17) for k in range(21)])  # wrist, CMC, MCPs
_THENAR_BIAS = torch.tensor([0.03] + [0.0] * 14)
_DRAWS = 24 + 3 * geo.N_ANGLES + 12 + 25 + 81  # uniforms per sample: see sample_params

PROVIDES = ("image", "label", "keypoints", "joints3d", "handedness", "identity")


@hookimpl
def register_datasets(register):
    register("procedural_hands", ProceduralHands, config=ProceduralHandsConfig, provides=PROVIDES)
