"""Training batches from a dataset's stream (``train.read = "stream"``), epoch after epoch.

A dataset that can be read front to back offers ``stream(rank, world, epoch, shuffle)``: a torch
``IterableDataset`` of process ``rank``'s share of epoch ``epoch`` (split further over DataLoader
workers by the stream itself), the same samples for the same arguments. Each process builds its own
DataLoader over its own share. The loader is never given to ``accelerator.prepare``: for an
IterableDataset Accelerate would either read on the main process only and hand out slices
(``dispatch_batches=True``, its default) or have every process read everything and keep every
``world``-th batch (``dispatch_batches=False``); on a stream already split by rank both lose data.

Batches are collated inside each worker from its own samples, whole batches only (as a DataLoader
with ``batch_size`` does for an IterableDataset); each carries what the stream skipped (bad data,
counted by kind) since the worker's previous batch, so the counts reach the run's log.
"""
from collections import Counter

import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, IterableDataset

from .data import collate
from .errors import DataError


def _skipped_so_far(stream) -> Counter:
    """What ``stream`` has left out so far in this process, by kind (its optional ``skipped()``)."""
    counted = getattr(stream, "skipped", None)
    return Counter(counted()) if callable(counted) else Counter()


class EpochBatches(IterableDataset):
    """One epoch of one process's stream as ``(batch, newly skipped)`` pairs; after a worker's last
    whole batch, ``(None, newly skipped)`` (its leftover samples are dropped, as in map-style reading)."""

    def __init__(self, stream, batch_size: int):
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self):
        seen, items = _skipped_so_far(self.stream), []

        def news() -> dict:
            nonlocal seen
            now = _skipped_so_far(self.stream)
            new, seen = now - seen, now
            return dict(new)

        for sample in self.stream:
            items.append(sample)
            if len(items) == self.batch_size:
                yield collate(items), news()
                items = []
        yield None, news()


def _as_is(item):
    return item


class StreamBatches:
    """Endless batches from ``dataset.stream``, counted per epoch so that a resumed run continues
    exactly: the stream is a function of (seed, epoch, rank), so the batches of the current epoch
    that the checkpoint had already consumed are read again and passed over (their skip counts too:
    those were counted before the checkpoint)."""

    def __init__(self, dataset, batch_size: int, seed: int, num_workers: int, device, rank: int = 0,
                 world: int = 1, position: dict | None = None, consumed: int = 0):
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self.device, self.rank, self.world, self.consumed = device, rank, world, consumed
        position = position or {}
        self.epoch, self.offset = int(position.get("epoch", 0)), int(position.get("offset", 0))
        self.skipped = Counter(position.get("skipped", {}))
        self._iterator = None

    def position(self) -> dict:
        """Where this process is: epoch, batches read in it, and what was skipped so far (JSON)."""
        return {"epoch": self.epoch, "offset": self.offset, "skipped": dict(self.skipped)}

    def _open(self):
        stream = self.dataset.stream(self.rank, self.world, self.epoch, True)
        loader = DataLoader(EpochBatches(stream, self.batch_size), batch_size=None, num_workers=self.num_workers,
                            collate_fn=_as_is, persistent_workers=False,
                            # worker seeds from a generator of their own (as build_loader's), new each
                            # epoch, never from the global RNG the task draws noise from
                            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        iterator, passed = iter(loader), 0
        while passed < self.offset:
            try:
                batch, _ = next(iterator)
            except StopIteration:
                raise DataError(f"resuming: the stream of rank {self.rank} of {self.world} gave {passed} batches of "
                                f"epoch {self.epoch}, the checkpoint had read {self.offset}; the data changed since "
                                f"the checkpoint, so the run cannot continue where it was") from None
            passed += batch is not None
        return iterator

    def next(self) -> dict:
        while True:
            if self._iterator is None:
                self._iterator = self._open()
            try:
                batch, skipped = next(self._iterator)
            except StopIteration:
                if self.offset == 0:
                    raise DataError(f"the stream of rank {self.rank} of {self.world} gave no whole batch of "
                                    f"{self.batch_size} in epoch {self.epoch} (with {self.num_workers} DataLoader "
                                    f"workers, each batches its own samples)") from None
                self.epoch, self.offset, self._iterator = self.epoch + 1, 0, None
                continue
            self.skipped.update(skipped)
            if batch is None:
                continue
            self.offset += 1
            self.consumed += 1
            return send_to_device(batch, self.device)
