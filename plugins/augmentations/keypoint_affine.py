"""Keypoint-preserving augmentation for keypoint regression: the image and its 21 keypoints move
together through the same random flip, rotation, scale and translation, then the colours jitter.

Per sample, the geometric transforms compose into one 3x3 matrix (pixel coordinates centred on
the image, :mod:`.geometry`): the image is resampled once through its inverse, and the keypoints
are carried by the matrix itself, so both land on the same pixels. A flip is a mirror: it turns a
left hand into a right hand, so keypoint indices stay (the thumb is still joint 1-4), x becomes
1 - x and ``handedness`` becomes 1 - handedness. Visibility is left as it is.

Colour jitter (torchvision's ColorJitter brightness/contrast/saturation, factors uniform in
[1 - color, 1 + color]) is one 4x4 colour matrix per sample, applied after the warp; the result
is clipped to [-1, 1] once at the end rather than after each step (so the three compose).
"""
import math
from typing import Literal

import attrs
import torch
import torch.nn as nn
from attrs.validators import ge, in_, le, lt

from handforge import hookimpl
from handforge.errors import HandforgeError

from . import geometry as g

Padding = Literal["black", "border", "reflection"]
PADDINGS = ("black", "border", "reflection")


def _check_scale(_instance, _attribute, value) -> None:
    if len(value) != 2 or not 0 < value[0] <= value[1]:
        raise ValueError(f"scale: expected [min, max] with 0 < min <= max, got {list(value)!r}")


@attrs.define
class KeypointAffineConfig:
    """Options of the keypoint-preserving augmentation."""

    flip: float = attrs.field(default=0.5, validator=[ge(0.0), le(1.0)], metadata={
        "help": "probability of a horizontal mirror (a left hand becomes a right hand)"})
    rotate: float = attrs.field(default=30.0, validator=[ge(0.0), le(180.0)], metadata={
        "help": "maximum rotation in degrees; the angle is uniform in [-rotate, rotate]"})
    scale: list[float] = attrs.field(factory=lambda: [0.8, 1.2], validator=_check_scale, metadata={
        "help": "[min, max] zoom factor, uniform; > 1 enlarges the hand"})
    translate: float = attrs.field(default=0.1, validator=[ge(0.0), le(1.0)], metadata={
        "help": "maximum shift as a fraction of the side, uniform per axis"})
    color: float = attrs.field(default=0.2, validator=[ge(0.0), lt(1.0)], metadata={
        "help": "brightness/contrast/saturation jitter: factors uniform in [1 - color, 1 + color]; 0 = off"})
    p: float = attrs.field(default=1.0, validator=[ge(0.0), le(1.0)], metadata={
        "help": "probability, per sample, of each of rotation, scaling, translation and colour jitter"})
    padding: Padding = attrs.field(default="black", validator=in_(PADDINGS), metadata={
        "help": "what fills pixels from outside the image: black (as MMPose's cv2.warpAffine), border "
                "(edge pixels repeated) or reflection (mirrored content: phantom fingers)"})


# -- the transform with explicit parameters -----------------------------------------------------


def _per_sample(value, n: int, device) -> torch.Tensor:
    """A number or an (N,) tensor (bool, int or float) -> (N,) float32 on ``device``."""
    if torch.is_tensor(value):
        return value.to(device=device, dtype=torch.float32).expand(n)
    return torch.full((n,), float(value), device=device)


def affine_matrices(flip, angle, scale, tx, ty, height: int, width: int, n: int, device=None):
    """Per-sample (forward, inverse) (N, 3, 3) matrices in pixel coordinates centred on the image.

    Applied in this order: mirror (``flip`` true), rotation by ``angle`` degrees (positive turns
    clockwise on screen, y pointing down), scaling by ``scale`` about the centre, translation by
    ``tx`` of the width and ``ty`` of the height (positive: right, down). The inverse is composed
    from the inverse steps rather than by a matrix inversion, so it is exact.
    """
    flip, angle, scale, tx, ty = (_per_sample(v, n, device) for v in (flip, angle, scale, tx, ty))
    mirror = g.scale2d(1 - 2 * flip, 1)  # its own inverse
    theta = angle * (math.pi / 180)
    forward = g.translate2d(tx * width, ty * height) @ g.rotate2d(theta) @ g.scale2d(scale, scale) @ mirror
    inverse = mirror @ g.scale2d(1 / scale, 1 / scale) @ g.rotate2d(-theta) @ g.translate2d(-tx * width,
                                                                                           -ty * height)
    return forward, inverse


def move_keypoints(keypoints: torch.Tensor, forward: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Map (N, K, 2+) keypoints, x,y normalized (0 = left/top edge, 1 = right/bottom edge), through
    (N, 3, 3) pixel matrices; columns after x,y (visibility) are kept."""
    size = keypoints.new_tensor([width, height])
    centred = keypoints[..., :2] * size - size / 2  # the matrices' frame: origin at the image centre
    matrix = forward.to(keypoints.dtype)
    moved = centred @ matrix[:, :2, :2].transpose(1, 2) + matrix[:, None, :2, 2]
    return torch.cat([(moved + size / 2) / size, keypoints[..., 2:]], dim=-1)


def colour_matrices(images: torch.Tensor, brightness, contrast, saturation) -> torch.Tensor:
    """(N, 4, 4) colour matrices for [-1, 1] images: brightness, then contrast, then saturation,
    each a factor (1 = unchanged) as in torchvision's ColorJitter.

    Brightness scales towards black (-1 here, 0 in [0, 1] images); contrast scales about the
    image's mean grey; saturation scales each pixel's colour away from its grey (the mean of its
    channels: the grey axis of :func:`.geometry.saturation3d`, not torchvision's luma weights).
    """
    n = images.shape[0]
    b, c, s = (_per_sample(v, n, images.device) for v in (brightness, contrast, saturation))
    mean = images.mean(dim=(1, 2, 3)).float()
    mean_after_brightness = b * (mean + 1) - 1  # means are linear: no second pass over the pixels
    brighten = g.translate3d(b - 1) @ g.scale3d(b)  # x -> b (x + 1) - 1
    contrast_about_mean = g.translate3d(mean_after_brightness * (1 - c)) @ g.scale3d(c)
    return g.saturation3d(s) @ contrast_about_mean @ brighten


def _warp_image(images: torch.Tensor, inverse: torch.Tensor, padding: str) -> torch.Tensor:
    if padding == "black":
        # grid_sample pads with 0, which is mid grey in [-1, 1]: shift so that black is 0. Bilinear
        # sampling is linear, so inside the image the shift cancels exactly.
        return g.warp(images + 1, inverse, padding_mode="zeros") - 1
    return g.warp(images, inverse, padding_mode=padding)


def _check_batch(batch: dict) -> None:
    missing = [f for f in ("image", "keypoints") if f not in batch]
    if missing:
        raise HandforgeError(f"augmentation 'keypoint_affine': the batch has no field "
                             f"{' or '.join(repr(f) for f in missing)}; it has: {', '.join(batch) or 'nothing'}")
    images, keypoints = batch["image"], batch["keypoints"]
    if images.ndim != 4 or keypoints.ndim != 3 or keypoints.shape[-1] < 2 or keypoints.shape[0] != images.shape[0]:
        raise HandforgeError(f"augmentation 'keypoint_affine': expected image (N,C,H,W) and keypoints "
                             f"(N,K,2 or 3), got {tuple(images.shape)} and {tuple(keypoints.shape)}")


def apply_affine(batch: dict, flip, angle, scale, tx, ty, *, brightness=None, contrast=None,
                 saturation=None, padding: str = "black") -> dict:
    """A new batch with ``image`` warped and ``keypoints`` moved by the same per-sample transform
    (see :func:`affine_matrices` for the parameters, numbers or (N,) tensors), ``handedness``
    swapped where flipped, then the colour factors applied (all None: no colour change). Other
    fields are passed through untouched.
    """
    _check_batch(batch)
    if padding not in PADDINGS:
        raise HandforgeError(f"augmentation 'keypoint_affine': padding must be one of "
                             f"{', '.join(PADDINGS)}, got {padding!r}")
    images, keypoints = batch["image"], batch["keypoints"]
    n, _, height, width = images.shape
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    forward, inverse = affine_matrices(flip, angle, scale, tx, ty, height, width, n, images.device)
    out = dict(batch)
    out["keypoints"] = move_keypoints(keypoints, forward, height, width)
    image = _warp_image(images, inverse, padding)
    if not (brightness is None and contrast is None and saturation is None):
        matrix = colour_matrices(image, 1 if brightness is None else brightness,
                                 1 if contrast is None else contrast, 1 if saturation is None else saturation)
        image = g.recolour(image, matrix).clamp_(-1, 1)
    out["image"] = image.contiguous(memory_format=torch.channels_last) if channels_last else image
    if "handedness" in batch:
        mirrored = _per_sample(flip, n, images.device) > 0.5
        hand = batch["handedness"]
        out["handedness"] = torch.where(mirrored.to(hand.device), 1 - hand, hand)
    return out


# -- the random augmentation --------------------------------------------------------------------


class KeypointAffine(nn.Module):
    """Flip, rotate, scale, translate and colour-jitter images with their keypoints."""

    def __init__(self, config: KeypointAffineConfig | None = None, **_context):
        super().__init__()
        self.config = config if config is not None else KeypointAffineConfig()

    def draw(self, n: int, device=None, generator: torch.Generator | None = None) -> dict:
        """Per-sample parameters for :func:`apply_affine`, from one uniform draw on ``device``.

        Samples that skip a transform (probability 1 - p each) get its identity value.
        """
        c = self.config
        u = torch.rand(n, 12, device=device, generator=generator)
        gate = lambda k: u[:, k] < c.p  # noqa: E731  (does this sample get that transform)
        low, high = c.scale
        params = {
            "flip": u[:, 0] < c.flip,
            "angle": torch.where(gate(1), (u[:, 2] * 2 - 1) * c.rotate, 0.0),
            "scale": torch.where(gate(3), low + u[:, 4] * (high - low), 1.0),
            "tx": torch.where(gate(5), (u[:, 6] * 2 - 1) * c.translate, 0.0),
            "ty": torch.where(gate(5), (u[:, 7] * 2 - 1) * c.translate, 0.0),
        }
        if c.color > 0:
            factors = torch.where(gate(8)[:, None], 1 + (u[:, 9:12] * 2 - 1) * c.color, 1.0)
            params.update(brightness=factors[:, 0], contrast=factors[:, 1], saturation=factors[:, 2])
        return params

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        _check_batch(batch)
        params = self.draw(batch["image"].shape[0], batch["image"].device, generator)
        return apply_affine(batch, **params, padding=self.config.padding)

    def extra_repr(self) -> str:
        c = self.config
        return (f"flip={c.flip}, rotate={c.rotate}, scale={c.scale}, translate={c.translate}, "
                f"color={c.color}, p={c.p}, padding={c.padding!r}")


@hookimpl
def register_augmentations(register):
    # signature "batch": forward(batch dict) -> batch dict, a data-side transform for tasks that train
    # on labelled samples; the GAN's augmentations take images (and maps) instead.
    register("keypoint_affine", KeypointAffine, config=KeypointAffineConfig, needs=("image", "keypoints"),
             signature="batch")
