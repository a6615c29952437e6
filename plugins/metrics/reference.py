"""Cached reference statistics and features of real images.

Real images do not change between evaluations, so their feature statistics (FID, FHD) and
features (PRDC) are computed once and kept in files under ``$HANDFORGE_CACHE/reference`` (default
``~/.cache/handforge/reference``). A file's name is readable (source, extractor, count) plus a
hash of its full key; the key itself -- the source (dataset name and options, split, or folder
path and listing), the number of images, the extractor (name, weight hash, resize mode) -- is
stored inside the file, and a file whose stored key differs from the one asked for is refused
with a message naming the file and the differing entries. Delete the folder to start afresh.
"""
from __future__ import annotations

import hashlib
import io
import json
import pathlib
import re
import zipfile

import numpy as np
import torch

from handforge.errors import HandforgeError
from handforge.fileio import atomic_write_bytes
from handforge.weights import cache_dir as handforge_cache_dir

from .frechet import FeatureStats, FeatureStatsKeyError, key_differences

FEATURES_FORMAT = "handforge.reference_features/1"


def cache_dir() -> pathlib.Path:
    return handforge_cache_dir() / "reference"


def _slug(key: dict) -> str:
    source = key.get("dataset") or pathlib.Path(str(key.get("path", "images"))).name or "images"
    extractor = key.get("extractor", {})
    extractor = extractor.get("extractor", "features") if isinstance(extractor, dict) else str(extractor)
    text = f"{source}-{key.get('split', '')}-{extractor}-n{key.get('num', '')}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).replace("--", "-")


def reference_path(kind: str, key: dict) -> pathlib.Path:
    """Where the ``kind`` ("stats" or "features") file for ``key`` lives."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / f"{_slug(key)}-{kind}-{digest}.npz"


def load_stats(key: dict) -> FeatureStats | None:
    """Cached statistics for ``key``; None if there are none. A stored key that differs: an error."""
    path = reference_path("stats", key)
    return FeatureStats.load(path, expect_key=key) if path.is_file() else None


def save_stats(stats: FeatureStats, key: dict) -> pathlib.Path:
    return stats.save(reference_path("stats", key), key)


def load_features(key: dict) -> torch.Tensor | None:
    """Cached features (N, D) float32 for ``key``; None if there are none."""
    path = reference_path("features", key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != FEATURES_FORMAT:
                raise ValueError(f"format {str(data['format'])!r}, expected {FEATURES_FORMAT!r}")
            stored = json.loads(str(data["key"]))
            features = torch.from_numpy(np.array(data["features"], dtype=np.float32))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise HandforgeError(f"{path}: not a readable reference features file ({exc}); delete it") from None
    differences = key_differences(stored, key)
    if differences:
        raise FeatureStatsKeyError(f"{path}: the cached features were made for another setup "
                                   f"({'; '.join(differences)}); delete the file to recompute them")
    return features


def save_features(features: torch.Tensor, key: dict) -> pathlib.Path:
    buffer = io.BytesIO()
    np.savez(buffer, format=np.array(FEATURES_FORMAT), key=np.array(json.dumps(key, sort_keys=True)),
             features=features.float().cpu().numpy())
    return atomic_write_bytes(reference_path("features", key), buffer.getvalue())
