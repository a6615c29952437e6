"""Signed-distance rasteriser of the procedural hand: capsules, a rounded palm, the forearm.

A *scene* is a dict of per-sample tensors in pixel units (built by :mod:`scene` from the posed
3D hand). :func:`rasterize` turns a batch of scenes into images with tensor operations over
(batch, parts, pixels). Only single element-wise operations (+, -, *, /, sqrt, min, max,
clamp, floor, where) and gathers/scatters of distinct elements touch per-sample values: no
matmul, no reductions over pixels, no transcendental kernels, no fused multiply-adds. Each is
exact in IEEE arithmetic whichever SIMD lane or thread computes it, so a sample's pixels never
depend on the batch it is drawn in, nor on where in it.

Scene keys read by :func:`rasterize` (B samples, P finger capsules, K palm vertices; float32
unless said; pixel coordinates have (0, 0) at the image's top-left corner, x right, y down;
the camera frame has x right, y down, z away from the viewer):

============ ========== ===========================================================================
key          shape      meaning
============ ========== ===========================================================================
caps         (B, P, 6)  finger capsules sorted far to near: (ax, ay, bx, by, ra, rb), pixels (axis
                        ends a, b and the radius at each; b is the tip end of a distal capsule)
caps_dorsal  (B, P, 3)  optional: unit vector, camera frame, from each sorted capsule's axis to its
                        back (nail side); a nail shows where its z < -0.2 (faces the viewer)
caps_tip     (B, P)     optional, bool: True for the distal capsule of each digit, sorted like caps.
                        Without caps_dorsal or caps_tip no nails are drawn.
palm_rank    (B,)       int64: how many of the sorted capsules lie behind the palm
palm_verts   (B, K, 2)  convex core polygon of the palm, pixels, either winding
palm_round   (B,)       how far the palm grows around that polygon, pixels (> 0)
palm_centre  (B, 2)     pixels; with palm_extent (B,), pixels: the palm is brighter towards the
                        light by 0.35 of light per extent from its centre
palm_lit     (B,)       light . the palm's visible normal
arm          (B, 11)    forearm tube (ax, ay, bx, by, ra, rb), pixels, starting under the palm and
                        ending off the image; the sleeve's widening (pixels); sleeve on (1.0 / 0.0);
                        the sleeve's cut: pixels with x * arm[8] + y * arm[9] + arm[10] > 0 are
                        sleeved (arm[8:10] the unit axis direction)
sleeve_color (B, 3)     sRGB in [0, 1]
light        (B, 3)     unit vector towards the light, camera frame (z < 0: from the viewer's side)
ambient      (B,)       in [0, 1)
gain         (B,)       light intensity (about 1)
skin         (B, 3)     sRGB in [0, 1]
bg_kind      (B,)       int64: 0 solid, 1 linear gradient, 2 value noise, 3 clutter
bg_colors    (B, 2, 3)  sRGB in [0, 1]: the background's two colours (clutter: its wall's)
bg_dir       (B, 2)     cos, sin of the gradient's direction
bg_noise     (B, >= 2)  uniforms in [0, 1): [0] picks one of the shared noise tiles, [1] its first
                        row (the other columns are not read)
rand         (B, 64)    optional, uniforms in [0, 1) for the rasteriser: [0] skin texture row shift,
                        [1] its variant (strength, column shift), [2] unused, [3] gloss, [4:8]
                        unused, [8:25] clutter (layout, symmetry, 7 colours, 7 brightnesses, stripe
                        shade), [25:64] unused. Without it: one texture for all, average gloss, and
                        clutter drawn as a gradient.
============ ========== ===========================================================================

Shading: ``colour = skin * gain * (ambient * warm + (1 - ambient) * max(light . normal, 0))``,
times a faint multiplicative skin texture (a shared periodic value-noise tile, shifted per
sample), plus a white highlight growing with ``(light . normal - 0.55)^2``; ``warm`` makes
shadowed skin lean red. Parts report ``light . normal`` (a tube's normal follows from the
pixel's offset from its axis) and the hand composites that before the clamp, so the colour is
computed once per pixel. A nail adds NAIL_LIGHT to light . normal: lighter, and glossier.

How it is fast: per-sample coefficients are computed once per batch in NumPy; the batch is
drawn in chunks of about CHUNK_PIXELS pixels from reused buffers (fresh large allocations cost
page faults, which here cost more than the arithmetic); each finger capsule, and the palm, is
evaluated only over a square tile around it; a capsule is composited over a canvas of (light .
normal * coverage, coverage) by gather and scatter of its tile; the palm's place among the
fingers is kept by compositing capsules behind it and in front of it into two canvases at once
(compositing is associative: result = front over (palm over back)); a quantity linear in the
pixel position costs one broadcast add of a row part and a column part.
"""
import mmap
import threading

import numpy as np
import torch

from . import backgrounds
from .backgrounds import background, upsample  # noqa: F401  (re-exported)

WARM_AMBIENT = np.array([1.065, 0.98, 0.95], dtype=np.float32)  # shadowed skin leans red
NAIL_LIGHT = 0.3  # a nail adds this to light . normal: lighter, and glossier
CREASE_LIGHT = 0.6  # a palm crease of full darkness takes this from light . normal
CHUNK_PIXELS = 1 << 19  # samples are drawn in chunks of at most about this many pixels
HIGHLIGHT_FROM = 0.55  # light . normal where the highlight starts
TEXTURE_LEVELS = (0.03, 0.045, 0.06, 0.075)  # skin texture strengths (multiplicative)
TEXTURE_VARIANTS = 4 * len(TEXTURE_LEVELS)  # strengths x column shifts
_ONE, _HALF, _TWO = (torch.tensor(v) for v in (1.0, 0.5, 2.0))


class _Workspace(threading.local):
    """Scratch buffers reused from chunk to chunk and call to call (per thread): fresh large
    allocations cost page faults, which here cost more than the arithmetic. Bounded by the
    chunk size, not the batch size."""

    def __init__(self):
        self.buffers = {}

    def __call__(self, name: str, *shape, dtype=torch.float32) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self.buffers[name] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


_ws = _Workspace()


def _fresh(*shape) -> torch.Tensor:
    """A new float32 tensor for the results. A large one is mapped with transparent huge pages
    where the system offers them (madvise): first writes to fresh memory fault once per page,
    and at 224 px a batch's image is ~10k 4 KiB pages, which cost more than drawing it."""
    numel = 1
    for s in shape:
        numel *= s
    if numel * 4 < (4 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape)
    buf = mmap.mmap(-1, numel * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    return torch.frombuffer(buf, dtype=torch.float32).view(shape)


def rasterize(scene: dict, size: int):
    """Images (B, 3, size, size) in [0, 1] and hand coverage (B, size, size) of a batch of scenes.

    The coverage is the hand's (palm and fingers, not the forearm), anti-aliased, in [0, 1].
    """
    b = scene["caps"].shape[0]
    image = _fresh(b, 3, size, size)
    mask = _fresh(b, size, size)
    if b == 0:
        return image, mask
    plan, shared = _plan(scene, size)
    chunks = -(-b * size * size // CHUNK_PIXELS)
    step = -(-b // chunks)
    for lo in range(0, b, step):
        hi = min(b, lo + step)
        _draw({k: v[lo:hi] for k, v in plan.items()}, shared, size, image[lo:hi], mask[lo:hi])
    return image, mask


# -- per-sample coefficients (small arrays, once per batch) ----------------------------------
def _plan(scene: dict, size: int):
    """Everything per sample that the drawing needs, as (B, ...) tensors, and what all samples
    share.

    This is small per-sample arithmetic, done in NumPy (float32, element-wise operations only,
    so just as batch-independent) because a NumPy operation on a few hundred numbers costs a
    fraction of a torch one. A function linear in the pixel position, cx * x + cy * y + c0, is
    kept as its row part (cy * y + c0 per tile row) and column part (cx * x per tile column):
    one broadcast add makes it over a tile.
    """
    npix = size * size
    s = {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in scene.items()
         if isinstance(v, torch.Tensor)}
    light = s["light"]
    b = light.shape[0]
    rand = s.get("rand")
    plan, shared = backgrounds.plan(s["bg_kind"], s["bg_colors"], s["bg_dir"], s["bg_noise"], size, rand)

    # Tubes: the finger capsules and, last, the forearm.
    caps, arm = s["caps"], s["arm"]
    n = caps.shape[1]
    axis, coef, scal = _tube_coefficients(np.concatenate([caps, arm[:, None, :6]], 1), light[:, None])
    # Fingers on square tiles of one side.
    x0, y0, side = _tiles(caps, size)
    steps = np.arange(side, dtype=np.float32) + 0.5
    xs, ys = x0[..., None] + steps, y0[..., None] + steps  # (B, P, T)
    plan["f_rows"], plan["f_cols"] = _rows_cols(xs, ys, *(c[:, :n] for c in coef))
    plan["f_scal"] = scal[:, :n]
    # Where each tile lies in its canvas row: canvas 0 behind the palm, canvas 1 in front.
    front = np.arange(n) >= s["palm_rank"][:, None]
    plan["f_base"] = front * (2 * npix) + (y0 * size + x0).astype(np.int64)
    shared["f_side"] = side
    shared["f_offsets"] = (np.arange(2)[:, None] * npix + _tile_offsets(side, size)).reshape(-1)
    _nail_plan(s, caps, [a[:, :n] for a in axis], xs, ys, plan)

    # The forearm over the whole image: along the axis, light, across, radius + 1/2 (growing
    # linearly along the axis), the sleeve's, and the sleeve's cut (pixels where it is > 0).
    ra, rb, widen, on, ex, ey, cut = (arm[:, i] for i in range(4, 11))
    ux, uy, length = (a[:, n] for a in axis[:3])
    taper = (rb - ra) / np.maximum(length, 1e-4)
    cx, cy, c0 = (c[:, n] for c in coef)
    start = c0[:, 0]  # -(a . u)
    grow = np.stack([ux * taper, uy * taper, ra + 0.5 + start * taper], -1)
    pix = np.broadcast_to(np.arange(size, dtype=np.float32) + 0.5, (b, size))
    plan["a_rows"], plan["a_cols"] = _rows_cols(
        pix, pix, np.concatenate([cx, grow[:, :1], grow[:, :1], (ex * on)[:, None]], 1),
        np.concatenate([cy, grow[:, 1:2], grow[:, 1:2], (ey * on)[:, None]], 1),
        np.concatenate([c0, grow[:, 2:], grow[:, 2:] + widen[:, None], (cut * on + (on - 1.0))[:, None]], 1))
    amb = s["ambient"]
    plan["a_scal"] = np.stack([scal[:, n, 2, 0, 0], scal[:, n, 5, 0, 0], 1.0 / (ra + rb + 2.0 * widen), amb,
                               1.0 - amb], -1)[..., None, None]
    plan["a_sleeved"] = on > 0

    # The palm on its own tile: its lines, then its light.
    verts, rounding = s["palm_verts"], s["palm_round"]
    nx, ny, offset, px0, py0, pside = _palm_lines(verts, rounding, size)
    steps = np.arange(pside, dtype=np.float32) + 0.5
    k = 0.35 / s["palm_extent"]
    lx, ly = light[:, 0] * k, light[:, 1] * k
    cx, cy = s["palm_centre"][:, 0], s["palm_centre"][:, 1]
    plan["p_rows"], plan["p_cols"] = _rows_cols(
        px0[:, None] + steps, py0[:, None] + steps, np.concatenate([nx, lx[:, None]], 1),
        np.concatenate([ny, ly[:, None]], 1),
        np.concatenate([-offset, (s["palm_lit"] - (cx * lx + cy * ly))[:, None]], 1))
    plan["p_inv_round"] = (-1.0 / rounding)[:, None, None]
    if "creases" in s:
        _crease_plan(s["creases"], s["crease_depth"], px0[:, None] + steps, py0[:, None] + steps, plan)
    plan["p_base"] = (py0 * size + px0).astype(np.int64)
    shared["p_side"] = pside
    shared["p_offsets"] = (np.arange(2)[:, None] * npix + _tile_offsets(pside, size)).reshape(-1)

    # Colours: skin * gain * (warm ambient + (1 - ambient) * light . normal); the highlight's
    # strength; the sleeve.
    u = rand if rand is not None else np.full((b, 8), 0.5, dtype=np.float32)
    albedo = s["skin"] * s["gain"][:, None]
    plan["ambient_rgb"] = (albedo * amb[:, None] * WARM_AMBIENT)[..., None]
    plan["lit_rgb"] = (albedo * (1.0 - amb[:, None]))[..., None]
    plan["gloss"] = (0.06 + 0.16 * u[:, 3:4]) * s["gain"][:, None] * (1.0 / (1.0 - HIGHLIGHT_FROM) ** 2)
    plan["sleeve_rgb"] = (s["sleeve_color"] * s["gain"][:, None])[..., None]

    # Skin texture: rows of the shared tile, at a per-sample row shift and variant (strength and
    # column shift).
    tile = _texture_tile(size)
    tn = tile.shape[0] // TEXTURE_VARIANTS
    shift = np.minimum((u[:, 0:1] * tn).astype(np.int64), tn - 1)
    variant = np.minimum((u[:, 1:2] * TEXTURE_VARIANTS).astype(np.int64), TEXTURE_VARIANTS - 1)
    plan["x_rows"] = (np.arange(size) + shift) % tn + variant * tn
    shared["texture"] = tile
    plan = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in plan.items()}
    shared = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in shared.items()}
    return plan, shared


def _crease_plan(segments, depth, xs, ys, plan):
    """Palm creases on the palm's tile: per segment, the position along it from its start and the
    signed distance across it as linear functions, and its scalars (length, (half-width + 1/2)^2,
    darkness / (2 half-width), darkness; darkness in light . normal), so that a crease's coverage
    is drawn like a capsule's."""
    ux, uy, length, cross = _axis(*(segments[..., i] for i in range(4)))
    ax, ay, width = segments[..., 0], segments[..., 1], segments[..., 4]
    cx = np.stack([ux, -uy], -1).reshape(ux.shape[0], -1)
    cy = np.stack([uy, ux], -1).reshape(ux.shape[0], -1)
    c0 = np.stack([-(ax * ux + ay * uy), cross], -1).reshape(ux.shape[0], -1)
    plan["c_rows"], plan["c_cols"] = _rows_cols(xs, ys, cx, cy, c0)
    reach = width + 0.5
    dark = depth * CREASE_LIGHT
    plan["c_scal"] = np.stack([length, reach * reach, dark / (2.0 * width), dark], -1)[..., None, None]


def _rows_cols(xs, ys, cx, cy, c0):
    """Row and column parts (..., F, T) of F linear functions with coefficients (..., F) over
    tiles with pixel centres xs, ys (..., T)."""
    return ys[..., None, :] * cy[..., None] + c0[..., None], xs[..., None, :] * cx[..., None]


def _tile_offsets(side: int, size: int):
    return (np.arange(side)[:, None] * size + np.arange(side)).reshape(-1)


def _axis(ax, ay, bx, by):
    """Unit axis (ux, uy), its length and the across offset ax * uy - ay * ux; a point-like
    axis gets the x direction."""
    dx, dy = bx - ax, by - ay
    length = np.sqrt(dx * dx + dy * dy)
    short = length < 1e-4
    safe = np.maximum(length, 1e-4)
    ux = np.where(short, 1.0, dx / safe).astype(np.float32)
    uy = np.where(short, 0.0, dy / safe).astype(np.float32)
    return ux, uy, length, ax * uy - ay * ux


def _tube_coefficients(caps, light):
    """Tapered capsules (..., 6) as (ax, ay, bx, by, ra, rb): their axes (ux, uy, length,
    cross); their linear functions (cx, cy, c0 each (..., 3)): position along the axis from a
    (pixels), light . normal's linear part and the signed distance across the axis; and their
    scalars (..., 6, 1, 1): axis length, light along the axis per pixel beyond an end, light
    lost per squared pixel of distance, taper per pixel, ra + 1/2, 1 / (2 mean radius).

    The normal is the offset from the axis over the mean radius in the image plane, and
    1 - (d / r_mean)^2 towards the viewer (a quadratic stand-in for a tube's square root).
    """
    ax, ay, bx, by, ra, rb = (caps[..., i] for i in range(6))
    ux, uy, length, cross = axis = _axis(ax, ay, bx, by)
    lx, ly, lz = light[..., 0], light[..., 1], light[..., 2]
    inv_rm = 2.0 / (ra + rb)
    ka = (ux * ly - uy * lx) * inv_rm
    kb = (ux * lx + uy * ly) * inv_rm
    cx = np.stack([ux, -uy * ka, -uy], -1)
    cy = np.stack([uy, ux * ka, ux], -1)
    c0 = np.stack([-(ax * ux + ay * uy), cross * ka - lz, cross], -1)
    scal = np.stack([length, kb, -lz * inv_rm * inv_rm, (rb - ra) / np.maximum(length, 1e-4), ra + 0.5,
                     0.5 * inv_rm], -1)
    return axis, (cx, cy, c0), scal[..., None, None]


def _tiles(caps, size: int):
    """Integer tile origins (B, P) x 2, inside the image, and one tile side for all capsules
    that covers each one's in-image part (coverage ends r + 1/2 from the axis: pixel centres
    outside [floor(a - r), ceil(b + r)) have none)."""
    ax, ay, bx, by, ra, rb = (caps[..., i] for i in range(6))
    lo_x = np.maximum(np.floor(np.minimum(ax - ra, bx - rb)), 0.0)
    lo_y = np.maximum(np.floor(np.minimum(ay - ra, by - rb)), 0.0)
    hi_x = np.minimum(np.ceil(np.maximum(ax + ra, bx + rb)), size)
    hi_y = np.minimum(np.ceil(np.maximum(ay + ra, by + rb)), size)
    side = int(min(max(float(np.maximum(hi_x - lo_x, hi_y - lo_y).max()), 1.0), size))
    return np.minimum(lo_x, size - side), np.minimum(lo_y, size - side), side


def _nail_plan(s, caps, axis, xs, ys, plan):
    """Nails of the distal capsules: an ellipse on the back near the tip, where the back faces
    the camera. Adds the tip slots (B, k), the ellipse's two normalised coordinates as linear
    functions, and its scalars (-edge, edge + 1/2, visibility)."""
    tip, dorsal = s.get("caps_tip"), s.get("caps_dorsal")
    if tip is None or dorsal is None or not tip.any():
        return
    k = int(tip.sum(1).max())
    slot = np.argsort(~tip, axis=1, kind="stable")[:, :k]  # the tips first
    per = np.concatenate([np.stack(axis, -1), caps[..., [0, 1, 5]], dorsal, tip[..., None]], -1)
    picked = np.moveaxis(np.take_along_axis(per, slot[..., None], 1), -1, 0)
    ux, uy, length, cross, ax, ay, rb, dx, dy, dz, is_tip = picked
    facing = -dz
    visible = np.clip((facing - 0.2) * 3.0, 0.0, 1.0) * is_tip * NAIL_LIGHT
    # The plate: from about half the distal capsule to near the tip, shifted across the axis
    # as the back turns away, narrower as it tilts.
    centre = length * 0.75 + rb * 0.3
    half_length = length * 0.25 + rb * 0.35 + 0.5
    half_width = rb * 0.62 * np.clip(facing, 0.3, 1.0) + 0.3
    offset = (dy * ux - dx * uy) * rb * 0.8
    inv_l, inv_w = 1.0 / half_length, 1.0 / half_width
    plan["n_rows"], plan["n_cols"] = _rows_cols(
        np.take_along_axis(xs, slot[..., None], 1), np.take_along_axis(ys, slot[..., None], 1),
        np.stack([ux * inv_l, -uy * inv_w], -1), np.stack([uy * inv_l, ux * inv_w], -1),
        np.stack([-(ax * ux + ay * uy + centre) * inv_l, (cross - offset) * inv_w], -1))
    edge = np.maximum(np.minimum(half_length, half_width) * 0.5, 0.5)  # ~1 pixel of anti-aliasing
    plan["n_scal"] = np.stack([-edge, edge + 0.5, visible], -1)[..., None, None]
    plan["n_slot"] = slot


def _edge_normals(a, b):
    """Outward unit normals (nx, ny) (B, K) of edges a -> b of convex polygons of either winding."""
    ex, ey = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    cross = a[..., 0] * b[..., 1] - b[..., 0] * a[..., 1]
    area = cross[:, 0]
    for k in range(1, a.shape[1]):
        area = area + cross[:, k]
    length = np.maximum(np.sqrt(ex * ex + ey * ey), 1e-6) * np.where(area < 0, -1.0, 1.0).astype(np.float32)[:, None]
    return ey / length, -ex / length


def _palm_lines(verts, rounding, size):
    """The palm's signed distance is the largest over lines n . p - offset: its edge lines and
    the four axis-aligned lines through its extreme vertices (supporting lines too: exact inside,
    and they cut the mitred spikes that the edge lines alone leave at sharp corners, as when
    the palm is seen edge-on). Returns the normals (nx, ny) and offsets (B, K + 4), each pushed
    out by the rounding, and the integer origins (B,) x 2 and one side of square tiles that
    hold every covered pixel (sdf < 1/2) whatever their size."""
    nx, ny = _edge_normals(verts, np.roll(verts, -1, axis=1))
    offset = nx * verts[..., 0] + ny * verts[..., 1]
    lo, hi = verts.min(1), verts.max(1)  # (B, 2)
    b = verts.shape[0]
    one, zero = np.ones((b, 1), np.float32), np.zeros((b, 1), np.float32)
    nx = np.concatenate([nx, -one, one, zero, zero], 1)
    ny = np.concatenate([ny, zero, zero, -one, one], 1)
    offset = np.concatenate([offset, -lo[:, :1], hi[:, :1], -lo[:, 1:], hi[:, 1:]], 1) + rounding[:, None]
    reach = rounding[:, None] + 0.5
    lo = np.clip(np.floor(lo - reach), 0.0, size - 1.0)
    hi = np.clip(np.ceil(hi + reach), lo + 1.0, size)
    side = int(min(max(float((hi - lo).max()), 1.0), size))
    lo = np.minimum(lo, size - side)
    return nx, ny, offset, lo[:, 0], lo[:, 1], side


# -- drawing (one chunk of samples; full-size work only) --------------------------------------
def _eval(rows, cols, j, out=None):
    """Linear function(s) j (an index or a slice) of :func:`_rows_cols` over their tiles: one op."""
    return torch.add(rows[..., j, :, None], cols[..., j, None, :], out=out)


def _rsub(x, c: torch.Tensor, out=None):
    """c - x in one element-wise op (into ``out`` if given); c a 0-d tensor."""
    return torch.sub(c, x, out=out)


def _draw(p: dict, shared: dict, size: int, image: torch.Tensor, mask: torch.Tensor):
    bc = image.shape[0]
    npix = size * size
    backgrounds.draw(p, shared, size, image, _ws("bg", bc * size, size))
    # The hand: capsules behind the palm into canvas 0, in front of it into canvas 1, each
    # (light . normal * coverage, coverage) per pixel; then the palm over canvas 0, and
    # canvas 1 over that.
    canvas = _ws("canvas", bc, 4 * npix).zero_()
    _draw_fingers(p, shared, canvas)
    _draw_palm(p, shared, canvas)
    back, front = canvas.view(bc, 2, 2, npix).unbind(1)
    keep = _rsub(front[:, 1], _ONE, out=_ws("keep", bc, npix))
    back.mul_(keep[:, None])
    hand = mask.view(bc, npix)
    torch.add(back[:, 1], front[:, 1], out=hand)
    back[:, 0].add_(front[:, 0])

    # The forearm (and sleeve) behind the hand: all skin is (lit, alpha) from here.
    lit, alpha, sleeve, sleeve_shade = _draw_arm(p, bc, size)
    lit, alpha = lit.view(bc, npix), alpha.view(bc, npix)
    _rsub(hand, _ONE, out=keep)
    lit.mul_(keep).add_(back[:, 0])
    alpha.mul_(keep).add_(hand)

    # Light . normal (nails brighter), the texture (on the coverage), the highlight.
    cover = torch.clamp_min(alpha, 1e-6, out=keep)
    light = lit.div_(cover).clamp_min_(0.0)
    texture = torch.index_select(shared["texture"], 0, p["x_rows"].view(-1), out=_ws("texture", bc * size, size))
    textured = texture.view(bc, npix).mul_(alpha)
    highlight = torch.sub(light, HIGHLIGHT_FROM, out=cover).clamp_min_(0.0)
    highlight.mul_(highlight).mul_(p["gloss"])

    # Colour over the background (and sleeve): skin * (ambient (warm) + (1 - ambient) * light)
    # plus a white highlight, times the textured coverage; the background and sleeve weighted
    # by what the skin leaves.
    colour = torch.mul(light[:, None], p["lit_rgb"], out=_ws("colour", bc, 3, npix))
    colour.add_(p["ambient_rgb"]).add_(highlight[:, None]).mul_(textured[:, None])
    weight = _rsub(alpha, _ONE, out=cover)
    img = image.view(bc, 3, npix)
    if sleeve is not None:
        sleeve, sleeve_shade = sleeve.view(bc, npix), sleeve_shade.view(bc, npix)
        sleeve_shade.mul_(weight)
        weight.mul_(_rsub(sleeve, _ONE, out=sleeve))
    img.mul_(weight[:, None]).add_(colour)
    if sleeve is not None:
        img.add_(torch.mul(sleeve_shade[:, None], p["sleeve_rgb"], out=colour))
    img.clamp_(0.0, 1.0)


def _draw_fingers(p, shared, canvas):
    """Composite the finger capsules, far to near, each over its tile of its canvas."""
    rows, cols, scal = p["f_rows"], p["f_cols"], p["f_scal"]
    bc, n = rows.shape[:2]
    side = shared["f_side"]
    t2 = side * side
    t = _eval(rows, cols, 0, out=_ws("f_t", bc, n, side, side))
    h = torch.clamp_min(t, 0.0, out=_ws("f_h", bc, n, side, side))
    h = torch.minimum(h, scal[:, :, 0], out=h)
    beyond = t.sub_(h)  # pixels beyond an end
    lit = _eval(rows, cols, 1, out=_ws("f_lit", bc, n, side, side))
    scratch = torch.mul(beyond, scal[:, :, 1], out=_ws("f_scratch", bc, n, side, side))
    lit.add_(scratch)
    radius = h.mul_(scal[:, :, 3]).add_(scal[:, :, 4])  # r + 1/2 at the nearest axis point
    across = _eval(rows, cols, 2, out=scratch)
    dist2 = across.mul_(across).add_(beyond.mul_(beyond))
    lit.sub_(torch.mul(dist2, scal[:, :, 2], out=beyond))
    # Coverage ((r + 1/2)^2 - d^2) / 2r: 1 at d = r - 1/2, 0 at d = r + 1/2, like r + 1/2 - d.
    layers = _ws("f_layers", bc, n, 2, side, side)  # lit * coverage, coverage
    alpha = torch.mul(radius, radius, out=layers[:, :, 1]).sub_(dist2).mul_(scal[:, :, 5]).clamp_(0.0, 1.0)
    torch.mul(lit, alpha, out=layers[:, :, 0])
    _draw_nails(p, layers)
    index = torch.add(p["f_base"][..., None], shared["f_offsets"], out=_ws("f_index", bc, n, 2 * t2,
                                                                            dtype=torch.int64))
    flat = layers.view(bc, n, 2 * t2)
    keep = _rsub(alpha, _ONE, out=radius).view(bc, n, 1, t2)
    tile = _ws("f_tile", bc, 2 * t2)
    for i in range(n):
        at = index[:, i]
        torch.gather(canvas, 1, at, out=tile)
        tile.view(bc, 2, t2).mul_(keep[:, i])
        canvas.scatter_(1, at, tile.add_(flat[:, i]))


def _draw_nails(p, layers):
    """Nails of the tip capsules: their light . normal raised by the nail's coverage (times
    NAIL_LIGHT and its visibility), so that a nail is lighter and glossier than skin."""
    if "n_slot" not in p:
        return
    bc, n, _, side = layers.shape[:4]
    t2 = side * side
    slot, rows, cols, scal = p["n_slot"], p["n_rows"], p["n_cols"], p["n_scal"]
    k = slot.shape[1]
    q = _eval(rows, cols, 0, out=_ws("n_q", bc, k, side, side))
    w = _eval(rows, cols, 1, out=_ws("n_w", bc, k, side, side))
    q.mul_(q).add_(w.mul_(w))  # 1 on the ellipse
    q.mul_(scal[:, :, 0]).add_(scal[:, :, 1]).clamp_(0.0, 1.0).mul_(scal[:, :, 2])
    tiles = layers.view(bc * n, 2, t2)
    at = (slot + torch.arange(0, bc * n, n)[:, None]).view(-1)  # rows of the tips' tiles
    q = q.view(bc * k, t2).mul_(torch.index_select(tiles[:, 1], 0, at, out=w.view(bc * k, t2)))
    tiles[:, 0].index_add_(0, at, q)


def _draw_palm(p, shared, canvas):
    """The palm over canvas 0 on its tile: a slab lit by its normal, brighter towards the
    light, darker at its rim."""
    rows, cols = p["p_rows"], p["p_cols"]
    bc, k = rows.shape[0], rows.shape[1] - 1
    side = shared["p_side"]
    t2 = side * side
    # Signed distance: the largest over the lines (exact inside; see _palm_lines).
    edges = torch.add(rows[:, :k, :, None], cols[:, :k, None, :], out=_ws("p_edges", bc, k, side, side))
    sdf = torch.amax(edges, 1, out=_ws("p_sdf", bc, side, side))
    layer = _ws("p_layer", bc, 2, side, side)
    alpha = _rsub(sdf, _HALF, out=layer[:, 1]).clamp_(0.0, 1.0)
    rim = sdf.mul_(p["p_inv_round"]).clamp_(0.0, 1.0)
    rim.mul_(_rsub(rim, _TWO, out=edges[:, 0])).mul_(0.45).add_(0.55)
    lit = _eval(rows, cols, k, out=layer[:, 0])
    if "c_rows" in p:
        lit.sub_(_crease_shade(p, bc, side))
    lit.mul_(rim).mul_(alpha)
    keep = _rsub(alpha, _ONE, out=rim).view(bc, 1, t2)
    at = torch.add(p["p_base"][:, None], shared["p_offsets"], out=_ws("p_index", bc, 2 * t2, dtype=torch.int64))
    tile = torch.gather(canvas, 1, at, out=_ws("p_tile", bc, 2 * t2))
    tile.view(bc, 2, t2).mul_(keep)
    canvas.scatter_(1, at, tile.add_(layer.view(bc, 2 * t2)))


def _crease_shade(p, bc, side):
    """(B, side, side) light . normal the palm loses to its creases over its tile: the darkest
    crease segment at each pixel, its capsule-like coverage times its darkness."""
    rows, cols, scal = p["c_rows"], p["c_cols"], p["c_scal"]
    g = scal.shape[1]
    lin = torch.add(rows[..., None], cols[..., None, :], out=_ws("c_lin", bc, 2 * g, side, side))
    lin = lin.view(bc, g, 2, side, side)
    t, across = lin.unbind(2)
    h = torch.clamp_min(t, 0.0, out=_ws("c_h", bc, g, side, side))
    h = torch.minimum(h, scal[:, :, 0], out=h)
    beyond = t.sub_(h)
    dist2 = across.mul_(across).add_(beyond.mul_(beyond))
    shade = _rsub(dist2, scal[:, :, 1], out=h).mul_(scal[:, :, 2])
    shade = torch.minimum(shade.clamp_min_(0.0), scal[:, :, 3], out=shade)  # coverage at most 1
    return torch.amax(shade, 1, out=_ws("c_shade", bc, side, side))


def _draw_arm(p, bc, size):
    """The forearm over the whole image: (lit * coverage, coverage) of its skin, hidden under the
    sleeve, and the sleeve's coverage and shade * coverage (None, None without sleeves).

    The tube is the fingers' capsule with two shortcuts, as its ends lie under the palm or off
    the image: its radius grows linearly along the axis (unclamped), and the rounded end is
    kept at the start only; the light there leaves out the along-axis part."""
    rows, cols, scal = p["a_rows"], p["a_cols"], p["a_scal"]
    lin = _eval(rows, cols, slice(0, 6), out=_ws("a_lin", bc, 6, size, size))
    beyond, lit, across, radius, sleeve, band = lin.unbind(1)
    beyond.clamp_max_(0.0)
    dist2 = across.mul_(across).add_(torch.mul(beyond, beyond, out=beyond))
    lit.sub_(torch.mul(dist2, scal[:, 0], out=beyond))
    alpha = radius.mul_(radius).sub_(dist2).mul_(scal[:, 1]).clamp_(0.0, 1.0)
    shade = None
    if bool(p["a_sleeved"].any()):
        sleeve.mul_(sleeve).sub_(dist2).mul_(scal[:, 2]).clamp_(0.0, 1.0).mul_(band.clamp_(0.0, 1.0))
        alpha.mul_(_rsub(sleeve, _ONE, out=dist2))
        shade = torch.clamp_min(lit, 0.0, out=beyond).mul_(scal[:, 4]).add_(scal[:, 3]).mul_(sleeve)
    else:
        sleeve = None
    return lit.mul_(alpha), alpha, sleeve, shade


# -- skin texture -----------------------------------------------------------------------------
_TEXTURES = {}


def _hash01(i: torch.Tensor, j: torch.Tensor, salt: int) -> torch.Tensor:
    """Uniforms in [0, 1) from integer lattice coordinates (a murmur-style integer hash)."""
    m = 0xFFFFFFFF
    h = (i * 0x27D4EB2D + j * 0x165667B1 + salt * 0x9E3779B1) & m
    h = h ^ (h >> 15)
    h = ((h & 0xFFFF) * 0x2C1B3C6D + ((((h >> 16) * 0x2C1B3C6D) & 0xFFFF) << 16)) & m
    h = h ^ (h >> 13)
    h = ((h & 0xFFFF) * 0x297A2D39 + ((((h >> 16) * 0x297A2D39) & 0xFFFF) << 16)) & m
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _texture_tile(size: int) -> torch.Tensor:
    """(TEXTURE_VARIANTS * N, size) skin textures, 1 + strength * mottling, for images of
    ``size``: rows of an N x N periodic tile of smooth value noise (blobs of about size / 24
    pixels and a finer grain; cells rounded to powers of two so that they tile N), at each
    strength of TEXTURE_LEVELS and four column shifts."""
    if size in _TEXTURES:
        return _TEXTURES[size]
    n = 64 if size <= 64 else 128 if size <= 128 else 256
    total = torch.zeros(n, n)
    for octave, (cell, weight) in enumerate(((size / 24.0, 0.65), (size / 64.0, 0.35))):
        cell = 1 << max(0, round(torch.log2(torch.tensor(cell)).item()))
        m = n // cell
        lattice = _hash01(torch.arange(m)[:, None], torch.arange(m)[None, :], octave + 1) - 0.5
        lattice = torch.cat([lattice, lattice[:1]], 0)
        lattice = torch.cat([lattice, lattice[:, :1]], 1)  # periodic: node m is node 0
        pos = torch.arange(n, dtype=torch.float32) / cell
        i0 = pos.floor().long()
        w = pos - i0
        w = w * w * (3.0 - 2.0 * w)
        rows = lattice[i0] * (1.0 - w)[:, None] + lattice[i0 + 1] * w[:, None]
        total += (rows[:, i0] * (1.0 - w) + rows[:, i0 + 1] * w) * (weight * 3.0)
    columns = torch.arange(size)
    tile = torch.cat([1.0 + total[:, (columns + shift * n // 4) % n] * s
                      for s in TEXTURE_LEVELS for shift in range(4)])
    _TEXTURES[size] = tile
    return tile


def palm_sdf(qx, qy, verts, rounding):
    """Signed distance (pixels) to a convex polygon grown by ``rounding``.

    The maximum over the edge lines: exact inside, slightly short outside the corners.
    qx (.., 1, W) and qy (.., H, 1) broadcast against (B, H, W), or both (B, K) points;
    verts (B, K, 2) in either winding; rounding (B,).
    """
    a, b = verts, verts.roll(-1, dims=1)
    ex, ey = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    cross = a[..., 0] * b[..., 1] - b[..., 0] * a[..., 1]
    area = cross[:, 0]
    for k in range(1, verts.shape[1]):
        area = area + cross[:, k]
    length = torch.sqrt(ex * ex + ey * ey).clamp_min(1e-6) * torch.where(area < 0, -1.0, 1.0)[:, None]
    nx, ny = ey / length, -ex / length
    offset = nx * a[..., 0] + ny * a[..., 1] + rounding[:, None]
    shape = (-1,) + (1,) * (max(qx.dim(), qy.dim()) - 1)
    d = edge = None
    for k in range(verts.shape[1]):
        px, py = qx * nx[:, k].view(shape) - offset[:, k].view(shape), qy * ny[:, k].view(shape)
        if d is None:
            d = px + py
            edge = torch.empty_like(d)
        else:
            torch.maximum(d, torch.add(px, py, out=edge), out=d)
    return d


def keypoint_visibility(kp, kp_depth, kp_radius, caps, caps_depth, adjacent, palm_verts, palm_round,
                        palm_point, palm_normal, focal, size, palm_exempt):
    """(B, 21) bool: inside the image and not clearly hidden behind another part.

    kp (B, 21, 2) pixels, kp_depth/kp_radius (B, 21) metres; caps (B, P, 6) unsorted capsules
    (ax, ay, bx, by, ra, rb pixels), caps_depth (B, P, 2) depth of a and b, metres; adjacent (21, P):
    capsules that end at a keypoint never hide it. A keypoint is hidden where another capsule's
    axis, or the palm's visible surface, lies in front of the keypoint's own surface.
    (Element-wise float32 arithmetic in NumPy: a few hundred numbers per sample.)
    """
    kp, kp_depth, kp_radius, caps, caps_depth, palm_verts, palm_round, palm_point, palm_normal = (
        t.numpy() for t in (kp, kp_depth, kp_radius, caps, caps_depth, palm_verts, palm_round, palm_point,
                            palm_normal))
    adjacent, palm_exempt = np.asarray(adjacent), np.asarray(palm_exempt)
    inside = (kp >= 0).all(-1) & (kp <= size).all(-1)
    qx, qy = kp[..., 0, None], kp[..., 1, None]
    ax, ay, bx, by, ra, rb = (caps[:, None, :, i] for i in range(6))
    za, zb = caps_depth[:, None, :, 0], caps_depth[:, None, :, 1]
    bax, bay = bx - ax, by - ay
    len2 = np.maximum(bax * bax + bay * bay, 1e-6)
    h = np.clip(((qx - ax) * bax + (qy - ay) * bay) / len2, 0.0, 1.0)
    ex, ey = qx - ax - h * bax, qy - ay - h * bay
    reach = 0.8 * (ra + h * (rb - ra))
    covered = ex * ex + ey * ey < reach * reach
    axis_depth = za + h * (zb - za)
    in_front = axis_depth < (kp_depth - kp_radius)[..., None]
    hidden = (covered & in_front & ~adjacent).any(-1)
    # Palm: ray through the keypoint's pixel against the plane of the palm's visible surface.
    nx, ny = _edge_normals(palm_verts, np.roll(palm_verts, -1, axis=1))
    offset = nx * palm_verts[..., 0] + ny * palm_verts[..., 1] + palm_round[:, None]
    sdf = kp[..., 0, None] * nx[:, None] - offset[:, None] + kp[..., 1, None] * ny[:, None]
    sdf = sdf.max(-1)
    rx, ry = (kp[..., 0] - size / 2.0) / focal, (kp[..., 1] - size / 2.0) / focal
    nx, ny, nz = (palm_normal[:, i, None] for i in range(3))
    plane = (palm_normal[:, 0] * palm_point[:, 0] + palm_normal[:, 1] * palm_point[:, 1]
             + palm_normal[:, 2] * palm_point[:, 2])[:, None]
    denom = nx * rx + ny * ry + nz
    palm_depth = plane / np.where(np.abs(denom) < 1e-6, np.float32(1e-6), denom)
    behind_palm = (sdf < -0.5 * palm_round[:, None]) & (palm_depth < kp_depth - kp_radius) & ~palm_exempt
    return torch.from_numpy(inside & ~hidden & ~behind_palm)
