"""Conditioning maps from keypoints: one Gaussian heatmap per joint, one limb map per bone.

Maps are made on the keypoints' device, for the whole batch at once, at every training step:
they are never stored by a dataset (docs/architecture.md, "The sample contract").

Keypoints are (N, 21, 3): x, y in [0, 1] of the image, then visibility in {0, 1}. Pixel ``i``
covers [i, i + 1) / size of the image, so its centre is at (i + 0.5) / size and a keypoint at
``x`` sits at pixel coordinate ``x * size - 0.5`` (the convention of ``handforge.imaging``).
Widths are fractions of the image side, so one recipe gives the same maps at 32 px and 128 px.
"""
import torch
import torch.nn.functional as F

from handforge.data import KEYPOINT_PARENTS, N_KEYPOINTS
from handforge.errors import HandforgeError

MAP_KINDS = ("heatmaps", "limbs", "both")
# The 20 bones as (child, parent) index pairs, in child order.
BONES = tuple((child, parent) for child, parent in enumerate(KEYPOINT_PARENTS) if parent >= 0)


def channels(kind: str) -> int:
    """How many maps ``make_maps(..., kind)`` returns per sample: 21, 20 or 41."""
    return {"heatmaps": N_KEYPOINTS, "limbs": len(BONES), "both": N_KEYPOINTS + len(BONES)}[kind]


def _split(keypoints: torch.Tensor, size: int, width: float, what: str):
    """Pixel coordinates x, y (N, 21), visibility (N, 21) as 0/1 and the Gaussian's sd in pixels."""
    if keypoints.ndim != 3 or keypoints.shape[1:] != (N_KEYPOINTS, 3):
        raise HandforgeError(f"{what}: keypoints must be (N, {N_KEYPOINTS}, 3), got {tuple(keypoints.shape)}")
    if size < 1 or width <= 0:
        raise HandforgeError(f"{what}: needs size >= 1 and a width > 0, got size={size}, width={width}")
    keypoints = keypoints if keypoints.is_floating_point() else keypoints.float()
    visible = keypoints[..., 2] > 0
    # An invisible joint may carry any coordinates (NaN included): park it at 0 so that
    # multiplying its map by visibility 0 gives exact zeros, not NaN.
    xy = torch.where(visible[..., None], keypoints[..., :2], torch.zeros_like(keypoints[..., :2]))
    xy = xy * size - 0.5
    return xy[..., 0], xy[..., 1], visible.to(keypoints.dtype), width * size


def heatmaps(keypoints: torch.Tensor, size: int, sigma: float = 0.03) -> torch.Tensor:
    """(N, 21, size, size) maps exp(-d^2 / (2 sigma_px^2)), d the distance to the joint in pixels.

    Each map peaks at 1 on its joint; ``sigma`` is the sd as a fraction of the image side
    (sigma_px = sigma * size); invisible joints give all-zero maps. The 2D Gaussian is the outer
    product of two 1D Gaussians, so the exponentials cost O(size) per map, not O(size^2).
    """
    x, y, visible, sigma_px = _split(keypoints, size, sigma, "heatmaps")
    grid = torch.arange(size, device=x.device, dtype=x.dtype)
    gx = torch.exp(-(grid - x[..., None]) ** 2 / (2 * sigma_px**2))  # (N, 21, size) along columns
    gy = torch.exp(-(grid - y[..., None]) ** 2 / (2 * sigma_px**2)) * visible[..., None]  # along rows
    return gy[..., :, None] * gx[..., None, :]


def limb_maps(keypoints: torch.Tensor, size: int, width: float = 0.02) -> torch.Tensor:
    """(N, 20, size, size) maps exp(-d^2 / (2 width_px^2)), d the pixel distance to a bone's segment.

    Bone ``b`` joins ``BONES[b] = (child, parent)``; its map is 1 along the segment and zero when
    either end is invisible. ``width`` is the sd as a fraction of the image side.
    """
    x, y, visible, width_px = _split(keypoints, size, width, "limb_maps")
    child, parent = (torch.tensor(ends, device=x.device) for ends in zip(*BONES))
    ax, ay = x[:, parent, None, None], y[:, parent, None, None]  # (N, 20, 1, 1): segment start
    ux, uy = x[:, child, None, None] - ax, y[:, child, None, None] - ay  # segment direction
    grid = torch.arange(size, device=x.device, dtype=x.dtype)
    dx, dy = grid.view(1, 1, 1, size) - ax, grid.view(1, 1, size, 1) - ay  # pixel - start
    # Closest point of the segment: start + t * u, t the projection clamped to [0, 1]. A bone of
    # zero length (both ends on one point) has t = 0, its map a Gaussian blob on that point.
    length2 = (ux * ux + uy * uy).clamp_min(torch.finfo(x.dtype).tiny)
    t = ((dx * ux + dy * uy) / length2).clamp(0, 1)
    d2 = (dx - t * ux) ** 2 + (dy - t * uy) ** 2
    both = (visible[:, child] * visible[:, parent])[..., None, None]
    return torch.exp(d2 / (-2 * width_px**2)) * both


def make_maps(keypoints: torch.Tensor, size: int, kind: str = "heatmaps", sigma: float = 0.03,
              limb_width: float = 0.02) -> torch.Tensor:
    """The maps of ``kind`` (one of MAP_KINDS): heatmaps, limb maps, or both (heatmaps first)."""
    if kind not in MAP_KINDS:
        raise HandforgeError(f"pose maps: kind must be one of {MAP_KINDS}, got {kind!r}")
    parts = []
    if kind in ("heatmaps", "both"):
        parts.append(heatmaps(keypoints, size, sigma))
    if kind in ("limbs", "both"):
        parts.append(limb_maps(keypoints, size, limb_width))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def resize_maps(maps: torch.Tensor, size) -> torch.Tensor:
    """``maps`` (N, K, H, W) at ``size`` (h, w) of a feature map.

    Downsampling uses antialiased bilinear filtering: a sharp 2-pixel heatmap would otherwise
    vanish between the samples of a 4x4 grid. Upsampling is plain bilinear.
    """
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    down = size[0] <= maps.shape[-2] and size[1] <= maps.shape[-1]
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False, antialias=down)
