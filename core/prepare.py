"""``handforge prepare``: write the first N samples of any registered dataset to a folder.

The folder holds ``000000.png, 000001.png, ...`` (the ``image`` field), one sub-folder per
other image-like field (``reference/000000.png``), ``labels.json`` (every other field of each
sample as plain JSON, keyed by image file name, the format ``handforge judge --keypoints`` and most keypoint
tools read) and ``dataset.json`` (what was written and how to make it again).

The dataset is built exactly as a recipe's ``[data]`` table would be: its ``key=value``
options are TOML values structured into the config class it registered, strictly. Nothing
here knows any dataset by name; it relies only on the sample contract (:mod:`handforge.data`).
"""
from __future__ import annotations

import io
import json
import pathlib
import re
import time

import attrs
import numpy as np
import torch
from PIL import Image

from . import __version__
from .data import FIELDS, SPLITS, check_sample, collate
from .errors import DataError, HandforgeError
from .fileio import atomic_write_bytes
from .imaging import to_uint8
from .recipe import Component, apply_overrides, resolve_component

LABELS_FILE, INFO_FILE = "labels.json", "dataset.json"
DECIMALS = 6  # float labels are rounded: enough for sub-pixel keypoints, stable across platforms
# Files an earlier ``prepare`` wrote, which --overwrite may delete so no stale image outlives it.
_NUMBERED_PNG = re.compile(r"^\d{6,}\.png$")


@attrs.frozen
class Prepared:
    """What :func:`prepare` wrote."""

    out: pathlib.Path
    dataset: str
    num: int
    image_size: tuple  # (H, W) of the image field
    image_fields: tuple  # fields written as PNG files
    label_fields: tuple  # fields written into labels.json
    seconds: float

    def summary(self) -> str:
        h, w = self.image_size
        rate = self.num / self.seconds if self.seconds > 0 else float("inf")
        return (f"prepared {self.num} images of {w}x{h} from dataset '{self.dataset}' in {self.out}: "
                f"{self.seconds:.1f} s, {rate:.1f} images/s")


# -- resolving the dataset ---------------------------------------------------------------------


def _options(name: str, entry, texts, shortcuts: dict) -> dict:
    """The user's option table: ``key=value`` texts (TOML values) plus the --size/--seed shortcuts."""
    options = apply_overrides({}, texts)  # same parsing, same messages as recipe overrides
    if "name" in options:
        raise HandforgeError(f"prepare: 'name' is not an option of dataset '{name}'; "
                             f"the dataset is named by the first argument")
    fields = [f.name for f in attrs.fields(entry.config_cls)] if entry.config_cls is not None else []
    for key, value in shortcuts.items():
        if value is None:
            continue
        if key not in fields:
            # A shortcut is a convenience for datasets that have the option; saying so beats the
            # generic "unknown key", because the user never typed the key.
            raise HandforgeError(f"dataset '{name}' has no option '{key}' (given by --{key}); "
                                 f"its options: {', '.join(fields) or 'none'}")
        if key in options and options[key] != value:
            raise HandforgeError(f"dataset '{name}': --{key} {value} and {key}={options[key]!r} disagree; give one")
        options[key] = value
    return options


def _grow_length(component: Component, options: dict, num: int) -> None:
    """Raise a virtual dataset's ``length`` option to ``num`` when the user left it at its default."""
    config = component.config
    if config is None or "length" in options or not any(f.name == "length" for f in attrs.fields(type(config))):
        return
    length = getattr(config, "length")
    if isinstance(length, int) and not isinstance(length, bool) and length < num:
        component.config = attrs.evolve(config, length=num)  # evolve re-runs the validators


def resolve_dataset(name: str, texts=(), size=None, seed=None, num: int = 1, host=None) -> Component:
    """The dataset component for ``name`` with its options validated, as a recipe would resolve it."""
    from .plugin_manager import get_host

    host = host or get_host()
    entry = host.registry("dataset").get(name)  # unknown name: RegistryError with near matches
    options = _options(name, entry, texts, {"size": size, "seed": seed})
    # The TOML path of each problem starts with the dataset's name: "procedural_hands.size: ...".
    component = resolve_component({"name": name, **options}, "dataset", name, host=host)
    _grow_length(component, options, num)
    return component


# -- output folder -----------------------------------------------------------------------------


def _check_folder(out: pathlib.Path, overwrite: bool) -> bool:
    """Whether ``out`` holds files; refuse it unless it is new, empty, or --overwrite was given."""
    if out.exists() and not out.is_dir():
        raise HandforgeError(f"--out {out}: exists and is not a folder")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not overwrite:
        raise HandforgeError(f"--out {out}: folder exists and is not empty; "
                             f"choose another folder or add --overwrite")
    return occupied


def _clear_earlier_output(out: pathlib.Path) -> None:
    """--overwrite: delete what a prepare run writes, so no stale image outlives a smaller run.

    Only numbered PNGs (at the top and in image-field folders) and the two JSON files go; any
    other file the user keeps there stays. The labels go first, so a run that fails half-way
    leaves no labels that describe other images.
    """
    for file_name in (LABELS_FILE, INFO_FILE):
        (out / file_name).unlink(missing_ok=True)
    for folder in [out] + [out / f for f in FIELDS if (out / f).is_dir()]:
        for path in folder.iterdir():
            if path.is_file() and _NUMBERED_PNG.match(path.name):
                path.unlink()


# -- samples to files --------------------------------------------------------------------------


def _fetch(dataset, indices: list) -> dict:
    """One batch as a dict of (B, ...) tensors: ``__getitems__`` when the dataset batches itself."""
    if hasattr(dataset, "__getitems__"):
        return collate(dataset.__getitems__(indices))
    return collate([dataset[i] for i in indices])


def _is_image(value: torch.Tensor) -> bool:
    return value.ndim == 4 and value.shape[1] == 3 and value.is_floating_point()


def _plain(values: torch.Tensor) -> list:
    """A batched tensor as one JSON value per sample: ints stay ints (a () field becomes a bare
    int), floats are rounded in float64 so that a float32 0.1 is written as 0.1."""
    values = values.detach().cpu()
    if values.is_floating_point():
        return np.round(values.double().numpy(), DECIMALS).tolist()
    return values.tolist()


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # no timestamps: same pixels, same bytes
    return buffer.getvalue()


def _json(value) -> bytes:
    return (json.dumps(value, indent=2, default=str) + "\n").encode()


def _labels_json(labels: dict) -> bytes:
    # One line per image: readable, diffable, and a fraction of the size of an indented dump.
    lines = [f"{json.dumps(name)}: {json.dumps(entry)}" for name, entry in labels.items()]
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


def prepare(dataset: str, num: int, out, *, size=None, seed=None, split: str = "train", batch: int = 64,
            overwrite: bool = False, options=(), host=None) -> Prepared:
    """Write samples ``0 .. num-1`` of ``dataset`` (split ``split``) to the folder ``out``."""
    started = time.perf_counter()
    if num < 1:
        raise HandforgeError(f"--num must be at least 1, got {num}")
    if batch < 1:
        raise HandforgeError(f"--batch must be at least 1, got {batch}")
    if split not in SPLITS:
        raise HandforgeError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    component = resolve_dataset(dataset, options, size=size, seed=seed, num=num, host=host)
    out = pathlib.Path(out)
    occupied = _check_folder(out, overwrite)  # before building: a refused folder costs nothing

    data = component.build(split=split)  # as the run loop builds it
    available = len(data)
    if available < num:
        has_length = component.config is not None and hasattr(component.config, "length")
        hint = (f": raise its length option (length={num}) or lower --num" if has_length
                else "; lower --num")
        raise DataError(f"dataset '{dataset}' ({split}) has {available} samples, fewer than --num {num}{hint}")
    if occupied:
        _clear_earlier_output(out)
    out.mkdir(parents=True, exist_ok=True)

    width = max(6, len(str(num - 1)))  # zero-padded names sort in sample order
    names = list(getattr(data, "class_names", None) or [])
    labels, image_fields, label_fields, image_size = {}, (), (), None
    for start in range(0, num, batch):
        indices = list(range(start, min(start + batch, num)))
        samples = _fetch(data, indices)
        check_sample(samples, where=f"dataset '{dataset}' samples {indices[0]}..{indices[-1]}", batched=True)
        if "image" not in samples:
            raise DataError(f"dataset '{dataset}' yields no 'image' field; fields: {', '.join(samples)}")
        wrong = [k for k, v in samples.items() if v.shape[0] != len(indices)]
        if wrong:
            raise DataError(f"dataset '{dataset}': fields {', '.join(wrong)} do not hold {len(indices)} samples")
        image_fields = tuple(k for k, v in samples.items() if _is_image(v))
        label_fields = tuple(k for k in samples if k not in image_fields)
        image_size = tuple(samples["image"].shape[2:])
        files = [f"{i:0{width}d}.png" for i in indices]
        for field in image_fields:
            folder = out if field == "image" else out / field
            folder.mkdir(exist_ok=True)
            for file_name, pixels in zip(files, to_uint8(samples[field])):
                (folder / file_name).write_bytes(_png(pixels))
        plain = {k: _plain(samples[k]) for k in label_fields}  # one conversion per batch, not per sample
        for j, file_name in enumerate(files):
            entry = {k: plain[k][j] for k in label_fields}
            if names and isinstance(entry.get("label"), int) and 0 <= entry["label"] < len(names):
                entry["class_name"] = names[entry["label"]]
            labels[file_name] = entry

    # The JSON files come last, atomically: their presence marks a complete output.
    atomic_write_bytes(out / LABELS_FILE, _labels_json(labels))
    config = component.config
    atomic_write_bytes(out / INFO_FILE, _json({
        "dataset": dataset,
        "origin": component.entry.origin,
        "options": attrs.asdict(config) if config is not None else {},
        "split": split,
        "num": num,
        "class_names": names or None,
        "handforge_version": __version__,
        "image_size": list(image_size),
        "image_fields": list(image_fields),
        "label_fields": list(label_fields),
    }))
    return Prepared(out, dataset, num, image_size, image_fields, label_fields, time.perf_counter() - started)

