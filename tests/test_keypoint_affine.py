"""The keypoint-preserving augmentation: keypoints stay on the pixels the image carries them to."""
import math

import pytest
import torch

from handforge.errors import HandforgeError
from handforge.plugin_manager import PluginHost, PluginInfo
from handforge.plugins.augmentations import keypoint_affine
from handforge.plugins.augmentations.keypoint_affine import KeypointAffine, KeypointAffineConfig, apply_affine
from handforge.recipe import structure

pytestmark = pytest.mark.usefixtures("one_thread")

# Dot centres in pixel indices (column, row), at least 14 px apart, well inside a 64 x 80 image.
DOT_PIXELS = [(40, 32), (26, 20), (54, 22), (30, 44), (50, 44)]
HEIGHT, WIDTH = 64, 80


def dot_batch(n: int) -> dict:
    """Black images with a white 3x3 square centred on each keypoint (x = (column + 0.5) / W)."""
    images = -torch.ones(n, 3, HEIGHT, WIDTH)
    keypoints = torch.zeros(n, len(DOT_PIXELS), 3)
    for k, (col, row) in enumerate(DOT_PIXELS):
        images[:, :, row - 1:row + 2, col - 1:col + 2] = 1
        keypoints[:, k] = torch.tensor([(col + 0.5) / WIDTH, (row + 0.5) / HEIGHT, float(k % 2)])
    return {"image": images, "keypoints": keypoints}


def dot_centroids(images: torch.Tensor, near: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """(N, K, 2) brightness centroids, in pixels (pixel centres at index + 0.5), of the image
    content within ``radius`` px of each point of ``near`` (pixels). NaN where nothing is bright."""
    weight = images[:, 0] + 1  # black 0, dot 2
    ys = torch.arange(HEIGHT, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(WIDTH, dtype=torch.float32)[None, :] + 0.5
    out = torch.full(near.shape, math.nan)
    for i in range(near.shape[0]):
        for k in range(near.shape[1]):
            x0, y0 = near[i, k].tolist()
            window = ((xs - x0).abs() <= radius) & ((ys - y0).abs() <= radius)
            w = weight[i] * window
            out[i, k] = torch.stack([(w * xs).sum(), (w * ys).sum()]) / w.sum()
    return out


def to_pixels(keypoints: torch.Tensor) -> torch.Tensor:
    return keypoints[..., :2] * torch.tensor([WIDTH, HEIGHT])


def test_dots_land_on_moved_keypoints_with_per_sample_parameters():
    batch = dot_batch(5)
    flip = torch.tensor([False, True, False, True, False])
    angle = torch.tensor([0.0, 0.0, 25.0, -40.0, 90.0])
    scale = torch.tensor([1.0, 1.0, 1.2, 0.8, 1.1])
    tx = torch.tensor([0.1, 0.0, -0.05, 0.08, 0.0])
    ty = torch.tensor([-0.1, 0.0, 0.05, -0.06, 0.02])
    out = apply_affine(batch, flip, angle, scale, tx, ty)
    moved = to_pixels(out["keypoints"])
    found = dot_centroids(out["image"], moved)
    assert (found - moved).norm(dim=-1).max() < 0.5
    # Visibility and keypoint count stay; the input batch is not modified.
    assert torch.equal(out["keypoints"][..., 2], batch["keypoints"][..., 2])
    assert torch.equal(batch["image"], dot_batch(5)["image"])


def test_keypoint_matrix_matches_hand_computed_moves():
    """Independent of the image: a shift, a mirror and a clockwise quarter turn by hand."""
    kp = torch.tensor([[[0.75, 0.5, 1.0], [0.2, 0.9, 0.0]]])
    batch = {"image": torch.zeros(1, 3, 32, 32), "keypoints": kp}
    shifted = apply_affine(batch, False, 0.0, 1.0, 0.25, -0.1)["keypoints"]
    torch.testing.assert_close(shifted, torch.tensor([[[1.0, 0.4, 1.0], [0.45, 0.8, 0.0]]]))
    mirrored = apply_affine(batch, True, 0.0, 1.0, 0.0, 0.0)["keypoints"]
    torch.testing.assert_close(mirrored, torch.tensor([[[0.25, 0.5, 1.0], [0.8, 0.9, 0.0]]]))
    # Clockwise on screen (y down): right of the centre goes below it; (u, v) -> (-v, u) about 0.5.
    turned = apply_affine(batch, False, 90.0, 1.0, 0.0, 0.0)["keypoints"]
    torch.testing.assert_close(turned, torch.tensor([[[0.5, 0.75, 1.0], [0.1, 0.2, 0.0]]]))
    # Scale 2 about the centre doubles the offset from it.
    zoomed = apply_affine(batch, False, 0.0, 2.0, 0.0, 0.0)["keypoints"]
    torch.testing.assert_close(zoomed, torch.tensor([[[1.0, 0.5, 1.0], [-0.1, 1.3, 0.0]]]))


def test_quarter_turn_and_flip_match_torch():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 12, 12) * 2 - 1
    batch = {"image": images, "keypoints": torch.rand(2, 21, 3)}
    turned = apply_affine(batch, False, 90.0, 1.0, 0.0, 0.0)["image"]
    torch.testing.assert_close(turned, images.rot90(-1, (2, 3)))  # rot90(-1): clockwise on screen
    source = torch.rand(2, 3, 12, 16)
    torch.testing.assert_close(apply_affine({**batch, "image": source}, True, 0.0, 1.0, 0.0, 0.0)["image"],
                               source.flip(3))


def test_flip_mirrors_keeps_indices_and_swaps_handedness():
    batch = dot_batch(4)
    batch["handedness"] = torch.tensor([0, 1, 0, 1])
    batch["label"] = torch.tensor([3, 4, 5, 6])
    flip = torch.tensor([True, True, False, False])
    out = apply_affine(batch, flip, 0.0, 1.0, 0.0, 0.0)
    torch.testing.assert_close(out["image"][:2], batch["image"][:2].flip(3))
    expected = batch["keypoints"].clone()
    expected[:2, :, 0] = 1 - expected[:2, :, 0]
    torch.testing.assert_close(out["keypoints"], expected)  # same joint order: index k is still joint k
    assert out["handedness"].tolist() == [1, 0, 0, 1]
    assert out["label"] is batch["label"]  # other fields pass through untouched
    assert batch["handedness"].tolist() == [0, 1, 0, 1]


def test_identity_parameters_return_the_input():
    torch.manual_seed(1)
    batch = {"image": torch.rand(3, 3, 20, 24) * 2 - 1, "keypoints": torch.rand(3, 21, 3)}
    for padding in ("black", "border", "reflection"):
        out = apply_affine(batch, False, 0.0, 1.0, 0.0, 0.0, brightness=1.0, contrast=1.0, saturation=1.0,
                           padding=padding)
        torch.testing.assert_close(out["image"], batch["image"], atol=1e-5, rtol=0)
        torch.testing.assert_close(out["keypoints"], batch["keypoints"])


def test_padding_modes():
    ramp = torch.arange(8, dtype=torch.float32).div(7).mul(2).sub(1)  # -1 .. 1 across the columns
    images = ramp.expand(1, 3, 8, 8).clone()
    batch = {"image": images, "keypoints": torch.zeros(1, 21, 3)}
    shift = 3 / 8  # content moves 3 px right; 3 columns come in from the left
    black = apply_affine(batch, False, 0.0, 1.0, shift, 0.0, padding="black")["image"]
    assert torch.equal(black[..., :3], -torch.ones(1, 3, 8, 3))
    torch.testing.assert_close(black[..., 3:], images[..., :5])
    border = apply_affine(batch, False, 0.0, 1.0, shift, 0.0, padding="border")["image"]
    torch.testing.assert_close(border[..., :3], images[..., :1].expand(1, 3, 8, 3))
    reflection = apply_affine(batch, False, 0.0, 1.0, shift, 0.0, padding="reflection")["image"]
    torch.testing.assert_close(reflection[..., :3], images[..., :3].flip(3))


def test_colour_jitter_matches_torchvision_style_reference():
    torch.manual_seed(2)
    images = torch.rand(2, 3, 6, 6) * 0.5 - 0.25  # stays inside [-1, 1]: no clipping
    b, c, s = torch.tensor([1.2, 0.9]), torch.tensor([0.8, 1.1]), torch.tensor([1.15, 0.7])
    batch = {"image": images, "keypoints": torch.rand(2, 21, 3)}
    out = apply_affine(batch, False, 0.0, 1.0, 0.0, 0.0, brightness=b, contrast=c, saturation=s)
    # Sequentially in [0, 1], as torchvision: brightness blends with black, contrast with the
    # image's mean grey, saturation with each pixel's grey (here the channel mean).
    x = (images.double() + 1) / 2
    x = x * b.double()[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c.double()[:, None, None, None] + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * s.double()[:, None, None, None] + grey
    torch.testing.assert_close(out["image"].double(), x * 2 - 1, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["keypoints"], batch["keypoints"])
    # Strong brightening clips to 1.
    bright = apply_affine(batch, False, 0.0, 1.0, 0.0, 0.0, brightness=20.0)["image"]
    assert bright.max() == 1 and bright.min() >= -1


def test_random_module_keeps_dots_on_keypoints_and_is_seeded():
    module = KeypointAffine(KeypointAffineConfig(color=0.0, rotate=45.0, scale=[0.8, 1.2], translate=0.08))
    batch = dot_batch(6)
    out = module(batch, generator=torch.Generator().manual_seed(3))
    moved = to_pixels(out["keypoints"])
    assert (dot_centroids(out["image"], moved) - moved).norm(dim=-1).max() < 0.5
    again = module(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out["image"], again["image"]) and torch.equal(out["keypoints"], again["keypoints"])
    other = module(batch, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(out["keypoints"], other["keypoints"])
    torch.manual_seed(5)  # without a generator: the global one, which the run loop seeds
    first = KeypointAffine()(batch)
    torch.manual_seed(5)
    assert torch.equal(first["image"], KeypointAffine()(batch)["image"])


def test_random_draws_respect_the_options():
    config = KeypointAffineConfig(flip=0.5, rotate=20.0, scale=[0.9, 1.1], translate=0.05, color=0.3, p=0.5)
    params = KeypointAffine(config).draw(4000, generator=torch.Generator().manual_seed(6))
    assert abs(params["flip"].float().mean() - 0.5) < 0.05
    assert params["angle"].abs().max() <= 20 and abs((params["angle"] == 0).float().mean() - 0.5) < 0.05
    assert params["scale"].min() >= 0.9 and params["scale"].max() <= 1.1
    assert params["tx"].abs().max() <= 0.05 and params["ty"].abs().max() <= 0.05
    for name in ("brightness", "contrast", "saturation"):
        assert (params[name] - 1).abs().max() <= 0.3
    none = KeypointAffine(KeypointAffineConfig(flip=0.0, color=0.0, p=0.0)).draw(50)
    assert not none["flip"].any() and (none["angle"] == 0).all() and (none["scale"] == 1).all()
    assert "brightness" not in none


def test_handedness_flips_in_the_random_module():
    batch = dot_batch(200)
    batch["handedness"] = torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(7))
    module = KeypointAffine(KeypointAffineConfig(rotate=0.0, scale=[1.0, 1.0], translate=0.0, color=0.0))
    out = module(batch, generator=torch.Generator().manual_seed(8))
    mirrored = out["keypoints"][:, 0, 0] < 0.5  # dot 0 sits right of the centre: left only after a mirror
    assert 0 < mirrored.sum() < 200
    assert torch.equal(out["handedness"], torch.where(mirrored, 1 - batch["handedness"], batch["handedness"]))


def test_channels_last_input_gives_the_same_values_and_layout():
    batch = dot_batch(3)
    module = KeypointAffine()
    plain = module(batch, generator=torch.Generator().manual_seed(9))
    cl = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}
    out = module(cl, generator=torch.Generator().manual_seed(9))
    assert out["image"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out["image"], plain["image"])
    torch.testing.assert_close(out["keypoints"], plain["keypoints"])


def test_bad_input_and_options_are_named():
    with pytest.raises(HandforgeError, match=r"keypoint_affine.*no field 'keypoints'.*image"):
        KeypointAffine()({"image": torch.zeros(1, 3, 8, 8)})
    with pytest.raises(HandforgeError, match=r"keypoint_affine.*\(1, 21\)"):
        KeypointAffine()({"image": torch.zeros(1, 3, 8, 8), "keypoints": torch.zeros(1, 21)})
    with pytest.raises(HandforgeError, match="padding must be one of"):
        apply_affine(dot_batch(1), False, 0.0, 1.0, 0.0, 0.0, padding="zeros")
    problems = []
    structure({"scale": [1.2, 0.8], "padding": "mirror"}, KeypointAffineConfig, "model.augment", problems)
    assert any(p.startswith("model.augment.scale: expected [min, max]") for p in problems), problems
    assert any(p.startswith("model.augment.padding:") for p in problems), problems


def test_registration():
    host = PluginHost()
    host._add(keypoint_affine, PluginInfo("keypoint_affine", "builtin", "handforge", "0"), fatal=True)
    entry = host.registry("augmentation").get("keypoint_affine")
    assert entry.config_cls is KeypointAffineConfig and entry.fields_needed(None) == {"image", "keypoints"}
    module = entry.factory(KeypointAffineConfig(), image_size=64)
    assert module.config.padding == "black" and module.config.scale == [0.8, 1.2]
