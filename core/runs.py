"""Finished (or checkpointed) runs, rebuilt for use: generating, evaluating, exporting.

A run directory (docs/architecture.md, "The run directory") holds the resolved ``recipe.toml``, ``weights/`` (the final
exported weights) and ``checkpoints/`` (``step_*`` and ``best``). :func:`load_run` rebuilds the
run's task from its recipe exactly as the loop builds it and loads one of them into it.
"""
from __future__ import annotations

import hashlib
import pathlib

import torch

from .checkpoint import STEP_PREFIX, TRAIN_STATE, CheckpointManager
from .errors import HandforgeError
from .fileio import update_digest

WEIGHTS_FOLDER = "weights"
CHECKPOINT_CHOICES = ("weights", "last", "best")


def resolve_checkpoint(run_dir, checkpoint: str | None = None) -> pathlib.Path:
    """The folder ``checkpoint`` names: None or ``"weights"`` -> ``weights/``; ``"last"`` -> the latest
    complete ``checkpoints/step_*``; ``"best"`` -> ``checkpoints/best``; anything else is a path to a
    checkpoint folder (absolute, or relative to the working directory)."""
    run_dir = pathlib.Path(run_dir)
    if checkpoint in (None, "weights"):
        folder = run_dir / WEIGHTS_FOLDER
        if not folder.is_dir():
            raise HandforgeError(f"{run_dir}: no {WEIGHTS_FOLDER}/ folder (did the run finish? "
                                 f"--checkpoint last loads its latest checkpoint)")
        return folder
    if checkpoint == "last":
        latest = CheckpointManager(None, run_dir, keep_last=1).latest()
        if latest is None:
            raise HandforgeError(f"--checkpoint last: {run_dir / 'checkpoints'} holds no complete "
                                 f"{STEP_PREFIX}* checkpoint")
        return latest
    if checkpoint == "best":
        best = run_dir / "checkpoints" / "best"
        if not (best / TRAIN_STATE).is_file():
            raise HandforgeError(f"--checkpoint best: {best} is not a complete checkpoint (the run keeps "
                                 f"one only when its recipe sets eval.best_metric)")
        return best
    path = pathlib.Path(checkpoint)
    if not (path / TRAIN_STATE).is_file():
        raise HandforgeError(f"--checkpoint {checkpoint}: not a checkpoint folder (no {TRAIN_STATE}); "
                             f"give best, last or the path of a checkpoints/step_* folder")
    return path


def folder_sha256(folder) -> str:
    """SHA-256 over a folder's files: each relative path and its bytes, in sorted order. Hidden files
    (temporaries of atomic writes) are left out."""
    folder = pathlib.Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(relative.as_posix().encode() + b"\0")
        update_digest(digest, file)
    return digest.hexdigest()


def _load_weights(run, folder: pathlib.Path) -> None:
    from safetensors.torch import load_model

    loaded = []
    for name, module in run.task.export_modules().items():
        file = folder / f"{name}.safetensors"
        if not file.is_file():
            continue
        try:
            load_model(module, str(file), strict=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file or another architecture
            raise HandforgeError(f"{file}: cannot load into the run's '{name}' module "
                                 f"({type(exc).__name__}: {exc})") from exc
        loaded.append(name)
    if not loaded:
        wanted = ", ".join(f"{n}.safetensors" for n in run.task.export_modules())
        raise HandforgeError(f"{folder}: none of the task's weight files ({wanted}); did the run finish?")


def load_run(run_dir, split: str = "val", device=None, host=None, checkpoint: str | None = None):
    """Rebuild a run's task from its resolved recipe and load its weights into it.

    ``checkpoint`` (see :func:`resolve_checkpoint`): None loads the exported final weights;
    ``"last"``, ``"best"`` or a checkpoint folder load a checkpoint with the task's extra state
    (EMA weights, ...). Returns the :class:`handforge.task.RunContext` (its ``dataset`` is the
    ``split`` split); the global RNG state afterwards is not defined (a checkpoint restores its own).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .recipe import load_recipe
    from .task import RunContext

    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "recipe.toml").is_file():
        raise HandforgeError(f"{run_dir}: not a run directory (no recipe.toml)")
    folder = resolve_checkpoint(run_dir, checkpoint)
    recipe = load_recipe(run_dir / "recipe.toml", host=host)
    accelerator = Accelerator(cpu=(device is not None and torch.device(device).type == "cpu"))
    set_seed(recipe.seed)  # as the loop does; the loaded weights replace the initial ones anyway
    dataset = recipe.data.build(split=split)
    run = RunContext(recipe=recipe, accelerator=accelerator, run_dir=run_dir, dataset=dataset,
                     components=dict(recipe.model))
    run.task = recipe.task.build()
    run.task.setup(run)
    if checkpoint in (None, "weights"):
        _load_weights(run, folder)
    else:
        CheckpointManager(accelerator, run_dir, keep_last=1).load(run.task, folder, resume=False)
    return run
