"""A decode-free cache of any dataset: ``handforge prepare cache`` writes it, the ``cached`` dataset reads it.

    handforge prepare cache TABLE.toml [key=value ...] --out DIR [--split train|val|both] [--batch 256]

``TABLE.toml`` is either a recipe (its ``[data]`` table is used) or a file holding one dataset
table at the top level (``name = "hagrid"`` plus that dataset's options); ``key=value`` words
override options of that table, read as TOML values. The dataset is built exactly as a recipe
builds it, every sample is decoded, cropped and resized once, and DIR receives:

- ``<split>/images.u8``: the ``image`` field as raw uint8, shape (N, 3, H, W) — channels first,
  so a batch is one memory-mapped gather plus one conversion, with no transpose. Another
  image-like field (``reference``) gets its own ``<field>s.u8`` of the same layout.
- ``<split>/fields.npz``: every other field (label, keypoints, handedness, ...) as one array each,
  dtype as the dataset yields it.
- ``cache.json``: the layout, the source table and its hash, the dataset's origin and options,
  shapes, dtypes, counts and class names. Written last, into a temporary folder that is renamed
  to DIR only when complete: a folder without it is never loaded.

A recipe then reads the cache with ``[data] name = "cached", path = "DIR"``. Pixels are stored as
``round((v + 1) * 127.5)``, so an image comes back within 1/255 of the source's value (half a
uint8 step); every other field comes back exactly. A generic ``cache = true`` option inside any
``[data]`` table would need the core's recipe resolution; this plugin does not change the core.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time

import attrs
import numpy as np
import torch
from tqdm import tqdm

from handforge import __version__, hookimpl
from handforge.data import FIELDS, check_sample, collate
from handforge.errors import DataError, HandforgeError, RecipeError
from handforge.fileio import atomic_write_bytes
from handforge.imaging import to_uint8

from .bad_data import check_finite, read_json

FORMAT, LAYOUT = "handforge-cache", 1
INFO_FILE, FIELDS_FILE = "cache.json", "fields.npz"
SPLITS = ("train", "val")
_UMASK = os.umask(0)
os.umask(_UMASK)
PREPARE_HINT = "make one with `handforge prepare cache TABLE.toml --out {root}`"


def pixel_file(field: str) -> str:
    return f"{field}s.u8"  # image -> images.u8, reference -> references.u8


def table_hash(table: dict) -> str:
    """sha256 of the dataset table as canonical JSON: equal tables, equal hashes, whatever the key order."""
    return hashlib.sha256(json.dumps(table, sort_keys=True, default=str).encode()).hexdigest()


# -- writing ---------------------------------------------------------------------------------------


def _is_image(value: torch.Tensor) -> bool:
    return value.ndim == 4 and value.shape[1] == 3 and value.is_floating_point()


def _fetch(dataset, indices: list) -> dict:
    if hasattr(dataset, "__getitems__"):
        return collate(dataset.__getitems__(indices))
    return collate([dataset[i] for i in indices])


def write_split(dataset, folder: pathlib.Path, name: str, batch: int = 256, limit: int = 0) -> dict:
    """Decode samples ``0 .. N-1`` of ``dataset`` into ``folder`` (pixel files + fields.npz); returns
    the split's entry of cache.json. ``name`` names the dataset in messages."""
    count = min(len(dataset), limit) if limit else len(dataset)
    if count < 1:
        raise DataError(f"dataset '{name}' has no samples to cache")
    folder.mkdir(parents=True, exist_ok=True)
    pixels: dict[str, np.memmap] = {}
    columns: dict[str, list] = {}
    expected = None
    with tqdm(total=count, unit="sample", desc=f"cache {folder.name}", disable=None, file=sys.stderr) as bar:
        for start in range(0, count, batch):
            indices = list(range(start, min(start + batch, count)))
            where = f"dataset '{name}' samples {indices[0]}..{indices[-1]}"
            samples = _fetch(dataset, indices)
            check_sample(samples, where=where, batched=True)
            if expected is None:
                if "image" not in samples:
                    raise DataError(f"dataset '{name}' yields no 'image' field; fields: {', '.join(samples)}")
                expected = {k: tuple(v.shape[1:]) for k, v in samples.items()}
                for field in (k for k, v in samples.items() if _is_image(v)):
                    pixels[field] = np.memmap(folder / pixel_file(field), dtype=np.uint8, mode="w+",
                                              shape=(count, *samples[field].shape[1:]))
                columns = {k: [] for k in samples if k not in pixels}
            got = {k: tuple(v.shape[1:]) for k, v in samples.items()}
            if got != expected:
                raise DataError(f"{where}: fields/shapes {got} differ from the first batch's {expected}; "
                                f"a cache needs one shape per field")
            if any(len(v) != len(indices) for v in samples.values()):
                raise DataError(f"{where}: some field does not hold {len(indices)} samples")
            for field, array in pixels.items():
                # to_uint8 is the project's one float -> uint8 rule (NaN -> 0, ties to even); it gives
                # NHWC, and the slice assignment transposes into the channels-first file.
                array[start:start + len(indices)] = to_uint8(samples[field]).transpose(0, 3, 1, 2)
            for field, parts in columns.items():
                parts.append(samples[field].detach().cpu().numpy())
            bar.update(len(indices))
    for array in pixels.values():
        array.flush()
    arrays = {field: np.concatenate(parts) for field, parts in columns.items()}
    np.savez(folder / FIELDS_FILE, **arrays)  # uncompressed: loading is a read, not an inflate
    return {
        "count": count,
        "class_names": list(getattr(dataset, "class_names", None) or []),
        "images": {f: {"file": pixel_file(f), "shape": [count, *a.shape[1:]], "dtype": "uint8", "order": "NCHW"}
                   for f, a in pixels.items()},
        "fields": {f: {"shape": list(a.shape), "dtype": str(a.dtype)} for f, a in arrays.items()},
    }


def write_cache(out, datasets: dict, source: dict, *, batch: int = 256, limit: int = 0,
                overwrite: bool = False) -> dict:
    """Write the cache of ``datasets`` (split -> dataset) into the folder ``out``, all or nothing.

    ``source`` is recorded in cache.json (the dataset table, its origin, ...). Everything is written
    into a temporary folder beside ``out`` that becomes ``out`` by one rename once cache.json is
    in it; on any error (or Ctrl-C) the temporary folder is removed and ``out`` is untouched.
    Returns the cache.json content."""
    out = pathlib.Path(out)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    partial = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(partial, 0o777 & ~_UMASK)  # mkdtemp's 0700 would make the finished cache private
        name = source.get("dataset", "?")
        splits = {split: write_split(data, partial / split, name, batch, limit) for split, data in datasets.items()}
        first = next(iter(splits.values()))
        info = {
            "format": FORMAT,
            "layout": LAYOUT,
            **source,
            "handforge_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "class_names": first["class_names"],
            "image_size": first["images"]["image"]["shape"][2:],
            "splits": splits,
            "seconds": round(time.perf_counter() - started, 3),
        }
        atomic_write_bytes(partial / INFO_FILE, (json.dumps(info, indent=2, default=str) + "\n").encode())
        _move_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return info


def check_out(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HandforgeError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HandforgeError(f"--out {out}: folder exists and is not empty; choose another folder or add --overwrite")


def _move_into_place(partial: pathlib.Path, out: pathlib.Path) -> None:
    """Rename ``partial`` to ``out``; an earlier ``out`` (--overwrite) is moved aside first and
    deleted after, so at every moment ``out`` is the old cache, absent, or the new cache."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
    os.replace(partial, out)  # also replaces an empty folder
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_dataset_table(path) -> dict:
    """The dataset table of a TOML file: a recipe's ``[data]``, else the file's top level."""
    from handforge.recipe import read_toml

    raw = read_toml(path)
    data = raw.get("data")
    if data is not None:
        if not isinstance(data, dict):
            raise RecipeError(["data: expected a table {name = ..., options}"], source=str(path))
        return dict(data)
    if "name" not in raw:
        raise RecipeError(["neither a [data] table (a recipe) nor a dataset table (name = \"...\" and "
                           "that dataset's options) at the top level"], source=str(path))
    return dict(raw)


def prepare_cache(table_file, out, *, split: str = "train", batch: int = 256, limit: int = 0,
                  overrides=(), overwrite: bool = False, host=None) -> dict:
    """Resolve the dataset table in ``table_file`` (plus ``key=value`` overrides), build it for
    ``split`` ("train", "val" or "both") and write its cache into ``out``; returns cache.json."""
    from handforge.recipe import apply_overrides, resolve_component

    if batch < 1:
        raise HandforgeError(f"--batch must be at least 1, got {batch}")
    if limit < 0:
        raise HandforgeError(f"--limit must be 0 (all) or more, got {limit}")
    if split not in (*SPLITS, "both"):
        raise HandforgeError(f"--split must be train, val or both, got {split!r}")
    table = read_dataset_table(table_file)
    try:
        apply_overrides(table, overrides)
        component = resolve_component(table, "dataset", "data", host=host)
    except RecipeError as exc:
        raise RecipeError(exc.problems, source=str(table_file)) from None
    check_out(pathlib.Path(out), overwrite)  # before building: a refused folder costs nothing
    datasets = {s: component.build(split=s) for s in (SPLITS if split == "both" else (split,))}
    config = component.config
    source = {
        "dataset": component.name,
        "origin": component.entry.origin,
        "source_file": str(pathlib.Path(table_file).resolve()),
        "source": table,
        "source_hash": table_hash(table),
        "options": attrs.asdict(config) if config is not None else {},
    }
    return write_cache(out, datasets, source, batch=batch, limit=limit, overwrite=overwrite)


# -- reading ---------------------------------------------------------------------------------------


def read_info(root: pathlib.Path) -> dict:
    """cache.json of the cache folder ``root``, checked to be a complete cache of this layout."""
    hint = PREPARE_HINT.format(root=root)
    if not root.is_dir():
        raise DataError(f"{root}: cache folder not found; {hint}")
    file = root / INFO_FILE
    if not file.is_file():
        raise DataError(f"{file}: not found, so {root} is no complete cache (an interrupted prepare "
                        f"leaves none); {hint}")
    info = read_json(file, hint)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataError(f"{file}: not a handforge cache (format {info.get('format') if isinstance(info, dict) else None!r}, "
                        f"expected {FORMAT!r})")
    if info.get("layout") != LAYOUT:
        raise DataError(f"{file}: cache layout {info.get('layout')!r} (written by handforge "
                        f"{info.get('handforge_version', '?')}); this handforge reads layout {LAYOUT}: "
                        f"prepare the cache again")
    splits = info.get("splits")
    if not isinstance(splits, dict) or not splits or not all(
            isinstance(s, dict) and {"count", "images", "fields"} <= set(s) and "image" in s["images"]
            for s in splits.values()):
        raise DataError(f"{file}: malformed 'splits' entry; prepare the cache again")
    return info


def cached_fields(info: dict, split: str | None = None) -> tuple:
    entry = info["splits"][split] if split else next(iter(info["splits"].values()))
    return tuple(entry["images"]) + tuple(entry["fields"])


def batch_buffers(specs: dict) -> dict:
    """Uninitialised tensors ``{field: (shape, dtype)}`` for one batch, all views of one storage.

    In a DataLoader worker that storage is made in shared memory, as default_collate makes its
    batches. The worker then hands the batch over as one shared-memory handle: no copy into shared
    memory at pickling, and one file descriptor instead of one per field, which (measured with 2
    workers, batch 64) doubles the samples/s a loader can deliver at 64 and 128 px."""
    offsets, total = {}, 0
    for field, (shape, dtype) in specs.items():
        offsets[field] = total
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        total += -(-nbytes // 64) * 64  # each field starts on a 64-byte boundary: aligned for any dtype
    # In a DataLoader worker, one shared block for the whole batch (as default_collate allocates its
    # output) halves the hand-over cost; _new_shared is private API, so without it a plain block.
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if torch.utils.data.get_worker_info() is None or new_shared is None:
        storage = torch.UntypedStorage(total)
    else:
        storage = new_shared(total)
    return {field: torch.empty(0, dtype=dtype).set_(storage, offsets[field] // torch.empty(0, dtype=dtype).element_size(),
                                                     shape)
            for field, (shape, dtype) in specs.items()}


@attrs.define
class CachedConfig:
    path: str = attrs.field(metadata={"help": "the folder `handforge prepare cache ... --out DIR` wrote"})


class Cached(torch.utils.data.Dataset):
    """Samples from a `handforge prepare cache` folder: memory-mapped uint8 pixels, no decoding."""

    def __init__(self, config: CachedConfig, split: str = "train"):
        self.root = pathlib.Path(config.path)
        self.info = read_info(self.root)
        if split not in self.info["splits"]:
            raise DataError(f"{self.root / INFO_FILE}: no {split!r} split cached (has "
                            f"{', '.join(self.info['splits'])}); prepare with --split {split} or both")
        entry = self.info["splits"][split]
        self.split, self.count = split, int(entry["count"])
        self.class_names = list(entry["class_names"])
        height, width = entry["images"]["image"]["shape"][2:]
        self.image_size = height if height == width else (height, width)
        self._pixel_files = {}
        for field, spec in entry["images"].items():
            file = self.root / split / spec["file"]
            expected = int(np.prod(spec["shape"]))
            actual = file.stat().st_size if file.is_file() else None
            if actual != expected:
                raise DataError(f"{file}: {'missing' if actual is None else f'{actual} bytes'}, cache.json says "
                                f"shape {spec['shape']} = {expected} bytes; prepare the cache again")
            self._pixel_files[field] = (file, tuple(spec["shape"]))
        self.fields = self._read_fields(self.root / split / FIELDS_FILE, entry["fields"])
        self._maps: dict | None = None  # opened on first use, in each worker process

    def _read_fields(self, file: pathlib.Path, specs: dict) -> dict:
        try:
            with np.load(file, allow_pickle=False) as stored:
                arrays = {k: stored[k] for k in stored.files}
        except (OSError, ValueError) as exc:
            raise DataError(f"{file}: cannot be read ({type(exc).__name__}: {exc}); prepare the cache again") from None
        if set(arrays) != set(specs) or any(list(arrays[k].shape) != specs[k]["shape"] for k in specs):
            got = {k: list(a.shape) for k, a in arrays.items()}
            raise DataError(f"{file}: holds {got}, cache.json says "
                            f"{ {k: s['shape'] for k, s in specs.items()} }; prepare the cache again")
        for name, array in arrays.items():  # keypoints, poses: finite, as in every dataset
            if np.issubdtype(array.dtype, np.floating):
                check_finite(array, f"{file} '{name}'", axes=("sample",))
        return {k: torch.from_numpy(a) for k, a in arrays.items()}

    def __getstate__(self):
        # A pickled memmap would carry the whole file to a spawned worker: send only the paths.
        return {**self.__dict__, "_maps": None}

    def _pixels(self) -> dict:
        if self._maps is None:
            self._maps = {f: np.memmap(file, dtype=np.uint8, mode="r", shape=shape)
                          for f, (file, shape) in self._pixel_files.items()}
        return self._maps

    def __len__(self) -> int:
        return self.count

    def __getitems__(self, indices) -> dict:
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < -self.count or index.max() >= self.count):
            raise IndexError(f"cached {self.root}: index out of range for {self.count} samples")
        index = np.where(index < 0, index + self.count, index)
        pixels = self._pixels()
        batch = batch_buffers({**{f: ((len(index), *p.shape[1:]), torch.float32) for f, p in pixels.items()},
                               **{f: ((len(index), *v.shape[1:]), v.dtype) for f, v in self.fields.items()}})
        for field, array in pixels.items():
            # The gather copies the rows out of the page cache; v / 127.5 - 1 is exact at 0 and 255.
            torch.div(torch.from_numpy(array[index]), 127.5, out=batch[field]).sub_(1.0)
        rows = torch.from_numpy(index)
        for field, values in self.fields.items():
            torch.index_select(values, 0, rows, out=batch[field])
        return batch

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def provides(config: CachedConfig) -> tuple:
    return tuple(f for f in cached_fields(read_info(pathlib.Path(config.path))) if f in FIELDS)


# -- the command -----------------------------------------------------------------------------------


def configure(parser) -> None:
    parser.intermixed = True  # key=value options may follow the flags
    parser.add_argument("table", help="a TOML file: a recipe (its [data] table is cached) or one dataset "
                                      "table (name = \"...\" and options) at the top level")
    parser.add_argument("options", nargs="*", help="dataset options overridden as option=value (size=64)")
    parser.add_argument("--out", required=True, help="the cache folder to write (new or empty unless --overwrite)")
    parser.add_argument("--split", default="train", choices=[*SPLITS, "both"], help="which split(s) (default train)")
    parser.add_argument("--batch", type=int, default=256, help="samples fetched per call (default 256)")
    parser.add_argument("--limit", type=int, default=0, help="cache only the first N samples of each split (0: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier cache in --out")


def summary(info: dict, out) -> str:
    parts = []
    for split, entry in info["splits"].items():
        shape = entry["images"]["image"]["shape"]
        megabytes = sum(int(np.prod(s["shape"])) for s in entry["images"].values()) / 1e6
        parts.append(f"{split}: {entry['count']} samples of {shape[3]}x{shape[2]}, {megabytes:.1f} MB of pixels")
    total = sum(e["count"] for e in info["splits"].values())
    rate = total / info["seconds"] if info["seconds"] > 0 else float("inf")
    return (f"cached dataset '{info['dataset']}' in {out} ({'; '.join(parts)}) in {info['seconds']:.1f} s, "
            f"{rate:.0f} samples/s\nuse it with: [data] name = \"cached\", path = \"{out}\"")


def command(args) -> int:
    info = prepare_cache(args.table, args.out, split=args.split, batch=args.batch, limit=args.limit,
                         overrides=args.options, overwrite=args.overwrite)
    print(summary(info, args.out))
    return 0


@hookimpl
def register_commands(cli):
    cli.add_preparer("cache", "any dataset -> a decode-free uint8 cache read by the `cached` dataset",
                     configure, command)


@hookimpl
def register_datasets(register):
    register("cached", Cached, config=CachedConfig, provides=provides)
