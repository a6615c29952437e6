"""The stylegan2 backbone (Karras et al. 2020) and the gan task's hooks for it: psi truncation,
noise rng in sample grids, the generator-side penalty (path length regularisation)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from handforge.errors import HandforgeError
from handforge.plugins.backbones import stylegan2
from handforge.plugins.backbones.stylegan2 import (EqualConv2d, MinibatchStd, ModulatedConv2d, StyleGan2Config,
                                                   blur, build_stylegan2, fir_kernel, upsample2, widths)
from handforge.plugins.conditioners.auxiliary import LatentLabel
from handforge.plugins.conditioners.label import ClassBatchNorm, NoCondition, Projection
from handforge.plugins.conditioners.pose import ConcatConditioner, SpadeConditioner
from handforge.plugins.tasks.gan import GanConfig
from gan_support import (build_net, check_style_outputs, parameter_count, registered_entry,
                         rejected_options, snapshot, style_gan_run)
from conftest import debug_launch_in_fresh_python

SMALL = dict(ch=4, ch_max=16, z_dim=16, w_dim=16, mapping_layers=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def generator(size=32, conditioner=None, **options):
    return build_net(build_stylegan2, StyleGan2Config(**{**SMALL, **options}), "generator", size, conditioner)


def discriminator(size=32, conditioner=None, **options):
    return build_net(build_stylegan2, StyleGan2Config(**{**SMALL, **options}), "discriminator", size, conditioner)


def cadain(n_classes=3):
    return LatentLabel(role="generator", n_classes=n_classes)


def set_noise_strength(G, value):
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(value)


# -- shapes -------------------------------------------------------------------------------------


def check_shapes(size, conditional, **options):
    torch.manual_seed(0)
    g_cond = cadain() if conditional else None
    d_cond = Projection(role="discriminator", n_classes=3) if conditional else None
    G, D = generator(size, g_cond, **options), discriminator(size, d_cond, **options)
    check_style_outputs(G, D, size, torch.tensor([0, 2, 1, 1]) if conditional else None)
    blocks = int(math.log2(size // 4))
    assert len(G.blocks) == len(D.blocks) == blocks and G.num_ws == 2 * int(math.log2(size)) - 2


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("conditional", [False, True])
def test_shapes(size, conditional):
    check_shapes(size, conditional)


def test_shapes_at_128():
    check_shapes(128, True, ch=2, ch_max=8)


@pytest.mark.slow
def test_shapes_at_256():
    check_shapes(256, True, ch=8, ch_max=64)


def test_bad_size_or_role_raises():
    for size, role in ((48, "generator"), (4, "discriminator"), (32, "classifier")):
        with pytest.raises(HandforgeError, match=r"'stylegan2'.*(power-of-two|roles)"):
            build_stylegan2(None, role=role, image_size=size, conditioner=NoCondition(role="generator"))


# -- widths and parameter counts ------------------------------------------------------------------


def test_widths_double_per_halving_up_to_the_cap():
    assert widths(64, 64, 512) == [512, 512, 256, 128, 64]  # at 4, 8, 16, 32, 64 px
    assert widths(256, 64, 512) == [512, 512, 512, 512, 256, 128, 64]  # StyleGAN2-ADA's paper256
    assert widths(32, 4, 16) == [16, 16, 8, 4]


def stylegan2_counts(size, ch, ch_max, z_dim, w_dim, mapping_layers, n_classes=0, map_channels=0):
    """Parameters of StyleGAN2-ADA's skip G / resnet D, from its layer list (the label embedding is
    ADA's ``embed``; the head is our projection head: linear + class embedding)."""
    c = {r: min(ch_max, ch * size // r) for r in (4 << i for i in range(int(math.log2(size)) - 1))}
    linear = lambda a, b, bias=True: a * b + b * bias  # noqa: E731
    conv = lambda a, b, k, bias=True: a * b * k * k + b * bias  # noqa: E731
    layer = lambda a, b: linear(w_dim, a) + conv(a, b, 3) + 1  # affine, weight + bias, noise strength  # noqa: E731
    rgb = lambda a: linear(w_dim, a) + conv(a, 3, 1)  # noqa: E731
    g = (linear(n_classes, w_dim) if n_classes else 0) + linear(z_dim + (w_dim if n_classes else 0), w_dim)
    g += (mapping_layers - 1) * linear(w_dim, w_dim)
    g += c[4] * 16 + layer(c[4], c[4]) + rgb(c[4])
    for r in list(c)[1:]:
        g += layer(c[r // 2], c[r]) + layer(c[r], c[r]) + rgb(c[r])
    d = conv(3 + map_channels, c[size], 1)
    for r in list(c)[1:][::-1]:
        d += conv(c[r], c[r], 3) + conv(c[r], c[r // 2], 3) + conv(c[r], c[r // 2], 1, bias=False)
    d += conv(c[4] + 1, c[4], 3) + linear(c[4] * 16, c[4]) + linear(c[4], 1) + n_classes * c[4]
    return g, d


@pytest.mark.parametrize("conditional", [False, True])
def test_parameter_counts_follow_stylegan2_layers(conditional):
    options = dict(ch=8, ch_max=32, z_dim=24, w_dim=20, mapping_layers=3)
    g_cond = cadain(5) if conditional else None
    d_cond = Projection(role="discriminator", n_classes=5) if conditional else None
    G, D = generator(64, g_cond, **options), discriminator(64, d_cond, **options)
    assert (parameter_count(G), parameter_count(D)) == stylegan2_counts(64, **options, n_classes=5 if conditional else 0)


def test_default_parameter_counts_at_64():
    G, D = generator(64, **{k: getattr(StyleGan2Config(), k) for k in SMALL}), discriminator(64, ch=64, ch_max=512)
    assert (parameter_count(G), parameter_count(D)) == stylegan2_counts(64, 64, 512, 512, 512, 8) == (13_749_208, 14_037_569)


# -- filters and layers against independent references ---------------------------------------------


def test_fir_resampling_is_bilinear_away_from_the_borders():
    x = torch.randn(2, 3, 16, 16)
    k = fir_kernel()
    # [1,3,3,1] x 2 upsampling = bilinear (half-pixel centres); 2x downsampling = antialiased bilinear.
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample2(x, k)[..., 2:-2, 2:-2], up[..., 2:-2, 2:-2])
    down = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(blur(x, k, padding=1, stride=2)[..., 1:-1, 1:-1], down[..., 1:-1, 1:-1])
    assert upsample2(x, k).shape[-1] == 32 and blur(x, k, padding=1, stride=2).shape[-1] == 8


def per_sample_modulated_conv(conv, x, w):
    """Reference: per-sample weights W s / sqrt(fan_in), demodulated, one F.conv2d per sample; the
    upsampling conv as a conv of the zero-interleaved input with the flipped kernel, then the
    [1,3,3,1] filter (gain 4) written out."""
    c_out, c_in, k, _ = conv.weight.shape
    styles = w @ conv.affine.weight.T / math.sqrt(w.shape[1]) + conv.affine.bias
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    fir = (torch.outer(taps, taps) / 64 * 4).expand(c_out, 1, 4, 4)
    out = []
    for i in range(x.shape[0]):
        weight = conv.weight / math.sqrt(c_in * k * k) * styles[i][None, :, None, None]
        if conv.demodulate:
            weight = weight / (weight.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8).sqrt()
        xi = x[i:i + 1]
        if conv.up:
            zeros = xi.new_zeros(1, c_in, 2 * xi.shape[2] - 1, 2 * xi.shape[3] - 1)
            zeros[:, :, ::2, ::2] = xi
            y = F.conv2d(zeros, weight.flip(2, 3), padding=k - 1)  # = the transposed stride-2 conv
            out.append(F.conv2d(y, fir, padding=1, groups=c_out))
        else:
            out.append(F.conv2d(xi, weight, padding=k // 2))
    return torch.cat(out)


@pytest.mark.parametrize("kernel, demodulate, up", [(3, True, False), (3, True, True), (1, False, False)])
def test_modulated_conv_matches_per_sample_reference(kernel, demodulate, up):
    torch.manual_seed(0)
    conv = ModulatedConv2d(5, 6, kernel, 7, demodulate=demodulate, up=up)
    with torch.no_grad():
        conv.affine.bias.normal_()  # styles far from 1
    x, w = torch.randn(3, 5, 8, 8), torch.randn(3, 7)
    expected = per_sample_modulated_conv(conv, x, w)
    torch.testing.assert_close(conv(x, w), expected, atol=1e-5, rtol=1e-4)
    assert expected.shape[-1] == (16 if up else 8)
    channels_last = conv(x.contiguous(memory_format=torch.channels_last), w)
    torch.testing.assert_close(channels_last, expected, atol=1e-5, rtol=1e-4)


def test_demodulation_gives_unit_variance_outputs():
    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 8, 3, 16)
    with torch.no_grad():
        conv.affine.bias.uniform_(0.2, 3.0)  # very unequal styles: demodulation must undo them
    out = conv(torch.randn(4, 64, 32, 32), torch.randn(4, 16))[..., 1:-1, 1:-1]  # away from the zero padding
    variance = out.var(dim=(0, 2, 3))
    torch.testing.assert_close(variance, torch.ones(8), atol=0.12, rtol=0)
    plain = ModulatedConv2d(64, 8, 3, 16, demodulate=False)
    with torch.no_grad():
        plain.affine.bias.fill_(3.0)
    assert plain(torch.randn(4, 64, 32, 32), torch.randn(4, 16)).var() > 4  # without it, styles scale


def test_minibatch_std_by_hand():
    torch.manual_seed(0)
    for n, group, g in ((8, 4, 4), (6, 4, 3), (5, 4, 1)):
        x = torch.randn(n, 4, 2, 2)
        out = MinibatchStd(group, 1)(x)
        assert out.shape == (n, 5, 2, 2) and torch.equal(out[:, :4], x)
        for j in range(n):
            members = x[j % (n // g)::n // g]  # StyleGAN2's groups: samples j, j + N/G, ...
            std = (members.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
            torch.testing.assert_close(out[j, 4], std.expand(2, 2))


def test_down_convs_halve_and_keep_layout():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    for kernel in (1, 3):
        conv = EqualConv2d(4, 6, kernel, down=True)
        y = conv(x)
        assert y.shape == (2, 6, 4, 4)
        torch.testing.assert_close(conv(x.contiguous(memory_format=torch.channels_last)), y)
    # StyleGAN2's 3x3 down conv (filter, then a stride-2 conv at full resolution) is one stride-2 conv
    # whose 6x6 kernel is the full convolution of the filter and the weights, centred on 2i + 1/2.
    three = EqualConv2d(4, 6, 3, bias=False, down=True)
    weight = three.weight / math.sqrt(4 * 9)
    composed = F.conv2d(F.pad(weight.reshape(24, 1, 3, 3), (3, 3, 3, 3)), fir_kernel()[None, None]).view(6, 4, 6, 6)
    torch.testing.assert_close(three(x), F.conv2d(x, composed, stride=2, padding=2))
    # A 1x1 conv commutes with the filter: filtering after it gives the same.
    one = EqualConv2d(4, 6, 1, bias=False, down=True)
    torch.testing.assert_close(one(x), blur(F.conv2d(x, one.weight / 2), fir_kernel(), padding=1, stride=2))


# -- generator behaviour --------------------------------------------------------------------------


def test_noise_inputs():
    torch.manual_seed(0)
    G = generator().eval()
    z = torch.randn(2, G.z_dim)
    torch.testing.assert_close(G(z), G(z))  # strengths start at 0: deterministic
    set_noise_strength(G, 0.5)
    assert not torch.allclose(G(z), G(z))
    seeded = [G(z, rng=torch.Generator().manual_seed(7)) for _ in range(2)]
    torch.testing.assert_close(seeded[0], seeded[1])


def test_style_mixing_only_in_training_mode():
    torch.manual_seed(0)
    G = generator(style_mixing=1.0)
    z = torch.randn(4, G.z_dim)
    w = G.mapping(z)
    for _ in range(5):
        ws = G.styles(z)
        same = [torch.allclose(ws[:, i], w) for i in range(G.num_ws)]
        cutoff = same.index(False)  # mixed from a layer >= 1 on: w before, another z's w after
        assert 1 <= cutoff and all(same[:cutoff]) and not any(same[cutoff:])
        torch.testing.assert_close(ws[:, cutoff:], ws[:, -1:].expand_as(ws[:, cutoff:]))
    unmixed = generator(style_mixing=0.0).styles(z)
    assert torch.equal(unmixed[:, 0], unmixed[:, -1])
    G.eval()
    ws = G.styles(z)
    torch.testing.assert_close(ws, w[:, None].expand_as(ws))


def test_w_avg_tracks_w_in_training_and_psi_truncates_towards_it():
    torch.manual_seed(0)
    G = generator(64, cadain(), style_mixing=0.0, w_avg_beta=0.9)
    y = torch.tensor([1, 1, 1])
    z = torch.randn(3, G.z_dim)
    assert torch.equal(G.w_avg, torch.zeros(G.w_dim))
    G(z, y)
    torch.testing.assert_close(G.w_avg, 0.1 * G.mapping(z, G.conditioner.latent(y)).mean(0))
    G.eval()
    w_avg = G.w_avg.clone()
    G(torch.randn(3, G.z_dim), y)
    assert torch.equal(G.w_avg, w_avg)  # frozen in eval mode
    w = G.mapping(z, G.conditioner.latent(y))
    torch.testing.assert_close(G.styles(z, y, psi=0.5)[:, 3], w_avg + 0.5 * (w - w_avg))
    torch.testing.assert_close(G.styles(z, y, psi=1.0), G.styles(z, y))
    at_mean = G(z, y, psi=0.0)  # every z gives the image of w_avg
    torch.testing.assert_close(at_mean, at_mean[:1].expand_as(at_mean))
    assert not torch.allclose(G(z, y)[0], G(z, y)[1])


def test_label_enters_through_the_mapping():
    torch.manual_seed(0)
    G = generator(32, cadain()).eval()
    z = torch.randn(2, G.z_dim)
    a, b = G(z, torch.tensor([0, 1])), G(z, torch.tensor([0, 2]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])
    assert G.mapping.layers[0].weight.shape[1] == G.z_dim + G.w_dim  # z and the embedded label
    with pytest.raises(HandforgeError, match="mapping network.*cond"):
        G(z, None)


@pytest.mark.parametrize("conditioner", [
    lambda: ClassBatchNorm(role="generator", n_classes=3),
    lambda: SpadeConditioner(role="generator", image_size=32)])
def test_generator_refuses_norm_conditioners(conditioner):
    with pytest.raises(HandforgeError, match=r"'stylegan2'.*'none' and 'cadain'.*'(cbn|spade)'"):
        generator(32, conditioner())


# -- path length regularisation -------------------------------------------------------------------


def test_path_length_penalty_matches_per_sample_jacobians():
    torch.manual_seed(0)
    G = generator(32, cadain(), style_mixing=0.0, pl_weight=2.0, pl_interval=4, pl_batch_shrink=2)
    z, y = torch.randn(6, G.z_dim), torch.tensor([0, 1, 2, 0, 1, 2])
    assert G.g_penalty(z, y, step=1) is None and G.g_penalty(z, y, step=6) is None  # not due
    assert generator(pl_weight=0.0).g_penalty(z, None, step=0) is None  # off
    state = {k: t.clone() for k, t in G.state_dict().items()}

    torch.manual_seed(1)
    penalty = G.g_penalty(z, y, step=8)
    assert penalty.ndim == 0 and torch.isfinite(penalty) and penalty.requires_grad
    penalty.backward()
    assert G.mapping.layers[0].weight.grad.abs().sum() > 0 and G.blocks[0].conv0.conv.weight.grad.abs().sum() > 0

    pl_mean = G.pl_mean.clone()
    # Reference: the same draws (noise strengths are 0, so only the image noise y matters), then
    # |J_w^T y| sample by sample, each with its own forward: lengths sqrt(mean over layers |g_l|^2).
    G.load_state_dict(state)
    torch.manual_seed(1)
    ws = G.styles(z[:3], y[:3])
    img = G.synthesis(ws)
    noise = torch.randn_like(img) / 32
    lengths = []
    for i in range(3):
        wi = ws[i:i + 1].detach().requires_grad_(True)
        (grad,) = torch.autograd.grad((G.synthesis(wi) * noise[i]).sum(), wi)
        lengths.append(grad[0].square().sum(dim=1).mean().sqrt())
    lengths = torch.stack(lengths)
    mean = 0.01 * lengths.mean()  # pl_mean starts at 0
    torch.testing.assert_close(penalty.detach(), 2.0 * 4 * (lengths - mean).square().mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pl_mean, mean.detach(), rtol=1e-4, atol=1e-6)


# -- discriminator --------------------------------------------------------------------------------


def test_discriminator_with_projection():
    torch.manual_seed(0)
    D = discriminator(32, Projection(role="discriminator", n_classes=3))
    x = torch.randn(4, 3, 32, 32)
    a, b = D(x, torch.tensor([0, 1, 2, 0])), D(x, torch.tensor([0, 1, 2, 1]))
    torch.testing.assert_close(a[:3], b[:3])
    assert not torch.allclose(a[3], b[3])
    torch.testing.assert_close(D(x.contiguous(memory_format=torch.channels_last), torch.tensor([0, 1, 2, 0])), a)


def test_discriminator_with_concat_maps():
    torch.manual_seed(0)
    d_cond = ConcatConditioner(role="discriminator", image_size=32)
    D = discriminator(32, d_cond)
    assert D.from_rgb.weight.shape[1] == 3 + d_cond.input_channels
    keypoints = torch.rand(2, 21, 3)
    keypoints[..., 2] = 1
    maps = d_cond.condition({"keypoints": keypoints})
    logits = D(torch.randn(2, 3, 32, 32), maps)
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    moved = keypoints.clone()
    moved[1, :, :2] = 1 - moved[1, :, :2]
    assert not torch.allclose(D(torch.zeros(2, 3, 32, 32), maps)[1],
                              D(torch.zeros(2, 3, 32, 32), d_cond.condition({"keypoints": moved}))[1])


def test_mbstd_features_must_divide_the_width():
    with pytest.raises(HandforgeError, match="mbstd_features"):
        discriminator(32, mbstd_features=3)


# -- through the gan task -------------------------------------------------------------------------


def make_run(gan_config=None, **options):
    return style_gan_run("stylegan2", build_stylegan2, StyleGan2Config(**{**SMALL, **options}), gan_config)


def test_gan_task_steps_with_logistic_r1_and_path_length():
    torch.manual_seed(0)
    task, run, batches = make_run(pl_weight=2.0, pl_interval=2)
    G, D = task.export_modules()["generator"], task.export_modules()["discriminator"]
    g0, d0 = snapshot(G), snapshot(D)
    logs = task.train_step(next(batches), step=0)
    assert set(logs) == {"d_loss", "g_loss", "d_real", "d_fake", "d_penalty", "g_penalty"}  # R1 and PL due
    assert all(t.ndim == 0 and torch.isfinite(t) and not t.requires_grad for t in logs.values())
    assert all(not torch.equal(a, b) for a, b in zip(g0, G.parameters()))  # noise strengths too
    assert all(not torch.equal(a, b) for a, b in zip(d0, D.parameters()))
    assert G.pl_mean > 0 and G.w_avg.abs().sum() > 0
    assert set(task.train_step(next(batches), step=1)) == {"d_loss", "g_loss", "d_real", "d_fake"}
    torch.testing.assert_close(task.ema.w_avg, G.w_avg)  # buffers follow G: truncation's centre


def test_gan_task_truncation_is_psi_and_sample_grids_are_deterministic():
    task, run, batches = make_run(GanConfig(sample_count=4, truncation=0.7))
    set_noise_strength(task.ema, 0.5)
    calls = []
    task.ema.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    batch = next(batches)
    first = task.sample(batch)["image"]
    torch.testing.assert_close(task.sample(batch)["image"], first)  # noise inputs drawn from the seeded rng
    (z, cond), options = calls[0]
    assert torch.equal(z, task.fixed_z[:4]) and options["psi"] == 0.7  # z left alone: psi instead
    assert isinstance(options["rng"], torch.Generator)
    generated = [task.generate(batch) for _ in range(2)]
    assert "rng" not in calls[-1][1] and not torch.allclose(*generated)  # metrics: fresh noise
    task.config = GanConfig(sample_count=4)
    task.sample(batch)
    assert "psi" not in calls[-1][1]


# -- registration and options ---------------------------------------------------------------------


def test_registers_like_a_plugin_and_options_are_checked():
    from handforge.recipe import structure

    entry = registered_entry(stylegan2, "backbone", "stylegan2")
    assert entry.config_cls is StyleGan2Config and entry.summary
    bad = {"mapping_layers": 0, "style_mixing": 1.5, "pl_interval": 0, "ch": "64"}
    assert rejected_options(StyleGan2Config, bad) == [
        "model.generator.ch", "model.generator.mapping_layers", "model.generator.pl_interval",
        "model.generator.style_mixing"]
    assert structure({"pl_weight": 2, "mapping_layers": 2}, StyleGan2Config, "g", []).pl_weight == 2.0


# -- two processes ----------------------------------------------------------------------------------


def _two_process_step():
    torch.set_num_threads(1)
    task, run, batches = make_run(pl_weight=2.0, pl_interval=1)
    acc = task.accelerator
    assert acc.num_processes == 2 and isinstance(task.G, nn.parallel.DistributedDataParallel)
    for _ in range(acc.process_index):
        next(batches)
    torch.manual_seed(acc.process_index)
    G = task.export_modules()["generator"]
    for step in range(2):
        logs = task.train_step(next(batches), step)
        assert "g_penalty" in logs and all(torch.isfinite(t) for t in logs.values())
    flat = torch.cat([p.detach().flatten() for p in G.parameters()])
    gathered = acc.gather(flat[None])
    torch.testing.assert_close(gathered[0], gathered[1])  # gradients (path length's too) were averaged


@pytest.mark.slow
def test_path_length_under_ddp_in_two_processes():
    debug_launch_in_fresh_python("test_stylegan2", "_two_process_step")
