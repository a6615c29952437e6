"""The ``generated`` dataset: a folder ``handforge generate`` wrote, read back with every field it has.

Each sample has ``image`` (the PNG, as the sample contract's float (3, H, W) in [-1, 1]) and
``label`` (``class_names`` from the manifest), plus every other conditioning field the manifest
stores under a sample-contract name (``keypoints`` for a pose-conditioned generator).

Splits: with ``val_fraction`` f > 0 the last ceil(f * n) images of each class (in manifest order)
are the ``val`` split and the others ``train``; with f = 0 both splits are the whole set.
"""
from __future__ import annotations

import math
import pathlib

import attrs
import numpy as np
import torch
from attrs import validators as v
from PIL import Image, UnidentifiedImageError

from handforge.data import FIELDS, check_index, check_split
from handforge.errors import DataError

from handforge.data import require_finite

from .manifest import MANIFEST, read_manifest

SKIPPED_FIELDS = ("image",)


@attrs.define
class GeneratedConfig:
    path: str = attrs.field(metadata={"help": "the folder `handforge generate --out` wrote"})
    val_fraction: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.lt(1.0)], metadata={
        "help": "share of each class's images (its last ones) in the val split; 0: both splits are all images"})


def manifest_fields(manifest: dict) -> tuple:
    """Sample-contract fields every image record of the manifest carries (besides the image)."""
    records = manifest["images"]
    if not records:
        return ()
    return tuple(f for f in FIELDS if f not in SKIPPED_FIELDS and all(f in r for r in records))


def split_records(records: list[dict], val_fraction: float, split: str) -> list[dict]:
    if val_fraction == 0:
        return list(records)
    by_class: dict[int, list[dict]] = {}
    for record in records:
        by_class.setdefault(record["label"], []).append(record)
    chosen = []
    for label in sorted(by_class):
        items = by_class[label]
        n_val = math.ceil(val_fraction * len(items))
        chosen.extend(items[len(items) - n_val:] if split == "val" else items[:len(items) - n_val])
    return sorted(chosen, key=lambda r: r["index"])


class GeneratedImages(torch.utils.data.Dataset):
    """Images a generator exported (``handforge generate``), with their labels and conditions."""

    def __init__(self, config: GeneratedConfig, split: str = "train"):
        check_split("generated", split)
        self.root = pathlib.Path(config.path)
        manifest = read_manifest(self.root)
        if not manifest.get("complete", False):
            raise DataError(f"{self.root}: the export is incomplete; run the same `handforge generate` "
                            f"command again to finish it")
        self.manifest = manifest
        self.class_names = list(manifest["class_names"])
        self.fields = manifest_fields(manifest)
        for field in self.fields:  # a NaN pose would train silently: refused like every dataset's
            if FIELDS[field].dtype.is_floating_point:
                where = f"{self.root / MANIFEST} '{field}'"
                try:
                    values = np.asarray([r[field] for r in manifest["images"]], dtype=np.float64)
                except (ValueError, TypeError):
                    raise DataError(f"{where}: not numbers of one shape for every image") from None
                require_finite(values, where, axes=("image",))
        self.records = split_records(manifest["images"], config.val_fraction, split)
        if not self.records:
            raise DataError(f"{self.root}: no images in the {split} split (val_fraction {config.val_fraction})")
        self._values = {f: torch.tensor([r[f] for r in self.records], dtype=FIELDS[f].dtype) for f in self.fields}
        first = self._read(0)
        self.image_size = tuple(first.shape[-2:])

    def __len__(self) -> int:
        return len(self.records)

    def _read(self, i: int) -> torch.Tensor:
        file = self.root / self.records[i]["file"]
        try:
            with Image.open(file) as image:
                pixels = np.array(image.convert("RGB"))  # writable: torch wraps it
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{file}: cannot read the image ({type(exc).__name__}: {exc})") from None
        return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(127.5).sub_(1.0)

    def __getitem__(self, i: int) -> dict:
        i = check_index("generated", i, len(self), "images")
        image = self._read(i)
        if hasattr(self, "image_size") and tuple(image.shape[-2:]) != self.image_size:
            raise DataError(f"{self.root / self.records[i]['file']}: {tuple(image.shape[-2:])} pixels, "
                            f"the folder's first image has {self.image_size}")
        return {"image": image, **{f: values[i] for f, values in self._values.items()}}


def provides(config: GeneratedConfig) -> tuple:
    """The fields of the manifest at ``config.path``; image and label when it cannot be read yet
    (building the dataset then reports why)."""
    try:
        manifest = read_manifest(config.path)
    except DataError:
        return ("image", "label")
    return ("image", *manifest_fields(manifest))
