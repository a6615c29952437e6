"""Export throughput of ``handforge generate`` against the generator's pure forward throughput.

    python bench/export.py [--run RUN_DIR] [--size 64] [--per-class 32] [--batch-size 64]
                           [--workers 2] [--rounds 3] [--threads 2] [--json]

Without ``--run`` a label-conditioned deep_conv GAN (ch 32, z_dim 64, cbn/projection) at
``--size`` px is trained for one step in a temporary folder: the export's speed does not depend
on how good the weights are. In one process, alternately per round:

- forward: ``task.generate(conditions, seeds)`` over exactly the batches the export makes
  (the same conditions and seeds), images discarded;
- export: ``export(...)`` of the same images into a fresh folder (PNG encoding in
  ``--workers`` threads, files, manifest), timed from its first batch to its last file written.

The table gives images/s of each (median over rounds) and export / forward (goal: >= 0.9).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import tempfile
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_run(root: pathlib.Path, size: int) -> pathlib.Path:
    from handforge.loop import Trainer
    from handforge.plugin_manager import get_host
    from handforge.recipe import resolve

    raw = {
        "name": "export_bench", "seed": 0, "output_dir": str(root / "runs"),
        "task": {"name": "gan"}, "data": {"name": "procedural_hands", "size": size},
        "model": {"generator": {"name": "deep_conv", "ch": 32, "z_dim": 64},
                  "discriminator": {"name": "deep_conv", "ch": 32},
                  "g_conditioner": {"name": "cbn"}, "d_conditioner": {"name": "projection"}},
        "train": {"steps": 1, "batch_size": 8, "progress": False, "tensorboard": False},
    }
    host = get_host()
    return Trainer(resolve(raw, host=host), host).run().run_dir


def forward_seconds(run, manifest: dict) -> float:
    from handforge.plugins.export.manifest import batches, condition_batch

    fields = manifest["settings"]["condition_fields"]
    groups = list(batches(manifest).values())
    started = time.perf_counter()
    with torch.no_grad():
        for records in groups:
            run.task.generate(condition_batch(records, fields), seeds=[r["seed"] for r in records])
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="an existing run directory (default: train a tiny one)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--per-class", dest="per_class", type=int, default=32)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from handforge.plugins.export.generate import ExportOptions, export
    from handforge.runs import load_run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        run_dir = pathlib.Path(args.run) if args.run else tiny_run(tmp, args.size)
        checkpoint = "weights" if (run_dir / "weights").is_dir() else "last"
        run = load_run(run_dir, split="train", checkpoint=checkpoint)
        opts = ExportOptions(run_dir=run_dir, out=tmp / "out", per_class=args.per_class, checkpoint=checkpoint,
                             batch_size=args.batch_size, workers=args.workers, progress=False)
        export(opts, run=run)  # warm-up, and the manifest the forward pass replays
        manifest = json.loads((tmp / "out" / "manifest.json").read_text())
        images = len(manifest["images"])
        forward, exported = [], []
        for _ in range(args.rounds):
            forward.append(images / forward_seconds(run, manifest))
            shutil.rmtree(tmp / "out")
            result = export(opts, run=run)
            exported.append(result.written / result.loop_seconds)
        row = {"size": args.size, "images": images, "batch_size": args.batch_size, "workers": args.workers,
               "threads": args.threads, "forward_images_per_s": statistics.median(forward),
               "export_images_per_s": statistics.median(exported)}
        row["ratio"] = row["export_images_per_s"] / row["forward_images_per_s"]
    if args.json:
        print(json.dumps(row, indent=2))
        return
    print(f"| size | images | batch | PNG threads | forward img/s | export img/s | export / forward |")
    print(f"|---|---|---|---|---|---|---|")
    print(f"| {row['size']} | {row['images']} | {row['batch_size']} | {row['workers']} | "
          f"{row['forward_images_per_s']:.0f} | {row['export_images_per_s']:.0f} | {row['ratio']:.2f} |")


if __name__ == "__main__":
    main()
