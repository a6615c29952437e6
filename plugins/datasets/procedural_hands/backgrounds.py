"""Backgrounds of the procedural hands: solid, linear gradient, value noise and indoor "clutter".

Per-sample values are touched by single element-wise operations and gathers only (no matmul,
no interpolate, no reductions over pixels, no transcendental kernels), so a sample's pixels are
the same whatever batch it is drawn in. Resampling is separable: whole rows (or columns) are
gathered and lerped, then the same along the other axis.

What is expensive is made once per image size and shared: NOISE_VARIANTS tiles of two-octave
value noise (a noise background is a run of rows of one, at a per-sample offset), and
CLUTTER_LAYOUTS label maps of overlapping shapes (a clutter background is one, turned or
flipped, in per-sample colours over a per-sample gradient, drawn at reduced resolution and
upsampled: its edges are about as soft as a defocused room's). All is made from a fixed
integer hash, the same in every process.

Drawing is split like the rasteriser's: :func:`plan` makes the per-sample pieces once per batch
(small NumPy arrays, and the clutter's column pass), :func:`draw` fills a chunk of images.
:func:`background` does both for a whole batch.
"""
import functools

import numpy as np
import torch

# Indoor colours for clutter shapes: walls, furniture, fabric, plastic; one beige only, so
# that a background is never mostly skin-coloured.
PALETTE = np.array([
    [0.93, 0.93, 0.90], [0.76, 0.77, 0.75], [0.47, 0.48, 0.50], [0.16, 0.16, 0.18],
    [0.52, 0.34, 0.20], [0.30, 0.20, 0.13], [0.20, 0.32, 0.58], [0.20, 0.45, 0.30],
    [0.68, 0.14, 0.14], [0.86, 0.72, 0.28], [0.42, 0.28, 0.50], [0.26, 0.55, 0.60],
    [0.72, 0.64, 0.55], [0.10, 0.12, 0.25], [0.60, 0.62, 0.30], [0.85, 0.45, 0.15],
], dtype=np.float32)
# Clutter layouts: 7 shapes drawn in this order: a large panel (wall, door, table top), a
# rectangle, an ellipse, a striped panel, a long thin edge (shelf, frame, cable), an ellipse, a
# rectangle; each shown with probability 0.85, at a random place, size and tilt.
CLUTTER_RAND = 8
CLUTTER_LAYOUTS = 256  # layouts made once per canvas side; a sample picks one, turned or flipped
CLUTTER_ELLIPSE = np.array([0, 0, 1, 0, 0, 1, 0], dtype=bool)  # the others are rectangles
CLUTTER_STRIPES = 3  # the slot whose panel is striped
CLUTTER_HALF_W = np.array([[0.3, 0.4], [0.05, 0.25], [0.05, 0.25], [0.08, 0.25], [0.2, 0.5], [0.05, 0.2],
                           [0.05, 0.25]], dtype=np.float32)  # (base, span), image widths
CLUTTER_HALF_H = np.array([[0.25, 0.4], [0.05, 0.25], [0.05, 0.25], [0.08, 0.25], [0.008, 0.03], [0.05, 0.2],
                           [0.05, 0.25]], dtype=np.float32)
CLUTTER_MAX_SIDE = 128  # clutter's side: 1/2 of the image's (1/3 below 128 px), at most this
NOISE_OFFSET = 0.6  # noise = clamp(coarse * 1.43 + fine * 0.77 - NOISE_OFFSET, 0, 1)
NOISE_VARIANTS = 8  # noise tiles per image size
WALL_SHADES = 32  # steps of the gradient behind clutter


@functools.lru_cache(maxsize=64)
def _weights(size: int, g: int, smooth: bool):
    """Lower node (size,) and the weight of the next one, for pixel centres over g grid nodes
    spanning the image; NumPy and torch copies."""
    pos = (np.arange(size, dtype=np.float32) + 0.5) * np.float32((g - 1) / size)
    i0 = np.minimum(np.floor(pos), g - 2).astype(np.int64)
    w = pos - i0.astype(np.float32)
    if smooth:
        w = w * w * (3.0 - 2.0 * w)
    return i0, w, torch.from_numpy(i0), torch.from_numpy(w)


def _lerp(grid: torch.Tensor, dim: int, i0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Along ``dim`` of a tensor: grid[i0] + (grid[i0 + 1] - grid[i0]) * w."""
    n = grid.shape[dim]
    step = (grid.narrow(dim, 1, n - 1) - grid.narrow(dim, 0, n - 1)).index_select(dim, i0)
    shape = [1] * grid.dim()
    shape[dim] = -1
    return grid.index_select(dim, i0).add_(step.mul_(w.view(shape)))


def upsample(grid: torch.Tensor, size: int, smooth: bool = True) -> torch.Tensor:
    """(..., g, g) grids to (..., size, size): separable (smoothstep-weighted) bilinear."""
    _, _, i0, w = _weights(size, grid.shape[-1], smooth)
    return _lerp(_lerp(grid, grid.dim() - 2, i0, w), grid.dim() - 1, i0, w)


def _ramp_parts(cos_sin, size: int):
    """Row and column parts (B, size) of linear ramps across the image along cos_sin (B, 2):
    ramp = rows[y] + cols[x], to be clamped to [0, 1]."""
    pos = (np.arange(size, dtype=np.float32) + 0.5) / np.float32(size) - 0.5
    k = cos_sin * 1.2
    return pos * k[:, 1:] + 0.5, pos * k[:, :1]


@functools.lru_cache(maxsize=16)
def _noise_rows(size: int) -> torch.Tensor:
    """(NOISE_VARIANTS * 2 size + 1, size) rows of value noise backgrounds for images of
    ``size``, before the clamp: NOISE_VARIANTS tiles 2 size tall (periodic along it) and size
    wide, each 1.43 coarse + 0.77 fine - 0.6 (smooth lattices of 4 and 8 cells across the
    image), then a row of zeros (what non-noise backgrounds read)."""
    n = 2 * size
    tiles = []
    for v in range(NOISE_VARIANTS):
        total = np.full((n, size), -NOISE_OFFSET, dtype=np.float32)
        for octave, (cells, weight) in enumerate(((4, 1.43), (8, 0.77))):
            lattice = _uniforms(2 * cells, cells + 1, 101 + 2 * v + octave)  # rows wrap: 2 cells per side
            lattice = np.concatenate([lattice, lattice[:1]], 0)
            i0, w = _weights(n, 2 * cells + 1, True)[:2]
            j0, u = _weights(size, cells + 1, True)[:2]
            rows = lattice[i0] + (lattice[i0 + 1] - lattice[i0]) * w[:, None]
            total += (rows[:, j0] + (rows[:, j0 + 1] - rows[:, j0]) * u) * weight
        tiles.append(total)
    tiles.append(np.zeros((1, size), dtype=np.float32))
    return torch.from_numpy(np.concatenate(tiles))


def plan(kind, colors, cos_sin, noise, size: int, rand=None):
    """Per-sample pieces of the backgrounds (kind 0 solid, 1 linear gradient, 2 value noise,
    3 clutter; clutter without ``rand`` is a gradient) from NumPy arrays, as (B, ...) NumPy
    arrays for :func:`draw`, and the pieces shared by all samples (torch).

    Each background but clutter is c0 + clamp(ramp + noise, 0, 1) * (c1 - c0), with the ramp
    and the noise zero where a kind has none. A noise background is ``size`` consecutive rows
    of one of the shared noise tiles (see :func:`_noise_rows`): noise[0] picks the tile and
    noise[1] the first row, so drawing it is one gather of whole rows.
    """
    b = kind.shape[0]
    c0, c1 = colors[:, 0], colors[:, 1]
    busy = (kind == 3) & (rand is not None)
    ramp = ((kind == 1) | ((kind == 3) & (rand is None))).astype(np.float32)[:, None]
    rows, cols = _ramp_parts(cos_sin, size)
    tall = 2 * size
    tile = np.minimum((noise[:, :1] * NOISE_VARIANTS).astype(np.int64), NOISE_VARIANTS - 1)
    first = np.minimum((noise[:, 1:2] * tall).astype(np.int64), tall - 1)
    noise_rows = np.where((kind == 2)[:, None], (np.arange(size) + first) % tall + tile * tall, NOISE_VARIANTS * tall)
    p = {"bg_c0": c0[..., None], "bg_dc": (c1 - c0)[..., None], "bg_rows": (rows * ramp)[..., None],
         "bg_cols": (cols * ramp)[:, None], "bg_noise": noise_rows, "bg_slot": np.full(b, -1, dtype=np.int64)}
    # Clutter at reduced resolution after its column pass, (n, 3, r, size) for the n busy
    # samples, shared by all chunks; bg_slot says which is a sample's.
    shared = {"bg_noise": _noise_rows(size)}
    if busy.any():
        r = max(8, min(-(-size // (2 if size >= 128 else 3)), CLUTTER_MAX_SIDE))
        at = busy.nonzero()[0]
        p["bg_slot"][at] = np.arange(at.size)
        _, _, i0, w = _weights(size, r, False)
        cols = _lerp(_clutter(colors[at], cos_sin[at], rand[at], r), 2, i0, w)  # (n, r, size, 3)
        cols = cols.permute(0, 3, 1, 2).contiguous()  # (n, 3, r, size): rows to gather
        shared["bg_clutter"] = cols
        shared["bg_clutter_steps"] = cols[:, :, 1:] - cols[:, :, :-1]
    return p, shared


def draw(p: dict, shared: dict, size: int, image: torch.Tensor, scratch=None):
    """Fill image (Bc, 3, size, size) with the backgrounds of a chunk of :func:`plan` (as
    tensors; ``scratch``: an optional (Bc * size, size) buffer)."""
    bc = image.shape[0]
    mix = torch.index_select(shared["bg_noise"], 0, p["bg_noise"].view(-1), out=scratch).view(bc, size, size)
    mix.add_(p["bg_rows"]).add_(p["bg_cols"]).clamp_(0.0, 1.0)
    flat = image.view(bc, 3, size * size)
    torch.mul(mix.view(bc, 1, size * size), p["bg_dc"], out=flat).add_(p["bg_c0"])
    slot = p["bg_slot"]
    at = (slot >= 0).nonzero().squeeze(1)
    if at.numel():
        which = slot[at]
        cols, steps = shared["bg_clutter"], shared["bg_clutter_steps"]
        _, _, i0, w = _weights(size, cols.shape[2], False)
        rows = cols.index_select(0, which).index_select(2, i0)
        rows.add_(steps.index_select(0, which).index_select(2, i0).mul_(w[:, None]))
        image.index_copy_(0, at, rows)


def background(kind, colors, cos_sin, noise, size: int, rand=None) -> torch.Tensor:
    """(B, 3, size, size) in [0, 1]: kind 0 solid, 1 linear gradient, 2 two-octave value noise,
    3 clutter.

    colors (B, 2, 3); cos_sin (B, 2) gradient direction; noise (B, 25 + 81) noise grid values in
    [0, 1); rand (B, 64) uniforms (clutter shapes; without it clutter draws as a gradient).
    """
    image = torch.empty(kind.shape[0], 3, size, size)
    p, shared = plan(kind.numpy(), colors.numpy(), cos_sin.numpy(), noise.numpy(), size,
                     None if rand is None else rand.numpy())
    draw({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in p.items()}, shared, size, image)
    return image


def _sincos_small(a):
    """sin, cos for |a| <= pi / 2 by polynomials (element-wise arithmetic only)."""
    a2 = a * a
    s = a * (1.0 + a2 * (-1.0 / 6 + a2 * (1.0 / 120 + a2 * (-1.0 / 5040 + a2 * (1.0 / 362880)))))
    c = 1.0 + a2 * (-0.5 + a2 * (1.0 / 24 + a2 * (-1.0 / 720 + a2 * (1.0 / 40320 + a2 * (-1.0 / 3628800)))))
    return s, c


def _uniforms(n: int, m: int, salt: int):
    """(n, m) float32 uniforms in [0, 1) from an integer hash of (row, column, salt): the same
    on every machine and in every process."""
    mask = np.uint64(0xFFFFFFFF)
    h = (np.arange(n, dtype=np.uint64)[:, None] * np.uint64(0x27D4EB2D)
         + np.arange(m, dtype=np.uint64) * np.uint64(0x165667B1) + np.uint64(salt * 0x9E3779B1)) & mask
    for mult, shift in ((0x85EBCA6B, 13), (0xC2B2AE35, 16), (0x2C1B3C6D, 15)):
        h = ((h ^ (h >> np.uint64(16))) * np.uint64(mult)) & mask
        h = h ^ (h >> np.uint64(shift))
    return ((h >> np.uint64(8)).astype(np.float32) * np.float32(1.0 / (1 << 24)))


@functools.lru_cache(maxsize=8)
def _clutter_layouts(r: int):
    """(CLUTTER_LAYOUTS * r * r,) uint8 label maps of clutter layouts on an r x r canvas (0 the
    wall behind, 1..7 the shapes, 8 the stripes of the striped panel), and the (8, r * r) pixel
    permutations of the square's symmetries (turns and flips).

    Made once per side from a fixed hash: 7 shapes each, drawn far to near, with random place,
    size, tilt and visibility (see CLUTTER_HALF_W, CLUTTER_HALF_H, CLUTTER_ELLIPSE)."""
    labels = []
    pix = np.arange(r, dtype=np.float32) + 0.5
    n = len(CLUTTER_HALF_W)
    for first in range(0, CLUTTER_LAYOUTS, 32):
        count = min(32, CLUTTER_LAYOUTS - first)
        u = _uniforms(CLUTTER_LAYOUTS, n * 8, 7)[first:first + count].reshape(count, n, 8)
        half_w = (CLUTTER_HALF_W[:, 0] + CLUTTER_HALF_W[:, 1] * u[..., 3]) * r
        half_h = (CLUTTER_HALF_H[:, 0] + CLUTTER_HALF_H[:, 1] * u[..., 4]) * r
        cx, cy = (u[..., 1] * 1.2 - 0.1) * r, (u[..., 2] * 1.2 - 0.1) * r
        # Mostly upright: tilt within +-0.35 rad, a fifth of them turned by up to +-1.2 rad.
        s, c = _sincos_small((u[..., 5] - 0.5) * np.where(u[..., 0] < 0.2, 2.4, 0.7).astype(np.float32))
        along = (pix[:, None] * s[..., None, None] - (cx * c + cy * s)[..., None, None]) + pix * c[..., None, None]
        across = (pix[:, None] * c[..., None, None] - (cy * c - cx * s)[..., None, None]) - pix * s[..., None, None]
        hw, hh = half_w[..., None, None], half_h[..., None, None]
        inside = np.where(CLUTTER_ELLIPSE[:, None, None], (along / hw) ** 2 + (across / hh) ** 2 < 1.0,
                          (np.abs(along) < hw) & (np.abs(across) < hh))
        inside &= (u[..., 0] < 0.85)[..., None, None]
        k = CLUTTER_STRIPES
        period = ((0.04 + 0.08 * u[:, k, 3]) * r)[:, None, None]
        phase = along[:, k] / period
        stripes = inside[:, k] & (np.abs(phase - np.floor(phase) - 0.5) < 0.25)
        label = np.zeros((count, r, r), dtype=np.uint8)
        for slot in range(n):
            label[inside[:, slot]] = slot + 1
            if slot == k:
                label[stripes] = n + 1
        labels.append(label.reshape(-1))
    y, x = np.divmod(np.arange(r * r), r)
    turns = []
    for t in range(8):
        yy, xx = (x, y) if t & 4 else (y, x)
        yy = r - 1 - yy if t & 1 else yy
        xx = r - 1 - xx if t & 2 else xx
        turns.append(yy * r + xx)
    return np.concatenate(labels), np.stack(turns)


def _clutter(colors, cos_sin, rand, r: int) -> torch.Tensor:
    """(B, r, r, 3) indoor-like clutter: one of CLUTTER_LAYOUTS layouts of overlapping
    rectangles, ellipses and a striped panel, turned or flipped, in per-sample colours (an
    indoor palette), over a gradient between ``colors``. At reduced resolution: once upsampled
    its edges are about as soft as a defocused room's.

    colors (B, 2, 3); cos_sin (B, 2) gradient direction; rand (B, >= 64) uniforms (columns
    CLUTTER_RAND.. CLUTTER_RAND + 17 are read: layout, symmetry, 7 colours, 7 brightnesses,
    the stripes' shade).
    """
    b = colors.shape[0]
    bank, turns = _clutter_layouts(r)
    u = rand[:, CLUTTER_RAND:CLUTTER_RAND + 17]
    layout = np.minimum((u[:, 0] * CLUTTER_LAYOUTS).astype(np.int64), CLUTTER_LAYOUTS - 1)
    turn = np.minimum((u[:, 1] * 8).astype(np.int64), 7)
    labels = bank[turns[turn] + (layout * (r * r))[:, None]].astype(np.int64)  # (B, r * r)
    colour = PALETTE[np.minimum((u[:, 2:9] * len(PALETTE)).astype(np.int64), len(PALETTE) - 1)]
    colour = np.clip(colour * (0.55 + 0.75 * u[:, 9:16, None]), 0.0, 1.0)  # (B, 7, 3)
    k = CLUTTER_STRIPES
    stripes = np.clip(colour[:, k] * np.where(u[:, 16] < 0.5, 1.6, 0.55).astype(np.float32)[:, None], 0.0, 1.0)
    # The wall: the gradient between the two colours in WALL_SHADES steps, as palette entries
    # 9.. (label 0 reads the step of its pixel).
    c0, c1 = colors[:, 0, None], colors[:, 1, None]
    shades = c0 + (np.arange(WALL_SHADES, dtype=np.float32) / (WALL_SHADES - 1))[:, None] * (c1 - c0)
    palette = np.concatenate([np.zeros((b, 1, 3), np.float32), colour, stripes[:, None], shades], 1)
    rows, cols = _ramp_parts(cos_sin, r)
    ramp = np.clip(rows[:, :, None] + cols[:, None, :], 0.0, 1.0).reshape(b, r * r)
    step = (ramp * (WALL_SHADES - 1) + 0.5).astype(np.int64)
    entry = np.where(labels == 0, 9 + step, labels) + np.arange(b)[:, None] * palette.shape[1]
    return torch.from_numpy(palette.reshape(-1, 3)).index_select(0, torch.from_numpy(entry.reshape(-1))).view(b, r, r, 3)
