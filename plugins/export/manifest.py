"""``manifest.json`` of an exported (generated) dataset: what was generated, from what, and how.

    {"format": 1, "handforge_version": "...", "complete": true, "source": {"run_dir": "..."},
     "settings": {...everything that decides the pixels...},
     "class_names": [...],
     "images": [{"index": 0, "file": "fist/000000.png", "batch": 0, "seed": 4294967296,
                 "label": 0, "class_name": "fist", "keypoints": [[x, y, v], ...], "source_index": 17}, ...]}

``settings`` holds the recipe hash, the checkpoint and its SHA-256, the generator settings
(truncation, seed, batch size) and how the conditions were chosen; ``images`` the conditions of
every image (each field the generator reads, under its sample-contract name), its noise seed and
its batch. Images are generated in those batches: the same batch of the same conditions and seeds
from the same weights gives the same pixels, so the manifest is enough to regenerate the set bit
for bit (on the same kind of device). The manifest is written before the first image and marked
``complete`` after the last, so an interrupted export can continue (see :mod:`.generate`).
"""
from __future__ import annotations

import json
import pathlib

import torch

from handforge.data import FIELDS
from handforge.errors import DataError
from handforge.fileio import atomic_write_bytes

MANIFEST = "manifest.json"
FORMAT = 1


def image_seed(seed: int, index: int) -> int:
    """The noise seed of image ``index`` of an export with base ``seed``: distinct for every pair."""
    return (seed << 32) | index


def write_manifest(out: pathlib.Path, manifest: dict) -> None:
    atomic_write_bytes(pathlib.Path(out) / MANIFEST, json.dumps(manifest, indent=1).encode())


def read_manifest(folder) -> dict:
    """The manifest of an exported folder, checked for the keys readers rely on."""
    file = pathlib.Path(folder) / MANIFEST
    if not file.is_file():
        raise DataError(f"{folder}: no {MANIFEST} (not a folder `handforge generate` wrote)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: cannot read: {exc}") from None
    missing = [k for k in ("format", "settings", "class_names", "images") if k not in manifest]
    if not isinstance(manifest, dict) or missing:
        raise DataError(f"{file}: not a handforge generate manifest (missing {', '.join(missing)})")
    if manifest["format"] != FORMAT:
        raise DataError(f"{file}: manifest format {manifest['format']!r}; this handforge reads format {FORMAT}")
    return manifest


def condition_batch(records: list[dict], fields) -> dict:
    """The conditions of some manifest images as a batch of sample-contract tensors."""
    batch = {}
    for field in fields:
        dtype = FIELDS[field].dtype if field in FIELDS else torch.float32
        batch[field] = torch.tensor([r[field] for r in records], dtype=dtype)
    return batch


def batches(manifest: dict) -> dict[int, list[dict]]:
    """The manifest's images grouped by the batch they are generated in, batches in order."""
    grouped: dict[int, list[dict]] = {}
    for record in manifest["images"]:
        grouped.setdefault(record["batch"], []).append(record)
    return dict(sorted(grouped.items()))
