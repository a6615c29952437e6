"""``handforge prepare freihand ROOT --out DIR``: FreiHAND v2 training set -> keypoint JSON files.

FreiHAND v2 (Zimmermann et al., ICCV 2019) ships ``training/rgb/%08d.jpg`` (224 x 224), and per
annotated sample ("id") its camera intrinsics ``training_K.json`` and 21 joint positions in
metres ``training_xyz.json``. Each id was rendered in four versions (green screen, two
composited backgrounds, automatic colourisation) that share the pose: image index
``id + n_ids * version`` with ``n_ids`` = 32560.

The 2D keypoints are the pinhole projection ``uv = (K @ xyz) / z``, in pixels of the image
(continuous coordinates: the image spans [0, 224], so the principal point 112 is its centre).
Output, in DIR: ``train.json`` and ``val.json`` (lists of ``{"image_path", "keypoints":
[x1, y1, ..., x21, y21], "source": "FreiHAND"}``, read by the ``keypoint_json`` dataset) and
``prepare.json`` (what was done). The split is by id, so no pose is in both splits.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np

from handforge import __version__, hookimpl
from handforge.data import N_KEYPOINTS
from handforge.errors import DataError, HandforgeError
from handforge.fileio import atomic_write_bytes

from .bad_data import check_finite, read_json

VERSIONS = 4  # FreiHAND v2: gs, hom, sample, auto
SOURCE = "FreiHAND"
K_FILE, XYZ_FILE, RGB_FOLDER = "training_K.json", "training_xyz.json", "training/rgb"
OUTPUT_FILES = ("train.json", "val.json", "prepare.json")
DECIMALS = 4  # 1e-4 px: far below annotation accuracy, and a third shorter than full floats


# -- reading the annotations ---------------------------------------------------------------------


def _load_json(path: pathlib.Path):
    if not path.is_file():
        raise DataError(f"{path}: not found (a FreiHAND v2 root holds {K_FILE}, {XYZ_FILE} and {RGB_FOLDER}/)")
    return read_json(path)


def _array(path: pathlib.Path, data, shape: tuple, what: str, axes: tuple) -> np.ndarray:
    """``data`` as float64 of shape (n, *shape); a bad item is reported by its index."""
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty list of {what}, got {type(data).__name__}"
                        + (" (empty)" if isinstance(data, list) else ""))
    try:
        array = np.asarray(data, dtype=np.float64)
        if array.shape[1:] == shape:
            check_finite(array, path, axes=("item", *axes))  # a null becomes NaN here: refused too
            return array
    except (ValueError, TypeError):  # ragged lists or non-numbers: find the first culprit below
        pass
    for i, item in enumerate(data):
        try:
            item_shape = np.asarray(item, dtype=np.float64).shape
        except (ValueError, TypeError):
            raise DataError(f"{path}: item {i} is not {what} (not a nested list of numbers)") from None
        if item_shape != shape:
            raise DataError(f"{path}: item {i} has shape {item_shape}, expected {shape} ({what})")
    raise DataError(f"{path}: expected a list of {what}")  # not reached: some item has to be at fault


def load_annotations(root: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """``(K (n, 3, 3), xyz (n, 21, 3))`` from a FreiHAND root, checked."""
    k_path, xyz_path = root / K_FILE, root / XYZ_FILE
    K = _array(k_path, _load_json(k_path), (3, 3), "3x3 intrinsic matrices", ("row", "column"))
    xyz = _array(xyz_path, _load_json(xyz_path), (N_KEYPOINTS, 3), f"{N_KEYPOINTS} [x, y, z] joints",
                 ("joint", "coordinate"))
    if len(K) != len(xyz):
        raise DataError(f"{k_path} has {len(K)} matrices but {xyz_path} has {len(xyz)} joint lists; "
                        f"they must describe the same samples")
    # A transposed matrix (principal point in the last row) would project without complaint.
    bad_k = np.abs(K[:, 2] - np.array([0.0, 0.0, 1.0])).max(axis=1) > 1e-6
    if bad_k.any():
        i = int(np.argmax(bad_k))
        raise DataError(f"{k_path}: item {i} is not an intrinsic matrix: its last row is "
                        f"{K[i, 2].tolist()}, expected [0, 0, 1] (transposed?)")
    behind = xyz[..., 2] <= 0
    if behind.any():
        i, joint = (int(a) for a in np.argwhere(behind)[0])
        raise DataError(f"{xyz_path}: item {i} joint {joint} has z = {xyz[i, joint, 2]:g} <= 0 "
                        f"(joints must lie in front of the camera, in metres)")
    return K, xyz


def project(K: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Pixel coordinates ``(n, 21, 2)`` of the joints ``xyz (n, 21, 3)`` seen by cameras ``K (n, 3, 3)``."""
    homogeneous = np.einsum("nij,nkj->nki", K, xyz)
    return homogeneous[..., :2] / homogeneous[..., 2:]


# -- images and split ------------------------------------------------------------------------------


def find_images(root: pathlib.Path, n_ids: int) -> np.ndarray:
    """``(VERSIONS, n_ids)`` bool: which image files exist (one directory listing, not 130k stats)."""
    folder = root / RGB_FOLDER
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found (FreiHAND v2 layout: {RGB_FOLDER}/%08d.jpg)")
    names = {entry.name for entry in os.scandir(folder)}
    return np.array([[f"{i + n_ids * v:08d}.jpg" in names for i in range(n_ids)] for v in range(VERSIONS)])


def choose_versions(found: np.ndarray, folder: pathlib.Path, allow_missing: bool) -> list[int]:
    """The versions to use: every version with at least one image. A partly present version is an
    error (an interrupted download or extraction) unless ``allow_missing``."""
    n_ids = found.shape[1]
    present = [v for v in range(VERSIONS) if found[v].any()]
    if not present:
        raise DataError(f"{folder}: none of the {VERSIONS * n_ids} images {0:08d}.jpg .. "
                        f"{VERSIONS * n_ids - 1:08d}.jpg is there")
    missing = np.flatnonzero(~found[present].reshape(-1))  # positions among the present versions' images
    if missing.size and not allow_missing:
        version, i = present[missing[0] // n_ids], missing[0] % n_ids
        first = folder / f"{i + n_ids * version:08d}.jpg"
        listed = ", ".join(str(v) for v in present)
        raise DataError(f"{first}: missing; {missing.size} of the {len(present) * n_ids} images of the versions "
                        f"present ({listed}) are missing. Complete the download, or add --allow-missing to "
                        f"skip them")
    return present


def split_ids(n_ids: int, val_fraction: float, seed: int) -> np.ndarray:
    """Bool mask of the val ids: a seeded permutation's first ``round(f * n)`` ids (at least one when f > 0)."""
    n_val = min(max(round(val_fraction * n_ids), 1 if val_fraction > 0 else 0), n_ids - 1)
    is_val = np.zeros(n_ids, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_ids)[:n_val]] = True
    return is_val


# -- writing -------------------------------------------------------------------------------------


def _entry_lines(indices: np.ndarray, keypoints: list[str], ids: np.ndarray, folder: pathlib.Path) -> list[str]:
    """One JSON object per image, each on its own line: 130k entries stay readable and diffable.
    ``keypoints[i]`` is id i's list already as JSON text, written once for its four versions."""
    return [f'{{"image_path": {json.dumps(str(folder / f"{index:08d}.jpg"))}, "keypoints": {keypoints[i]}, '
            f'"source": "{SOURCE}"}}' for index, i in zip(indices.tolist(), ids.tolist())]


def _check_out(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HandforgeError(f"--out {out}: exists and is not a folder")
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise HandforgeError(f"--out {out}: already holds {', '.join(existing)}; choose another folder or "
                             f"add --overwrite")


def prepare_freihand(root, out, val_fraction: float = 0.1, seed: int = 0, allow_missing: bool = False,
                     overwrite: bool = False) -> dict:
    """Write ``train.json``, ``val.json`` and ``prepare.json`` for the FreiHAND root ``root`` into
    ``out``; returns the ``prepare.json`` content."""
    started = time.perf_counter()
    if not 0 <= val_fraction < 1:  # NaN fails too
        raise HandforgeError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    root, out = pathlib.Path(root).resolve(), pathlib.Path(out)
    if not root.is_dir():
        raise DataError(f"{root}: FreiHAND root folder not found")
    _check_out(out, overwrite)
    K, xyz = load_annotations(root)
    n_ids = len(K)
    folder = root / RGB_FOLDER  # resolved once: the entries' paths are absolute without 130k resolves
    found = find_images(root, n_ids)
    versions = choose_versions(found, folder, allow_missing)
    # Formatted once per id: the four versions of an id share its keypoints (and float formatting
    # is most of the writing time).
    keypoints = [json.dumps(k) for k in np.round(project(K, xyz), DECIMALS).reshape(n_ids, -1).tolist()]
    is_val = split_ids(n_ids, val_fraction, seed)

    splits, per_version = {}, {}
    for split, in_split in (("train", ~is_val), ("val", is_val)):
        lines = []
        for v in versions:  # version-major: the files' own order
            ids = np.flatnonzero(in_split & found[v])
            lines += _entry_lines(ids + n_ids * v, keypoints, ids, folder)
        splits[split] = lines
    for v in range(VERSIONS):
        per_version[str(v)] = {"found": int(found[v].sum()), "used": v in versions}
    report = {
        "source": SOURCE,
        "root": str(root),
        "ids": n_ids,
        "versions": per_version,
        "skipped_missing": int(sum((~found[v]).sum() for v in versions)),
        "train": {"ids": int((~is_val).sum()), "images": len(splits["train"])},
        "val": {"ids": int(is_val.sum()), "images": len(splits["val"])},
        "val_fraction": val_fraction,
        "seed": seed,
        "keypoints": "pixels of the 224 x 224 image, uv = (K @ xyz) / z",
        "handforge_version": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        atomic_write_bytes(out / f"{split}.json", ("[\n" + ",\n".join(lines) + "\n]\n").encode())
    report["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_bytes(out / "prepare.json", (json.dumps(report, indent=2) + "\n").encode())  # last: marks completion
    return report


# -- the command -----------------------------------------------------------------------------------


def configure(parser) -> None:
    parser.add_argument("root", help=f"the FreiHAND v2 folder (holds {K_FILE}, {XYZ_FILE}, {RGB_FOLDER}/)")
    parser.add_argument("--out", required=True, help="folder for train.json, val.json and prepare.json")
    parser.add_argument("--val-fraction", dest="val_fraction", type=float, default=0.1,
                        help="share of the ids (all versions of each) in val.json (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the id permutation that splits (default 0)")
    parser.add_argument("--allow-missing", dest="allow_missing", action="store_true",
                        help="skip missing images of a partly present version instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace the JSON files of an earlier prepare")


def summary(report: dict, out) -> str:
    lines = []
    for v, counts in report["versions"].items():
        note = "used" if counts["used"] else "skipped (no images)"
        lines.append(f"  version {v}: {counts['found']} of {report['ids']} images found, {note}")
    if report["skipped_missing"]:
        lines.append(f"  {report['skipped_missing']} missing images skipped (--allow-missing)")
    train, val = report["train"], report["val"]
    lines.append(f"wrote {out}/train.json ({train['images']} images of {train['ids']} ids) and "
                 f"{out}/val.json ({val['images']} images of {val['ids']} ids) in {report['seconds']:.1f} s")
    return f"FreiHAND at {report['root']}:\n" + "\n".join(lines)


def command(args) -> int:
    report = prepare_freihand(args.root, args.out, val_fraction=args.val_fraction, seed=args.seed,
                              allow_missing=args.allow_missing, overwrite=args.overwrite)
    print(summary(report, args.out))
    return 0


@hookimpl
def register_commands(cli):
    cli.add_preparer("freihand", "FreiHAND v2 training set -> train.json / val.json for the keypoint_json dataset",
                     configure, command)
