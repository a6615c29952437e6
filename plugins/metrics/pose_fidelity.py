"""``pose_fidelity``: does a pose-conditioned generator draw the hand in the pose it was given?

A trained keypoint regressor (a finished run of the ``keypoints`` task) finds the keypoints in each
generated image; the score is PCK, AUC and EPE (:mod:`handforge.keypoint_math`) between those and the
keypoints that conditioned the image. The same regressor on the *real* images of the same poses
gives the ceiling (``pose_real_*``): a perfect generator scores what the regressor scores on real
data, so the pair separates the generator's errors from the judge's.

Images are resized (bilinear, antialiased) to the regressor's input size; pixel errors are in pixels
of that size.
"""
from __future__ import annotations

import pathlib
from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from handforge.errors import HandforgeError

from .components import Metric, SampleOptions
from handforge.keypoint_math import keypoint_report

REGRESSOR_SLOT = "regressor"
# The final exported weights, or the best checkpoint's (the keypoints task's only prepared model).
WEIGHT_FILES = {"weights": pathlib.Path("weights") / f"{REGRESSOR_SLOT}.safetensors",
                "best": pathlib.Path("checkpoints") / "best" / "model.safetensors"}


def _regressor_run(_instance, _attribute, value: str) -> None:
    if not value:
        raise ValueError("regressor: required: a finished keypoints run directory (e.g. runs/keypoints_mobilelite, "
                         "made by `handforge run recipes/keypoints_mobilelite.toml`)")


@attrs.define
class PoseFidelityConfig(SampleOptions):
    regressor: str = attrs.field(default="", validator=_regressor_run, metadata={
        "help": "a finished run of the keypoints task (its recipe.toml and weights/regressor.safetensors)"})
    checkpoint: Literal["weights", "best"] = attrs.field(default="weights", metadata={
        "help": "the regressor's final weights, or those of its best checkpoint (eval.best_metric)"})
    reference: bool = attrs.field(default=True, metadata={
        "help": "also score the regressor on the real images of the same poses (pose_real_*: the ceiling)"})


class KeypointJudge:
    """A keypoints run's regressor, rebuilt from its recipe and loaded with its exported weights."""

    def __init__(self, run_dir, checkpoint: str = "weights", device="cpu"):
        from safetensors.torch import load_model

        from handforge.data import N_KEYPOINTS, square_image_size
        from handforge.recipe import load_recipe

        run_dir = pathlib.Path(run_dir)
        recipe_file, weights = run_dir / "recipe.toml", run_dir / WEIGHT_FILES[checkpoint]
        if not recipe_file.is_file():
            raise HandforgeError(f"pose_fidelity: regressor {run_dir}: not a run directory (no recipe.toml)")
        recipe = load_recipe(recipe_file)
        if REGRESSOR_SLOT not in recipe.model:
            raise HandforgeError(f"pose_fidelity: regressor {run_dir}: task '{recipe.task.name}' has no "
                                 f"'{REGRESSOR_SLOT}'; give the run directory of a keypoints task")
        if not weights.is_file():
            raise HandforgeError(f"pose_fidelity: regressor {run_dir}: no {WEIGHT_FILES[checkpoint]} (did the run "
                                 f"finish{'' if checkpoint == 'weights' else ' with eval.best_metric set'}?)")
        # The input size as the task found it: the run dataset's images.
        self.image_size = square_image_size(recipe.data.build(split="val"), f"pose_fidelity's regressor {run_dir}")
        self.model = recipe.model[REGRESSOR_SLOT].build(role="keypoints", image_size=self.image_size,
                                                        num_keypoints=N_KEYPOINTS, head=recipe.task.config.head)
        try:
            load_model(self.model, str(weights), strict=True)
        except Exception as exc:  # noqa: BLE001 - another architecture or a damaged file
            raise HandforgeError(f"{weights}: cannot load into the run's regressor ({type(exc).__name__}: {exc})") from exc
        self.device = torch.device(device)
        self.model.to(self.device, memory_format=torch.channels_last).eval()
        self.key = f"keypoint_judge:{run_dir.resolve()}:{weights.stat().st_mtime_ns}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> normalized keypoints (N, 21, 2) the regressor finds."""
        x = images.to(self.device).float() / 127.5 - 1.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.model(x.contiguous(memory_format=torch.channels_last))["coords"].float().cpu()


class PoseFidelity(Metric):
    """PCK between the keypoints a trained regressor finds in generated images and those they were made in."""

    def _check_files(self) -> None:
        # Build the judge now: a missing or foreign regressor stops a run before it trains.
        self._judge = KeypointJudge(self.config.regressor, self.config.checkpoint)

    def measure(self, inputs) -> dict[str, float]:
        judge = self._judge
        if judge.device != torch.device(inputs.device):
            judge.model.to(inputs.device)
            judge.device = torch.device(inputs.device)
        values = {}
        for side, prefix in (("fake", "pose_"), ("real", "pose_real_")):
            if side == "real" and not self.config.reference:
                continue
            found, keypoints = inputs.posed(side, judge, judge.key)
            report = inputs.on_main(lambda: keypoint_report(found, keypoints[..., :2], keypoints[..., 2] > 0,
                                                            judge.image_size))
            values.update({prefix + name: value for name, value in report.items()})
        return values
