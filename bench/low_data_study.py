"""Issue 6's low-data study: handshape classifiers on 10 / 20 / 40 real images per class, alone
(mode ``real``) or helped by generated images (``gen``, ``mixgen``, ``reggen``).

Each cell of the grid is one run of ``recipes/classify_low_data.toml`` with the overrides
``task.mode=MODE task.real_per_class=N name=PREFIX_N_MODE`` (``gen`` adds
``task.pretrain_steps``), started as ``python run.py run ...`` in the repository root. The
driver then reads the run's ``"type": "test"`` record from ``metrics.jsonl`` and prints a
markdown table: rows real_per_class, columns modes, test top-1 (%) and, for the other modes,
the difference to ``real`` in points; a second table gives each run's wall time (for a cell
read from an earlier run, the time between its first and last file writes).

A cell whose run already holds a test record is read, not re-run (``--rerun`` trains it again
from scratch), so an interrupted study continues where it stopped. The check goes by run name
only: after changing ``--steps`` or ``--set``, pass ``--rerun`` or another ``--prefix``.

The generated images must exist first (see the recipe's header):

    accelerate launch --num_cpu_threads_per_process 2 run.py recipes/quickstart.toml
    handforge generate runs/quickstart --per-class 100 --poses sampled --out runs/quickstart/generated_sampled

Another export: ``--set 'model.generated.path="runs/handshape_gan32/generated"'`` with its own
``--prefix``.

Usage:

    python bench/low_data_study.py                                   # the full 3 x 4 grid
    python bench/low_data_study.py --per-class 10 --modes real mixgen --steps 600
    python bench/low_data_study.py --per-class 10 --modes real mixgen --set task.schedule_b=0.05
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from handforge.errors import HandforgeError
from handforge.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "classify_low_data.toml"
MODES = ("real", "gen", "mixgen", "reggen")
PER_CLASS = (10, 20, 40)


def cell_overrides(mode: str, per_class: int, prefix: str, steps: int | None, pretrain_steps: int,
                   extra: list[str]) -> list[str]:
    """The command-line overrides of one cell; ``extra`` comes last so it can change anything."""
    overrides = [f"task.mode={mode}", f"task.real_per_class={per_class}",
                 f'name="{prefix}_{per_class}_{mode}"']
    if mode == "gen":
        overrides.append(f"task.pretrain_steps={pretrain_steps}")
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    return overrides + list(extra)


def test_record(metrics_file: Path) -> dict | None:
    """The last ``"type": "test"`` record of a run's metrics.jsonl, or None when there is none."""
    if not metrics_file.exists():
        return None
    record = None
    for line in metrics_file.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            if entry.get("type") == "test":
                record = entry
    return record


def earlier_wall_time(run_dir: Path) -> float | None:
    """About how long an earlier run took: from its recipe.toml (written at the start) to the last
    write of its metrics.jsonl (the test record, at the end); None if either is missing. Not the
    process's wall time (it leaves out the start-up before recipe.toml was written)."""
    start, end = run_dir / "recipe.toml", run_dir / "metrics.jsonl"
    if not (start.exists() and end.exists()):
        return None
    return end.stat().st_mtime - start.stat().st_mtime


def run_cell(recipe: Path, overrides: list[str], rerun: bool) -> tuple[dict, float | None]:
    """Train one cell unless it already has a test record; returns (record, wall seconds: measured
    here, or :func:`earlier_wall_time` when the record was read from an earlier run)."""
    run_dir = Path(load_recipe(str(recipe), overrides).run_dir)
    if not run_dir.is_absolute():
        run_dir = ROOT / run_dir
    metrics_file = run_dir / "metrics.jsonl"
    if not rerun and (record := test_record(metrics_file)) is not None:
        return record, earlier_wall_time(run_dir)
    if run_dir.exists():
        # A half-finished or re-run cell starts clean: the loop refuses a folder with checkpoints.
        shutil.rmtree(run_dir)
    command = [sys.executable, str(ROOT / "run.py"), "run", str(recipe), *overrides]
    print("$", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    seconds = time.perf_counter() - started
    record = test_record(metrics_file)
    if record is None:
        raise HandforgeError(f"{metrics_file}: the run finished without a \"type\": \"test\" record")
    return record, seconds


def markdown_tables(results: dict[tuple[int, str], tuple[dict, float | None]], per_class: list[int],
                    modes: list[str]) -> str:
    """Test top-1 per cell (with the difference to ``real`` when that column ran), then wall times."""
    header = "| real_per_class | " + " | ".join(modes) + " |"
    rule = "|---|" + "---|" * len(modes)
    accuracy, walls = [header, rule], [header.replace("real_per_class", "wall time (s)"), rule]
    for n in per_class:
        real = results[(n, "real")][0]["test_top1"] if "real" in modes else None
        cells, times = [], []
        for mode in modes:
            record, seconds = results[(n, mode)]
            top1 = record["test_top1"]
            diff = f" ({top1 - real:+.1f})" if real is not None and mode != "real" else ""
            cells.append(f"{top1:.1f}{diff}")
            times.append("?" if seconds is None else f"{seconds:.0f}")
        accuracy.append(f"| {n} | " + " | ".join(cells) + " |")
        walls.append(f"| {n} | " + " | ".join(times) + " |")
    return "\n".join(accuracy) + "\n\nTest top-1 (%); in brackets the difference to mode real (points).\n\n" \
        + "\n".join(walls) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--per-class", type=int, nargs="+", default=list(PER_CLASS), metavar="N",
                        help="real images per class (default 10 20 40)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="modes (default all four)")
    parser.add_argument("--steps", type=int, help="train.steps of every cell (default: the recipe's)")
    parser.add_argument("--pretrain-steps", type=int, default=200,
                        help="mode gen: steps on generated images first (default 200)")
    parser.add_argument("--prefix", default="lowdata", help="run names are PREFIX_N_MODE (default lowdata)")
    parser.add_argument("--set", dest="extra", nargs="+", default=[], metavar="KEY=VALUE",
                        help="further overrides for every cell, e.g. task.schedule_b=0.05")
    parser.add_argument("--rerun", action="store_true", help="train cells again even if they have a test record")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.per_class):
        parser.error("--per-class: every budget must be >= 1")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps: must be >= 1")
    if "gen" in args.modes and args.steps is not None and args.pretrain_steps >= args.steps:
        parser.error(f"--pretrain-steps {args.pretrain_steps} must be below --steps {args.steps}")

    modes = [m for m in MODES if m in args.modes]  # the table's column order, whatever the order given
    results = {}
    try:
        for n in args.per_class:
            for mode in modes:
                overrides = cell_overrides(mode, n, args.prefix, args.steps, args.pretrain_steps, args.extra)
                results[(n, mode)] = run_cell(args.recipe, overrides, args.rerun)
                record, seconds = results[(n, mode)]
                took = f"{seconds:.0f} s" if seconds is not None else "read from an earlier run"
                print(f"[{n} per class, {mode}] test top-1 {record['test_top1']:.2f} % ({took})", flush=True)
    except HandforgeError as error:
        sys.exit(f"error: {error}")
    except subprocess.CalledProcessError as error:
        sys.exit(f"error: a cell's run failed (exit status {error.returncode}): {' '.join(error.cmd[1:])}")
    print()
    print(markdown_tables(results, args.per_class, modes))


if __name__ == "__main__":
    main()
