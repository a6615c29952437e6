"""The task-agnostic training driver under Hugging Face Accelerate.

Order of a run: seed -> dataset -> task.setup (models built identically on every process) ->
per-process seed -> resume -> on_run_start -> steps (log, sample, eval, checkpoint on their
schedules) -> final sample/eval/checkpoint, weights export, task.finish -> on_run_end.
"""
import json
import math
import pathlib
import time
from collections import Counter

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, send_to_device, set_seed
from tqdm.auto import tqdm

from .checkpoint import CheckpointManager, save_weights
from .contracts import StreamingDataset, missing_on_instance
from .data import build_loader, check_sample, first_samples
from .errors import ContractError, HandforgeError, NonFiniteLossError
from .fileio import atomic_write_bytes
from .imaging import save_grid
from .plugin_manager import get_host
from .run_paths import check_run_dir, run_folder, run_path
from .stream import StreamBatches
from .task import RunContext
from .toml_writer import dump as dump_toml

SAMPLE_GRID_SIZE = 64
TRACKER_PROJECT = "tb"  # TensorBoard events go to tensorboard/tb/


class BatchStream:
    """Endless batches across epochs, counted so that a resumed run continues the same stream."""

    def __init__(self, loader, device, consumed: int = 0):
        self.loader, self.device, self.consumed = loader, device, consumed
        self._iterator = None

    def next(self) -> dict:
        while True:
            if self._iterator is None:
                sampler, batch_size = self.loader.sampler, self.loader.batch_size
                epoch, offset = divmod(self.consumed, sampler.per_epoch // batch_size)
                sampler.set_position(epoch, offset * batch_size)
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                continue
            self.consumed += 1
            return send_to_device(batch, self.device)


class MetricsLog:
    """``metrics.jsonl`` (always) plus TensorBoard; writes on the main process only."""

    def __init__(self, accelerator, path: pathlib.Path, tensorboard: bool):
        main = accelerator.is_main_process
        self.file = open(path, "a", encoding="utf-8") if main else None
        # The writer itself, not accelerator.log(): that flushes (and fsyncs) on every call,
        # up to several ms on a busy disk. The writer flushes on its own timer and at the end.
        self.writer = accelerator.get_tracker("tensorboard", unwrap=True) if main and tensorboard else None

    def write(self, record: dict, step: int) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            prefix = record.get("type", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "type"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _to_float(logs: dict, accelerator) -> dict:
    """Mean over processes of each logged scalar (a collective: every process calls it)."""
    names = sorted(logs)
    values = torch.stack([logs[n].detach().float().reshape(()) for n in names])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values.to(accelerator.device), reduction="mean")
    return dict(zip(names, values.cpu().tolist()))


def _check_finite(logs: dict, step: int, accelerator, last_checkpoint) -> None:
    names = list(logs)
    if accelerator.num_processes > 1:  # every process must stop together: one collective
        bad = torch.stack([~torch.isfinite(logs[n].detach().float().reshape(())) for n in names])
        flags = accelerator.reduce(bad.to(accelerator.device).float(), reduction="sum").tolist()
    else:  # a few .item() calls cost ~10 us; building and reducing a tensor ~160 us per step
        flags = [not math.isfinite(logs[n].item()) for n in names]
    if any(flags):
        terms = ", ".join(f"'{n}' = {logs[n].item()}" for n, f in zip(names, flags) if f)
        kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        raise NonFiniteLossError(f"step {step}: non-finite loss {terms}; run stopped ({kept})")


def _data_state(stream) -> dict:
    """Where the training data is, for a checkpoint: batches consumed, and with a stream every
    process's position in it (a collective: every process calls it)."""
    state = {"batches": stream.consumed}
    if isinstance(stream, StreamBatches):
        state["stream"] = gather_object([stream.position()])
    return state


def _skipped(stream) -> dict:
    """What the streams of all processes skipped so far, by kind (a collective with several)."""
    return dict(sum((Counter(c) for c in gather_object([dict(stream.skipped)])), Counter()))


def _write_run_files(recipe, host, run_dir: pathlib.Path) -> None:
    dump_toml(recipe.to_dict(), run_path(run_dir, "recipe.toml"))
    lines = sorted({f"{p.dist}=={p.version}" if p.dist else f"{p.name}  # local file" for p in host.plugins
                    if not p.error})
    atomic_write_bytes(run_path(run_dir, "plugins.lock"), ("\n".join(lines) + "\n").encode())


def _save_samples(run, fixed_batch, step: int) -> None:
    if not run.is_main_process:  # sampling runs unwrapped modules: no collective to join
        return
    out = run.task.sample(fixed_batch)
    if out is None:
        return
    names = run.class_names
    labels = fixed_batch.get("label")
    nrow = out.get("nrow")  # a task that lays out several cells per sample (pose transfer) sets its row width
    captions = out.get("captions")
    if captions is None and nrow is None and names and labels is not None:
        captions = [names[i] for i in labels[: len(out["image"])].tolist()]
    keypoints = out.get("keypoints")
    save_grid(run_path(run.run_dir, "samples", f"step_{step:08d}.png"), out["image"].float().cpu(),
              keypoints=None if keypoints is None else keypoints.cpu(), captions=captions, nrow=nrow)


class Trainer:
    """One run of a recipe."""

    def __init__(self, recipe, host=None):
        self.recipe, self.host = recipe, host or get_host()
        cfg = recipe.train
        self.run_dir = recipe.run_dir
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision=cfg.mixed_precision,
            log_with="tensorboard" if cfg.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir),
                                                logging_dir=str(self.run_dir / "tensorboard")),
        )
        self.hooks = self.host.pm.hook
        self.checkpoints = CheckpointManager(self.accelerator, self.run_dir, cfg.keep_last)

    def _prepare_run_dir(self) -> None:
        acc, recipe = self.accelerator, self.recipe
        # Every process checks before any writes, so all of them stop together.
        check_run_dir(recipe.output_dir, recipe.name)
        if self.checkpoints.latest() is not None and not recipe.resume:
            raise HandforgeError(f"{self.run_dir} already holds checkpoints: add resume=true to continue "
                                 f"that run, or name=<new name> to start another")
        if acc.is_main_process:
            run_folder(self.run_dir, "samples")
            _write_run_files(recipe, self.host, self.run_dir)
        acc.wait_for_everyone()

    def run(self) -> RunContext:
        acc, recipe, cfg = self.accelerator, self.recipe, self.recipe.train
        self._prepare_run_dir()
        set_seed(recipe.seed)  # identical model initialisation on every process
        dataset = recipe.data.build(split="train")
        check_sample(dataset[0], where=f"dataset '{recipe.data.name}' sample 0")
        run = RunContext(recipe=recipe, accelerator=acc, run_dir=self.run_dir, dataset=dataset,
                         components=dict(recipe.model), hooks=self.hooks)
        run.task = recipe.task.build()
        run.task.setup(run)
        dataset = run.dataset  # a task may narrow what it trains on in setup (a budget of real images)
        self.metrics = [m.build() for m in recipe.metrics]
        set_seed(recipe.seed, device_specific=True)  # different noise and augmentation per process

        state = {"step": 0, "batches": 0, "best": None}
        if recipe.resume:
            latest = self.checkpoints.latest()
            if latest is not None:
                state.update(self.checkpoints.load(run.task, latest))
                acc.print(f"resumed from {latest} at step {state['step']}")
            else:
                acc.print(f"resume=true but {self.checkpoints.dir} has no checkpoint: starting from step 0")
        stream, warning = self._batches(dataset, state)
        self.stream = stream
        run.next_batch = stream.next
        fixed_batch = send_to_device(first_samples(dataset, SAMPLE_GRID_SIZE), acc.device)

        if cfg.tensorboard:
            run_path(self.run_dir, "tensorboard", TRACKER_PROJECT)  # the tracker writes below it
            acc.init_trackers(TRACKER_PROJECT)
        log = MetricsLog(acc, run_path(self.run_dir, "metrics.jsonl"), cfg.tensorboard)
        if warning:
            acc.print(f"warning: {warning}")
            log.write({"step": state["step"], "type": "warning", "message": warning}, state["step"])
        last_checkpoint = self.checkpoints.latest()
        status = "failed"
        self.hooks.on_run_start(run=run)
        try:
            last_checkpoint = self._steps(run, stream, fixed_batch, state, log, last_checkpoint)
            status = "completed"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            log.close()
            if cfg.tensorboard:
                acc.end_training()
            self.hooks.on_run_end(run=run, status=status)
        return run

    def _batches(self, dataset, state):
        """The training batches of this process: read by index (``train.read = "index"``) or from
        the dataset's stream; and a warning when a resumed stream cannot continue exactly."""
        acc, recipe, cfg = self.accelerator, self.recipe, self.recipe.train
        if cfg.read == "index":
            loader = build_loader(dataset, cfg.batch_size, recipe.seed, cfg.num_workers,
                                  rank=acc.process_index, num_replicas=acc.num_processes)
            return BatchStream(loader, acc.device, consumed=state["batches"]), None
        if missing_on_instance(dataset, [StreamingDataset]):  # a factory function: known only now
            data = recipe.data
            raise ContractError(f"train.read: \"stream\" needs a dataset with a stream(rank, world, epoch, shuffle) "
                                f"method; dataset '{data.name}' ({data.entry.origin}): the run trains on a "
                                f"{type(dataset).__name__}, which has none")
        positions, warning, position = state.get("stream"), None, None
        if positions is not None and len(positions) == acc.num_processes:
            position = positions[acc.process_index]
        elif state["step"]:
            # Saved by another number of processes (or read by index): each process's share differs.
            epoch = min(p["epoch"] for p in positions) if positions else 0
            saved = f"by {len(positions)} process(es)" if positions else "without stream positions"
            warning = (f"the checkpoint of step {state['step']} was saved {saved}; with {acc.num_processes} the "
                       f"stream starts epoch {epoch} over, so this resumed run is not the uninterrupted one")
            skipped = sum((Counter(p["skipped"]) for p in positions or []), Counter())
            position = {"epoch": epoch, "skipped": dict(skipped) if acc.is_main_process else {}}
        return StreamBatches(dataset, cfg.batch_size, recipe.seed, cfg.num_workers, acc.device,
                             rank=acc.process_index, world=acc.num_processes, position=position,
                             consumed=state["batches"]), warning

    def _steps(self, run, stream, fixed_batch, state, log, last_checkpoint):
        acc, cfg = self.accelerator, self.recipe.train
        progress = tqdm(total=cfg.steps, initial=state["step"], disable=not (acc.is_main_process and cfg.progress),
                        dynamic_ncols=True, desc=self.recipe.name)
        start_time, start_step = time.perf_counter(), state["step"]
        for step in range(state["step"] + 1, cfg.steps + 1):
            run.step = step
            logs = run.task.train_step(stream.next(), step)
            _check_finite(logs, step, acc, last_checkpoint)
            self.hooks.on_step_end(run=run, step=step, logs=logs)
            progress.update(1)
            final = step == cfg.steps
            if step % cfg.log_every == 0 or final:
                values = _to_float(logs, acc)
                elapsed = time.perf_counter() - start_time
                record = {"step": step, "type": "train", **values,
                          "samples_per_s": (step - start_step) * cfg.batch_size * acc.num_processes / elapsed}
                if isinstance(stream, StreamBatches):  # bad data the streams left out, all processes
                    kinds = _skipped(stream)
                    record.update(skipped=sum(kinds.values()), **({"skipped_kinds": kinds} if kinds else {}))
                log.write(record, step)
                progress.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
            if (cfg.sample_every and step % cfg.sample_every == 0) or final:
                _save_samples(run, fixed_batch, step)
            evaluate = self.metrics and ((self.recipe.eval.every and step % self.recipe.eval.every == 0) or final)
            if evaluate:
                self._evaluate(run, step, state, log)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or final:
                state.update(step=step, **_data_state(stream))
                last_checkpoint = self.checkpoints.save(run.task, state)
                self.hooks.on_checkpoint_saved(run=run, step=step, path=last_checkpoint)
        progress.close()
        if acc.is_main_process:
            for name, module in run.task.export_modules().items():
                save_weights(module, run_path(self.run_dir, "weights", f"{name}.safetensors"))
        acc.wait_for_everyone()
        closing = run.task.finish()
        if closing:
            log.write({"step": run.step, "type": "final", **closing}, run.step)
        acc.wait_for_everyone()
        return last_checkpoint

    def _evaluate(self, run, step, state, log) -> None:
        values = {}
        for component, metric in zip(self.recipe.metrics, self.metrics):
            try:
                result = metric.evaluate(run)
            except HandforgeError:
                raise
            except Exception as exc:
                raise HandforgeError(f"{component.path}: metric '{component.name}' "
                                     f"({component.entry.origin}) failed: {type(exc).__name__}: {exc}") from exc
            values.update({k: float(v) for k, v in result.items()})
        log.write({"step": step, "type": "eval", **values}, step)
        self.hooks.on_eval_end(run=run, step=step, metrics=values)
        best_name, mode = self.recipe.eval.best_metric, self.recipe.eval.best_mode
        if best_name and best_name in values:
            value, best = values[best_name], state.get("best")
            if best is None or (value < best if mode == "min" else value > best):
                state.update(best=value, best_step=step, step=step, **_data_state(self.stream))
                self.checkpoints.save(run.task, state, name="best")


def train(recipe, host=None) -> RunContext:
    """Run a validated recipe to the end (or resume it when ``recipe.resume``)."""
    return Trainer(recipe, host).run()

