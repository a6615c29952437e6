"""A 3D kinematic hand: rest skeletons, anatomical angles, 45-D axis-angle poses, forward kinematics.

The *hand frame* is that of a right hand: origin at the wrist, +x towards the thumb, +y along
the fingers, +z out of the palm (palmar). Rest skeletons are flat hands in hand-length units
(wrist to middle fingertip); a left hand is a mirrored right hand.

A pose is 15 rotations, one per finger joint in MANO order (index MCP, PIP, DIP, then middle,
pinky, ring, and thumb CMC, MCP, IP), each an axis-angle vector in the rest hand frame and
relative to its parent, as in MANO/SMPL with a flat rest hand: the ``hand_pose`` field (45,).
:func:`forward_kinematics` turns any such pose into the 21 keypoint joints (MediaPipe order),
so poses from elsewhere (mocap) drive the same hand.

Handshapes are written in *anatomical* angles, degrees, three per joint: (bend, splay, twist)
about the joint's own rest axes (see :data:`JOINT_AXES`); :func:`anatomical_to_pose` turns
them into axis-angle.

Every function works on batched tensors with element-wise arithmetic only (no matmul,
no reductions, no torch trigonometry), so a sample's result never depends on the batch it
is computed in: see :func:`sincos`.
"""
import math

import torch

DEG = math.pi / 180.0

# MANO joint order of the 15 rotations (the hand_pose layout) and of the digits.
MANO_JOINTS = ("index1", "index2", "index3", "middle1", "middle2", "middle3", "pinky1", "pinky2",
               "pinky3", "ring1", "ring2", "ring3", "thumb1", "thumb2", "thumb3")
MANO_DIGITS = ("index", "middle", "pinky", "ring", "thumb")
# MediaPipe keypoint of the joint each MANO rotation sits at, and the one it moves next.
_DIGIT_KEYPOINT = {"thumb": 1, "index": 5, "middle": 9, "ring": 13, "pinky": 17}
JOINT_KEYPOINT = tuple(_DIGIT_KEYPOINT[d] + k for d in MANO_DIGITS for k in range(3))

# -- rest skeleton (hand-length units) ---------------------------------------------------------
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
THUMB_REST_SPLAY = 40.0  # the flat hand's thumb, degrees from the fingers towards +x
THUMB_LENGTH = (0.215, 0.160, 0.130)  # metacarpal, proximal, distal
THUMB_RADIUS = (0.085, 0.060, 0.050, 0.043)  # CMC (thenar bulk), MCP, IP, tip
# Thumb MCP and IP flexion carries the tip across the palm towards the little finger.
THUMB_CURL = (-0.80, -0.05, 0.60)
WRIST_RADIUS = 0.075
RADII = (WRIST_RADIUS,) + THUMB_RADIUS + sum(FINGER_RADIUS, ())  # per keypoint


def _unit(v):
    n = math.sqrt(sum(c * c for c in v))
    return tuple(c / n for c in v)


def _cross(a, b):
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _joint_axes():
    """(bend, splay, twist) unit axes of each MANO joint in the rest hand frame.

    Fingers bend towards the palm (+z) and splay towards the thumb, about axes across and
    normal to the palm. The thumb's CMC "bend" lifts it out of the palm (palmar abduction) and
    its splay swings it in the palm plane (radial abduction); its MCP and IP bend along THUMB_CURL.
    A positive angle about axis a moves the bone direction d towards a x d.
    """
    axes = []
    for digit in MANO_DIGITS:
        if digit == "thumb":
            s = THUMB_REST_SPLAY * DEG
            d = (math.sin(s), math.cos(s), 0.0)
            lift = _unit(_cross(d, (0.0, 0.0, 1.0)))
            axes.append((lift, (0.0, 0.0, -1.0), d))
            curl = THUMB_CURL
            dot = sum(a * b for a, b in zip(curl, d))
            m = _unit(tuple(c - dot * x for c, x in zip(curl, d)))
            bend = _unit(_cross(d, m))
            side = _unit(_cross(bend, d))
            axes += [(bend, side, d)] * 2
        else:
            s = FINGER_SPLAY[("index", "middle", "ring", "pinky").index(digit)] * DEG
            d = (math.sin(s), math.cos(s), 0.0)
            axes += [((math.cos(s), -math.sin(s), 0.0), (0.0, 0.0, -1.0), d)] * 3
    return torch.tensor(axes)  # (15, 3 axes, 3)


JOINT_AXES = _joint_axes()


def rest_skeleton(finger_scale, palm_scale, digit_scale):
    """(B, 21, 3) flat right hands in hand-length units, MediaPipe order.

    finger_scale, palm_scale (B,): the individual's finger length and palm width; digit_scale
    (B, 5): per-digit length ratios (thumb, index, middle, ring, pinky).
    """
    b = finger_scale.shape[0]
    one = torch.ones(b)
    points = [torch.zeros(b, 3)]
    s = THUMB_REST_SPLAY * DEG
    cmc = torch.tensor(THUMB_CMC) * torch.stack([palm_scale, one, one], -1)
    d = torch.tensor((math.sin(s), math.cos(s), 0.0))
    points.append(cmc)
    for length in THUMB_LENGTH:
        points.append(points[-1] + d * (length * finger_scale * digit_scale[:, 0])[:, None])
    for f, ((bx, by), splay, lengths) in enumerate(zip(FINGER_BASE, FINGER_SPLAY, FINGER_LENGTH)):
        d = torch.tensor((math.sin(splay * DEG), math.cos(splay * DEG), 0.0))
        points.append(torch.stack([bx * palm_scale, by * one, 0.0 * one], -1))
        for length in lengths:
            points.append(points[-1] + d * (length * finger_scale * digit_scale[:, f + 1])[:, None])
    return torch.stack(points, 1)


# -- element-wise trigonometry and rotations ---------------------------------------------------
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


def atan2_nonneg(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """atan2(y, x) for y >= 0, x >= 0 (angles in [0, pi/2]) from +, *, / only, like sincos.

    Reduced twice (to the smaller ratio, then by pi/4 above tan(pi/8)) to |t| <= tan(pi/8), where the odd
    Taylor series to t^17 is accurate to ~1e-8.
    """
    swap = y > x
    r = torch.where(swap, x, y) / torch.maximum(torch.maximum(x, y), torch.full_like(x, 1e-30))
    shifted = r > 0.41421356  # tan(pi/8): above it, atan(r) = pi/4 + atan((r - 1) / (r + 1))
    t = torch.where(shifted, (r - 1.0) / (r + 1.0), r)
    t2 = t * t
    acc = torch.zeros_like(t)
    for k in range(17, 0, -2):  # t - t^3/3 + t^5/5 - ..., by Horner in t^2
        acc = acc * t2 + ((-1.0) ** ((k - 1) // 2)) / k
    at = torch.where(shifted, math.pi / 4.0 + t * acc, t * acc)
    return torch.where(swap, math.pi / 2.0 - at, at)


def quat_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of (..., 4) quaternions (w, x, y, z)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def anatomical_to_pose(angles: torch.Tensor) -> torch.Tensor:
    """(B, 15, 3) anatomical (bend, splay, twist) degrees -> (B, 45) axis-angle hand_pose (radians).

    Each joint turns by twist about its bone, then bend, then splay: R = Rs Rb Rt.
    """
    b = angles.shape[0]
    s, c = sincos(angles * (0.5 * DEG))  # half angles
    qs = [torch.cat([c[..., k, None], s[..., k, None] * JOINT_AXES[:, k]], -1) for k in range(3)]
    q = quat_mul(quat_mul(qs[1], qs[0]), qs[2])  # splay * bend * twist
    q = q * torch.where(q[..., :1] < 0, -1.0, 1.0)  # w >= 0: the rotation by at most pi
    w, v = q[..., 0], q[..., 1:]
    n = torch.sqrt(v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1] + v[..., 2] * v[..., 2])
    angle = 2.0 * atan2_nonneg(n, w)
    # angle / n -> 2 as n -> 0 (the rotation vector of a tiny rotation is 2 v).
    scale = torch.where(n > 1e-12, angle / torch.clamp_min(n, 1e-12), torch.full_like(n, 2.0))
    return (v * scale[..., None]).reshape(b, 45)


def axis_angle_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) rotation vectors -> (..., 3, 3) matrices by Rodrigues' formula."""
    x, y, z = v.unbind(-1)
    theta2 = x * x + y * y + z * z
    theta = torch.sqrt(theta2)
    sin, cos = sincos(theta)
    small = theta < 1e-6
    safe = torch.where(small, torch.ones_like(theta), theta)
    a = torch.where(small, 1.0 - theta2 / 6.0, sin / safe)  # sin t / t
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - cos) / (safe * safe))  # (1 - cos t) / t^2
    return torch.stack([
        1.0 - b * (y * y + z * z), b * x * y - a * z, b * x * z + a * y,
        b * x * y + a * z, 1.0 - b * (x * x + z * z), b * y * z - a * x,
        b * x * z - a * y, b * y * z + a * x, 1.0 - b * (x * x + y * y),
    ], -1).view(*v.shape[:-1], 3, 3)


def matmul3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) @ (..., 3, 3) as broadcast products and sums, so no BLAS kernel sees the batch."""
    return (a[..., :, 0, None] * b[..., None, 0, :] + a[..., :, 1, None] * b[..., None, 1, :]
            + a[..., :, 2, None] * b[..., None, 2, :])


def apply3(r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotations applied to (..., 3) vectors."""
    return r[..., :, 0] * p[..., 0, None] + r[..., :, 1] * p[..., 1, None] + r[..., :, 2] * p[..., 2, None]


# MediaPipe keypoint where each MANO digit's chain starts (its CMC or MCP).
_CHAIN_BASE = torch.tensor([_DIGIT_KEYPOINT[d] for d in MANO_DIGITS])


def forward_kinematics(hand_pose: torch.Tensor, rest: torch.Tensor):
    """Pose rest skeletons: (B, 45) axis-angle, (B, 21, 3) rest joints -> joints (B, 21, 3) and
    each keypoint's bone frame (B, 21, 3, 3), the global rotation of the bone that ends there
    (identity at the wrist, MCPs and thumb CMC). Same units as ``rest``; the wrist stays put.

    The five digits are chains of three joints hanging off the (fixed) palm, posed together.
    """
    b = hand_pose.shape[0]
    local = axis_angle_to_matrix(hand_pose.view(b, 5, 3, 3))  # (B, digit, joint, 3, 3)
    joints = rest.clone()
    frames = torch.eye(3).repeat(b, 21, 1, 1)
    g = local[:, :, 0]
    for k in range(3):
        if k:
            g = matmul3(g, local[:, :, k])
        parent, child = _CHAIN_BASE + k, _CHAIN_BASE + k + 1
        joints[:, child] = joints[:, parent] + apply3(g, rest[:, child] - rest[:, parent])
        frames[:, child] = g
    return joints, frames


def normalize(v: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last axis (size 3), element-wise arithmetic only."""
    x, y, z = v.unbind(-1)
    n = torch.sqrt(x * x + y * y + z * z).clamp_min(1e-12)
    return v / n.unsqueeze(-1)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def view_rotation(sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) camera-from-hand rotations for view angles (roll, yaw, pitch) given as sin, cos.

    At zero the palm faces the camera upright: hand +x to image right, +y up the image, +z
    towards the viewer (camera x right, y down, z forward). Then pitch (about the hand's x),
    yaw (about the image's vertical) and roll (in the image plane) turn it.
    """
    sr, sy, sp = sin.unbind(-1)
    cr, cy, cp = cos.unbind(-1)
    r = torch.stack([
        cr * cy, cr * sy * sp - sr * cp, cr * sy * cp + sr * sp,
        sr * cy, sr * sy * sp + cr * cp, sr * sy * cp - cr * sp,
        -sy, cy * sp, cy * cp,
    ], -1).view(-1, 3, 3)
    return torch.stack([r[..., 0], -r[..., 1], -r[..., 2]], -1)


def rotate(r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Apply (B, 3, 3) rotations to (B, K, 3) points."""
    return apply3(r[:, None], p)


def bone_angle(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Degrees between bones a->b and b->c (0 when straight), for tests and checks."""
    u, v = normalize(b - a), normalize(c - b)
    return torch.rad2deg(torch.acos(dot(u, v).clamp(-1.0, 1.0)))


RADII_T = torch.tensor(RADII)


def pose_to_anatomical(hand_pose: torch.Tensor) -> torch.Tensor:
    """(B, 45) axis-angle hand_pose -> (B, 15, 3) anatomical (bend, splay, twist) degrees: the inverse
    of :func:`anatomical_to_pose`, for checking poses from elsewhere (a prior's samples, mocap)
    against the joint limits. Not batch-invariant (torch trigonometry): for measurements only.

    In a joint's own frame (columns bend, splay, twist; orientation sign s) R = Ry(s splay) Rx(s bend)
    Rz(s twist), an Euler Y-X-Z decomposition. It has two solutions; the one with the smaller splay
    and twist is taken, so a bend beyond 90 degrees (a PIP joint) comes out as such.
    """
    b = hand_pose.shape[0]
    r = axis_angle_to_matrix(hand_pose.reshape(b, 15, 3).double())
    frame = JOINT_AXES.double().transpose(-1, -2)  # (15, 3, 3), columns bend, splay, twist
    sign = torch.linalg.det(frame)  # the thumb's MCP and IP frames are left-handed
    local = frame.transpose(-1, -2) @ r @ frame
    bend = torch.asin((-local[..., 1, 2]).clamp(-1.0, 1.0))
    splay = torch.atan2(local[..., 0, 2], local[..., 2, 2])
    twist = torch.atan2(local[..., 1, 0], local[..., 1, 1])
    wrap = lambda a: torch.remainder(a + math.pi, 2 * math.pi) - math.pi  # noqa: E731
    other = (math.pi - bend, wrap(splay + math.pi), wrap(twist + math.pi))
    use_other = torch.maximum(other[1].abs(), other[2].abs()) < torch.maximum(splay.abs(), twist.abs())
    bend, splay, twist = (torch.where(use_other, o, a) for o, a in zip(other, (bend, splay, twist)))
    bend = wrap(bend)
    return (torch.stack([bend, splay, twist], -1) * sign[:, None] / DEG).float()


def within_limits(angles: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, tolerance: float = 0.1) -> torch.Tensor:
    """(B, 15) whether each joint's three anatomical angles lie within [lo, hi] (degrees), give or take
    ``tolerance``: the round-off of a float32 pose turned back into angles (under 0.05 degrees), so a
    joint sampled at its limit counts as within."""
    return ((angles >= lo - tolerance) & (angles <= hi + tolerance)).all(-1)
