"""``hand_detector``: does an independent detector (MediaPipe Hands) see a hand in generated images,
and, where the images come with keypoints (a pose-conditioned run's conditioning keypoints, a
labelled folder or dataset), are its landmarks where the hand should be?

Reports ``hand_detector/detected`` (the fraction of images with a hand found),
``hand_detector/pck@0.1``, ``hand_detector/pck@0.2`` and ``hand_detector/error`` (bbox-normalized,
:mod:`.stats`); with ``reference = true`` the same of the real images as ``hand_detector_real/*``.
Images travel to the detector's process as PNG files in a temporary folder that is removed
afterwards.
"""
from __future__ import annotations

import attrs
import numpy as np
import torch

from handforge.errors import HandforgeError
from handforge.plugins.metrics.components import Metric, SampleOptions
from handforge.recipe import at_least

from .stats import N_KEYPOINTS, keypoint_agreement

# The detector runs on the CPU whatever the run's device: at 25-45 images/s on 2 cores (1,000
# 32-128 px renders: 41-73 s, rendering included), 500 images keep an evaluation near 20 s,
# under a tenth of the quickstart's training.
DEFAULT_NUM_SAMPLES = 500
# One row per image: detected, height, width, then 21 x (x, y) (NaN where no hand was found).
_COLUMNS = 3 + 2 * N_KEYPOINTS


def _unit_interval(_instance, attribute, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name}: must be between 0 and 1, got {value}")


@attrs.define
class HandDetectorConfig(SampleOptions):
    num_samples: int = attrs.field(default=0, validator=at_least(0), metadata={
        "help": f"images judged (generated, and real with reference); 0 = {DEFAULT_NUM_SAMPLES} on any device "
                f"(the detector runs on the CPU)"})
    min_confidence: float = attrs.field(default=0.5, converter=float, validator=_unit_interval, metadata={
        "help": "MediaPipe's min_detection_confidence"})
    visible_only: bool = attrs.field(default=False, metadata={
        "help": "compare only joints labelled visible (default: all 21; a rendered hand's hidden joints are exact)"})
    reference: bool = attrs.field(default=False, metadata={
        "help": "also judge the real images (of the same poses, in a run): hand_detector_real/*"})


def _rows(results: list[dict]) -> torch.Tensor:
    rows = torch.full((len(results), _COLUMNS), float("nan"), dtype=torch.float64)
    for i, result in enumerate(results):
        if "error" in result:  # we wrote these PNGs: an unreadable one is the worker's fault
            raise HandforgeError(f"hand judge: the worker could not read an image handforge wrote: {result['error']}")
        rows[i, :3] = torch.tensor([float(result["detected"]), result["height"], result["width"]])
        if result["detected"]:
            rows[i, 3:] = torch.tensor(result["keypoints"], dtype=torch.float64).flatten()
    return rows


def _values(rows: torch.Tensor, keypoints: torch.Tensor | None, visible_only: bool) -> dict[str, float]:
    rows = rows.double()
    detected = rows[:, 0] > 0.5
    values = {"detected": detected.double().mean().item()}
    if keypoints is None:
        return values
    found = rows[detected, 3:].reshape(-1, N_KEYPOINTS, 2).numpy()
    target = keypoints[detected].double().numpy()
    sizes = rows[detected, 1:3].numpy().astype(np.int64)
    agreement = keypoint_agreement(found, target, sizes, visible_only)
    values.update({"pck@0.1": agreement["pck@0.1"], "pck@0.2": agreement["pck@0.2"],
                   "error": agreement["mean_error"]})
    return values


class _Detections:
    """The detector as an Inputs extractor: ``features(uint8 images)`` -> one row per image."""

    def __init__(self, detector, min_confidence: float):
        self.detector = detector
        self.key = {"extractor": "hand_detector", "mediapipe": detector.mediapipe_version,
                    "min_confidence": min_confidence, "rows": _COLUMNS}
        self.calls = 0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return _rows(self.detector.detect_images(images))


class HandDetectorMetric(Metric):
    """Detection rate (and landmark PCK where images have keypoints) of MediaPipe Hands on generated images."""

    def _check_files(self) -> None:
        from .environment import judge_python

        # Build the detector's environment now (first use): a run stops before it trains, not
        # at its first evaluation, when it cannot be built.
        self._python = judge_python()

    def num_samples(self, device, extractor=None) -> int:
        return self.config.num_samples or DEFAULT_NUM_SAMPLES

    def _judge(self, inputs, side: str, detections: _Detections):
        """(rows, keypoints or None) of one side, in a single pass over its images."""
        key = f"hand_detector:{detections.key}"
        try:
            return inputs.posed(side, detections.features, key)
        except HandforgeError:
            # posed() refuses a side without keypoints before it sends any image: then judge
            # detection only. An error after images were judged is a real one.
            if detections.calls:
                raise
        return inputs.features(side, detections), None

    def measure(self, inputs) -> dict[str, float]:
        from .detector import HandDetector

        cfg = self.config
        values = {}
        with HandDetector(cfg.min_confidence, python=self._python) as detector:
            detections = _Detections(detector, cfg.min_confidence)
            for side, prefix in (("fake", "hand_detector/"), ("real", "hand_detector_real/")):
                if side == "real" and not cfg.reference:
                    continue
                detections.calls = 0
                rows, keypoints = self._judge(inputs, side, detections)
                side_values = inputs.on_main(lambda: _values(rows, keypoints, cfg.visible_only))
                values.update({prefix + name: value for name, value in side_values.items()})
        return values
