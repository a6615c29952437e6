"""The contract between the run loop and a task (a training program), and the run context.

A task is registered like any component, with the slots it has::

    register("gan", GanTask, config=GanConfig, needs=("image",),
             slots=(Slot("generator", "backbone"), Slot("loss", "loss", default="hinge")))

The recipe fills the slots under ``[model.<slot>]``; the task builds each one with
``run.components[slot].build(**context)`` — the context (role, image size, number of classes,
...) is whatever the task's components expect, so the core never needs to know it.
"""
from typing import Any

import attrs
import torch


@attrs.frozen
class Slot:
    """A component slot a task declares. ``default`` fills the slot when a recipe leaves it out;
    a slot with no default and ``optional=False`` is required. ``role`` is the role the task
    builds the slot's component for; a component that declares its roles (a ``roles`` class
    attribute, or ``register(..., roles=...)``) and lacks it is rejected when the recipe is read."""

    name: str
    kind: str
    default: str | None = None
    optional: bool = False
    summary: str = ""
    role: str | None = None


class Task:
    """Base class of training programs. The loop calls, in order:

    ``setup(run)`` once (build components, optimizers, ``run.accelerator.prepare`` them);
    ``load_state_dict`` when resuming; ``train_step(batch, step)`` per step (inside it, one
    ``accelerator.accumulate(...)`` block for the whole iteration); ``sample(batch)`` for sample
    grids; ``state_dict()`` at each checkpoint; ``export_modules()`` for the final weights;
    ``finish()`` once at the end.
    """

    config_cls = None  # the task's attrs config class: a task built without a config gets its defaults

    def __init__(self, config=None, **_context):
        self.config = self.config_cls() if config is None and self.config_cls is not None else config

    def bind(self, run: "RunContext") -> None:
        """Keep the run, its accelerator and its device on the task: what every ``setup`` starts with."""
        self.run, self.accelerator, self.device = run, run.accelerator, run.accelerator.device

    def setup(self, run: "RunContext") -> None:
        raise NotImplementedError

    def train_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """One iteration. Returns detached scalar tensors (loss terms, statistics) by name."""
        raise NotImplementedError

    def sample(self, batch: dict) -> dict | None:
        """Images for a sample grid, ``{"image": (N,3,H,W) in [-1,1], "keypoints"?: (N,21,3),
        "nrow"?: cells per grid row, "captions"?: N strings}``, produced for the conditions in
        ``batch`` (without captions or nrow, cells are captioned with the batch's class names); None
        when the task makes no images. Called on
        the main process only, so it must not use collectives (run unwrapped modules)."""
        return None

    def generate(self, batch: dict) -> torch.Tensor:
        """Generated images (N,3,H,W) in [-1,1] for the conditions in ``batch``, for metrics."""
        raise NotImplementedError(f"task {type(self).__name__} does not generate images")

    def variations(self, individuals: dict, others: dict, count: int, *, strength: float,
                   generator: torch.Generator) -> torch.Tensor:
        """``count`` images of each of the K synthetic individuals that ``individuals`` (a batch of K
        conditions, as ``generate`` takes) defines: (K, count, 3, H, W) in [-1, 1].

        ``others`` is a batch of K * count conditions, row ``k * count + j`` for variation j of
        individual k (the same label; for a pose-conditioned model another pose of that class).
        How a family makes them: a pose-conditioned model keeps the individual's noise and takes
        the other poses; an unconditional or label model perturbs one generated image by
        ``strength`` in (0, 1] (a GAN moves its z, a diffusion model re-noises and denoises).
        ``generator`` draws every random number, so a seed fixes the result. A task that cannot
        make variations leaves this as it is: ``handforge generate --variations`` says so."""
        raise NotImplementedError(f"task {type(self).__name__} does not make variations")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the prepared models and optimizers (EMA weights, ...) for checkpoints.
        Saved as safetensors: tensors only, never pickled objects."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def export_modules(self) -> dict[str, torch.nn.Module]:
        """Modules whose final weights are exported as ``weights/<name>.safetensors``."""
        return {}

    def finish(self) -> dict | None:
        """Called once on every process when the last step is done, after the final checkpoint and
        the weights export: a task's own closing evaluation (a classifier's test-set report). What
        it returns is logged to ``metrics.jsonl`` as one record (``"type": "final"`` unless it
        names its own); it writes any files on the main process only. None: nothing to log."""
        return None


@attrs.define(eq=False)
class RunContext:
    """What tasks, metrics and observer hooks see of a run."""

    recipe: Any  # handforge.recipe.Recipe
    accelerator: Any  # accelerate.Accelerator
    run_dir: Any  # pathlib.Path
    dataset: Any
    components: dict  # slot name -> handforge.recipe.Component
    task: Task | None = None
    hooks: Any = None  # pluggy hook relay, for tasks that call observer hooks
    step: int = 0
    # The next training batch (on the device). The loop passes one batch to each train_step;
    # a task that needs more per step (several D steps, say) calls this, and resume stays exact.
    next_batch: Any = None

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def path(self, *parts):
        """``run_dir / parts`` for a file the task writes, refused if a symbolic link would lead the
        write out of the run directory (see :func:`handforge.run_paths.run_path`)."""
        from .run_paths import run_path

        return run_path(self.run_dir, *parts)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def class_names(self) -> list[str]:
        return list(getattr(self.dataset, "class_names", []) or [])
