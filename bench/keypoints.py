"""Speed and accuracy of the keypoint backbones (simple_cnn, mobilelite, mobilelite_attn), as tables.

    python bench/keypoints.py [--backbones simple_cnn mobilelite mobilelite_attn] [--sizes 128 224]
                              [--batch-size 32] [--threads 2] [--rounds 5] [--warmup 1]
                              [--pck-steps 300] [--pck-size 64] [--val-samples 500] [--json]

    python bench/keypoints.py --sizes 64 --rounds 1 --pck-steps 3 --threads 1   # a smoke test

Speed, per backbone and ``--sizes`` px, each network built through the backbone registry as the
``keypoints`` task builds it (regression head, default config: mobilelite_attn without its
optional global attention), in channels_last, on a fixed random batch of ``--batch-size``:

- params; MFLOPs per image: ``flops_per_image`` (2 x the multiply-accumulates of the convolutions
  and linear layers of one forward pass, norms and activations left out, as papers count);
- inference img/s: ``eval()``, ``no_grad``, one batch per round;
- training img/s: one step per round as the task's ``train_step`` does it, without Accelerate and
  augmentation: forward, L1 on the coordinates of the visible joints (``masked_l1``), backward,
  AdamW (lr 3e-4, wd 1e-4) step, gradients set to None;
- achieved training GFLOP/s, by the usual estimate that a training step costs 3 x the forward
  FLOPs (backward = 2 x forward: gradients of activations and of weights), and its ratio to this
  machine's fp32 matmul rate measured at the start of the same run (bench/_flops.py: 2048 x 2048
  ``torch.mm`` on ``--threads`` threads, best of 10): the reference column.

Each figure is the median over ``--rounds`` rounds, after ``--warmup`` untimed ones (the first
call picks oneDNN kernels and, for training, creates AdamW's state).

Accuracy (``--pck-steps`` > 0): each backbone trains through the real pipeline
(``handforge.loop.Trainer``) on ``recipes/keypoints_mobilelite.toml`` as shipped (procedural_hands,
hand_size [0.45, 0.7], keypoint_affine, AdamW 3e-4 wd 1e-4, cosine, batch 32, seed 0) at
``--pck-size`` px (64, as the recipe), with these changes: ``train.steps = --pck-steps`` for every
row (the same budget), the recipe's linear warm-up scaled by the same factor (100 of 1500 steps ->
20 of 300), ``task.val_samples = --val-samples``, no evaluation, sample grid or checkpoint before
the last step. Plus a row for mobilelite with ``head = "heatmap"`` (soft-argmax decoding). The
table gives the val PCK@0.05, PCK@0.2bbox, AUC@30px and EPE (px) of the last weights, from the
run's ``"type": "final"`` record in metrics.jsonl, the loop's training img/s (its last ``train``
record's ``samples_per_s``: procedural rendering, augmentation and the steps) and the run's wall
seconds (set-up, rendering the val images and the final evaluations of the last and the best
weights included). Runs go in a temporary folder, deleted after.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

from handforge.data import N_KEYPOINTS
from handforge.plugins.backbones.keypoint_nets import BODY_STRIDE, flops_per_image
from handforge.plugins.tasks.keypoints import masked_l1
from handforge.recipe import read_toml, resolve, resolve_component

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _flops import matmul_rate  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "keypoints_mobilelite.toml"
BACKBONES = ("simple_cnn", "mobilelite", "mobilelite_attn")
HEATMAP_ROW = "mobilelite"  # the backbone that also gets a heatmap-head row in the accuracy table
LR, WEIGHT_DECAY = 3e-4, 1e-4  # the task's AdamW defaults, as the recipe sets them
TRAIN_FLOPS_FACTOR = 3  # forward + backward (~2 x forward) per image: the usual estimate
ACCURACY_KEYS = ("pck@0.05", "pck@0.2bbox", "auc@30px", "epe_px")


# -- speed ------------------------------------------------------------------------------------------


def build_regressor(name: str, size: int, head: str = "regression") -> torch.nn.Module:
    """The backbone as the keypoints task builds it: through the registry, default config, channels_last."""
    component = resolve_component({"name": name}, "backbone", "model.regressor")
    model = component.build(role="keypoints", image_size=size, num_keypoints=N_KEYPOINTS, head=head)
    return model.to(memory_format=torch.channels_last)


def fixed_batch(batch_size: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [-1, 1] (channels_last) and (N, 21, 3) keypoints with ~10% of the joints
    hidden, so the loss's mask does its real work. Speed does not depend on what the pixels show."""
    generator = torch.Generator().manual_seed(size)
    images = (torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1)
    coords = torch.rand(batch_size, N_KEYPOINTS, 2, generator=generator) * 0.8 + 0.1
    visible = (torch.rand(batch_size, N_KEYPOINTS, 1, generator=generator) > 0.1).float()
    return images.contiguous(memory_format=torch.channels_last), torch.cat([coords, visible], -1)


def median_seconds(fn, rounds: int, warmup: int) -> tuple[float, list[float]]:
    """(median, all) wall seconds of ``fn()`` over ``rounds`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def training_step(model: torch.nn.Module, opt: torch.optim.Optimizer, images, keypoints):
    """What KeypointsTask.train_step does to one batch, less Accelerate, augmentation and the schedule."""
    model.train()
    out = model(images.contiguous(memory_format=torch.channels_last))
    loss = masked_l1(out["coords"].float(), keypoints[..., :2].float(), keypoints[..., 2] > 0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def speed_row(name: str, size: int, batch_size: int, rounds: int, warmup: int, matmul_gflops: float) -> dict:
    torch.manual_seed(0)
    model = build_regressor(name, size)
    images, keypoints = fixed_batch(batch_size, size)
    flops = flops_per_image(model, size)

    model.eval()
    with torch.no_grad():
        infer_s, infer_times = median_seconds(lambda: model(images), rounds, warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    train_s, train_times = median_seconds(lambda: training_step(model, opt, images, keypoints), rounds, warmup)

    train_img_s = batch_size / train_s
    train_gflops = TRAIN_FLOPS_FACTOR * flops * train_img_s / 1e9
    return {"backbone": name, "size": size, "batch_size": batch_size,
            "params": sum(p.numel() for p in model.parameters()), "mflops_per_image": flops / 1e6,
            "inference_img_s": batch_size / infer_s, "train_img_s": train_img_s,
            "train_gflops": train_gflops, "train_matmul_fraction": train_gflops / matmul_gflops,
            "inference_ms": [t * 1000 for t in infer_times], "train_ms": [t * 1000 for t in train_times]}


# -- accuracy ---------------------------------------------------------------------------------------


def scaled_warmup(recipe_warmup: int, recipe_steps: int, steps: int) -> int:
    """The recipe's warm-up length at the same fraction of a ``steps``-step run."""
    return round(recipe_warmup * steps / recipe_steps)


def accuracy_recipe(base: dict, backbone: str, head: str, steps: int, size: int, val_samples: int,
                    output_dir: pathlib.Path) -> dict:
    """The shipped keypoints recipe (``base``, a dict read from its TOML) for one accuracy row."""
    raw = json.loads(json.dumps(base))  # a deep copy: the base serves every row
    raw["name"] = f"bench_{backbone}_{head}"
    raw["output_dir"] = str(output_dir)
    task, train = raw.setdefault("task", {}), raw.setdefault("train", {})
    task["head"] = head
    task["val_samples"] = val_samples
    task["warmup_steps"] = scaled_warmup(task.get("warmup_steps", 0), train.get("steps", steps), steps)
    raw["data"]["size"] = size
    raw["model"]["regressor"] = {"name": backbone}  # default config: options of another backbone would not fit
    train.update(steps=steps, progress=False, tensorboard=False, sample_every=0, checkpoint_every=0)
    raw.setdefault("eval", {})["every"] = 0  # the loop still evaluates at the last step
    return raw


def last_record(metrics_file: pathlib.Path, kind: str) -> dict:
    """The last ``"type": kind`` record of a run's metrics.jsonl."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    found = [r for r in records if r.get("type") == kind]
    if not found:
        raise RuntimeError(f"{metrics_file} holds no {kind!r} record")
    return found[-1]


def accuracy_row(base: dict, backbone: str, head: str, args, root: pathlib.Path) -> dict:
    from handforge.loop import Trainer
    from handforge.plugin_manager import get_host

    host = get_host()
    recipe = resolve(accuracy_recipe(base, backbone, head, args.pck_steps, args.pck_size, args.val_samples, root),
                     source=RECIPE, host=host)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the run's own prints stay out of the tables / JSON
        run = Trainer(recipe, host).run()
    seconds = time.perf_counter() - start
    metrics = run.run_dir / "metrics.jsonl"
    final = last_record(metrics, "final")
    return {"backbone": backbone, "head": head, "steps": args.pck_steps, "size": args.pck_size,
            **{k: final[k] for k in ACCURACY_KEYS}, "wall_s": seconds,
            "run_img_s": last_record(metrics, "train")["samples_per_s"]}


def accuracy_rows(args) -> list[dict]:
    base = read_toml(RECIPE)
    runs = [(b, "regression") for b in args.backbones]
    if HEATMAP_ROW in args.backbones:
        runs.append((HEATMAP_ROW, "heatmap"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone, head in runs:
            print(f"... training {backbone} ({head}) for {args.pck_steps} steps", file=sys.stderr, flush=True)
            rows.append(accuracy_row(base, backbone, head, args, pathlib.Path(tmp)))
    return rows


# -- report -----------------------------------------------------------------------------------------


def report(speed: list[dict], accuracy: list[dict], mm: dict, args) -> str:
    lines = [f"Keypoint backbones: batch {args.batch_size}, {args.threads} threads, channels_last, "
             f"torch {torch.__version__}; median of {args.rounds} rounds after {args.warmup} warm-up. "
             f"fp32 matmul rate {mm['gflops_best']:.0f} GFLOP/s ({mm['n']}x{mm['n']} torch.mm, best of "
             f"{mm['reps']}; median {mm['gflops_median']:.0f}).", "",
             "| backbone | size | params | MFLOPs/img | inference img/s | training img/s "
             "| training GFLOP/s (3x fwd) | % of matmul rate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['backbone']} | {r['size']} | {r['params']:,} | {r['mflops_per_image']:.1f} "
              f"| {r['inference_img_s']:.1f} | {r['train_img_s']:.1f} | {r['train_gflops']:.2f} "
              f"| {100 * r['train_matmul_fraction']:.1f}% |" for r in speed]
    lines += ["", "Training GFLOP/s: 3 x the forward FLOPs per image (backward ~ 2 x forward) x training "
              "img/s; an estimate, elementwise work not counted."]
    if accuracy:
        first = accuracy[0]
        lines += ["", f"Accuracy after {first['steps']} steps (batch 32) on procedural_hands at {first['size']} px, "
                  f"recipes/keypoints_mobilelite.toml; val ({args.val_samples} images), last weights:", "",
                  "| backbone | head | PCK@0.05 | PCK@0.2bbox | AUC@30px | EPE (px) | training img/s | wall s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['backbone']} | {r['head']} | {r['pck@0.05']:.3f} | {r['pck@0.2bbox']:.3f} "
                  f"| {r['auc@30px']:.3f} | {r['epe_px']:.2f} | {r['run_img_s']:.1f} | {r['wall_s']:.1f} |"
                  for r in accuracy]
        lines += ["", "training img/s: the loop's own figure (metrics.jsonl, last train record): rendering, "
                  "augmentation and the steps. wall s: the whole run, set-up and the final evaluations "
                  "(last and best weights) included."]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224],
                        help=f"image sizes of the speed table (multiples of {BODY_STRIDE})")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (also for the matmul rate)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per figure (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    parser.add_argument("--pck-steps", dest="pck_steps", type=int, default=300,
                        help="training steps of each accuracy run; 0 skips the accuracy table")
    parser.add_argument("--pck-size", dest="pck_size", type=int, default=64, help="image size of the accuracy runs")
    parser.add_argument("--val-samples", dest="val_samples", type=int, default=500,
                        help="val images the accuracy runs are scored on")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    for size in args.sizes + ([args.pck_size] if args.pck_steps else []):
        if size < BODY_STRIDE or size % BODY_STRIDE:
            parser.error(f"image size {size}: the backbones need a multiple of {BODY_STRIDE}")
    for option in ("batch_size", "threads", "rounds", "val_samples"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.pck_steps < 0:
        parser.error("--warmup and --pck-steps must be >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    mm = matmul_rate(args.threads)
    speed = []
    for name in args.backbones:
        for size in args.sizes:
            print(f"... {name} at {size} px", file=sys.stderr, flush=True)
            speed.append(speed_row(name, size, args.batch_size, args.rounds, args.warmup, mm["gflops_best"]))
    accuracy = accuracy_rows(args) if args.pck_steps else []
    if args.json:
        print(json.dumps({"threads": args.threads, "batch_size": args.batch_size, "rounds": args.rounds,
                          "warmup": args.warmup, "torch": torch.__version__, "matmul": mm,
                          "train_flops_factor": TRAIN_FLOPS_FACTOR, "speed": speed,
                          "accuracy": accuracy, "val_samples": args.val_samples}, indent=1))
    else:
        print(report(speed, accuracy, mm, args))


if __name__ == "__main__":
    main()
