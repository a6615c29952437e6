"""Pose conditioners: keypoint heatmaps and limb maps, SPADE (generator), concat (discriminator)."""
import math

import pytest
import torch
import torch.nn as nn

from handforge.data import KEYPOINT_PARENTS
from handforge.errors import HandforgeError
from handforge.plugin_manager import PluginHost, PluginInfo
from handforge.plugins.backbones.deep_conv import DeepConvConfig, build_deep_conv
from handforge.plugins.conditioners import pose
from handforge.plugins.conditioners.pose import (ConcatConditioner, PoseMapsConfig, PoseModulation, Spade,
                                                 SpadeConditioner, SpadeConfig)
from handforge.plugins.conditioners.pose_maps import heatmaps, limb_maps, make_maps, resize_maps
from handforge.plugins.losses.adversarial import Hinge
from handforge.plugins.tasks.gan import GanConfig
from gan_support import component, gan_run


pytestmark = pytest.mark.usefixtures("one_thread")


def random_keypoints(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keypoints = torch.rand(n, 21, 3, generator=generator)
    keypoints[..., 2] = 1.0
    return keypoints


def on_pixel_centres(pixels, size):
    """Keypoints (N, 21, 3), visible, at the centres of the given (N, 21, 2) integer (column, row) pixels."""
    keypoints = torch.ones(*pixels.shape[:2], 3)
    keypoints[..., :2] = (pixels.float() + 0.5) / size
    return keypoints


# -- heatmaps -----------------------------------------------------------------------------------


def test_heatmap_peaks_on_the_keypoints_pixel():
    size, keypoints = 32, random_keypoints(4)
    maps = heatmaps(keypoints, size, sigma=0.05)
    assert maps.shape == (4, 21, size, size)
    flat = maps.flatten(2).argmax(dim=2)
    # Pixel i covers [i, i + 1) / size of the image.
    expected = (keypoints[..., :2] * size).floor().long().clamp(max=size - 1)
    assert torch.equal(flat % size, expected[..., 0]) and torch.equal(flat // size, expected[..., 1])


def test_heatmap_is_one_on_a_pixel_centre():
    size = 16
    pixels = torch.randint(0, size, (3, 21, 2), generator=torch.Generator().manual_seed(1))
    maps = heatmaps(on_pixel_centres(pixels, size), size)
    n, k = torch.meshgrid(torch.arange(3), torch.arange(21), indexing="ij")
    peaks = maps[n, k, pixels[..., 1], pixels[..., 0]]
    torch.testing.assert_close(peaks, torch.ones(3, 21))
    assert maps.max() <= 1.0


@pytest.mark.parametrize("size, sigma", [(8, 0.1), (6, 0.25)])
def test_heatmaps_equal_the_per_pixel_formula(size, sigma):
    keypoints = random_keypoints(2, seed=3)
    keypoints[1, ::3, 2] = 0.0
    maps = heatmaps(keypoints, size, sigma)
    expected = torch.zeros(2, 21, size, size)
    for n in range(2):
        for k in range(21):
            x, y, visible = keypoints[n, k].tolist()
            for row in range(size):
                for col in range(size):
                    # In image units: the pixel centre against the keypoint, sd = sigma of the side.
                    d2 = ((col + 0.5) / size - x) ** 2 + ((row + 0.5) / size - y) ** 2
                    expected[n, k, row, col] = visible * math.exp(-d2 / (2 * sigma**2))
    torch.testing.assert_close(maps, expected)


def test_invisible_keypoints_give_zero_maps_even_with_nan_coordinates():
    keypoints = random_keypoints(2)
    keypoints[0, 4, 2] = 0.0
    keypoints[1, 0] = torch.tensor([float("nan"), float("nan"), 0.0])
    maps = make_maps(keypoints, 16, "both")
    assert torch.isfinite(maps).all()
    assert maps[0, 4].abs().max() == 0 and maps[1, 0].abs().max() == 0
    # Limb maps: bone of child 4 (thumb tip) and, for the wrist, the five bones leaving it.
    limbs = maps[:, 21:]
    assert limbs[0, 3].abs().max() == 0 and limbs[0, 2].abs().max() > 0.5  # thumb3-thumb4 off, thumb2-thumb3 on
    wrist_bones = [child - 1 for child, parent in enumerate(KEYPOINT_PARENTS) if parent == 0]
    assert limbs[1, wrist_bones].abs().max() == 0 and limbs[1, 1].abs().max() > 0.5


def test_maps_stay_on_the_keypoints_device():
    keypoints = torch.empty(64, 21, 3, device="meta")
    assert make_maps(keypoints, 64, "both").device.type == "meta"


def test_bad_keypoints_raise():
    with pytest.raises(HandforgeError, match=r"heatmaps.*\(N, 21, 3\)"):
        heatmaps(torch.zeros(2, 20, 3), 8)
    with pytest.raises(HandforgeError, match="kind"):
        make_maps(random_keypoints(1), 8, "skeleton")


# -- limb maps ----------------------------------------------------------------------------------


def test_limb_map_is_one_on_the_bone_and_zero_far_away():
    size = 32
    pixels = torch.full((1, 21, 2), 28)  # every joint in a far corner...
    pixels[0, 5] = torch.tensor([4, 10])  # ...except index1 at (x=4, y=10) and index2 at (x=12, y=10)
    pixels[0, 6] = torch.tensor([12, 10])
    maps = limb_maps(on_pixel_centres(pixels, size), size, width=0.03)
    bone = 5  # child 6 (index2) -> parent 5 (index1): bone index = child - 1
    assert maps.shape == (1, 20, size, size)
    assert maps[0, bone, 10, 8].item() == pytest.approx(1.0)  # midpoint, a pixel centre
    assert maps[0, bone, 10, 4].item() == pytest.approx(1.0) and maps[0, bone, 10, 12].item() == pytest.approx(1.0)
    # One pixel beside the bone: distance 1 px, sd 0.03 * 32 = 0.96 px.
    assert maps[0, bone, 11, 8].item() == pytest.approx(math.exp(-1 / (2 * 0.96**2)), rel=1e-5)
    # Past an end the distance is to that end: 2 px left of index1.
    assert maps[0, bone, 10, 2].item() == pytest.approx(math.exp(-4 / (2 * 0.96**2)), rel=1e-5)
    assert maps[0, bone, 24, 8] < 1e-30 and maps[0, bone, 10, 20] < 1e-12


def test_limb_maps_equal_a_sampled_distance_to_the_segment():
    size, width = 8, 0.15
    keypoints = random_keypoints(1, seed=5)
    keypoints[0, 7, :2] = keypoints[0, 6, :2]  # one zero-length bone: a blob on its point
    keypoints[0, 11, 2] = 0.0
    maps = limb_maps(keypoints, size, width)
    along = torch.linspace(0, 1, 2001)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.stack([(cols + 0.5) / size, (rows + 0.5) / size], dim=-1)  # (size, size, 2), image units
    for bone, (child, parent) in enumerate((c, p) for c, p in enumerate(KEYPOINT_PARENTS) if p >= 0):
        a, b = keypoints[0, parent, :2], keypoints[0, child, :2]
        points = a + along[:, None] * (b - a)  # 2001 points on the segment
        d2 = ((centres[:, :, None, :] - points) ** 2).sum(-1).min(dim=-1).values
        visible = keypoints[0, parent, 2] * keypoints[0, child, 2]
        torch.testing.assert_close(maps[0, bone], visible * torch.exp(-d2 / (2 * width**2)), atol=2e-3, rtol=0)
    assert maps[0, 10].abs().max() == 0 and maps[0, 11].abs().max() == 0  # both bones touching joint 11


# -- resizing -----------------------------------------------------------------------------------


def test_resize_maps_downsamples_with_a_triangle_filter():
    maps = torch.zeros(1, 1, 16, 16)
    maps[0, 0, 6, 7] = 1.0
    small = resize_maps(maps, (8, 8))
    # Halving: each output pixel averages 4 inputs per axis with weights (1, 3, 3, 1) / 8.
    # Input 7 contributes 3/8 to outputs 3 and 1/8 to output 4; input 6 3/8 to 3 and 1/8 to 2.
    assert small[0, 0, 3, 3].item() == pytest.approx(3 / 8 * 3 / 8)
    assert small[0, 0, 3, 4].item() == pytest.approx(3 / 8 * 1 / 8)
    assert small[0, 0, 2, 3].item() == pytest.approx(1 / 8 * 3 / 8)
    assert small.sum().item() == pytest.approx(0.25)  # mass / 4: the mean is kept
    assert resize_maps(maps, (16, 16)) is maps
    assert resize_maps(small, (16, 16)).shape == (1, 1, 16, 16)


# -- spade --------------------------------------------------------------------------------------


def spade_conditioner(**options):
    return SpadeConditioner(SpadeConfig(**options), role="generator", n_classes=0, image_size=16)


def perturb(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return module


def test_spade_at_init_is_batchnorm():
    torch.manual_seed(0)
    conditioner = spade_conditioner(maps="both", hidden=8)
    layer = conditioner.norm(6)
    plain, affine = nn.BatchNorm2d(6, affine=False), nn.BatchNorm2d(6)
    assert torch.equal(affine.weight, torch.ones(6)) and torch.equal(affine.bias, torch.zeros(6))
    cond = conditioner.condition({"keypoints": random_keypoints(4)})
    assert cond.shape == (4, 41, 16, 16)
    for _ in range(2):  # train mode, twice: running statistics follow the same way
        x = torch.randn(4, 6, 8, 8) * 3 + 1
        out = layer(x, cond)
        torch.testing.assert_close(out, plain(x))
        torch.testing.assert_close(out, affine(x))
    layer.eval(), plain.eval()
    x = torch.randn(4, 6, 8, 8)
    torch.testing.assert_close(layer(x, cond), plain(x))


@pytest.mark.parametrize("layer_cls", [Spade, PoseModulation])
def test_spade_by_hand(layer_cls):
    """SPADE, and its modulation alone (the denoiser's layer): the same gamma and beta, on x
    batch-normalised or on x itself."""
    torch.manual_seed(1)
    layer = perturb(layer_cls(3, 21, hidden=4, kernel=1))
    cond = heatmaps(random_keypoints(2), 8)
    x = torch.randn(2, 3, 4, 4)
    m = nn.functional.interpolate(cond, size=(4, 4), mode="bilinear", antialias=True)
    h = torch.relu(torch.einsum("nkhw,ck->nchw", m, layer.shared.weight[:, :, 0, 0])
                   + layer.shared.bias[:, None, None])
    gamma = torch.einsum("nkhw,ck->nchw", h, layer.gamma.weight[:, :, 0, 0]) + layer.gamma.bias[:, None, None]
    beta = torch.einsum("nkhw,ck->nchw", h, layer.beta.weight[:, :, 0, 0]) + layer.beta.bias[:, None, None]
    mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    normalised = (x - mean) / torch.sqrt(var + 1e-5) if layer_cls is Spade else x
    expected = normalised * (1 + gamma) + beta
    torch.testing.assert_close(layer(x, cond), expected, rtol=1e-4, atol=1e-5)


def test_spade_sample_depends_on_its_own_keypoints_only_in_eval():
    conditioner = spade_conditioner(maps="both", hidden=8, kernel=3)
    layer = perturb(conditioner.norm(5))
    layer(torch.randn(8, 5, 8, 8) * 2, conditioner.condition({"keypoints": random_keypoints(8)}))  # running stats
    layer.eval()
    x, keypoints = torch.randn(4, 5, 8, 8), random_keypoints(4, seed=1)
    moved = keypoints.clone()
    moved[2, :, :2] = 1 - moved[2, :, :2]  # sample 2 takes another pose
    a = layer(x, conditioner.condition({"keypoints": keypoints}))
    b = layer(x, conditioner.condition({"keypoints": moved}))
    torch.testing.assert_close(a[[0, 1, 3]], b[[0, 1, 3]])
    assert not torch.allclose(a[2], b[2])


def test_spade_config_and_layer_shapes():
    conditioner = spade_conditioner(maps="limbs", hidden=7, kernel=5)
    layer = conditioner.norm(12)
    assert conditioner.spatial and conditioner.fields == ("keypoints",) and conditioner.latent_dim == 0
    assert layer.shared.weight.shape == (7, 20, 5, 5) and layer.gamma.weight.shape == (12, 7, 5, 5)
    assert SpadeConditioner(None, role="generator", image_size=8).config == SpadeConfig()
    assert SpadeConfig() == SpadeConfig(maps="heatmaps", sigma=0.03, limb_width=0.02, hidden=64, kernel=3)
    for bad in (dict(kernel=4), dict(kernel=0), dict(hidden=0), dict(sigma=0.0), dict(maps="skeleton")):
        with pytest.raises(ValueError):
            SpadeConfig(**bad)
    with pytest.raises(HandforgeError, match=r"'spade'.*\(N, 20, H, W\)"):
        layer(torch.randn(2, 12, 4, 4), torch.zeros(2, 21, 16, 16))


# -- concat -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, channels", [("heatmaps", 21), ("limbs", 20), ("both", 41)])
def test_concat_merges_the_maps_as_channels(kind, channels):
    conditioner = ConcatConditioner(PoseMapsConfig(maps=kind, sigma=0.05), role="discriminator", image_size=16)
    assert conditioner.input_channels == channels and conditioner.spatial
    keypoints = random_keypoints(3)
    cond = conditioner.condition({"keypoints": keypoints, "image": torch.zeros(3, 3, 16, 16)})
    torch.testing.assert_close(cond, make_maps(keypoints, 16, kind, 0.05, 0.02))
    x = torch.randn(3, 3, 16, 16)
    merged = conditioner.merge_input(x, cond)
    assert merged.shape == (3, 3 + channels, 16, 16)
    assert torch.equal(merged[:, :3], x) and torch.equal(merged[:, 3:], cond)
    half = conditioner.merge_input(x[..., ::2, ::2], cond)  # a D that sees a smaller image
    assert half.shape == (3, 3 + channels, 8, 8)
    torch.testing.assert_close(half[:, 3:], resize_maps(cond, (8, 8)))
    head = conditioner.head(5)
    torch.testing.assert_close(head(torch.ones(2, 5), cond), head.linear(torch.ones(2, 5)).squeeze(1))


def test_concat_rejects_mismatched_maps():
    conditioner = ConcatConditioner(None, role="discriminator", image_size=16)
    with pytest.raises(HandforgeError, match=r"'concat'.*\(2, 21, H, W\)"):
        conditioner.merge_input(torch.zeros(2, 3, 16, 16), torch.zeros(2, 20, 16, 16))


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, name, role", [(SpadeConditioner, "spade", "discriminator"),
                                              (ConcatConditioner, "concat", "generator")])
def test_pose_conditioner_on_the_wrong_side_raises(cls, name, role):
    with pytest.raises(HandforgeError, match=rf"'{name}'.*{role}"):
        cls(None, role=role, n_classes=0, image_size=16)


def test_pose_conditioner_needs_keypoints_of_the_right_shape_and_an_image_size():
    conditioner = spade_conditioner()
    with pytest.raises(HandforgeError, match="'spade'.*keypoints"):
        conditioner.condition({"image": torch.zeros(2, 3, 16, 16)})
    with pytest.raises(HandforgeError, match=r"'spade'.*keypoints.*\(N, 21, 3\)"):
        conditioner.condition({"keypoints": torch.zeros(2, 42)})
    with pytest.raises(HandforgeError, match="'concat'.*image size"):
        ConcatConditioner(None, role="discriminator")


def test_pose_conditioners_register_like_plugins():
    host = PluginHost()
    host._add(pose, PluginInfo(pose.__name__, "builtin", "handforge", "0"), fatal=True)
    registry = host.registry("conditioner")
    assert registry.names() == ["concat", "spade"]
    assert registry.get("spade").config_cls is SpadeConfig and registry.get("concat").config_cls is PoseMapsConfig
    assert all(registry.get(name).fields_needed(None) == {"keypoints"} for name in ("spade", "concat"))
    assert all(entry.summary for entry in registry)


# -- in the gan task ----------------------------------------------------------------------------


class TinyPoses(torch.utils.data.Dataset):
    """Random images with random visible keypoints: enough to drive the task."""

    def __init__(self, n=32, size=16):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=generator) * 2 - 1
        self.keypoints = torch.rand(n, 21, 3, generator=generator)
        self.keypoints[..., 2] = (self.keypoints[..., 2] > 0.1).float()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "keypoints": self.keypoints[i]}


def make_pose_run(gan_config):
    dataset, backbone = TinyPoses(), DeepConvConfig(ch=4, z_dim=8)
    components = {
        "generator": component("backbone", "deep_conv", build_deep_conv, backbone),
        "discriminator": component("backbone", "deep_conv", build_deep_conv, backbone),
        "g_conditioner": component("conditioner", "spade", SpadeConditioner, SpadeConfig(maps="both", hidden=8)),
        "d_conditioner": component("conditioner", "concat", ConcatConditioner, PoseMapsConfig(maps="both")),
        "loss": component("loss", "hinge", Hinge),
    }
    task, _, batches = gan_run(components, dataset, gan_config)
    return task, batches


def test_gan_trains_with_spade_and_concat_and_samples_the_batch_poses():
    torch.manual_seed(0)
    task, batches = make_pose_run(GanConfig(sample_count=6, ema_decay=0.5))
    G, D = task.export_modules()["generator"], task.export_modules()["discriminator"]
    assert D.from_rgb.weight.shape[1] == 3 + 41 and all(isinstance(norm, Spade) for norm in G.norms)

    def spade_weights(part):
        return [getattr(norm, part).weight.detach().clone() for norm in G.norms]

    before = {part: spade_weights(part) for part in ("shared", "gamma", "beta")}
    logs = task.train_step(next(batches), step=0)
    assert all(torch.isfinite(t) for t in logs.values())
    # Gradients reach gamma and beta at once. The shared conv feeds zero-initialised convs,
    # so it first gets a gradient on the second step.
    for part in ("gamma", "beta"):
        assert all(not torch.equal(a, b) for a, b in zip(before[part], spade_weights(part)))
    assert all(torch.equal(a, b) for a, b in zip(before["shared"], spade_weights("shared")))
    logs = task.train_step(next(batches), step=1)
    assert all(torch.isfinite(t) for t in logs.values())
    assert all(not torch.equal(a, b) for a, b in zip(before["shared"], spade_weights("shared")))

    batch = next(batches)
    images = task.sample(batch)["image"]
    assert images.shape == (6, 3, 16, 16) and torch.isfinite(images).all() and images.abs().max() <= 1
    other = dict(batch, keypoints=batch["keypoints"].flip(0))  # same noise, other poses
    assert not torch.allclose(task.sample(other)["image"], images)
    assert task.generate(batch).shape == (8, 3, 16, 16)
