"""Pose conditioners: keypoint maps enter the generator through SPADE and the discriminator as channels.

Both read the ``keypoints`` field and make conditioning maps from it on the device, at the
image size (:mod:`.pose_maps`): 21 joint heatmaps, 20 limb maps, or both (41). Their ``cond``
is those (N, K, H, W) maps, aligned with the image (``spatial = True``), so a geometric
augmentation can move them with the image.

- ``spade`` (generator): every norm layer is SPADE (Park et al. 2019), a parameter-free
  BatchNorm whose per-pixel gain and bias are predicted from the maps. On a denoiser
  (``denoiser_modulation``) the gain and bias act after each norm the denoiser already has.
- ``concat`` (discriminator, denoiser): the maps are concatenated to the image (x_t) as extra
  input channels; the head is the plain linear one.

On a denoiser both give the null pose for classifier-free guidance as all-zero maps (``drop``).

The conditioner interface is described in :mod:`handforge.plugins.conditioners.base`.
"""
from typing import Literal

import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F
from attrs.validators import ge, gt, in_

from handforge import hookimpl
from handforge.data import N_KEYPOINTS
from handforge.errors import HandforgeError

from .base import Conditioner
from .pose_maps import MAP_KINDS, channels, make_maps, resize_maps


def _odd(_, attribute, value):
    # An odd kernel with padding k // 2 keeps the maps centred on the features they modulate.
    if value % 2 != 1:
        raise ValueError(f"{attribute.name}: must be odd (1, 3, 5, ...), got {value!r}")


@attrs.define
class PoseMapsConfig:
    """Which maps are made from the keypoints, and how wide they are."""

    maps: Literal["heatmaps", "limbs", "both"] = attrs.field(
        default="heatmaps", validator=in_(MAP_KINDS), metadata={"help": "21 joint heatmaps, 20 limb maps, or both"})
    sigma: float = attrs.field(
        default=0.03, validator=gt(0.0), metadata={"help": "heatmap Gaussian sd, as a fraction of the image side"})
    limb_width: float = attrs.field(
        default=0.02, validator=gt(0.0), metadata={"help": "limb map Gaussian sd, as a fraction of the image side"})


@attrs.define
class SpadeConfig(PoseMapsConfig):
    hidden: int = attrs.field(default=64, validator=ge(1), metadata={"help": "channels of SPADE's shared conv"})
    kernel: int = attrs.field(default=3, validator=[ge(1), _odd], metadata={"help": "kernel size of SPADE's convs"})


# -- layers -------------------------------------------------------------------------------------


class PoseModulation(nn.Module):
    """Features modulated per pixel by pose maps: x * (1 + gamma(m)) + beta(m).

    ``m`` are the conditioning maps resized to x's resolution; gamma and beta are convolutions on
    a shared conv + ReLU of ``m``. Gamma and beta start at zero, so at initialisation the layer is
    the identity and the pose comes in as training finds it useful. This is SPADE's modulation
    without its norm: a diffusion U-Net applies it after the norm it already has.
    """

    def __init__(self, num_features: int, map_channels: int, hidden: int = 64, kernel: int = 3):
        super().__init__()
        self.map_channels = map_channels
        self.shared = nn.Conv2d(map_channels, hidden, kernel, padding=kernel // 2)
        self.gamma = nn.Conv2d(hidden, num_features, kernel, padding=kernel // 2)
        self.beta = nn.Conv2d(hidden, num_features, kernel, padding=kernel // 2)
        for conv in (self.gamma, self.beta):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x, cond):
        if cond is None or cond.ndim != 4 or cond.shape[0] != x.shape[0] or cond.shape[1] != self.map_channels:
            got = None if cond is None else tuple(cond.shape)
            raise HandforgeError(f"conditioner 'spade': expected (N, {self.map_channels}, H, W) maps with "
                                 f"N = {x.shape[0]}, the features' batch, got {got}")
        m = resize_maps(cond, x.shape[-2:]).to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last):
            m = m.contiguous(memory_format=torch.channels_last)  # keep every conv in x's layout
        h = F.relu(self.shared(m))
        return x * (1 + self.gamma(h)) + self.beta(h)


class Spade(PoseModulation):
    """SPADE (Park et al. 2019): BatchNorm(affine=False)(x) * (1 + gamma(m)) + beta(m), the
    modulation of :class:`PoseModulation` on parameter-free BatchNorm; at initialisation plain
    BatchNorm."""

    def __init__(self, num_features: int, map_channels: int, hidden: int = 64, kernel: int = 3):
        super().__init__(num_features, map_channels, hidden, kernel)
        self.bn = nn.BatchNorm2d(num_features, affine=False)

    def forward(self, x, cond):
        return super().forward(self.bn(x), cond)


# -- conditioners -------------------------------------------------------------------------------


class _PoseConditioner(Conditioner):
    """Makes the maps of its config from ``batch["keypoints"]`` at the image size."""

    fields, spatial = ("keypoints",), True
    config_cls = PoseMapsConfig

    def __init__(self, config=None, *, role: str, n_classes: int = 0, **context):
        super().__init__(config, role=role, n_classes=n_classes, **context)
        self.config = config if config is not None else self.config_cls()
        if self.image_size is None or int(self.image_size) < 1:
            raise HandforgeError(f"conditioner '{self.name}' needs the image size to make its maps, "
                                 f"got image_size={self.image_size!r}")
        self.image_size = int(self.image_size)
        self.map_channels = channels(self.config.maps)

    def condition(self, batch: dict) -> torch.Tensor:
        keypoints = super().condition(batch)
        if keypoints.ndim != 3 or keypoints.shape[1:] != (N_KEYPOINTS, 3):
            raise HandforgeError(f"conditioner '{self.name}': field 'keypoints' must be (N, {N_KEYPOINTS}, 3), "
                                 f"got {tuple(keypoints.shape)}")
        cfg = self.config
        return make_maps(keypoints, self.image_size, cfg.maps, cfg.sigma, cfg.limb_width)

    def drop(self, cond, mask):
        # The null pose: all-zero maps on the dropped rows (classifier-free guidance).
        return cond * (~mask.to(cond.device)).to(cond.dtype)[:, None, None, None]


class SpadeConditioner(_PoseConditioner):
    """SPADE generator norms (Park et al. 2019) modulated per pixel by keypoint heatmaps / limb maps;
    on a denoiser, the same modulation after each of its own norms."""

    name, roles, config_cls = "spade", ("generator", "pose_transfer", "denoiser"), SpadeConfig

    def norm(self, num_features: int) -> nn.Module:
        return Spade(num_features, self.map_channels, self.config.hidden, self.config.kernel)

    def denoiser_modulation(self, channels: int) -> nn.Module:
        # The maps enter through the modulation only (input_channels stays 0): at initialisation
        # the denoiser is exactly the unconditional network, and the pose comes in as it is learnt.
        return PoseModulation(channels, self.map_channels, self.config.hidden, self.config.kernel)


class ConcatConditioner(_PoseConditioner):
    """Keypoint heatmaps / limb maps concatenated to the discriminator's input image."""

    name, roles = "concat", ("discriminator", "denoiser", "pose_transfer")

    @property
    def input_channels(self) -> int:
        return self.map_channels

    def merge_input(self, x, cond):
        if cond is None or cond.ndim != 4 or cond.shape[0] != x.shape[0] or cond.shape[1] != self.map_channels:
            got = None if cond is None else tuple(cond.shape)
            raise HandforgeError(f"conditioner 'concat': expected ({x.shape[0]}, {self.map_channels}, H, W) maps, "
                                 f"got {got}")
        return torch.cat([x, resize_maps(cond, x.shape[-2:]).to(x.dtype)], dim=1)


@hookimpl
def register_conditioners(register):
    register("spade", SpadeConditioner, config=SpadeConfig, needs=("keypoints",))
    register("concat", ConcatConditioner, config=PoseMapsConfig, needs=("keypoints",))
