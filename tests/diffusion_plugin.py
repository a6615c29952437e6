"""Test plugin: a tiny denoiser backbone and denoiser-side label conditioners, so the diffusion
task runs through the real loop without the unet backbone."""
import math

import torch
import torch.nn as nn

from handforge import hookimpl
from handforge.plugins.conditioners.base import Conditioner


class TinyDenoiser(nn.Module):
    """Per-pixel MLP of (x_t, per-channel image mean, time features, label embedding): small, and able
    to denoise images of one colour each."""

    def __init__(self, n_classes=0, hidden=64, T=100):
        super().__init__()
        self.T = T
        self.label = nn.Embedding(n_classes + 1, hidden) if n_classes else None
        self.inp = nn.Linear(6 + 16, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, cond):
        n, _, h, w = x.shape
        freqs = torch.exp(torch.arange(8, device=x.device) * -math.log(100) / 8)
        angle = (t / self.T)[:, None] * 100 * freqs
        temb = torch.cat([angle.sin(), angle.cos()], dim=1)
        pixels = x.permute(0, 2, 3, 1)
        mean = x.mean(dim=(2, 3))[:, None, None, :].expand(n, h, w, 3)
        feats = torch.cat([pixels, mean, temb[:, None, None, :].expand(n, h, w, 16)], dim=-1)
        hid = torch.nn.functional.silu(self.inp(feats))
        if self.label is not None and cond is not None:
            hid = hid + self.label(cond)[:, None, None, :]
        hid = torch.nn.functional.silu(self.mid(hid))
        return self.out(hid).permute(0, 3, 1, 2)


class LabelCond(Conditioner):
    """A minimal label conditioner on the denoiser side (the interface of DENOISER.md)."""

    name, fields, conditional = "label", ("label",), True
    roles = ("generator", "discriminator", "denoiser")

    def condition(self, batch):
        return batch["label"]

    def drop(self, cond, mask):
        return torch.where(mask, torch.full_like(cond, self.n_classes), cond)


class NoCond(LabelCond):
    name, fields, conditional = "none", (), False

    def condition(self, batch):
        return None


def build_tiny_denoiser(config, *, role, image_size, n_classes, conditioner, channels=3, **_):
    return TinyDenoiser(n_classes if conditioner.conditional else 0, T=1000)


@hookimpl
def register_backbones(register):
    register("test_tiny_denoiser", build_tiny_denoiser)


@hookimpl
def register_conditioners(register):
    register("test_denoise_label", LabelCond, needs=("label",))
    register("test_denoise_none", NoCond)
