"""The stylegan3 backbone (Karras et al. 2021): layer schedule, filter design, upfirdn2d, equivariance,
and the generator with StyleGAN2's discriminator through the gan task."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from handforge.errors import HandforgeError
from handforge.plugins.backbones import stylegan2, stylegan3
from handforge.plugins.backbones.stylegan2 import StyleGan2Config, build_stylegan2
from handforge.plugins.backbones.stylegan3 import (FourierFeatures, StyleGan3Config, build_stylegan3, kaiser_beta,
                                                   lowpass_filter, schedule, upfirdn2d)
from handforge.plugins.conditioners.auxiliary import LatentLabel
from handforge.plugins.conditioners.label import ClassBatchNorm, NoCondition, Projection
from handforge.plugins.conditioners.pose import SpadeConditioner
from handforge.plugins.tasks.gan import GanConfig

from gan_support import (build_net, check_style_outputs, parameter_count, registered_entry,
                         rejected_options, snapshot, style_gan_run)

SMALL = dict(ch=4, ch_max=16, z_dim=16, w_dim=16, mapping_layers=2, num_layers=6)

pytestmark = pytest.mark.usefixtures("one_thread")


def generator(size=32, conditioner=None, **options):
    return build_net(build_stylegan3, StyleGan3Config(**{**SMALL, **options}), "generator", size, conditioner)


def discriminator(size=32, conditioner=None, **options):
    return build_net(build_stylegan3, StyleGan3Config(**{**SMALL, **options}), "discriminator", size, conditioner)


# -- shapes -------------------------------------------------------------------------------------


def check_shapes(size, conditional, **options):
    torch.manual_seed(0)
    g_cond = LatentLabel(role="generator", n_classes=3) if conditional else None
    d_cond = Projection(role="discriminator", n_classes=3) if conditional else None
    G, D = generator(size, g_cond, **options), discriminator(size, d_cond, **options)
    check_style_outputs(G, D, size, torch.tensor([0, 2, 1, 1]) if conditional else None)
    assert len(G.layers) == G.config.num_layers + 1 and G.num_ws == G.config.num_layers + 2


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("conditional", [False, True])
def test_shapes(size, conditional):
    check_shapes(size, conditional)


def test_shapes_config_r():
    check_shapes(32, True, variant="r")


@pytest.mark.slow
@pytest.mark.parametrize("size", [128, 256])
def test_shapes_large_with_all_layers(size):
    check_shapes(size, True, num_layers=14)


def test_bad_options_raise():
    with pytest.raises(HandforgeError, match="'stylegan3'.*power-of-two"):
        generator(48)
    with pytest.raises(HandforgeError, match="'stylegan3'.*roles"):
        build_stylegan3(None, role="classifier", image_size=32, conditioner=NoCondition(role="generator"))
    with pytest.raises(HandforgeError, match="'stylegan3'.*num_layers.*num_critical"):
        generator(num_layers=2, num_critical=2)
    with pytest.raises(HandforgeError, match="'stylegan3'.*mbstd_features"):
        discriminator(mbstd_features=3)


@pytest.mark.parametrize("conditioner, name", [(ClassBatchNorm, "cbn"), (SpadeConditioner, "spade")])
def test_generator_refuses_norm_conditioners(conditioner, name):
    with pytest.raises(HandforgeError, match=f"'stylegan3'.*mapping network only.*'{name}'"):
        generator(conditioner=conditioner(role="generator", n_classes=3, image_size=32))


# -- the layer schedule -------------------------------------------------------------------------


def layer_names(image_size, ch, ch_max):
    s = schedule(image_size, 14, 2, 10, ch, ch_max)
    return [f"L{i}_{size}_{c}" for i, (size, c) in enumerate(zip(s.sizes, s.channels))]


def test_schedule_reproduces_the_official_networks():
    # The layer names (L<index>_<grid size>_<channels>) of NVIDIA's StyleGAN3 networks.
    # stylegan3-t-ffhq-1024x1024 (channel_base 32768 = ch * 1024):
    assert layer_names(1024, 32, 512) == [
        "L0_36_512", "L1_36_512", "L2_52_512", "L3_52_512", "L4_84_512", "L5_148_512", "L6_148_512",
        "L7_276_323", "L8_276_203", "L9_532_128", "L10_1044_81", "L11_1044_51", "L12_1044_32", "L13_1024_32",
        "L14_1024_3"]
    # stylegan3-t at 256 px with channel_base 32768, then with 16384:
    assert layer_names(256, 128, 512) == [
        "L0_36_512", "L1_36_512", "L2_36_512", "L3_52_512", "L4_52_512", "L5_84_512", "L6_84_512", "L7_148_512",
        "L8_148_512", "L9_148_362", "L10_276_256", "L11_276_181", "L12_276_128", "L13_256_128", "L14_256_3"]
    assert layer_names(256, 64, 512)[7:] == [
        "L7_148_362", "L8_148_256", "L9_148_181", "L10_276_128", "L11_276_91", "L12_276_64", "L13_256_64",
        "L14_256_3"]
    # stylegan3-r-ffhqu-256x256: config R doubles channel_base and channel_max.
    assert layer_names(256, 2 * 64, 2 * 512)[:10] == [
        "L0_36_1024", "L1_36_1024", "L2_36_1024", "L3_52_1024", "L4_52_1024", "L5_84_1024", "L6_84_1024",
        "L7_148_724", "L8_148_512", "L9_148_362"]


def test_config_r_doubles_the_generator_widths_only():
    t, r = generator(64, variant="t"), generator(64, variant="r")  # ch 4, ch_max 16
    assert r.schedule == schedule(64, 6, 2, 10, 8, 32) and t.schedule == schedule(64, 6, 2, 10, 4, 16)
    assert all(layer.kernel == 1 for layer in r.layers) and [layer.kernel for layer in t.layers] == [3] * 6 + [1]
    assert parameter_count(discriminator(64, variant="r")) == parameter_count(discriminator(64, variant="t"))


@pytest.mark.parametrize("size, num_layers", [(32, 6), (64, 14), (128, 10)])
def test_schedule_follows_the_paper(size, num_layers):
    s = schedule(size, num_layers, 2, 10, 8, 64)
    n, grow = num_layers, num_layers - 2
    # Cutoffs and stopbands: geometric from (2, 2^2.1) to (S / 2, S / 2 * 2^0.3), flat over the critical layers.
    for i in range(n + 1):
        e = min(i / grow, 1)
        assert s.cutoffs[i] == pytest.approx(2 * (size / 4) ** e)
        assert s.stopbands[i] == pytest.approx(2 ** 2.1 * (size / 2 * 2 ** 0.3 / 2 ** 2.1) ** e)
    ratios = np.array(s.cutoffs[1:grow + 1]) / np.array(s.cutoffs[:grow])
    np.testing.assert_allclose(ratios, ratios[0])
    for i in range(n + 1):
        rate = s.rates[i]
        assert rate & (rate - 1) == 0 and rate <= size  # powers of two up to S
        assert rate / 2 < min(2 * s.stopbands[i], size) <= rate  # the smallest power of two that holds 2 f_t
        assert s.cutoffs[i] <= rate / 2  # the band fits under Nyquist
        assert s.half_widths[i] == pytest.approx(max(s.stopbands[i], rate / 2) - s.cutoffs[i])
    assert s.rates[-3:] == [size] * 3 and s.cutoffs[-3:] == [size / 2] * 3  # critically sampled at the end
    assert s.sizes == [r + 20 for r in s.rates[:-2]] + [size, size]
    assert s.channels == [min(64, round(8 * size / 2 / c)) for c in s.cutoffs[:-1]] + [3]


# -- filters ------------------------------------------------------------------------------------


def numpy_kaiser_lowpass(numtaps, cutoff, width, fs):
    """scipy.signal.firwin(numtaps, cutoff, width=width, fs=fs), from Kaiser's design formulas and numpy."""
    delta_omega = width / (fs / 2)  # transition width, normalised to Nyquist
    a = 2.285 * (numtaps - 1) * np.pi * delta_omega + 7.95
    beta = 0.1102 * (a - 8.7) if a > 50 else 0.5842 * (a - 21) ** 0.4 + 0.07886 * (a - 21) if a > 21 else 0.0
    m = np.arange(numtaps) - (numtaps - 1) / 2
    h = (2 * cutoff / fs) * np.sinc(2 * cutoff / fs * m) * np.kaiser(numtaps, beta)
    return h / h.sum(), beta


# (taps, cutoff, transition width, rate): StyleGAN3 layers' up and down filters, and both Kaiser regimes.
FILTERS = [(12, 2.0, 12.0, 32), (24, 4.0, 8.0, 64), (12, 32.0, 14.8, 128), (12, 16.0, 32.0, 128), (7, 3.0, 1.0, 16)]


@pytest.mark.parametrize("numtaps, cutoff, width, fs", FILTERS)
def test_lowpass_taps_match_numpy_kaiser_windowed_sinc(numtaps, cutoff, width, fs):
    expected, beta = numpy_kaiser_lowpass(numtaps, cutoff, width, fs)
    f = lowpass_filter(numtaps, cutoff, width, fs)
    assert f.dtype == torch.float32 and f.shape == (numtaps,)
    assert kaiser_beta(numtaps, width, fs) == pytest.approx(beta)
    np.testing.assert_allclose(f.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert f.double().sum().item() == pytest.approx(1.0, abs=1e-6)  # unit DC gain
    np.testing.assert_array_equal(f.numpy(), f.numpy()[::-1])  # linear phase


@pytest.mark.parametrize("numtaps, cutoff, width, fs", FILTERS[:4])
def test_lowpass_response(numtaps, cutoff, width, fs):
    f = lowpass_filter(numtaps, cutoff, width, fs).double().numpy()
    freqs = np.linspace(0, fs / 2, 4001)
    response = np.abs(np.exp(-2j * np.pi * np.outer(freqs / fs, np.arange(numtaps))) @ f)
    assert response[0] == pytest.approx(1.0, abs=1e-6)
    assert 0.4 < np.interp(cutoff, freqs, response) < 0.8  # a windowed sinc is about half-amplitude at the cutoff
    stop = freqs >= cutoff + width / 2  # the stopband starts half a transition width above the cutoff
    assert response[stop].max() < 0.05  # attenuated by more than 26 dB
    assert lowpass_filter(1, cutoff, width, fs) is None  # one tap: the identity


def numpy_j1(x):
    """Bessel J1 from its power series (enough terms for |x| < 20 in float64)."""
    return sum((-1) ** k * (x / 2) ** (2 * k + 1) / (math.factorial(k) * math.factorial(k + 1)) for k in range(60))


@pytest.mark.parametrize("numtaps", [12, 13])
def test_radial_filter_is_a_kaiser_windowed_jinc(numtaps):
    cutoff, width, fs = 6.0, 10.0, 64
    f = lowpass_filter(numtaps, cutoff, width, fs, radial=True).double().numpy()
    x = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
    r = np.hypot(*np.meshgrid(x, x))
    with np.errstate(invalid="ignore", divide="ignore"):
        jinc = np.where(r > 0, numpy_j1(2 * np.pi * cutoff * r) / (np.pi * r), np.pi * cutoff ** 2)
    window = np.kaiser(numtaps, numpy_kaiser_lowpass(numtaps, cutoff, width, fs)[1])
    expected = jinc * np.outer(window, window)
    np.testing.assert_allclose(f, expected / expected.sum(), rtol=1e-5, atol=1e-8)
    assert f.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(f, f.T, atol=1e-12)
    np.testing.assert_allclose(f, f[::-1], atol=1e-12)


# -- upfirdn2d ----------------------------------------------------------------------------------


def slow_upfirdn2d(x, f, up, down, padding, gain):
    """Zeros after each sample, pad (negative: crop), convolution as an explicit sum, decimation."""
    px0, px1, py0, py1 = padding
    n, c, h, w = x.shape
    z = np.zeros((n, c, h * up, w * up))
    z[:, :, ::up, ::up] = x
    z = np.pad(z, [(0, 0), (0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))])
    z = z[:, :, max(-py0, 0):z.shape[2] - max(-py1, 0), max(-px0, 0):z.shape[3] - max(-px1, 0)]
    kernel = (np.outer(f, f) if f.ndim == 1 else f) * gain
    kh, kw = kernel.shape
    out = np.zeros((n, c, z.shape[2] - kh + 1, z.shape[3] - kw + 1))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            for a in range(kh):
                for b in range(kw):  # a true convolution: the kernel reversed
                    out[:, :, i, j] += z[:, :, i + a, j + b] * kernel[kh - 1 - a, kw - 1 - b]
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("up, down", [(1, 1), (2, 1), (1, 2), (4, 2), (3, 2)])
@pytest.mark.parametrize("padding", [(0, 0, 0, 0), (3, 2, 1, 4), (-1, 2, 3, -2)])
@pytest.mark.parametrize("separable", [True, False])
def test_upfirdn2d_matches_slow_reference(up, down, padding, separable):
    rng = np.random.default_rng(up * 10 + down)
    x = rng.standard_normal((2, 3, 5, 6))
    f = rng.standard_normal(4 if separable else (4, 3))  # asymmetric: catches a missing flip
    out = upfirdn2d(torch.from_numpy(x), torch.from_numpy(f), up, down, padding, gain=2.5)
    expected = slow_upfirdn2d(x, f, up, down, padding, 2.5)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)


def test_upfirdn2d_without_filter_pads_and_decimates():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    out = upfirdn2d(x, None, up=2, down=1, padding=(1, 0, 0, -1), gain=4.0)
    expected = slow_upfirdn2d(x.numpy(), np.ones(1), 2, 1, (1, 0, 0, -1), 4.0)
    np.testing.assert_allclose(out.numpy(), expected)
    torch.testing.assert_close(upfirdn2d(x, None, down=2), x[:, :, ::2, ::2])


# -- the input and the layers -------------------------------------------------------------------


@pytest.mark.parametrize("zoom", [1.0, 2.5])
def test_fourier_features_by_hand(zoom):
    """Channel c at pixel p is sin(2 pi (f_c . R (zoom p - t) + phase_c)), mixed by weight / sqrt(C); R, t
    from the affine map of w, ``zoom`` through the user transform, which also pushes frequencies past
    the band: those fade out linearly between the bandwidth and Nyquist."""
    torch.manual_seed(0)
    features = FourierFeatures(w_dim=5, channels=6, size=9, rate=4, bandwidth=1.5)
    nn.init.normal_(features.affine.weight)  # a non-trivial rotation and translation
    features.transform.copy_(torch.diag(torch.tensor([zoom, zoom, 1.0])))
    w = torch.randn(2, 5)
    out = features(w).double()
    assert out.shape == (2, 6, 9, 9)
    f, phase = features.freqs.double(), features.phases.double()
    assert (f.norm(dim=1) <= 1.5).all()  # drawn inside the band
    amplitude = (1 - (zoom * f.norm(dim=1) - 1.5) / (4 / 2 - 1.5)).clamp(0, 1)
    assert (amplitude < 1).any() == (zoom > 1)
    t = features.affine(w).double()
    for n in range(2):
        c, s = (t[n, :2] / t[n, :2].norm()).tolist()
        tx, ty = (t[n, 2:] / t[n, :2].norm()).tolist()
        for i, j in ((0, 0), (4, 7), (8, 3)):  # (row, column)
            x, y = zoom * (j + 0.5 - 4.5) / 4, zoom * (i + 0.5 - 4.5) / 4  # pixel centres in image units
            px, py = c * (x - tx) - s * (y - ty), s * (x - tx) + c * (y - ty)
            raw = torch.sin(2 * math.pi * (f[:, 0] * px + f[:, 1] * py + phase)) * amplitude
            expected = features.weight.double() @ raw / math.sqrt(6)
            torch.testing.assert_close(out[n, :, i, j], expected, rtol=1e-4, atol=1e-5)


def test_magnitude_ema_tracks_layer_inputs_in_training_only():
    torch.manual_seed(0)
    G = generator(32, magnitude_half_life=40)
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach())) for layer in G.layers]
    G(torch.randn(8, G.z_dim))
    beta = 0.5 ** (8 / 40)
    for layer, x in zip(G.layers, inputs):
        expected = beta * 1.0 + (1 - beta) * x.square().mean()
        torch.testing.assert_close(layer.magnitude_ema, expected)
    before = [layer.magnitude_ema.clone() for layer in G.layers]
    G.eval()
    G(torch.randn(8, G.z_dim))
    assert all(torch.equal(a, layer.magnitude_ema) for a, layer in zip(before, G.layers))
    for hook in hooks:
        hook.remove()


def test_w_avg_tracks_w_in_training_and_psi_truncates_towards_it():
    torch.manual_seed(0)
    G = generator(32, w_avg_beta=0.5)
    z = torch.randn(6, G.z_dim)
    G(z)
    w = G.mapping(z)
    torch.testing.assert_close(G.w_avg, 0.5 * w.mean(dim=0))
    G.eval()
    torch.testing.assert_close(G.styles(z, psi=0.7), G.w_avg.lerp(w, 0.7)[:, None].expand(-1, G.num_ws, -1))
    images = G(torch.randn(4, G.z_dim), psi=0.0)  # every w is w_avg: one image
    torch.testing.assert_close(images, images[:1].expand_as(images))
    assert G.truncation == "w"


def test_runs_under_bfloat16_autocast():
    torch.manual_seed(0)
    G = generator(32)
    z = torch.randn(2, G.z_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        G(z)  # training: w_avg and the magnitudes stay float32
        G.eval()
        low = G(z, psi=0.5).float()
    assert G.w_avg.dtype == torch.float32 and all(layer.magnitude_ema.dtype == torch.float32 for layer in G.layers)
    full = G(z, psi=0.5)
    assert ((low - full).square().mean() / full.square().mean()).sqrt() < 0.05


def test_label_enters_through_the_mapping():
    torch.manual_seed(0)
    G = generator(32, LatentLabel(role="generator", n_classes=3)).eval()
    z = torch.randn(1, G.z_dim).expand(3, -1)
    images = G(z, torch.tensor([0, 1, 2]))
    assert not torch.allclose(images[0], images[1]) and not torch.allclose(images[1], images[2])


def stylegan3_count(size, ch, ch_max, z_dim, w_dim, mapping_layers, num_layers, kernel=3):
    """Parameters by hand: mapping FCs; the input's affine (4 outputs) and channel mix; per layer the
    style affine (w_dim -> c_in), the conv weight and the bias; toRGB is a 1x1 layer like the others."""
    s = schedule(size, num_layers, 2, 10, ch, ch_max)
    total = (z_dim + 1) * w_dim + (mapping_layers - 1) * (w_dim + 1) * w_dim
    total += (w_dim + 1) * 4 + s.channels[0] ** 2
    for i in range(num_layers + 1):
        c_in, c_out, k = s.channels[max(i - 1, 0)], s.channels[i], 1 if i == num_layers else kernel
        total += (w_dim + 1) * c_in + c_out * c_in * k * k + c_out
    return total


def test_parameter_counts():
    assert parameter_count(generator(32)) == stylegan3_count(32, **{**SMALL})
    assert parameter_count(generator(64, variant="r")) == stylegan3_count(64, **{**SMALL, "ch": 8, "ch_max": 32}, kernel=1)


def test_default_parameter_counts_at_64():
    # The defaults are big (StyleGAN3-T's widths): count them on the meta device, without memory.
    with torch.device("meta"):
        G = build_stylegan3(None, role="generator", image_size=64, conditioner=NoCondition(role="generator"))
        D = build_stylegan3(None, role="discriminator", image_size=64, conditioner=NoCondition(role="discriminator"))
    assert parameter_count(G) == stylegan3_count(64, 64, 512, 512, 512, 2, 14) == 17_479_242
    assert parameter_count(D) == 14_037_569  # StyleGAN2's discriminator with the same ch and ch_max
    with torch.device("meta"):
        D2 = build_stylegan2(StyleGan2Config(), role="discriminator", image_size=64,
                             conditioner=NoCondition(role="discriminator"))
    assert parameter_count(D2) == parameter_count(D)


def test_discriminator_is_stylegan2s():
    torch.manual_seed(0)
    D3 = discriminator(32, mbstd_group=2, mbstd_features=2)
    D2 = build_stylegan2(StyleGan2Config(ch=4, ch_max=16, mbstd_group=2, mbstd_features=2), role="discriminator",
                         image_size=32, conditioner=NoCondition(role="discriminator"))
    assert type(D3) is stylegan2.Discriminator
    D2.load_state_dict(D3.state_dict())  # same layers, same shapes
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(D2(x), D3(x))


# -- equivariance -------------------------------------------------------------------------------


def integer_translation(images, dx, dy):
    """Images moved by (dx, dy) whole pixels, and the mask of the pixels that have a source."""
    out, mask = torch.zeros_like(images), torch.zeros_like(images)
    h, w = images.shape[-2:]
    dst = (..., slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0)))
    out[dst] = images[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    mask[dst] = 1
    return out, mask


def psnr(a, b, mask, peak_to_peak=2.0):
    mse = ((a - b).square() * mask).sum() / mask.sum()
    return 20 * math.log10(peak_to_peak) - 10 * math.log10(mse.item())


@pytest.mark.parametrize("num_layers", [6, 14])
def test_config_t_is_translation_equivariant(num_layers):
    """EQ-T (the paper's integer-translation metric): move the input's coordinates by whole output
    pixels through the user transform and compare with the moved image, at init with random weights."""
    torch.manual_seed(0)
    size = 32
    G = generator(size, ch=8, ch_max=32, num_layers=num_layers).eval()
    nn.init.normal_(G.input.affine.weight)  # every sample its own rotation and translation
    ws = G.styles(torch.randn(4, G.z_dim))
    with torch.no_grad():
        image = G.synthesis(ws)
        scale = 1 / image.abs().amax()  # the images fill [-1, 1]: the PSNR's peak-to-peak is 2, as in the paper
        image = image * scale
        interior = torch.zeros_like(image)
        interior[..., 2:-2, 2:-2] = 1
        for dx, dy in ((3, -2), (-1, 4)):
            G.input.transform.copy_(torch.eye(3))
            G.input.transform[:2, 2] = torch.tensor([-dx / size, -dy / size])  # the inverse transform
            moved = G.synthesis(ws) * scale
            reference, mask = integer_translation(image, dx, dy)
            eq_t = psnr(moved, reference, mask * interior)
            assert eq_t > 30, (dx, dy, eq_t)
            misaligned, _ = integer_translation(image, dx + 1, dy)  # control: one pixel off is far worse
            assert psnr(moved, misaligned, mask * interior) < eq_t - 15


def test_config_r_is_equivariant_to_quarter_turns_and_config_t_is_not():
    """A quarter turn maps the sampling grids onto themselves: config R (1x1 convs, radially symmetric
    filters) commutes with it exactly; config T's 3x3 kernels do not."""
    quarter = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    results = {}
    for variant in ("r", "t"):
        torch.manual_seed(0)
        G = generator(32, variant=variant).eval()
        ws = G.styles(torch.randn(2, G.z_dim))
        with torch.no_grad():
            image = G.synthesis(ws)
            G.input.transform.copy_(quarter)
            turned = G.synthesis(ws)
        expected = torch.rot90(image, 1, dims=(2, 3))
        results[variant] = 10 * math.log10(expected.square().mean() / (turned - expected).square().mean())
    assert results["r"] > 60 and results["t"] < 10, results


# -- through the gan task -----------------------------------------------------------------------


def make_run(gan_config=None, **options):
    return style_gan_run("stylegan3", build_stylegan3, StyleGan3Config(**{**SMALL, **options}), gan_config)


def test_gan_task_steps_with_logistic_loss():
    torch.manual_seed(0)
    task, run, batches = make_run(GanConfig(sample_count=4, truncation=0.7))
    G, D = task.export_modules()["generator"], task.export_modules()["discriminator"]
    assert isinstance(D, stylegan2.Discriminator)
    g0, d0 = snapshot(G), snapshot(D)
    logs = task.train_step(next(batches), step=0)
    assert set(logs) == {"d_loss", "g_loss", "d_real", "d_fake", "d_penalty"}  # lazy R1 due at step 0
    assert all(t.ndim == 0 and torch.isfinite(t) and not t.requires_grad for t in logs.values())
    # Every parameter moves, the input's zero-initialised affine too (through the rotation's sine
    # and the translation; the cosine's gradient is 0 at the identity, the others' are not).
    assert all(not torch.equal(a, b) for a, b in zip(g0, G.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(d0, D.parameters()))
    assert all(layer.magnitude_ema != 1 for layer in G.layers) and G.w_avg.abs().sum() > 0
    for a, b in zip(task.ema.buffers(), G.buffers()):  # w_avg and the magnitudes follow G
        torch.testing.assert_close(a, b)
    images = task.sample(next(batches))["image"]  # psi truncation on the EMA generator
    assert images.shape == (4, 3, 32, 32) and images.abs().max() <= 1


# -- registration and options -------------------------------------------------------------------


def test_registers_like_a_plugin_and_options_are_checked():
    from handforge.recipe import structure

    entry = registered_entry(stylegan3, "backbone", "stylegan3")
    assert entry.config_cls is StyleGan3Config and entry.summary
    bad = {"variant": "q", "num_layers": 0, "margin": -1, "ch": "64"}
    assert rejected_options(StyleGan3Config, bad) == [
        "model.generator.ch", "model.generator.margin", "model.generator.num_layers", "model.generator.variant"]
    config = structure({"variant": "r", "num_layers": 8, "mbstd_group": 2}, StyleGan3Config, "g", [])
    assert (config.variant, config.num_layers, config.mbstd_group) == ("r", 8, 2)
