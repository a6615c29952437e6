"""Do ``handforge generate --variations`` keep the individual? An identity judge decides.

    python bench/variations_identity.py RUN_DIR --out DIR [--of 16] [--variations 8]
           [--strengths 0.25,0.5,1.0] [--judge judge.safetensors] [--judge-num 4000] [--judge-epochs 10]

RUN_DIR is a generator run (gan or diffusion) trained on a dataset with an ``identity`` field:
procedural_hands, best in its palm view (``view = "palm"``, each individual's palm creases), e.g.
recipes/palm_wgangp.toml. The measurement:

1. the identity judge: the existing ``handforge fit-judge`` CLI, trained on real images of the run's
   dataset written as one sub-folder per ``identity`` (train split), its accuracy reported on the val
   split (the same individuals, other samples): how well identity can be told from one image at all;
2. for each strength, ``handforge generate --variations N --of K`` (the export path) writes N
   variations of K synthetic individuals; each individual's *source* is the same call at strength
   1e-6 (the unmoved individual: a GAN's own z, a diffusion model's first sample), or for a
   pose-conditioned model its first variation;
3. the judge classifies every variation: **same identity** is the share assigned the identity the
   judge gives the source; **other's identity** the share assigned the identity of the next
   individual's source (the chance level of this judge on these images);
4. **within** is the mean pairwise distance between one individual's variations in the judge's
   feature space (> 0: they differ); **between** the same between different individuals' sources,
   and the last row the same two distances on real images (same identity / different identities).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCE_STRENGTH = 1e-6


def write_identity_folder(dataset, folder: pathlib.Path, count: int, batch: int = 128) -> None:
    """The first ``count`` samples of ``dataset`` as PNGs in one sub-folder per identity."""
    from handforge.imaging import to_uint8
    from handforge.plugins.metrics.sources import fetch_samples

    for start in range(0, count, batch):
        samples = fetch_samples(dataset, list(range(start, min(start + batch, count))))
        for offset, (pixels, identity) in enumerate(zip(to_uint8(samples["image"]), samples["identity"].tolist())):
            path = folder / f"identity_{identity:05d}" / f"{start + offset:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)


def fit_judge(run, out: pathlib.Path, args) -> tuple[pathlib.Path, str]:
    """The identity judge (trained with ``handforge fit-judge`` unless ``--judge`` exists), and the
    fit-judge lines that report its accuracy."""
    judge = pathlib.Path(args.judge) if args.judge else out / "identity_judge.safetensors"
    if judge.is_file():
        return judge, "(judge given)"
    data = run.recipe.data
    write_identity_folder(run.dataset, out / "real_train", args.judge_num)
    write_identity_folder(data.build(split="val"), out / "real_val", args.judge_val)
    size = args.judge_size or run.dataset.image_size
    command = [sys.executable, str(REPO / "run.py"), "fit-judge", str(out / "real_train"), "--out", str(judge),
               "--val", str(out / "real_val"), "--num", str(args.judge_num), "--val-num", str(args.judge_val),
               "--size", str(size), "--epochs", str(args.judge_epochs), "--width", str(args.judge_width)]
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"fit-judge failed:\n{result.stderr}")
    report = "; ".join(line.strip() for line in result.stdout.splitlines() if "accuracy" in line)
    print(report, flush=True)
    return judge, report


def read_images(out: pathlib.Path, records: list[dict]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(out / r["file"]).convert("RGB"))).permute(2, 0, 1)
                        for r in records])


def sources(run, manifest: dict) -> torch.Tensor:
    """(K, 3, H, W) uint8: each individual unmoved, drawn with its batch's generator as the export did."""
    from handforge.imaging import to_uint8
    from handforge.plugins.export.manifest import batches, condition_batch

    settings = manifest["settings"]
    fields = sorted({"label", *settings["condition_fields"]})
    n, rows = settings["variations"], []
    for records in batches(manifest).values():
        firsts = records[::n]
        if settings["method"] == "poses":  # no unmoved image: the first variation stands for it
            rows.extend(read_images(pathlib.Path(manifest["_out"]), firsts))
            continue
        individuals = condition_batch(firsts, fields)
        generator = torch.Generator().manual_seed(records[0]["batch_seed"])
        with torch.no_grad():
            images = run.task.variations(individuals, individuals, 1, strength=SOURCE_STRENGTH, generator=generator)
        rows.extend(torch.from_numpy(to_uint8(images[:, 0].cpu())).permute(0, 3, 1, 2))
    return torch.stack(rows)


def mean_pairwise(features: torch.Tensor) -> float:
    d = torch.cdist(features, features)
    n = features.shape[0]
    return float(d.sum() / (n * (n - 1))) if n > 1 else 0.0


def measure(run, judge, out: pathlib.Path, strength: float, args) -> dict:
    from handforge.plugins.export.variations import VariationOptions, export_variations

    folder = out / f"variations_strength_{strength:g}"
    opts = VariationOptions(run_dir=pathlib.Path(args.run_dir), out=folder, variations=args.variations,
                            individuals=args.of, strength=strength, checkpoint=args.checkpoint, seed=args.seed,
                            batch_size=args.batch_size, progress=False)
    tick = time.perf_counter()
    export_variations(opts, run=run)
    seconds = time.perf_counter() - tick
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["_out"] = str(folder)
    n, k = args.variations, args.of
    images = read_images(folder, manifest["images"])
    source = sources(run, manifest)
    predicted = judge.predict(images).view(k, n)
    source_identity = judge.predict(source)
    features = judge.features(images).view(k, n, -1)
    return {
        "strength": strength if manifest["settings"]["method"] == "perturb" else "poses",
        "same": float((predicted == source_identity[:, None]).float().mean()),
        "other": float((predicted == source_identity.roll(-1)[:, None]).float().mean()),
        "within": float(np.mean([mean_pairwise(features[i]) for i in range(k)])),
        "between": mean_pairwise(judge.features(source)),
        "seconds": seconds,
    }


def real_distances(run, judge, args) -> tuple[float, float]:
    """Mean feature distance between real val images of one identity, and of different identities."""
    from handforge.plugins.metrics.sources import fetch_samples

    samples = fetch_samples(run.recipe.data.build(split="val"), list(range(min(args.judge_val, 1000))))
    from handforge.imaging import to_uint8

    images = torch.from_numpy(to_uint8(samples["image"])).permute(0, 3, 1, 2)
    features, identity = judge.features(images), samples["identity"]
    d = torch.cdist(features, features)
    same = identity[:, None] == identity[None, :]
    off_diagonal = ~torch.eye(len(identity), dtype=torch.bool)
    return float(d[same & off_diagonal].mean()), float(d[~same].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True, help="folder for the judge, the real folders and the exports")
    parser.add_argument("--of", type=int, default=16, help="individuals K (default 16)")
    parser.add_argument("--variations", type=int, default=8, help="variations N per individual (default 8)")
    parser.add_argument("--strengths", default="0.25,0.5,1.0")
    parser.add_argument("--checkpoint", default="last")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--judge", help="an identity judge checkpoint to reuse (default: train one into --out)")
    parser.add_argument("--judge-num", type=int, default=4000)
    parser.add_argument("--judge-val", type=int, default=1000)
    parser.add_argument("--judge-epochs", type=int, default=10)
    parser.add_argument("--judge-width", type=int, default=32)
    parser.add_argument("--judge-size", type=int, help="judge input px (default: the run's image size)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from handforge.plugins.metrics.judge_classifier import JudgeClassifier
    from handforge.runs import load_run

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = load_run(args.run_dir, split="train", checkpoint=args.checkpoint)
    if "identity" not in run.dataset[0]:
        sys.exit(f"{args.run_dir}: its dataset '{run.recipe.data.name}' has no identity field to judge by")
    judge_path, report = fit_judge(run, out, args)
    judge = JudgeClassifier.load(judge_path)
    if any(not name.startswith("identity_") for name in judge.class_names):
        sys.exit(f"{judge_path}: not an identity judge (classes {judge.class_names[:3]} ...)")
    rows = [measure(run, judge, out, float(s), args) for s in args.strengths.split(",")]
    real_same, real_other = real_distances(run, judge, args)
    identities = len(judge.class_names)
    print(f"\nrun {args.run_dir} ({run.recipe.task.name}), {args.of} individuals x {args.variations} variations; "
          f"judge: {identities} identities, chance {1 / identities:.3f}; {report.strip()}")
    print("| strength | same identity | other's identity | within (feature dist.) | between sources | export s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strength']} | {r['same']:.3f} | {r['other']:.3f} | {r['within']:.3f} | {r['between']:.3f} "
              f"| {r['seconds']:.1f} |")
    print(f"| real val images | | | {real_same:.3f} (same identity) | {real_other:.3f} (different) | |")
    (out / "variations_identity.json").write_text(json.dumps(
        {"rows": rows, "real_same": real_same, "real_other": real_other, "identities": identities,
         "judge_report": report}, indent=1))


if __name__ == "__main__":
    main()
