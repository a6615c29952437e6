"""A 3D kinematic hand for the procedural renderer: proportions, joint limits, handshapes.

Coordinates are in the *hand frame* of a right hand, in units of hand length (wrist to the
middle fingertip, about 19 cm): origin at the wrist, +x towards the thumb, +y towards the
fingers, +z out of the palm. Flexion bends a finger towards +z. A left hand is a mirrored
right hand (the renderer mirrors the finished view).

Every function here works on batched tensors with element-wise arithmetic only (no matmul,
no reductions, no torch trigonometry), so a sample's result never depends on the batch it
is computed in: see :func:`sincos`.
"""
import math

import torch

# The 10 HaGRID gestures, in label order.
CLASS_NAMES = ("fist", "one", "peace", "three", "four", "palm", "like", "call", "rock", "ok")

# MCP joint centres (x, y) of index, middle, ring, pinky.
FINGER_BASE = ((0.150, 0.490), (0.050, 0.505), (-0.048, 0.485), (-0.138, 0.440))
# Rest splay of each finger in the palm plane, degrees towards the thumb.
FINGER_SPLAY = (5.0, 0.5, -4.0, -9.0)
# Phalanx lengths (proximal, middle, distal incl. the pulp).
FINGER_LENGTH = ((0.215, 0.125, 0.100), (0.240, 0.145, 0.105),
                 (0.225, 0.140, 0.100), (0.175, 0.100, 0.090))
# Radii at MCP, PIP, DIP, tip.
FINGER_RADIUS = ((0.052, 0.047, 0.042, 0.037), (0.054, 0.049, 0.043, 0.038),
                 (0.051, 0.046, 0.041, 0.036), (0.045, 0.040, 0.036, 0.032))
THUMB_CMC = (0.100, 0.090, 0.030)
THUMB_LENGTH = (0.215, 0.160, 0.130)  # metacarpal, proximal, distal
THUMB_RADIUS = (0.085, 0.060, 0.050, 0.043)  # CMC (thenar bulk), MCP, IP, tip
# The thumb flexes towards the ulnar, palmar side.
THUMB_BEND = (-0.80, -0.05, 0.60)
WRIST_RADIUS = 0.075

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

# Joint-angle vector: thumb (splay, lift, mcp, ip), then (mcp, pip, dip, abduction) for index,
# middle, ring and pinky. Degrees. Splay/abduction are towards the thumb; lift is out of the palm.
N_ANGLES = 20
CURLED = (85.0, 100.0, 55.0, 0.0)


def straight(abduction=0.0):
    return (0.0, 3.0, 2.0, abduction)


THUMB_OVER = (25.0, 55.0, 35.0, 35.0)  # folded over the curled fingers
THUMB_OUT = (50.0, 15.0, 5.0, 5.0)  # spread away from the palm


def _shape(thumb, index, middle, ring, pinky):
    return (*thumb, *index, *middle, *ring, *pinky)


HANDSHAPES = {
    "fist": _shape(THUMB_OVER, CURLED, CURLED, CURLED, CURLED),
    "one": _shape((20.0, 55.0, 40.0, 35.0), straight(2.0), CURLED, CURLED, CURLED),
    "peace": _shape((15.0, 60.0, 45.0, 40.0), straight(9.0), straight(-7.0), CURLED, CURLED),
    "three": _shape(THUMB_OUT, straight(8.0), straight(-5.0), CURLED, CURLED),  # HaGRID: thumb, index, middle
    "four": _shape((5.0, 40.0, 55.0, 45.0), straight(8.0), straight(), straight(-5.0), straight(-12.0)),
    "palm": _shape(THUMB_OUT, straight(12.0), straight(2.0), straight(-7.0), straight(-16.0)),
    "like": _shape((65.0, 20.0, 0.0, -5.0), CURLED, CURLED, CURLED, CURLED),  # the thumb at right angles
    "call": _shape((55.0, 10.0, 0.0, 0.0), CURLED, CURLED, CURLED, straight(-22.0)),
    "rock": _shape(THUMB_OVER, straight(6.0), CURLED, CURLED, straight(-18.0)),
    # Thumb and index tips meet (fitted to the mean hand); the other three fan out.
    "ok": _shape((27.0, 31.0, 23.0, 24.0), (45.0, 70.0, 40.0, 0.0), (5.0, 8.0, 4.0, -2.0),
                 (8.0, 10.0, 4.0, -9.0), (10.0, 12.0, 5.0, -18.0)),
}
assert tuple(HANDSHAPES) == CLASS_NAMES
# Gestures read best from a side are turned that way by default (yaw, degrees; + shows the thumb side).
CLASS_YAW = torch.tensor([-30.0 if name == "ok" else 0.0 for name in CLASS_NAMES])

# Joint limits (degrees) and per-sample noise (standard deviation, degrees) per angle.
#                  thumb: splay, lift, mcp, ip          finger: mcp, pip, dip, abduction
ANGLE_LO = torch.tensor((-5.0, -10.0, -10.0, -15.0) + (-20.0, -5.0, -5.0, -25.0) * 4)
ANGLE_HI = torch.tensor((75.0, 80.0, 70.0, 90.0) + (100.0, 115.0, 85.0, 25.0) * 4)
ANGLE_NOISE = torch.tensor((5.0, 6.0, 6.0, 8.0) + (6.0, 7.0, 7.0, 3.0) * 4)
TEMPLATES = torch.tensor([HANDSHAPES[name] for name in CLASS_NAMES])  # (classes, 20)

DEG = math.pi / 180.0


def sincos(x: torch.Tensor):
    """sin(x), cos(x) from +, *, round only.

    torch.sin takes a vectorised path for most elements and a scalar one for a tensor's tail,
    and the two can differ in the last bit; this polynomial gives the same bits wherever a
    sample sits in its batch. Accurate to ~1e-7 after reduction to [-pi/4, pi/4].
    """
    k = torch.round(x * (2.0 / math.pi))
    r = x - k * (math.pi / 2.0)
    r2 = r * r
    s = r * (1.0 + r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880)))))
    c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800)))))
    q = torch.remainder(k, 4.0)
    sin = torch.where(q == 0, s, torch.where(q == 1, c, torch.where(q == 2, -s, -c)))
    cos = torch.where(q == 0, c, torch.where(q == 1, -s, torch.where(q == 2, -c, s)))
    return sin, cos


def normalize(v: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last axis (size 3), element-wise arithmetic only."""
    x, y, z = v.unbind(-1)
    n = torch.sqrt(x * x + y * y + z * z).clamp_min(1e-12)
    return v / n.unsqueeze(-1)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def rotation(sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotations Rz(roll) @ Ry(yaw) @ Rx(pitch) from sin, cos of (roll, yaw, pitch)."""
    sr, sy, sp = sin.unbind(-1)
    cr, cy, cp = cos.unbind(-1)
    return torch.stack([
        cr * cy, cr * sy * sp - sr * cp, cr * sy * cp + sr * sp,
        sr * cy, sr * sy * sp + cr * cp, sr * sy * cp - cr * sp,
        -sy, cy * sp, cy * cp,
    ], -1).view(-1, 3, 3)


def rotate(r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Apply (B, 3, 3) rotations to (B, K, 3) points."""
    x, y, z = p.unbind(-1)
    out = [r[:, i, 0, None] * x + r[:, i, 1, None] * y + r[:, i, 2, None] * z for i in range(3)]
    return torch.stack(out, -1)


def forward_kinematics(angles: torch.Tensor, finger_scale: torch.Tensor, palm_scale: torch.Tensor):
    """Joint positions of right hands in the hand frame (hand-length units).

    angles: (B, 20) degrees (see HANDSHAPES); finger_scale, palm_scale: (B,) proportions of the
    individual. Returns joints (B, 21, 3) in MediaPipe order and tip_ends (B, 5, 3): where each
    finger's distal capsule ends, a little short of the tip so the tip keypoint lies inside it.
    """
    b = angles.shape[0]
    fingers = angles[:, 4:].view(b, 4, 4)
    # Every angle needed, in one sincos: 20 joint angles, then the splay of each finger.
    splay = torch.tensor(FINGER_SPLAY) + fingers[..., 3]
    sin, cos = sincos(torch.cat([angles, splay], 1) * DEG)
    ls = finger_scale[:, None, None]

    # Fingers, vectorised over the four: flexion in the plane of the splayed direction and +z.
    s4, c4 = sin[:, 4:20].view(b, 4, 4), cos[:, 4:20].view(b, 4, 4)
    ss, cs = sin[:, 20:], cos[:, 20:]
    flat = torch.stack([ss, cs, torch.zeros_like(ss)], -1)  # (B, 4, 3)
    up = torch.tensor([0.0, 0.0, 1.0])
    # Sine and cosine of the cumulative flexion of each phalanx, by the addition formulas.
    s1, c1 = s4[..., 0], c4[..., 0]
    s2, c2 = s1 * c4[..., 1] + c1 * s4[..., 1], c1 * c4[..., 1] - s1 * s4[..., 1]
    s3, c3 = s2 * c4[..., 2] + c2 * s4[..., 2], c2 * c4[..., 2] - s2 * s4[..., 2]
    lengths = torch.tensor(FINGER_LENGTH) * ls  # (B, 4, 3)
    base = torch.tensor(FINGER_BASE)
    point = torch.stack([base[:, 0] * palm_scale[:, None], base[:, 1].expand(b, 4), torch.zeros(b, 4)], -1)
    chain = [point]
    for k, (s, c) in enumerate(((s1, c1), (s2, c2), (s3, c3))):
        d = flat * c[..., None] + up * s[..., None]
        point = point + d * lengths[..., k, None]
        chain.append(point)
    finger_joints = torch.stack(chain, 2)  # (B, 4, 4, 3)
    tip_r = torch.tensor(FINGER_RADIUS)[:, 3] * ls[..., 0]
    finger_ends = point - d * (0.6 * tip_r)[..., None]

    # Thumb: splay and lift orient the metacarpal; MCP and IP flex towards THUMB_BEND.
    ts, tc = sin[:, :4], cos[:, :4]
    t0 = torch.stack([ts[:, 0] * tc[:, 1], tc[:, 0] * tc[:, 1], ts[:, 1]], -1)  # (B, 3)
    bend = torch.tensor(THUMB_BEND).expand(b, 3)
    m = normalize(bend - t0 * dot(bend, t0)[:, None])
    cmc = torch.tensor(THUMB_CMC) * torch.stack([palm_scale, torch.ones(b), torch.ones(b)], -1)
    tl = torch.tensor(THUMB_LENGTH) * finger_scale[:, None]
    sa, ca = ts[:, 2], tc[:, 2]
    sb, cb = sa * tc[:, 3] + ca * ts[:, 3], ca * tc[:, 3] - sa * ts[:, 3]
    p2 = cmc + t0 * tl[:, 0, None]
    p3 = p2 + (t0 * ca[:, None] + m * sa[:, None]) * tl[:, 1, None]
    d_tip = t0 * cb[:, None] + m * sb[:, None]
    p4 = p3 + d_tip * tl[:, 2, None]
    thumb = torch.stack([cmc, p2, p3, p4], 1)  # (B, 4, 3)
    thumb_end = p4 - d_tip * (0.6 * THUMB_RADIUS[3] * finger_scale)[:, None]

    joints = torch.cat([torch.zeros(b, 1, 3), thumb, finger_joints.reshape(b, 16, 3)], 1)
    tip_ends = torch.cat([thumb_end[:, None], finger_ends], 1)
    return joints, tip_ends


def joint_radii(thickness: torch.Tensor) -> torch.Tensor:
    """(B, 21) radius of the body around each joint, hand-length units."""
    r = torch.tensor((WRIST_RADIUS,) + THUMB_RADIUS + sum(FINGER_RADIUS, ()))
    return r * thickness[:, None]


# Capsules drawn for the fingers: (from joint, to joint); a segment ending at a tip ends at
# the matching tip_end instead. Thumb metacarpal first (it doubles as the thenar bulge).
SEGMENTS = tuple((c * 4 + 1 + k, c * 4 + 2 + k) for c in range(5) for k in range(3))
TIP_SEGMENTS = tuple(c * 3 + 2 for c in range(5))  # indices of segments ending at a fingertip
