"""Palm creases of synthetic individuals: the heart, head and life lines and a few minor creases,
drawn from the identity's own random stream, so every image of one individual shows the same lines.

Each crease is a quadratic Bezier curve in the palm plane of the right hand's frame (hand-length
units, wrist at the origin, fingers along +y, thumb side +x; x is scaled by the individual's palm
width like the palm polygon), cut into SEGMENTS straight pieces that the rasteriser draws as thin
dark strokes on the palm (see :func:`raster.rasterize`, scene keys ``creases``/``crease_depth``).
"""
import torch

from . import counter_rng as rng
from .kinematics import sincos

SEGMENTS = 3  # straight pieces per crease
MAJOR, MINOR = 3, 3  # heart, head, life; then a fate line and two short creases

# Major lines as (start, control, end) means and the half-range each coordinate is drawn in,
# placed like the palmar creases of a real hand.
_MAJOR_MEAN = torch.tensor([
    [[-0.140, 0.395], [-0.020, 0.400], [0.070, 0.465]],  # heart: ulnar edge to below index/middle
    [[0.128, 0.335], [0.020, 0.310], [-0.100, 0.245]],  # head: radial edge across, sloping down
    [[0.128, 0.320], [0.015, 0.220], [0.055, 0.075]],  # life: around the thenar to the wrist
])
_MAJOR_RANGE = torch.tensor([
    [[0.005, 0.025], [0.035, 0.035], [0.035, 0.020]],
    [[0.008, 0.020], [0.035, 0.035], [0.035, 0.040]],
    [[0.008, 0.020], [0.030, 0.035], [0.030, 0.020]],
])
_DRAWS = MAJOR * 6 + MAJOR * 2 + 7 + (2 * MINOR - 1) + (MINOR - 1) * 5


def _bezier(start, control, end) -> torch.Tensor:
    """(..., SEGMENTS + 1, 2) points of quadratic Bezier curves given (..., 2) control points."""
    t = torch.arange(SEGMENTS + 1, dtype=torch.float32) / SEGMENTS
    a, b, c = ((1 - t) * (1 - t))[:, None], (2 * (1 - t) * t)[:, None], (t * t)[:, None]
    return a * start[..., None, :] + b * control[..., None, :] + c * end[..., None, :]


def crease_params(key: torch.Tensor, identity: torch.Tensor) -> dict:
    """Creases of the given individuals: ``creases`` (B, L, SEGMENTS + 1, 2) curve points,
    ``crease_depth`` (B, L) darkness in [0, 1] (0: the individual lacks that minor crease) and
    ``crease_width`` (B, L) half-widths in hand-length units; L = MAJOR + MINOR."""
    u = rng.uniform(key, identity, _DRAWS)
    b = identity.shape[0]
    major_u, u = u[:, :MAJOR * 6].reshape(b, MAJOR, 3, 2), u[:, MAJOR * 6:]
    major = _MAJOR_MEAN + (major_u * 2.0 - 1.0) * _MAJOR_RANGE
    curves = [_bezier(major[:, :, 0], major[:, :, 1], major[:, :, 2])]
    depth = [rng.between(u[:, :MAJOR], 0.6, 1.0)]
    width = [rng.between(u[:, MAJOR:2 * MAJOR], 0.006, 0.010)]
    u = u[:, 2 * MAJOR:]
    # The fate line: up the middle of the palm from the wrist, present in about 60% of people.
    start = torch.stack([rng.between(u[:, 0], -0.03, 0.03), rng.between(u[:, 1], 0.07, 0.11)], -1)
    end = torch.stack([rng.between(u[:, 2], -0.04, 0.03), rng.between(u[:, 3], 0.25, 0.36)], -1)
    bend = torch.stack([rng.between(u[:, 4], -0.02, 0.02), torch.zeros(b)], -1)
    fate = _bezier(start, (start + end) * 0.5 + bend, end)
    fate_present = (u[:, 5] < 0.6).float()
    fate_depth = rng.between(u[:, 6], 0.3, 0.6) * fate_present
    u = u[:, 7:]
    minor_depth, minor_width = u[:, :MINOR - 1], u[:, MINOR - 1:2 * MINOR - 1]
    u = u[:, 2 * MINOR - 1:]
    # Short creases anywhere on the palm's middle, at any angle, slightly bent.
    short = []
    for i in range(MINOR - 1):
        c = u[:, i * 5:(i + 1) * 5]
        centre = torch.stack([rng.between(c[:, 0], -0.09, 0.09), rng.between(c[:, 1], 0.13, 0.40)], -1)
        angle = c[:, 2] * 3.14159265
        half = rng.between(c[:, 3], 0.02, 0.05)
        direction = _unit_direction(angle)
        normal = torch.stack([-direction[:, 1], direction[:, 0]], -1)
        offset = normal * rng.between(c[:, 4], -0.012, 0.012)[:, None]
        short.append(_bezier(centre - direction * half[:, None], centre + offset, centre + direction * half[:, None]))
    curves.append(torch.stack([fate, *short], 1))
    depth.append(torch.cat([fate_depth[:, None], rng.between(minor_depth, 0.25, 0.55)], 1))
    width.append(rng.between(minor_width, 0.004, 0.007))
    return {"creases": torch.cat(curves, 1), "crease_depth": torch.cat(depth, 1), "crease_width": torch.cat(width, 1)}


def _unit_direction(angle: torch.Tensor) -> torch.Tensor:
    """(B, 2) unit vectors at ``angle`` radians, from the kinematics' element-wise sin/cos (the
    same bits wherever a sample sits in its batch)."""
    sin, cos = sincos(angle)
    return torch.stack([cos, sin], -1)
