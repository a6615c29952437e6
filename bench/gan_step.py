"""Cost of one `gan` iteration (one D step + one G step) per backbone, against StudioGAN, as tables.

    python bench/gan_step.py [--size 64] [--batch 32 64] [--steps 10] [--budget 5] [--threads 2]
                             [--backbones deep_conv resnet big_resnet stylegan2]
                             [--conditioning labels] [--baselines big_resnet] [--baseline-batch 32]
                             [--studiogan-src PATH] [--repeats 5] [--peer-batch 32] [--profile]
                             [--json]

    # StudioGAN's own big_resnet beside ours in the same run, and the profile, without the
    # per-backbone table (PATH: a PyTorch-StudioGAN checkout, e.g. `git archive HEAD src | tar -x`):
    python bench/gan_step.py --backbones --studiogan-src PATH --repeats 5 --profile

Same-run peer (``--studiogan-src PATH``; bench/_studiogan_peer.py): StudioGAN's own
``src/models/big_resnet.py`` Generator and Discriminator, imported at run time from the checkout
(stand-in modules only for its imports that are not installed and that the iteration never uses),
built from its ``Configurations`` of ``configs/Baby_ImageNet/BigGAN.yaml`` (its 64 px BigGAN:
cBN in G, projection "PD" in D, spectral norm on both, attention at 32 px, hinge, Adam (0, 0.999))
at ch 64, z_dim 80, shared_dim 128 and 10 classes: G 11,231,108 / D 19,558,082 parameters
(checked, printed). Its iteration is ``train_discriminator`` + ``train_generator`` of its worker for
that config, with its own functions (toggle_grad, generate_images twice: fresh fakes for each step,
d_hinge / g_hinge, its Adam, its Ema), NCHW, torch's old-style ``spectral_norm``. Ours is
``GanTask.train_step`` of big_resnet with ``cbn + projection`` at the same batch (``--peer-batch``).
After one untimed warm-up each, ``--repeats`` rounds time one iteration of each, the order swapped
every round; medians, img/s, and the ratio ours / StudioGAN from this run. The goal (issue 14):
ours >= 1.5x StudioGAN's img/s in the same run. The 2.4 img/s quoted in the issue stays as a
history row only.

``--profile``: one iteration of our big_resnet task (after a warm-up) under ``torch.profiler``
(CPU): self time by category (conv, spectral norm, attention, BatchNorm, linear, layout
conversions, optimizer step, other; forward and backward apart, backward ops charged to their
forward op's category) and the top ops (bench/_step_profile.py).

Per-backbone table: every row is the real task: ``GanTask.train_step`` of a task built as a
recipe would build it (hinge loss, Adam, EMA generator, 10 classes), on a fixed random batch.
Backbones:

- deep_conv, resnet: their default configs;
- big_resnet: StudioGAN's 64 px settings (ch 64, z_dim 80, shared_dim 128, attention at 32,
  spectral norm on both networks, orthogonal init), 10 classes: at 64 px, with ``cbn +
  projection``, that is StudioGAN's G 11,231,108 and D 19,558,082 parameters (checked, printed);
- stylegan2 when ``handforge.plugins.backbones.stylegan2`` imports (skipped with a note
  otherwise): its default config.

``--conditioning labels`` (the default) runs the class-conditional variant: ``cbn + projection``,
``cadain + projection`` for stylegan2; ``none`` the unconditional one (same FLOPs, a few more
parameters' worth of embeddings less); both with ``--conditioning none labels``, which doubles
the run time of the cheap backbones.

Per row: one warm-up iteration, which is also the one whose FLOPs are counted
(``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions, forward and backward;
elementwise work counts zero) and whose losses are kept; then timed iterations until ``--steps``
of them or ``--budget`` seconds, at least 2 (defaults 10 and 5 s: the cheap backbones get a few,
big_resnet gets 2, and the default run stays near 5 minutes on 2 quiet cores). ms/iter is the
median; img/s is batch over it; achieved GFLOP/s is the counted FLOPs over it, and "% of matmul
peak" that over this machine's fp32 matmul rate, measured first in the same run (2048 x 2048
``torch.mm``, --threads threads, best of 10).

Baselines (for ``--baselines`` backbones at ``--baseline-batch``; bench/_studiogan_style.py), built
from the same seed, so with the same initial weights, batch and noise:

- "NCHW task": our ``train_step`` with every module and activation in contiguous NCHW instead of
  channels_last (converted after setup; layout checked on every conv output);
- "StudioGAN-style loop": the same modules, NCHW, run as StudioGAN runs an iteration: no
  Accelerate, G frozen for the D step, the fakes generated a second time for the G step,
  parameter-by-parameter EMA. "ratio vs baseline" is a row's img/s over this loop's.

History: StudioGAN's own big_resnet (G 11.2M, D 19.6M) at 64 px, batch 32, 2 cores: ~13 s per
iteration, 2.4 img/s, as the issue quotes it from another run; printed as history only, the
comparison that counts is the same-run one above (``--studiogan-src``).
The first iteration's losses of our task and of both baselines are printed side by side: those of
the D step (before any update) agree to float tolerance (~1e-5); g_loss, after D's first Adam step,
to ~1e-4 relative (see the note printed with them).
"""
import argparse
import importlib
import json
import os
import statistics
import sys
import time
import types

import accelerate
import torch

from handforge.errors import HandforgeError
from handforge.plugins.conditioners.auxiliary import LatentLabel
from handforge.plugins.conditioners.label import ClassBatchNorm, NoCondition, Projection
from handforge.plugins.losses.adversarial import Hinge
from handforge.plugins.tasks.gan import GanConfig, GanTask
from handforge.recipe import Component
from handforge.registry import Entry
from handforge.task import RunContext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _allocator import STATES, allocator_state, child_json, run_under  # noqa: E402
from _flops import count_flops, matmul_rate  # noqa: E402
from _step_profile import markdown as profile_markdown, profile_step  # noqa: E402
from _studiogan_style import StudioGanLoop, force_nchw, layout_census  # noqa: E402

N_CLASSES = 10
STUDIOGAN_64 = {"ch": 64, "z_dim": 80, "shared_dim": 128, "attention_resolution": 32}  # big_resnet at 64 px
STUDIOGAN_PARAMS = {"generator": 11_231_108, "discriminator": 19_558_082}  # StudioGAN's counts, 10 classes
QUOTED = {"backbone": "big_resnet", "conditioning": "cbn + projection", "batch": 32, "ms_median": 13_000.0,
          "img_s": 2.4, "g_params": "11.2M", "d_params": "19.6M", "threads": 2}  # history: the issue's, another run
GOAL_RATIO = 1.5  # ours over StudioGAN's img/s, same run (--studiogan-src); without it, over the quoted figure
# StudioGAN's Baby_ImageNet/BigGAN.yaml (64 px: ch 80, z_dim 100, 100 classes) at the widths of the quoted run:
STUDIOGAN_OVERRIDES = {"g_conv_dim": STUDIOGAN_64["ch"], "d_conv_dim": STUDIOGAN_64["ch"],
                       "z_dim": STUDIOGAN_64["z_dim"], "g_shared_dim": STUDIOGAN_64["shared_dim"]}

CONDITIONING = {
    "none": (NoCondition, NoCondition),
    "cbn + projection": (ClassBatchNorm, Projection),
    "cadain + projection": (LatentLabel, Projection),  # StyleGAN's way: the label enters the latent
}
BACKBONES = {  # name -> its conditioning for --conditioning none / labels
    "deep_conv": {"none": "none", "labels": "cbn + projection"},
    "resnet": {"none": "none", "labels": "cbn + projection"},
    "big_resnet": {"none": "none", "labels": "cbn + projection"},
    "stylegan2": {"none": "none", "labels": "cadain + projection"},
}
D_STEP_KEYS = ("d_loss", "d_real", "d_fake")  # computed before any update
LOSS_KEYS = D_STEP_KEYS + ("g_loss",)
MIN_STEPS = 2


def component(kind, name, factory, config=None):
    entry = Entry(kind, name, factory, type(config) if config is not None else None, "bench", None, None, "")
    return Component(name, config, entry, f"model.{name}")


def backbone_entry(name):
    """(factory, config class) of a backbone, read from its plugin module's own registration hook."""
    module = importlib.import_module(f"handforge.plugins.backbones.{name}")
    found = {}
    module.register_backbones(register=lambda n, factory, *, config=None, **_: found.setdefault(n, (factory, config)))
    if name not in found:
        raise HandforgeError(f"handforge.plugins.backbones.{name} registers no backbone named '{name}'")
    return found[name]


def backbone_config(name, config_cls):
    if config_cls is None:
        return None
    return config_cls(**STUDIOGAN_64) if name == "big_resnet" else config_cls()


def make_task(size, name, factory, config, conditioning, seed=0, gan_config=None):
    """The `gan` task with this backbone on both sides, built from ``seed`` (same seed, same weights)."""
    g_cond, d_cond = CONDITIONING[conditioning]
    dataset = types.SimpleNamespace(image_size=size, class_names=[str(i) for i in range(N_CLASSES)])
    components = {
        "generator": component("backbone", name, factory, config),
        "discriminator": component("backbone", name, factory, config),
        "g_conditioner": component("conditioner", "g", g_cond),
        "d_conditioner": component("conditioner", "d", d_cond),
        "loss": component("loss", "hinge", Hinge),
    }
    run = RunContext(recipe=types.SimpleNamespace(seed=seed), accelerator=accelerate.Accelerator(cpu=True),
                     run_dir=None, dataset=dataset, components=components)
    torch.manual_seed(seed)
    task = GanTask(gan_config or GanConfig())
    task.setup(run)
    return task


def make_batch(size, batch):
    generator = torch.Generator().manual_seed(batch)
    return {"image": torch.rand(batch, 3, size, size, generator=generator) * 2 - 1,
            "label": torch.randint(0, N_CLASSES, (batch,), generator=generator)}


def measure(step, modules, batch, steps, budget):
    """Warm-up (FLOPs, losses, conv layouts), then timed iterations: a dict of the numbers."""
    torch.manual_seed(1)  # the warm-up's noise: the same in every variant, so its losses compare
    with layout_census(*modules) as census:
        logs, flops = count_flops(lambda: step(batch, 0))
    times = []
    for i in range(1, steps + 1):
        start = time.perf_counter()
        step(batch, i)
        times.append(time.perf_counter() - start)
        if len(times) >= MIN_STEPS and sum(times) > budget:
            break
    return {"flops": flops, "times_ms": [t * 1000 for t in times], "ms_median": statistics.median(times) * 1000,
            "ms_best": min(times) * 1000, "first_losses": {k: float(logs[k]) for k in LOSS_KEYS},
            "conv_layouts": census.counts}


def bench_row(size, batch_size, name, entry, conditioning, execution, args, peak):
    factory, config_cls = entry
    task = make_task(size, name, factory, backbone_config(name, config_cls), conditioning)
    modules = task.export_modules()
    nets = [modules["generator"], modules["discriminator"]]
    step = task.train_step
    if execution != "ours":
        force_nchw(*modules.values())
        if execution == "studiogan-style loop":
            step = StudioGanLoop(task)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    row = {"backbone": name, "conditioning": conditioning, "execution": execution, "batch": batch_size,
           "g_params": count(nets[0]), "d_params": count(nets[1])}
    row.update(measure(step, nets, make_batch(size, batch_size), args.steps, args.budget))
    row["img_s"] = batch_size / row["ms_median"] * 1000
    row["gflop_iter"] = row["flops"] / 1e9
    row["gflops_achieved"] = row["flops"] / row["ms_median"] / 1e6
    row["peak_fraction"] = row["gflops_achieved"] / peak
    return row


def run_all(args, peak):
    rows, notes = [], []
    for name in args.backbones:
        try:
            entry = backbone_entry(name)
        except ImportError as error:  # stylegan2 is written concurrently: absent until it lands
            notes.append(f"{name}: skipped, handforge.plugins.backbones.{name} does not import ({error})")
            continue
        for conditioning in (BACKBONES[name][c] for c in args.conditioning):
            runs = [(b, e) for b in args.batch for e in ("ours", "NCHW task", "studiogan-style loop")
                    if e == "ours" or (name in args.baselines and b in args.baseline_batch)]
            for batch_size, execution in runs:
                print(f"... {name} / {conditioning} / batch {batch_size} / {execution}", file=sys.stderr, flush=True)
                try:
                    rows.append(bench_row(args.size, batch_size, name, entry, conditioning, execution, args, peak))
                except HandforgeError as error:  # a combination the backbone refuses: say so, go on to the next
                    notes.append(f"{name} with {conditioning}: skipped ({error})")
                    break
    for row in rows:
        base = next((r for r in rows if r["execution"] == "studiogan-style loop" and all(
            r[k] == row[k] for k in ("backbone", "conditioning", "batch"))), None)
        row["ratio_vs_baseline"] = None if base is None else row["img_s"] / base["img_s"]
    return rows, notes


def peer_comparison(args):
    """Our big_resnet iteration and StudioGAN's own, alternating in this process: a dict of the numbers.

    Both are built, each runs one untimed warm-up iteration, then ``--repeats`` rounds, each
    timing one iteration of both, the order swapped every round (ours first in even rounds), so
    that slow drifts of a shared machine fall on both. Medians over the rounds.
    """
    import _studiogan_peer  # noqa: E402  (imports StudioGAN from --studiogan-src only when asked)
    size, batch_size = args.size, args.peer_batch
    if size != 64:
        raise SystemExit("--studiogan-src: the comparison is at StudioGAN's 64 px config; use --size 64")
    factory, config_cls = backbone_entry("big_resnet")
    config = backbone_config("big_resnet", config_cls)
    task = make_task(size, "big_resnet", factory, config, QUOTED["conditioning"])
    reuse = make_task(size, "big_resnet", factory, config, QUOTED["conditioning"], gan_config=GanConfig(reuse_fakes=True))
    ours_modules = task.export_modules()
    peer = _studiogan_peer.StudioGan(args.studiogan_src, batch_size, N_CLASSES, STUDIOGAN_OVERRIDES)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    batch = make_batch(size, batch_size)
    runners = {"ours": lambda i: task.train_step(batch, i), "ours_reuse": lambda i: reuse.train_step(batch, i),
               "studiogan": lambda i: peer.step(batch, i)}
    result = {"batch": batch_size, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "allocator": allocator_state(), "studiogan_src": peer.sg.src, "stubbed": peer.sg.stubbed,
              "studiogan_settings": peer.settings(),
              "params": {"ours": {"generator": count(ours_modules["generator"]),
                                  "discriminator": count(ours_modules["discriminator"])},
                         "studiogan": {"generator": count(peer.G), "discriminator": count(peer.D)}},
              "times_ms": {name: [] for name in runners}, "load_avg": {"start": os.getloadavg()}}
    result["params_as_expected"] = {k: v == STUDIOGAN_PARAMS for k, v in result["params"].items()}
    order = list(runners)
    warm = {}
    for name, run in runners.items():
        print(f"... same-run comparison: {name} warm-up", file=sys.stderr, flush=True)
        torch.manual_seed(1)
        start = time.perf_counter()
        logs = run(0)
        warm[name] = (time.perf_counter() - start) * 1000
        result.setdefault("first_losses", {})[name] = {k: float(logs[k]) for k in LOSS_KEYS}
    result["warmup_ms"] = warm
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            print(f"... same-run comparison: round {r + 1}/{args.repeats}, {name}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            runners[name](r + 1)
            result["times_ms"][name].append((time.perf_counter() - start) * 1000)
    result["load_avg"]["end"] = os.getloadavg()
    for name, times in result["times_ms"].items():
        result.setdefault("ms_median", {})[name] = statistics.median(times)
        result.setdefault("img_s", {})[name] = batch_size / statistics.median(times) * 1000
    result["ratio"] = result["img_s"]["ours"] / result["img_s"]["studiogan"]
    result["ratio_reuse"] = result["img_s"]["ours_reuse"] / result["img_s"]["studiogan"]
    # per round, ours over StudioGAN (their iterations side by side): the spread of the ratio
    per_round = [s / o for o, s in zip(result["times_ms"]["ours"], result["times_ms"]["studiogan"])]
    result["ratio_per_round"] = per_round
    result["goal_met"] = all(result["params_as_expected"].values()) and result["ratio"] >= GOAL_RATIO
    return result


PEER_ROWS = (("ours", "handforge big_resnet (`GanTask.train_step`, channels_last)"),
             ("ours_reuse", "handforge big_resnet, `reuse_fakes = true` (one G forward less; another iteration)"),
             ("studiogan", "StudioGAN big_resnet (its own code from --studiogan-src, worker's D + G step)"))


def peer_report(peers):
    """The same-run table; ``peers``: allocator state -> peer_comparison's result (tuned first)."""
    first, q = next(iter(peers.values())), QUOTED
    shipped = peers.get("default", first)["img_s"]["studiogan"]  # StudioGAN as it runs: glibc's defaults
    fmt = lambda ms: f"{ms:.0f}"  # noqa: E731
    lines = [f"Same run, alternating, {first['repeats']} rounds (order reversed each round; one warm-up each first): "
             f"big_resnet at 64 px, batch {first['batch']}, 10 classes, {first['threads']} threads, "
             f"torch {torch.__version__}; one process per allocator setting", "",
             "| implementation | allocator | ms/iter median | ms/iter min-max | img/s | vs StudioGAN as it ships "
             "| vs StudioGAN, same allocator |", "|---|---|---|---|---|---|---|"]
    for state, peer in peers.items():
        t = peer["times_ms"]
        for name, label in PEER_ROWS:
            img_s = peer["img_s"][name]
            lines.append(f"| {label} | {peer['allocator']} | {fmt(peer['ms_median'][name])} "
                         f"| {fmt(min(t[name]))}-{fmt(max(t[name]))} | {img_s:.2f} | {img_s / shipped:.2f}x "
                         f"| {img_s / peer['img_s']['studiogan']:.2f}x |")
    lines.append(f"| history: StudioGAN as quoted in the issue (another run, another time; not comparable) "
                 f"| — | ~{q['ms_median']:.0f} | — | {q['img_s']} | — | — |")
    p, ok = first["params"], first["params_as_expected"]
    lines += ["", "Allocator: \"tuned\" is what handforge's entry sets for every command (glibc's mmap and trim "
              "thresholds raised, see handforge/entry.py); \"default\" is glibc's own, as StudioGAN runs. "
              "\"As it ships\" divides by StudioGAN under the default allocator.",
              f"Parameters: ours G {p['ours']['generator']:,} / D {p['ours']['discriminator']:,}, StudioGAN's "
              f"G {p['studiogan']['generator']:,} / D {p['studiogan']['discriminator']:,}; expected "
              f"G {STUDIOGAN_PARAMS['generator']:,} / D {STUDIOGAN_PARAMS['discriminator']:,}: "
              f"StudioGAN's {'match' if ok['studiogan'] else 'DIFFER'}, ours {'match' if ok['ours'] else 'DIFFER'}."]
    for state, peer in peers.items():
        lines.append(f"{peer['allocator']}: per-round ratios (StudioGAN ms / ours ms) "
                     + ", ".join(f"{r:.2f}" for r in peer["ratio_per_round"]) + "; warm-ups (untimed) "
                     + ", ".join(f"{n} {peer['warmup_ms'][n]:.0f} ms" for n, _ in PEER_ROWS)
                     + "; load average (1/5/15 min) at start " + "/".join(f"{x:.1f}" for x in peer["load_avg"]["start"])
                     + ", at end " + "/".join(f"{x:.1f}" for x in peer["load_avg"]["end"]) + ".")
    ours = first["img_s"]["ours"] / shipped
    met = all(ok.values()) and ours >= GOAL_RATIO
    lines += [f"Goal ours >= {GOAL_RATIO}x StudioGAN's img/s in the same run (our default iteration under handforge's "
              f"allocator over StudioGAN as it ships): {'met' if met else 'NOT met'} ({ours:.2f}x).",
              "", "StudioGAN settings (its Configurations from " + first["studiogan_settings"]["config"]
              + ", overridden to the quoted run's widths): "
              + ", ".join(f"{k} {v}" for k, v in first["studiogan_settings"].items() if k != "config")
              + f". Checkout: {first['studiogan_src']}; stand-in modules for its unused imports: "
              + (", ".join(first["stubbed"]) or "none") + ".",
              "Both default iterations are BigGAN's: fakes without a graph for the D step, fresh noise and a second "
              "G forward for the G step. They differ in noise and labels (StudioGAN draws random labels for its "
              "fakes, ours take the real batch's), so first losses are not compared."]
    return "\n".join(lines)


def profile_ours(args):
    """One profiled iteration of our big_resnet task (after a warm-up): the category and op tables."""
    factory, config_cls = backbone_entry("big_resnet")
    task = make_task(args.size, "big_resnet", factory, backbone_config("big_resnet", config_cls), QUOTED["conditioning"])
    batch = make_batch(args.size, args.peer_batch)
    modules = task.export_modules()
    print("... profile: warm-up", file=sys.stderr, flush=True)
    task.train_step(batch, 0)
    print("... profile: profiled iteration", file=sys.stderr, flush=True)
    return profile_step(lambda: task.train_step(batch, 1), [modules["generator"], modules["discriminator"]])


def summary(rows):
    """The StudioGAN comparison (big_resnet at the quoted batch) and the first-iteration loss check."""
    pick = lambda execution: next((r for r in rows if r["backbone"] == QUOTED["backbone"]  # noqa: E731
                                   and r["conditioning"] == QUOTED["conditioning"] and r["batch"] == QUOTED["batch"]
                                   and r["execution"] == execution), None)
    ours, nchw, loop = pick("ours"), pick("NCHW task"), pick("studiogan-style loop")
    result = {}
    if ours is not None:
        same_params = ours["g_params"] == STUDIOGAN_PARAMS["generator"] and \
            ours["d_params"] == STUDIOGAN_PARAMS["discriminator"]
        target = GOAL_RATIO * QUOTED["img_s"]
        result["goal"] = {"ours_img_s": ours["img_s"], "target_img_s": target, "same_params": same_params,
                          "met": same_params and ours["img_s"] >= target,
                          "ours_over_quoted": ours["img_s"] / QUOTED["img_s"]}
        for key, other in (("ours_over_nchw_task", nchw), ("ours_over_studiogan_style_loop", loop)):
            if other is not None:
                result["goal"][key] = ours["img_s"] / other["img_s"]
        result["first_losses"] = [
            {"execution": r["execution"], **r["first_losses"],
             "d_step_max_abs_diff": max(abs(r["first_losses"][k] - ours["first_losses"][k]) for k in D_STEP_KEYS),
             "g_loss_abs_diff": abs(r["first_losses"]["g_loss"] - ours["first_losses"]["g_loss"])}
            for r in (ours, nchw, loop) if r is not None]
    return result


def report(rows, notes, result, mm, args):
    lines = [f"gan iteration (1 D step + 1 G step), {args.size} px, {args.threads} threads, torch {torch.__version__}; "
             f"fp32 matmul peak {mm['gflops_best']:.0f} GFLOP/s ({mm['n']}x{mm['n']}, best of {mm['reps']}; "
             f"median {mm['gflops_median']:.0f})", "",
             "| backbone | conditioning | batch | G params | D params | GFLOP/iter | ms/iter median | img/s "
             "| achieved GFLOP/s | % of matmul peak | ratio vs baseline |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["backbone"] if r["execution"] == "ours" else f"{r['backbone']} ({r['execution']})"
        ratio = "—" if r["ratio_vs_baseline"] is None else f"{r['ratio_vs_baseline']:.2f}x"
        lines.append(f"| {name} | {r['conditioning']} | {r['batch']} | {r['g_params']:,} | {r['d_params']:,} "
                     f"| {r['gflop_iter']:.1f} | {r['ms_median']:.0f} ({len(r['times_ms'])} it) | {r['img_s']:.2f} "
                     f"| {r['gflops_achieved']:.1f} | {100 * r['peak_fraction']:.1f}% | {ratio} |")
    q = QUOTED
    lines.append(f"| {q['backbone']} (history: StudioGAN as quoted in the issue, another run) | {q['conditioning']} "
                 f"| {q['batch']} | {q['g_params']} "
                 f"| {q['d_params']} | — | ~{q['ms_median']:.0f} | {q['img_s']} | — | — | — |")
    lines += ["", "History row: StudioGAN's own code as quoted in the issue (2 cores, another run; re-run it in "
              "this run with --studiogan-src). Baseline rows: our modules in NCHW (bench/_studiogan_style.py); "
              "ratio = img/s over the StudioGAN-style loop's."]
    goal = result.get("goal")
    if goal:
        lines += ["", f"big_resnet, batch {q['batch']}: ours {goal['ours_img_s']:.2f} img/s = "
                  f"{goal['ours_over_quoted']:.2f}x StudioGAN's quoted {q['img_s']} img/s (history, another run)"
                  + "".join(f"; {goal[k]:.2f}x the {n}" for k, n in (("ours_over_nchw_task", "NCHW task"),
                            ("ours_over_studiogan_style_loop", "StudioGAN-style loop")) if k in goal) + ".",
                  f"Against the quoted figure only (history; the same-run ratio is --studiogan-src's): >= "
                  f"{GOAL_RATIO}x it (>= {goal['target_img_s']:.1f} img/s) with StudioGAN's parameter counts "
                  f"({'same' if goal['same_params'] else 'DIFFERENT'}): {'met' if goal['met'] else 'NOT met'}."]
        lines += ["", "First iteration, same seed, same weights, batch and noise:", "",
                  "| execution | d_loss | d_real | d_fake | max abs diff vs ours | g_loss | abs diff vs ours |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['execution']} | {r['d_loss']:.6f} | {r['d_real']:.6f} | {r['d_fake']:.6f} "
                  f"| {r['d_step_max_abs_diff']:.1e} | {r['g_loss']:.6f} | {r['g_loss_abs_diff']:.1e} |"
                  for r in result["first_losses"]]
        lines += ["", "d_loss, d_real, d_fake come before any update: the same math in another memory layout, they "
                  "agree to ~1e-5. g_loss comes after D's first Adam step, about lr * sign(grad) per weight, which "
                  "turns rounding differences in near-zero gradient entries into whole-step weight differences: "
                  "expect up to ~1e-4 relative there."]
    layouts = [f"{r['backbone']}, {r['conditioning']}, batch {r['batch']}, {r['execution']}: {r['conv_layouts']}"
               for r in rows
               if r["backbone"] in args.baselines and r["batch"] in args.baseline_batch]
    if layouts:
        lines += ["", "Conv output layouts in the warm-up iteration: " + "; ".join(layouts)]
    lines += [f"Note: {n}" for n in notes]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=10, help="most timed iterations per row (after one warm-up)")
    parser.add_argument("--budget", type=float, default=5.0,
                        help=f"seconds of timed iterations per row, then stop (at least {MIN_STEPS} iterations)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbones", nargs="*", choices=list(BACKBONES), default=list(BACKBONES),
                        help="backbones of the per-backbone table (none: no table, e.g. with --studiogan-src)")
    parser.add_argument("--conditioning", nargs="+", choices=["none", "labels"], default=["labels"],
                        help="unconditional and/or class-conditional variants (see above; default: labels)")
    parser.add_argument("--baselines", nargs="*", choices=list(BACKBONES), default=["big_resnet"],
                        help="backbones also run as the NCHW task and the StudioGAN-style loop")
    parser.add_argument("--baseline-batch", type=int, nargs="*", default=[QUOTED["batch"]])
    parser.add_argument("--studiogan-src", metavar="PATH",
                        help="a PyTorch-StudioGAN checkout (or its src/): run its own big_resnet beside ours, same run")
    parser.add_argument("--repeats", type=int, default=5,
                        help="--studiogan-src: alternating rounds (one timed iteration of each per round)")
    parser.add_argument("--peer-batch", type=int, default=QUOTED["batch"],
                        help="batch of the --studiogan-src comparison and of --profile")
    parser.add_argument("--profile", action="store_true",
                        help="profile one iteration of our big_resnet task (torch.profiler, CPU): where the time goes")
    parser.add_argument("--allocator", choices=STATES, default="tuned",
                        help="glibc allocator settings this process runs under: handforge's (tuned, what every "
                             "handforge command runs with) or glibc's defaults")
    parser.add_argument("--no-compare-allocators", action="store_true",
                        help="--studiogan-src / --profile: skip the second run of them under the other allocator")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args()
    run_under(args.allocator)
    if args.steps < MIN_STEPS:
        parser.error(f"--steps must be >= {MIN_STEPS}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)

    mm = matmul_rate(args.threads)
    peer = peer_comparison(args) if args.studiogan_src else None
    prof = profile_ours(args) if args.profile else None
    peers, profiles = {allocator_state(): peer}, {allocator_state(): prof}
    if (peer or prof) and not args.no_compare_allocators:
        other = next(s for s in STATES if s != args.allocator)
        argv = ["--backbones", "--no-compare-allocators", "--threads", str(args.threads), "--size", str(args.size),
                "--peer-batch", str(args.peer_batch), "--repeats", str(args.repeats)]
        argv += ["--studiogan-src", args.studiogan_src] if args.studiogan_src else []
        argv += ["--profile"] if args.profile else []
        print(f"... the same under the {other} allocator, in a child process", file=sys.stderr, flush=True)
        child = child_json(os.path.abspath(__file__), argv, other)
        peers[child["allocator"]], profiles[child["allocator"]] = child["same_run_studiogan"], child["profile"]
    order = lambda d: {k: d[k] for k in sorted(d, key=lambda k: k != "tuned") if d[k] is not None}  # noqa: E731
    peers, profiles = order(peers), order(profiles)
    rows, notes = run_all(args, mm["gflops_best"])
    result = summary(rows)
    if args.json:
        print(json.dumps({"size": args.size, "threads": args.threads, "torch": torch.__version__, "matmul": mm,
                          "rows": rows, "reference": QUOTED, "studiogan_params": STUDIOGAN_PARAMS, **result,
                          "allocator": allocator_state(), "same_run_studiogan": peer, "profile": prof,
                          "same_run_by_allocator": peers, "profile_by_allocator": profiles, "notes": notes}, indent=1))
    else:
        parts = []
        if peers:
            parts.append(peer_report(peers))
        for state, profile in profiles.items():
            parts.append(profile_markdown(profile, f"Profile, {state} allocator: one iteration of our big_resnet task "
                                          f"(batch {args.peer_batch}, torch.profiler, CPU, self time; "
                                          f"bench/_step_profile.py says how ops are put in categories)"))
        if rows or not parts:
            parts.append(report(rows, notes, result, mm, args))
        else:
            parts[0] = (f"{args.size} px, {args.threads} threads, torch {torch.__version__}; fp32 matmul peak "
                        f"{mm['gflops_best']:.0f} GFLOP/s (best of {mm['reps']}; median {mm['gflops_median']:.0f})\n\n"
                        + parts[0])
        print("\n\n".join(parts))


if __name__ == "__main__":
    main()
