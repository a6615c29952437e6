"""Pose-transfer training throughput: the seed's plain U-Net + PatchGAN beside handforge's full model
(pose re-injection through SPADE, hand-weighted L1), at 64 px on procedural pairs and at 256 px on a
SynthSL-layout shard set, and whether the 256 px step ever waits on the shards.

    python bench/pose_transfer.py [--steps 8] [--frames 96] [--threads 2] [--json]

Each row is a real ``handforge run`` of a shipped recipe (``pose_transfer_hands`` at 64 px, batch 16;
``pose_transfer_synthsl`` at 256 px, batch 8), ``--steps`` steps; img/s is the loop's own
``samples_per_s`` averaged over the logged steps after the first (data loading included: it is what
a user gets). "plain" is ``model.generator.reinject=false task.hand_weight=0`` (the seed's network:
the target pose at the input only, L1 everywhere alike); "full" is the recipe as shipped.

Data: the ``synthsl`` dataset reading the same shard set map-style, frames/s decoded (target,
reference, both keypoint sets) on one process; the ratio to the 256 px step's img/s says how many
times faster the data comes than the step takes it (>1: the step never waits, even with no
DataLoader workers). The reading itself is compared with the seed's tarfile + pickle loop in
``bench/pose_transfer_data.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from pose_transfer_data import write_synthsl  # noqa: E402

PLAIN = ["model.generator.reinject=false", "task.hand_weight=0"]


def run_steps(recipe: str, out: pathlib.Path, steps: int, threads: int, extra: list[str]) -> float:
    """Mean samples/s over the logged steps after the first, from the run's metrics.jsonl."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, str(REPO / "run.py"), "run", str(REPO / "recipes" / recipe), f"output_dir={out}",
               f"train.steps={steps}", "train.log_every=1", f"train.sample_every={10 * steps}",
               f"train.checkpoint_every={10 * steps}", "train.progress=false", "eval.metrics=[]", *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{recipe}: {result.stderr[-2000:]}")
    metrics = next(out.glob("*/metrics.jsonl"))
    speeds = [json.loads(line)["samples_per_s"] for line in metrics.read_text().splitlines()
              if '"train"' in line][1:]
    return sum(speeds) / len(speeds)


def reading_speed(root: pathlib.Path, frames: int) -> float:
    from handforge.plugins.datasets.tar_shards.dataset import SynthSLPairs, TarPairsConfig

    data = SynthSLPairs(TarPairsConfig(root=str(root), size=256))
    count = min(frames, len(data))
    start = time.perf_counter()
    for i in range(count):
        data[i]
    return count / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--frames", type=int, default=96, help="frames in the 256 px shard set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        shards = tmp / "synthsl"
        write_synthsl(shards, args.frames, 256)
        for size, recipe, extra in ((64, "pose_transfer_hands.toml", []),
                                    (256, "pose_transfer_synthsl.toml", [f"data.root={shards}"])):
            # interleaved, so a busy machine slows both alike
            plain = run_steps(recipe, tmp / f"plain{size}", args.steps, args.threads, extra + PLAIN)
            full = run_steps(recipe, tmp / f"full{size}", args.steps, args.threads, extra)
            rows.append({"size": size, "plain_img_s": plain, "full_img_s": full})
        reading = reading_speed(shards, args.frames)
    step_256 = rows[-1]["full_img_s"]
    if args.json:
        print(json.dumps({"rows": rows, "reading_frames_s": reading, "reading_over_step": reading / step_256}))
        return
    print(f"pose_transfer training, {args.steps} steps per row, {args.threads} threads, data loading included")
    print("| size | batch | plain U-Net + PatchGAN img/s | full (re-injection + hand L1) img/s | full / plain |")
    print("|---|---|---|---|---|")
    for r, batch in zip(rows, (16, 8)):
        print(f"| {r['size']} px | {batch} | {r['plain_img_s']:.2f} | {r['full_img_s']:.2f} | "
              f"{r['full_img_s'] / r['plain_img_s']:.2f} |")
    print(f"\nshard reading (synthsl, map-style, one process): {reading:.1f} frames/s = "
          f"{reading / step_256:.1f}x the 256 px full step's {step_256:.2f} img/s")


if __name__ == "__main__":
    main()
