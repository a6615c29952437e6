"""The ``classifier`` task: a handshape classifier trained on a budget of real images, optionally
helped by generated ones (modes ``real``, ``gen``, ``mixgen``, ``reggen``; see
:mod:`.classifier_modes`).

Slots:

- ``classifier``: a backbone built with ``role="classifier"``, ``image_size`` and ``n_classes``
  (``resnet18``, ``mobilenet_v2``);
- ``generated`` (optional, kind ``dataset``): where generated images come from, a dataset table
  under ``[model.generated]`` (``name = "generated"`` for an exported folder, or any dataset with
  ``image`` and ``label``); required by the modes other than ``real`` (which leaves it unused, so
  one recipe serves all modes). Its classes are matched to the real ones by name.

Data: the recipe's ``[data]`` train split, cut to ``real_per_class`` images per class (or
``real_fraction`` of it) by a seeded permutation; the task hands the loop that subset as
``run.dataset``. Validation and test sets are the first ``val_samples`` and the next
``test_samples`` images of the ``val`` split. The ``classifier_accuracy`` metric
(``[[eval.metrics]]``) scores the current weights on either; with ``eval.best_metric =
"val_top1"``, ``best_mode = "max"`` the loop keeps the best checkpoint, and the task keeps those
weights too. When the run completes, the weights with the best validation top-1 (the last ones
if validation never ran) are scored on the test set in :meth:`ClassifierTask.finish`: a
``type = "test"`` record in ``metrics.jsonl`` (top-1, top-5, per-class accuracy, confusion
matrix), ``test/report.md`` and ``test/confusion.png``.
"""
from __future__ import annotations

import copy
import io
import math
from typing import Literal

import attrs
import numpy as np
import torch
import torch.nn as nn
from attrs import validators as v
from PIL import Image, ImageDraw, ImageFont

from handforge import hookimpl
from handforge.data import build_loader, collate
from handforge.errors import HandforgeError
from handforge.fileio import atomic_write_bytes
from handforge.run_paths import run_path
from handforge.task import Slot, Task

from .classifier_modes import MODES, Mode, draw, mode_loss, schedule

EVAL_BATCH = 256


@attrs.define
class ClassifierConfig:
    mode: Mode = attrs.field(default="real", validator=v.in_(MODES))
    real_per_class: int = attrs.field(default=0, validator=v.ge(0), metadata={
        "help": "real training images per class (10, 20, 40, ...); 0: use real_fraction"})
    real_fraction: float = attrs.field(default=1.0, validator=[v.gt(0.0), v.le(1.0)], metadata={
        "help": "share of the real train split used when real_per_class = 0"})
    split_seed: int = 0  # which real images form the budget (apart from the run's seed)
    val_samples: int = attrs.field(default=1000, validator=v.ge(1))
    test_samples: int = attrs.field(default=2000, validator=v.ge(1))
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = attrs.field(default=0.05, validator=v.gt(0.0))
    weight_decay: float = attrs.field(default=5e-4, validator=v.ge(0.0))
    warmup_steps: int = attrs.field(default=0, validator=v.ge(0))  # linear warm-up, then cosine decay to 0
    mixup_alpha: float = attrs.field(default=0.2, validator=v.ge(0.0), metadata={
        "help": "mixup lambda ~ Beta(alpha, alpha); 0 = no mixup"})
    schedule: Literal["decay", "growth"] = "decay"  # f(t) of mixgen / reggen, t in epochs of the real data
    schedule_a: float = attrs.field(default=1.0, validator=[v.ge(0.0), v.le(1.0)])
    schedule_b: float = attrs.field(default=0.1, validator=v.ge(0.0))
    pretrain_steps: int = attrs.field(default=0, validator=v.ge(0), metadata={
        "help": "gen mode: steps on generated images before the real ones"})
    flip: bool = True  # random horizontal flips (a mirrored hand is a hand of the other side, same shape)
    shift: float = attrs.field(default=0.125, validator=[v.ge(0.0), v.le(0.5)])  # random translation, of the side

    def __attrs_post_init__(self):
        # Options that would be silently ignored are mistakes: say so at `handforge validate`.
        if self.mode == "gen" and self.pretrain_steps == 0:
            raise ValueError("pretrain_steps: mode \"gen\" pre-trains on generated images for this many steps; "
                             "set it >= 1 (0 would be mode \"real\")")
        if self.mode != "gen" and self.pretrain_steps:
            raise ValueError(f"pretrain_steps: only mode \"gen\" pre-trains; mode is \"{self.mode}\"")
        if self.real_per_class and self.real_fraction != 1.0:
            raise ValueError("real_fraction: set either real_per_class or real_fraction, not both")


def n_per_class_indices(dataset, per_class: int, n_classes: int, order: torch.Tensor, chunk: int = 256):
    """The first ``per_class`` indices of each class along ``order``, reading labels in chunks (a
    dataset may render its samples: only as many are read as the budget needs)."""
    chosen: list[list[int]] = [[] for _ in range(n_classes)]
    for start in range(0, len(order), chunk):
        indices = order[start:start + chunk].tolist()
        labels = fetch(dataset, indices)["label"].tolist()
        for index, label in zip(indices, labels):
            if len(chosen[label]) < per_class:
                chosen[label].append(index)
        if all(len(c) == per_class for c in chosen):
            return sorted(i for c in chosen for i in c)
    short = {c: len(found) for c, found in enumerate(chosen) if len(found) < per_class}
    raise HandforgeError(f"task 'classifier': real_per_class = {per_class}, but the train split has fewer "
                         f"images of some classes (class: count) {short}")


def fetch(dataset, indices) -> dict:
    if hasattr(dataset, "__getitems__"):
        return collate(dataset.__getitems__(list(indices)))
    return collate([dataset[i] for i in indices])


class TensorSet(torch.utils.data.Dataset):
    """Images and labels held in memory (a budget of real images, a val or test set)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names):
        self.images, self.labels, self.class_names = images, labels, list(class_names)
        self.image_size = images.shape[-1]

    @classmethod
    def take(cls, dataset, indices, class_names) -> "TensorSet":
        parts = [fetch(dataset, indices[i:i + EVAL_BATCH]) for i in range(0, len(indices), EVAL_BATCH)]
        return cls(torch.cat([p["image"] for p in parts]), torch.cat([p["label"] for p in parts]), class_names)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}

    def __getitems__(self, indices):
        index = torch.as_tensor(indices)
        return {"image": self.images[index], "label": self.labels[index]}


class SubsetView(torch.utils.data.Dataset):
    """Some indices of a dataset, read lazily (a real-data fraction too large to hold)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices
        self.class_names = list(dataset.class_names)
        self.image_size = getattr(dataset, "image_size", None)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    def __getitems__(self, indices):
        return fetch(self.dataset, [self.indices[i] for i in indices])


def real_budget(dataset, config: ClassifierConfig, class_names) -> torch.utils.data.Dataset:
    """The real training images the budget allows, chosen by a permutation seeded with ``split_seed``."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.split_seed))
    if config.real_per_class:
        indices = n_per_class_indices(dataset, config.real_per_class, len(class_names), order)
        return TensorSet.take(dataset, indices, class_names)
    count = max(1, round(config.real_fraction * len(dataset)))
    indices = sorted(order[:count].tolist())
    if count <= 8192:  # small enough to hold: no re-rendering every epoch
        return TensorSet.take(dataset, indices, class_names)
    return SubsetView(dataset, indices)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(1)


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(true, predicted) counts."""
    return torch.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def random_flip_shift(x: torch.Tensor, flip: bool, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image random horizontal flip and translation by up to ``shift`` of the side (edge pixels
    repeat into the gap), drawn from a CPU generator."""
    n, size = x.shape[0], x.shape[-1]
    if flip:
        flips = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    pad = int(round(shift * size))
    if pad:
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).to(x.device)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
        rows = (offsets[:, 0, None] + torch.arange(size, device=x.device))[:, None, :, None]
        cols = (offsets[:, 1, None] + torch.arange(size, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, channel, rows, cols]
    return x


class ClassifierTask(Task):
    """Image classification on a budget of real images, optionally helped by generated ones."""

    config_cls = ClassifierConfig

    def __init__(self, config=None, **_):
        super().__init__(config)
        self.best: dict | None = None  # weights with the best validation top-1 so far
        self.best_top1, self.best_step = -1.0, -1

    # -- setup --------------------------------------------------------------------------------

    def setup(self, run):
        self.bind(run)
        cfg, acc = self.config, run.accelerator
        self.class_names = run.class_names
        if len(self.class_names) < 2:
            raise HandforgeError(f"task 'classifier': dataset '{run.recipe.data.name}' exposes "
                                 f"{len(self.class_names)} class names; a classifier needs labelled classes")
        self.train_set = real_budget(run.dataset, cfg, self.class_names)
        run.dataset = self.train_set  # the loop reads its batches from the budget
        self.val_set, self.test_set = self._held_out_sets(run)
        size = int(self.train_set[0]["image"].shape[-1])

        model = run.components["classifier"].build(role="classifier", image_size=size,
                                                   n_classes=len(self.class_names))
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
        if head and head[0].out_features != len(self.class_names):
            raise HandforgeError(f"model.classifier: backbone '{run.components['classifier'].name}' has a "
                                 f"{head[0].out_features}-way head for {len(self.class_names)} classes")
        model = model.to(self.device)
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                                  weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.opt = acc.prepare(model, opt)
        self.total_steps = int(getattr(getattr(run.recipe, "train", None), "steps", 1))
        batch = int(getattr(getattr(run.recipe, "train", None), "batch_size", 1)) * acc.num_processes
        self.epoch_steps = max(1, len(self.train_set) // batch)
        seed = int(getattr(run.recipe, "seed", 0) or 0)
        self.rng = torch.Generator().manual_seed(seed * 7919 + acc.process_index)
        self.generated = self._generated_stream(run, seed)

    def _held_out_sets(self, run):
        cfg, data = self.config, run.recipe.data
        try:
            held_out = data.build(split="val")
        except HandforgeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise HandforgeError(f"task 'classifier': dataset '{data.name}' has no val split to validate "
                                 f"and test on: {type(exc).__name__}: {exc}") from exc
        needed = cfg.val_samples + cfg.test_samples
        if len(held_out) < needed:
            raise HandforgeError(f"task.val_samples + task.test_samples = {needed}, but dataset "
                                 f"'{data.name}' has {len(held_out)} val images")
        val = TensorSet.take(held_out, list(range(cfg.val_samples)), self.class_names)
        test = TensorSet.take(held_out, list(range(cfg.val_samples, needed)), self.class_names)
        return val, test

    def _generated_stream(self, run, seed):
        component = run.components.get("generated")
        if self.config.mode == "real":
            return None
        if component is None:
            raise HandforgeError(f"task.mode = \"{self.config.mode}\" trains on generated images: add a "
                                 f"[model.generated] dataset table (e.g. name = \"generated\", path = ...)")
        dataset = component.build(split="train")
        names = list(getattr(dataset, "class_names", []) or [])
        unknown = sorted(set(names) - set(self.class_names))
        if not names or unknown:
            raise HandforgeError(f"model.generated: dataset '{component.name}' classes {unknown or 'none'} are "
                                 f"not among the real classes ({', '.join(self.class_names)})")
        self.gen_labels = torch.tensor([self.class_names.index(n) for n in names], device=self.device)
        from handforge.loop import BatchStream  # the loop's resumable batch stream

        acc, batch = self.accelerator, int(run.recipe.train.batch_size)
        loader = build_loader(dataset, batch, seed + 1, rank=acc.process_index, num_replicas=acc.num_processes)
        return BatchStream(loader, self.device)

    # -- training -----------------------------------------------------------------------------

    def f(self, step: int) -> float:
        """The schedule at the epoch (of the real budget) that ``step`` falls in."""
        cfg = self.config
        return schedule((step - 1) // self.epoch_steps, cfg.schedule, cfg.schedule_a, cfg.schedule_b)

    def lr(self, step: int) -> float:
        cfg = self.config
        if step <= cfg.warmup_steps:
            return cfg.lr * step / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def train_step(self, batch, step):
        cfg, acc = self.config, self.accelerator
        real = (self._augment(batch["image"]), batch["label"])
        gen = None
        pretraining = cfg.mode == "gen" and step <= cfg.pretrain_steps
        if self.generated is not None and (cfg.mode != "gen" or pretraining):
            g = self.generated.next()
            gen = (self._augment(g["image"]), self.gen_labels[g["label"]])
        f = self.f(step)
        draws = draw(len(real[1]), 0 if gen is None else len(gen[1]), cfg.mixup_alpha, f, self.rng)
        for group in self.opt.param_groups:
            group["lr"] = self.lr(step)
        self.model.train()
        with acc.accumulate(self.model):
            terms = mode_loss(cfg.mode, self.model, real, gen, draws, f, pretraining)
            acc.backward(terms["loss"])
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        logs = {k: t.detach() for k, t in terms.items()}
        logs["lr"] = torch.tensor(self.lr(step), device=self.device)
        if cfg.mode in ("mixgen", "reggen"):
            logs["f"] = torch.tensor(f, device=self.device)
        return logs

    def _augment(self, images):
        cfg = self.config
        return random_flip_shift(images, cfg.flip, cfg.shift, self.rng) if cfg.flip or cfg.shift else images

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, images: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Logits of ``images`` (N,3,H,W in [-1,1]) by the current (or given) weights, in eval mode."""
        model = model or self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            return torch.cat([model(images[i:i + EVAL_BATCH].to(self.device)).float().cpu()
                              for i in range(0, len(images), EVAL_BATCH)])
        finally:
            model.train(was_training)

    def evaluate_split(self, split: str, step: int | None = None) -> dict[str, float]:
        """Top-1 / top-5 accuracy (%) of the current weights on ``val`` or ``test``. On ``val``,
        weights better than any before are kept as the best."""
        data = self.val_set if split == "val" else self.test_set
        logits = self.logits(data.images)
        top1 = topk_correct(logits, data.labels, 1).float().mean().item() * 100
        top5 = topk_correct(logits, data.labels, 5).float().mean().item() * 100
        if split == "val" and top1 > self.best_top1:
            model = self.accelerator.unwrap_model(self.model)
            self.best = {k: t.detach().cpu().clone() for k, t in model.state_dict().items()}
            self.best_top1, self.best_step = top1, self.run.step if step is None else step
        return {f"{split}_top1": top1, f"{split}_top5": top5}

    def test_report(self) -> dict:
        """Scores of the best weights (by validation top-1; the last ones without validation) on the
        test set: top-1, top-5, class-mean and per-class accuracy (%), confusion matrix."""
        model = self.accelerator.unwrap_model(self.model)
        if self.best is not None:
            model = copy.deepcopy(model)
            model.load_state_dict(self.best)
        logits, labels = self.logits(self.test_set.images, model), self.test_set.labels
        n = len(self.class_names)
        correct = topk_correct(logits, labels, 1).float()
        per_class = {name: correct[labels == c].mean().item() * 100 for c, name in enumerate(self.class_names)
                     if (labels == c).any()}
        return {
            "weights": f"best (step {self.best_step}, val top-1 {self.best_top1:.2f})" if self.best is not None
            else "last",
            "test_top1": correct.mean().item() * 100,
            "test_top5": topk_correct(logits, labels, 5).float().mean().item() * 100,
            "test_class_mean": float(np.mean(list(per_class.values()))),
            "per_class": per_class,
            "confusion": confusion_matrix(logits.argmax(1), labels, n).tolist(),
        }

    def finish(self):
        """The test report of the best weights (see :func:`write_test_report`), logged by the loop."""
        run = self.run
        record = write_test_report(self, run.run_dir if run.is_main_process else None)
        run.accelerator.print(f"test top-1 {record['test_top1']:.2f} %, top-5 {record['test_top5']:.2f} % "
                              f"({record['weights']} weights); report in {run.run_dir}/test")
        return record

    # -- state --------------------------------------------------------------------------------

    def state_dict(self):
        state = {"rng": self.rng.get_state(), "best_top1": torch.tensor(self.best_top1),
                 "best_step": torch.tensor(self.best_step)}
        if self.generated is not None:
            state["generated_batches"] = torch.tensor(self.generated.consumed)
        if self.best is not None:
            state.update({f"best.{k}": t.contiguous() for k, t in self.best.items()})
        return state

    def load_state_dict(self, state):
        if "rng" in state:
            self.rng.set_state(state["rng"])
        self.best_top1 = float(state.get("best_top1", torch.tensor(-1.0)))
        self.best_step = int(state.get("best_step", torch.tensor(-1)))
        best = {k.removeprefix("best."): t for k, t in state.items() if k.startswith("best.")}
        self.best = best or None
        if self.generated is not None and "generated_batches" in state:
            self.generated.consumed, self.generated._iterator = int(state["generated_batches"]), None

    def export_modules(self):
        return {"classifier": self.accelerator.unwrap_model(self.model)}


# -- the report files -----------------------------------------------------------------------------


def markdown_report(report: dict, class_names) -> str:
    lines = [f"# Test report ({report['weights']} weights)", "",
             "| top-1 % | top-5 % | class-mean % |", "|---:|---:|---:|",
             f"| {report['test_top1']:.2f} | {report['test_top5']:.2f} | {report['test_class_mean']:.2f} |", "",
             "| class | accuracy % | test images |", "|---|---:|---:|"]
    counts = [sum(row) for row in report["confusion"]]
    for c, name in enumerate(class_names):
        if name in report["per_class"]:
            lines.append(f"| {name} | {report['per_class'][name]:.2f} | {counts[c]} |")
    return "\n".join(lines) + "\n"


def confusion_png(confusion, class_names, cell: int = 18) -> Image.Image:
    """Rows: true class, columns: predicted; shade = share of the row (white 0, black 1)."""
    counts = np.asarray(confusion, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = 6 + max(int(probe.textlength(name, font=font)) for name in class_names)
    n = len(class_names)
    image = Image.new("RGB", (margin + n * cell + 1, margin + n * cell + 1), "white")
    draw_ = ImageDraw.Draw(image)
    for r in range(n):
        draw_.text((2, margin + r * cell + 3), class_names[r], fill="black", font=font)
        for c in range(n):
            level = int(round(255 * (1 - shares[r, c])))
            colour = (level, level, 255) if r == c else (255, level, level)  # diagonal blue, errors red
            box = (margin + c * cell, margin + r * cell, margin + (c + 1) * cell, margin + (r + 1) * cell)
            draw_.rectangle(box, fill=colour, outline=(200, 200, 200))
    column_labels = Image.new("RGB", (margin, n * cell), "white")  # drawn horizontally, turned upright
    label_draw = ImageDraw.Draw(column_labels)
    for c in range(n):
        label_draw.text((2, c * cell + 3), class_names[c], fill="black", font=font)
    image.paste(column_labels.rotate(90, expand=True), (margin, 0))
    return image


def write_test_report(task, run_dir) -> dict:
    """Score the task's best weights on the test set, write ``test/report.md`` and
    ``test/confusion.png`` under ``run_dir`` (when given), and return the metrics record."""
    report = task.test_report()
    if run_dir is not None:
        atomic_write_bytes(run_path(run_dir, "test", "report.md"), markdown_report(report, task.class_names).encode())
        buffer = io.BytesIO()  # written atomically, like every file of a run: a link is replaced, not followed
        confusion_png(report["confusion"], task.class_names).save(buffer, format="PNG")
        atomic_write_bytes(run_path(run_dir, "test", "confusion.png"), buffer.getvalue())
    return {"type": "test", **{k: v for k, v in report.items() if k != "per_class"},
            **{f"test_acc/{name}": value for name, value in report["per_class"].items()}}


# -- registration ---------------------------------------------------------------------------------


@attrs.define
class ClassifierAccuracyConfig:
    split: Literal["val", "test"] = "val"


class ClassifierAccuracy:
    """Top-1 / top-5 accuracy (%) of the classifier task's current weights on its val or test set."""

    def __init__(self, config=None, **_):
        self.config = config or ClassifierAccuracyConfig()

    def evaluate(self, run) -> dict[str, float]:
        evaluate = getattr(run.task, "evaluate_split", None)
        if evaluate is None:
            raise HandforgeError(f"metric 'classifier_accuracy' scores a classifier task's weights; "
                                 f"task {type(run.task).__name__} is not one")
        return evaluate(self.config.split, run.step)


def check_slots(config: ClassifierConfig, filled: set) -> list[str]:
    """The modes other than real train on generated images: without the slot, say so at validate."""
    if config.mode != "real" and "generated" not in filled:
        return [f"model.generated: task.mode = \"{config.mode}\" trains on generated images; add a "
                f"[model.generated] dataset table (e.g. name = \"generated\", path = ...)"]
    return []


@hookimpl
def register_tasks(register):
    register(
        "classifier", ClassifierTask, config=ClassifierConfig, needs=("image", "label"), check_slots=check_slots,
        slots=(
            Slot("classifier", "backbone", default="resnet18", summary="the classifier network"),
            Slot("generated", "dataset", optional=True,
                 summary="generated images with labels (modes gen, mixgen, reggen)"),
        ),
    )


@hookimpl
def register_metrics(register):
    register("classifier_accuracy", ClassifierAccuracy, config=ClassifierAccuracyConfig)
