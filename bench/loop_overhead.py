"""Per-step cost of handforge's run loop against a bare PyTorch loop doing the same training.

    python bench/loop_overhead.py [--steps 200] [--warmup 20] [--batch-size 64] [--rounds 3]
                                  [--log-every 10] [--width 32] [--threads 2] [--no-paired]
                                  [--data auto|procedural_hands|procedural_hands_live|random]
                                  [--malloc-default] [--json]

Both loops train the same small CNN (bench/_overhead_plugin.py: ``SmallCNN``, Adam,
cross-entropy) from the same seed on the same dataset, batch size, sampler order and collate,
in this one process (the losses are checked to be identical, step by step).
The data is ``procedural_hands`` (32 px): by default its first 2048 samples, rendered once and
then served from memory, so that the renderer's cost (identical in both loops, but large and
variable) does not dilute the loop's; ``--data procedural_hands_live`` renders every batch.

- bare PyTorch: a torch DataLoader (``handforge.data.build_loader``) and a plain ``for`` loop:
  forward, loss, backward, step, zero_grad. No Accelerate.
- handforge: a real run, ``Trainer(resolve(recipe), host).run()``, of the task
  ``bench_classifier`` (the same step under ``accelerator.accumulate``/``backward``) with the
  loop's per-step work on: ``on_step_end`` hooks, the finite-loss check, logging to
  metrics.jsonl and TensorBoard every ``--log-every`` steps, the tqdm bar (stderr), batch
  streaming; one checkpoint, at the end.

Each loop takes a ``perf_counter`` stamp after every step (handforge: from the plugin's
``on_step_end`` hook). Steps (warmup, warmup + steps] are timed, in blocks of ``log_every``
steps (each block holds exactly one logging event); setup, warm-up and the final checkpoint
are not. Two designs:

- rounds: whole runs, alternately bare, handforge, bare, ... (``--rounds`` of each). Unbiased,
  but on a shared machine a burst of load can cover a whole run.
- paired (skip with ``--no-paired``): one handforge run of ``rounds * steps`` measured steps
  whose ``on_step_end`` hook lets the bare loop take ``log_every`` steps at the start of each
  of its blocks; the bare time is taken out of that block. Bare block k and handforge block k
  are back to back, so both see the same load; but a cost that the handforge run imposes on
  the whole process (a background thread) would slow the bare blocks too and go unseen.

Per design and loop the table gives the median over blocks (ms/step), steps/s, the ratio to
bare, and the blocks' 10th percentile (the least disturbed by other processes) with its ratio;
then, for the rounds, the split of a step's wall time into "in the step" (batch in hand ->
step done; for handforge from ``train_step`` entry to ``on_step_end``) and "between steps"
(fetching the next batch and, for handforge, the loop's bookkeeping: tqdm, logging,
schedules), and each round's mean. The goal is a ratio <= 1.05.

Both loops run with glibc told to keep freed memory (``steady_malloc``; ``--malloc-default``
to skip): otherwise the page faults a step pays vary by 0-3000 with the process's history,
which moves a loop's time by up to half, whichever loop it is.
"""
import argparse
import ctypes
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from handforge.data import build_loader
from handforge.loop import Trainer
from handforge.plugin_manager import PluginHost
from handforge.recipe import resolve

PLUGIN = pathlib.Path(__file__).resolve().parent / "_overhead_plugin.py"
GOAL = 1.05
SEED = 0


def make_host(data: str):
    """Built-ins + the bench plugin file; returns (host, plugin module, dataset table, note)."""
    host, note = PluginHost(), ""
    try:
        host.load_builtins()
    except Exception as exc:  # noqa: BLE001 - a built-in under construction must not stop the bench
        host = PluginHost()
        note = f"built-in plugins failed to load ({type(exc).__name__}: {exc}); ran without them"
    info = host.load_file(PLUGIN)
    module = host.pm.get_plugin(info.name)
    available = "procedural_hands" in host.registry("dataset")
    if data.startswith("procedural_hands") and not available:
        sys.exit("dataset 'procedural_hands' is not registered (see `handforge list dataset`)")
    if data == "procedural_hands_live":
        table = {"name": "procedural_hands", "size": 32}
    elif data == "procedural_hands" or (data == "auto" and available):
        table = {"name": "bench_cached", "source": "procedural_hands", "size": 32, "length": 2048}
    else:
        table = {"name": "bench_random_images", "size": 32, "length": 2048}
        if data == "auto":
            note = "; ".join(filter(None, [note, "procedural_hands is not available: random in-memory "
                                                 "images + labels (bench_random_images) used instead"]))
    return host, module, table, note


def steady_malloc() -> str:
    """Keep freed memory in the heap (glibc): a 32 MiB mmap threshold and no trimming. By default
    glibc returns large freed blocks (activations) to the OS, and how often depends on the
    process's history, so a loop can pay from 0 to 3000 page faults a step (0 to +50%) by luck;
    both loops run under the same settings. Returns a description for the report."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 32 << 20) == 1 and libc.mallopt(-1, 1 << 30) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        ok = False
    return "glibc mmap threshold 32 MiB, no trim" if ok else "allocator defaults (not glibc)"


def recipe_dict(args, data_table, output_dir, name):
    return {
        "name": name, "seed": SEED, "output_dir": str(output_dir), "plugins": [str(PLUGIN)],
        "task": {"name": "bench_classifier", "width": args.width},
        "data": dict(data_table),
        "train": {"steps": args.warmup + args.steps, "batch_size": args.batch_size, "num_workers": 0,
                  "log_every": args.log_every, "sample_every": 0, "checkpoint_every": 0,
                  "progress": True, "tensorboard": True},
    }


def reset_accelerate():
    """Forget the previous run's Accelerator singletons (as the tests do between runs)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def measured(clock, warmup, steps, block) -> dict:
    """Seconds per step over steps (warmup, warmup + steps], from the per-step stamps: the mean
    over the whole span, the mean of each consecutive ``block`` of steps in it, and each block's
    mean time inside the steps (start to end stamp) and between them
    (end to the next start: fetching the batch and, for handforge, the loop's bookkeeping)."""
    if len(clock.stamps) < warmup + steps or len(clock.starts) < warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} step stamps, got {len(clock.stamps)}")
    ends = clock.stamps[warmup - 1: warmup + steps]
    starts = clock.starts[warmup: warmup + steps]
    inside = [e - s for s, e in zip(starts, ends[1:])]
    between = [s - e for e, s in zip(ends, starts)]
    cuts = range(0, steps - block + 1, block)
    return {"mean": (ends[-1] - ends[0]) / steps,
            "blocks": [(ends[i + block] - ends[i]) / block for i in cuts],
            "inside": [sum(inside[i:i + block]) / block for i in cuts],
            "between": [sum(between[i:i + block]) / block for i in cuts]}


def run_handforge(args, host, module, data_table, output_dir, name, steps=None, partner=None):
    """One real run of ``warmup + steps`` steps; ``partner(step)`` is called from ``on_step_end``."""
    steps = steps or args.steps
    reset_accelerate()
    torch.set_num_threads(args.threads)
    raw = recipe_dict(args, data_table, output_dir, name)
    raw["train"]["steps"] = args.warmup + steps
    recipe = resolve(raw, host=host)
    module.CLOCK.reset()
    module.PARTNER = partner
    try:
        run = Trainer(recipe, host).run()
    finally:
        module.PARTNER = None
    losses = torch.stack(module.CLOCK.losses)
    params = sum(p.numel() for p in run.task.export_modules()["net"].parameters())
    return module.CLOCK, losses, params


class BareLoop:
    """The same training as a plain PyTorch loop, no Accelerate; setup mirrors the Trainer's
    seeding order. ``run(n)`` takes the next ``n`` steps of one endless ``for`` loop."""

    def __init__(self, args, host, module, data_table, output_dir):
        torch.set_num_threads(args.threads)
        recipe = resolve(recipe_dict(args, data_table, output_dir, "bare"), host=host)  # same dataset config
        torch.manual_seed(SEED)
        self.dataset = recipe.data.build(split="train")
        self.dataset[0]
        self.net = module.SmallCNN(len(self.dataset.class_names), args.width)
        self.opt = module.make_optimizer(self.net, recipe.task.config.lr)
        self.loader = build_loader(self.dataset, args.batch_size, SEED, num_workers=0)
        self.clock = module.StepClock()
        self._steps = self._loop()

    def _loop(self):
        net, opt, loader, clock = self.net, self.opt, self.loader, self.clock
        epoch = 0
        while True:
            loader.sampler.set_position(epoch)  # the same batch order as the Trainer's stream
            for batch in loader:
                clock.begin()
                logits = net(batch["image"])
                loss = F.cross_entropy(logits, batch["label"])
                loss.backward()
                opt.step()
                opt.zero_grad()
                clock.tick(loss.detach())
                yield
            epoch += 1

    def run(self, n: int) -> None:
        for _ in range(n):
            next(self._steps)


def run_rounds(args, host, module, data_table, tmp):
    """Design 1: whole runs, alternately bare, handforge, bare, ... (``--rounds`` of each)."""
    loops, max_loss_diff, params = {"bare PyTorch": [], "handforge": []}, 0.0, None
    for r in range(args.rounds):
        bare = BareLoop(args, host, module, data_table, tmp)
        bare.run(args.warmup + args.steps)
        loops["bare PyTorch"].append(measured(bare.clock, args.warmup, args.steps, args.log_every))
        clock, losses, params = run_handforge(args, host, module, data_table, tmp, f"round{r}")
        loops["handforge"].append(measured(clock, args.warmup, args.steps, args.log_every))
        bare_losses = torch.stack(bare.clock.losses)
        max_loss_diff = max(max_loss_diff, (bare_losses.float() - losses.float()).abs().max().item())
    return loops, max_loss_diff, params


def run_paired(args, host, module, data_table, tmp):
    """Design 2: one handforge run of ``rounds * steps`` measured steps that, from its
    ``on_step_end`` hook, hands the CPU to the bare loop for ``log_every`` steps at the start of
    each of its blocks of ``log_every`` steps: handforge block k and bare block k run back to
    back (about 0.1-1 s apart), so both see the same load. The bare loop's time is taken out of
    the handforge block that contains it."""
    block, total = args.log_every, args.rounds * args.steps
    n_blocks = total // block
    bare = BareLoop(args, host, module, data_table, tmp)
    bare.run(args.warmup)
    spans = []

    def partner(step):
        if step >= args.warmup and (step - args.warmup) % block == 0 and len(spans) < n_blocks:
            start = time.perf_counter()
            bare.run(block)
            spans.append((start, time.perf_counter()))

    clock, losses, params = run_handforge(args, host, module, data_table, tmp, "paired", steps=total,
                                          partner=partner)
    ends = clock.stamps[args.warmup - 1:]
    bare_ms = [(b - a) / block * 1e3 for a, b in spans]
    ours_ms = [((ends[(k + 1) * block] - ends[k * block]) - (b - a)) / block * 1e3
               for k, (a, b) in enumerate(spans)]
    bare_losses = torch.stack(bare.clock.losses)[:len(losses)]
    max_loss_diff = (bare_losses.float() - losses[:len(bare_losses)].float()).abs().max().item()
    return bare_ms, ours_ms, max_loss_diff


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="measured steps per round")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the measured ones (>= 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each loop, interleaved")
    parser.add_argument("--log-every", type=int, default=10, help="handforge train.log_every")
    parser.add_argument("--width", type=int, default=32, help="channels of the CNN's first layer")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both loops")
    parser.add_argument("--data", choices=("auto", "procedural_hands", "procedural_hands_live", "random"),
                        default="auto",
                        help="procedural_hands: 2048 samples rendered once, then served from memory; "
                             "procedural_hands_live: rendered batch by batch in both loops; random: "
                             "random in-memory images; auto (default): procedural_hands if registered, "
                             "else random")
    parser.add_argument("--no-paired", dest="paired", action="store_false",
                        help="skip design 2 (paired blocks); run only the alternating rounds")
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's malloc settings alone (page-fault noise stays in)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")
    malloc = "allocator defaults" if args.malloc_default else steady_malloc()

    host, module, data_table, note = make_host(args.data)
    load_before, started = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="handforge-overhead-") as tmp:
        loops, max_loss_diff, params = run_rounds(args, host, module, data_table, tmp)
        if args.paired:
            paired_bare, paired_ours, paired_diff = run_paired(args, host, module, data_table, tmp)
            max_loss_diff = max(max_loss_diff, paired_diff)
    elapsed, load_after = time.perf_counter() - started, os.getloadavg()[0]

    def quantile(values, q):
        values = sorted(values)
        return statistics.median(values) if q == 0.5 else values[int(q * (len(values) - 1))]

    # Per design and loop: the median over blocks of log_every steps (each block holds one
    # logging event), and their 10th percentile (the blocks least disturbed by other processes).
    rows = []
    for name, rounds in loops.items():
        blocks = [b * 1e3 for t in rounds for b in t["blocks"]]
        rows.append({"design": "rounds", "loop": name, "ms_per_step": quantile(blocks, 0.5),
                     "p10_ms_per_step": quantile(blocks, 0.1),
                     "in_step_ms": quantile([b * 1e3 for t in rounds for b in t["inside"]], 0.5),
                     "between_steps_ms": quantile([b * 1e3 for t in rounds for b in t["between"]], 0.5),
                     "round_means_ms": [t["mean"] * 1e3 for t in rounds]})
    if args.paired:
        for name, blocks in (("bare PyTorch", paired_bare), ("handforge", paired_ours)):
            rows.append({"design": "paired", "loop": name, "ms_per_step": quantile(blocks, 0.5),
                         "p10_ms_per_step": quantile(blocks, 0.1)})
    for row in rows:
        base = next(r for r in rows if r["design"] == row["design"] and r["loop"] == "bare PyTorch")
        row["steps_per_s"] = 1e3 / row["ms_per_step"]
        row["ratio"] = row["ms_per_step"] / base["ms_per_step"]
        row["p10_ratio"] = row["p10_ms_per_step"] / base["p10_ms_per_step"]
    ratios = {row["design"]: row["ratio"] for row in rows if row["loop"] == "handforge"}
    if args.paired:
        ratios["paired, median of block ratios"] = statistics.median(o / b for o, b in zip(paired_ours, paired_bare))
    busy = max(load_before, load_after) > os.cpu_count() + 0.5
    result = {
        "dataset": data_table, "note": note, "batch_size": args.batch_size, "steps": args.steps,
        "warmup": args.warmup, "rounds": args.rounds, "log_every": args.log_every, "threads": args.threads,
        "params": params, "torch": torch.__version__, "python": platform.python_version(),
        "malloc": malloc, "rows": rows, "ratios": ratios, "goal": GOAL, "goal_met": {k: v <= GOAL for k, v in ratios.items()},
        "max_abs_loss_difference": max_loss_diff, "load_average_1min": [load_before, load_after],
        "cpus": os.cpu_count(), "busy": busy, "total_s": elapsed,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return

    data_name = data_table["name"] + "".join(f", {k}={v}" for k, v in data_table.items() if k != "name")
    n_blocks = args.rounds * (args.steps // args.log_every)
    print(f"\nloop overhead: SmallCNN ({params:,} params), Adam, cross-entropy; data {data_name}; "
          f"batch {args.batch_size}; warm-up {args.warmup} steps; log_every {args.log_every}; "
          f"{args.threads} threads; {malloc}; torch {torch.__version__}")
    print(f"rounds: bare, handforge, ... alternately, {args.rounds} runs of each, {args.steps} measured steps a run")
    if args.paired:
        print(f"paired: one handforge run of {args.rounds * args.steps} measured steps, the bare loop taking "
              f"{args.log_every} steps beside each block of {args.log_every}")
    if note:
        print(f"note: {note}")
    print(f"\n| loop | design | ms/step (median of {n_blocks} {args.log_every}-step blocks) | steps/s | ratio "
          f"| ms/step (10th percentile) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['loop']} | {row['design']} | {row['ms_per_step']:.2f} | {row['steps_per_s']:.2f} "
              f"| {row['ratio']:.3f} | {row['p10_ms_per_step']:.2f} | {row['p10_ratio']:.3f} |")
    print("\n| loop (rounds) | in the step, ms (median) | between steps, ms (median) | ms/step, mean of each round |")
    print("|---|---|---|---|")
    for row in rows[:2]:
        means = ", ".join(f"{x:.2f}" for x in row["round_means_ms"])
        print(f"| {row['loop']} | {row['in_step_ms']:.3f} | {row['between_steps_ms']:.3f} | {means} |")
    print(f"\ngoal: handforge / bare <= {GOAL:.2f}: " + "; ".join(
        f"{design} {value:.3f} ({'met' if value <= GOAL else 'NOT met'})" for design, value in ratios.items()))
    print(f"same computation: max |loss difference| between the loops over all steps = {max_loss_diff:.3g}")
    print(f"total time {elapsed:.0f} s; 1-min load average {load_before:.1f} before, {load_after:.1f} after "
          f"({os.cpu_count()} CPUs)" + ("  <- other processes competed for the CPUs: the rounds design is "
                                        "noisy" + ("; trust the paired design" if args.paired else "")
                                        if busy else ""))


if __name__ == "__main__":
    main()
