"""Differentiable augmentation (DiffAugment; Zhao et al. 2020), for images in [-1, 1].

The same random transforms, drawn afresh on every call, are applied to real and generated images
before the discriminator; they are differentiable, so the generator learns through them. The
policy lists the transform groups, applied in its order (the paper's definitions and defaults):

- ``color``: brightness x + U(-0.5, 0.5); saturation: each pixel's deviation from its channel
  mean scaled by U(0, 2); contrast: each image's deviation from its mean scaled by U(0.5, 1.5).
- ``translation``: an integer shift of up to ``translation_ratio`` of the size on each axis,
  per sample, with zeros coming in.
- ``cutout``: one square of side ``cutout_ratio`` of the size set to zero, per sample, its centre
  anywhere in the image (a square near the border is clipped by it).

Conditioning maps aligned with the images get the same translation; colour and cutout change
the image only. All draws use torch's global generator, which the run loop seeds per process.
"""
import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F
from attrs.validators import ge, le

from handforge import hookimpl
from handforge.errors import HandforgeError
from handforge.registry import did_you_mean


class PolicyError(HandforgeError, ValueError):
    """A ValueError too, so the recipe loader reports it at its option's path."""


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)


# -- color --------------------------------------------------------------------------------------


def brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (_per_sample(x) - 0.5)


def saturation(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_per_sample(x) * 2) + mean


def contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_per_sample(x) + 0.5) + mean


def color(images, maps, config):
    return contrast(saturation(brightness(images))), maps


# -- translation --------------------------------------------------------------------------------


def shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Move each sample's content by (dy[i], dx[i]) whole pixels (down, right); zeros come in.

    One gather from the zero-padded image: source indices that fall outside are clamped onto the
    padding ring, so there is neither a per-sample loop nor a mask.
    """
    n, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device) - dy[:, None]).clamp(-1, h) + 1  # (N, H), padded coords
    cols = (torch.arange(w, device=x.device) - dx[:, None]).clamp(-1, w) + 1  # (N, W)
    source = (rows[:, :, None] * (w + 2) + cols[:, None, :]).view(n, 1, h * w)  # flat index, per sample
    padded = F.pad(x, (1, 1, 1, 1)).flatten(2)
    return padded.gather(2, source.expand(n, c, h * w)).view(n, c, h, w)


def translation(images, maps, config):
    n, _, h, w = images.shape
    max_y, max_x = int(h * config.translation_ratio + 0.5), int(w * config.translation_ratio + 0.5)
    dy = torch.randint(-max_y, max_y + 1, (n,), device=images.device)
    dx = torch.randint(-max_x, max_x + 1, (n,), device=images.device)
    return shift(images, dy, dx), (shift(maps, dy, dx) if maps is not None else None)


# -- cutout -------------------------------------------------------------------------------------


def cutout(images, maps, config):
    n, _, h, w = images.shape
    side_y, side_x = int(h * config.cutout_ratio + 0.5), int(w * config.cutout_ratio + 0.5)
    # The official code's placement: centre uniform over the pixels (and one step past the last
    # for even sides, so both borders are equally likely to clip), top-left = centre - side // 2.
    top = torch.randint(0, h + (1 - side_y % 2), (n, 1), device=images.device) - side_y // 2
    left = torch.randint(0, w + (1 - side_x % 2), (n, 1), device=images.device) - side_x // 2
    rows, cols = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
    inside_y = (rows >= top) & (rows < top + side_y)  # (N, H)
    inside_x = (cols >= left) & (cols < left + side_x)  # (N, W)
    keep = ~(inside_y[:, :, None] & inside_x[:, None, :])
    return images * keep[:, None].to(images.dtype), maps


TRANSFORMS = {"color": color, "translation": translation, "cutout": cutout}


def check_policy(_instance, _attribute, policy) -> None:
    for name in policy:
        if name not in TRANSFORMS:
            raise PolicyError(f"policy: unknown diffaug policy {name!r}{did_you_mean(name, TRANSFORMS)}; "
                              f"valid: {', '.join(TRANSFORMS)}")


@attrs.define
class DiffAugConfig:
    """Options of DiffAugment."""

    # transform groups, applied in this order (each may appear more than once)
    policy: list[str] = attrs.field(factory=lambda: list(TRANSFORMS), validator=check_policy)
    translation_ratio: float = attrs.field(default=0.125, validator=[ge(0.0), le(1.0)])  # max shift / size
    cutout_ratio: float = attrs.field(default=0.5, validator=[ge(0.0), le(1.0)])  # square side / size


class DiffAugment(nn.Module):
    """DiffAugment (Zhao et al. 2020): random colour, translation, cutout; differentiable."""

    def __init__(self, config: DiffAugConfig | None = None, **_context):
        super().__init__()
        self.config = config if config is not None else DiffAugConfig()
        check_policy(None, None, self.config.policy)  # a config may have been changed after creation
        self.transforms = [TRANSFORMS[name] for name in self.config.policy]

    def forward(self, images: torch.Tensor, maps: torch.Tensor | None = None):
        if maps is not None and (maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]):
            raise HandforgeError(f"augmentation 'diffaug': maps {tuple(maps.shape)} are not aligned with "
                                 f"images {tuple(images.shape)} (same batch and height x width needed)")
        for transform in self.transforms:
            images, maps = transform(images, maps, self.config)
        return images if maps is None else (images, maps)

    def extra_repr(self) -> str:
        return f"policy={self.config.policy}"


@hookimpl
def register_augmentations(register):
    register("diffaug", DiffAugment, config=DiffAugConfig)
