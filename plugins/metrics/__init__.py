"""Metrics: FID, IS, PRDC, CAS, pose fidelity, the paired image scores and their feature extractors.

The metric components live in :mod:`.components`, the math in :mod:`.frechet`, :mod:`.prdc` and
:mod:`.inception_score`, pose fidelity in :mod:`.pose_fidelity`, SSIM / PSNR and their hand-box variants in :mod:`.paired`
(math in :mod:`.paired_math`, folder pairs in :mod:`.pairs`), the feature extractors in :mod:`.extractors`, the judge classifier in
:mod:`.judge_classifier`, and the ``evaluate`` and ``fit-judge`` commands in
:mod:`.commands`. This module registers them through the same hooks a third-party plugin uses;
importing it registers the FID Inception file with the core's weight store (:mod:`.weight_files`).
"""
from handforge import hookimpl

from . import weight_files  # noqa: F401  (registers inception_fid for `handforge weights`)


@hookimpl
def register_metrics(register):
    from .components import METRICS

    from .paired import PAIRED_METRICS
    from .pose_fidelity import PoseFidelity, PoseFidelityConfig

    for name, (factory, config, needs) in {**METRICS, **PAIRED_METRICS}.items():
        register(name, factory, config=config, needs=needs)
    register("pose_fidelity", PoseFidelity, config=PoseFidelityConfig, needs=("image", "keypoints"))


@hookimpl
def register_commands(cli):
    from .commands import add_commands

    add_commands(cli)

