"""``handforge generate``: export a trained generator's images as a labelled dataset.

    handforge generate RUN_DIR --per-class N --out DIR [--truncation T] [--poses real|sampled]
                       [--checkpoint best|last|weights|PATH] [--batch-size B] [--seed S] [--limit K]
    handforge generate RUN_DIR --variations N --of K --out DIR [--strength S] [...the same options]

(``--variations``: N images of each of K synthetic individuals, see :mod:`.variations`.)

What conditions the images depends on what the generator reads (the task's ``condition_fields``):

- the label alone: N images of every class;
- anything more (keypoints for a pose-conditioned generator): the conditions of N real samples
  of every class, the first ones of the run dataset's train split in index order (``--poses real``),
  or of a fresh draw of the same dataset with another seed (``--poses sampled``, ``--pose-seed``).

Images are generated in fixed batches of the planned images (class-major order), each image's
noise from its own seed (:func:`.manifest.image_seed`), and written as ``DIR/<class>/<index>.png``
plus ``DIR/manifest.json`` (:mod:`.manifest`). PNG encoding runs in a thread pool while the next
batch is generated. A batch whose files all exist is done: running the same command again
continues an interrupted export (the settings must match the manifest's). Under
``accelerate launch`` process r generates the batches b with b % processes == r.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import pathlib
import re
import time

import attrs
import numpy as np
import torch
from PIL import Image

from handforge import __version__
from handforge.data import collate
from handforge.errors import HandforgeError
from handforge.fileio import file_hash
from handforge.imaging import to_uint8
from handforge.runs import folder_sha256, load_run, resolve_checkpoint

from .manifest import FORMAT, MANIFEST, batches, condition_batch, image_seed, read_manifest, write_manifest

POSES = ("real", "sampled")
SCAN_CHUNK = 256  # real samples rendered per call while looking for each class's conditions
SCAN_LIMIT = 200  # give up on a class after this many samples per wanted image


@attrs.frozen
class ExportOptions:
    run_dir: pathlib.Path
    out: pathlib.Path
    per_class: int
    checkpoint: str = "last"
    truncation: float | None = None  # None: the recipe's own
    poses: str = "real"
    pose_seed: int | None = None  # --poses sampled: the dataset seed; None = the recipe's + 1
    seed: int = 0
    batch_size: int = 64
    limit: int | None = None  # stop after this many new images (per process)
    workers: int = 4
    progress: bool = True


@attrs.frozen
class ExportResult:
    out: pathlib.Path
    total: int  # images the manifest plans
    written: int  # images this call wrote (this process)
    complete: bool
    seconds: float
    loop_seconds: float  # from the first batch to the last file written (this process): the export proper
    generate_seconds: float  # of which inside the generator

    def summary(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else float("inf")
        state = "complete" if self.complete else "incomplete: run the same command again to continue"
        return (f"generated {self.written} images in {self.seconds:.1f} s ({rate:.1f} images/s) -> {self.out} "
                f"({self.total} planned, {state})")


def folder_name(class_name: str) -> str:
    """A class name as a folder name: path separators and other awkward characters replaced."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", class_name).strip(".") or "class"


# -- planning --------------------------------------------------------------------------------------


def _condition_fields(task, dataset) -> tuple:
    fields = getattr(task, "condition_fields", None)
    if fields is None:  # a task that does not say: every field a real sample has, but the image
        fields = tuple(k for k in dataset[0] if k != "image")
    return tuple(fields)


def _pose_dataset(run, opts: ExportOptions):
    """The dataset whose samples give the conditions, and the seed it was drawn with (sampled only)."""
    if opts.poses == "real":
        return run.dataset, None
    data = run.recipe.data
    config = data.config
    if config is None or not any(f.name == "seed" for f in attrs.fields(type(config))):
        raise HandforgeError(f"--poses sampled draws poses from the run's dataset with another seed, and "
                             f"dataset '{data.name}' has no 'seed' option; use --poses real")
    seed = opts.pose_seed if opts.pose_seed is not None else config.seed + 1
    return attrs.evolve(data, config=attrs.evolve(config, seed=seed)).build(split="train"), seed


def _fetch(dataset, indices: list[int]) -> dict:
    if hasattr(dataset, "__getitems__"):  # a dataset that renders whole batches at once
        return collate(dataset.__getitems__(indices))
    return collate([dataset[i] for i in indices])


def _class_samples(dataset, fields, n_classes: int, per_class: int, where: str) -> list[list[tuple]]:
    """For every class, the (index, conditions) of its first ``per_class`` samples in index order."""
    found: list[list[tuple]] = [[] for _ in range(n_classes)]
    limit = min(len(dataset), SCAN_LIMIT * per_class * n_classes)
    start = 0
    while start < limit and any(len(f) < per_class for f in found):
        indices = list(range(start, min(start + SCAN_CHUNK, limit)))
        samples = _fetch(dataset, indices)
        missing = [f for f in (*fields, "label") if f not in samples]
        if missing:
            raise HandforgeError(f"{where}: the generator reads {', '.join(missing)}, which the dataset's samples "
                                 f"do not have (fields: {', '.join(samples)})")
        for row, index in enumerate(indices):
            label = int(samples["label"][row])
            if len(found[label]) < per_class:
                found[label].append((index, {f: samples[f][row] for f in fields if f != "label"}))
        start += SCAN_CHUNK
    short = [i for i, f in enumerate(found) if len(f) < per_class]
    if short:
        raise HandforgeError(f"{where}: {len(short)} class(es) have fewer than {per_class} samples among the first "
                             f"{limit} (class ids {short[:5]}); lower --per-class")
    return found


def plan(run, opts: ExportOptions) -> dict:
    """The manifest of the export: settings and every image's conditions, seed and batch."""
    names = run.class_names
    if not names:
        raise HandforgeError(f"{opts.run_dir}: the run's dataset has no classes; handforge generate writes "
                             f"N images per class")
    fields = _condition_fields(run.task, run.dataset)
    if not fields:
        raise HandforgeError(f"{opts.run_dir}: the run's generator is unconditional (it reads no sample field), "
                             f"so its images have no class to be exported under")
    label_only = set(fields) <= {"label"}
    pose_seed = None
    if not label_only:
        dataset, pose_seed = _pose_dataset(run, opts)
        per_class = _class_samples(dataset, fields, len(names), opts.per_class,
                                   f"--poses {opts.poses} from dataset '{run.recipe.data.name}'")
    images = []
    for label, name in enumerate(names):
        for j in range(opts.per_class):
            index = len(images)
            record = {"index": index, "file": f"{folder_name(name)}/{index:06d}.png",
                      "batch": index // opts.batch_size, "seed": image_seed(opts.seed, index),
                      "label": label, "class_name": name}
            if not label_only:
                source_index, conditions = per_class[label][j]
                record["source_index"] = source_index
                record.update({f: v.tolist() for f, v in conditions.items()})
            images.append(record)
    checkpoint = resolve_checkpoint(opts.run_dir, opts.checkpoint)
    settings = {
        "task": run.recipe.task.name,
        "recipe_sha256": file_hash(opts.run_dir / "recipe.toml"),
        "checkpoint": opts.checkpoint,
        "checkpoint_sha256": folder_sha256(checkpoint),
        "truncation": getattr(run.task.config, "truncation", None),
        "seed": opts.seed,
        "batch_size": opts.batch_size,
        "per_class": opts.per_class,
        "condition_fields": list(fields),
        "poses": None if label_only else opts.poses,
        "pose_seed": pose_seed,
        "dataset": run.recipe.data.name,
    }
    return {"format": FORMAT, "handforge_version": __version__, "complete": False,
            "source": {"run_dir": str(opts.run_dir.resolve()), "checkpoint_folder": str(checkpoint.resolve())},
            "settings": settings, "class_names": list(names), "images": images}


# -- writing -----------------------------------------------------------------------------------------


def write_png(path: pathlib.Path, pixels: np.ndarray) -> None:
    """Encode and write one image; renamed into place, so a file that exists is whole."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # no timestamps: same pixels, same bytes
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def write_batch(images: torch.Tensor, paths: list[pathlib.Path]) -> None:
    for path, pixels in zip(paths, to_uint8(images)):
        write_png(path, pixels)


def _check_resumable(out: pathlib.Path, planned: dict) -> None:
    """An existing manifest must describe the same export: same settings, same images."""
    existing = read_manifest(out)
    changed = sorted(k for k in set(planned["settings"]) | set(existing["settings"])
                     if planned["settings"].get(k) != existing["settings"].get(k))
    if changed:
        detail = ", ".join(f"{k}: {existing['settings'].get(k)!r} there, {planned['settings'].get(k)!r} now"
                           for k in changed)
        raise HandforgeError(f"--out {out}: holds an export with other settings ({detail}); "
                             f"use another folder, or the same settings to continue it")
    if existing["images"] != planned["images"] or existing["class_names"] != planned["class_names"]:
        raise HandforgeError(f"--out {out}: holds an export of other images (its manifest's image list differs); "
                             f"use another folder")


def prepare_out(out: pathlib.Path, manifest: dict, accelerator) -> None:
    if accelerator.is_main_process:
        if out.exists() and not out.is_dir():
            raise HandforgeError(f"--out {out}: exists and is not a folder")
        if (out / MANIFEST).is_file():
            _check_resumable(out, manifest)
        elif out.is_dir() and any(out.iterdir()):
            raise HandforgeError(f"--out {out}: folder exists, is not empty and holds no {MANIFEST}; "
                                 f"choose another folder")
        for folder in sorted({(out / r["file"]).parent for r in manifest["images"]}):
            folder.mkdir(parents=True, exist_ok=True)
        if not (out / MANIFEST).is_file():
            write_manifest(out, manifest)
    accelerator.wait_for_everyone()


def export(opts: ExportOptions, host=None, run=None) -> ExportResult:
    """Generate (or continue generating) the export ``opts`` describes. ``run``: an already loaded run
    (:func:`handforge.runs.load_run` with split "train" and ``opts.checkpoint``)."""
    started = time.perf_counter()
    if opts.per_class < 1:
        raise HandforgeError(f"--per-class must be at least 1, got {opts.per_class}")
    if opts.batch_size < 1:
        raise HandforgeError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.poses not in POSES:
        raise HandforgeError(f"--poses must be one of {', '.join(POSES)}, got {opts.poses!r}")
    opts = attrs.evolve(opts, run_dir=pathlib.Path(opts.run_dir), out=pathlib.Path(opts.out))
    run = run or load_run(opts.run_dir, split="train", host=host, checkpoint=opts.checkpoint)
    _set_truncation(run.task, opts.truncation)
    manifest = plan(run, opts)
    acc, out = run.accelerator, opts.out
    prepare_out(out, manifest, acc)

    fields = manifest["settings"]["condition_fields"]

    def images_of(records):
        return run.task.generate(condition_batch(records, fields), seeds=[r["seed"] for r in records])

    return write_batches(run.accelerator, manifest, out, images_of, opts, started)


def write_batches(acc, manifest: dict, out: pathlib.Path, images_of, opts, started: float) -> ExportResult:
    """Generate and write this process's batches of ``manifest`` whose files are not all there yet:
    ``images_of(records)`` gives a batch's (N, 3, H, W) images in [-1, 1], in record order. PNGs are
    encoded in ``opts.workers`` threads while the next batch is generated; the manifest is marked
    complete once every file exists. ``opts``: ``limit``, ``workers``, ``progress``."""
    from tqdm.auto import tqdm

    rank, world = acc.process_index, acc.num_processes
    mine = [(b, records) for b, records in batches(manifest).items()
            if b % world == rank and not all((out / r["file"]).is_file() for r in records)]
    if opts.limit is not None:
        kept, count = [], 0
        for b, records in mine:
            if count >= opts.limit:
                break
            kept.append((b, records))
            count += len(records)
        mine = kept
    total_new = sum(len(records) for _, records in mine)
    progress = tqdm(total=total_new, disable=not (opts.progress and acc.is_main_process), desc="generate",
                    unit="img", dynamic_ncols=True)
    written, generating = 0, 0.0
    loop_started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
        pending: list = []
        for b, records in mine:
            tick = time.perf_counter()
            with torch.no_grad():
                images = images_of(records).cpu()
            generating += time.perf_counter() - tick
            # At most `workers` batches are being quantized and encoded: memory stays bounded, and
            # the generator goes on with the next batch meanwhile.
            while len(pending) >= max(1, opts.workers):
                pending.pop(0).result()
            pending.append(pool.submit(write_batch, images, [out / r["file"] for r in records]))
            written += len(records)
            progress.update(len(records))
        for future in pending:
            future.result()
    loop_seconds = time.perf_counter() - loop_started
    progress.close()
    acc.wait_for_everyone()
    complete = all((out / r["file"]).is_file() for r in manifest["images"])
    if complete and acc.is_main_process:
        write_manifest(out, {**manifest, "complete": True})
    acc.wait_for_everyone()
    return ExportResult(out, len(manifest["images"]), written, complete, time.perf_counter() - started,
                        loop_seconds, generating)


def _set_truncation(task, truncation: float | None) -> None:
    if truncation is None:
        return
    config = getattr(task, "config", None)
    if config is None or not attrs.has(type(config)) or not any(f.name == "truncation" for f in attrs.fields(type(config))):
        raise HandforgeError(f"--truncation: task {type(task).__name__} has no truncation option")
    try:
        task.config = attrs.evolve(config, truncation=truncation)
    except ValueError as exc:
        raise HandforgeError(f"--truncation {truncation}: {exc}") from None


# -- command -----------------------------------------------------------------------------------------


def configure(p) -> None:
    p.add_argument("run_dir", help="a run directory (recipe.toml, checkpoints/, weights/)")
    p.add_argument("--per-class", dest="per_class", type=int, help="images per class")
    p.add_argument("--variations", type=int, help="instead of --per-class: N images of each of --of K synthetic "
                                                  "individuals (see docs/diffusion.md)")
    p.add_argument("--of", dest="individuals", type=int, help="--variations: how many individuals (K)")
    p.add_argument("--strength", type=float, help="--variations of label or unconditional models: how far each "
                                                  "variation moves from its individual, in (0, 1] (default 0.5)")
    p.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier export to continue)")
    p.add_argument("--checkpoint", default="last",
                   help="last (default), best, weights (the exported final weights) or a checkpoint folder")
    p.add_argument("--truncation", type=float, help="the truncation trick (0 = off); default: the recipe's")
    p.add_argument("--poses", default="real", choices=POSES,
                   help="pose-conditioned generators: keypoints of real samples of each class (default) or "
                        "of a fresh draw of the run's dataset with another seed")
    p.add_argument("--pose-seed", dest="pose_seed", type=int, help="--poses sampled: the dataset seed "
                                                                 "(default: the recipe's + 1)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the export (default 0)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--limit", type=int, help="stop after this many new images (continue later)")
    p.add_argument("--workers", type=int, default=4, help="PNG encoding threads (default 4)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def command(args) -> int:
    if args.variations is not None or args.individuals is not None:
        return _variations_command(args)
    if args.per_class is None:
        raise HandforgeError("handforge generate: give --per-class N (images per class) or --variations N --of K "
                             "(N images of each of K individuals)")
    if args.strength is not None:
        raise HandforgeError("--strength: only with --variations N --of K")
    opts = ExportOptions(run_dir=pathlib.Path(args.run_dir), out=pathlib.Path(args.out), per_class=args.per_class,
                         checkpoint=args.checkpoint, truncation=args.truncation, poses=args.poses,
                         pose_seed=args.pose_seed, seed=args.seed, batch_size=args.batch_size, limit=args.limit,
                         workers=args.workers, progress=args.progress)
    result = export(opts)
    print(result.summary())
    return 0


def _variations_command(args) -> int:
    from .variations import VariationOptions, export_variations

    if args.per_class is not None:
        raise HandforgeError("--per-class and --variations: give one of them (images per class, or N images of "
                             "each of --of K individuals)")
    if args.variations is None or args.individuals is None:
        raise HandforgeError(f"--variations N needs --of K (how many individuals), and --of needs --variations; "
                             f"got --variations {args.variations}, --of {args.individuals}")
    opts = VariationOptions(
        run_dir=pathlib.Path(args.run_dir), out=pathlib.Path(args.out), variations=args.variations,
        individuals=args.individuals, strength=0.5 if args.strength is None else args.strength,
        checkpoint=args.checkpoint, truncation=args.truncation, poses=args.poses, pose_seed=args.pose_seed,
        seed=args.seed, batch_size=args.batch_size, limit=args.limit, workers=args.workers, progress=args.progress)
    print(export_variations(opts).summary())
    return 0
