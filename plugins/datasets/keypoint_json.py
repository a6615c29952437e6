"""The ``keypoint_json`` dataset: images with 21 hand keypoints listed in a JSON file, from any source.

A file is a list of entries ``{"image_path": ..., "keypoints": [x1, y1, ..., x21, y21], ...}``
(``handforge prepare freihand`` writes them; other keys such as ``source`` are ignored).
Keypoints are in pixels of the original image, continuous: the image spans [0, W] x [0, H], so
the centre of pixel column j is j + 0.5. A joint given as null is not visible; a NaN or infinite
coordinate is an error naming the entry and the joint. A relative ``image_path`` is relative to
the JSON file's folder.

Each sample is ``image`` (3, size, size) in [-1, 1] and ``keypoints`` (21, 3): x, y normalized to
the output image (u / W without a crop), visibility 1, or 0 with x = y = 0 for a missing joint.
With ``crop = "keypoints"`` the image is first cut to a square around the visible keypoints'
bounding box, ``margin`` times its longer side, padded where it leaves the image; the crop and
the resize are one antialiased resample.
"""
from __future__ import annotations

import itertools
import math
import pathlib
from typing import Literal

import attrs
import numpy as np
import torch
from attrs import validators as v
from PIL import Image, UnidentifiedImageError

from handforge import hookimpl
from handforge.data import N_KEYPOINTS, check_index, check_split
from handforge.errors import DataError

from .bad_data import check_finite, read_json

CROPS = ("none", "keypoints")
PADS = ("black", "edge")
# A crop square far larger than the image means broken keypoints; padding for it could take gigabytes.
MAX_CROP = 4  # times the image's longer side


@attrs.define
class KeypointJsonConfig:
    train: str | None = attrs.field(default=None, metadata={"help": "JSON file of the train split"})
    val: str | None = attrs.field(default=None, metadata={"help": "JSON file of the val split"})
    size: int = attrs.field(default=128, validator=[v.ge(8), v.le(2048)], metadata={
        "help": "side of the square output image, pixels"})
    crop: Literal["none", "keypoints"] = attrs.field(default="none", validator=v.in_(CROPS), metadata={
        "help": "none: the whole image; keypoints: a square around the visible keypoints"})
    margin: float = attrs.field(default=1.5, validator=[v.ge(1.0), v.le(10.0)], metadata={
        "help": "crop=keypoints: the square's side over the keypoint box's longer side"})
    pad: Literal["black", "edge"] = attrs.field(default="black", validator=v.in_(PADS), metadata={
        "help": "crop=keypoints: fill where the square leaves the image (black, or the edge pixels repeated)"})
    limit: int = attrs.field(default=0, validator=v.ge(0), metadata={"help": "use the first N entries; 0: all"})


# -- the JSON file ---------------------------------------------------------------------------------


NUMBER_TYPES = (int, float, type(None))  # what json gives for a coordinate (null: missing joint)


def _check_entry(entry, where: str) -> None:
    """Raise the DataError that describes what is wrong with one entry (if anything)."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    for key in ("image_path", "keypoints"):
        if key not in entry:
            raise DataError(f"{where}: no '{key}'")
    if not isinstance(entry["image_path"], str) or not entry["image_path"]:
        raise DataError(f"{where} 'image_path': expected a file path, got {entry['image_path']!r}")
    value = entry["keypoints"]
    if not isinstance(value, list) or len(value) != 2 * N_KEYPOINTS:
        got = f"{len(value)} values" if isinstance(value, list) else type(value).__name__
        raise DataError(f"{where} 'keypoints': expected a list of {2 * N_KEYPOINTS} numbers "
                        f"[x1, y1, ..., x21, y21], got {got}")
    if any(type(x) not in NUMBER_TYPES for x in value):  # type(), not isinstance: a bool is no number
        raise DataError(f"{where} 'keypoints': holds a value that is neither a number nor null")
    # null is a missing joint; NaN (Python's JSON reader takes it) and inf are refused.
    numbers = np.array([0.0 if x is None else x for x in value], dtype=np.float64).reshape(N_KEYPOINTS, 2)
    check_finite(numbers, f"{where} 'keypoints'", axes=("joint", "coordinate"))


def _valid(images: list, coordinates: list) -> bool:
    """Whether every entry is well formed, checked in bulk (C-level loops: FreiHAND has 130k entries)."""
    return (all(type(p) is str and p for p in images)
            and all(type(k) is list and len(k) == 2 * N_KEYPOINTS for k in coordinates)
            and set(map(type, itertools.chain.from_iterable(coordinates))) <= set(NUMBER_TYPES))


def read_entries(path: pathlib.Path, limit: int = 0) -> tuple[list[str], np.ndarray]:
    """Image paths (as written) and ``(n, 21, 3)`` pixel keypoints + visibility of a keypoint JSON
    file, every entry checked."""
    if not path.is_file():
        raise DataError(f"{path}: keypoint JSON file not found")
    entries = read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a list of entries {{\"image_path\", \"keypoints\"}}, "
                        f"got {type(entries).__name__}")
    if limit:
        entries = entries[:limit]
    if not entries:
        raise DataError(f"{path}: holds no entries")
    try:
        images = [entry["image_path"] for entry in entries]
        coordinates = [entry["keypoints"] for entry in entries]
        xy = np.array(coordinates, dtype=np.float64) if _valid(images, coordinates) else None  # None -> NaN
    except (KeyError, TypeError):
        xy = None
    # null and NaN both become NaN here: more NaNs than nulls means a NaN in the file.
    if xy is None or np.isinf(xy).any() or np.isnan(xy).sum() > sum(k.count(None) for k in coordinates):
        for i, entry in enumerate(entries):
            _check_entry(entry, f"{path}: entry {i}")
        # something is wrong: _check_entry finds the first culprit for the message
        raise DataError(f"{path}: malformed entries")  # not reached: some entry has to be at fault
    xy = xy.reshape(len(entries), N_KEYPOINTS, 2)
    visible = np.isfinite(xy).all(axis=2, keepdims=True)
    return images, np.concatenate([np.where(visible, xy, 0.0), visible], axis=2)


# -- geometry --------------------------------------------------------------------------------------


def crop_box(keypoints: np.ndarray, width: int, height: int, margin: float) -> tuple[float, float, float]:
    """``(left, top, side)`` in pixels of the square around the visible keypoints' bounding box.

    With fewer than two visible keypoints (or all on one spot) there is no box to enlarge: the
    square is then the whole image's longer side, centred on the image."""
    visible = keypoints[:, 2] > 0
    points = keypoints[visible, :2]
    side = float((points.max(axis=0) - points.min(axis=0)).max()) * margin if len(points) >= 2 else 0.0
    if side <= 0:
        return (width - max(width, height)) / 2, (height - max(width, height)) / 2, float(max(width, height))
    centre = (points.max(axis=0) + points.min(axis=0)) / 2
    return float(centre[0] - side / 2), float(centre[1] - side / 2), side


def _pad_for(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Whole pixels to add on each side (left, top, right, bottom) so ``box`` lies inside the image."""
    left, top, right, bottom = box
    return (max(0, math.ceil(-left)), max(0, math.ceil(-top)),
            max(0, math.ceil(right - width)), max(0, math.ceil(bottom - height)))


def cut_and_resize(image: Image.Image, box: tuple[float, float, float, float], size: int, pad: str) -> Image.Image:
    """The region ``box`` = (left, top, right, bottom) (pixels, may leave the image) resized to
    ``size`` x ``size``, bicubic with antialiasing (Pillow widens the kernel when it shrinks)."""
    left, top, right, bottom = box
    pl, pt, pr, pb = _pad_for(box, *image.size)
    if pl or pt or pr or pb:
        pixels = np.asarray(image)
        mode = "edge" if pad == "edge" else "constant"
        image = Image.fromarray(np.pad(pixels, ((pt, pb), (pl, pr), (0, 0)), mode=mode))
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left + pl, top + pt, right + pl, bottom + pt))


# -- the dataset -----------------------------------------------------------------------------------


class KeypointJson(torch.utils.data.Dataset):
    """Hand images with 21 keypoints from keypoint JSON files (e.g. `handforge prepare freihand`)."""

    def __init__(self, config: KeypointJsonConfig, split: str = "train"):
        check_split("keypoint_json", split)
        file = getattr(config, split)
        if not file:
            raise DataError(f"keypoint_json: no {split} file: set the dataset option "
                            f"{split} = \"path/to/{split}.json\"")
        self.config, self.split = config, split
        self.file = pathlib.Path(file)
        # Paths stay strings until read: 130k pathlib joins would cost seconds at start-up.
        self.images, self._keypoints = read_entries(self.file, config.limit)
        self.class_names = []
        self[0]  # a wrong image folder shows now, not at the first training step

    def __len__(self) -> int:
        return len(self.images)

    def _open(self, i: int) -> Image.Image:
        path = self.file.parent / self.images[i]  # an absolute image_path stays as it is
        where = f"{self.file}: entry {i}"
        if not path.is_file():
            raise DataError(f"{where}: image {path} not found")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")  # decodes now, inside the try
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{where}: cannot read the image {path} ({type(exc).__name__}: {exc})") from None

    def __getitem__(self, i: int) -> dict:
        i = check_index("keypoint_json", i, len(self), "entries")
        image = self._open(i)
        width, height = image.size
        keypoints = self._keypoints[i]
        if self.config.crop == "keypoints":
            left, top, side = crop_box(keypoints, width, height, self.config.margin)
            if side > MAX_CROP * max(width, height):
                raise DataError(f"{self.file}: entry {i}: the keypoints span {side / self.config.margin:.0f} px, "
                                f"more than {MAX_CROP} times the {width}x{height} image; broken keypoints?")
            box = (left, top, left + side, top + side)
        else:
            box = (0.0, 0.0, float(width), float(height))
        resized = cut_and_resize(image, box, self.config.size, self.config.pad)
        # Normalized to the box: a pixel coordinate u of the original lies at (u - left) / box width.
        scale = np.array([box[2] - box[0], box[3] - box[1]])
        xy = (keypoints[:, :2] - np.array(box[:2])) / scale * keypoints[:, 2:]
        pixels = torch.from_numpy(np.array(resized)).permute(2, 0, 1)
        return {"image": pixels.float().div_(127.5).sub_(1.0),
                "keypoints": torch.from_numpy(np.concatenate([xy, keypoints[:, 2:]], axis=1)).float()}


@hookimpl
def register_datasets(register):
    register("keypoint_json", KeypointJson, config=KeypointJsonConfig, provides=("image", "keypoints"))
