"""Checkpoints: Accelerate's state plus our train state, written atomically, rotated, loaded safely.

A checkpoint directory holds what ``accelerator.save_state`` writes (model weights as
safetensors, optimizer and RNG states loaded back with ``weights_only=True``; an RNG state file
that is missing or holds anything but RNG states stops the load), the task's extra
tensors (``task_state.safetensors``) and ``train_state.json``. It is written under a temporary
name and renamed when complete, so a kill during a save leaves the previous one loadable; a
directory without ``train_state.json`` is never taken for a checkpoint.
"""
import json
import os
import pathlib
import random
import shutil

import numpy as np
import torch

from safetensors.torch import load_file, save_file, save_model

from .errors import HandforgeError
from .run_paths import run_path

STEP_PREFIX = "step_"
TRAIN_STATE = "train_state.json"
TASK_STATE = "task_state.safetensors"


def rng_state_file(folder: pathlib.Path, process_index: int) -> pathlib.Path:
    """The file where ``accelerator.save_state`` keeps one process's RNG states."""
    from accelerate.utils import RNG_STATE_NAME

    return pathlib.Path(folder) / f"{RNG_STATE_NAME}_{process_index}.pkl"


def _rng_state_problem(states) -> str | None:
    """What is wrong with loaded RNG states, or None: each is applied to a private generator of its
    kind (never the global ones), which checks it as ``setstate`` will."""
    if not isinstance(states, dict):
        return f"holds a {type(states).__name__}, not the dict of RNG states"
    missing = [k for k in ("random_state", "numpy_random_seed", "torch_manual_seed") if k not in states]
    if missing:
        return f"has no {', '.join(missing)}"
    try:
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        if not (torch.is_tensor(states["torch_manual_seed"]) and states["torch_manual_seed"].dtype == torch.uint8):
            return "torch_manual_seed is not a uint8 tensor"
        torch.Generator().set_state(states["torch_manual_seed"])
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as exc:
        return f"an RNG state does not fit its generator ({type(exc).__name__}: {exc})"
    cuda = states.get("torch_cuda_manual_seed", [])
    if not (isinstance(cuda, list) and all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in cuda)):
        return "torch_cuda_manual_seed is not a list of uint8 tensors"
    return None


def check_rng_states(file: pathlib.Path) -> None:
    """Refuse a missing, damaged or planted RNG state file before ``accelerator.load_state`` reads it:
    Accelerate only logs when it cannot load one and goes on, and the resumed run is then silently
    no longer exact. Read with ``torch.load(weights_only=True)`` (Accelerate's loader and its numpy
    allow-list): a pickle naming any other global is refused, never run."""
    from accelerate.utils import load

    advice = ("the run cannot resume exactly; remove this checkpoint folder to resume from an earlier "
              "one, or start a new run")
    if not file.is_file():
        raise HandforgeError(f"{file}: missing; {advice}")
    try:
        states = load(str(file), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - refused by weights_only, truncated, not a pickle at all
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise HandforgeError(f"{file}: not an RNG state file ({type(exc).__name__}: {first_line}); {advice}") from None
    problem = _rng_state_problem(states)
    if problem:
        raise HandforgeError(f"{file}: not the RNG states a checkpoint saves: {problem}; {advice}")


def atomic_replace_dir(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Move a complete directory into place; an existing one is swapped out, then removed."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_weights(module, path: pathlib.Path) -> None:
    """Export a module's weights as safetensors, atomically (shared tensors are deduplicated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_model(module, str(tmp))
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, accelerator, run_dir: pathlib.Path, keep_last: int):
        self.accelerator = accelerator
        self.run_dir = pathlib.Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last

    def complete(self) -> list[pathlib.Path]:
        """Complete step checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir()
                 if p.name.startswith(STEP_PREFIX) and (p / TRAIN_STATE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))

    def latest(self) -> pathlib.Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, task, train_state: dict, name: str | None = None) -> pathlib.Path:
        """Save on every process (each writes its RNG state); the main process renames and rotates."""
        acc = self.accelerator
        final_name = name or f"{STEP_PREFIX}{train_state['step']:08d}"
        # Every process checks (the same files): none writes through a link out of the run.
        final = run_path(self.run_dir, "checkpoints", final_name)
        tmp = run_path(self.run_dir, "checkpoints", f".tmp-{final_name}")
        run_path(self.run_dir, "checkpoints", f".old-{final_name}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            extra = {k: v.detach().contiguous().cpu() for k, v in task.state_dict().items()}
            save_file(extra, str(tmp / TASK_STATE))
            # Written last: its presence marks the checkpoint complete.
            (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))
            atomic_replace_dir(tmp, final)
            if name is None:
                for stale in self.complete()[: -self.keep_last]:
                    shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, task, path: pathlib.Path, resume: bool = True) -> dict:
        """Restore models, optimizers, RNG states and the task's extras; return the train state.
        ``resume=False`` (a run loaded to generate or evaluate, perhaps by another number of
        processes than trained it): the RNG state files are not required, since nothing continues
        the run's random stream."""
        path = pathlib.Path(path)
        state_file = path / TRAIN_STATE
        if not state_file.is_file():
            raise HandforgeError(f"{path} is not a complete checkpoint (no {TRAIN_STATE})")
        try:
            train_state = json.loads(state_file.read_text())
            # Every process checks every process's file, so that all of them stop together.
            for index in range(self.accelerator.num_processes if resume else 0):
                check_rng_states(rng_state_file(path, index))
            self.accelerator.load_state(str(path))
            task.load_state_dict(load_file(str(path / TASK_STATE)))
        except HandforgeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged or mismatched checkpoint
            raise HandforgeError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
        return train_state
