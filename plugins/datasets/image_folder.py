"""The ``image_folder`` dataset: the images in a folder, optionally labelled by class sub-folders and
with hand keypoints from a JSON file beside them.

Images are found recursively (``recursive = false``: the top level only) by extension: jpg, jpeg,
png, bmp, webp, in any case; hidden files and folders are ignored. The order is the sorted
relative paths.

Labels (``labels``): ``folders`` makes each top-level sub-folder a class (its images at any depth
below it), class names sorted; ``none`` gives no label; ``auto`` is ``folders`` when the folder's
top level holds sub-folders and no image, else ``none``. With ``folders`` an image at the top level
has no class: a bad-data problem.

Keypoints (``keypoints``): a JSON object keyed by image path relative to the folder (``/``
separated), each value 21 ``[x, y, visibility]`` triples, x and y normalized to the original image
(x = u / width, 0 the left edge, 1 the right edge), visibility 0 or 1; x and y may be null where
the visibility is 0. A value may also be an object with a ``"keypoints"`` key holding those
triples: the ``labels.json`` that ``handforge prepare`` writes is such a file. ``keypoints =
"auto"`` reads ``keypoints.json`` in the folder when it is there; ``"none"`` reads nothing;
anything else is a file name (relative to the folder) that must exist. An image without an entry,
an entry without an image, and malformed or non-finite (NaN, infinite: anywhere, visible or not)
keypoints are bad-data problems.

Every image is made square and ``size`` pixels wide (``fit``): ``pad`` keeps all of it, centred on
a square of its longer side (``pad``: black, or the edge pixels repeated); ``crop`` keeps the
centred square of its shorter side; ``stretch`` resizes without keeping the aspect ratio. The cut
and the resize are one antialiased bicubic resample, and keypoints move with the pixels; a keypoint
that the crop leaves outside the image becomes invisible (x = y = 0, visibility 0).

``val_fraction`` of the images (of each class, when labelled) go to the ``val`` split, chosen by a
permutation seeded by ``seed``; the default 0 puts every image in ``train``.
"""
from __future__ import annotations

import math
import os
import pathlib
from typing import Literal

import attrs
import numpy as np
import torch
from attrs import validators as v
from PIL import Image

from handforge import hookimpl
from handforge.data import N_KEYPOINTS, check_split
from handforge.errors import DataError

from .bad_data import NON_FINITE, ON_ERROR_HELP, BadData, FileSamples, OnError, non_finite, read_json, read_rgb
from .keypoint_json import PADS, cut_and_resize

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FITS = ("pad", "crop", "stretch")
LABEL_MODES = ("auto", "folders", "none")
DEFAULT_KEYPOINTS_FILE = "keypoints.json"


# -- shared by the file-backed classification datasets (rwth_phoenix imports these) -----------------


def fit_box(width: int, height: int, fit: str) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` in pixels of the region that ``fit`` turns into the square output;
    it may leave the image (``pad``: the rest is padding)."""
    if fit == "stretch":
        return 0.0, 0.0, float(width), float(height)
    side = max(width, height) if fit == "pad" else min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def square_image(image: Image.Image, size: int, fit: str, pad: str) -> tuple[torch.Tensor, tuple]:
    """``image`` as a (3, size, size) float32 tensor in [-1, 1], and the box it was cut from."""
    box = fit_box(*image.size, fit)
    pixels = np.asarray(cut_and_resize(image, box, size, pad))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0), box


def stratified_split(groups: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``: of each group (class) of ``n`` members, ``floor(f * n + 0.5)`` go to
    val, but never the last one, so every class is trained on.

    Each group draws from its own generator seeded by ``(seed, group)``: a class's split does not
    change when other classes are added or dropped. Train keeps the input order; val comes in a
    seeded shuffled order, so that any prefix of it (the first N for validation) mixes classes."""
    is_val = np.zeros(len(groups), dtype=bool)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        n_val = min(math.floor(val_fraction * len(members) + 0.5), len(members) - 1)
        picked = np.random.default_rng([seed, int(group)]).permutation(members)[:n_val]
        is_val[picked] = True
    val = np.flatnonzero(is_val)
    return np.flatnonzero(~is_val), np.random.default_rng([seed, 1 << 30]).permutation(val)


# -- the folder -----------------------------------------------------------------------------------------


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(EXTENSIONS)


def list_images(root: pathlib.Path, recursive: bool = True) -> list[str]:
    """Relative ``/``-separated paths of the images under ``root``, sorted."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")) if recursive else []
        relative = pathlib.Path(folder).relative_to(root)
        found += [(relative / name).as_posix() for name in names if is_image_name(name)]
    return sorted(found)


def label_mode(config) -> str:
    """``folders`` or ``none``: what ``labels = "auto"`` means for this folder (one listing of its top level)."""
    if config.labels != "auto":
        return config.labels
    try:
        entries = list(os.scandir(config.path))
    except OSError:  # no folder: the dataset says so when it is built
        return "none"
    if any(e.is_file() and is_image_name(e.name) for e in entries):
        return "none"
    return "folders" if any(e.is_dir() and not e.name.startswith(".") for e in entries) else "none"


def keypoints_file(config) -> pathlib.Path | None:
    """The keypoint file the options name, or None for no keypoints."""
    if config.keypoints == "none":
        return None
    if config.keypoints == "auto":
        path = pathlib.Path(config.path) / DEFAULT_KEYPOINTS_FILE
        return path if path.is_file() else None
    return pathlib.Path(config.path) / config.keypoints  # an absolute path stays as it is


def provided_fields(config) -> tuple:
    fields = ["image"]
    if label_mode(config) == "folders":
        fields.append("label")
    if keypoints_file(config) is not None:
        fields.append("keypoints")
    return tuple(fields)


def _keypoint_array(value) -> tuple[np.ndarray, np.ndarray] | None:
    """``value`` as float64 (21, 3) with 0 for null, and where the nulls were; None if it is not 21
    triples of numbers or nulls."""
    if isinstance(value, dict):
        value = value.get("keypoints")
    if not isinstance(value, list) or len(value) != N_KEYPOINTS:
        return None
    if not all(isinstance(p, list) and len(p) == 3 for p in value):
        return None
    if any(type(x) not in (int, float, type(None)) for p in value for x in p):  # a bool is no number
        return None
    points = np.array([[0.0 if x is None else x for x in p] for p in value], dtype=np.float64)
    return points, np.array([[x is None for x in p] for p in value])


def _keypoint_problem(points: np.ndarray, null: np.ndarray) -> tuple[str, str] | None:
    """(message, kind) of what is wrong with parsed keypoints (nulls as 0, where ``null``), or None."""
    problem = non_finite(points, axes=("joint", "value"))
    if problem:
        return problem, NON_FINITE
    visibility = points[:, 2]
    if null[:, 2].any() or not np.isin(visibility, (0.0, 1.0)).all():
        return "visibility must be 0 or 1", "malformed keypoints"
    missing = null[:, :2].any(axis=1) & (visibility == 1)
    if missing.any():
        return f"joint {int(np.flatnonzero(missing)[0])} is visible but its x or y is null", "malformed keypoints"
    return None


def read_keypoints(path: pathlib.Path, bad: BadData) -> tuple[dict[str, np.ndarray], set[str]]:
    """Image path -> (21, 3) normalized keypoints of a keypoint file, invisible joints at (0, 0); and
    the image paths whose entry was rejected (a problem already counted)."""
    if not path.is_file():
        raise DataError(f"{path}: keypoint file not found")
    entries = read_json(path)  # a truncated file too: nothing to skip to
    if not isinstance(entries, dict):
        raise DataError(f"{path}: expected an object {{\"image path\": [[x, y, visibility] x 21]}}, "
                        f"got {type(entries).__name__}")
    keypoints, rejected = {}, set()
    for name, value in entries.items():
        where = f"{path}: entry {name!r}"
        parsed = _keypoint_array(value)
        if parsed is None:
            bad.problem(where, f"expected {N_KEYPOINTS} [x, y, visibility] triples (normalized x, y)",
                        "malformed keypoints")
            rejected.add(name)
            continue
        points, null = parsed
        problem = _keypoint_problem(points, null)
        if problem:
            bad.problem(where, *problem)
            rejected.add(name)
            continue
        points[points[:, 2] == 0, :2] = 0.0
        keypoints[name] = points
    return keypoints, rejected


def crop_keypoints(points: np.ndarray, width: int, height: int, box: tuple) -> np.ndarray:
    """Keypoints normalized to the original image -> normalized to the output square cut from ``box``;
    a joint that lands outside it is marked invisible at (0, 0)."""
    left, top, right, bottom = box
    xy = (points[:, :2] * (width, height) - (left, top)) / (right - left, bottom - top)
    visible = (points[:, 2] > 0) & (xy >= 0).all(axis=1) & (xy <= 1).all(axis=1)
    out = np.zeros_like(points)
    out[visible, :2], out[visible, 2] = xy[visible], 1.0
    return out


# -- the dataset -----------------------------------------------------------------------------------


@attrs.define
class ImageFolderConfig:
    path: str = attrs.field(metadata={"help": "the folder of images"})
    size: int = attrs.field(default=64, validator=[v.ge(8), v.le(2048)], metadata={
        "help": "side of the square output image, pixels"})
    fit: Literal["pad", "crop", "stretch"] = attrs.field(default="pad", validator=v.in_(FITS), metadata={
        "help": "non-square images: pad (keep all, centred), crop (centre square) or stretch"})
    pad: Literal["black", "edge"] = attrs.field(default="black", validator=v.in_(PADS), metadata={
        "help": "fit=pad: fill black, or repeat the edge pixels"})
    labels: Literal["auto", "folders", "none"] = attrs.field(default="auto", validator=v.in_(LABEL_MODES), metadata={
        "help": "folders: a class per top-level sub-folder; none; auto: folders if the top level holds no images"})
    keypoints: str = attrs.field(default="auto", metadata={
        "help": "keypoint JSON file in the folder; auto: keypoints.json if present; none: no keypoints"})
    recursive: bool = attrs.field(default=True, metadata={"help": "look for images in sub-folders too"})
    val_fraction: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.lt(1.0)], metadata={
        "help": "share of the images (of each class) in the val split"})
    seed: int = attrs.field(default=0, validator=v.ge(0), metadata={"help": "seed of the train/val split"})
    on_error: OnError = attrs.field(default="raise", validator=v.in_(("raise", "skip")), metadata={
        "help": ON_ERROR_HELP})


class ImageFolder(FileSamples):
    """Images from a folder; class sub-folders give labels, a keypoint JSON file keypoints."""

    name, noun = "image_folder", "images"

    def __init__(self, config: ImageFolderConfig, split: str = "train"):
        check_split("image_folder", split)
        self.config, self.split = config, split
        self.root = root = pathlib.Path(config.path)
        if not root.is_dir():
            raise DataError(f"{root}: image folder not found (dataset image_folder, option path)")
        files = list_images(root, config.recursive)
        if not files:
            raise DataError(f"{root}: no images ({', '.join(e[1:] for e in EXTENSIONS)}) found"
                            + ("" if config.recursive else " at the top level (recursive = false)"))
        self.bad = BadData(f"image_folder {root}", config.on_error)
        files, labels, self.class_names = self._labelled(files)
        files, self._keypoints = self._with_keypoints(files)
        # No "of N": keypoint entries that name no image are counted too, and they are not images.
        self.bad.print_summary()
        if not files:
            raise DataError(f"{root}: every image was skipped ({self.bad.summary()})")
        train, val = stratified_split(np.asarray(labels if labels else [0] * len(files)),
                                      config.val_fraction, config.seed)
        chosen = train if split == "train" else val
        if not len(chosen):
            hint = "set val_fraction (e.g. 0.1)" if config.val_fraction == 0 else "raise val_fraction"
            raise DataError(f"image_folder {root}: the {split} split is empty; {hint}")
        self.files = [files[i] for i in chosen]
        self.labels = [labels[i] for i in chosen] if labels else None
        if self._keypoints is not None:
            self._keypoints = self._keypoints[chosen]
        self.image_size = config.size

    def _labelled(self, files: list[str]) -> tuple[list[str], list[int], list[str]]:
        if label_mode(self.config) == "none":
            return files, [], []
        inside = [f for f in files if "/" in f]
        for outside in (f for f in files if "/" not in f):
            self.bad.problem(self.root / outside, "lies outside the class sub-folders (labels = \"folders\")",
                             "outside class folders")
        names = sorted({f.split("/", 1)[0] for f in inside})
        index = {name: i for i, name in enumerate(names)}
        return inside, [index[f.split("/", 1)[0]] for f in inside], names

    def _with_keypoints(self, files: list[str]) -> tuple[list[str], np.ndarray | None]:
        path = keypoints_file(self.config)
        if path is None:
            return files, None
        table, rejected = read_keypoints(path, self.bad)
        present = set(files)
        for name in sorted(set(table) - present):
            self.bad.problem(f"{path}: entry {name!r}", f"names no image in {self.root}", "keypoints without image")
        kept = []
        for name in files:
            if name in table:
                kept.append(name)
            elif name not in rejected:  # a rejected entry's image was counted with its entry
                self.bad.problem(self.root / name, f"has no entry in {path.name}", "no keypoints")
        return kept, np.stack([table[name] for name in kept]) if kept else np.zeros((0, N_KEYPOINTS, 3))

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, i: int) -> dict:
        image = read_rgb(self.root / self.files[i])
        width, height = image.size
        pixels, box = square_image(image, self.config.size, self.config.fit, self.config.pad)
        sample = {"image": pixels}
        if self.labels is not None:
            sample["label"] = torch.tensor(self.labels[i], dtype=torch.int64)
        if self._keypoints is not None:
            sample["keypoints"] = torch.from_numpy(crop_keypoints(self._keypoints[i], width, height, box)).float()
        return sample


@hookimpl
def register_datasets(register):
    register("image_folder", ImageFolder, config=ImageFolderConfig, provides=provided_fields)
