"""Checkpoints: Accelerate's state plus our train state, written atomically, rotated, loaded safely.

A checkpoint directory holds what ``accelerator.save_state`` writes (model weights as
safetensors, optimizer and RNG states loaded back with ``weights_only=True``), the task's extra
tensors (``task_state.safetensors``) and ``train_state.json``. It is written under a temporary
name and renamed when complete, so a kill during a save leaves the previous one loadable; a
directory without ``train_state.json`` is never taken for a checkpoint.
"""
import json
import os
import pathlib
import shutil

from safetensors.torch import load_file, save_file, save_model

from .errors import HandforgeError
from .run_paths import run_path

STEP_PREFIX = "step_"
TRAIN_STATE = "train_state.json"
TASK_STATE = "task_state.safetensors"


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

    def load(self, task, path: pathlib.Path) -> dict:
        """Restore models, optimizers, RNG states and the task's extras; return the train state."""
        path = pathlib.Path(path)
        state_file = path / TRAIN_STATE
        if not state_file.is_file():
            raise HandforgeError(f"{path} is not a complete checkpoint (no {TRAIN_STATE})")
        try:
            train_state = json.loads(state_file.read_text())
            self.accelerator.load_state(str(path))
            task.load_state_dict(load_file(str(path / TASK_STATE)))
        except HandforgeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged or mismatched checkpoint
            raise HandforgeError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
        return train_state
