"""Loading throughput: the decode-free cache (``handforge prepare cache``) against decoding JPEGs.

    python bench/loading.py [--count 2000] [--sizes 64 128] [--source-size 256] [--quality 90]
                            [--workers 2] [--batch-size 64] [--epochs 3] [--json]

A temporary folder receives ``--count`` procedural_hands images of ``--source-size`` px saved as
JPEG (quality ``--quality``). For each output size, the same folder is read two ways through a
shuffled torch DataLoader (``--workers`` workers, ``--batch-size``, handforge's collate):

- jpeg: the ``image_folder`` dataset (Pillow decode + antialiased bicubic resize per sample; a
  minimal reader doing the same when that plugin is not installed);
- cache: the ``cached`` dataset over a cache that ``prepare_cache`` made from that same folder
  and size (uint8 memory map, one conversion per batch).

Workers persist across epochs; the first epoch is a warm-up (worker start, page cache) and the
table gives the median samples/s of the next ``--epochs``, and cache / jpeg (goal: >= 10). The
cache is also read without workers: with nothing to decode, the main process alone avoids the
workers' shared-memory hand-over of float32 batches, which dominates at 128 px.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_jpegs(folder: pathlib.Path, count: int, size: int, quality: int, batch: int = 32) -> None:
    from handforge.imaging import to_uint8
    from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig

    hands = ProceduralHands(ProceduralHandsConfig(size=size, length=count))
    folder.mkdir(parents=True)
    for start in range(0, count, batch):
        indices = list(range(start, min(start + batch, count)))
        for i, pixels in zip(indices, to_uint8(hands.__getitems__(indices)["image"])):
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=quality)


class JpegFolder(torch.utils.data.Dataset):
    """The fallback reader: what image_folder does for square JPEGs, nothing more."""

    def __init__(self, folder: pathlib.Path, size: int):
        self.files, self.size = sorted(folder.glob("*.jpg")), size
        self.class_names, self.image_size = [], size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        with Image.open(self.files[i]) as image:
            image = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        return {"image": pixels.float().div_(127.5).sub_(1.0)}


def jpeg_dataset(folder: pathlib.Path, size: int):
    """(dataset, its table or None): image_folder when registered, else the fallback reader."""
    from handforge.plugin_manager import get_host
    from handforge.recipe import resolve_component

    if "image_folder" not in get_host().registry("dataset").names():
        return JpegFolder(folder, size), None
    table = {"name": "image_folder", "path": str(folder), "size": size, "labels": "none", "keypoints": "none"}
    return resolve_component(table, "dataset", "data").build(split="train"), table


def make_cache(folder: pathlib.Path, size: int, out: pathlib.Path) -> float:
    """Seconds to write the cache of the JPEG folder at ``size`` px into ``out``."""
    from handforge.plugins.datasets.cache import prepare_cache, write_cache
    from handforge.toml_writer import dumps

    started = time.perf_counter()
    dataset, table = jpeg_dataset(folder, size)
    if table is None:
        write_cache(out, {"train": dataset}, {"dataset": "bench JpegFolder", "source": {"path": str(folder)}})
    else:
        table_file = out.with_suffix(".toml")
        table_file.write_text(dumps(table))
        prepare_cache(table_file, out)
    return time.perf_counter() - started


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # each worker converts one batch; more threads only contend


def samples_per_second(dataset, batch_size: int, workers: int, epochs: int) -> float:
    from handforge.data import collate

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
        drop_last=True, persistent_workers=workers > 0, worker_init_fn=_one_thread,
        generator=torch.Generator().manual_seed(0))
    rates = []
    for epoch in range(epochs + 1):
        started, seen = time.perf_counter(), 0
        for batch in loader:
            seen += len(batch["image"])
        if epoch:  # epoch 0 warms up
            rates.append(seen / (time.perf_counter() - started))
    return statistics.median(rates)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="JPEG images in the fixture")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--source-size", dest="source_size", type=int, default=256)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        started = time.perf_counter()
        write_jpegs(tmp / "jpeg", args.count, args.source_size, args.quality)
        fixture_seconds = time.perf_counter() - started
        jpeg_bytes = sum(p.stat().st_size for p in (tmp / "jpeg").iterdir())
        for size in args.sizes:
            from handforge.plugins.datasets.cache import Cached, CachedConfig

            prepare_seconds = make_cache(tmp / "jpeg", size, tmp / f"cache{size}")
            jpeg, _ = jpeg_dataset(tmp / "jpeg", size)
            cached = Cached(CachedConfig(path=str(tmp / f"cache{size}")))
            row = {"size": size, "count": args.count, "workers": args.workers, "batch_size": args.batch_size,
                   "reader": type(jpeg).__name__, "prepare_s": prepare_seconds,
                   "jpeg_samples_per_s": samples_per_second(jpeg, args.batch_size, args.workers, args.epochs),
                   "cache_samples_per_s": samples_per_second(cached, args.batch_size, args.workers, args.epochs),
                   "cache_in_process_samples_per_s": samples_per_second(cached, args.batch_size, 0, args.epochs)}
            row["ratio"] = row["cache_samples_per_s"] / row["jpeg_samples_per_s"]
            rows.append(row)
    if args.json:
        print(json.dumps({"fixture_s": fixture_seconds, "jpeg_mb": jpeg_bytes / 1e6, "rows": rows}, indent=2))
        return
    print(f"fixture: {args.count} JPEGs of {args.source_size} px, quality {args.quality}, "
          f"{jpeg_bytes / 1e6:.1f} MB, written in {fixture_seconds:.1f} s")
    print("| size | samples | workers | batch | jpeg reader | jpeg samples/s | cache samples/s | cache / jpeg "
          "| cache, 0 workers, samples/s | prepare s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['count']} | {r['workers']} | {r['batch_size']} | {r['reader']} | "
              f"{r['jpeg_samples_per_s']:.0f} | {r['cache_samples_per_s']:.0f} | {r['ratio']:.1f} | "
              f"{r['cache_in_process_samples_per_s']:.0f} | {r['prepare_s']:.1f} |")


if __name__ == "__main__":
    main()
