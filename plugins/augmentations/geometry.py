"""Batched homogeneous matrices and the one-pass warp that the augmentations compose them into.

Every builder takes per-sample tensors of shape (N,) (or Python numbers, broadcast to them) and
returns (N, 3, 3) for 2D transforms of pixel coordinates, or (N, 4, 4) for 3D transforms of RGB
colours. Matrices compose by ``@``; a whole pipeline becomes one matrix per sample, so the images
are resampled (or recoloured) once, however many transforms were drawn.

2D coordinates are pixels, x to the right and y down, with the origin at the image centre (as in
StyleGAN2-ADA), so rotations and scalings turn about the centre whatever the image size.
"""
import torch
import torch.nn.functional as F


def _matrix(rows, like: torch.Tensor) -> torch.Tensor:
    """Stack a nested list of per-sample tensors and numbers into (N, R, C).

    Numbers become device-side fills, not host-to-device copies, which could stall the host.
    """
    entries = [[e.expand_as(like) if torch.is_tensor(e) else torch.full_like(like, e) for e in row] for row in rows]
    return torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)


# -- 2D, pixel coordinates ----------------------------------------------------------------------


def translate2d(tx: torch.Tensor, ty) -> torch.Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def scale2d(sx: torch.Tensor, sy) -> torch.Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def rotate2d(theta: torch.Tensor) -> torch.Tensor:
    """Positive theta turns clockwise on screen, because y points down."""
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def warp(x: torch.Tensor, inverse: torch.Tensor, frame: tuple[int, int] | None = None,
         padding_mode: str = "reflection") -> torch.Tensor:
    """Resample (N, C, H, W) images through per-sample 2D transforms, in one grid_sample.

    ``inverse`` (N, 3, 3) maps output pixel coordinates to input ones (what sampling needs), in
    pixels of ``frame`` (height, width; default x's own), so maps at another resolution than the
    images they describe move with them. Bilinear. Reflection padding by default: content that
    comes in from outside is the mirrored image rather than a black border a discriminator could
    key on. ``padding_mode`` is grid_sample's ("zeros", "border", "reflection"): keypoint training
    wants no mirrored content, which would show phantom fingers the labels do not have.
    """
    n, _, out_h, out_w = x.shape
    h, w = frame if frame is not None else (out_h, out_w)
    # affine_grid works in normalized coordinates, [-1, 1] across each axis (align_corners=False:
    # the outer pixel edges): conjugate by the pixel -> normalized scaling, diag(2/w, 2/h, 1).
    one = torch.ones_like(inverse[:, 0, 0])
    theta = scale2d(one * (2 / w), 2 / h) @ inverse @ scale2d(one * (w / 2), h / 2)
    grid = F.affine_grid(theta[:, :2, :].to(x.dtype), [n, 1, out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


# -- 3D, RGB colour -----------------------------------------------------------------------------


def translate3d(t: torch.Tensor) -> torch.Tensor:
    """Add ``t`` to all three channels."""
    return _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], t)


def scale3d(s: torch.Tensor) -> torch.Tensor:
    """Multiply all three channels by ``s`` (about 0, the middle grey of [-1, 1] images)."""
    return _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], s)


# The luma axis (grey colours), unit length: hue turns about it, saturation scales away from it.
def _luma_axis(like: torch.Tensor) -> torch.Tensor:
    return torch.full((3,), 3 ** -0.5, dtype=like.dtype, device=like.device)


def hue3d(theta: torch.Tensor) -> torch.Tensor:
    """Rotate colours by ``theta`` about the grey axis (Rodrigues' formula): a hue shift."""
    v, eye = _luma_axis(theta), torch.eye(3, dtype=theta.dtype, device=theta.device)
    vv = torch.outer(v, v)
    cross = torch.linalg.cross(v.expand(3, 3), eye, dim=1).T  # column i: v x e_i
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    rotation = vv + (eye - vv) * c + cross * s
    return _embed3(rotation)


def saturation3d(s: torch.Tensor) -> torch.Tensor:
    """Keep each colour's component along the grey axis, scale the rest by ``s``."""
    v = _luma_axis(s)
    vv = torch.outer(v, v)
    return _embed3(vv + (torch.eye(3, dtype=s.dtype, device=s.device) - vv) * s[:, None, None])


def _embed3(linear: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) linear colour maps -> (N, 4, 4) homogeneous ones."""
    out = torch.zeros(linear.shape[0], 4, 4, dtype=linear.dtype, device=linear.device)
    out[:, :3, :3] = linear
    out[:, 3, 3] = 1
    return out


def recolour(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply per-sample (N, 4, 4) colour matrices to (N, 3, H, W) images, in one batched matmul."""
    n, c, h, w = x.shape
    matrix = matrix.to(x.dtype)
    flat = torch.baddbmm(matrix[:, :3, 3:], matrix[:, :3, :3], x.reshape(n, c, h * w))
    return flat.view(n, c, h, w)
