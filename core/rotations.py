"""Rotation conversions on batched tensors: axis-angle, 3x3 matrices, the continuous 6-D form.

The 6-D form (Zhou et al. 2019, "On the Continuity of Rotation Representations in Neural
Networks") is the first two columns of the matrix; :func:`rot6d_to_matrix` maps any 6 numbers
back to a rotation by Gram-Schmidt, so a network may output it unconstrained.
"""
from __future__ import annotations

import torch

_EPS = 1e-7


def axis_angle_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) rotation vectors -> (..., 3, 3) matrices (Rodrigues; a series near angle 0)."""
    theta2 = (v * v).sum(-1, keepdim=True)
    theta = theta2.clamp_min(1e-24).sqrt()
    small = theta2 < 1e-8
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)  # sin t / t
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp_min(1e-24))
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).view(*v.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(k)
    return eye + a[..., None] * k + b[..., None] * (k @ k)


def matrix_to_quaternion(r: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotations -> (..., 4) unit quaternions (w, x, y, z), w >= 0. Each of the four
    candidate formulas divides by a different diagonal combination; the best-conditioned one is
    taken per matrix (Shepperd's method), so angles near pi stay accurate."""
    m = r
    tr = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    candidates = torch.stack([
        torch.stack([1 + tr, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + 2 * m[..., 0, 0] - tr, m[..., 0, 1] + m[..., 1, 0],
                     m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 + 2 * m[..., 1, 1] - tr,
                     m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                     1 + 2 * m[..., 2, 2] - tr], -1),
    ], -2)  # (..., 4 candidates, 4); candidate i is 4 q_i q
    pivots = torch.stack([1 + tr, 1 + 2 * m[..., 0, 0] - tr, 1 + 2 * m[..., 1, 1] - tr, 1 + 2 * m[..., 2, 2] - tr], -1)
    best = pivots.argmax(-1, keepdim=True)
    q = candidates.gather(-2, best[..., None].expand(*best.shape, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return q * torch.where(q[..., :1] < 0, -1.0, 1.0)


def matrix_to_axis_angle(r: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotations -> (..., 3) rotation vectors with angle in [0, pi]."""
    q = matrix_to_quaternion(r)
    w, v = q[..., :1], q[..., 1:]
    n = v.norm(dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(n, w)
    scale = torch.where(n > 1e-8, angle / n.clamp_min(1e-12), 2.0 / w.clamp_min(_EPS))  # 2 v for tiny angles
    return v * scale


def rot6d_to_matrix(x: torch.Tensor) -> torch.Tensor:
    """(..., 6) -> (..., 3, 3): Gram-Schmidt on the two 3-vectors; they become the first two columns."""
    a, b = x[..., :3], x[..., 3:]
    c1 = a / a.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    b = b - (c1 * b).sum(-1, keepdim=True) * c1
    c2 = b / b.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    c3 = torch.cross(c1, c2, dim=-1)
    return torch.stack([c1, c2, c3], -1)


def matrix_to_rot6d(r: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 6): the first two columns."""
    return torch.cat([r[..., :, 0], r[..., :, 1]], -1)


def geodesic_angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in radians of the rotation between (..., 3, 3) matrices a and b (their geodesic
    distance on SO(3)). The cosine is clamped just inside [-1, 1] so the gradient stays finite."""
    cos = ((a * b).sum((-2, -1)) - 1.0) / 2.0  # trace(a^T b) = sum of elementwise products
    return torch.acos(cos.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
