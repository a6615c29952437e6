"""The ``rwth_phoenix`` dataset: the RWTH-PHOENIX-Weather 2014 handshape images (Koller, Ney and
Bowden, "Deep Hand", CVPR 2016), read from the layout the archive unpacks to.

The archive ``ph2014-dev-set-handshape-annotations.tar.gz`` holds 3359 hand crops, 132 pixels high
and 92 wide, and the index ``3359-ph2014-MS-handshape-annotations.txt``: one line per image,
``<image path> <class name>``, separated by a single space, the path relative to the index's
folder. The image file names contain a literal ``*`` (the glob of the video's frame folder,
``.../1/*.png`` followed by the frame name), which is kept as it is; where the archive was
unpacked on Windows, which forbids ``*``, the same name with ``_`` is used instead. The class names
are those of the Danish sign-language handshape taxonomy the paper uses (``1``, ``3_hook``,
``b_thumb``, ``index_flex``, ``pincet``, ...); 45 of its 60 classes occur in this set.
(Format as read by the public loaders of this set, e.g. ``handshape_datasets``.)

Samples: ``image`` (3, size, size) in [-1, 1] and ``label``. The crops are portrait: by default
(``fit = "pad"``) each is centred on a square of its height, padded black (``pad = "edge"``: the
border pixels repeated), so the whole hand is kept undistorted; ``crop`` keeps the centred square
of its width, ``stretch`` resizes without keeping the aspect ratio.

Classes are the sorted names found in the index, or the list in the ``classes`` option (kept in the
given order, whole, to fix the label ids; a line of another class is then a bad-data problem). The
images of classes with fewer than ``min_samples`` are dropped, and said so on stderr (the class
leaves ``class_names`` unless the ``classes`` option names it). ``val_fraction`` of each
class goes to the ``val`` split (see :func:`~handforge.plugins.datasets.image_folder.stratified_split`).
"""
from __future__ import annotations

import pathlib
import sys
from collections import Counter
from typing import Literal

import attrs
import numpy as np
import torch
from attrs import validators as v

from handforge import hookimpl
from handforge.data import check_split
from handforge.errors import DataError

from .bad_data import ON_ERROR_HELP, BadData, FileSamples, OnError, read_rgb
from .image_folder import FITS, square_image, stratified_split
from .keypoint_json import PADS

INDEX_NAME = "3359-ph2014-MS-handshape-annotations.txt"


@attrs.frozen
class IndexLine:
    number: int  # 1-based line number in the index, for messages
    path: pathlib.Path
    class_name: str


def _check_classes(instance, attribute, value) -> None:
    duplicated = sorted(name for name, n in Counter(value).items() if n > 1)
    if duplicated:
        raise ValueError(f"names a class more than once: {', '.join(duplicated)}")
    if any(not name or name.split() != [name] for name in value):
        raise ValueError("class names are single words without spaces, as in the index")


@attrs.define
class RwthPhoenixConfig:
    index: str = attrs.field(metadata={"help": f"the index text file ({INDEX_NAME})"})
    root: str | None = attrs.field(default=None, metadata={
        "help": "folder the image paths are relative to (default: the index's folder)"})
    size: int = attrs.field(default=64, validator=[v.ge(8), v.le(2048)], metadata={
        "help": "side of the square output image, pixels"})
    fit: Literal["pad", "crop", "stretch"] = attrs.field(default="pad", validator=v.in_(FITS), metadata={
        "help": "the 92x132 crops to a square: pad (keep all, centred), crop (centre square) or stretch"})
    pad: Literal["black", "edge"] = attrs.field(default="black", validator=v.in_(PADS), metadata={
        "help": "fit=pad: fill black, or repeat the edge pixels"})
    classes: list[str] = attrs.field(factory=list, validator=_check_classes, metadata={
        "help": "the class names in label order; empty: the sorted names found in the index"})
    min_samples: int = attrs.field(default=0, validator=v.ge(0), metadata={
        "help": "drop classes with fewer images than this (0: keep all)"})
    val_fraction: float = attrs.field(default=0.1, validator=[v.ge(0.0), v.lt(1.0)], metadata={
        "help": "share of each class's images in the val split"})
    seed: int = attrs.field(default=0, validator=v.ge(0), metadata={"help": "seed of the train/val split"})
    on_error: OnError = attrs.field(default="raise", validator=v.in_(("raise", "skip")), metadata={
        "help": ON_ERROR_HELP})


def _image_path(root: pathlib.Path, relative: str) -> pathlib.Path | None:
    """The image file a line names, or None if it is not there."""
    path = root / relative
    if path.is_file():
        return path
    unstarred = root / relative.replace("*", "_")  # unpacked on Windows, where '*' is not allowed
    return unstarred if "*" in relative and unstarred.is_file() else None


def read_index(index: pathlib.Path, root: pathlib.Path, bad: BadData, classes=()) -> list[IndexLine]:
    """The index's lines whose image exists; malformed lines, classes outside ``classes`` (if given)
    and missing images are ``bad``'s problems."""
    if not index.is_file():
        raise DataError(f"{index}: index file not found (dataset rwth_phoenix, option index; the "
                        f"archive holds {INDEX_NAME})")
    try:
        text = index.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{index}: not a text file ({exc})") from None
    allowed = set(classes)
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{index}: line {number}"
        if len(fields) != 2:
            bad.problem(where, f"expected '<image path> <class name>', got {line.strip()!r}", "malformed line")
            continue
        relative, name = fields
        if allowed and name not in allowed:
            bad.problem(where, f"class {name!r} is not in the classes option", "unknown class")
            continue
        path = _image_path(root, relative)
        if path is None:
            bad.problem(where, f"image {root / relative} not found", "missing image")
            continue
        lines.append(IndexLine(number, path, name))
    return lines


def frequent_classes(lines: list[IndexLine], min_samples: int) -> tuple[list[IndexLine], dict[str, int]]:
    """The lines of classes with at least ``min_samples`` images, and the dropped classes' counts."""
    counts = Counter(line.class_name for line in lines)
    dropped = {name: n for name, n in sorted(counts.items()) if n < min_samples}
    return [line for line in lines if line.class_name not in dropped], dropped


class RwthPhoenix(FileSamples):
    """RWTH-PHOENIX-Weather 2014 handshape crops with their class labels."""

    name, noun = "rwth_phoenix", "images"

    def __init__(self, config: RwthPhoenixConfig, split: str = "train"):
        check_split("rwth_phoenix", split)
        self.config, self.split = config, split
        self.index = pathlib.Path(config.index)
        root = pathlib.Path(config.root) if config.root is not None else self.index.parent
        if config.root is not None and not root.is_dir():
            raise DataError(f"{root}: image root folder not found (dataset rwth_phoenix, option root)")
        self.bad = BadData(f"rwth_phoenix {self.index}", config.on_error)
        lines = read_index(self.index, root, self.bad, config.classes)
        self.bad.print_summary(len(lines) + sum(self.bad.counts.values()))
        lines, self.dropped_classes = frequent_classes(lines, config.min_samples)
        if self.dropped_classes:
            listed = ", ".join(f"{name} ({n})" for name, n in self.dropped_classes.items())
            print(f"rwth_phoenix: dropped {len(self.dropped_classes)} classes with fewer than "
                  f"{config.min_samples} images ({sum(self.dropped_classes.values())} images): {listed}",
                  file=sys.stderr)
        if not lines:
            why = f" ({self.bad.summary()})" if self.bad.counts else ""
            if self.dropped_classes:
                why += f"; min_samples = {config.min_samples} dropped every class"
            raise DataError(f"{self.index}: no usable lines{why}")
        # A classes list is kept whole, even a class left without images, so the label ids stay fixed.
        names = list(config.classes) or sorted({line.class_name for line in lines})
        self.class_names = names
        ids = {name: i for i, name in enumerate(names)}
        labels = np.array([ids[line.class_name] for line in lines])
        train, val = stratified_split(labels, config.val_fraction, config.seed)
        chosen = train if split == "train" else val
        if not len(chosen):
            hint = "set val_fraction (e.g. 0.1)" if config.val_fraction == 0 else "raise val_fraction"
            raise DataError(f"rwth_phoenix {self.index}: the {split} split is empty; {hint}")
        self.lines = [lines[i] for i in chosen]
        self.labels = labels[chosen]
        self.image_size = config.size

    def __len__(self) -> int:
        return len(self.lines)

    def _read(self, i: int) -> dict:
        line = self.lines[i]
        try:
            image = read_rgb(line.path)
        except DataError as exc:
            raise DataError(f"{self.index}: line {line.number}: {exc}") from None
        pixels, _ = square_image(image, self.config.size, self.config.fit, self.config.pad)
        return {"image": pixels, "label": torch.tensor(int(self.labels[i]), dtype=torch.int64)}


@hookimpl
def register_datasets(register):
    register("rwth_phoenix", RwthPhoenix, config=RwthPhoenixConfig, provides=("image", "label"))
