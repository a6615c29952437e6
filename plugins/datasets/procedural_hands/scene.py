"""From a posed 3D hand to a rasteriser scene: the body around the skeleton, a pinhole camera,
painter's order, and which keypoints the camera sees.

The body: a tapered capsule per phalanx (the thumb's metacarpal doubles as the thenar bulge),
a palm slab (a polygon grown by a ball) and a forearm tube with an optional sleeve. Sizes are
in hand-length units of the right hand's frame (see :mod:`kinematics`); the scene is in pixels.
"""
import math

import torch

from . import kinematics as kin
from . import raster

FOCAL = 1.6  # focal length in image widths (a ~35 degree field of view)

# The palm is a slab: this core polygon (counter-clockwise seen from +z, x scaled by the
# individual's palm width) grown by a ball of radius PALM_HALF_THICKNESS, so that its outline
# stays a plausible slab seen from any angle.
PALM_POLYGON = ((-0.085, 0.060), (0.000, 0.045), (0.080, 0.060), (0.135, 0.220), (0.150, 0.450),
                (0.110, 0.490), (0.045, 0.500), (-0.045, 0.485), (-0.115, 0.445), (-0.140, 0.370),
                (-0.135, 0.180))
PALM_HALF_THICKNESS = 0.06
PALM_CENTRE = (0.005, 0.300)  # the view rotates about this point
# Forearm from just inside the palm down out of the image: start, end, radii.
ARM_START, ARM_END, ARM_RADIUS = (0.0, 0.08, 0.0), (0.0, -1.6, 0.0), (0.135, 0.175)

# Capsules: one per phalanx, (from keypoint, to keypoint), digits in MediaPipe order; a segment
# ending at a fingertip stops a little short of it (its rounded end reaches the tip).
SEGMENTS = tuple((c * 4 + 1 + k, c * 4 + 2 + k) for c in range(5) for k in range(3))
TIP_SEGMENTS = tuple(c * 3 + 2 for c in range(5))
_SEG_A = torch.tensor([a for a, _ in SEGMENTS])
_SEG_B = torch.tensor([b for _, b in SEGMENTS])
_IS_TIP = torch.tensor([s in TIP_SEGMENTS for s in range(len(SEGMENTS))])
_ADJACENT = torch.tensor([[k in seg for seg in SEGMENTS] for k in range(21)])
_PALM_EXEMPT = torch.tensor([k in (0, 1, 5, 9, 13, 17) for k in range(21)])  # wrist, CMC, MCPs
_THENAR_BIAS = torch.tensor([0.03] + [0.0] * 14)  # the thenar bulge sits on the palm
_N_PALM = len(PALM_POLYGON)


def _dorsal_rest():
    """Where each segment's back (nail side) faces in the rest hand: -z for fingers; the thumb's
    nail is turned towards the radial side."""
    s = kin.THUMB_REST_SPLAY * kin.DEG
    radial = (math.cos(s), -math.sin(s), 0.0)
    thumb = kin._unit((0.75 * radial[0], 0.75 * radial[1], -0.66))
    return torch.tensor([thumb] * 3 + [(0.0, 0.0, -1.0)] * 12)


_DORSAL = _dorsal_rest()  # (15, 3), segments in MediaPipe digit order


def build(p: dict, joints: torch.Tensor, frames: torch.Tensor, size: int):
    """Scene for :func:`raster.rasterize` plus the keypoints' pixels and visibility.

    p: the sample parameters (see ProceduralHands.sample_params); joints (B, 21, 3) posed right
    hands in hand-length units, frames (B, 21, 3, 3) their bone rotations. Returns
    (scene, keypoint pixels (B, 21, 2), visible (B, 21) bool, camera-frame joints (B, 21, 3) metres).
    """
    b = joints.shape[0]
    focal = FOCAL * size
    sin, cos = kin.sincos(torch.stack([p["roll"], p["yaw"], p["pitch"], p["light_azimuth"],
                                       p["light_elevation"], p["bg_angle"]], -1))
    rot = kin.view_rotation(sin[:, :3], cos[:, :3])
    hl = p["hand_length"]
    radii = kin.RADII_T * p["thickness"][:, None]  # hand-length units

    # Tip ends: 0.6 of the tip radius back along the distal bone.
    tips = joints[:, 4::4]
    distal = kin.normalize(tips - joints[:, 3::4])
    tip_ends = tips - distal * (0.6 * radii[:, 4::4])[..., None]
    palm = torch.tensor(PALM_POLYGON) * torch.stack([p["palm_scale"], torch.ones(b)], -1)[:, None]
    zero = torch.zeros(b)
    centre = torch.tensor((*PALM_CENTRE, 0.0))
    sleeve = torch.stack([zero, -p["sleeve_start"], zero], -1)
    fixed = torch.tensor([ARM_START, ARM_END]).expand(b, 2, 3)
    points = torch.cat([joints, tip_ends, torch.cat([palm, torch.zeros(b, _N_PALM, 1)], -1),
                        centre.expand(b, 1, 3), fixed, sleeve[:, None]], 1)
    if "creases" in p:  # the palm view: crease points on the palm's surface, after all the others
        points = torch.cat([points, _crease_points(p)], 1)
    # Frame the hand: the depth sets its size, then a sideways move puts the centre of its
    # keypoints' box at `shift` from the image centre (measured from a nominal depth first;
    # depth scales the box about the optical axis).
    posed = kin.rotate(rot, (points - centre) * hl[:, None, None])
    nominal = 4.0 * hl
    z0 = posed[:, :21, 2] + nominal[:, None]
    u0, v0 = posed[:, :21, 0] / z0, posed[:, :21, 1] / z0  # image-plane units (pixels / focal)
    lo_u, hi_u = u0.min(1).values, u0.max(1).values
    lo_v, hi_v = v0.min(1).values, v0.max(1).values
    # `scale` is the hand's length (wrist to middle tip, flat) over the image side, so a fist
    # is drawn as small as the same hand held open.
    depth = focal * hl / (p["scale"] * size)
    ratio = depth / nominal
    # Box centre on screen after the move: (c0 / ratio) + shift; solve for the sideways move.
    target = p["shift"] * (size / focal) + 0.0
    centre_u, centre_v = (lo_u + hi_u) * 0.5, (lo_v + hi_v) * 0.5
    move_x = (target[:, 0] - centre_u / ratio) * depth
    move_y = (target[:, 1] - centre_v / ratio) * depth
    offset = torch.stack([move_x, move_y, depth], -1)
    cam = posed + offset[:, None]
    z = cam[..., 2]
    u = cam[..., 0] / z * focal + size / 2.0
    v = cam[..., 1] / z * focal + size / 2.0
    r_m = radii * hl[:, None]
    seg_b = torch.where(_IS_TIP, 21 + torch.arange(15) // 3, _SEG_B)  # tip segments end at tip_ends
    za, zb = z[:, _SEG_A], z[:, seg_b]
    caps = torch.stack([u[:, _SEG_A], v[:, _SEG_A], u[:, seg_b], v[:, seg_b],
                        r_m[:, _SEG_A] * focal / za, r_m[:, _SEG_B] * focal / zb], -1)
    normal = rot[..., 2]  # out of the palm; seen from the side that faces the camera
    visible_normal = normal * torch.where(normal[:, 2] < 0, 1.0, -1.0)[:, None]
    palm_point = cam[:, _CENTRE] + visible_normal * (PALM_HALF_THICKNESS * hl)[:, None]
    light = torch.stack([cos[:, 4] * cos[:, 3], cos[:, 4] * sin[:, 3], -sin[:, 4]], -1)
    # Each phalanx's back, turned with its bone and then the view.
    dorsal = kin.rotate(rot, kin.apply3(frames[:, _SEG_B], _DORSAL))

    # Painter's order: capsules by mean depth, the palm by its visible surface.
    key = (za + zb) * 0.5 - _THENAR_BIAS * hl[:, None]
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    scene = {
        "caps": caps.gather(1, order[..., None].expand(-1, -1, 6)),
        "caps_dorsal": dorsal.gather(1, order[..., None].expand(-1, -1, 3)),
        "caps_tip": _IS_TIP.expand(b, -1).gather(1, order),
        "palm_rank": (key > palm_point[:, 2, None]).sum(1),
        "palm_verts": torch.stack([u[:, _PALM], v[:, _PALM]], -1),
        "palm_round": PALM_HALF_THICKNESS * hl * focal / z[:, _CENTRE],
        "palm_centre": torch.stack([u[:, _CENTRE], v[:, _CENTRE]], -1),
        "palm_extent": 0.3 * hl * focal / z[:, _CENTRE],
        "palm_lit": kin.dot(visible_normal, light),
        "arm": _arm(p, u, v, z, focal),
        "sleeve_color": p["sleeve_color"],
        "light": light, "ambient": p["ambient"], "gain": p["gain"], "skin": p["skin"],
        "bg_kind": p["bg_kind"], "bg_colors": p["bg_colors"], "bg_noise": p["bg_noise"],
        "bg_dir": torch.stack([cos[:, 5], sin[:, 5]], -1),
        "rand": p["raster_rand"],
    }
    if "creases" in p:
        scene.update(_creases(p, u, v, z, normal, focal))
    pixels = torch.stack([u[:, :21], v[:, :21]], -1)
    visible = raster.keypoint_visibility(
        pixels, z[:, :21], r_m, caps, torch.stack([za, zb], -1), _ADJACENT, scene["palm_verts"],
        scene["palm_round"], palm_point, visible_normal, focal, size, _PALM_EXEMPT)
    return scene, pixels, visible, cam[:, :21]


_PALM = torch.arange(26, 26 + _N_PALM)
_CENTRE = 26 + _N_PALM
_ARM = _CENTRE + 1  # arm start, arm end, sleeve start


def _arm(p, u, v, z, focal):
    """(B, 11) forearm and sleeve for :func:`raster.rasterize`."""
    arm_r = torch.tensor(ARM_RADIUS) * (p["thickness"] * p["hand_length"])[:, None] * focal
    ax, ay, bx, by = u[:, _ARM], v[:, _ARM], u[:, _ARM + 1], v[:, _ARM + 1]
    length = torch.sqrt((bx - ax) * (bx - ax) + (by - ay) * (by - ay)).clamp_min(1e-6)
    ex, ey = (bx - ax) / length, (by - ay) / length
    start = (u[:, _ARM + 2] - ax) * ex + (v[:, _ARM + 2] - ay) * ey  # the sleeve, along the axis
    ra = arm_r[:, 0] / z[:, _ARM]
    return torch.stack([ax, ay, bx, by, ra, arm_r[:, 1] / z[:, _ARM + 1], 0.25 * ra, p["sleeve"].float(),
                        ex, ey, 0.5 - (ax * ex + ay * ey) - start], -1)


_CREASES = _ARM + 3  # the first crease point


def _crease_points(p) -> torch.Tensor:
    """(B, L * (S + 1), 3) crease points: on the palm's front surface (+z, the palm side, half
    the slab's thickness out), x scaled by the palm width like the palm polygon."""
    creases = p["creases"]
    b = creases.shape[0]
    flat = creases.reshape(b, -1, 2) * torch.stack([p["palm_scale"], torch.ones(b)], -1)[:, None]
    return torch.cat([flat, torch.full((b, flat.shape[1], 1), PALM_HALF_THICKNESS)], -1)


def _creases(p, u, v, z, normal, focal) -> dict:
    """The creases as (B, G, 5) segments (ax, ay, bx, by, half-width), pixels, and their (B, G)
    darkness: the crease's depth times how squarely the palm faces the camera (none when it
    faces away, as the back of the hand is seen then)."""
    b, lines, points = p["creases"].shape[:3]
    at = _CREASES + torch.arange(lines * points).view(lines, points)
    start, end = at[:, :-1].reshape(-1), at[:, 1:].reshape(-1)
    per_line = points - 1
    # normal is the palm side's direction: it faces the camera where its z is negative.
    facing = ((-normal[:, 2] - 0.15) * 4.0).clamp(0.0, 1.0)
    width = (p["crease_width"] * p["hand_length"][:, None]).repeat_interleave(per_line, 1)
    width = width * focal / z[:, _CENTRE, None]
    segments = torch.stack([u[:, start], v[:, start], u[:, end], v[:, end], width], -1)
    depth = p["crease_depth"].repeat_interleave(per_line, 1) * facing[:, None]
    return {"creases": segments, "crease_depth": depth}
