"""Images per second of the procedural_hands renderer against a per-image Pillow renderer and
against what the quickstart GAN consumes, as a markdown table.

    python bench/procedural_hands.py [--size 64 128 224] [--batch 64] [--batches N] [--threads 2] [--json]
                                     [--save DIR]

What each column includes (every batch has fresh indices; one warm-up batch per size first):

- ours: ``ProceduralHands(size=S).__getitems__(indices)``, everything: sampling, kinematics,
  scene, rasterisation, the output dict. torch runs on --threads threads (default 2).
  "mean" is batches over total time; "best" is the fastest batch (on a shared machine, the
  cost without contention).
- pillow: bench/_pillow_hands.py drawing the same samples, one image at a time with
  PIL.ImageDraw (background, forearm and sleeve, palm, finger capsules far to near, flat
  shading, 2x supersampled, BOX-downsampled, to a (3, H, W) tensor in [-1, 1]). Only the
  drawing is timed (mean over batches): its geometry is the dataset's own (``sample_params``,
  ``kin.anatomical_to_pose``, ``kin.forward_kinematics``, ``scene.build``), computed once per
  batch and shared. Pillow draws on one core whatever --threads is.
- ours/pillow ratio: ours' mean images/s over Pillow's drawing-only images/s (so it favours
  Pillow by the geometry, which ours' figure includes).
- geometry share: the time of that shared geometry over ours' mean batch time, i.e. the part
  of "ours" that is not rasterisation (it includes keypoint visibility). A complete Pillow pipeline would pay it as well:
  its images/s would be batch / (geometry + drawing), reported as "pillow_with_geometry" in --json.
- quickstart GAN: one ``gan`` train_step of recipes/quickstart.toml (deep_conv G/D ch=32,
  z_dim=64, cbn + projection, hinge, Adam betas (0, 0.99), EMA, batch 64, 32 px) on --threads
  threads; images consumed per second = batch / step time. Ours at 32 px over that is the
  head-room of the data pipeline (measured at 32 px even when 32 is not in --size).

With --save DIR, writes DIR/procedural_hands_<S>px.png: the first 8 samples of each size,
ours in the top row and Pillow's below.
"""
import argparse
import json
import os
import statistics
import sys
import time
import types

import accelerate
import torch

from handforge.plugins.backbones.deep_conv import DeepConvConfig, build_deep_conv
from handforge.plugins.conditioners.label import ClassBatchNorm, Projection
from handforge.plugins.datasets import procedural_hands as ph
from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig
from handforge.plugins.losses.adversarial import Hinge
from handforge.plugins.tasks.gan import GanConfig, GanTask
from handforge.task import RunContext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _pillow_hands  # noqa: E402
from gan_step import component  # noqa: E402  (its make_task has no z_dim: the task is built here)

GOAL_64PX, GOAL_GAN_RATIO = 5000.0, 10.0


def geometry(dataset: ProceduralHands, indices):
    """The shared geometry: the dataset's own steps up to the scene (as in its ``render``)."""
    p = dataset.sample_params(indices)
    hand_pose = ph.kin.anatomical_to_pose(p["angles"])
    joints, frames = ph.kin.forward_kinematics(hand_pose, dataset.rest_skeletons(p))
    scene, _, _, _ = ph.scene.build(p, joints, frames, dataset.image_size)
    return scene, p["handedness"]


def check(images: torch.Tensor, batch: int, size: int) -> None:
    assert images.shape == (batch, 3, size, size) and images.dtype == torch.float32, images.shape
    assert images.min() >= -1.0 and images.max() <= 1.0, (images.min(), images.max())


def measure(size: int, batch: int, batches: int, pillow: bool = True, save: str | None = None) -> dict:
    """Mean/best images/s of ours, Pillow drawing and the shared geometry, on the same batches."""
    dataset = ProceduralHands(ProceduralHandsConfig(size=size, length=batch * (batches + 1)))
    ours, geo, draw = [], [], []
    for i in range(batches + 1):  # batch 0 warms up
        indices = list(range(i * batch, (i + 1) * batch))
        start = time.perf_counter()
        out = dataset.__getitems__(indices)["image"]
        ours.append(time.perf_counter() - start)
        if not pillow:
            continue
        start = time.perf_counter()
        scene, handedness = geometry(dataset, indices)
        geo.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = _pillow_hands.render(scene, handedness, size)
        draw.append(time.perf_counter() - start)
        if i == 0:
            check(out, batch, size)
            check(theirs, batch, size)
            if save:
                from handforge.imaging import save_grid
                n = min(8, batch)
                path = save_grid(os.path.join(save, f"procedural_hands_{size}px.png"),
                                 torch.cat([out[:n], theirs[:n]]), nrow=n)
                print(f"wrote {path}", file=sys.stderr)
    rate = lambda times: batch * len(times) / sum(times)  # noqa: E731
    result = {"size": size, "ours_mean": rate(ours[1:]), "ours_best": batch / min(ours[1:])}
    if pillow:
        geo_s, draw_s = sum(geo[1:]) / batches, sum(draw[1:]) / batches
        result.update(pillow=batch / draw_s, pillow_with_geometry=batch / (geo_s + draw_s),
                      geometry_ms=geo_s * 1000, geometry_share=geo_s / (sum(ours[1:]) / batches))
        result["ratio"] = result["ours_mean"] / result["pillow"]
    return result


def gan_consumption(batch: int, steps: int) -> dict:
    """Images/s the quickstart recipe's train_step consumes (mean and best of ``steps`` steps)."""
    torch.manual_seed(0)
    data = ProceduralHands(ProceduralHandsConfig(size=32, length=batch))
    components = {
        "generator": component("backbone", "deep_conv", build_deep_conv, DeepConvConfig(ch=32, z_dim=64)),
        "discriminator": component("backbone", "deep_conv", build_deep_conv, DeepConvConfig(ch=32)),
        "g_conditioner": component("conditioner", "cbn", ClassBatchNorm),
        "d_conditioner": component("conditioner", "projection", Projection),
        "loss": component("loss", "hinge", Hinge),
    }
    run = RunContext(recipe=types.SimpleNamespace(seed=0), accelerator=accelerate.Accelerator(cpu=True),
                     run_dir=None, dataset=data, components=components)
    task = GanTask(GanConfig(g_lr=2e-4, d_lr=2e-4, betas=(0.0, 0.99), ema_decay=0.999, sample_count=64))
    task.setup(run)
    real = data.__getitems__(list(range(batch)))
    real = {"image": real["image"], "label": real["label"]}
    times = []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        task.train_step(real, step)
        times.append(time.perf_counter() - start)
    times = times[2:]
    return {"batch": batch, "step_ms_median": statistics.median(times) * 1000,
            "gan_mean": batch * len(times) / sum(times), "gan_best": batch / min(times)}


def goals(rows: list[dict], ours32: dict, gan: dict) -> dict:
    """The issue's goals, judged on best batches (the cost without contention)."""
    at64 = next((r for r in rows if r["size"] == 64), None)
    ratio = ours32["ours_best"] / gan["gan_best"]
    return {
        "ours_64px_img_s": {"what": "ours img/s at 64 px (best batch)", "goal": GOAL_64PX,
                            "value": None if at64 is None else round(at64["ours_best"]),
                            "met": None if at64 is None else at64["ours_best"] >= GOAL_64PX},
        "ours_32px_over_gan": {"what": "ours at 32 px over the quickstart GAN's consumption (best/best)",
                               "goal": GOAL_GAN_RATIO, "value": round(ratio, 1), "met": ratio >= GOAL_GAN_RATIO},
    }


def report(rows: list[dict], ours32: dict, gan: dict, args) -> str:
    lines = [f"procedural_hands, batches of {args.batch}, {args.batches} timed batches, "
             f"{args.threads} torch threads, torch {torch.__version__}", "",
             "| size | ours img/s (mean) | ours img/s (best) | pillow img/s | ours/pillow ratio | geometry share |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['ours_mean']:,.0f} | {r['ours_best']:,.0f} | {r['pillow']:,.0f} "
                     f"| {r['ratio']:.1f}x | {r['geometry_share']:.0%} |")
    lines += ["", f"quickstart GAN (gan, deep_conv ch=32 z_dim=64, cbn + projection, hinge, batch {gan['batch']}, "
                  f"32 px): {gan['step_ms_median']:.0f} ms/step median, consumes {gan['gan_mean']:,.0f} img/s mean "
                  f"({gan['gan_best']:,.0f} best); ours at 32 px: {ours32['ours_mean']:,.0f} img/s mean "
                  f"({ours32['ours_best']:,.0f} best) = {ours32['ours_mean'] / gan['gan_mean']:.1f}x its consumption "
                  f"(best/best {ours32['ours_best'] / gan['gan_best']:.1f}x)", ""]
    for goal in goals(rows, ours32, gan).values():
        verdict = "not measured" if goal["met"] is None else "met" if goal["met"] else "NOT met"
        value = "-" if goal["value"] is None else goal["value"]
        lines.append(f"goal: {goal['what']}, {args.threads} threads: {value} "
                     f"(goal >= {goal['goal']:,g}): {verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[64, 128, 224],
                        help="image sides (16 to 256; 32 is the quickstart's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=16, help="timed batches per size (after one warm-up)")
    parser.add_argument("--gan-steps", type=int, default=10, help="timed quickstart train steps (after two warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    parser.add_argument("--save", metavar="DIR", help="write ours-vs-pillow PNGs of the first 8 samples here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [measure(size, args.batch, args.batches, save=args.save) for size in args.size]
    ours32 = next((r for r in rows if r["size"] == 32), None) or measure(32, args.batch, args.batches, pillow=False)
    gan = gan_consumption(64, args.gan_steps)  # the recipe's batch_size, whatever --batch is
    if args.json:
        ratio = {"mean": ours32["ours_mean"] / gan["gan_mean"], "best": ours32["ours_best"] / gan["gan_best"]}
        print(json.dumps({"batch": args.batch, "batches": args.batches, "threads": args.threads,
                          "torch": torch.__version__, "sizes": rows, "ours_32px": ours32, "quickstart_gan": gan,
                          "ours_32px_over_gan": ratio,
                          "goals": goals(rows, ours32, gan)}, indent=1))
    else:
        print(report(rows, ours32, gan, args))


if __name__ == "__main__":
    main()
