"""Feature extractors: what turns images into the vectors that FID, FHD and PRDC compare.

An extractor is built by name from :class:`ExtractorOptions` and offers::

    features(images_uint8) -> Tensor (N, D) float32 on the CPU    # images: uint8 (N, 3, H, W)
    logits(images_uint8)   -> Tensor (N, C)                         # only if it has a classifier head
    key: dict                                                      # identifies its output (cache keys)
    name: str

Built-in:

- ``inception_fid``: the standard FID Inception's 2048-d pool features (the TF 2015-12-05
  InceptionV3, loaded offline from the weight file ``handforge weights fetch inception_fid`` puts
  in place). That file has no classification layer, so this extractor gives no logits.
- ``hand_features``: the penultimate features of a judge classifier checkpoint (see
  :mod:`.judge_classifier`; ``handforge fit-judge``). Their Fréchet distance is the Fréchet Hand
  Distance (FHD): unlike ImageNet features, they are trained to tell handshapes apart.

A plugin package adds its own extractor by calling :func:`register_extractor` from its
``register_metrics`` hook (which runs once, when the plugin loads)::

    @hookimpl
    def register_metrics(register):
        register_extractor("my_net", lambda options: MyNet(options.weights, options.device))
"""
from __future__ import annotations

from typing import Callable, Literal

import attrs

from handforge.errors import HandforgeError
from handforge.registry import did_you_mean

RESIZE_MODES = ("clean", "legacy")


@attrs.frozen
class ExtractorOptions:
    """What an extractor may be built with; each builder reads the options it uses."""

    weights: str | None = None  # a weight file other than the default location (inception_fid)
    classifier: str | None = None  # a classifier checkpoint (hand_features)
    resize: Literal["clean", "legacy"] = "clean"  # how images are resized to the network's input
    device: str = "cpu"


@attrs.frozen
class ExtractorEntry:
    name: str
    builder: Callable
    summary: str


EXTRACTORS: dict[str, ExtractorEntry] = {}


def register_extractor(name: str, builder: Callable, summary: str = "") -> None:
    """Make ``builder(options: ExtractorOptions)`` available as the extractor ``name``."""
    previous = EXTRACTORS.get(name)
    if previous is not None and previous.builder is not builder:
        raise HandforgeError(f"feature extractor '{name}' is registered twice ({previous.builder!r} and {builder!r})")
    EXTRACTORS[name] = ExtractorEntry(name, builder, summary or (builder.__doc__ or "").strip().split("\n")[0])


_BUILT: dict = {}


def build_extractor(name: str, options: ExtractorOptions | None = None):
    """The extractor ``name`` built with ``options``; built once per process for the same options."""
    options = options or ExtractorOptions()
    if name not in EXTRACTORS:
        raise HandforgeError(f"unknown feature extractor '{name}'{did_you_mean(name, EXTRACTORS)}; "
                             f"available: {', '.join(sorted(EXTRACTORS))}")
    if options.resize not in RESIZE_MODES:
        raise HandforgeError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {options.resize!r}")
    memo = (name, options)
    if memo not in _BUILT:
        if len(_BUILT) >= 4:  # networks are big: keep the few a process actually alternates between
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[memo] = EXTRACTORS[name].builder(options)
    return _BUILT[memo]


# -- built-in extractors ---------------------------------------------------------------------------


class InceptionFID:
    """2048-d features of the FID Inception (no logits: the file has no classification layer)."""

    name = "inception_fid"

    def __init__(self, options: ExtractorOptions):
        from .inception import load_inception_fid
        from .weight_files import INCEPTION_FID

        # Loading verifies the file's SHA1, so the spec's hash names the weights exactly.
        self.network = load_inception_fid(options.weights, device=options.device, resize=options.resize)
        self.key = {"extractor": self.name, "weights_sha1": INCEPTION_FID.sha1, "resize": options.resize}

    def features(self, images):
        return self.network(images).float().cpu()


class HandFeatures:
    """Penultimate features (and logits) of a judge classifier checkpoint: FHD's extractor."""

    name = "hand_features"

    def __init__(self, options: ExtractorOptions):
        from .judge_classifier import file_digest, load_classifier

        if not options.classifier:
            raise HandforgeError("feature extractor 'hand_features' needs a judge classifier checkpoint: "
                                 "give classifier = \"PATH\" (--classifier PATH); train one with "
                                 "`handforge fit-judge SRC --out judge.safetensors`")
        self.classifier = load_classifier(options.classifier, device=options.device)
        self.class_names = list(self.classifier.class_names)
        self.key = {"extractor": self.name, "classifier_sha1": file_digest(options.classifier)}

    def features(self, images):
        return self.classifier.features(images)

    def logits(self, images):
        return self.classifier.logits(images)


register_extractor("inception_fid", InceptionFID)
register_extractor("hand_features", HandFeatures)
