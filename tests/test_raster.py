"""The procedural hands' rasteriser: batch invariance, backgrounds, nails, texture, sizes.

Scenes are made here directly (plausible hands: a palm, five three-capsule digits, a forearm),
so these tests depend only on the scene keys documented in raster.py; one test also draws the
dataset's own scenes.
"""
import math

import pytest
import torch

from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig
from handforge.plugins.datasets.procedural_hands import backgrounds
from handforge.plugins.datasets.procedural_hands import raster


pytestmark = pytest.mark.usefixtures("one_thread")


TIP_SLOTS = (2, 5, 8, 11, 14)  # the distal capsule of each digit, before sorting


def make_scene(b: int, size: int, seed: int = 0, bg_kind=None, facing: float = -1.0) -> dict:
    """b random upright hands: a palm, five digits of three capsules (sorted far to near by a
    random depth), a forearm to the bottom edge, all keys of raster.rasterize. ``facing`` is
    the z of the capsules' back (nail side): -1 faces the viewer."""
    g = torch.Generator().manual_seed(seed)

    def u(*shape):
        return torch.rand(*shape, generator=g)

    s = size / 64.0
    cx, cy = 32 * s + (u(b) - 0.5) * 8 * s, 34 * s + (u(b) - 0.5) * 8 * s
    # Palm: a rounded 11-gon, about 16 x 18 pixels at 64 px.
    angle = torch.arange(11) * (2 * math.pi / 11)
    verts = torch.stack([cx[:, None] + 7 * s * torch.cos(angle), cy[:, None] + 8 * s * torch.sin(angle)], -1)
    # Digits: from the top of the palm, fanned out, three capsules each.
    caps = []
    for d in range(5):
        theta = (-0.9 + 0.45 * d) + (u(b) - 0.5) * 0.3
        dx, dy = torch.sin(theta), -torch.cos(theta)
        x, y = cx + dx * 8 * s, cy + dy * 8 * s
        r = torch.full((b,), (2.2 - 0.15 * d) * s)
        for k in range(3):
            length = (7 - 1.5 * k) * s
            caps.append(torch.stack([x, y, x + dx * length, y + dy * length, r * (1 - 0.08 * k),
                                     r * (1 - 0.08 * (k + 1))], -1))
            x, y = x + dx * length, y + dy * length
    caps = torch.stack(caps, 1)  # (B, 15, 6)
    order = torch.argsort(u(b, 15), dim=1)
    tip = torch.zeros(15, dtype=torch.bool)
    tip[list(TIP_SLOTS)] = True
    dorsal = torch.tensor([0.0, 0.0, facing])
    light = torch.stack([u(b) - 0.5, u(b) - 0.5, -torch.ones(b)], -1)
    light = light / light.norm(dim=-1, keepdim=True)
    arm = torch.stack([cx, cy + 6 * s, cx + (u(b) - 0.5) * 10 * s, torch.full((b,), 2.0 * size),
                       torch.full((b,), 6.5 * s), torch.full((b,), 7.5 * s), torch.full((b,), 1.6 * s),
                       (u(b) < 0.6).float(), torch.zeros(b), torch.ones(b), -(cy + 20 * s)], -1)
    kinds = torch.arange(b) % 4 if bg_kind is None else torch.full((b,), bg_kind)
    return {
        "caps": caps.gather(1, order[..., None].expand(b, 15, 6)),
        "caps_dorsal": dorsal.expand(b, 15, 3).clone(),
        "caps_tip": tip.expand(b, 15).gather(1, order),
        "palm_rank": (u(b) * 16).long().clamp(max=15),
        "palm_verts": verts, "palm_round": torch.full((b,), 3.0 * s),
        "palm_centre": torch.stack([cx, cy], -1), "palm_extent": torch.full((b,), 8.0 * s),
        "palm_lit": 0.5 + 0.4 * u(b),
        "arm": arm, "sleeve_color": u(b, 3),
        "light": light, "ambient": 0.25 + 0.2 * u(b), "gain": 0.85 + 0.3 * u(b),
        "skin": torch.tensor([0.9, 0.7, 0.55]) * (0.5 + 0.5 * u(b, 1)),
        "bg_kind": kinds, "bg_colors": u(b, 2, 3),
        "bg_dir": torch.stack([torch.cos(6.3 * u(b)), torch.sin(6.3 * u(b))], -1),
        "bg_noise": u(b, 106), "rand": u(b, 64),
    }


def pick(scene: dict, rows) -> dict:
    rows = torch.as_tensor(rows)
    return {k: v[rows] for k, v in scene.items()}


def test_a_sample_is_the_same_alone_and_anywhere_in_any_batch(monkeypatch):
    scene = make_scene(12, 40)
    # Sample 3's palm seen edge-on (a sliver: sharp corners), sample 7's large: the tile of a
    # batch must not cut (or add to) anyone's palm.
    centre = scene["palm_centre"][:, None]
    scene["palm_verts"][3] = centre[3] + (scene["palm_verts"][3] - centre[3]) * torch.tensor([1.0, 0.02])
    scene["palm_verts"][7] = centre[7] + (scene["palm_verts"][7] - centre[7]) * 1.6
    assert set(scene["bg_kind"].tolist()) == {0, 1, 2, 3} and scene["arm"][:, 7].min() == 0
    image, mask = raster.rasterize(scene, 40)
    assert image.shape == (12, 3, 40, 40) and mask.shape == (12, 40, 40)
    for i in (0, 3, 7, 11):
        alone_image, alone_mask = raster.rasterize(pick(scene, [i]), 40)
        assert torch.equal(alone_image[0], image[i]) and torch.equal(alone_mask[0], mask[i]), i
    shuffled = [9, 2, 11, 0, 5]
    small_image, small_mask = raster.rasterize(pick(scene, shuffled), 40)
    assert torch.equal(small_image, image[shuffled]) and torch.equal(small_mask, mask[shuffled])
    # Drawn in many small chunks: the same pixels.
    monkeypatch.setattr(raster, "CHUNK_PIXELS", 3 * 40 * 40)
    chunked_image, chunked_mask = raster.rasterize(scene, 40)
    assert torch.equal(chunked_image, image) and torch.equal(chunked_mask, mask)


def test_the_datasets_scenes_are_batch_invariant(monkeypatch):
    ds = ProceduralHands(ProceduralHandsConfig(size=48))
    scenes = []
    draw = raster.rasterize

    def capture(scene, size):
        scenes.append(scene)
        return draw(scene, size)

    monkeypatch.setattr(raster, "rasterize", capture)
    ds.render(ds.sample_params(range(24)))
    monkeypatch.setattr(raster, "rasterize", draw)
    scene = scenes[0]
    assert {"caps_dorsal", "caps_tip", "rand"} <= set(scene)
    image, mask = draw(scene, 48)
    for rows in ([5], [17, 3, 22]):
        part_image, part_mask = draw(pick(scene, rows), 48)
        assert torch.equal(part_image, image[rows]) and torch.equal(part_mask, mask[rows])


def test_images_are_in_range_and_the_mask_is_the_hand():
    scene = make_scene(8, 64, seed=1)
    image, mask = raster.rasterize(scene, 64)
    assert image.min() >= 0 and image.max() <= 1
    assert mask.min() >= 0 and mask.max() <= 1
    # Palm centres and fingertips are hand; the corners far from the hand are not.
    cx, cy = scene["palm_centre"].floor().long().unbind(-1)
    assert (mask[torch.arange(8), cy, cx] > 0.99).all()
    tips = scene["caps"][scene["caps_tip"]].view(8, 5, 6)
    tx, ty = tips[..., 2].floor().long(), tips[..., 3].floor().long()
    assert (mask[torch.arange(8)[:, None], ty, tx] > 0.5).all()
    assert (mask[:, :4, :4] == 0).all() and (mask[:, :4, -4:] == 0).all()
    # Anti-aliased: some pixels are partly covered.
    assert ((mask > 0.05) & (mask < 0.95)).any()


def test_clutter_is_busy_and_not_skin_coloured():
    scene = make_scene(6, 64, seed=2, bg_kind=3)
    kind = scene["bg_kind"]
    clutter = backgrounds.background(kind, scene["bg_colors"], scene["bg_dir"], scene["bg_noise"], 64,
                                     scene["rand"])
    solid = backgrounds.background(torch.zeros_like(kind), scene["bg_colors"], scene["bg_dir"], scene["bg_noise"],
                                   64, scene["rand"])
    assert clutter.shape == (6, 3, 64, 64) and clutter.min() >= 0 and clutter.max() <= 1
    assert torch.equal(solid, scene["bg_colors"][:, 0, :, None, None].expand(6, 3, 64, 64))
    for i in range(6):
        assert not torch.equal(clutter[i], solid[i])
        # Several distinct regions: many colours after quantising to 1/16.
        colours = (clutter[i] * 16).round().view(3, -1).T.unique(dim=0)
        assert len(colours) >= 4
        # Mostly not skin: the skin-like share (r > g > b, warm) stays small.
        r, g, b = clutter[i]
        skin_like = ((r > g + 0.05) & (g > b + 0.03) & (r > 0.35) & (r - b > 0.1) & (r - b < 0.5)).float().mean()
        assert skin_like < 0.5
    # Without the rasteriser's uniforms, clutter falls back to a gradient.
    gradient = backgrounds.background(torch.ones_like(kind), scene["bg_colors"], scene["bg_dir"], scene["bg_noise"],
                                      64)
    assert torch.equal(backgrounds.background(kind, scene["bg_colors"], scene["bg_dir"], scene["bg_noise"], 64),
                       gradient)


def test_nails_show_only_where_the_back_faces_the_camera():
    size = 96
    toward = make_scene(6, size, seed=3, bg_kind=0, facing=-1.0)
    away = make_scene(6, size, seed=3, bg_kind=0, facing=1.0)
    toward["palm_rank"].zero_()  # the palm behind every capsule: tips unoccluded by it
    away["palm_rank"].zero_()
    near_tip, elsewhere = _near_tips(toward, size)
    image_toward, mask_toward = raster.rasterize(toward, size)
    image_away, mask_away = raster.rasterize(away, size)
    assert torch.equal(mask_toward, mask_away)  # nails change colour, not coverage
    brighter = (image_toward - image_away).sum(1)  # (B, H, W)
    assert (brighter[near_tip] > 0.05).float().mean() > 0.2  # lighter near the tips
    assert (brighter[near_tip] >= -1e-6).all()
    assert torch.equal(image_toward[elsewhere[:, None].expand_as(image_toward)],
                       image_away[elsewhere[:, None].expand_as(image_away)])
    # No distal capsules, no nails.
    for scene in (toward, away):
        scene["caps_tip"] = torch.zeros_like(scene["caps_tip"])
    assert torch.equal(raster.rasterize(toward, size)[0], raster.rasterize(away, size)[0])
    assert torch.equal(raster.rasterize(away, size)[0], image_away)


def _near_tips(scene, size):
    """Pixels within two radii of a distal capsule's tip end, and pixels far from all of them."""
    tips = scene["caps"][scene["caps_tip"]].view(-1, 5, 6)
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dx = grid.view(1, 1, 1, size) - tips[..., 2, None, None]
    dy = grid.view(1, 1, size, 1) - tips[..., 3, None, None]
    dist = (dx * dx + dy * dy).sqrt() / tips[..., 5, None, None]
    return (dist < 1.0).any(1), (dist > 4.0).all(1)


def test_texture_changes_colour_not_coverage():
    scene = make_scene(6, 64, seed=4)
    other = dict(scene, rand=scene["rand"].clone())
    other["rand"][:, :2] = 1.0 - other["rand"][:, :2]  # another texture row and variant
    image, mask = raster.rasterize(scene, 64)
    image2, mask2 = raster.rasterize(other, 64)
    assert torch.equal(mask, mask2)
    skin = mask > 0.99
    assert not torch.equal(image[skin[:, None].expand_as(image)], image2[skin[:, None].expand_as(image2)])
    # Off the hand and arm, nothing changes.
    assert torch.equal(image[:, :, :4, :4], image2[:, :, :4, :4])


@pytest.mark.parametrize("size", [16, 256])
def test_any_size_draws(size):
    scene = make_scene(3, size, seed=5)
    image, mask = raster.rasterize(scene, size)
    assert image.shape == (3, 3, size, size) and mask.shape == (3, size, size)
    assert image.min() >= 0 and image.max() <= 1 and mask.max() > 0.99
    assert torch.isfinite(image).all()


def test_scenes_without_the_optional_keys_still_draw():
    scene = make_scene(4, 32, seed=6)
    for key in ("caps_dorsal", "caps_tip", "rand"):
        del scene[key]
    image, mask = raster.rasterize(scene, 32)
    assert image.shape == (4, 3, 32, 32) and image.min() >= 0 and image.max() <= 1
    assert torch.equal(raster.rasterize(pick(scene, [2]), 32)[0][0], image[2])
