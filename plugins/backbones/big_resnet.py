"""BigGAN generator and discriminator (Brock et al. 2019), as PyTorch-StudioGAN builds them, for any
power-of-two size >= 8.

Generator: z is split into ``blocks + 1`` chunks (hierarchical z). The first chunk -> linear ->
(C, 4, 4) -> [up ResBlock, self-attention after the block that reaches ``attention_resolution``]* ->
BatchNorm, ReLU, conv3x3 -> tanh. An up ResBlock is norm-ReLU-upsample-conv3x3-norm-ReLU-conv3x3
plus an upsampled 1x1-conv shortcut; its norms are the generator conditioner's, built with
``extra_dim`` and fed the vector [shared class embedding, the block's z chunk] (BigGAN's
conditional BatchNorm with ``cbn``; BatchNorm whose gains come from the z chunk alone with ``none``).
A conditioner whose ``norm`` takes no ``extra_dim`` (``spade``) gets plain ``norm(x, cond)`` calls:
its norms cannot use z chunks, so z is not split and all of it goes to the linear layer. The
output norm is unconditional BatchNorm, as in BigGAN.

Discriminator: optimized block -> [down ResBlock, self-attention after the block that reaches
``attention_resolution``]* down to 4x4 -> one ResBlock at 4x4 without pooling -> ReLU -> sum over
space -> the discriminator conditioner's head (``projection``). Its blocks are ``resnet``'s.

Widths are derived from the image size with StudioGAN's cap of 16x: the generator has
``ch * min(16, image_size // r)`` channels at resolution ``r``; the discriminator's block that
ends at ``r`` has ``ch * min(16, image_size // (2 r))`` and its last block ``ch * min(16,
image_size // 4)``. At 64 px this is StudioGAN's big_resnet table exactly.

Self-attention (SAGAN, Zhang et al. 2019) sits at ``attention_resolution`` in both networks (0 =
none); the discriminator's first block already halves the image, so at ``attention_resolution ==
image_size`` only the generator has it. Spectral norm on every layer of both networks when on;
orthogonal initialisation of the backbone's own layers.
"""
import inspect

import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F
from attrs import validators as v

from handforge import hookimpl
from handforge.errors import HandforgeError

from .pairs import ROLES, check_size
from .resnet import DownBlock, Init, OptimizedBlock, layer


@attrs.define
class BigResNetConfig:
    ch: int = attrs.field(default=64, validator=v.ge(1))  # base width (G's channels at full resolution)
    z_dim: int = attrs.field(default=80, validator=v.ge(1))  # generator only: latent size, split across blocks
    shared_dim: int = attrs.field(default=128, validator=v.ge(1))  # generator only: shared class embedding size
    attention_resolution: int = attrs.field(default=32, validator=v.ge(0))  # self-attention there; 0 = none
    spectral_norm: bool = True  # spectral norm on every layer (BigGAN: on both networks)
    init: Init = "orthogonal"  # weight initialisation: orthogonal, xavier, normal or pytorch


def g_widths(image_size: int, ch: int) -> list[int]:
    """Generator channels at resolutions 4, 8, ..., image_size."""
    return [ch * min(16, image_size // r) for r in _resolutions(4, image_size)]


def d_widths(image_size: int, ch: int) -> list[int]:
    """Discriminator channels after each block: resolutions image_size / 2, ..., 4, then 4 again."""
    down = [ch * min(16, image_size // (2 * r)) for r in _resolutions(4, image_size // 2)[::-1]]
    return down + [ch * min(16, image_size // 4)]


def _resolutions(low: int, high: int) -> list[int]:
    return [low << i for i in range((high // low).bit_length())]


def chunk_sizes(z_dim: int, n: int) -> list[int]:
    """Split z_dim into n chunks as equal as possible (BigGAN needs z_dim divisible by n; we do not)."""
    base, rest = divmod(z_dim, n)
    return [base + (i < rest) for i in range(n)]


# -- what the conditioner offers (the interface grew extra_dim and shared_embedding) -------------


def _accepts(function, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or C callable: assume the base contract
        return False


def takes_vector(conditioner) -> bool:
    """Whether the conditioner's norms can take a vector: ``norm(num_features, extra_dim=...)``."""
    return _accepts(conditioner.norm, "extra_dim")


def make_norm(conditioner, num_features: int, extra_dim: int = 0, spectral_norm: bool = False) -> nn.Module:
    if not extra_dim:
        return conditioner.norm(num_features)
    kwargs = {"extra_dim": extra_dim}
    if _accepts(conditioner.norm, "spectral_norm"):
        kwargs["spectral_norm"] = spectral_norm
    return conditioner.norm(num_features, **kwargs)


def make_shared_embedding(conditioner, dim: int) -> nn.Module | None:
    shared = getattr(conditioner, "shared_embedding", None)
    return shared(dim) if callable(shared) else None


# -- layers -------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """SAGAN self-attention as in BigGAN: queries on every position, keys and values on a 2x
    max-pooled grid, unscaled dot products, output ``x + sigma * o`` with ``sigma`` starting at 0."""

    def __init__(self, channels: int, init: str, spectral_norm: bool):
        super().__init__()
        qk, value = max(1, channels // 8), max(1, channels // 2)  # max(): tiny test widths
        conv = lambda a, b: layer(nn.Conv2d(a, b, 1, bias=False), init, spectral_norm)  # noqa: E731
        self.theta, self.phi = conv(channels, qk), conv(channels, qk)
        self.g, self.o = conv(channels, value), conv(value, channels)
        self.sigma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        n, _, h, w = x.shape
        query = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, qk)
        key = F.max_pool2d(self.phi(x), 2).flatten(2).transpose(1, 2)  # (N, HW/4, qk)
        value = F.max_pool2d(self.g(x), 2).flatten(2).transpose(1, 2)  # (N, HW/4, value)
        # scale=1: SAGAN does not divide by sqrt(qk). Fused attention never holds the HW x HW/4 matrix on GPU.
        out = F.scaled_dot_product_attention(query, key, value, scale=1.0)  # (N, HW, value)
        return x + self.sigma * self.o(out.transpose(1, 2).reshape(n, -1, h, w))  # channels_last view


class GBlock(nn.Module):
    def __init__(self, w_in: int, w_out: int, conditioner, extra_dim: int, init: str, spectral_norm: bool):
        super().__init__()
        self.norm1 = make_norm(conditioner, w_in, extra_dim, spectral_norm)
        self.norm2 = make_norm(conditioner, w_out, extra_dim, spectral_norm)
        self.conv1 = layer(nn.Conv2d(w_in, w_out, 3, padding=1), init, spectral_norm)
        self.conv2 = layer(nn.Conv2d(w_out, w_out, 3, padding=1), init, spectral_norm)
        self.shortcut = layer(nn.Conv2d(w_in, w_out, 1), init, spectral_norm)

    def forward(self, x, cond, extra=None):
        norm = (lambda f, t: f(t, cond)) if extra is None else (lambda f, t: f(t, cond, extra))  # noqa: E731
        h = F.interpolate(F.relu(norm(self.norm1, x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(norm(self.norm2, self.conv1(h))))
        # A 1x1 conv commutes with nearest upsampling: convolving first is the same, 4x cheaper.
        return h + F.interpolate(self.shortcut(x), scale_factor=2, mode="nearest")


# -- networks -----------------------------------------------------------------------------------


class Generator(nn.Module):
    def __init__(self, config: BigResNetConfig, image_size: int, conditioner, blocks: int):
        super().__init__()
        ws, init, use_sn = g_widths(image_size, config.ch), config.init, config.spectral_norm
        self.z_dim, self.conditioner = config.z_dim, conditioner  # the conditioner only makes layers
        self.hierarchical = takes_vector(conditioner)
        if self.hierarchical and config.z_dim < blocks + 1:
            raise HandforgeError(f"backbone 'big_resnet': z_dim must be >= {blocks + 1} at {image_size} px "
                                 f"(one chunk for the input and one per block), got {config.z_dim}")
        self.chunks = chunk_sizes(config.z_dim, blocks + 1) if self.hierarchical else [config.z_dim]
        self.shared = make_shared_embedding(conditioner, config.shared_dim) if self.hierarchical else None
        shared_dim = config.shared_dim if self.shared is not None else 0
        extra_dims = [c + shared_dim for c in self.chunks[1:]] if self.hierarchical else [0] * blocks

        self.linear = layer(nn.Linear(self.chunks[0] + conditioner.latent_dim, ws[0] * 16), init, use_sn)
        self.blocks = nn.ModuleList(
            [GBlock(a, b, conditioner, e, init, use_sn) for a, b, e in zip(ws, ws[1:], extra_dims)])
        at = config.attention_resolution
        self.attention_after = next((i for i in range(blocks) if 8 << i == at), None)  # block i ends at 8 * 2^i
        self.attention = (None if self.attention_after is None
                          else SelfAttention(ws[self.attention_after + 1], init, use_sn))
        self.norm = nn.BatchNorm2d(ws[-1])
        self.to_rgb = layer(nn.Conv2d(ws[-1], 3, 3, padding=1), init, use_sn)

    def forward(self, z, cond=None):
        zs = torch.split(z, self.chunks, dim=1)
        latent = self.conditioner.latent(cond)
        x = zs[0] if latent is None else torch.cat([zs[0], latent], 1)
        x = self.linear(x).view(z.shape[0], -1, 4, 4).contiguous(memory_format=torch.channels_last)
        extras = [None] * len(self.blocks)
        if self.hierarchical:
            shared = None if self.shared is None else self.shared(cond)
            extras = [c if shared is None else torch.cat([shared, c], 1) for c in zs[1:]]
        for i, (block, extra) in enumerate(zip(self.blocks, extras)):
            x = block(x, cond, extra)
            if i == self.attention_after:
                x = self.attention(x)
        return torch.tanh(self.to_rgb(F.relu(self.norm(x))))


class Discriminator(nn.Module):
    def __init__(self, config: BigResNetConfig, image_size: int, conditioner, blocks: int):
        super().__init__()
        ws, init, use_sn = d_widths(image_size, config.ch), config.init, config.spectral_norm
        self.conditioner = conditioner
        self.blocks = nn.ModuleList(
            [OptimizedBlock(3 + conditioner.input_channels, ws[0], init, use_sn)]
            + [DownBlock(a, b, init, use_sn, down=i < blocks - 1) for i, (a, b) in enumerate(zip(ws, ws[1:]))]
        )
        at = config.attention_resolution
        self.attention_after = next((i for i in range(blocks) if image_size >> (i + 1) == at), None)
        self.attention = (None if self.attention_after is None
                          else SelfAttention(ws[self.attention_after], init, use_sn))
        self.head = conditioner.head(ws[-1], spectral_norm=use_sn)

    def forward(self, x, cond=None):
        x = self.conditioner.merge_input(x, cond)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.attention_after:
                x = self.attention(x)
        return self.head(F.relu(x).sum(dim=(2, 3)), cond)


def build_big_resnet(config, *, role, image_size, conditioner, n_classes=0, **_):
    """BigGAN generator/discriminator (Brock et al. 2019): hierarchical z, shared embedding, self-attention."""
    config = config or BigResNetConfig()
    blocks = check_size("big_resnet", image_size, role)
    at = config.attention_resolution
    if at and (at < 8 or at > image_size or at & (at - 1)):
        raise HandforgeError(f"backbone 'big_resnet': attention_resolution must be 0 (none) or a power of two "
                             f"from 8 to the image size {image_size}, got {at}")
    return {"generator": Generator, "discriminator": Discriminator}[role](config, image_size, conditioner, blocks)


@hookimpl
def register_backbones(register):
    register("big_resnet", build_big_resnet, config=BigResNetConfig, roles=ROLES)
