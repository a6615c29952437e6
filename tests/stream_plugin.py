"""Test plugin: ``toy_stream``, random images that can also be read as a stream
(``train.read = "stream"``), each sample carrying its index as ``identity``; every
``bad_every``-th sample is "damaged": the stream leaves it out and counts it."""
from collections import Counter

import attrs
import torch

from handforge import hookimpl


@attrs.define
class ToyStreamConfig:
    size: int = 4
    length: int = 36
    bad_every: int = 0  # samples i with (i + 1) % bad_every == 0 are skipped by the stream (0: none)
    seed: int = 0


def is_bad(config, i: int) -> bool:
    return bool(config.bad_every) and (i + 1) % config.bad_every == 0


def epoch_order(config, epoch: int) -> list[int]:
    return torch.randperm(config.length, generator=torch.Generator().manual_seed(config.seed * 7919 + epoch)).tolist()


class ToyStream(torch.utils.data.Dataset):
    """Random images with their index."""

    def __init__(self, config, split="train"):
        self.config, self.image_size = config, config.size

    def __len__(self):
        return self.config.length

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, self.config.size, self.config.size, generator=g) * 2 - 1,
                "identity": torch.tensor(i)}

    def stream(self, rank, world, epoch, shuffle):
        return ToyShare(self, rank, world, epoch, shuffle)


class ToyShare(torch.utils.data.IterableDataset):
    def __init__(self, dataset, rank, world, epoch, shuffle):
        self.dataset, self.rank, self.world, self.epoch, self.shuffle = dataset, rank, world, epoch, shuffle
        self.counts = Counter()

    def skipped(self):
        return dict(self.counts)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        reader, readers = self.rank * workers + worker, self.world * workers
        config = self.dataset.config
        order = epoch_order(config, self.epoch) if self.shuffle else list(range(config.length))
        for i in order[reader::readers]:
            if is_bad(config, i):
                self.counts["damaged"] += 1
                continue
            yield self.dataset[i]


@hookimpl
def register_datasets(register):
    register("toy_stream", ToyStream, config=ToyStreamConfig, provides=("image", "identity"))
