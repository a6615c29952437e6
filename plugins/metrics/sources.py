"""What ``handforge evaluate --real/--fake`` (and ``fit-judge``) read images from.

Three kinds of source, told apart by the text:

- ``dataset:NAME[:OPTIONS]``: a registered dataset, its options as ``key=value`` pairs separated
  by commas, each value read as TOML exactly as ``handforge prepare`` reads them
  (``dataset:procedural_hands:size=64,classes="fingerspelling",hand_size=[0.5,0.8]``). The extra
  option ``split=val`` picks the split (default ``train``). Samples 0 .. num-1 are read.
- a run directory (it holds ``recipe.toml`` and ``weights/*.safetensors``): the recipe's task is
  rebuilt as the run loop builds it, its exported weights are loaded, and it generates one image
  per sample of the run dataset's ``val`` split, conditioned on that sample (its label,
  keypoints, ...); the source carries those labels and keypoints.
- any other folder: every image below it (``.png .jpg .jpeg .bmp .webp .tif .tiff``), found
  recursively, in sorted order. Labels come from class sub-folders (``DIR/<class>/...``, every
  image one level down or deeper, classes in sorted order), or from the ``labels.json`` and
  ``dataset.json`` that ``handforge prepare`` writes. All images of a folder must share one size.
  With ``num`` below the number of images a seeded random subset is read.

Every source yields :class:`Batch` es of uint8 (N, 3, H, W) images; generated and dataset images
(float in [-1, 1]) are quantized by :func:`handforge.imaging.to_uint8`, the same rule that wrote
every PNG the folder sources read.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Iterator

import attrs
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from handforge.data import collate
from handforge.errors import DataError, HandforgeError
from handforge.imaging import to_uint8
from handforge.data import require_finite
from handforge.runs import WEIGHTS_FOLDER, load_run

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DATASET_PREFIX = "dataset:"
MAX_LISTED = 10  # unreadable files named one by one in an input report; the rest are counted


@attrs.frozen
class Batch:
    """Images (uint8 (N, 3, H, W)) with their labels (N,) and keypoints (N, 21, 3) where known."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    keypoints: torch.Tensor | None = None


def uint8_images(images: torch.Tensor) -> torch.Tensor:
    """Float (N, 3, H, W) in [-1, 1] -> uint8 (N, 3, H, W) on the CPU, by the PNG quantization rule."""
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()


class Source:
    """A finite stream of images. ``cache_key`` identifies the images for cached reference
    statistics (None: not cacheable, e.g. generated ones)."""

    description: str = ""
    class_names: list[str] | None = None
    cache_key: dict | None = None
    skipped: int = 0  # unreadable files passed over (folders read with skip_bad)

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int = 64) -> Iterator[Batch]:
        raise NotImplementedError

    @property
    def has_labels(self) -> bool:
        return bool(self.class_names)

    def problems(self) -> list[str]:
        """What can be found wrong with the images without computing anything (no weights, no
        model): each problem a line naming its file. Empty: nothing found."""
        return []

    def read_all(self, batch_size: int = 64) -> Batch:
        """Every image (and label, keypoints) at once."""
        parts = list(self.batches(batch_size))
        if not parts:
            raise DataError(f"{self.description}: no images")

        def joined(field):
            values = [getattr(p, field) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        return Batch(joined("images"), joined("labels"), joined("keypoints"))


# -- image folders ---------------------------------------------------------------------------------


def _visible(path: pathlib.Path, root: pathlib.Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _subset(count: int, num: int | None, seed: int) -> np.ndarray:
    """Indices of the items to read: all of them, or a seeded random ``num`` of them in order."""
    if num is None or num >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).permutation(count)[:num])


class FolderSource(Source):
    """Images in a folder tree (see the module docstring for labels and sizes)."""

    def __init__(self, root, num: int | None = None, seed: int = 0, skip_bad: bool = False):
        self.root = pathlib.Path(root)
        self.skip_bad = skip_bad
        files, labels, keypoints, names = self._index()
        if not files:
            raise DataError(f"{self.root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
        chosen = _subset(len(files), num, seed)
        self.files = [files[i] for i in chosen]
        self.labels = None if labels is None else labels[chosen]
        self.keypoints = None if keypoints is None else keypoints[chosen]
        self.class_names = names
        self.description = f"folder {self.root}"
        try:
            stats = [f.stat() for f in files]
        except OSError as exc:  # a file labels.json names is gone
            raise DataError(f"{exc.filename}: cannot read the image ({exc.strerror})") from None
        # Which files, how big, how recent: a changed folder gets new reference statistics.
        listing = hashlib.sha1("\n".join(f"{f.relative_to(self.root)}:{s.st_size}:{s.st_mtime_ns}"
                                         for f, s in zip(files, stats)).encode()).hexdigest()
        self.cache_key = {"source": "folder", "path": str(self.root.resolve()), "files": len(files),
                          "listing_sha1": listing, "num": len(self.files), "seed": seed,
                          "class_names": names}

    def _index(self):
        labels_file, info_file = self.root / "labels.json", self.root / "dataset.json"
        if labels_file.is_file():
            return self._index_prepared(labels_file, info_file)
        files = sorted(p for p in self.root.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and _visible(p, self.root))
        if files and all(len(f.relative_to(self.root).parts) > 1 for f in files):
            names = sorted({f.relative_to(self.root).parts[0] for f in files})
            index = {n: i for i, n in enumerate(names)}
            labels = torch.tensor([index[f.relative_to(self.root).parts[0]] for f in files], dtype=torch.int64)
            return files, labels, None, names
        return files, None, None, None

    def _index_prepared(self, labels_file: pathlib.Path, info_file: pathlib.Path):
        """A ``handforge prepare`` folder: the files named in labels.json, with their labels."""
        try:
            entries = json.loads(labels_file.read_text(encoding="utf-8"))
            info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
        except (OSError, ValueError) as exc:
            raise DataError(f"{labels_file}: cannot read: {exc}") from None
        if not isinstance(entries, dict):
            raise DataError(f"{labels_file}: expected an object mapping file names to labels")
        files = [self.root / name for name in entries]
        values = list(entries.values())
        names = info.get("class_names") or None
        labels = keypoints = None
        if names and all(isinstance(v, dict) and isinstance(v.get("label"), int) for v in values):
            labels = torch.tensor([v["label"] for v in values], dtype=torch.int64)
        if all(isinstance(v, dict) and isinstance(v.get("keypoints"), list) for v in values):
            try:
                keypoints = torch.tensor([v["keypoints"] for v in values], dtype=torch.float32).reshape(-1, 21, 3)
            except (ValueError, RuntimeError, TypeError):
                keypoints = None  # not the 21 x 3 contract shape: this source does without them
            if keypoints is not None:  # a NaN keypoint would skew pose scores silently
                require_finite(keypoints.numpy(), f"{labels_file} 'keypoints'", axes=("image", "joint", "value"))
        return files, labels, keypoints, (names if labels is not None else None)

    def __len__(self) -> int:
        return len(self.files)

    def problems(self) -> list[str]:
        """Files that are not images (or are truncated), and images of another size than the rest,
        found from the files' headers and checksums without decoding the pixels. With ``skip_bad``
        unreadable files are left for reading to skip and count."""
        unreadable, sizes = [], {}
        for file in self.files:
            try:
                with Image.open(file) as image:
                    size = image.size
                    image.verify()  # PNG: every chunk's CRC, so a truncated or altered file shows now
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
                unreadable.append(f"{file}: cannot read the image ({type(exc).__name__}: {exc})")
                continue
            sizes.setdefault(size, []).append(file)
        found = [] if self.skip_bad else unreadable[:MAX_LISTED]
        if len(found) < len(unreadable) and not self.skip_bad:
            found.append(f"{self.root}: {len(unreadable) - MAX_LISTED} more files cannot be read either")
        if len(sizes) > 1:
            counts = sorted(sizes.items(), key=lambda item: -len(item[1]))
            listed = "; ".join(f"{len(files)} are {w}x{h} (e.g. {files[0]})" for (w, h), files in counts)
            found.append(f"{self.root}: the images of one folder must share one size, and {listed}")
        return found

    def _read(self, file: pathlib.Path) -> np.ndarray | None:
        try:
            with Image.open(file) as image:
                return np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            if self.skip_bad:
                self.skipped += 1
                return None
            raise DataError(f"{file}: cannot read the image ({type(exc).__name__}: {exc}); "
                            f"fix or remove it, or pass over unreadable files (--skip-bad)") from None

    def batches(self, batch_size: int = 64) -> Iterator[Batch]:
        self.skipped = 0
        first_size = first_file = None
        for start in range(0, len(self.files), batch_size):
            pixels, kept = [], []
            for i in range(start, min(start + batch_size, len(self.files))):
                array = self._read(self.files[i])
                if array is None:
                    continue
                if first_size is None:
                    first_size, first_file = array.shape[:2], self.files[i]
                elif array.shape[:2] != first_size:
                    raise DataError(f"{self.files[i]}: {array.shape[1]}x{array.shape[0]} pixels, but "
                                    f"{first_file} is {first_size[1]}x{first_size[0]}; the images of one "
                                    f"folder must share one size")
                pixels.append(array)
                kept.append(i)
            if not kept:
                continue
            images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
            index = torch.tensor(kept)
            yield Batch(images, None if self.labels is None else self.labels[index],
                        None if self.keypoints is None else self.keypoints[index])


# -- registered datasets ---------------------------------------------------------------------------


def split_options(text: str) -> list[str]:
    """``a=1,b="x,y",c=[1,2]`` -> ['a=1', 'b="x,y"', 'c=[1,2]']: commas inside quotes or brackets
    belong to the value."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def fetch_samples(dataset, indices: list[int]) -> dict:
    """One batch of samples as (B, ...) tensors: ``__getitems__`` when the dataset batches itself."""
    if hasattr(dataset, "__getitems__"):
        return collate(dataset.__getitems__(indices))
    return collate([dataset[i] for i in indices])


def _sample_batch(samples: dict, where: str) -> Batch:
    if "image" not in samples:
        raise DataError(f"{where}: yields no 'image' field; fields: {', '.join(samples)}")
    return Batch(uint8_images(samples["image"]), samples.get("label"), samples.get("keypoints"))


def dataset_key(name: str, config, split: str, num: int, dataset) -> dict:
    """Identifies the first ``num`` samples of a dataset (the same for runs and ``dataset:`` sources)."""
    options = attrs.asdict(config) if config is not None else {}
    size = list(dataset[0]["image"].shape[-2:])
    return {"source": "dataset", "dataset": name, "options": options, "split": split, "num": num,
            "image_size": size}


class DatasetSource(Source):
    """Samples 0 .. num-1 of a registered dataset, built from ``dataset:NAME[:k=v,...]``."""

    def __init__(self, text: str, num: int | None, host=None):
        from handforge.prepare import resolve_dataset

        spec = text[len(DATASET_PREFIX):]
        name, _, options = spec.partition(":")
        if not name:
            raise HandforgeError(f"{text!r}: expected dataset:NAME or dataset:NAME:key=value,key=value")
        texts = split_options(options)
        split = "train"
        for item in list(texts):
            key, _, value = item.partition("=")
            if key.strip() == "split":
                split = value.strip().strip("\"'")
                texts.remove(item)
        if split not in ("train", "val"):
            raise HandforgeError(f"{text!r}: split must be 'train' or 'val', got {split!r}")
        if num is None:
            raise HandforgeError(f"{text!r}: a dataset source needs a number of samples (--num)")
        component = resolve_dataset(name, texts, num=num, host=host)
        self.dataset = component.build(split=split)
        self.num = min(num, len(self.dataset))
        self.name, self.split = name, split
        self.class_names = list(getattr(self.dataset, "class_names", None) or []) or None
        self.description = f"dataset '{name}' ({split})"
        self.cache_key = dataset_key(name, component.config, split, self.num, self.dataset)

    def __len__(self) -> int:
        return self.num

    def batches(self, batch_size: int = 64) -> Iterator[Batch]:
        for start in range(0, self.num, batch_size):
            indices = list(range(start, min(start + batch_size, self.num)))
            batch = _sample_batch(fetch_samples(self.dataset, indices), self.description)
            if batch.labels is not None and not self.class_names:
                batch = attrs.evolve(batch, labels=None)  # labels without names cannot be matched up
            yield batch


# -- run directories -------------------------------------------------------------------------------


def is_run_dir(path: pathlib.Path) -> bool:
    return (path / "recipe.toml").is_file() and (path / WEIGHTS_FOLDER).is_dir()


class RunSource(Source):
    """Images a finished run's task generates, one per sample of its dataset's val split."""

    def __init__(self, run_dir, num: int | None, seed: int = 0, host=None):
        if num is None:
            raise HandforgeError(f"{run_dir}: a run source needs a number of images (--num)")
        self.run = load_run(run_dir, split="val", host=host)
        self.num, self.seed = num, seed
        self.class_names = self.run.class_names or None
        self.description = f"run {run_dir}"

    def __len__(self) -> int:
        return self.num

    def batches(self, batch_size: int = 64) -> Iterator[Batch]:
        dataset, device = self.run.dataset, self.run.device
        # The run's own RNG is not ours to advance: generate under a forked, seeded one.
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            for start in range(0, self.num, batch_size):
                # More images than samples: the conditions repeat, the noise does not.
                indices = [i % len(dataset) for i in range(start, min(start + batch_size, self.num))]
                samples = fetch_samples(dataset, indices)
                try:
                    with torch.no_grad():
                        images = self.run.task.generate({k: v.to(device) for k, v in samples.items()})
                except NotImplementedError as exc:
                    raise HandforgeError(f"{self.description}: {exc}; only a task that generates images "
                                         f"can be a source") from None
                labels = samples.get("label") if self.class_names else None
                yield Batch(uint8_images(images), labels, samples.get("keypoints"))


# -- parsing -----------------------------------------------------------------------------------------


def open_source(text: str, *, num: int | None = None, seed: int = 0, skip_bad: bool = False,
                option: str = "source", host=None) -> Source:
    """The source a ``--real`` / ``--fake`` text names (see the module docstring)."""
    text = str(text)
    if text.startswith(DATASET_PREFIX):
        return DatasetSource(text, num, host=host)
    path = pathlib.Path(text)
    if not path.exists():
        raise HandforgeError(f"{option} {text}: no such folder (give an image folder, a run directory, "
                             f"or dataset:NAME[:key=value,...])")
    if not path.is_dir():
        raise HandforgeError(f"{option} {text}: not a folder (give an image folder, a run directory, "
                             f"or dataset:NAME[:key=value,...])")
    if is_run_dir(path):
        return RunSource(path, num, seed=seed, host=host)
    if (path / "recipe.toml").is_file():
        raise HandforgeError(f"{option} {text}: a run directory without {WEIGHTS_FOLDER}/ (did the run finish?)")
    return FolderSource(path, num=num, seed=seed, skip_bad=skip_bad)
