"""The "obvious" renderer of a procedural_hands scene: one image at a time with PIL.ImageDraw.

The baseline for bench/procedural_hands.py. It draws the geometry that the dataset's own
``scene.build`` makes (the same dict that ``raster.rasterize`` draws) in the same far-to-near
order, but simply:

- background: a solid colour (bg_kind 0) or the linear gradient (every other kind, so noise
  and clutter are drawn as the gradient);
- forearm: a tapered tube (a quad between two circles), then the sleeve over it, if any;
- palm: its polygon grown by its rounding (the polygon, a thick line along each edge and a
  circle at each corner), at its place among the fingers;
- fingers: one capsule per phalanx, a thick line with round ends at the mean of its two radii;
- flat Lambert shading per part: skin * gain * (ambient + (1 - ambient) * max(light term, 0)),
  where a tube's light term is the one on its axis (its normal there faces the viewer) and
  the palm's is the scene's ``palm_lit``;
- drawn at 2x and averaged down (Image.resize with BOX, the exact 2x2 mean), left hands
  mirrored, returned as a (3, H, W) float tensor in [-1, 1] like the dataset's "image".
"""
import numpy as np
import torch
from PIL import Image, ImageDraw

SUPERSAMPLE = 2


def _rgb(colour) -> tuple:
    return tuple(int(round(min(max(float(c), 0.0), 1.0) * 255)) for c in colour)


def _background(kind: int, colours, direction, side: int) -> Image.Image:
    c0, c1 = _rgb(colours[0]), _rgb(colours[1])
    if kind == 0:
        return Image.new("RGB", (side, side), c0)
    pos = (np.arange(side, dtype=np.float32) + 0.5) / side - 0.5
    cos, sin = float(direction[0]) * 1.2, float(direction[1]) * 1.2
    mix = np.clip(pos[None, :] * cos + 0.5 + pos[:, None] * sin, 0.0, 1.0)
    mask = Image.fromarray((mix * 255.0 + 0.5).astype(np.uint8), "L")
    return Image.composite(Image.new("RGB", (side, side), c1), Image.new("RGB", (side, side), c0), mask)


def _disc(draw, x, y, r, fill):
    draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def _capsule(draw, ax, ay, bx, by, r, fill):
    draw.line((ax, ay, bx, by), fill=fill, width=max(1, round(2 * r)))
    _disc(draw, ax, ay, r, fill)
    _disc(draw, bx, by, r, fill)


def _tube(draw, ax, ay, bx, by, ra, rb, fill):
    """A tapered tube: the quad between the end circles."""
    length = max(((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5, 1e-6)
    nx, ny = -(by - ay) / length, (bx - ax) / length
    draw.polygon([(ax + nx * ra, ay + ny * ra), (bx + nx * rb, by + ny * rb),
                  (bx - nx * rb, by - ny * rb), (ax - nx * ra, ay - ny * ra)], fill=fill)
    _disc(draw, ax, ay, ra, fill)
    _disc(draw, bx, by, rb, fill)


def render_one(s: dict, left: bool, size: int) -> torch.Tensor:
    """One image from one sample's scene (``s``: the scene dict's values at that sample, as lists)."""
    k = SUPERSAMPLE
    image = _background(s["bg_kind"], s["bg_colors"], s["bg_dir"], size * k)
    draw = ImageDraw.Draw(image)

    def px(*values):  # scene pixels (centres at i + 0.5) -> supersampled PIL coordinates (centres at i)
        return [v * k - 0.5 for v in values]

    ambient, gain, lz = s["ambient"], s["gain"], s["light"][2]

    def skin(lit):
        shade = ambient + (1.0 - ambient) * max(lit, 0.0)
        return _rgb([c * gain * shade for c in s["skin"]])

    tube_lit = -lz  # light . normal on a tube's axis, where the normal points at the viewer (-z)
    ax, ay, bx, by, ra, rb, wider, sleeve, ex, ey, cut = s["arm"]
    _tube(draw, *px(ax, ay, bx, by), ra * k, rb * k, skin(tube_lit))
    if sleeve > 0.5:
        start = -(ax * ex + ay * ey) - cut + 0.5  # where the cut crosses the arm's axis
        t = start / max(((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5, 1e-6)
        sx, sy, r0 = ax + (bx - ax) * t, ay + (by - ay) * t, ra + (rb - ra) * t
        length = ((bx - sx) ** 2 + (by - sy) ** 2) ** 0.5 or 1e-6
        nx, ny = -(by - sy) / length * k, (bx - sx) / length * k
        (sx, sy, bx, by), w0, w1 = px(sx, sy, bx, by), r0 + wider, rb + wider
        shade = (ambient + (1.0 - ambient) * max(tube_lit, 0.0)) * gain
        draw.polygon([(sx + nx * w0, sy + ny * w0), (bx + nx * w1, by + ny * w1),
                      (bx - nx * w1, by - ny * w1), (sx - nx * w0, sy - ny * w0)],
                     fill=_rgb([c * shade for c in s["sleeve_color"]]))

    def palm():
        fill, r = skin(s["palm_lit"]), s["palm_round"] * k
        corners = [tuple(px(x, y)) for x, y in s["palm_verts"]]
        draw.polygon(corners, fill=fill)
        for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
            _capsule(draw, x0, y0, x1, y1, r, fill)

    caps = s["caps"]
    finger = skin(tube_lit)
    for rank in range(len(caps) + 1):  # far to near, the palm at its rank
        if rank == s["palm_rank"]:
            palm()
        if rank < len(caps):
            cax, cay, cbx, cby, cra, crb = caps[rank]
            _capsule(draw, *px(cax, cay, cbx, cby), (cra + crb) * 0.5 * k, finger)

    image = image.resize((size, size), Image.BOX)
    if left:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


SCENE_KEYS = ("bg_kind", "bg_colors", "bg_dir", "arm", "light", "ambient", "gain", "skin", "sleeve_color",
              "palm_verts", "palm_round", "palm_lit", "palm_rank", "caps")


def render(scene: dict, handedness: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, size, size) in [-1, 1] from a batch scene of ``scene.build``, one image at a time."""
    columns = {key: scene[key].tolist() for key in SCENE_KEYS}
    lefts = (handedness == 0).tolist()
    return torch.stack([render_one({key: v[i] for key, v in columns.items()}, lefts[i], size)
                        for i in range(len(lefts))])
