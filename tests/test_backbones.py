"""The resnet (SNGAN) and big_resnet (BigGAN) backbones, and cbn's BigGAN norm with a vector."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from handforge.errors import HandforgeError
from handforge.plugin_manager import PluginHost, PluginInfo
from handforge.plugins.backbones import big_resnet, resnet
from handforge.plugins.backbones.big_resnet import BigResNetConfig, SelfAttention, build_big_resnet
from handforge.plugins.backbones.resnet import DownBlock, OptimizedBlock, ResNetConfig, UpBlock, build_resnet
from handforge.plugins.conditioners import label
from handforge.plugins.conditioners.base import Conditioner
from handforge.plugins.conditioners.label import ClassBatchNorm, NoCondition, Projection, VectorBatchNorm
from handforge.plugins.losses.adversarial import Hinge
from handforge.plugins.tasks.gan import GanConfig
from gan_support import TinyHands, component, gan_run

BUILDERS = {"resnet": (build_resnet, ResNetConfig), "big_resnet": (build_big_resnet, BigResNetConfig)}


pytestmark = pytest.mark.usefixtures("one_thread")


def conditioners(conditional, n_classes=3):
    g = (ClassBatchNorm if conditional else NoCondition)(role="generator", n_classes=n_classes)
    d = (Projection if conditional else NoCondition)(role="discriminator", n_classes=n_classes)
    return g, d


def build_pair(name, size, conditional=True, n_classes=3, **options):
    build, config_cls = BUILDERS[name]
    config = config_cls(**{"ch": 4, "z_dim": 16, **options})
    g_cond, d_cond = conditioners(conditional, n_classes)
    G = build(config, role="generator", image_size=size, n_classes=n_classes, conditioner=g_cond)
    D = build(config, role="discriminator", image_size=size, n_classes=n_classes, conditioner=d_cond)
    return G, D


def count(module):
    return sum(p.numel() for p in module.parameters())


# -- shapes -------------------------------------------------------------------------------------


def check_shapes(name, size, conditional):
    torch.manual_seed(0)
    G, D = build_pair(name, size, conditional)
    y = torch.tensor([0, 2, 1]) if conditional else None
    x = G(torch.randn(3, G.z_dim), y)
    assert G.z_dim == 16 and x.shape == (3, 3, size, size)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
    logits = D(x, y)
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    blocks = int(math.log2(size // 4))
    assert len(G.blocks) == blocks
    assert len(D.blocks) == blocks + (name == "big_resnet")  # BigGAN's D ends with a block at 4x4


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("conditional", [False, True])
def test_shapes(name, size, conditional):
    check_shapes(name, size, conditional)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("size", [128, 256])
def test_shapes_large(name, size):
    check_shapes(name, size, conditional=True)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_discriminator_is_channels_last_friendly(name):
    torch.manual_seed(0)
    _, D = build_pair(name, 32, attention_resolution=16) if name == "big_resnet" else build_pair(name, 32)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    D.eval()  # in training, each forward takes a spectral-norm power-iteration step
    torch.testing.assert_close(D(x.contiguous(memory_format=torch.channels_last), y), D(x, y))


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("size, role", [(48, "generator"), (4, "discriminator"), (32, "classifier")])
def test_bad_size_or_role_raises(name, size, role):
    build, _ = BUILDERS[name]
    with pytest.raises(HandforgeError, match=rf"'{name}'.*(power-of-two|roles)"):
        build(None, role=role, image_size=size, conditioner=NoCondition(role="generator"))


# -- widths -------------------------------------------------------------------------------------


def test_resnet_widths_follow_deep_conv():
    G, D = build_pair("resnet", 64, ch=8)
    assert [b.conv1.in_channels for b in G.blocks] + [G.to_rgb.in_channels] == [64, 64, 32, 16, 8]
    assert [b.conv2.out_channels for b in D.blocks] == [8, 16, 32, 64]  # 32, 16, 8, 4 px


def test_big_resnet_widths_are_studiogan_tables_at_64_and_128():
    # StudioGAN big_resnet.py tables, in units of the base width.
    g64 = ([16, 8, 4, 2], [8, 4, 2, 1]), ([1, 2, 4, 8], [1, 2, 4, 8, 16])
    g128 = ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1]), ([1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 16])
    for size, ((g_in, g_out), (d_in, d_out)) in ((64, g64), (128, g128)):
        ws = big_resnet.g_widths(size, 1)
        assert (ws[:-1], ws[1:]) == (g_in, g_out)
        assert big_resnet.d_widths(size, 1) == d_out and d_out[:-1] == d_in


# -- cbn with a vector (BigGAN's conditional BatchNorm) -------------------------------------------


def test_vector_batchnorm_with_zero_maps_is_batchnorm():
    torch.manual_seed(0)
    norm = ClassBatchNorm(role="generator", n_classes=4).norm(6, extra_dim=5)
    assert isinstance(norm, VectorBatchNorm)
    nn.init.zeros_(norm.gain.weight)
    nn.init.zeros_(norm.bias.weight)
    x, e = torch.randn(8, 6, 4, 4) * 3 + 1, torch.randn(8, 5)
    bn = nn.BatchNorm2d(6)
    torch.testing.assert_close(norm(x, None, e), bn(x))
    torch.testing.assert_close(norm.bn.running_var, bn.running_var)


def test_vector_batchnorm_by_hand():
    torch.manual_seed(1)
    norm = NoCondition(role="generator").norm(3, extra_dim=2)  # unconditional BigGAN: gains from z
    x, e = torch.randn(4, 3, 2, 2), torch.randn(4, 2)
    out = norm(x, None, e)
    mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    normalized = (x - mean) / torch.sqrt(var + 1e-5)
    wg, wb = norm.gain.weight, norm.bias.weight
    for i in range(4):
        expected = normalized[i] * (1 + wg @ e[i])[:, None, None] + (wb @ e[i])[:, None, None]
        torch.testing.assert_close(out[i], expected)
    with pytest.raises(HandforgeError, match="extra"):
        norm(x, None)


def test_vector_batchnorm_spectral_norm_and_orthogonal_init():
    plain = ClassBatchNorm(role="generator", n_classes=2).norm(8, extra_dim=4)
    w = plain.gain.weight  # (8, 4): orthonormal columns
    torch.testing.assert_close(w.T @ w, torch.eye(4), atol=1e-5, rtol=0)
    with_sn = ClassBatchNorm(role="generator", n_classes=2).norm(8, extra_dim=4, spectral_norm=True)
    assert parametrize.is_parametrized(with_sn.gain) and parametrize.is_parametrized(with_sn.bias)


def test_shared_embedding_only_with_labels_and_old_norms_unchanged():
    shared = ClassBatchNorm(role="generator", n_classes=5).shared_embedding(7)
    y = torch.tensor([3, 0, 3])
    assert shared(y).shape == (3, 7)
    torch.testing.assert_close(shared(y)[0], shared.weight[3])
    assert NoCondition(role="generator").shared_embedding(7) is None
    assert isinstance(ClassBatchNorm(role="generator", n_classes=5).norm(6), label.ConditionalBatchNorm)
    assert isinstance(NoCondition(role="generator").norm(6), label.BatchNorm)


# -- big_resnet: hierarchical z, shared embedding, fallbacks -------------------------------------


def record_norm_inputs(G):
    """Per block: the (x, cond, extra) its first norm receives."""
    seen = []
    hooks = [b.norm1.register_forward_pre_hook(lambda m, args: seen.append(args)) for b in G.blocks]
    return seen, hooks


def test_hierarchical_z_goes_to_its_block():
    torch.manual_seed(0)
    G, _ = build_pair("big_resnet", 32, z_dim=12, attention_resolution=0)  # 3 blocks: chunks of 3
    assert G.chunks == [3, 3, 3, 3] and G.linear.in_features == 3
    assert [b.norm1.gain.in_features for b in G.blocks] == [3 + 128] * 3  # shared_dim 128 + chunk
    G.eval()  # per-sample outputs: running statistics
    z, y = torch.randn(2, 12), torch.tensor([1, 2])
    z2 = z.clone()
    z2[:, 6:9] += 1.0  # block 1's chunk
    seen, hooks = record_norm_inputs(G)
    a, b = G(z, y), G(z2, y)
    [h.remove() for h in hooks]
    first, second = seen[:3], seen[3:]
    shared = G.shared(y)
    for i in range(3):
        torch.testing.assert_close(first[i][2], torch.cat([shared, z[:, 3 * (i + 1):3 * (i + 2)]], 1))
    torch.testing.assert_close(first[0][2], second[0][2])
    torch.testing.assert_close(first[1][0], second[1][0])  # block 1's input features are unchanged
    assert not torch.allclose(first[1][2], second[1][2])
    assert not torch.allclose(a, b)


def test_chunk_sizes_and_short_z():
    assert big_resnet.chunk_sizes(80, 5) == [16] * 5
    assert big_resnet.chunk_sizes(80, 6) == [14, 14, 13, 13, 13, 13]  # 128 px: 80 is not a multiple of 6
    with pytest.raises(HandforgeError, match="z_dim must be >= 4"):
        build_pair("big_resnet", 32, z_dim=3)


def test_unconditional_big_resnet_uses_z_chunks_alone():
    G, _ = build_pair("big_resnet", 32, conditional=False, z_dim=12, attention_resolution=0)
    assert G.shared is None and [b.norm1.gain.in_features for b in G.blocks] == [3, 3, 3]
    G.eval()
    z = torch.randn(2, 12)
    z2 = z.clone()
    z2[:, 9:] += 1.0  # the last block's chunk
    assert not torch.allclose(G(z), G(z2))


class PlainNormConditioner(Conditioner):
    """A conditioner of the base contract only (as spade's): norm(num_features), a latent vector."""

    name, latent_dim = "plain", 2

    def norm(self, num_features):
        return label.BatchNorm(num_features)

    def latent(self, cond):
        return cond


def test_big_resnet_falls_back_for_norms_without_vectors():
    conditioner = PlainNormConditioner(role="generator")
    G = build_big_resnet(BigResNetConfig(ch=4, z_dim=10), role="generator", image_size=32, conditioner=conditioner)
    assert not G.hierarchical and G.chunks == [10] and G.shared is None
    assert G.linear.in_features == 10 + 2  # all of z, plus the conditioner's latent
    assert G(torch.randn(2, 10), torch.randn(2, 2)).shape == (2, 3, 32, 32)


# -- big_resnet: StudioGAN parameter counts ------------------------------------------------------


def studiogan_counts(n_classes, ch=64, z_dim=80, shared=128):
    """Parameters of StudioGAN's big_resnet at 64 px with projection D, from its tables and layers."""
    conv = lambda a, b, k, bias=True: a * b * k * k + b * bias  # noqa: E731
    attention = lambda c: 2 * conv(c, c // 8, 1, False) + 2 * conv(c, c // 2, 1, False) + 1  # noqa: E731
    g_in, g_out = [16 * ch, 8 * ch, 4 * ch, 2 * ch], [8 * ch, 4 * ch, 2 * ch, ch]
    hier = z_dim // 5 + shared
    g = (z_dim // 5) * g_in[0] * 16 + g_in[0] * 16 + n_classes * shared  # linear0, shared embedding
    for a, b in zip(g_in, g_out):  # cBN gain/bias linears without bias, conv 1x1 (shortcut), 3x3, 3x3
        g += 2 * hier * a + 2 * hier * b + conv(a, b, 1) + conv(a, b, 3) + conv(b, b, 3)
    g += attention(g_out[2]) + 2 * ch + conv(ch, 3, 3)  # attention after block 3, bn4, conv2d5
    d_in, d_out = [3, ch, 2 * ch, 4 * ch, 8 * ch], [ch, 2 * ch, 4 * ch, 8 * ch, 16 * ch]
    d = sum(conv(a, b, 1) + conv(a, b, 3) + conv(b, b, 3) for a, b in zip(d_in, d_out))
    d += attention(d_out[0]) + (16 * ch + 1) + n_classes * 16 * ch  # attention after block 1, linear1, embedding
    return g, d


@pytest.mark.parametrize("n_classes", [10, 18])
def test_big_resnet_parameter_counts_match_studiogan_at_64(n_classes):
    # Spectral norm and the initialisation change no count (checked below); off here, for speed.
    G, D = build_pair("big_resnet", 64, n_classes=n_classes, ch=64, z_dim=80, spectral_norm=False, init="pytorch")
    expected_g, expected_d = studiogan_counts(n_classes)
    assert (count(G), count(D)) == (expected_g, expected_d)
    if n_classes == 10:
        assert (count(G), count(D)) == (11_231_108, 19_558_082)  # the "G 11.2M, D 19.6M"
    small = [build_pair("big_resnet", 32, ch=8, spectral_norm=sn_on) for sn_on in (True, False)]
    assert [count(m) for m in small[0]] == [count(m) for m in small[1]]


# -- self-attention -----------------------------------------------------------------------------


def attention_resolutions(net, x, *args):
    found = []
    hooks = [m.register_forward_pre_hook(lambda m, a: found.append(a[0].shape[-1]))
             for m in net.modules() if isinstance(m, SelfAttention)]
    net(x, *args)
    [h.remove() for h in hooks]
    return found


@pytest.mark.parametrize("size, at, g_expected, d_expected", [
    (64, 32, [32], [32]), (32, 16, [16], [16]), (32, 32, [32], []), (32, 0, [], []), (128, 8, [8], [8])])
def test_attention_sits_at_its_resolution(size, at, g_expected, d_expected):
    G, D = build_pair("big_resnet", size, attention_resolution=at)
    y = torch.tensor([0, 1])
    x = G(torch.randn(2, 16), y)
    assert attention_resolutions(G, torch.randn(2, 16), y) == g_expected
    assert attention_resolutions(D, x, y) == d_expected


@pytest.mark.parametrize("at", [4, 12, 64])
def test_bad_attention_resolution_raises(at):
    with pytest.raises(HandforgeError, match="attention_resolution"):
        build_pair("big_resnet", 32, attention_resolution=at)


def test_self_attention_matches_sagan_formula():
    torch.manual_seed(0)
    attention = SelfAttention(16, "orthogonal", spectral_norm=False)
    nn.init.constant_(attention.sigma, 0.7)
    x = torch.randn(2, 16, 8, 8)
    # StudioGAN's formulation: theta^T phi, softmax over the pooled positions, g attn^T.
    theta = attention.theta(x).view(2, 2, 64)
    phi = F.max_pool2d(attention.phi(x), 2).view(2, 2, 16)
    g = F.max_pool2d(attention.g(x), 2).view(2, 8, 16)
    attn = torch.softmax(torch.bmm(theta.permute(0, 2, 1), phi), dim=-1)
    expected = x + 0.7 * attention.o(torch.bmm(g, attn.permute(0, 2, 1)).view(2, 8, 8, 8))
    torch.testing.assert_close(attention(x), expected)
    torch.testing.assert_close(attention(x.contiguous(memory_format=torch.channels_last)), expected)
    assert SelfAttention(16, "orthogonal", False)(x).equal(x)  # sigma starts at 0


# -- blocks against the textbook order of operations ---------------------------------------------


def test_blocks_match_reference_order():
    torch.manual_seed(0)
    up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
    block, x, cond = UpBlock(4, 6, NoCondition(role="generator"), "xavier"), torch.randn(2, 4, 4, 4), None
    h = block.conv2(F.relu(block.norm2(block.conv1(up(F.relu(block.norm1(x, cond)))), cond)))
    torch.testing.assert_close(block(x, cond), h + block.shortcut(up(x)))  # upsample, then 1x1 conv

    opt, down = OptimizedBlock(3, 4, "xavier", False), DownBlock(4, 6, "xavier", False)
    x = torch.randn(2, 3, 8, 8)
    ref = F.avg_pool2d(opt.conv2(F.relu(opt.conv1(x))), 2) + opt.shortcut(F.avg_pool2d(x, 2))
    torch.testing.assert_close(opt(x), ref)
    h = opt(x)
    ref = F.avg_pool2d(down.conv2(F.relu(down.conv1(F.relu(h)))), 2) + F.avg_pool2d(down.shortcut(h), 2)
    torch.testing.assert_close(down(h), ref)  # SNGAN's shortcut: 1x1 conv, then pool
    same = DownBlock(6, 6, "xavier", False, down=False)
    assert same.shortcut is None
    torch.testing.assert_close(same(down(h)), same.conv2(F.relu(same.conv1(F.relu(down(h))))) + down(h))


# -- spectral norm and initialisation ------------------------------------------------------------


def parametrized(module):
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and parametrize.is_parametrized(m)]


def own_layers(module):
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_spectral_norm_switch():
    for sn_on in (True, False):
        G, D = build_pair("big_resnet", 32, spectral_norm=sn_on)  # BigGAN: on both networks
        assert len(parametrized(G)) == (len(own_layers(G)) if sn_on else 0)  # CBN's linears included
        assert len(parametrized(D)) == (len(own_layers(D)) if sn_on else 0)  # projection head included
        G, D = build_pair("resnet", 32, spectral_norm=sn_on)  # SNGAN: on the discriminator only
        assert parametrized(G) == [] and len(parametrized(D)) == (len(own_layers(D)) if sn_on else 0)


def test_orthogonal_init():
    G, _ = build_pair("big_resnet", 32, spectral_norm=False)
    w = G.blocks[0].conv1.weight.flatten(1)  # (16, 32 * 9): orthonormal rows
    torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), atol=1e-5, rtol=0)
    assert G.blocks[0].conv1.bias.abs().max() == 0


# -- a training step through the gan task ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_gan_task_step(name):
    torch.manual_seed(0)
    build, config_cls = BUILDERS[name]
    config = config_cls(ch=4, z_dim=8, **({"attention_resolution": 16} if name == "big_resnet" else {}))
    dataset = TinyHands(n=8, size=32)
    components = {
        "generator": component("backbone", name, build, config),
        "discriminator": component("backbone", name, build, config),
        "g_conditioner": component("conditioner", "cbn", ClassBatchNorm),
        "d_conditioner": component("conditioner", "projection", Projection),
        "loss": component("loss", "hinge", Hinge),
    }
    task, _, batches = gan_run(components, dataset, GanConfig(sample_count=4), batch_size=4)
    G, D = task.export_modules()["generator"], task.export_modules()["discriminator"]
    g0, d0 = dict(G.named_parameters()), dict(D.named_parameters())
    g0, d0 = ({k: p.detach().clone() for k, p in before.items()} for before in (g0, d0))
    logs = task.train_step(next(batches), step=0)
    assert all(torch.isfinite(t) for t in logs.values())
    for before, net in ((g0, G), (d0, D)):
        # Every weight matrix / kernel moved, but attention's: its output is scaled by sigma, 0 at first.
        moved = {k: not torch.equal(before[k], p) for k, p in net.named_parameters() if p.ndim > 1}
        assert moved and all(v for k, v in moved.items() if not k.startswith("attention."))
        assert name == "resnet" or not torch.equal(before["attention.sigma"], net.attention.sigma)
    assert task.sample(next(batches))["image"].shape == (4, 3, 32, 32)


# -- registration -------------------------------------------------------------------------------


def test_backbones_register_like_plugins():
    host = PluginHost()
    for module in (resnet, big_resnet):
        host._add(module, PluginInfo(module.__name__, "builtin", "handforge", "0"), fatal=True)
    registry = host.registry("backbone")
    assert registry.get("resnet").config_cls is ResNetConfig
    assert registry.get("big_resnet").config_cls is BigResNetConfig
    assert all(entry.summary for entry in registry)
    assert BigResNetConfig() == BigResNetConfig(ch=64, z_dim=80, shared_dim=128, attention_resolution=32,
                                                spectral_norm=True, init="orthogonal")


def test_recipe_options_are_checked():
    from handforge.recipe import structure

    problems = []
    assert structure({"init": "xavier", "ch": 32}, BigResNetConfig, "model.generator", problems).init == "xavier"
    bad = {"init": "kaiming", "ch": 0, "attention_resolution": -1, "shared_dim": 0}
    assert structure(bad, BigResNetConfig, "model.generator", problems) is None
    assert sorted(p.split(":")[0] for p in problems) == [
        "model.generator.attention_resolution", "model.generator.ch", "model.generator.init",
        "model.generator.shared_dim"]
    assert structure({"z_dim": 0}, ResNetConfig, "model.generator", problems) is None
    assert problems[-1].startswith("model.generator.z_dim")
