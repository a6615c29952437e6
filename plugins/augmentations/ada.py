"""Adaptive discriminator augmentation (ADA; Karras et al. 2020, StyleGAN2-ADA).

Every image the discriminator sees, real or fake, goes through a pipeline of transforms; each
transform is applied to each sample with probability ``p``. ``p`` adapts to how much the
discriminator overfits, measured on its real logits: r_t = E[sign(D(real))] over the last
``interval`` steps. When r_t > ``target`` the discriminator is too sure of the reals and ``p``
rises; when r_t < target it falls. It moves by (images seen) / ``speed_images`` per update, so
it can cross [0, 1] in ``speed_images`` images (ADA: 500k).

The pipeline is ADA's 'bgc' (the transforms it found not to leak into the generator for p < 0.8):

- blit: x-flip, rotation by a multiple of 90 degrees, integer translation (up to 1/8 of the size);
- geom: isotropic scaling (lognormal, 2^N(0, 0.2)), arbitrary rotation (before and after the next
  step, each with probability 1 - sqrt(1 - p), so that "either" has probability p), anisotropic
  scaling (2^N(0, 0.2)), fractional translation (N(0, 0.125) of the size);
- color: brightness (+N(0, 0.2)), contrast (x 2^N(0, 0.5)), hue rotation (uniform), saturation
  (x 2^N(0, 1)).

Geometric transforms are composed into one matrix per sample and applied with one bilinear
grid_sample with reflection padding; conditioning maps go through the very same matrix. ADA's
wavelet up/down-sampling around that resampling is left out (a small anti-aliasing gain for
a second pass). Colour transforms compose into one colour matrix per sample and touch images only.

``p`` is a buffer (saved with the task's state). With p = 0 the input is returned as is.
With several processes, each observe() interval sums the logit signs of all processes (one
all-reduce) so every process keeps the same p.
"""
import math
from typing import Literal

import attrs
import torch
import torch.distributed as dist
import torch.nn as nn
from attrs.validators import ge, le

from handforge import hookimpl
from handforge.errors import HandforgeError

from . import geometry as g

PIPELINES = {
    "blit": ("blit",),
    "geom": ("geom",),
    "color": ("color",),
    "bg": ("blit", "geom"),
    "bgc": ("blit", "geom", "color"),
}


@attrs.define
class AdaConfig:
    """Options of adaptive discriminator augmentation."""

    p_init: float = attrs.field(default=0.0, validator=[ge(0.0), le(1.0)])  # starting probability
    target: float = attrs.field(default=0.6, validator=[ge(0.0), le(1.0)])  # r_t that p steers to
    # images over which p can move from 0 to 1 (ADA: ada_kimg = 500)
    speed_images: int = attrs.field(default=500_000, validator=ge(1))
    interval: int = attrs.field(default=4, validator=ge(1))  # update p every this many observe() calls
    max_p: float = attrs.field(default=1.0, validator=[ge(0.0), le(1.0)])  # ceiling on p
    pipeline: Literal["blit", "geom", "color", "bg", "bgc"] = attrs.field(
        default="bgc", validator=attrs.validators.in_(tuple(PIPELINES)))  # ADA's transform groups

    def __attrs_post_init__(self):
        if self.p_init > self.max_p:
            raise ValueError(f"p_init: must be <= max_p ({self.max_p}), got {self.p_init}")


def _reread_p(module, _incompatible_keys) -> None:
    """After load_state_dict: refresh the host copy of p (a plain function, so the module pickles)."""
    module._p = float(module.p)


class AdaptiveAugment(nn.Module):
    """Adaptive discriminator augmentation (StyleGAN2-ADA 'bgc'), p steered by sign(D(real))."""

    def __init__(self, config: AdaConfig | None = None, **_context):
        super().__init__()
        self.config = config = config if config is not None else AdaConfig()
        self.groups = PIPELINES[config.pipeline]
        self.register_buffer("p", torch.tensor(float(config.p_init)))
        # Since the last update: the sum of sign(real logits), kept on the device so that observe()
        # never waits for it (it is read once per interval), and how many logits that was.
        self.register_buffer("_signs", torch.zeros(()), persistent=False)
        self._count = 0
        self._calls = 0
        self._rt = 0.0  # r_t of the last completed interval
        # A host copy of p: forward() branches on it without a device sync on every call.
        self._p = float(config.p_init)
        self.register_load_state_dict_post_hook(_reread_p)

    def set_p(self, value: float) -> None:
        """Set the probability by hand (it stays below max_p)."""
        self._p = min(max(float(value), 0.0), self.config.max_p)
        self.p.fill_(self._p)

    # -- adaptation ----------------------------------------------------------------------------

    def observe(self, real_logits: torch.Tensor) -> None:
        """Account for one discriminator step's real logits; update p every ``interval`` calls."""
        logits = real_logits.detach()
        self._signs += torch.sign(logits).sum().to(self._signs)
        self._count += logits.numel()
        self._calls += 1
        if self._calls % self.config.interval == 0:
            self._update()

    def _update(self) -> None:
        stats = torch.stack([self._signs, self._signs.new_tensor(float(self._count))])
        self._signs.zero_()
        self._count = 0
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)  # every process sees the same r_t, so p stays the same everywhere
        total, count = stats.tolist()
        if count == 0:
            return
        self._rt = total / count
        direction = (self._rt > self.config.target) - (self._rt < self.config.target)
        self.set_p(self._p + direction * count / self.config.speed_images)

    def log(self) -> dict[str, float]:
        return {"ada_p": self._p, "ada_rt": self._rt}

    # -- augmentation --------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, maps: torch.Tensor | None = None):
        if self._p <= 0:
            return images if maps is None else (images, maps)
        if maps is not None and maps.shape[0] != images.shape[0]:
            raise HandforgeError(f"augmentation 'ada': {maps.shape[0]} maps for {images.shape[0]} images")
        n, _, h, w = images.shape
        if "blit" in self.groups or "geom" in self.groups:
            inverse = self._geometry(n, h, w, images.device)
            images = g.warp(images, inverse)
            maps = g.warp(maps, inverse, frame=(h, w)) if maps is not None else None
        if "color" in self.groups:
            if images.shape[1] != 3:
                raise HandforgeError(f"augmentation 'ada': the color pipeline needs RGB images, "
                                     f"got {images.shape[1]} channels (use pipeline = \"bg\")")
            images = g.recolour(images, self._colour(n, images.device))
        return images if maps is None else (images, maps)

    def _geometry(self, n: int, h: int, w: int, device) -> torch.Tensor:
        """(N, 3, 3) matrices mapping output pixels to input pixels: the inverse of the augmentation.

        Each transform's inverse is multiplied on the right, so the first transform drawn is the
        first one applied to the image (ADA's order). Samples that skip a transform get identity.
        """
        p = self._p
        u = torch.rand(n, 14, device=device)  # every uniform draw at once: fewer small kernels
        z = torch.randn(n, 4, device=device)
        keep = lambda k, gate_p: u[:, k] < gate_p  # noqa: E731  (does this sample get that transform)
        inverse = torch.eye(3, device=device).expand(n, 3, 3)
        if "blit" in self.groups:
            flip = torch.where(keep(0, p), torch.floor(u[:, 1] * 2), 0.0)
            inverse = inverse @ g.scale2d(1 - 2 * flip, 1)
            quarter = torch.where(keep(2, p), torch.floor(u[:, 3] * 4), 0.0)
            inverse = inverse @ g.rotate2d(-math.pi / 2 * quarter)
            shift = torch.where(keep(4, p)[:, None], (u[:, 5:7] * 2 - 1) * 0.125, 0.0)
            inverse = inverse @ g.translate2d(-torch.round(shift[:, 0] * w), -torch.round(shift[:, 1] * h))
        if "geom" in self.groups:
            scale = torch.where(keep(7, p), torch.exp2(z[:, 0] * 0.2), 1.0)
            inverse = inverse @ g.scale2d(1 / scale, 1 / scale)
            p_rot = 1 - math.sqrt(1 - p)  # two chances to rotate: P(pre or post) = p
            theta = torch.where(keep(8, p_rot), (u[:, 9] * 2 - 1) * math.pi, 0.0)
            inverse = inverse @ g.rotate2d(-theta)
            aniso = torch.where(keep(10, p), torch.exp2(z[:, 1] * 0.2), 1.0)
            inverse = inverse @ g.scale2d(1 / aniso, aniso)
            theta = torch.where(keep(11, p_rot), (u[:, 12] * 2 - 1) * math.pi, 0.0)
            inverse = inverse @ g.rotate2d(-theta)
            frac = torch.where(keep(13, p)[:, None], z[:, 2:4] * 0.125, 0.0)
            inverse = inverse @ g.translate2d(-frac[:, 0] * w, -frac[:, 1] * h)
        return inverse

    def _colour(self, n: int, device) -> torch.Tensor:
        """(N, 4, 4) colour matrices: brightness, contrast, hue, saturation, each with probability p."""
        p = self._p
        u = torch.rand(n, 5, device=device)
        z = torch.randn(n, 3, device=device)
        brightness = torch.where(u[:, 0] < p, z[:, 0] * 0.2, 0.0)
        contrast = torch.where(u[:, 1] < p, torch.exp2(z[:, 1] * 0.5), 1.0)
        hue = torch.where(u[:, 2] < p, (u[:, 3] * 2 - 1) * math.pi, 0.0)
        saturation = torch.where(u[:, 4] < p, torch.exp2(z[:, 2] * 1.0), 1.0)
        # Later transforms multiply on the left: they act on the already transformed colour.
        return (g.saturation3d(saturation) @ g.hue3d(hue) @ g.scale3d(contrast) @ g.translate3d(brightness))


@hookimpl
def register_augmentations(register):
    register("ada", AdaptiveAugment, config=AdaConfig)
