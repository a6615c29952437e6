"""The ``hagrid`` dataset: HaGRID v1 / v2 / v2-1M hand gestures, read in their native layout.

The format, as the HaGRID authors document it (README of github.com/hukenovs/hagrid, branches
Hagrid_v1, Hagrid_v2 and Hagrid_v2-1M; their ``classifier/dataset.py`` and ``configs/*.yaml``):

- one annotation JSON file per gesture, ``<gesture>.json`` = ``{image_key: entry}``; the image is
  ``<root>/<gesture>/<image_key>.jpg``;
- every entry has ``bboxes`` (per hand ``[x, y, w, h]``, top-left corner and size, normalized to
  the image), ``labels`` (per hand: a gesture or ``no_gesture``, the second, free hand) and
  ``user_id`` (the person; the official splits are by person);
- v1 adds ``landmarks`` (per hand 21 MediaPipe ``[x, y]`` normalized to the whole image, ``[]``
  where MediaPipe found none), ``leading_hand`` ("left" / "right": the hand showing the gesture)
  and ``leading_conf``. The official v1 code gives a ``no_gesture`` hand the other handedness;
  so does this dataset;
- v2 and v2-1M add ``hand_landmarks`` (per hand, as v1's ``landmarks``), ``united_bbox`` /
  ``united_label`` (one box around both hands of a two-handed gesture, else null) and ``meta``
  (age, gender, race estimated by networks). v2 has no handedness.

Layouts of ``annotations``: a folder of ``<gesture>.json`` files (v1's ``ann_train_val/``, or one
split folder of v2 such as ``annotations/train/``) is split here by ``user_id`` (seeded, like the
official v1 code: sorted users, shuffled, the last ``val_fraction`` of them are val). A folder with
``train/`` and ``val/`` sub-folders of JSON files (v2's ``annotations/``) is already split by person:
each split reads its own sub-folder and ``val_fraction`` is not used.

Each annotated hand is one sample: ``image``, the square of side ``scale`` x the box's longer side
centred on the box (clipped to the image), padded where it leaves the image, resized to ``size``;
``label`` (``class_names``: the 18 v1 or 33 v2 gestures sorted by name, see ``V1_CLASSES``,
``no_gesture`` last when kept; or the listed ``classes`` in their order); ``keypoints``, the
landmarks in the crop (x, y normalized to the output image, visibility 1), all zero with
visibility 0 for a hand without landmarks, so every configuration yields them
(``landmarks_only = true`` keeps only hands that have them, for pose-conditioned training); with
``version = "v1"`` also ``handedness`` (0 left, 1 right; "auto" yields only what both versions
have). Both hands of a two-handed gesture are samples with the gesture's label; ``united_bbox``
is not used.

Speed: the JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, ``Image.draft``) when
the crop stays at least ``size`` pixels wide at that scale; on 50 synthetic 1920x1080 JPEGs
(~760 KB, like HaGRID's), 1 thread, a 288-pixel hand box, this took 47 -> 127 samples/s at size 64
(1/4 scale) and 51 -> 103 at size 128 (1/2 scale); entropy decoding, paid at any scale, bounds the gain.

Bad data (``on_error``): a missing image, a malformed entry, an unknown label, a box outside the
image (empty once clipped to it), landmarks that are not 21 [x, y] pairs or hold NaN stop with an
error naming the file and the image key, or are skipped and counted (summary on stderr once the
index is built; counted per image entry, as one bad field spoils the entry); an image that
cannot be decoded is found when read (see ``bad_data``). An annotation file that is not valid
JSON always stops: its samples cannot even be counted.
"""
from __future__ import annotations

import math
import os
import pathlib
import random
from typing import Literal

import attrs
import numpy as np
import torch
from attrs import validators as v

from handforge import hookimpl
from handforge.data import N_KEYPOINTS, check_split
from handforge.errors import DataError
from handforge.plugins.datasets.bad_data import (NON_FINITE, ON_ERROR_HELP, BadData, FileSamples, OnError,
                                                 non_finite, read_json, read_rgb_reduced)
from handforge.plugins.datasets.keypoint_json import PADS, cut_and_resize

NO_GESTURE = "no_gesture"
# Sorted by name: the order of the official download tables, and the order of procedural_hands'
# `hagrid` class set, so labels of synthetic and real hands agree. (The official training configs,
# classifier/config/default.yaml and configs/*.yaml, list them in other orders; that matters only
# to their checkpoints.)
V1_CLASSES = ("call", "dislike", "fist", "four", "like", "mute", "ok", "one", "palm", "peace", "peace_inverted",
              "rock", "stop", "stop_inverted", "three", "three2", "two_up", "two_up_inverted")
V2_CLASSES = ("call", "dislike", "fist", "four", "grabbing", "grip", "hand_heart", "hand_heart2", "holy", "like",
              "little_finger", "middle_finger", "mute", "ok", "one", "palm", "peace", "peace_inverted", "point",
              "rock", "stop", "stop_inverted", "take_picture", "three", "three2", "three3", "three_gun",
              "thumb_index", "thumb_index2", "timeout", "two_up", "two_up_inverted", "xsign")
CLASSES = {"v1": V1_CLASSES, "v2": V2_CLASSES}
V1_KEYS = ("landmarks", "leading_hand", "leading_conf")
V2_KEYS = ("hand_landmarks", "united_bbox", "united_label", "meta")
LANDMARK_KEY = {"v1": "landmarks", "v2": "hand_landmarks"}
HANDEDNESS = {"left": 0, "right": 1}
JPEG_REDUCTIONS = (8, 4, 2, 1)  # the DCT scalings libjpeg offers through Image.draft


@attrs.define
class HagridConfig:
    root: str = attrs.field(metadata={"help": "images root: <root>/<gesture>/<image_key>.jpg"})
    annotations: str = attrs.field(metadata={
        "help": "folder of <gesture>.json files (split here by user_id), or with train/ and val/ sub-folders"})
    version: Literal["auto", "v1", "v2"] = attrs.field(default="auto", validator=v.in_(("auto", "v1", "v2")),
                                                       metadata={"help": "annotation format; auto: from the keys. "
                                                                 "v1 also yields handedness"})
    size: int = attrs.field(default=128, validator=[v.ge(8), v.le(2048)], metadata={
        "help": "side of the square output image, pixels"})
    scale: float = attrs.field(default=1.5, validator=[v.ge(1.0), v.le(10.0)], metadata={
        "help": "crop side over the hand box's longer side"})
    pad: Literal["black", "edge"] = attrs.field(default="black", validator=v.in_(PADS), metadata={
        "help": "fill where the crop leaves the image (black, or the edge pixels repeated)"})
    no_gesture: Literal["drop", "keep"] = attrs.field(default="drop", validator=v.in_(("drop", "keep")), metadata={
        "help": "free hands labelled no_gesture: drop them, or keep them as the last class"})
    landmarks_only: bool = attrs.field(default=False, metadata={
        "help": "keep only hands with landmarks (for pose-conditioned training)"})
    classes: list[str] = attrs.field(factory=list, metadata={
        "help": "gestures to keep, in label order; empty: all of the version's, sorted by name"})
    val_fraction: float = attrs.field(default=0.1, validator=[v.ge(0.0), v.lt(1.0)], metadata={
        "help": "share of users (not images) in the val split"})
    seed: int = attrs.field(default=0, metadata={"help": "seed of the user split"})
    on_error: OnError = attrs.field(default="raise", validator=v.in_(("raise", "skip")),
                                    metadata={"help": ON_ERROR_HELP})


# -- reading the annotation files ------------------------------------------------------------------


def _annotation_files(folder: pathlib.Path, split: str) -> tuple[list[pathlib.Path], bool]:
    """The JSON files of ``split`` and whether they still have to be split by user."""
    if not folder.is_dir():
        raise DataError(f"{folder}: hagrid annotations folder not found (set annotations = \"path/to/folder\" "
                        f"of <gesture>.json files)")
    files = sorted(folder.glob("*.json"))
    if files:
        return files, True
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        files = sorted((folder / split).glob("*.json"))
        if files:
            return files, False
        folder = folder / split
    raise DataError(f"{folder}: holds no <gesture>.json annotation files")


def _load(path: pathlib.Path) -> dict:
    data = read_json(path, "a truncated download?")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object {{image_key: {{\"bboxes\", \"labels\", \"user_id\", ...}}}}, "
                        f"got {type(data).__name__}")
    return data


def detect_version(files: dict[pathlib.Path, dict], requested: str) -> str:
    """``v1`` or ``v2`` from the keys of the entries; a clash with ``requested`` or a mix is an error."""
    found = {}
    for path, entries in files.items():
        for entry in entries.values():
            if isinstance(entry, dict):
                for version, keys in (("v1", V1_KEYS), ("v2", V2_KEYS)):
                    key = next((k for k in keys if k in entry), None)
                    if key and version not in found:
                        found[version] = (path, key)
        if len(found) == 2:
            (p1, k1), (p2, k2) = found["v1"], found["v2"]
            raise DataError(f"hagrid: the annotations mix v1 and v2: {p1} has '{k1}', {p2} has '{k2}'")
    if requested != "auto":
        other = "v2" if requested == "v1" else "v1"
        if other in found:
            path, key = found[other]
            raise DataError(f"{path}: has '{key}', a HaGRID {other} field, but version = \"{requested}\"; "
                            f"set version = \"{other}\" or \"auto\"")
        return requested
    if found:
        return next(iter(found))
    # No landmarks anywhere (early v1 releases had boxes only): the labels tell.
    v2_only = set(V2_CLASSES) - set(V1_CLASSES)
    labels = {label for entries in files.values() for e in entries.values() if isinstance(e, dict)
              for label in (e.get("labels") or []) if isinstance(label, str)}
    return "v2" if labels & v2_only or any(p.stem in v2_only for p in files) else "v1"


def split_users(users, val_fraction: float, seed: int) -> set:
    """The val users: sorted, shuffled with ``seed``, the last ``round(n * val_fraction)`` (at least one
    when val_fraction > 0 and there are two users or more)."""
    order = sorted(users)
    random.Random(seed).shuffle(order)
    n_val = round(len(order) * val_fraction)
    if val_fraction > 0 and len(order) > 1:
        n_val = min(max(n_val, 1), len(order) - 1)
    return set(order[len(order) - n_val:]) if n_val else set()


def _box(value) -> tuple[float, float, float, float] | None:
    """``[x, y, w, h]`` clipped to the image as (x0, y0, x1, y1), normalized; None if malformed."""
    if not isinstance(value, list) or len(value) != 4 or any(type(c) not in (int, float) for c in value):
        return None
    x, y, w, h = value
    if not all(math.isfinite(c) for c in value):
        return None
    return max(x, 0.0), max(y, 0.0), min(x + w, 1.0), min(y + h, 1.0)


def _landmarks(value) -> np.ndarray | tuple[str, str] | None:
    """(21, 2) landmarks, None when there are none, or (what is wrong with them, its kind)."""
    if value is None or (isinstance(value, list) and not value):
        return None
    try:
        points = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        return f"expected {N_KEYPOINTS} [x, y] pairs of numbers", "bad landmarks"
    if points.shape != (N_KEYPOINTS, 2):
        return f"expected {N_KEYPOINTS} [x, y] pairs, got shape {points.shape}", "bad landmarks"
    problem = non_finite(points, axes=("joint", "coordinate"))
    return (f"hold {problem}", NON_FINITE) if problem else points


# -- decoding --------------------------------------------------------------------------------------


def reduction_for_crop(crop_side: float, size: int) -> int:
    """The largest JPEG reduction (8, 4, 2 or 1) that leaves a crop of ``crop_side`` stored pixels at
    least ``size`` decoded pixels wide: the resize to ``size`` then still only shrinks, so the output
    keeps its quality."""
    return next(r for r in JPEG_REDUCTIONS if crop_side / r >= size or r == 1)


# -- the dataset -----------------------------------------------------------------------------------


class Hagrid(FileSamples):
    """HaGRID hand gestures (v1, v2, v2-1M): one square crop per annotated hand."""

    name = "hagrid"

    def __init__(self, config: HagridConfig, split: str = "train"):
        check_split("hagrid", split)
        self.config, self.split = config, split
        self.root = pathlib.Path(config.root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: hagrid images root not found (set root = \"path/to/images\")")
        self.bad = BadData(f"hagrid ({split})", config.on_error)
        files, split_here = _annotation_files(pathlib.Path(config.annotations), split)
        annotations = {path: _load(path) for path in files}
        self.version = detect_version(annotations, config.version)
        self.class_names = self._class_names()
        self._known_labels = set(CLASSES[self.version]) | {NO_GESTURE}
        self.image_size = config.size
        self._with_handedness = config.version == "v1"  # what `provides` promised, known before any file
        self._folders: dict[str, set] = {}
        self.images: list[str] = []  # per sample; shared strings, one per image
        boxes, landmarks, has_landmarks, labels, handedness = [], [], [], [], []

        entries = [(path, key, entry) for path, data in annotations.items() for key, entry in data.items()]
        val_users = None
        if split_here:
            users = {e.get("user_id") for _, _, e in entries if isinstance(e, dict)}
            val_users = split_users({u for u in users if isinstance(u, str)}, config.val_fraction, config.seed)
        for path, key, entry in entries:
            hands = self._hands(path, key, entry, val_users)
            if not hands:
                continue
            image = self._image_path(path.stem, key)
            if image is None:
                self.bad.problem(f"{path}: '{key}'", f"image {self.root / path.stem / (key + '.jpg')} not found",
                                 "missing image")
                continue
            for box, points, label, hand in hands:
                self.images.append(image)
                boxes.append(box)
                has_landmarks.append(points is not None)
                landmarks.append(points if points is not None else np.zeros((N_KEYPOINTS, 2)))
                labels.append(label)
                handedness.append(hand)
        self.bad.print_summary(len(self.images) + sum(self.bad.counts.values()))
        if not self.images:
            raise DataError(f"hagrid: no samples in split '{split}' from {pathlib.Path(config.annotations)} "
                            f"(version {self.version}, no_gesture = {config.no_gesture!r}, "
                            f"landmarks_only = {str(config.landmarks_only).lower()}, "
                            f"val_fraction = {config.val_fraction})")
        self._boxes = np.array(boxes, dtype=np.float64)
        self._landmarks = np.array(landmarks, dtype=np.float64)
        self._has_landmarks = np.array(has_landmarks, dtype=bool)
        self._labels = np.array(labels, dtype=np.int64)
        self._handedness = np.array(handedness, dtype=np.int64)

    def _class_names(self) -> list[str]:
        known = CLASSES[self.version]
        if self.config.classes:
            unknown = [c for c in self.config.classes if c not in known]
            if unknown:
                raise DataError(f"hagrid: classes {unknown} are not HaGRID {self.version} gestures; "
                                f"they are: {', '.join(known)}")
            if len(set(self.config.classes)) != len(self.config.classes):
                raise DataError(f"hagrid: classes lists a gesture twice: {self.config.classes}")
            known = tuple(self.config.classes)
        return list(known) + ([NO_GESTURE] if self.config.no_gesture == "keep" else [])

    def _image_path(self, gesture: str, key: str) -> str | None:
        """``root/gesture/key.jpg`` if it exists (one directory listing per gesture, not a stat per image)."""
        if gesture not in self._folders:
            folder = self.root / gesture
            self._folders[gesture] = set(os.listdir(folder)) if folder.is_dir() else set()
        name = key + ".jpg"
        # os.path.join, not pathlib: a million joins would cost seconds at start-up.
        return os.path.join(self.root, gesture, name) if name in self._folders[gesture] else None

    def _hands(self, path: pathlib.Path, key: str, entry, val_users: set | None) -> list:
        """``(box, landmarks or None, label id, handedness or -1)`` of the entry's hands that this split
        and configuration keep; problems go to ``self.bad``."""
        where = f"{path}: '{key}'"
        if not isinstance(entry, dict):
            self.bad.problem(where, f"expected an object, got {type(entry).__name__}", "malformed annotation")
            return []
        missing = [k for k in ("bboxes", "labels", "user_id") if k not in entry]
        if missing:
            self.bad.problem(where, f"no {', '.join(repr(k) for k in missing)}", "malformed annotation")
            return []
        bboxes, names, user = entry["bboxes"], entry["labels"], entry["user_id"]
        if not isinstance(user, str):
            self.bad.problem(where, f"'user_id' is {user!r}, expected a string", "malformed annotation")
            return []
        if val_users is not None and (user in val_users) != (self.split == "val"):
            return []
        if not isinstance(bboxes, list) or not isinstance(names, list) or len(bboxes) != len(names):
            self.bad.problem(where, "'bboxes' and 'labels' must be lists of the same length", "malformed annotation")
            return []
        marks = entry.get(LANDMARK_KEY[self.version])
        if marks is None:
            marks = [None] * len(bboxes)
        elif not isinstance(marks, list) or len(marks) != len(bboxes):
            self.bad.problem(where, f"'{LANDMARK_KEY[self.version]}' must be a list with one item per box "
                             f"({len(bboxes)})", "malformed annotation")
            return []
        leading = HANDEDNESS.get(entry.get("leading_hand"), -1)
        if self._with_handedness and leading < 0:
            self.bad.problem(where, f"'leading_hand' is {entry.get('leading_hand')!r}, expected \"left\" or \"right\"",
                             "malformed annotation")
            return []
        known = self._known_labels
        hands = []
        for i, (name, value, points) in enumerate(zip(names, bboxes, marks)):
            if name not in known:
                self.bad.problem(where, f"hand {i}: unknown label {name!r} for HaGRID {self.version}", "unknown label")
                return []
            if name not in self.class_names:
                continue  # no_gesture dropped, or a gesture left out of `classes`
            box = _box(value)
            if box is None:
                self.bad.problem(where, f"hand {i}: box {value!r} is not [x, y, w, h] of finite numbers", "bad box")
                return []
            if box[2] <= box[0] or box[3] <= box[1]:
                self.bad.problem(where, f"hand {i}: box {value!r} lies outside the image", "box outside the image")
                return []
            points = _landmarks(points)
            if isinstance(points, tuple):
                self.bad.problem(where, f"hand {i}: landmarks {points[0]}", points[1])
                return []
            if points is None and self.config.landmarks_only:
                continue
            # The official v1 code: the no_gesture hand is the one that does not lead.
            hand = leading if name != NO_GESTURE or leading < 0 else 1 - leading
            hands.append((box, points, self.class_names.index(name), hand))
        return hands

    def __len__(self) -> int:
        return len(self.images)

    def _crop_square(self, i: int, width: int, height: int) -> tuple[float, float, float]:
        """(left, top, side) of sample ``i``'s crop, in pixels of the stored ``width`` x ``height`` image."""
        x0, y0, x1, y1 = self._boxes[i] * (width, height, width, height)
        side = self.config.scale * max(x1 - x0, y1 - y0)
        return (x0 + x1 - side) / 2, (y0 + y1 - side) / 2, side

    def decode(self, i: int) -> tuple[Image.Image, float, tuple[int, int]]:
        """Sample ``i``'s image decoded as small as its crop allows, the factor it was shrunk by, and the
        stored (width, height)."""
        stored = (0, 0)

        def reduction_for(width: int, height: int) -> int:
            nonlocal stored
            stored = (width, height)
            return reduction_for_crop(self._crop_square(i, width, height)[2], self.config.size)

        image, factor = read_rgb_reduced(self.images[i], reduction_for)
        return image, factor, stored

    def _read(self, i: int) -> dict:
        image, factor, (width, height) = self.decode(i)
        left, top, side = self._crop_square(i, width, height)
        # Decoded pixel j covers stored pixels [j, j + 1] * factor: continuous coordinates just scale.
        box = (left / factor, top / factor, (left + side) / factor, (top + side) / factor)
        crop = cut_and_resize(image, box, self.config.size, self.config.pad)
        # Landmarks are normalized to the whole stored image: u = x * width in continuous pixel coordinates.
        visible = float(self._has_landmarks[i])
        xy = (self._landmarks[i] * (width, height) - (left, top)) / side * visible
        keypoints = np.concatenate([xy, np.full((N_KEYPOINTS, 1), visible)], axis=1)
        pixels = torch.from_numpy(np.array(crop)).permute(2, 0, 1)
        sample = {"image": pixels.float().div_(127.5).sub_(1.0),
                  "label": torch.tensor(self._labels[i]),
                  "keypoints": torch.from_numpy(keypoints).float()}
        if self._with_handedness:
            sample["handedness"] = torch.tensor(self._handedness[i])
        return sample


def provided_fields(config: HagridConfig) -> tuple:
    return ("image", "label", "keypoints") + (("handedness",) if config.version == "v1" else ())


@hookimpl
def register_datasets(register):
    register("hagrid", Hagrid, config=HagridConfig, provides=provided_fields)
