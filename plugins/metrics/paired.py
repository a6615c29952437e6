"""The paired metrics: ``ssim``, ``psnr``, ``hand_ssim``, ``hand_psnr`` and ``hand_sharpness``.

Each compares every generated image with its own target (pose transfer: the frame the reference
was to be re-posed into), image by image, and reports the mean of the per-image values. The pairs
come from the inputs' ``paired(fn, key)``: in a run, the run dataset's samples 0 .. num-1 (their
``image`` against what the task generates from the rest of the sample); from ``handforge evaluate``,
two folders whose files are matched by name, or a run directory's val split against its generations.

The hand metrics score the box around the target's visible keypoints
(:func:`handforge.keypoint_math.hand_boxes`); images without a scorable hand are left out and counted
(``hand_images``: how many were scored). Per-image PSNR is +inf for identical images (or hands):
the reported mean is taken over the finite values and ``psnr_identical`` / ``hand_psnr_identical``
count the others, so one perfect image neither hides the rest nor makes the mean infinite.
"""
from __future__ import annotations

import math

import attrs
import torch

from handforge.recipe import at_least

from .components import Metric, SampleOptions
from .paired_math import paired_scores

# The scores one pass computes, for all five metrics at once (shared through the inputs' memo).
SCORES = ("ssim", "psnr", "hand_ssim", "hand_psnr", "hand_sharpness", "hand", "hand_textured")


@attrs.define
class PairedConfig(SampleOptions):
    """Options of the paired metrics."""


@attrs.define
class HandPairedConfig(SampleOptions):
    margin: float = attrs.field(default=0.25, validator=attrs.validators.and_(
        attrs.validators.ge(0.0), attrs.validators.le(2.0)), metadata={
        "help": "the hand box grows by this share of its side on each side of the keypoints' extent"})
    min_images: int = attrs.field(default=1, validator=at_least(1), metadata={
        "help": "fewer images with a scorable hand than this is an error, not a score"})


def score_table(inputs, margin: float = 0.25) -> dict[str, torch.Tensor]:
    """Per-image scores of every pair, as {score: (N,)}: one pass for all five metrics (the hand
    scores are NaN where the targets' keypoints are unknown)."""
    def fn(real, fake, keypoints):
        scores = paired_scores(real, fake, keypoints, margin=margin)
        return torch.stack([scores.get(name, torch.full_like(scores["ssim"], math.nan)) for name in SCORES], dim=1)

    table = inputs.paired(fn, key=f"paired_scores:{margin}")
    return {name: table[:, i] for i, name in enumerate(SCORES)}


def finite_mean(values: torch.Tensor) -> tuple[float, int]:
    """The mean over the finite values, and how many were +inf (identical pairs)."""
    finite = torch.isfinite(values)
    infinite = int((values == math.inf).sum())
    return (float(values[finite].double().mean()) if finite.any() else math.inf), infinite


class Ssim(Metric):
    """Mean SSIM (Wang et al. 2004; Gaussian window 11, sigma 1.5) of generated images and their targets."""

    def measure(self, inputs):
        scores = score_table(inputs)
        return {"ssim": float(scores["ssim"].double().mean())}


class Psnr(Metric):
    """Mean PSNR (dB, data range 255) of generated images and their targets; identical pairs counted apart."""

    def measure(self, inputs):
        mean, identical = finite_mean(score_table(inputs)["psnr"])
        return {"psnr": mean, "psnr_identical": float(identical)}


class HandMetric(Metric):
    """What the hand metrics share: the scores of the images with a scorable hand box."""

    score = ""
    valid = "hand"  # the column saying which images this score exists for

    def hand_scores(self, inputs) -> tuple[torch.Tensor, float]:
        from handforge.errors import HandforgeError

        scores = score_table(inputs, margin=self.config.margin)
        if torch.isnan(scores["hand"]).all():
            raise HandforgeError(f"metric '{self.score}' needs the keypoints of the target images, and "
                                 f"{inputs.keypoint_source()} has none")
        usable = scores[self.valid] > 0
        count = int(usable.sum())
        if count < self.config.min_images:
            raise HandforgeError(f"metric '{self.score}': {count} of {len(usable)} target images have a visible "
                                 f"hand to score (min_images = {self.config.min_images})")
        return scores[self.score][usable], float(count)

    def measure(self, inputs):
        values, count = self.hand_scores(inputs)
        return {self.score: float(values.double().mean()), "hand_images": count}


class HandSsim(HandMetric):
    """Mean SSIM inside the target's hand box (the SSIM map averaged over the box)."""

    score = "hand_ssim"


class HandPsnr(HandMetric):
    """Mean PSNR inside the target's hand box; identical hands counted apart."""

    score = "hand_psnr"

    def measure(self, inputs):
        values, count = self.hand_scores(inputs)
        mean, identical = finite_mean(values)
        return {"hand_psnr": mean, "hand_psnr_identical": float(identical), "hand_images": count}


class HandSharpness(HandMetric):
    """Sharpness of the generated hand relative to the target's (variance of the Laplacian in the box).

    1: as sharp as the target; below 1: blurrier hands, the usual failure of pose transfer. Targets
    whose hand is flat have no ratio and are left out (``hand_images`` counts the rest)."""

    score = "hand_sharpness"
    valid = "hand_textured"


PAIRED_METRICS = {
    "ssim": (Ssim, PairedConfig, ("image",)),
    "psnr": (Psnr, PairedConfig, ("image",)),
    "hand_ssim": (HandSsim, HandPairedConfig, ("image", "keypoints")),
    "hand_psnr": (HandPsnr, HandPairedConfig, ("image", "keypoints")),
    "hand_sharpness": (HandSharpness, HandPairedConfig, ("image", "keypoints")),
}
