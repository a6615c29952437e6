"""SNGAN ResNet generator and discriminator (Miyato et al. 2018), for any power-of-two size >= 8.

Generator: z -> linear -> (C, 4, 4) -> [up ResBlock]* -> norm, ReLU, conv3x3 -> tanh. An up ResBlock
is norm-ReLU-upsample-conv3x3-norm-ReLU-conv3x3 plus an upsampled 1x1-conv shortcut; every norm
comes from the generator's conditioner (``cbn`` makes them class-conditional, ``spade`` spatial).

Discriminator: optimized block (conv3x3-ReLU-conv3x3-avgpool, shortcut avgpool-1x1 conv) ->
[down ResBlock (ReLU-conv3x3-ReLU-conv3x3-avgpool, shortcut 1x1 conv-avgpool)]* -> ReLU ->
sum over space -> the discriminator conditioner's head. Spectral norm on every layer when on.

Each side has ``log2(image_size / 4)`` blocks, between the image and a 4x4 grid. Widths follow
deep_conv: ``ch * min(8, image_size // r)`` for the generator at resolution ``r``; the
discriminator's block that ends at resolution ``r`` has the generator's width at ``2r`` (``ch``
after its first block, doubling per halving, capped at ``8 * ch``).

The discriminator blocks, the weight initialisation and the size check are shared with
``big_resnet``.
"""
from typing import Literal

import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F
from attrs import validators as v
from torch.nn.utils.parametrizations import spectral_norm as sn

from handforge import hookimpl

from .deep_conv import widths
from .pairs import ROLES, pick_network

# Weight initialisations of the backbones' own layers (conditioner-made layers initialise themselves).
INITS = {
    "orthogonal": nn.init.orthogonal_,  # BigGAN, StudioGAN's default
    "xavier": nn.init.xavier_uniform_,  # SNGAN's Glorot uniform
    "normal": lambda w: nn.init.normal_(w, 0.0, 0.02),  # DCGAN's N(0, 0.02)
    "pytorch": None,  # leave PyTorch's default (Kaiming uniform)
}
Init = Literal["orthogonal", "xavier", "normal", "pytorch"]


@attrs.define
class ResNetConfig:
    ch: int = attrs.field(default=64, validator=v.ge(1))  # base width (channels at full resolution)
    z_dim: int = attrs.field(default=128, validator=v.ge(1))  # generator only: latent size
    spectral_norm: bool = True  # discriminator only: spectral norm on every layer
    init: Init = "xavier"  # weight initialisation: orthogonal, xavier, normal or pytorch


def layer(module: nn.Module, init: str, spectral_norm: bool = False) -> nn.Module:
    """Initialise a conv/linear layer's weight (bias to 0), then wrap it in spectral norm if asked.

    In that order: spectral norm estimates the top singular value from the weight it wraps.
    """
    if INITS[init] is not None:
        INITS[init](module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    return sn(module) if spectral_norm else module


# -- generator ----------------------------------------------------------------------------------


class UpBlock(nn.Module):
    def __init__(self, w_in: int, w_out: int, conditioner, init: str):
        super().__init__()
        self.norm1, self.norm2 = conditioner.norm(w_in), conditioner.norm(w_out)
        self.conv1 = layer(nn.Conv2d(w_in, w_out, 3, padding=1), init)
        self.conv2 = layer(nn.Conv2d(w_out, w_out, 3, padding=1), init)
        self.shortcut = layer(nn.Conv2d(w_in, w_out, 1), init)

    def forward(self, x, cond):
        h = F.interpolate(F.relu(self.norm1(x, cond)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.norm2(self.conv1(h), cond)))
        # A 1x1 conv commutes with nearest upsampling: convolving first is the same, 4x cheaper.
        return h + F.interpolate(self.shortcut(x), scale_factor=2, mode="nearest")


class Generator(nn.Module):
    def __init__(self, config: ResNetConfig, image_size: int, conditioner):
        super().__init__()
        self.z_dim, ws, init = config.z_dim, widths(image_size, config.ch), config.init
        self.conditioner = conditioner  # not a module: it only makes layers and vectors
        self.linear = layer(nn.Linear(config.z_dim + conditioner.latent_dim, ws[0] * 16), init)
        self.blocks = nn.ModuleList([UpBlock(a, b, conditioner, init) for a, b in zip(ws, ws[1:])])
        self.norm = conditioner.norm(ws[-1])
        self.to_rgb = layer(nn.Conv2d(ws[-1], 3, 3, padding=1), init)

    def forward(self, z, cond=None):
        extra = self.conditioner.latent(cond)
        z = z if extra is None else torch.cat([z, extra], 1)
        x = self.linear(z).view(z.shape[0], -1, 4, 4).contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            x = block(x, cond)
        return torch.tanh(self.to_rgb(F.relu(self.norm(x, cond))))


# -- discriminator ------------------------------------------------------------------------------


class OptimizedBlock(nn.Module):
    """The first block, on the image: no ReLU before the first conv (it would clip the pixels)."""

    def __init__(self, w_in: int, w_out: int, init: str, spectral_norm: bool):
        super().__init__()
        self.conv1 = layer(nn.Conv2d(w_in, w_out, 3, padding=1), init, spectral_norm)
        self.conv2 = layer(nn.Conv2d(w_out, w_out, 3, padding=1), init, spectral_norm)
        self.shortcut = layer(nn.Conv2d(w_in, w_out, 1), init, spectral_norm)

    def forward(self, x):
        h = F.avg_pool2d(self.conv2(F.relu(self.conv1(x))), 2)
        return h + self.shortcut(F.avg_pool2d(x, 2))


class DownBlock(nn.Module):
    """ReLU-conv3x3-ReLU-conv3x3(-avgpool), shortcut 1x1 conv(-avgpool); identity when it changes nothing."""

    def __init__(self, w_in: int, w_out: int, init: str, spectral_norm: bool, down: bool = True):
        super().__init__()
        self.down = down
        self.conv1 = layer(nn.Conv2d(w_in, w_out, 3, padding=1), init, spectral_norm)
        self.conv2 = layer(nn.Conv2d(w_out, w_out, 3, padding=1), init, spectral_norm)
        self.shortcut = layer(nn.Conv2d(w_in, w_out, 1), init, spectral_norm) if down or w_in != w_out else None

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(F.relu(x))))
        # Average pooling and a 1x1 conv are both linear and commute: pooling first is 4x cheaper.
        if self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        return h + (x if self.shortcut is None else self.shortcut(x))


class Discriminator(nn.Module):
    def __init__(self, config: ResNetConfig, image_size: int, conditioner):
        super().__init__()
        ws, use_sn, init = widths(image_size // 2, config.ch)[::-1], config.spectral_norm, config.init
        self.conditioner = conditioner
        self.blocks = nn.ModuleList(
            [OptimizedBlock(3 + conditioner.input_channels, ws[0], init, use_sn)]
            + [DownBlock(a, b, init, use_sn) for a, b in zip(ws, ws[1:])]
        )
        self.head = conditioner.head(ws[-1], spectral_norm=use_sn)

    def forward(self, x, cond=None):
        x = self.conditioner.merge_input(x, cond)
        for block in self.blocks:
            x = block(x)
        return self.head(F.relu(x).sum(dim=(2, 3)), cond)


def build_resnet(config, *, role, image_size, conditioner, n_classes=0, **_):
    """SNGAN ResNet generator/discriminator (Miyato et al. 2018), blocks derived from the image size."""
    config = config or ResNetConfig()
    return pick_network("resnet", role, image_size, Generator, Discriminator)(config, image_size, conditioner)


@hookimpl
def register_backbones(register):
    register("resnet", build_resnet, config=ResNetConfig, roles=ROLES)
