"""``handforge generate RUN --variations N --of K --out DIR [--strength S]``: N images of each of K
synthetic individuals, through the export path of :mod:`.generate` (same manifest, batches, PNG
writer, resume), from any task that implements ``variations`` (:meth:`handforge.task.Task.variations`).

Individual k takes class k mod C (C the run's classes; one unnamed class when it has none). How its
N images differ depends on what the generator reads (the task's ``condition_fields``):

- a pose (anything beyond the label): one fixed noise per individual under N poses of its class,
  the same N for every individual of the class: the first N real samples of the class in the run
  dataset's train split (``--poses real``) or of a fresh draw (``--poses sampled``), as
  ``--per-class`` exports choose them; the manifest keeps each image's ``source_index`` and pose;
- the label only, or nothing: N perturbations of one generated individual, by ``--strength`` in
  (0, 1] (a GAN mixes new noise into its z, a diffusion model re-noises and denoises; see each task).

Files: ``DIR/individual_<k>/<index>.png``; each manifest record says its ``individual`` and
``variation`` (and ``label``, ``class_name`` when the run has classes). A batch holds whole
individuals (``batch_size // N`` of them, at least one) and draws all its random numbers from a
generator seeded with ``image_seed(seed, batch)``, so the settings fix the pixels.
"""
from __future__ import annotations

import pathlib
import time

import attrs
import torch

from handforge import __version__
from handforge.errors import HandforgeError
from handforge.fileio import file_hash
from handforge.runs import folder_sha256, load_run, resolve_checkpoint
from handforge.task import Task

from .generate import (POSES, _class_samples, _condition_fields, _pose_dataset, _set_truncation, prepare_out,
                       write_batches)
from .manifest import FORMAT, condition_batch, image_seed


@attrs.frozen
class VariationOptions:
    run_dir: pathlib.Path
    out: pathlib.Path
    variations: int  # N images per individual
    individuals: int  # K
    strength: float = 0.5
    checkpoint: str = "last"
    truncation: float | None = None
    poses: str = "real"
    pose_seed: int | None = None
    seed: int = 0
    batch_size: int = 64
    limit: int | None = None
    workers: int = 4
    progress: bool = True


def check_options(opts: VariationOptions) -> None:
    if opts.variations < 1:
        raise HandforgeError(f"--variations must be at least 1, got {opts.variations}")
    if opts.individuals < 1:
        raise HandforgeError(f"--of must be at least 1 (individuals), got {opts.individuals}")
    if not 0 < opts.strength <= 1:
        raise HandforgeError(f"--strength must be in (0, 1], got {opts.strength}")
    if opts.batch_size < 1:
        raise HandforgeError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.poses not in POSES:
        raise HandforgeError(f"--poses must be one of {', '.join(POSES)}, got {opts.poses!r}")


def check_task(run, run_dir) -> None:
    task = run.task
    if type(task).variations is Task.variations:
        raise HandforgeError(f"--variations: {run_dir} is a '{run.recipe.task.name}' run, and task "
                             f"{type(task).__name__} cannot make variations of an individual (it implements no "
                             f"variations(); generator tasks such as gan and diffusion do)")


def plan(run, opts: VariationOptions) -> dict:
    """The manifest: settings and every image's individual, variation, conditions and batch."""
    names = list(run.class_names)
    n_classes = max(1, len(names))
    fields = _condition_fields(run.task, run.dataset)
    posed = not set(fields) <= {"label"}
    n = opts.variations
    pose_seed, poses = None, None
    if posed:
        dataset, pose_seed = _pose_dataset(run, opts)
        poses = _class_samples(dataset, fields, len(names), n, f"--poses {opts.poses} from dataset "
                                                              f"'{run.recipe.data.name}' (N = --variations {n})")
    per_batch = max(1, opts.batch_size // n)
    images = []
    for k in range(opts.individuals):
        label = k % n_classes
        for j in range(n):
            index = len(images)
            batch = k // per_batch
            record = {"index": index, "file": f"individual_{k:04d}/{index:06d}.png", "batch": batch,
                      "batch_seed": image_seed(opts.seed, batch), "individual": k, "variation": j, "label": label}
            if names:
                record["class_name"] = names[label]
            if posed:
                source_index, conditions = poses[label][j]
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
        "variations": n,
        "individuals": opts.individuals,
        # poses: the individual's noise under other poses; perturb: the generated individual moved by strength
        "method": "poses" if posed else "perturb",
        "strength": None if posed else opts.strength,
        "condition_fields": list(fields),
        "poses": opts.poses if posed else None,
        "pose_seed": pose_seed,
        "dataset": run.recipe.data.name,
    }
    return {"format": FORMAT, "handforge_version": __version__, "complete": False,
            "source": {"run_dir": str(opts.run_dir.resolve()), "checkpoint_folder": str(checkpoint.resolve())},
            "settings": settings, "class_names": names, "images": images}


def export_variations(opts: VariationOptions, host=None, run=None):
    """Generate (or continue) the variations export ``opts`` describes; returns an
    :class:`.generate.ExportResult`."""
    started = time.perf_counter()
    check_options(opts)
    opts = attrs.evolve(opts, run_dir=pathlib.Path(opts.run_dir), out=pathlib.Path(opts.out))
    run = run or load_run(opts.run_dir, split="train", host=host, checkpoint=opts.checkpoint)
    check_task(run, opts.run_dir)
    _set_truncation(run.task, opts.truncation)
    manifest = plan(run, opts)
    prepare_out(opts.out, manifest, run.accelerator)
    settings = manifest["settings"]
    fields = sorted({"label", *settings["condition_fields"]})
    n = opts.variations

    def images_of(records):
        individuals = condition_batch(records[::n], fields)  # each individual's first record
        others = condition_batch(records, fields)
        generator = torch.Generator().manual_seed(records[0]["batch_seed"])
        images = run.task.variations(individuals, others, n, strength=opts.strength, generator=generator)
        return images.reshape(len(records), *images.shape[2:])

    return write_batches(run.accelerator, manifest, opts.out, images_of, opts, started)
