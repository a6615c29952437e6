"""StyleGAN3 generator (Karras et al. 2021, "Alias-Free Generative Adversarial Networks"), laid out as
the official PyTorch code, with StyleGAN2's discriminator, for any power-of-two size >= 8.

The generator treats every feature map as samples of a continuous, band-limited signal and keeps
each layer from creating frequencies its sampling rate cannot hold, so that the image moves with
the input (translation equivariance, config T) and also turns with it (config R):

- mapping network: StyleGAN2's (``stylegan2.MappingNetwork``), so ``cadain`` enters through
  ``conditioner.latent(cond)`` as there; 2 layers by default (StyleGAN3's). The running average
  ``w_avg`` (decay ``w_avg_beta`` per training forward) and ``forward(z, cond, psi=...)`` give the
  truncation trick in W as in ``stylegan2`` (``truncation = "w"``). No style mixing, no noise
  inputs, no path length regularisation (StyleGAN3 turns all three off);
- input: Fourier features, ``sin(2 pi (f . (x, y) + phase))`` for random frequencies f inside a
  disc of radius 2 (cycles per image: the first cutoff), sampled on a grid that extends ``margin``
  pixels beyond the image, then mixed by a learned channel matrix. An affine map of w gives a
  rotation and translation of those coordinates (starting at identity); a fixed ``transform``
  buffer (identity) lets a user move the output: the equivariance tests shift the image through it;
- ``num_layers`` layers, each: the input scaled by 1 / sqrt of a running mean of its second
  moment (per layer, half-life ``magnitude_half_life`` images; the output scale stays stable as
  the weights change), a modulated 3x3 conv (1x1 in config R) with demodulation (StyleGAN2's
  ``ModulatedConv2d``, run as a 'full' convolution), bias, then the *filtered leaky ReLU*:
  upsample (zeros between samples, Kaiser-windowed sinc low-pass at the input cutoff), leaky ReLU
  0.2 with gain sqrt(2) at twice the higher of the input and output rates (the nonlinearity's new
  harmonics fall where the next filter removes them), low-pass at the output cutoff and decimate
  to the output rate; clamped to +-256 as StyleGAN3 does. Config R's downsampling filters are
  radially symmetric (jinc, Kaiser-windowed) except in the critically sampled last layers;
- toRGB: modulated 1x1 without demodulation, bias; output scaled by 1/4 (StyleGAN3's
  ``output_scale``), linear in training and clamped to [-1, 1] in eval mode, as ``stylegan2``.

The layer schedule is StyleGAN3's, derived from the image size S: cutoffs f_c go geometrically from
2 to S / 2 over the first ``num_layers - num_critical`` layers, then stay there;
minimum stopbands f_t likewise from 2^2.1 to (S / 2) 2^0.3. Each layer's sampling rate is the
smallest power of two >= 2 f_t (at most S), its transition half-width max(f_t, rate / 2) - f_c, its
grid rate + 2 ``margin`` pixels (the last two layers, critically sampled: exactly S), and its width
``min(ch_max, ch * (S / 2) / f_c)``: ``ch`` at the last layers, more where the band is narrower
(StyleGAN3's ``channel_base / 2 / f_c`` with ``channel_base = ch * S``; config R doubles ``ch`` and
``ch_max`` as StyleGAN3-R does). Fewer layers (``num_layers``) keep the same end points.

Resampling is ``upfirdn2d`` (upsample, pad, FIR filter, downsample) in plain torch: separable
filters as two depthwise 1-D convolutions, the decimation as their stride.

Discriminator: StyleGAN2's (``stylegan2.Discriminator``, as StyleGAN3 trains with), built from this
config's ``ch``, ``ch_max``, ``mbstd_group`` and ``mbstd_features``.
"""
import math
from typing import Literal

import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F
from attrs import validators as v

from handforge import hookimpl
from handforge.errors import HandforgeError

from . import stylegan2
from .pairs import ROLES, check_size
from .stylegan2 import (EqualLinear, MappingNetwork, ModulatedConv2d, SharedStyleOptions, StyleGan2Config,
                        check_generator_conditioner)

# StyleGAN3's fixed hyperparameters (networks_stylegan3.py defaults).
FIRST_CUTOFF = 2.0  # f_c of the input and first layer, cycles per image
FIRST_STOPBAND = 2 ** 2.1  # minimum stopband of the first layer
LAST_STOPBAND_REL = 2 ** 0.3  # minimum stopband of the last layer, relative to its cutoff S / 2
FILTER_SIZE = 6  # low-pass taps per sample of the lower rate
LRELU_UPSAMPLING = 2  # the nonlinearity runs at this multiple of the layer's higher rate
CONV_CLAMP = 256.0
OUTPUT_SCALE = 0.25


@attrs.define
class StyleGan3Config(SharedStyleOptions):
    variant: Literal["t", "r"] = attrs.field(default="t", metadata={
        "help": "generator only: 't' translation equivariant (3x3 convs), 'r' also rotation equivariant "
                "(1x1 convs, radially symmetric downsampling filters, twice the widths)"})
    ch: int = attrs.field(default=64, validator=v.ge(1), metadata={
        "help": "channels of the last layers (and D's at full resolution); narrower bands get more, up to ch_max"})
    ch_max: int = attrs.field(default=512, validator=v.ge(1), metadata={"help": "the widest layer (channel_max)"})
    # StyleGAN3's own defaults for two of the mapping network's options.
    mapping_layers: int = attrs.field(default=2, validator=v.ge(1), metadata={
        "help": "generator only: fully connected layers of the mapping network (StyleGAN3: 2)"})
    w_avg_beta: float = attrs.field(default=0.998, validator=[v.ge(0.0), v.lt(1.0)], metadata={
        "help": "generator only: decay of the running average of w (truncation's centre)"})
    num_layers: int = attrs.field(default=14, validator=v.ge(1), metadata={
        "help": "generator only: synthesis layers between the Fourier features and toRGB (StyleGAN3: 14; "
                "fewer for small models, the cutoff schedule keeps its end points)"})
    num_critical: int = attrs.field(default=2, validator=v.ge(0), metadata={
        "help": "generator only: last layers sampled critically (cutoff = Nyquist, no margin)"})
    margin: int = attrs.field(default=10, validator=v.ge(0), metadata={
        "help": "generator only: pixels computed beyond the image on each side, so borders do not leak in"})
    magnitude_half_life: int = attrs.field(default=20000, validator=v.ge(1), metadata={
        "help": "generator only: half-life, in images, of each layer's running input magnitude (StyleGAN3: 20k)"})


# -- the layer schedule -------------------------------------------------------------------------


@attrs.frozen
class Schedule:
    """Per layer i = 0..num_layers (0: the Fourier features and the first layer's input; num_layers:
    toRGB): cutoff f_c, minimum stopband f_t, sampling rate, transition half-width, grid size, width."""

    cutoffs: list
    stopbands: list
    rates: list
    half_widths: list
    sizes: list
    channels: list


def schedule(image_size: int, num_layers: int, num_critical: int, margin: int, ch: int, ch_max: int) -> Schedule:
    last_cutoff = image_size / 2
    last_stopband = last_cutoff * LAST_STOPBAND_REL
    exponents = [min(i / (num_layers - num_critical), 1.0) for i in range(num_layers + 1)]
    cutoffs = [FIRST_CUTOFF * (last_cutoff / FIRST_CUTOFF) ** e for e in exponents]
    stopbands = [FIRST_STOPBAND * (last_stopband / FIRST_STOPBAND) ** e for e in exponents]
    rates = [2 ** math.ceil(math.log2(min(2 * t, image_size))) for t in stopbands]
    half_widths = [max(t, s / 2) - c for t, s, c in zip(stopbands, rates, cutoffs)]
    sizes = [s + 2 * margin for s in rates[:-2]] + [image_size] * 2
    channels = [max(1, round(min(ch * last_cutoff / c, ch_max))) for c in cutoffs[:-1]] + [3]
    return Schedule(cutoffs, stopbands, rates, half_widths, sizes, channels)


# -- filter design (scipy.signal.firwin and StyleGAN3's jinc filter, without scipy) ---------------


def kaiser_beta(numtaps: int, width: float, fs: float) -> float:
    """Kaiser's window parameter for a transition band ``width`` wide (scipy kaiser_atten + kaiser_beta)."""
    atten = 2.285 * (numtaps - 1) * math.pi * (width / (fs / 2)) + 7.95  # stopband attenuation, dB
    if atten > 50:
        return 0.1102 * (atten - 8.7)
    if atten > 21:
        return 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21)
    return 0.0


def lowpass_filter(numtaps: int, cutoff: float, width: float, fs: float, radial: bool = False):
    """Low-pass FIR at ``cutoff`` for sampling rate ``fs``, unit DC gain: a windowed sinc (1-D,
    applied separably), or with ``radial`` a 2-D windowed jinc (radially symmetric); None for 1 tap."""
    if numtaps == 1:
        return None
    window = torch.kaiser_window(numtaps, periodic=False, beta=kaiser_beta(numtaps, width, fs), dtype=torch.float64)
    t = torch.arange(numtaps, dtype=torch.float64) - (numtaps - 1) / 2  # symmetric about the centre
    if not radial:
        f = torch.sinc(2 * cutoff / fs * t) * window
    else:
        r = torch.hypot(t[:, None] / fs, t[None, :] / fs)
        # jinc: the 2-D ideal low-pass; its limit at r = 0 (an odd numtaps) is pi cutoff^2.
        x = 2 * math.pi * cutoff * r
        f = torch.where(r > 0, torch.special.bessel_j1(x) / (math.pi * r.clamp_min(1e-30)), math.pi * cutoff ** 2)
        f = f * torch.outer(window, window)
    return (f / f.sum()).float()


# -- upfirdn2d ----------------------------------------------------------------------------------


def _upfir1d(x: torch.Tensor, f, up: int, down: int, pad0: int, pad1: int, dim: int, gain: float) -> torch.Tensor:
    """upfirdn along ``dim`` (2: height, 3: width) with a 1-D filter ``f`` (None: a single tap of 1)."""
    pad = (lambda a, b: [a, b, 0, 0]) if dim == 3 else (lambda a, b: [0, 0, a, b])  # noqa: E731
    if f is None:
        if up > 1:  # zeros after every sample
            n, c, h, w = x.shape
            x = (F.pad(x[..., None], [0, up - 1]).reshape(n, c, h, w * up) if dim == 3
                 else F.pad(x[:, :, :, None], [0, 0, 0, up - 1]).reshape(n, c, h * up, w))
        x = F.pad(x, pad(pad0, pad1))  # negative pads crop
        x = x * gain if gain != 1 else x
        return x[..., ::down] if dim == 3 else x[:, :, ::down]
    k, channels = len(f), x.shape[1]
    shape = (1, k) if dim == 3 else (k, 1)
    if up > 1:
        # A stride-`up` transposed conv is the full convolution of the zero-stuffed signal (never
        # multiplying the inserted zeros): positions 0 .. (L - 1) up + k - 1. upfirdn's valid convolution
        # of the padded signal is its positions k - 1 - pad0 .. L up + pad1 - 1 (zero past its ends).
        weight = (f * gain).to(x.dtype).reshape(shape)[None, None].expand(channels, 1, *shape)
        x = F.conv_transpose2d(x, weight, stride=(1, up) if dim == 3 else (up, 1), groups=channels)
        x = F.pad(x, pad(pad0 - (k - 1), pad1 + up - k))
        return x[..., ::down] if dim == 3 else x[:, :, ::down]
    weight = (f * gain).flip(0).to(x.dtype).reshape(shape)[None, None].expand(channels, 1, *shape)  # conv2d correlates
    return F.conv2d(F.pad(x, pad(pad0, pad1)), weight, stride=(1, down) if dim == 3 else (down, 1), groups=channels)


def upfirdn2d(x: torch.Tensor, f=None, up: int = 1, down: int = 1, padding=(0, 0, 0, 0), gain: float = 1.0):
    """StyleGAN's upfirdn2d on (N, C, H, W): insert up - 1 zeros after every sample, pad by ``padding``
    = (x0, x1, y0, y1) (negative crops), convolve with ``f`` times ``gain`` (1-D: separable, the 2-D
    kernel is outer(f, f); 2-D: as is; None: identity), keep every ``down``-th sample from the first."""
    px0, px1, py0, py1 = padding
    if f is None or f.ndim == 1:
        x = _upfir1d(x, f, up, down, px0, px1, dim=3, gain=math.sqrt(gain))
        return _upfir1d(x, f, up, down, py0, py1, dim=2, gain=math.sqrt(gain))
    n, c, h, w = x.shape
    if up > 1:
        x = F.pad(x[:, :, :, None, :, None], [0, up - 1, 0, 0, 0, up - 1]).reshape(n, c, h * up, w * up)
    x = F.pad(x, [px0, px1, py0, py1])
    weight = (f * gain).flip(0, 1).to(x.dtype)[None, None].expand(c, 1, *f.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def filtered_lrelu(x, up_filter, down_filter, bias, up: int, down: int, padding, gain: float, slope: float):
    """Bias, upsample, leaky ReLU (times gain, clamped), downsample: StyleGAN3's reference filtered_lrelu."""
    x = x + bias.to(x.dtype)[:, None, None]
    # up^2: the inserted zeros lower the mean by that. The activation gain is folded in too, as
    # lrelu(g x) = g lrelu(x) for g > 0: one pass less over the largest tensor.
    x = upfirdn2d(x, up_filter, up=up, padding=padding, gain=up ** 2 * gain)
    x = (F.leaky_relu(x, slope) if slope != 1 else x).clamp(-CONV_CLAMP, CONV_CLAMP)
    return upfirdn2d(x, down_filter, down=down)


# -- generator layers ---------------------------------------------------------------------------


class FourierFeatures(nn.Module):
    """The input: Fourier features on a grid of ``size`` pixels at ``rate`` samples per image unit,
    rotated and translated by an affine map of w, then mixed by a learned channel matrix."""

    def __init__(self, w_dim: int, channels: int, size: int, rate: float, bandwidth: float):
        super().__init__()
        self.size, self.rate, self.bandwidth = size, rate, bandwidth
        # Frequencies spread over the disc of radius `bandwidth` (StyleGAN3's draw), phases uniform.
        freqs = torch.randn(channels, 2)
        radii = freqs.square().sum(dim=1, keepdim=True).sqrt()
        freqs = freqs / (radii * radii.square().exp().pow(0.25)) * bandwidth
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", torch.rand(channels) - 0.5)
        self.register_buffer("transform", torch.eye(3))  # the user's inverse transform of the output
        self.weight = nn.Parameter(torch.randn(channels, channels))
        self.affine = EqualLinear(w_dim, 4)  # (cos, sin, tx, ty) of the inverse rotation and translation
        with torch.no_grad():  # starts at no rotation, no translation
            self.affine.weight.zero_()
            self.affine.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))

    def forward(self, w):
        # In float32 even under autocast: half-precision coordinates times frequencies would jitter the
        # phases, and with them the equivariance (StyleGAN3 keeps its input in float32 too).
        with torch.autocast(w.device.type, enabled=False):
            return self._features(w.float())

    def _features(self, w):
        n = w.shape[0]
        t = self.affine(w)
        t = t / t[:, :2].norm(dim=1, keepdim=True)  # a pure rotation
        rotate = torch.eye(3, device=w.device, dtype=t.dtype).repeat(n, 1, 1)
        rotate[:, 0, 0], rotate[:, 0, 1], rotate[:, 1, 0], rotate[:, 1, 1] = t[:, 0], -t[:, 1], t[:, 1], t[:, 0]
        translate = torch.eye(3, device=w.device, dtype=t.dtype).repeat(n, 1, 1)
        translate[:, 0, 2], translate[:, 1, 2] = -t[:, 2], -t[:, 3]
        transforms = rotate @ translate @ self.transform  # rotate the image, then translate, then the user's
        phases = self.phases + (self.freqs @ transforms[:, :2, 2:]).squeeze(2)  # (N, C)
        freqs = self.freqs @ transforms[:, :2, :2]  # (N, C, 2)
        # A user transform can push frequencies past the band: fade them out before they would alias.
        amplitudes = (1 - (freqs.norm(dim=2) - self.bandwidth) / (self.rate / 2 - self.bandwidth)).clamp(0, 1)
        # Pixel centres in image units (the image is 1 wide, centred at 0): affine_grid's, align_corners=False.
        coords = (torch.arange(self.size, device=w.device, dtype=t.dtype) + 0.5 - self.size / 2) / self.rate
        grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=-1)  # (H, W, xy)
        x = torch.einsum("hwk,nck->nhwc", grid, freqs) + phases[:, None, None]
        x = torch.sin(x * (2 * math.pi)) * amplitudes[:, None, None]
        x = x @ (self.weight / math.sqrt(self.weight.shape[0])).T
        return x.permute(0, 3, 1, 2)  # (N, C, H, W), channels_last in memory


class AliasFreeLayer(nn.Module):
    """Magnitude-normalised modulated conv, then the filtered leaky ReLU between two sampling rates;
    ``torgb``: 1x1, no demodulation, linear, no resampling."""

    def __init__(self, s: Schedule, i: int, w_dim: int, *, kernel: int, torgb: bool, radial: bool,
                 critical: bool, half_life: int):
        super().__init__()
        j = max(i - 1, 0)  # the previous layer's index: this layer's input
        self.kernel, self.torgb, self.half_life = (1 if torgb else kernel), torgb, half_life
        self.conv = ModulatedConv2d(s.channels[j], s.channels[i], self.kernel, w_dim, demodulate=not torgb)
        self.bias = nn.Parameter(torch.zeros(s.channels[i]))
        self.register_buffer("magnitude_ema", torch.ones(()))
        rate_in, rate_out = s.rates[j], s.rates[i]
        rate_tmp = max(rate_in, rate_out) * (1 if torgb else LRELU_UPSAMPLING)
        self.up, self.down = rate_tmp // rate_in, rate_tmp // rate_out
        up_taps = FILTER_SIZE * self.up if self.up > 1 and not torgb else 1
        down_taps = FILTER_SIZE * self.down if self.down > 1 and not torgb else 1
        # Not saved: the filters follow from the options (None: a single tap, no filtering).
        self.register_buffer("up_filter", lowpass_filter(up_taps, s.cutoffs[j], 2 * s.half_widths[j], rate_tmp),
                             persistent=False)
        self.register_buffer("down_filter", lowpass_filter(down_taps, s.cutoffs[i], 2 * s.half_widths[i], rate_tmp,
                                                           radial=radial and not critical), persistent=False)
        # Padding of the upsampled signal so that the output has exactly size_out samples, centred
        # (StyleGAN3 appendix C.3: samples sit at pixel centres).
        size_in, size_out = s.sizes[j], s.sizes[i]
        total = (size_out - 1) * self.down + 1 - (size_in + self.kernel - 1) * self.up + up_taps + down_taps - 2
        lo = (total + self.up) // 2
        self.padding = (lo, total - lo, lo, total - lo)

    def forward(self, x, w):
        if self.training:
            with torch.no_grad():
                beta = 0.5 ** (x.shape[0] / self.half_life)
                self.magnitude_ema.copy_(x.detach().float().square().mean().lerp(self.magnitude_ema, beta))
        x = x * self.magnitude_ema.rsqrt().to(x.dtype)
        p = self.kernel // 2  # with the conv's own 'same' padding: a 'full' convolution, size + kernel - 1
        x = self.conv(F.pad(x, [p, p, p, p]) if p else x, w)
        gain, slope = (1.0, 1.0) if self.torgb else (math.sqrt(2), 0.2)
        return filtered_lrelu(x, self.up_filter, self.down_filter, self.bias, self.up, self.down, self.padding,
                              gain, slope)


class Generator(nn.Module):
    truncation = "w"  # the gan task's `truncation` option is psi, passed as forward(..., psi=)

    def __init__(self, config: StyleGan3Config, image_size: int, conditioner):
        super().__init__()
        check_generator_conditioner(conditioner, "stylegan3")
        r = config.variant == "r"
        self.schedule = s = schedule(image_size, config.num_layers, config.num_critical, config.margin,
                                     config.ch * (2 if r else 1), config.ch_max * (2 if r else 1))
        self.config, self.conditioner = config, conditioner  # the conditioner only makes vectors
        self.z_dim, self.w_dim = config.z_dim, config.w_dim
        self.mapping = MappingNetwork(config.z_dim, conditioner.latent_dim, config.w_dim,
                                      config.mapping_layers, config.mapping_lr_mul)
        self.input = FourierFeatures(config.w_dim, s.channels[0], s.sizes[0], s.rates[0], s.cutoffs[0])
        n = config.num_layers
        self.layers = nn.ModuleList([
            AliasFreeLayer(s, i, config.w_dim, kernel=1 if r else 3, torgb=i == n, radial=r,
                           critical=i >= n - config.num_critical, half_life=config.magnitude_half_life)
            for i in range(n + 1)])
        self.num_ws = n + 2  # the input's transform, the layers, toRGB
        self.register_buffer("w_avg", torch.zeros(config.w_dim))

    def styles(self, z, cond=None, psi=None):
        """The per-layer w, (N, num_ws, w_dim): mapped, truncated towards w_avg (psi)."""
        w = self.mapping(z, self.conditioner.latent(cond))
        if self.training:
            with torch.no_grad():
                # float(): under autocast w can be half precision, the average stays float32.
                self.w_avg.copy_(w.detach().float().mean(dim=0).lerp(self.w_avg, self.config.w_avg_beta))
        ws = w[:, None].expand(-1, self.num_ws, -1)
        return ws if psi is None or psi == 1 else self.w_avg.to(ws.dtype).lerp(ws, psi)

    def synthesis(self, ws):
        x = self.input(ws[:, 0])
        for i, layer in enumerate(self.layers):
            x = layer(x, ws[:, i + 1])
        return x * OUTPUT_SCALE

    def forward(self, z, cond=None, psi=None):
        img = self.synthesis(self.styles(z, cond, psi))
        # Linear in training, as StyleGAN3; samples are images: [-1, 1] (as stylegan2).
        return img if self.training else img.clamp(-1, 1)


def build_stylegan3(config, *, role, image_size, conditioner, n_classes=0, **_):
    """StyleGAN3 (Karras et al. 2021): alias-free generator (config T or R), StyleGAN2's discriminator."""
    config = config or StyleGan3Config()
    check_size("stylegan3", image_size, role)
    if role == "discriminator":
        width = stylegan2.widths(image_size, config.ch, config.ch_max)[0]  # at 4x4
        if width % config.mbstd_features:
            raise HandforgeError(f"backbone 'stylegan3': mbstd_features ({config.mbstd_features}) must divide "
                                 f"the discriminator's 4x4 width ({width})")
        d_config = StyleGan2Config(ch=config.ch, ch_max=config.ch_max, mbstd_group=config.mbstd_group,
                                   mbstd_features=config.mbstd_features)
        return stylegan2.Discriminator(d_config, image_size, conditioner)
    if config.num_layers <= config.num_critical:
        raise HandforgeError(f"backbone 'stylegan3': num_layers ({config.num_layers}) must exceed num_critical "
                             f"({config.num_critical}): the cutoffs grow over the layers before the critical ones")
    return Generator(config, image_size, conditioner)


@hookimpl
def register_backbones(register):
    register("stylegan3", build_stylegan3, config=StyleGan3Config, roles=ROLES)
