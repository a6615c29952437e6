"""The metric components: ``fid`` (and FHD), ``is``, ``prdc`` and ``cas``.

Each is an attrs config plus a class with

- ``evaluate(run) -> dict[str, float]``: in-loop, called by the run loop on every process
  (``[[eval.metrics]]`` tables); every process returns the same numbers;
- ``measure(inputs) -> dict[str, float]``: the same measurement on any :class:`.inputs.Inputs`,
  which is how ``handforge evaluate`` runs it on two sources.

``num_samples = 0`` (the default) means: 10000 on a GPU; on a CPU, a number chosen to keep an
evaluation of the shipped recipes under about a tenth of their training time (see
:data:`CPU_NUM_SAMPLES` and the README's Metrics section for the measurements).
"""
from __future__ import annotations

from typing import Literal

import attrs
import torch

from handforge.errors import HandforgeError
from handforge.recipe import at_least

from .cas import align_labels, classification_accuracy_score
from .extractors import EXTRACTORS, ExtractorOptions, build_extractor
from .frechet import frechet_distance
from .inception_score import inception_score
from .inputs import run_inputs
from handforge.prdc import prdc

GPU_NUM_SAMPLES = 10_000
# Images per side on a CPU, per extractor, for an evaluation under a tenth of the quickstart's
# ~270 s of training on 2 cores: 200 through the FID Inception take ~15 s (27 s the first time,
# with the real images), 2000 through the judge ~5 s. The README's Metrics section has the table.
CPU_NUM_SAMPLES = {"inception_fid": 200, "hand_features": 2000}
CPU_NUM_SAMPLES_OTHER = 1000


def _known_extractor(_instance, attribute, value):
    if value not in EXTRACTORS and not (value == "" and attribute.default == ""):
        raise ValueError(f"{attribute.name}: unknown feature extractor {value!r}; "
                         f"available: {', '.join(sorted(EXTRACTORS))}")


@attrs.define
class SampleOptions:
    """Options every metric has: how many samples, in what batches, with which noise seed."""

    num_samples: int = attrs.field(default=0, validator=at_least(0), metadata={
        "help": "images per side (real and generated); 0 = 10000 on a GPU, fewer on a CPU (see the docs). "
                "Scores depend on it: compare runs at one value"})
    batch_size: int = attrs.field(default=64, validator=at_least(1), metadata={"help": "images per batch"})
    seed: int = attrs.field(default=0, metadata={"help": "seed of the generator's noise during evaluation"})


@attrs.define
class FeatureOptions(SampleOptions):
    """Options of the metrics that compare features of real and generated images."""

    extractor: str = attrs.field(default="inception_fid", validator=_known_extractor, metadata={
        "help": "feature extractor: inception_fid (FID) or hand_features (a judge classifier's features: FHD)"})
    resize: Literal["clean", "legacy"] = attrs.field(default="clean", metadata={
        "help": "inception_fid: resize to 299 px as clean-fid (PIL bicubic) or legacy (torch bilinear)"})
    weights: str = attrs.field(default="", metadata={
        "help": "inception_fid: a weight file other than the default location (\"\" = default)"})
    classifier: str = attrs.field(default="", metadata={
        "help": "hand_features: the judge classifier checkpoint (handforge fit-judge)"})
    cache: bool = attrs.field(default=True, metadata={
        "help": "keep the real images' statistics in the reference cache ($HANDFORGE_CACHE/reference)"})


class Metric:
    """What the four metrics share: their config, sample count and in-loop entry point."""

    def __init__(self, config, **_):
        self.config = config
        self._check_files()

    def _check_files(self) -> None:
        """Missing weights or checkpoints stop a run before it trains, not at its first evaluation."""
        from .judge_classifier import read_metadata
        from handforge.weights import locate

        from .weight_files import INCEPTION_FID

        classifier = getattr(self.config, "classifier", "")
        if classifier and self.extractor_name() == "hand_features":
            read_metadata(classifier)
        if self.extractor_name() == "inception_fid":
            locate(INCEPTION_FID, self.config.weights or None)

    def num_samples(self, device, extractor: str | None = None) -> int:
        if self.config.num_samples:
            return self.config.num_samples
        if torch.device(device).type != "cpu":
            return GPU_NUM_SAMPLES
        return CPU_NUM_SAMPLES.get(extractor, CPU_NUM_SAMPLES_OTHER)

    def extractor_name(self) -> str | None:
        return getattr(self.config, "extractor", None) or None

    def evaluate(self, run) -> dict[str, float]:
        cfg = self.config
        num = self.num_samples(run.device, self.extractor_name())
        return self.measure(run_inputs(run, num, cfg.seed, cfg.batch_size, getattr(cfg, "cache", True)))

    def measure(self, inputs) -> dict[str, float]:
        raise NotImplementedError

    def extractor(self, device):
        cfg = self.config
        options = ExtractorOptions(weights=cfg.weights or None, classifier=cfg.classifier or None,
                                   resize=cfg.resize, device=str(device))
        return build_extractor(cfg.extractor, options)


def frechet_name(extractor: str) -> str:
    return {"inception_fid": "fid", "hand_features": "fhd"}.get(extractor, f"fd_{extractor}")


@attrs.define
class FidConfig(FeatureOptions):
    """Options of ``fid``."""


class Fid(Metric):
    """Fréchet distance of real and generated features: FID (inception_fid) or FHD (hand_features)."""

    def measure(self, inputs):
        extractor = self.extractor(inputs.device)
        real, fake = inputs.stats("real", extractor), inputs.stats("fake", extractor)
        name = frechet_name(self.config.extractor)
        return inputs.on_main(lambda: {name: frechet_distance(real.mean, real.cov, fake.mean, fake.cov)})


@attrs.define
class PrdcConfig(FeatureOptions):
    k: int = attrs.field(default=5, validator=at_least(1), metadata={"help": "nearest neighbours of a ball's radius"})


class Prdc(Metric):
    """Precision, recall, density and coverage (Naeem et al. 2020) of generated against real features."""

    def measure(self, inputs):
        extractor = self.extractor(inputs.device)
        real, fake = inputs.features("real", extractor), inputs.features("fake", extractor)
        return inputs.on_main(lambda: prdc(real, fake, k=self.config.k))


def _is_source(instance):
    if instance.classifier:
        return  # the judge's logits; the extractor (set for fid/prdc on one command line) is not used
    if instance.extractor == "inception_fid":
        raise ValueError("classifier: required: the FID Inception weights have no classification layer, so "
                         "they give no logits to score; give classifier = a judge checkpoint (handforge fit-judge)")
    if instance.extractor in ("", "hand_features"):
        raise ValueError("classifier: required: the judge classifier checkpoint whose logits are scored "
                         "(train one with `handforge fit-judge`), unless extractor names one that gives logits")


@attrs.define
class IsConfig(SampleOptions):
    classifier: str = attrs.field(default="", metadata={
        "help": "the judge classifier checkpoint whose logits are scored (handforge fit-judge)"})
    extractor: str = attrs.field(default="", validator=_known_extractor, metadata={
        "help": "without classifier: a registered feature extractor that gives logits"})
    weights: str = attrs.field(default="", metadata={"help": "that extractor's weight file (\"\" = default)"})
    splits: int = attrs.field(default=1, validator=at_least(1), metadata={
        "help": "score the samples in this many parts; mean and std over them (StudioGAN: 1)"})

    def __attrs_post_init__(self):
        _is_source(self)


class InceptionScore(Metric):
    """Inception Score from a classifier's logits (a judge checkpoint; the FID Inception has no logits)."""

    def extractor_name(self):
        return "hand_features" if self.config.classifier else self.config.extractor

    def extractor(self, device):
        cfg = self.config
        name = self.extractor_name()
        options = ExtractorOptions(weights=cfg.weights or None, classifier=cfg.classifier or None, device=str(device))
        extractor = build_extractor(name, options)
        if not callable(getattr(extractor, "logits", None)):
            raise HandforgeError(f"metric 'is': feature extractor '{name}' gives no logits; "
                                 f"give classifier = a judge checkpoint (handforge fit-judge)")
        return extractor

    def measure(self, inputs):
        logits = inputs.logits("fake", self.extractor(inputs.device))
        mean, std = inputs.on_main(lambda: inception_score(logits, splits=self.config.splits))
        return {"is": mean, "is_std": std}


@attrs.define
class CasConfig(SampleOptions):
    size: int = attrs.field(default=32, validator=at_least(8), metadata={"help": "the judge's input size, px"})
    epochs: int = attrs.field(default=10, validator=at_least(1), metadata={"help": "training epochs over the fakes"})
    width: int = attrs.field(default=32, validator=at_least(4), metadata={"help": "the judge's first-stage width"})


class Cas(Metric):
    """Classification Accuracy Score: a judge trained on generated images, tested on real ones."""

    def measure(self, inputs):
        cfg = self.config
        train, test = inputs.labelled("fake"), inputs.labelled("real")
        names = inputs.class_names("fake")
        test_names = inputs.class_names("real")

        def score():
            aligned = attrs.evolve(test, labels=align_labels(test, test_names, names))
            return classification_accuracy_score(train, aligned, names, size=cfg.size, epochs=cfg.epochs,
                                                 width=cfg.width, seed=cfg.seed, device=inputs.device)

        return inputs.on_main(score)


METRICS = {
    "fid": (Fid, FidConfig, ("image",)),
    "is": (InceptionScore, IsConfig, ("image",)),
    "prdc": (Prdc, PrdcConfig, ("image",)),
    "cas": (Cas, CasConfig, ("image", "label")),
}
