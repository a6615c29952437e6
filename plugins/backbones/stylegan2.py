"""StyleGAN2 generator and discriminator (Karras et al. 2020, "Analyzing and Improving the Image
Quality of StyleGAN"), laid out as StyleGAN2-ADA's PyTorch code, for any power-of-two size >= 8.

Generator (skip architecture):

- mapping network: z, normalised to unit second moment; when the g_conditioner has a latent
  (``cadain``: the scaled one-hot label), ``latent(cond)`` embedded by a linear layer to ``w_dim``
  and normalised likewise is concatenated to it (StyleGAN2-ADA's conditional mapping: the label
  weighs as much as z); then ``mapping_layers`` fully connected layers with leaky ReLU and a
  learning-rate multiplier ``mapping_lr_mul`` give w;
- synthesis network: a learned 4x4 constant; one modulated 3x3 conv at 4x4, then per resolution
  an upsampling modulated 3x3 conv (transposed conv, then the [1,3,3,1] filter) and a modulated
  3x3 conv. Every conv is followed by a noise input (one map per layer, scaled by a learned
  strength that starts at 0), a bias and leaky ReLU. Each resolution has a modulated 1x1 toRGB
  (not demodulated); the RGB outputs are upsampled with the [1,3,3,1] filter and summed.
- a modulated conv scales the input channels by the style s = A(w) (a per-layer affine map, bias
  1) and demodulates: its output channel o is divided by sqrt(sum_{i,k} (W[o,i,k] s_i)^2 + 1e-8),
  so unit-variance inputs give unit-variance outputs. It is computed for the whole batch with the
  shared weight (input scaled by s, output by the demodulation coefficients), as StyleGAN2-ADA
  trains: plain convolutions, channels_last friendly;
- w per layer: ``num_ws = 2 log2(size) - 2`` copies of w (a toRGB shares its w with the next
  block's first conv). In training, style mixing (``style_mixing``: the probability per batch)
  switches to the w of a second z from a random layer on, and the running average ``w_avg`` of w
  (a buffer, decay ``w_avg_beta`` per training forward) is tracked. ``forward(z, cond, psi=...)``
  applies the truncation trick in W: w <- w_avg + psi (w - w_avg) (``truncation = "w"`` tells the
  gan task to use its ``truncation`` option as psi). ``w_avg`` is one average over all
  conditions, as in StyleGAN2-ADA: with labels, small psi also pulls towards the average class;
- ``forward(..., rng=...)`` draws the noise inputs from that CPU generator (deterministic sample
  grids); the output is linear in training (as StyleGAN2) and clamped to [-1, 1] in eval mode;
- path length regularisation (``pl_weight`` > 0): ``g_penalty(z, cond, step)``, which the gan task
  adds to the generator's loss, every ``pl_interval``-th step on ``1 / pl_batch_shrink`` of the
  batch, scaled by the interval (lazy regularisation): pl_weight * (|J_w^T y| - a)^2, y ~ N(0, I)
  / sqrt(H W) image noise, a the running mean of the lengths (decay ``pl_decay``).

The generator takes conditions through its mapping network only (``none``, ``cadain``): it has no
normalisation layers for ``cbn`` or ``spade`` to modulate, and refuses them.

Discriminator (residual architecture): 1x1 fromRGB on the image and the d_conditioner's
``merge_input`` channels (``concat``), then per resolution a block conv3x3 - conv3x3 with
[1,3,3,1]-filtered stride-2 downsampling, plus a filtered-downsampled 1x1 skip, both scaled by
sqrt(1/2); at 4x4 the minibatch standard deviation (``mbstd_group`` samples, ``mbstd_features``
channels), conv3x3, a fully connected layer and the conditioner's head (``projection``...).

Widths: ``min(ch_max, ch * image_size // r)`` channels at resolution r (StyleGAN2's
``min(channel_base / r, channel_max)`` with ``channel_base = ch * image_size``): ``ch`` at full
resolution, doubling per halving up to ``ch_max``; at 256 px the defaults give StyleGAN2-ADA's
"paper256" widths. Equalised learning rate everywhere: weights are N(0, 1) (N(0, 1/lr_mul^2) in the
mapping network) and scaled by lr_mul / sqrt(fan_in) at run time; leaky ReLU 0.2 with gain sqrt(2).
"""
import math

import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F
from attrs import validators as v

from handforge import hookimpl
from handforge.errors import HandforgeError

from .pairs import ROLES, pick_network


@attrs.define
class SharedStyleOptions:
    """What StyleGAN3 shares with StyleGAN2: the mapping network z (+ label) -> w, and the
    discriminator (StyleGAN3 trains with StyleGAN2's) with its minibatch standard deviation."""

    z_dim: int = attrs.field(default=512, validator=v.ge(1))  # generator only
    w_dim: int = attrs.field(default=512, validator=v.ge(1))  # generator only: mapping output, style input
    mapping_layers: int = attrs.field(default=8, validator=v.ge(1), metadata={
        "help": "generator only: fully connected layers of the mapping network (StyleGAN2: 8; "
                "StyleGAN2-ADA's small-data configs: 2)"})
    mapping_lr_mul: float = attrs.field(default=0.01, validator=v.gt(0.0), metadata={
        "help": "generator only: learning-rate multiplier of the mapping network"})
    w_avg_beta: float = attrs.field(default=0.995, validator=[v.ge(0.0), v.lt(1.0)], metadata={
        "help": "generator only: decay of the running average of w (truncation's centre)"})
    mbstd_group: int = attrs.field(default=4, validator=v.ge(1), metadata={
        "help": "discriminator only: minibatch standard deviation over groups of this many samples"})
    mbstd_features: int = attrs.field(default=1, validator=v.ge(1), metadata={
        "help": "discriminator only: minibatch standard deviation channels (must divide the 4x4 width)"})


@attrs.define
class StyleGan2Config(SharedStyleOptions):
    ch: int = attrs.field(default=64, validator=v.ge(1), metadata={
        "help": "channels at full resolution, doubling per halving up to ch_max"})
    ch_max: int = attrs.field(default=512, validator=v.ge(1), metadata={"help": "the widest layer (channel_max)"})
    style_mixing: float = attrs.field(default=0.9, validator=[v.ge(0.0), v.le(1.0)], metadata={
        "help": "generator only: probability per training batch of mixing the styles of two z"})
    pl_weight: float = attrs.field(default=0.0, validator=v.ge(0.0), metadata={
        "help": "generator only: path length regularisation weight (StyleGAN2: 2); 0 = off"})
    pl_interval: int = attrs.field(default=4, validator=v.ge(1), metadata={
        "help": "generator only: lazy path length regularisation every N generator steps, scaled by N"})
    pl_decay: float = attrs.field(default=0.01, validator=[v.gt(0.0), v.le(1.0)], metadata={
        "help": "generator only: update rate of the path lengths' running mean"})
    pl_batch_shrink: int = attrs.field(default=2, validator=v.ge(1), metadata={
        "help": "generator only: path length regularisation runs on batch / N samples"})


def widths(image_size: int, ch: int, ch_max: int) -> list[int]:
    """Channels at resolutions 4, 8, ..., image_size."""
    return [min(ch_max, ch * image_size // (4 << i)) for i in range(image_size.bit_length() - 2)]


# -- equalised learning rate, filters -----------------------------------------------------------


def lrelu(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Leaky ReLU 0.2 with StyleGAN's gain sqrt(2), which keeps the activations' second moment."""
    return F.leaky_relu(x, 0.2) * (math.sqrt(2) * gain)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def fir_kernel() -> torch.Tensor:
    """The [1,3,3,1] filter, outer product, normalised to sum 1: bilinear resampling by 2."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = torch.outer(taps, taps)
    return kernel / kernel.sum()


def _depthwise(kernel: torch.Tensor, channels: int, x: torch.Tensor) -> torch.Tensor:
    return kernel.to(x.dtype)[None, None].expand(channels, 1, *kernel.shape)


def blur(x: torch.Tensor, kernel: torch.Tensor, padding: int, stride: int = 1, gain: float = 1.0) -> torch.Tensor:
    """Each channel filtered by ``kernel`` (symmetric, so correlation = convolution), zero padding."""
    return F.conv2d(x, _depthwise(kernel * gain, x.shape[1], x), stride=stride, padding=padding, groups=x.shape[1])


def upsample2(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """2x upsampling: zeros between the pixels, then the filter (gain 4), aligned as StyleGAN2's
    upfirdn2d(up=2, pad=(2, 1)); a transposed stride-2 conv does both in one call."""
    return F.conv_transpose2d(x, _depthwise(kernel * 4, x.shape[1], x), stride=2, padding=1, groups=x.shape[1])


class EqualLinear(nn.Module):
    """Fully connected layer with equalised learning rate: y = (lr_mul / sqrt(in)) W x + lr_mul b,
    W ~ N(0, 1 / lr_mul^2); optionally leaky ReLU."""

    def __init__(self, c_in: int, c_out: int, *, bias_init: float = 0.0, lr_mul: float = 1.0, activate=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((c_out,), float(bias_init)))
        self.scale, self.lr_mul, self.activate = lr_mul / math.sqrt(c_in), lr_mul, activate

    def forward(self, x):
        x = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return lrelu(x) if self.activate else x


class EqualConv2d(nn.Module):
    """Conv with equalised learning rate (weight scaled by 1 / sqrt(fan_in)), 'same' padding, or
    with ``down``: the [1,3,3,1] filter, then a stride-2 conv (StyleGAN2's conv2d_resample).
    The output is multiplied by ``gain`` after the optional leaky ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, bias=True, activate=False, down=False, gain=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale, self.kernel, self.activate, self.down, self.gain = (
            1 / math.sqrt(c_in * kernel * kernel), kernel, activate, down, gain)
        if down:
            self.register_buffer("fir", fir_kernel(), persistent=False)

    def forward(self, x):
        weight = self.weight * self.scale
        if not self.down:
            x = F.conv2d(x, weight, self.bias, padding=self.kernel // 2)
        elif self.kernel == 1:  # filter and subsample first: the 1x1 conv then sees a quarter of the pixels
            x = F.conv2d(blur(x, self.fir, padding=1, stride=2), weight, self.bias)
        else:  # pad (k + 1) // 2 each side: H + 1 filtered positions, then a valid stride-2 conv gives H / 2
            x = F.conv2d(blur(x, self.fir, padding=(self.kernel + 1) // 2), weight, self.bias, stride=2)
        if self.activate:
            return lrelu(x, self.gain)
        return x * self.gain if self.gain != 1 else x


# -- generator layers ---------------------------------------------------------------------------


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution: weight W[o,i] s_i per sample, demodulated (optional) to
    unit norm per output channel; ``up``: transposed stride-2 conv, then the [1,3,3,1] filter.

    Computed without per-sample weights: conv(x * s, W) * d equals conv(x, W s d) because the
    scalings are per input and per output channel (StyleGAN2-ADA's non-fused path)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, w_dim: int, *, demodulate=True, up=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.affine = EqualLinear(w_dim, c_in, bias_init=1.0)  # styles start at 1: plain convs
        self.scale = 1 / math.sqrt(c_in * kernel * kernel)
        self.kernel, self.demodulate, self.up = kernel, demodulate, up
        if up:
            self.register_buffer("fir", fir_kernel(), persistent=False)

    def forward(self, x, w):
        styles = self.affine(w)  # (N, c_in)
        weight = self.weight * self.scale
        x = x * styles[:, :, None, None].to(x.dtype)
        if self.up:
            # (H - 1) * 2 + 3 = 2H + 1 positions; the 4-tap filter with padding 1 brings them to 2H.
            x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
            x = blur(x, self.fir, padding=1, gain=4)
        else:
            x = F.conv2d(x, weight, padding=self.kernel // 2)
        if self.demodulate:
            # sum_{i,k} (W[o,i,k] s_i)^2 = sum_i s_i^2 sum_k W[o,i,k]^2: one (N, c_in) x (c_in, c_out) product.
            coefficients = (styles.square() @ weight.square().sum(dim=(2, 3)).T + 1e-8).rsqrt()
            x = x * coefficients[:, :, None, None].to(x.dtype)
        return x


class StyleLayer(nn.Module):
    """Modulated 3x3 conv, then noise (learned strength, 0 at first), bias and leaky ReLU."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, up=False):
        super().__init__()
        self.conv = ModulatedConv2d(c_in, c_out, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x, w, rng=None):
        x = self.conv(x, w)
        shape = (x.shape[0], 1, x.shape[2], x.shape[3])
        if rng is None:
            noise = torch.randn(shape, device=x.device, dtype=x.dtype)
        else:
            noise = torch.randn(shape, generator=rng).to(x.device, x.dtype)
        return lrelu(x + noise * self.noise_strength + self.bias[:, None, None])


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB without demodulation, plus a bias; linear."""

    def __init__(self, c_in: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(c_in, 3, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x, w):
        return self.conv(x, w) + self.bias[:, None, None]


class SynthesisBlock(nn.Module):
    """One resolution doubling: up conv, conv, toRGB added to the upsampled RGB so far. ws: (N, 3, w_dim)."""

    def __init__(self, c_in: int, c_out: int, w_dim: int):
        super().__init__()
        self.conv0 = StyleLayer(c_in, c_out, w_dim, up=True)
        self.conv1 = StyleLayer(c_out, c_out, w_dim)
        self.to_rgb = ToRGB(c_out, w_dim)
        self.register_buffer("fir", fir_kernel(), persistent=False)

    def forward(self, x, img, ws, rng=None):
        x = self.conv1(self.conv0(x, ws[:, 0], rng), ws[:, 1], rng)
        return x, upsample2(img, self.fir) + self.to_rgb(x, ws[:, 2])


class MappingNetwork(nn.Module):
    """z (and the conditioner's latent vector, embedded) -> w."""

    def __init__(self, z_dim: int, latent_dim: int, w_dim: int, layers: int, lr_mul: float):
        super().__init__()
        self.embed = EqualLinear(latent_dim, w_dim) if latent_dim else None
        dims = [z_dim + (w_dim if latent_dim else 0)] + [w_dim] * layers
        self.layers = nn.ModuleList(
            [EqualLinear(a, b, lr_mul=lr_mul, activate=True) for a, b in zip(dims, dims[1:])])

    def forward(self, z, latent=None):
        x = normalize_2nd_moment(z)
        if self.embed is not None:
            if latent is None:
                raise HandforgeError("mapping network: the generator was built with a conditioner latent "
                                     "but got no condition (cond=None)")
            x = torch.cat([x, normalize_2nd_moment(self.embed(latent.to(x.dtype)))], dim=1)
        for layer in self.layers:
            x = layer(x)
        return x


# -- networks -----------------------------------------------------------------------------------


def check_generator_conditioner(conditioner, backbone: str = "stylegan2") -> None:
    """Refuse generator conditioners that need norm layers: a StyleGAN takes conditions through
    its mapping network only."""
    name = getattr(conditioner, "name", type(conditioner).__name__)
    spatial = bool(getattr(conditioner, "spatial", False))
    if spatial or (getattr(conditioner, "fields", ()) and not getattr(conditioner, "latent_dim", 0)):
        how = "spatial maps for its norm layers" if spatial else "no latent vector (it works through norm layers)"
        raise HandforgeError(
            f"backbone '{backbone}': its generator takes conditions through the mapping network only, so it "
            f"supports g_conditioner 'none' and 'cadain'; '{name}' gives {how}, and it has no "
            f"normalisation layers to modulate (for '{name}', use a backbone with them: deep_conv, resnet, big_resnet)")


class Generator(nn.Module):
    truncation = "w"  # the gan task's `truncation` option is psi, passed as forward(..., psi=)

    def __init__(self, config: StyleGan2Config, image_size: int, conditioner):
        super().__init__()
        check_generator_conditioner(conditioner)
        ws = widths(image_size, config.ch, config.ch_max)
        self.config, self.conditioner = config, conditioner  # the conditioner only makes vectors
        self.z_dim, self.w_dim = config.z_dim, config.w_dim
        self.mapping = MappingNetwork(config.z_dim, conditioner.latent_dim, config.w_dim,
                                      config.mapping_layers, config.mapping_lr_mul)
        self.const = nn.Parameter(torch.randn(ws[0], 4, 4))
        self.conv = StyleLayer(ws[0], ws[0], config.w_dim)
        self.to_rgb = ToRGB(ws[0], config.w_dim)
        self.blocks = nn.ModuleList([SynthesisBlock(a, b, config.w_dim) for a, b in zip(ws, ws[1:])])
        self.num_ws = 2 * len(self.blocks) + 2
        self.register_buffer("w_avg", torch.zeros(config.w_dim))
        self.register_buffer("pl_mean", torch.zeros(()))

    def styles(self, z, cond=None, psi=None):
        """The per-layer w, (N, num_ws, w_dim): mapped, mixed (training), truncated (psi)."""
        latent = None if cond is None else self.conditioner.latent(cond)
        w = self.mapping(z, latent)
        if self.training:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().float().mean(dim=0).lerp(self.w_avg, self.config.w_avg_beta))
        ws = w[:, None].expand(-1, self.num_ws, -1)
        # One draw per batch, from the CPU generator: no device synchronisation.
        if self.training and self.config.style_mixing and torch.rand(()).item() < self.config.style_mixing:
            cutoff = int(torch.randint(1, self.num_ws, ()))
            mixed = self.mapping(torch.randn_like(z), latent)[:, None].expand(-1, self.num_ws - cutoff, -1)
            ws = torch.cat([ws[:, :cutoff], mixed], dim=1)
        if psi is not None and psi != 1:
            ws = self.w_avg.to(ws.dtype).lerp(ws, psi)
        return ws

    def synthesis(self, ws, rng=None):
        x = self.const[None].expand(ws.shape[0], -1, -1, -1).contiguous(memory_format=torch.channels_last)
        x = self.conv(x, ws[:, 0], rng)
        img = self.to_rgb(x, ws[:, 1])
        for i, block in enumerate(self.blocks):
            x, img = block(x, img, ws[:, 2 * i + 1:2 * i + 4], rng)
        return img

    def forward(self, z, cond=None, psi=None, rng=None):
        img = self.synthesis(self.styles(z, cond, psi), rng)
        # Linear in training, as StyleGAN2; samples are images: [-1, 1] (StyleGAN2 clamps when saving).
        return img if self.training else img.clamp(-1, 1)

    def g_penalty(self, z, cond, step: int):
        """Lazy path length regularisation (StyleGAN2 eq. 4), or None when off or not due at ``step``."""
        cfg = self.config
        if not cfg.pl_weight or step % cfg.pl_interval:
            return None
        n = max(1, z.shape[0] // cfg.pl_batch_shrink)
        ws = self.styles(z[:n], take(cond, n))
        img = self.synthesis(ws)
        # Noise of variance 1 / (H W): the lengths do not depend on the image size.
        noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
        (grad,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)
        lengths = grad.square().sum(dim=2).mean(dim=1).sqrt()
        pl_mean = self.pl_mean.lerp(lengths.mean(), cfg.pl_decay)
        with torch.no_grad():
            self.pl_mean.copy_(pl_mean.detach())
        return (lengths - pl_mean).square().mean() * (cfg.pl_weight * cfg.pl_interval)


def take(cond, n: int):
    """The first n samples of a condition: a tensor, a tuple of them, or None."""
    if cond is None:
        return None
    if isinstance(cond, (tuple, list)):
        return type(cond)(take(c, n) for c in cond)
    return cond[:n]


class MinibatchStd(nn.Module):
    """Appends the standard deviation over groups of samples, averaged over channels and pixels
    (per group and feature), as extra constant channels: lets D see the batch's variety.

    Groups are as StyleGAN2-ADA's (samples n, n + N/G, ...); G is the largest divisor of the
    batch size up to ``group`` (StyleGAN2 requires the batch to be divisible)."""

    def __init__(self, group: int, features: int):
        super().__init__()
        self.group, self.features = group, features

    def forward(self, x):
        n, c, h, w = x.shape
        g = max(d for d in range(1, min(self.group, n) + 1) if n % d == 0)
        f = self.features
        y = x.reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()  # (N/G, F, C/F, H, W)
        y = y.mean(dim=(2, 3, 4)).reshape(-1, f, 1, 1).repeat(g, 1, h, w)  # (N, F, H, W)
        return torch.cat([x, y.to(x.dtype)], dim=1)


class DiscriminatorBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        half = math.sqrt(0.5)  # the sum of two branches keeps the variance of one
        self.conv0 = EqualConv2d(c_in, c_in, 3, activate=True)
        self.conv1 = EqualConv2d(c_in, c_out, 3, activate=True, down=True, gain=half)
        self.skip = EqualConv2d(c_in, c_out, 1, bias=False, down=True, gain=half)

    def forward(self, x):
        return self.skip(x) + self.conv1(self.conv0(x))


class Discriminator(nn.Module):
    def __init__(self, config: StyleGan2Config, image_size: int, conditioner):
        super().__init__()
        ws = widths(image_size, config.ch, config.ch_max)[::-1]  # image_size, ..., 4
        if ws[-1] % config.mbstd_features:
            raise HandforgeError(f"backbone 'stylegan2': mbstd_features ({config.mbstd_features}) must divide "
                                 f"the discriminator's 4x4 width ({ws[-1]})")
        self.conditioner = conditioner
        self.from_rgb = EqualConv2d(3 + conditioner.input_channels, ws[0], 1, activate=True)
        self.blocks = nn.ModuleList([DiscriminatorBlock(a, b) for a, b in zip(ws, ws[1:])])
        self.mbstd = MinibatchStd(config.mbstd_group, config.mbstd_features)
        self.conv = EqualConv2d(ws[-1] + config.mbstd_features, ws[-1], 3, activate=True)
        self.fc = EqualLinear(ws[-1] * 16, ws[-1], activate=True)
        self.head = conditioner.head(ws[-1])

    def forward(self, x, cond=None):
        x = self.from_rgb(self.conditioner.merge_input(x, cond))
        for block in self.blocks:
            x = block(x)
        x = self.conv(self.mbstd(x))
        return self.head(self.fc(x.flatten(1)), cond)


def build_stylegan2(config, *, role, image_size, conditioner, n_classes=0, **_):
    """StyleGAN2 (Karras et al. 2020): mapping network, modulated convs, skip G, residual D."""
    config = config or StyleGan2Config()
    return pick_network("stylegan2", role, image_size, Generator, Discriminator)(config, image_size, conditioner)


@hookimpl
def register_backbones(register):
    register("stylegan2", build_stylegan2, config=StyleGan2Config, roles=ROLES)
