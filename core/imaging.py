"""Image helpers: tensors in the sample contract's range to uint8 pixels, grids, hand skeletons.

Images follow the sample contract (docs/architecture.md): (N, 3, H, W) float in [-1, 1]; keypoints are
(N, 21, 3) with x, y normalized to [0, 1] of the image and a visibility in {0, 1}. A normalized
coordinate is continuous: 0 is the left/top edge of the image and 1 the right/bottom edge, so
x = 0.25 of a 96-pixel-wide cell falls in pixel column 24.

Torch tensors and numpy arrays are both accepted wherever an array is.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data import KEYPOINT_PARENTS, N_KEYPOINTS
from .fileio import atomic_write_bytes

# One colour per finger (thumb, index, middle, ring, pinky), for the bones to a finger's joints
# and for those joints' dots; the wrist has its own.
WRIST_COLOUR = (255, 255, 255)
FINGER_COLOURS = (
    (255, 64, 64),    # thumb: red
    (255, 200, 0),    # index: yellow
    (64, 220, 64),    # middle: green
    (0, 180, 255),    # ring: blue
    (200, 80, 255),   # pinky: violet
)
OUTLINE_COLOUR = (0, 0, 0)


def joint_colour(joint: int) -> tuple:
    """The colour of a keypoint's dot (and of the bone that ends at it)."""
    return WRIST_COLOUR if joint == 0 else FINGER_COLOURS[(joint - 1) // 4]


def _numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):  # any device; bf16 has no numpy dtype
        array = array.detach().cpu()
        if array.dtype in (torch.bfloat16, torch.float16):
            array = array.float()
        return array.numpy()
    return np.asarray(array)


def to_uint8(images) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8.

    Maps v to round((v + 1) * 127.5), computed in float64 and clamped to [0, 255]; ties round
    half to even (numpy's ``rint``). So -1 -> 0, 1 -> 255 and 0 -> 127.5 -> 128, the only exact
    tie a binary float can produce here. NaN becomes 0. A single image (3, H, W) gives
    (H, W, 3); one channel is repeated to three.
    """
    array = _numpy(images).astype(np.float64, copy=False)
    single = array.ndim == 3
    if single:
        array = array[None]
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(_numpy(images).shape)}")
    if array.shape[1] == 1:
        array = np.repeat(array, 3, axis=1)
    pixels = np.rint((array + 1.0) * 127.5)
    pixels = np.nan_to_num(pixels, nan=0.0, posinf=255.0, neginf=0.0)
    pixels = np.clip(pixels, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    pixels = np.ascontiguousarray(pixels)
    return pixels[0] if single else pixels


def _as_hwc_uint8(images) -> np.ndarray:
    """Float (N, 3, H, W) in [-1, 1], or already-converted uint8 (N, H, W, 3) -> uint8 (N, H, W, 3)."""
    array = _numpy(images)
    if array.dtype == np.uint8 and array.ndim == 4 and array.shape[-1] == 3:
        return array
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[-1] == 3:
        return array[None]
    pixels = to_uint8(array)
    return pixels[None] if pixels.ndim == 3 else pixels


def _grid_shape(n: int, nrow: int | None) -> tuple[int, int]:
    """(rows, columns) for n cells with ``nrow`` cells per row (default ceil(sqrt(n)))."""
    if n < 1:
        raise ValueError("no images to put in a grid")
    columns = math.ceil(math.sqrt(n)) if nrow is None else int(nrow)
    if columns < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    columns = min(columns, n)
    return math.ceil(n / columns), columns


def _cell_origin(i: int, columns: int, cell_h: int, cell_w: int, padding: int) -> tuple[int, int]:
    row, column = divmod(i, columns)
    return padding + column * (cell_w + padding), padding + row * (cell_h + padding)


def make_grid(images, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile images into one uint8 (H, W, 3) array, ``nrow`` images per row, row-major.

    The result is ``rows * (H + padding) + padding`` high and ``columns * (W + padding) + padding``
    wide, with ``columns = min(nrow, N)`` and ``rows = ceil(N / columns)``; padding and unused
    cells take ``pad_value``. ``images`` is (N, 3, H, W) float in [-1, 1] or uint8 (N, H, W, 3).
    """
    pixels = _as_hwc_uint8(images)
    n, h, w, _ = pixels.shape
    rows, columns = _grid_shape(n, nrow)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, 3),
                   pad_value, dtype=np.uint8)
    for i in range(n):
        x, y = _cell_origin(i, columns, h, w, padding)
        grid[y:y + h, x:x + w] = pixels[i]
    return grid


def draw_skeleton(draw: ImageDraw.ImageDraw, keypoints, origin=(0, 0), size=(1, 1),
                  radius: float | None = None, width: int | None = None, colour: tuple | None = None) -> None:
    """Draw a hand skeleton over the image region at ``origin`` (x0, y0) of ``size`` (w, h).

    ``keypoints`` is (21, 3): x, y normalized to [0, 1] of that region, then visibility. The 20
    bones of :data:`handforge.data.KEYPOINT_PARENTS` are drawn as lines coloured per finger, then
    a dot per joint (fill :func:`joint_colour`, thin dark outline). Joints with visibility <= 0 or
    non-finite coordinates are skipped, as are the bones that touch them. ``radius`` (dot radius)
    and ``width`` (line width) default to sizes that scale with the region. ``colour`` (an RGB
    tuple) draws the whole skeleton in one colour instead, to tell two skeletons on one image apart
    (a prediction and its ground truth).
    """
    points = _numpy(keypoints).astype(np.float64, copy=False)
    if points.shape != (N_KEYPOINTS, 3):
        raise ValueError(f"expected keypoints of shape ({N_KEYPOINTS}, 3), got {tuple(points.shape)}")
    x0, y0 = origin
    w, h = size
    if radius is None:
        radius = max(1.5, min(w, h) / 40)
    if width is None:
        width = max(1, round(min(w, h) / 64))
    visible = (points[:, 2] > 0) & np.isfinite(points).all(axis=1)
    # Pixel i covers continuous [i, i + 1) and PIL addresses it by its index: shift by half a pixel.
    xy = [(x0 + x * w - 0.5, y0 + y * h - 0.5) for x, y in points[:, :2]]
    for child, parent in enumerate(KEYPOINT_PARENTS):
        if parent >= 0 and visible[child] and visible[parent]:
            draw.line([xy[parent], xy[child]], fill=colour or joint_colour(child), width=width)
    for joint in range(N_KEYPOINTS):
        if visible[joint]:
            x, y = xy[joint]
            outline = OUTLINE_COLOUR if radius >= 3 else None  # a small dot would be all outline
            draw.ellipse([x - radius, y - radius, x + radius, y + radius],
                         fill=colour or joint_colour(joint), outline=outline)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: float) -> str:
    """``text``, cut short with an ellipsis if it is wider than ``max_width``."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=font) > max_width:
        text = text[:-1]
    return text + "…" if text else ""


def save_grid(path, images, keypoints=None, captions=None, nrow: int | None = None,
              min_cell: int = 96, padding: int = 2, pad_value: int = 255, skeleton_colours=None) -> Path:
    """Write images as a PNG grid at ``path`` and return it (a Path).

    Images smaller than ``min_cell`` on their short side are upscaled (bicubic) so each cell is at
    least ``min_cell`` pixels, which keeps the skeletons readable. ``keypoints`` (N, 21, 3) are
    drawn over their cells; ``captions`` (N strings, e.g. class names) go in a band under each
    cell. ``keypoints`` may also be a list of such arrays, several skeletons per cell drawn in that
    order, with ``skeleton_colours`` one colour per array (None in it, or no list: the per-finger
    colours). Parent folders are created; the file is written to a temporary name in the same folder
    and renamed into place, so a reader never sees half a PNG.
    """
    pixels = _as_hwc_uint8(images)
    n, h, w, _ = pixels.shape
    skeletons = [] if keypoints is None else [
        _numpy(k) for k in (keypoints if isinstance(keypoints, (list, tuple)) else [keypoints])]
    for points in skeletons:
        if points.shape != (n, N_KEYPOINTS, 3):
            raise ValueError(f"expected keypoints of shape ({n}, {N_KEYPOINTS}, 3), got {tuple(points.shape)}")
    colours = list(skeleton_colours) if skeleton_colours is not None else [None] * len(skeletons)
    if len(colours) != len(skeletons):
        raise ValueError(f"got {len(colours)} skeleton colours for {len(skeletons)} sets of keypoints")
    if captions is not None:
        captions = [str(c) for c in captions]
        if len(captions) != n:
            raise ValueError(f"got {len(captions)} captions for {n} images")
    rows, columns = _grid_shape(n, nrow)

    scale = max(1.0, min_cell / min(h, w))
    cell_w, cell_h = math.ceil(w * scale - 1e-9), math.ceil(h * scale - 1e-9)
    font = ImageFont.load_default() if captions is not None else None
    band = 0
    if captions is not None:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        bottom = probe.textbbox((0, 0), "Ag|", font=font)[3]
        band = bottom + 4  # text drawn 2 px below the image, plus a little room below the descenders

    canvas = Image.new("RGB", (columns * (cell_w + padding) + padding,
                               rows * (cell_h + band + padding) + padding), (pad_value,) * 3)
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x, y = _cell_origin(i, columns, cell_h + band, cell_w, padding)
        cell = Image.fromarray(pixels[i])
        if (cell_w, cell_h) != (w, h):
            cell = cell.resize((cell_w, cell_h), Image.Resampling.BICUBIC)
        canvas.paste(cell, (x, y))
        for points, colour in zip(skeletons, colours):
            draw_skeleton(draw, points[i], origin=(x, y), size=(cell_w, cell_h), colour=colour)
        if captions is not None:
            text = _fit_text(draw, captions[i], font, cell_w - 2)
            draw.text((x + 1, y + cell_h + 2), text, fill=(0, 0, 0), font=font)

    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
