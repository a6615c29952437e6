"""What metrics measure, from two places: a training run (in-loop, on every process) or two
sources (``handforge evaluate``). A metric asks its inputs for one side, "real" or "fake":

- ``features(side, extractor)`` (N, D) and ``stats(side, extractor)`` (a FeatureStats);
- ``logits(side, classifier)`` (N, C);
- ``labelled(side)``: uint8 images with labels, and ``class_names(side)``;
- ``on_main(fn)``: the result of ``fn()``, computed once and shared (one process does the
  math, every process returns the same numbers).

Features of one side and extractor are computed once per evaluation, so ``fid`` and ``prdc``
with the same extractor share them. Real reference statistics and features are cached on disk
(:mod:`.reference`) when their source can be identified.
"""
from __future__ import annotations

import json
import weakref

import torch

from handforge.errors import HandforgeError

from . import reference
from .frechet import FeatureStats
from .sources import Batch, Source, dataset_key, fetch_samples, uint8_images


def _memo_key(*parts) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def stats_of(features: torch.Tensor) -> FeatureStats:
    return FeatureStats().update(features)


class Inputs:
    """The interface both kinds of inputs implement (see the module docstring)."""

    cache = True
    device = torch.device("cpu")

    def __init__(self):
        self._memo: dict = {}

    def _memoized(self, key, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def on_main(self, fn):
        return fn()

    # -- the real side's cache --------------------------------------------------------------------

    def _reference_key(self, side: str, extractor) -> dict | None:
        """The cache key of the real side's features; None: not cached (fakes change with the weights)."""
        base = self.source_key(side) if side == "real" and self.cache else None
        return None if base is None else {**base, "extractor": extractor.key}

    def source_key(self, side: str) -> dict | None:
        raise NotImplementedError

    def stats(self, side: str, extractor) -> FeatureStats:
        def compute():
            key = self._reference_key(side, extractor)
            cached = self._load(reference.load_stats, key)
            if cached is not None:
                return cached
            stats = stats_of(self.features(side, extractor))
            if key is not None:
                self.on_main(lambda: reference.save_stats(stats, key))
            return stats

        return self._memoized(_memo_key("stats", side, extractor.key), compute)

    def features(self, side: str, extractor) -> torch.Tensor:
        def compute():
            key = self._reference_key(side, extractor)
            cached = self._load(reference.load_features, key)
            if cached is not None:
                return cached
            features = self._extract(side, extractor.features)
            if key is not None:
                self.on_main(lambda: reference.save_features(features, key))
            return features

        return self._memoized(_memo_key("features", side, extractor.key), compute)

    def logits(self, side: str, classifier) -> torch.Tensor:
        if not callable(getattr(classifier, "logits", None)):
            raise HandforgeError(f"{getattr(classifier, 'name', type(classifier).__name__)} gives no logits")
        return self._memoized(_memo_key("logits", side, getattr(classifier, "key", id(classifier))),
                              lambda: self._extract(side, classifier.logits))

    def _load(self, loader, key):
        return None if key is None else self.on_main(lambda: loader(key))

    def _extract(self, side: str, fn) -> torch.Tensor:
        raise NotImplementedError

    def labelled(self, side: str) -> Batch:
        raise NotImplementedError

    def posed(self, side: str, fn, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``fn(uint8 images)`` of every image of one side, with the keypoints the images were made in
        (fakes: the conditioning keypoints) or labelled with (reals), in one pass: (outputs, keypoints)."""
        raise NotImplementedError

    def class_names(self, side: str) -> list[str] | None:
        raise NotImplementedError

    def paired(self, fn, key: str) -> torch.Tensor:
        """``fn(targets, generated, keypoints)`` -> (B, K) per-image values for every pair of a
        target and the image generated for it (uint8 (B, 3, H, W) each; the targets' keypoints (B,
        21, 3), or None where none are known): all rows, (N, K), computed once per ``key``."""
        raise NotImplementedError


# -- two sources: handforge evaluate ---------------------------------------------------------------


class SourceInputs(Inputs):
    """Inputs read from a ``--real`` and a ``--fake`` source (either may be None)."""

    def __init__(self, real: Source | None, fake: Source | None, *, batch_size: int = 64, cache: bool = True,
                 device="cpu", metric: str = "metric"):
        super().__init__()
        self.sources = {"real": real, "fake": fake}
        self.batch_size, self.cache, self.device = batch_size, cache, torch.device(device)
        self.metric = metric  # named in errors; set by the caller before each metric

    def source(self, side: str) -> Source:
        source = self.sources[side]
        if source is None:
            raise HandforgeError(f"metric '{self.metric}' needs --{side} images")
        return source

    def source_key(self, side):
        return self.source(side).cache_key

    def _extract(self, side, fn):
        source = self.source(side)
        parts = [fn(batch.images) for batch in source.batches(self.batch_size)]
        if not parts:
            raise HandforgeError(f"{source.description}: no images")
        return torch.cat(parts).float().cpu()

    def class_names(self, side):
        return self.source(side).class_names

    def labelled(self, side):
        source = self.source(side)
        if not source.has_labels:
            raise HandforgeError(f"metric '{self.metric}' needs labelled images, but --{side} "
                                 f"({source.description}) has no labels (use class sub-folders, a "
                                 f"`handforge prepare` folder, or a labelled dataset)")
        return self._memoized(_memo_key("labelled", side), lambda: source.read_all(self.batch_size))

    def posed(self, side, fn, key):
        source = self.source(side)

        def compute():
            outputs, keypoints = [], []
            for batch in source.batches(self.batch_size):
                if batch.keypoints is None:
                    raise HandforgeError(f"metric '{self.metric}' needs the keypoints of the --{side} images, but "
                                         f"{source.description} has none (a pose-conditioned run directory, a "
                                         f"dataset with keypoints, or a folder whose labels.json has them)")
                outputs.append(fn(batch.images))
                keypoints.append(batch.keypoints)
            if not outputs:
                raise HandforgeError(f"{source.description}: no images")
            return torch.cat(outputs).float().cpu(), torch.cat(keypoints).float().cpu()

        return self._memoized(_memo_key("posed", side, key), compute)

    def paired(self, fn, key):
        from .pairs import folder_pairs, run_pairs
        from .sources import FolderSource, RunSource

        real, fake = self.sources["real"], self.sources["fake"]
        if isinstance(real, FolderSource) and isinstance(fake, FolderSource):
            pairs = lambda: folder_pairs(real, fake, self.batch_size, self.metric)  # noqa: E731
        elif real is None and isinstance(fake, RunSource):
            pairs = lambda: run_pairs(fake, self.batch_size, self.metric)  # noqa: E731
        else:
            raise HandforgeError(f"metric '{self.metric}' compares image pairs: give --real and --fake image folders "
                                 f"(files matched by name), or a run directory as --fake alone (its val split "
                                 f"against its generations)")

        def compute():
            rows = [fn(r, f, k).float().cpu() for r, f, k in pairs()]
            if not rows:
                raise HandforgeError(f"metric '{self.metric}': no image pairs")
            return torch.cat(rows)

        return self._memoized(_memo_key("paired", key), compute)

    def keypoint_source(self) -> str:
        """Where the targets' keypoints would come from, for an error that finds none."""
        real = self.sources["real"]
        if real is not None:
            return f"--real {real.description} (a labels.json with 'keypoints', 21 x 3 per image, as `handforge prepare` writes)"
        return f"the dataset of --fake {self.sources['fake'].description}"


# -- a training run: in-loop evaluation on every process ---------------------------------------------


def _share(num: int, rank: int, world: int) -> range:
    """The sample indices process ``rank`` of ``world`` handles: contiguous, sizes differing by at most one."""
    return range(rank * num // world, (rank + 1) * num // world)


class RunInputs(Inputs):
    """Inputs of an evaluation inside a run: each process makes its share of the ``num`` fakes
    (``run.task.generate`` on the conditions of the run dataset's samples 0 .. num-1) and of the
    real features, and every process gets all of them through ``accelerator.gather``.

    The fakes come from a seeded RNG forked from the run's, so evaluating neither changes the
    training randomness nor varies between evaluations except through the weights (the noise
    differs per process, so the exact fakes depend on the number of processes)."""

    def __init__(self, run, num: int, seed: int = 0, batch_size: int = 64, cache: bool = True):
        super().__init__()
        self.run, self.seed, self.batch_size, self.cache = run, seed, batch_size, cache
        self.acc = run.accelerator
        self.device = run.device
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.num = min(num, len(run.dataset))  # real images are not repeated: at most the dataset
        if self.num < self.world:
            raise HandforgeError(f"in-loop evaluation of {self.num} samples cannot be shared by {self.world} processes")
        self._val_dataset = None

    def on_main(self, fn):
        """``fn()`` on the main process, its result (or its error) broadcast to every process."""
        if self.world == 1:
            return fn()
        from accelerate.utils import broadcast_object_list

        box = [None]
        if self.acc.is_main_process:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - every process must raise it, not hang
                box[0] = ("error", f"{exc}" if isinstance(exc, HandforgeError) else f"{type(exc).__name__}: {exc}")
        broadcast_object_list(box, from_process=0)
        status, value = box[0]
        if status == "error":
            raise HandforgeError(value)
        return value

    def source_key(self, side):
        data = self.run.recipe.data
        return dataset_key(data.name, data.config, "train", self.num, self.run.dataset)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every process's rows, in rank order (the shares may differ by one batch in size)."""
        if self.world == 1:
            return local
        counts = [len(_share(self.num, r, self.world)) for r in range(self.world)]
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: local.shape[0]] = local
        gathered = self.acc.gather(padded.to(self.device)).cpu()
        parts = gathered.split(max(counts))
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    def _batches(self, side: str, dataset=None):
        """This process's share of one side, as Batches of uint8 images with their labels."""
        dataset = self.run.dataset if dataset is None else dataset
        device = self.device
        # A val split shorter than num (CAS's test set) is read round and round.
        indices = [i % len(dataset) for i in _share(self.num, self.rank, self.world)]
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + self.rank)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                if side == "fake" and dataset is self.run.dataset:
                    samples = _conditions(self.run, chunk)
                else:
                    samples = fetch_samples(dataset, chunk)
                if side == "real":
                    images = samples["image"]
                else:
                    with torch.no_grad():
                        images = self.run.task.generate({k: v.to(device) for k, v in samples.items()})
                yield Batch(uint8_images(images), samples.get("label"), samples.get("keypoints"))

    def _extract(self, side, fn):
        local = torch.cat([fn(batch.images) for batch in self._batches(side)])
        return self._gather(local.float().cpu())

    def class_names(self, side):
        return self.run.class_names or None

    def posed(self, side, fn, key):
        """Both sides are the run dataset's samples 0 .. num-1: the fakes drawn in their keypoints,
        and the real images of the same poses."""
        def compute():
            outputs, keypoints = [], []
            for batch in self._batches(side):
                if batch.keypoints is None:
                    raise HandforgeError(f"dataset '{self.run.recipe.data.name}' yields no keypoints")
                outputs.append(fn(batch.images).float().cpu())
                keypoints.append(batch.keypoints.float().cpu())
            return self._gather(torch.cat(outputs)), self._gather(torch.cat(keypoints))

        return self._memoized(_memo_key("posed", side, key), compute)

    def paired(self, fn, key):
        """The run dataset's samples 0 .. num-1: each one's ``image`` against what the task generates
        from the rest of the sample (its reference and keypoints, for pose transfer)."""
        def compute():
            dataset, device = self.run.dataset, self.device
            indices = list(_share(self.num, self.rank, self.world))
            rows = []
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed * 1_000_003 + self.rank)
                for start in range(0, len(indices), self.batch_size):
                    samples = fetch_samples(dataset, indices[start:start + self.batch_size])
                    keypoints = samples.get("keypoints")
                    conditions = {k: v.to(device) for k, v in samples.items() if k != "image"}
                    with torch.no_grad():
                        generated = uint8_images(self.run.task.generate(conditions))
                    rows.append(fn(uint8_images(samples["image"]), generated, keypoints).float().cpu())
            return self._gather(torch.cat(rows))

        return self._memoized(_memo_key("paired", key), compute)

    def keypoint_source(self) -> str:
        return f"dataset '{self.run.recipe.data.name}'"

    def labelled(self, side):
        """Fakes: made for the labels of the train split's samples 0 .. num-1. Reals: the val split's
        samples 0 .. num-1 (a test set the generator never saw)."""
        def compute():
            dataset = None
            if side == "real":
                if self._val_dataset is None:
                    self._val_dataset = self.run.recipe.data.build(split="val")
                dataset = self._val_dataset
            parts = list(self._batches(side, dataset))
            if parts[0].labels is None:
                raise HandforgeError(f"dataset '{self.run.recipe.data.name}' yields no labels")
            images = self._gather(torch.cat([p.images for p in parts]))
            labels = self._gather(torch.cat([p.labels for p in parts]))
            return Batch(images, labels)

        return self._memoized(_memo_key("labelled", side), compute)


# The conditions of the fakes (the run dataset's samples without their images) are the same at
# every evaluation: kept between evaluations unless they are big, so that they are read once.
_CONDITIONS: dict = {"run": None, "batches": {}, "bytes": 0}
CONDITIONS_BYTES = 256 << 20


def _conditions(run, indices: list[int]) -> dict:
    owner = _CONDITIONS["run"]() if _CONDITIONS["run"] is not None else None
    if owner is not run:
        _CONDITIONS.update(run=weakref.ref(run), batches={}, bytes=0)
    key = tuple(indices)
    if key in _CONDITIONS["batches"]:
        return _CONDITIONS["batches"][key]
    samples = fetch_samples(run.dataset, indices)
    samples.pop("image", None)  # the generator makes its own
    size = sum(t.numel() * t.element_size() for t in samples.values() if torch.is_tensor(t))
    if _CONDITIONS["bytes"] + size <= CONDITIONS_BYTES:
        _CONDITIONS["batches"][key] = samples
        _CONDITIONS["bytes"] += size
    return samples


# One RunInputs per (run, evaluation step, num, seed, ...), so the metrics of one evaluation share
# the fakes' features; replaced when the next evaluation starts.
_CURRENT: dict = {"run": None, "step": None, "inputs": {}}


def run_inputs(run, num: int, seed: int = 0, batch_size: int = 64, cache: bool = True) -> RunInputs:
    current = _CURRENT["run"]() if _CURRENT["run"] is not None else None
    if current is not run or _CURRENT["step"] != run.step:
        _CURRENT.update(run=weakref.ref(run), step=run.step, inputs={})
    key = (num, seed, batch_size, cache)
    if key not in _CURRENT["inputs"]:
        _CURRENT["inputs"][key] = RunInputs(run, num, seed, batch_size, cache)
    return _CURRENT["inputs"][key]

