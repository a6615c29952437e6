"""Discriminator augmentations: DiffAugment (diffaug) and adaptive augmentation (ada).

Expectations come from the papers' formulas recomputed here, from invariants (what a transform
must keep), from torch's own flip/rot90, and from images whose pixels encode their coordinates.
"""
import math

import pytest
import torch

from handforge.errors import HandforgeError
from handforge.plugin_manager import PluginHost, PluginInfo
from handforge.plugins.augmentations import ada, diffaug
from handforge.plugins.augmentations import geometry as g
from handforge.plugins.augmentations.ada import AdaConfig, AdaptiveAugment
from handforge.plugins.augmentations.diffaug import DiffAugConfig, DiffAugment
from handforge.recipe import structure


pytestmark = pytest.mark.usefixtures("one_thread")


def coordinate_batch(n, size):
    """Images whose channels are x + 1, y + 1 and 1 (so 0 marks padding); maps hold y + 1, x + 1."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    images = torch.stack([xs + 1, ys + 1, torch.ones(size, size)]).expand(n, 3, size, size).clone()
    maps = torch.stack([ys + 1, xs + 1]).expand(n, 2, size, size).clone()
    return images, maps


def recovered_shift(x_plus_1, y_plus_1):
    """(dy, dx) of one translated coordinate image; asserts the shift is the same at every pixel."""
    size = x_plus_1.shape[-1]
    valid = x_plus_1 > 0
    ys, xs = torch.nonzero(valid, as_tuple=True)
    dx = (xs + 1 - x_plus_1[valid]).unique()
    dy = (ys + 1 - y_plus_1[valid]).unique()
    assert len(dx) == 1 and len(dy) == 1, "not one rigid shift"
    dy, dx = int(dy), int(dx)
    # Exactly the pixels whose source lies outside the image came in as zeros.
    rows, cols = torch.arange(size)[:, None] - dy, torch.arange(size)[None, :] - dx
    expected_valid = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    assert torch.equal(valid, expected_valid)
    return dy, dx


# -- diffaug ------------------------------------------------------------------------------------


def test_diffaug_registration_and_defaults():
    host = PluginHost()
    host._add(diffaug, PluginInfo("diffaug", "builtin", "handforge", "0"), fatal=True)
    host._add(ada, PluginInfo("ada", "builtin", "handforge", "0"), fatal=True)
    entry = host.registry("augmentation").get("diffaug")
    assert entry.config_cls is DiffAugConfig and entry.summary.startswith("DiffAugment")
    module = entry.factory(None, image_size=32)
    assert module.config.policy == ["color", "translation", "cutout"]
    assert (module.config.translation_ratio, module.config.cutout_ratio) == (0.125, 0.5)
    entry = host.registry("augmentation").get("ada")
    assert entry.config_cls is AdaConfig and entry.summary.startswith("Adaptive discriminator augmentation")
    assert entry.factory(None, image_size=32).log() == {"ada_p": 0.0, "ada_rt": 0.0}


def test_diffaug_unknown_policy_is_named():
    with pytest.raises(HandforgeError, match=r"'colour'.*did you mean 'color'.*color, translation, cutout"):
        DiffAugConfig(policy=["translation", "colour"])
    config = DiffAugConfig()
    config.policy.append("zoom")  # changed after validation: the factory checks again
    with pytest.raises(HandforgeError, match="'zoom'"):
        DiffAugment(config, image_size=32)
    # From a recipe: a located problem, like any other option.
    problems = []
    assert structure({"policy": ["colour"], "cutout_ratio": 0.25}, DiffAugConfig, "model.augment", problems) is None
    assert len(problems) == 1 and problems[0].startswith("model.augment.policy: unknown diffaug policy 'colour'")


def test_diffaug_translation_moves_images_and_maps_alike():
    torch.manual_seed(0)
    images, maps = coordinate_batch(64, 16)
    out, out_maps = DiffAugment(DiffAugConfig(policy=["translation"], translation_ratio=0.25))(images, maps)
    shifts = []
    for i in range(64):
        dy, dx = recovered_shift(out[i, 0], out[i, 1])
        assert recovered_shift(out_maps[i, 1], out_maps[i, 0]) == (dy, dx)
        assert torch.equal(out[i, 2] > 0, out_maps[i, 0] > 0)
        assert (out[i][:, out[i, 2] == 0] == 0).all() and (out_maps[i][:, out_maps[i, 0] == 0] == 0).all()
        shifts.append((dy, dx))
    dys, dxs = zip(*shifts)
    # Up to round(0.25 * 16) = 4 pixels, drawn per sample: all extremes show up in 64 draws.
    assert min(dys) == min(dxs) == -4 and max(dys) == max(dxs) == 4
    assert len(set(shifts)) > 20


def test_diffaug_color_matches_the_paper_formulas():
    torch.manual_seed(3)
    x = torch.rand(5, 3, 6, 6) * 2 - 1
    torch.manual_seed(11)
    out = DiffAugment(DiffAugConfig(policy=["color"]))(x)
    torch.manual_seed(11)  # the same draws, in the order brightness, saturation, contrast
    b, s, c = (torch.rand(5, 1, 1, 1) for _ in range(3))
    y = x + (b - 0.5)
    y = y.mean(1, keepdim=True) + (y - y.mean(1, keepdim=True)) * (2 * s)
    y = y.mean((1, 2, 3), keepdim=True) + (y - y.mean((1, 2, 3), keepdim=True)) * (c + 0.5)
    torch.testing.assert_close(out, y)


def per_image_ratio(numerator, denominator):
    """The one factor k with numerator = k * denominator in each image (asserted), shape (N,)."""
    k = (numerator * denominator).sum((1, 2, 3)) / (denominator ** 2).sum((1, 2, 3))
    torch.testing.assert_close(numerator, k[:, None, None, None] * denominator, atol=1e-5, rtol=1e-5)
    return k


def test_diffaug_color_invariants():
    torch.manual_seed(4)
    x = torch.rand(200, 3, 5, 5) * 2 - 1
    added = (diffaug.brightness(x) - x).flatten(1)
    assert torch.allclose(added, added[:, :1].expand_as(added), atol=1e-6)  # one offset per image
    assert added.min() >= -0.5 and added.max() <= 0.5 and added[:, 0].std() > 0.2  # U(-0.5, 0.5)

    out, mean = diffaug.saturation(x), x.mean(1, keepdim=True)
    torch.testing.assert_close(out.mean(1, keepdim=True), mean)  # grey level of each pixel kept
    k = per_image_ratio(out - out.mean(1, keepdim=True), x - mean)
    assert k.min() >= 0 and k.max() <= 2 and k.max() > 1.8 and k.min() < 0.2

    out, mean = diffaug.contrast(x), x.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(out.mean((1, 2, 3), keepdim=True), mean)  # image mean kept
    k = per_image_ratio(out - mean, x - mean)
    assert k.min() >= 0.5 and k.max() <= 1.5 and k.max() > 1.4 and k.min() < 0.6


# Whole squares: the centre is uniform over the 16 pixels (17 positions for an even side, as in the
# official code), and the square fits when it is at least side // 2 from each border.
@pytest.mark.parametrize("ratio, side, whole_fraction", [(0.5, 8, (9 / 17) ** 2), (0.3, 5, (12 / 16) ** 2)])
def test_diffaug_cutout_zeroes_one_square(ratio, side, whole_fraction):
    torch.manual_seed(5)
    x = torch.rand(300, 3, 16, 16) + 0.5
    out = DiffAugment(DiffAugConfig(policy=["cutout"], cutout_ratio=ratio))(x)
    zero = (out == 0).all(1)
    assert torch.equal((out == 0).any(1), zero)  # all channels or none
    assert torch.equal(out[~zero[:, None].expand_as(x)], x[~zero[:, None].expand_as(x)])  # the rest untouched
    whole = 0
    for mask in zero:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert torch.equal(mask, mask.any(1)[:, None] & mask.any(0)[None, :])  # one rectangle
        for index in (rows, cols):
            assert torch.equal(index, torch.arange(index[0], index[-1] + 1))  # contiguous
            # the square of the given side, clipped only where it meets the border (centre inside)
            touches = index[0] == 0 or index[-1] == 15
            assert len(index) == side if not touches else side // 2 <= len(index) <= side
        whole += len(rows) == len(cols) == side
    assert whole / 300 == pytest.approx(whole_fraction, abs=0.08)


def test_diffaug_maps_get_translation_only():
    torch.manual_seed(6)
    images, maps = coordinate_batch(16, 12)
    same = DiffAugment(DiffAugConfig(policy=["color", "cutout"]))(images, maps)[1]
    assert same is maps
    out, out_maps = DiffAugment(DiffAugConfig())(images.clone(), maps)
    for i in range(16):  # integer ramps, intact: no colour, no hole from cutout
        recovered_shift(out_maps[i, 1], out_maps[i, 0])
    assert not torch.equal(out[:, 2] > 0, out_maps[:, 0] > 0)  # while the images did get cut out


def test_diffaug_is_differentiable():
    torch.manual_seed(7)
    images, maps = torch.rand(8, 3, 16, 16, requires_grad=True), torch.rand(8, 2, 16, 16, requires_grad=True)
    out, out_maps = DiffAugment(DiffAugConfig())(images, maps)
    (out.square().sum() + out_maps.sum()).backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # A translated map pixel carries gradient 1 back to its source: the grad counts the kept pixels.
    assert maps.grad.sum() == (out_maps != 0).sum() and set(maps.grad.unique().tolist()) <= {0.0, 1.0}


def test_diffaug_rejects_misaligned_maps():
    with pytest.raises(HandforgeError, match="diffaug.*not aligned"):
        DiffAugment()(torch.zeros(2, 3, 16, 16), torch.zeros(2, 21, 8, 8))


# -- geometry and colour matrices -----------------------------------------------------------------


def test_warp_matches_torch_flip_rot90_and_shift():
    torch.manual_seed(8)
    x = torch.rand(2, 3, 8, 8)
    one = torch.ones(2)
    torch.testing.assert_close(g.warp(x, g.scale2d(-one, 1)), x.flip(3))
    torch.testing.assert_close(g.warp(x, g.rotate2d(one * math.pi / 2)), x.rot90(1, (2, 3)))
    torch.testing.assert_close(g.warp(x, g.rotate2d(one * math.pi)), x.flip(2, 3))
    # Content moved 3 px right; the 3 columns that come in are the mirrored edge.
    expected = torch.cat([x[..., :3].flip(3), x[..., :-3]], 3)
    torch.testing.assert_close(g.warp(x, g.translate2d(-3 * one, 0)), expected)
    # Maps at half the images' resolution: a 4 px shift of the 16 px frame is 2 of their pixels.
    frame_shift = g.warp(x, g.translate2d(-4 * one, 2 * one), frame=(16, 16))
    torch.testing.assert_close(frame_shift, g.warp(x, g.translate2d(-2 * one, one)))


def test_colour_matrices():
    torch.manual_seed(9)
    x = torch.rand(4, 3, 5, 5) * 2 - 1
    # A 120 degree turn about the grey axis cycles the channels.
    torch.testing.assert_close(g.recolour(x, g.hue3d(torch.full((4,), 2 * math.pi / 3))), x[:, [2, 0, 1]])
    s = torch.tensor([0.0, 0.5, 1.0, 2.0])
    mean = x.mean(1, keepdim=True)
    torch.testing.assert_close(g.recolour(x, g.saturation3d(s)), mean + (x - mean) * s[:, None, None, None])
    b, c = torch.tensor([0.1, -0.2, 0.0, 0.3]), torch.tensor([1.0, 2.0, 0.5, 1.5])
    torch.testing.assert_close(g.recolour(x, g.scale3d(c) @ g.translate3d(b)),
                               (x + b[:, None, None, None]) * c[:, None, None, None])


# -- ada ----------------------------------------------------------------------------------------


def make_ada(**options):
    return AdaptiveAugment(AdaConfig(**options), image_size=16)


def test_ada_p_zero_is_the_identity():
    module = make_ada()
    images, maps = torch.rand(4, 3, 16, 16), torch.rand(4, 5, 16, 16)
    assert module(images) is images
    out, out_maps = module(images, maps)
    assert out is images and out_maps is maps


def test_ada_p_follows_the_sign_of_real_logits():
    module = make_ada(interval=2, speed_images=1000)
    module.observe(torch.ones(8))
    assert module.log() == {"ada_p": 0.0, "ada_rt": 0.0}  # no update before `interval` calls
    module.observe(torch.full((8, 1), 3.0))
    assert module.log() == {"ada_p": pytest.approx(16 / 1000), "ada_rt": 1.0}  # r_t = 1 > 0.6: up by 16 images
    assert float(module.p) == pytest.approx(0.016)
    for _ in range(4):
        module.observe(torch.ones(8))
    assert module.log()["ada_p"] == pytest.approx(48 / 1000)
    module.observe(-torch.ones(10))
    module.observe(-torch.ones(10))  # r_t = -1: down by 20 images
    assert module.log() == {"ada_p": pytest.approx(28 / 1000), "ada_rt": -1.0}
    for _ in range(4):
        module.observe(-torch.ones(10))
    assert module.log()["ada_p"] == 0.0  # clamped at 0


def test_ada_compares_r_t_with_the_target():
    module = make_ada(p_init=0.5, interval=1, speed_images=100)
    module.observe(torch.tensor([2.0, 1.0, 0.5, 3.0, -1.0]))  # r_t = 0.6 = target: p stays
    assert module.log() == {"ada_p": 0.5, "ada_rt": pytest.approx(0.6)}
    module.observe(torch.tensor([2.0, 1.0, 0.5, -1.0]))  # r_t = 0.5 < 0.6: down by 4 / 100
    assert module.log()["ada_p"] == pytest.approx(0.46)
    module = make_ada(interval=1, speed_images=10, max_p=0.3)
    module.observe(torch.ones(64))
    assert module.log()["ada_p"] == 0.3


def test_ada_p_is_saved_state():
    module = make_ada(interval=1, speed_images=100)
    module.observe(torch.ones(25))
    state = module.state_dict()
    assert list(state) == ["p"] and float(state["p"]) == pytest.approx(0.25)
    fresh = make_ada()
    x = torch.rand(2, 3, 16, 16)
    assert fresh(x) is x
    fresh.load_state_dict(state)
    assert fresh.log()["ada_p"] == pytest.approx(0.25) and fresh(x) is not x


def test_ada_options_are_validated():
    for bad in ({"p_init": 1.5}, {"target": -0.1}, {"speed_images": 0}, {"interval": 0}, {"pipeline": "bgcfnc"},
                {"p_init": 0.5, "max_p": 0.4}):
        with pytest.raises((ValueError, TypeError)):
            AdaConfig(**bad)


def test_ada_moves_maps_with_the_images():
    torch.manual_seed(10)
    images = torch.rand(32, 3, 16, 16)
    out, maps = make_ada(p_init=1.0, pipeline="bg")(images, images.clone())
    torch.testing.assert_close(out, maps, rtol=0, atol=0)
    assert (out - images).abs().flatten(1).amax(1).min() > 0.05  # every sample moved at p = 1
    # Maps with other channels: coordinates carried along by the same matrix as the image.
    torch.manual_seed(11)
    grid, coords = coordinate_batch(8, 16)
    out, maps = make_ada(p_init=1.0, pipeline="bg")(grid, coords)
    torch.testing.assert_close(out[:, :2], maps.flip(1))


def test_ada_colour_only_touches_the_images():
    """bgc at p = 1: per sample, the image is an affine colour map of the (equally warped) map copy."""
    torch.manual_seed(12)
    images = torch.rand(16, 3, 16, 16) * 2 - 1
    out, maps = make_ada(p_init=1.0)(images, images.clone())
    assert not torch.allclose(out, maps)
    source = torch.cat([maps.flatten(2), torch.ones(16, 1, 256)], 1).transpose(1, 2).double()  # (N, HW, 4)
    target = out.flatten(2).transpose(1, 2).double()
    solution = torch.linalg.lstsq(source, target).solution  # (N, 4, 3)
    torch.testing.assert_close(source @ solution, target, atol=1e-4, rtol=1e-4)
    # Brightness, contrast, hue and saturation keep grey colours grey.
    linear = solution[:, :3, :].transpose(1, 2)
    grey = linear @ torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(grey, grey.mean(1, keepdim=True).expand(-1, 3), atol=1e-4, rtol=1e-4)


def test_ada_applies_each_transform_with_probability_p():
    torch.manual_seed(13)
    images = torch.rand(4000, 3, 2, 2) * 2 - 1
    out = make_ada(p_init=0.3, pipeline="color")(images)
    unchanged = (out - images).abs().flatten(1).amax(1) < 1e-6
    assert unchanged.float().mean().item() == pytest.approx(0.7 ** 4, abs=0.03)  # no colour transform drawn


def test_ada_is_differentiable_twice():
    """Gradients reach the input, and a penalty on them (R1 on un-augmented reals) can be backpropagated."""
    torch.manual_seed(14)
    images = torch.rand(4, 3, 16, 16, requires_grad=True)
    weights = torch.randn(4, 3, 16, 16)
    out = make_ada(p_init=1.0)(images)
    (grad,) = torch.autograd.grad((out.square() * weights).sum(), images, create_graph=True)
    assert grad.abs().sum() > 0
    grad.square().sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_ada_rejects_non_rgb_colour():
    with pytest.raises(HandforgeError, match="ada.*RGB"):
        make_ada(p_init=1.0)(torch.rand(2, 1, 8, 8))
