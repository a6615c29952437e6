"""DCGAN-style generator and discriminator (Radford et al. 2016), for any power-of-two size >= 8.

The number of up/down blocks is ``log2(image_size / 4)``: both networks work between the image
and a 4x4 grid. The width at resolution ``r`` is ``ch * min(8, image_size // r)``: ``ch`` at full
resolution, doubling per halving, capped at ``8 * ch``.

Generator: z -> linear -> (8ch, 4, 4) -> norm, ReLU -> [upsample x2, conv3x3, norm, ReLU]* ->
conv3x3 -> tanh. Its norm layers come from the generator's conditioner (``cbn`` makes them
class-conditional).

Discriminator: conv3x3 -> LeakyReLU -> [conv4x4 stride 2, LeakyReLU]* -> sum over space -> head.
Every layer is spectrally normalised when ``spectral_norm`` is on; the head comes from the
discriminator's conditioner (``projection`` adds the class inner product).

Both forwards take ``cond``, whatever the conditioner's ``condition(batch)`` made (labels, maps
or None); the generator appends its conditioner's ``latent(cond)`` to z, the discriminator
concatenates its conditioner's ``merge_input`` channels to the image.
"""
import math

import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm as sn

from handforge import hookimpl

from .pairs import ROLES, pick_network


@attrs.define
class DeepConvConfig:
    ch: int = 64  # base width (channels at full resolution)
    z_dim: int = 128  # generator only: latent size
    spectral_norm: bool = True  # discriminator only: spectral norm on every layer


def maybe_sn(module: nn.Module, enabled: bool) -> nn.Module:
    return sn(module) if enabled else module


def widths(image_size: int, ch: int) -> list[int]:
    """Channels at resolutions 4, 8, ..., image_size."""
    return [ch * min(8, image_size // (4 * 2**i)) for i in range(int(math.log2(image_size // 4)) + 1)]


class Generator(nn.Module):
    def __init__(self, config: DeepConvConfig, image_size: int, conditioner):
        super().__init__()
        self.z_dim, ws = config.z_dim, widths(image_size, config.ch)
        self.conditioner = conditioner  # not a module: it only makes layers and vectors
        self.linear = nn.Linear(config.z_dim + conditioner.latent_dim, ws[0] * 16)
        self.norms = nn.ModuleList([conditioner.norm(w) for w in ws])
        self.convs = nn.ModuleList([nn.Conv2d(w_in, w_out, 3, padding=1) for w_in, w_out in zip(ws, ws[1:])])
        self.to_rgb = nn.Conv2d(ws[-1], 3, 3, padding=1)

    def forward(self, z, cond=None):
        extra = self.conditioner.latent(cond)
        z = z if extra is None else torch.cat([z, extra], 1)
        x = self.linear(z).view(z.shape[0], -1, 4, 4).contiguous(memory_format=torch.channels_last)
        x = F.relu(self.norms[0](x, cond))
        for conv, norm in zip(self.convs, self.norms[1:]):
            x = F.relu(norm(conv(F.interpolate(x, scale_factor=2, mode="nearest")), cond))
        return torch.tanh(self.to_rgb(x))


class Discriminator(nn.Module):
    def __init__(self, config: DeepConvConfig, image_size: int, conditioner):
        super().__init__()
        ws, use_sn = widths(image_size, config.ch)[::-1], config.spectral_norm
        self.conditioner = conditioner
        self.from_rgb = maybe_sn(nn.Conv2d(3 + conditioner.input_channels, ws[0], 3, padding=1), use_sn)
        self.downs = nn.ModuleList(
            [maybe_sn(nn.Conv2d(w_in, w_out, 4, stride=2, padding=1), use_sn) for w_in, w_out in zip(ws, ws[1:])]
        )
        self.head = conditioner.head(ws[-1], spectral_norm=use_sn)

    def forward(self, x, cond=None):
        x = F.leaky_relu(self.from_rgb(self.conditioner.merge_input(x, cond)), 0.2)
        for down in self.downs:
            x = F.leaky_relu(down(x), 0.2)
        return self.head(x.sum(dim=(2, 3)), cond)


def build_deep_conv(config, *, role, image_size, conditioner, n_classes=0, **_):
    """DCGAN-style generator/discriminator, blocks derived from the image size (32, 64, 128, ...)."""
    config = config or DeepConvConfig()
    return pick_network("deep_conv", role, image_size, Generator, Discriminator)(config, image_size, conditioner)


@hookimpl
def register_backbones(register):
    register("deep_conv", build_deep_conv, config=DeepConvConfig, roles=ROLES)
