"""Pose-transfer pairs from WebDataset-style tar shards: the ``synthsl`` and ``bosphorus`` datasets
(one reader, :mod:`.dataset`; the two layouts, :mod:`.layouts`; member streaming, :mod:`.members`)."""
from handforge import hookimpl

PROVIDES = ("image", "reference", "keypoints", "reference_keypoints")


@hookimpl
def register_datasets(register):
    from .dataset import BosphorusPairs, SynthSLPairs, TarPairsConfig

    register("synthsl", SynthSLPairs, config=TarPairsConfig, provides=PROVIDES)
    register("bosphorus", BosphorusPairs, config=TarPairsConfig, provides=PROVIDES)
