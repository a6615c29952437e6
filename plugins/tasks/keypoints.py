"""The ``keypoints`` task: a network that finds the 21 hand keypoints of an image (seed 001).

Slots:

- ``regressor``: a backbone built with ``role="keypoints"``, ``image_size``, ``num_keypoints=21``
  and ``head`` (``"regression"``: coordinates straight from a linear head; ``"heatmap"``: one
  heatmap per joint, decoded by soft-argmax). Its ``forward(images)`` returns ``{"coords": (N, 21,
  2)}`` normalized to [0, 1] of the image (the ``keypoints`` convention), plus ``"heatmaps"``
  (N, 21, h, w) logits with the heatmap head;
- ``augment`` (optional): an augmentation that moves keypoints with the image
  (``keypoint_affine``): ``forward(batch) -> batch``, applied to each training batch on the device.

Loss: L1 between predicted and true normalized coordinates over the visible joints only (a joint
with visibility 0 has no ground truth to learn from), the seed's objective. With the heatmap head,
``heatmap_weight`` adds DSNT's regulariser (Nibali et al. 2018): the Jensen-Shannon divergence
between each visible joint's softmax heatmap and a normalized Gaussian of ``heatmap_sigma`` cells
at its true position, which keeps the heatmaps peaked where soft-argmax alone allows any spread.
It is off by default: on procedural hands at 64 px (mobilelite, 400 steps) weight 0.1 matched no
regulariser (PCK@0.05 0.123 vs 0.122) and weight 1 lost (0.098).
AdamW, cosine annealing to 0 over ``train.steps`` after an optional linear warm-up.

Evaluation: the ``pck`` metric (``[[eval.metrics]] name = "pck"``) scores the current weights on the
first ``val_samples`` images of the dataset's ``val`` split with
:func:`handforge.keypoint_math.keypoint_report` (``pck@0.05``, ``pck@0.2bbox``,
``auc@30px``, ``epe_px``) plus ``val_l1`` (the training loss on those images), and writes
``overlays/step_%08d.png``: val images with the true (green) and predicted (red) skeletons. With
``eval.best_metric = "pck@0.05"``, ``best_mode = "max"`` the loop keeps ``checkpoints/best``.
:meth:`KeypointsTask.finish` scores the last weights and those of ``checkpoints/best`` on the same
images: one ``type = "final"`` record and ``final/report.md``.
"""
from __future__ import annotations

import copy
import json
import math
import pathlib
from typing import Literal

import attrs
import torch
import torch.nn as nn
from accelerate.utils import broadcast
from attrs import validators as v
from safetensors.torch import load_file

from handforge import hookimpl
from handforge.data import N_KEYPOINTS, square_image_size
from handforge.errors import HandforgeError
from handforge.fileio import atomic_write_bytes
from handforge.imaging import save_grid
from handforge.keypoint_math import keypoint_report
from handforge.task import Slot, Task

from .classifier import fetch

EVAL_BATCH = 128
TRUE_COLOUR, PREDICTED_COLOUR = (40, 230, 40), (255, 40, 40)
REPORT_KEYS = ("pck@0.05", "pck@0.2bbox", "auc@30px", "epe_px", "val_l1")
# What accelerator.save_state calls the first prepared model's weights (safe_serialization=True).
CHECKPOINT_WEIGHTS = "model.safetensors"


@attrs.define
class KeypointsConfig:
    head: Literal["regression", "heatmap"] = attrs.field(default="regression", metadata={
        "help": "regression: coordinates from a linear head (the seed); heatmap: per-joint heatmaps "
                "decoded by soft-argmax"})
    loss: Literal["l1"] = "l1"  # on normalized coordinates, visible joints only (the seed's)
    heatmap_weight: float = attrs.field(default=0.0, validator=v.ge(0.0), metadata={
        "help": "heatmap head only: weight of the Jensen-Shannon divergence between each heatmap and a "
                "Gaussian at the true joint (DSNT); 0 = off"})
    heatmap_sigma: float = attrs.field(default=1.0, validator=v.gt(0.0), metadata={
        "help": "standard deviation of the target Gaussian, in heatmap cells"})
    lr: float = attrs.field(default=3e-4, validator=v.gt(0.0))
    weight_decay: float = attrs.field(default=1e-4, validator=v.ge(0.0))  # AdamW
    warmup_steps: int = attrs.field(default=0, validator=v.ge(0))  # linear warm-up, then cosine decay to 0
    val_samples: int = attrs.field(default=500, validator=v.ge(1))
    overlay_count: int = attrs.field(default=16, validator=v.ge(0), metadata={
        "help": "val images drawn in overlays/step_*.png at each evaluation (and in sample grids); 0 = none"})

    def __attrs_post_init__(self):
        if self.heatmap_weight and self.head != "heatmap":
            raise ValueError("heatmap_weight: only the heatmap head has heatmaps; set head = \"heatmap\" "
                             "or heatmap_weight = 0")


# -- losses ---------------------------------------------------------------------------------------


def masked_l1(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| over the x and y of visible joints: (N, K, 2), (N, K, 2), (N, K) -> ().
    No visible joint at all gives 0 (with a gradient), not NaN."""
    weight = visible.to(pred.dtype)[..., None]
    return ((pred - target).abs() * weight).sum() / (2 * weight.sum()).clamp(min=1.0)


def gaussian_targets(target: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """(N, K, h, w) Gaussians at normalized (N, K, 2) positions, each summing to 1. Cell (i, j) has
    its centre at ((j + 0.5) / w, (i + 0.5) / h), the soft-argmax convention; sigma in cells."""
    cx = target[..., 0:1] * width - 0.5  # in cell indices
    cy = target[..., 1:2] * height - 0.5
    cols = torch.arange(width, device=target.device, dtype=target.dtype)
    rows = torch.arange(height, device=target.device, dtype=target.dtype)
    gx = torch.exp(-(cols - cx) ** 2 / (2 * sigma ** 2))  # (N, K, w)
    gy = torch.exp(-(rows - cy) ** 2 / (2 * sigma ** 2))  # (N, K, h)
    maps = gy[..., :, None] * gx[..., None, :]
    # A joint far outside the frame underflows to all zeros: fall back to uniform, not 0/0.
    total = maps.sum((-2, -1), keepdim=True)
    return torch.where(total > 0, maps / total.clamp(min=1e-30), torch.full_like(maps, 1.0 / (height * width)))


def heatmap_js(logits: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mean Jensen-Shannon divergence (nats) between softmax(logits) (N, K, h, w) and Gaussians at the
    normalized targets (N, K, 2), over visible joints (N, K)."""
    n, k, h, w = logits.shape
    log_p = torch.log_softmax(logits.float().reshape(n, k, h * w), -1)
    q = gaussian_targets(target.float(), h, w, sigma).reshape(n, k, h * w)
    p = log_p.exp()
    log_m = torch.log((p + q) / 2)
    kl_p = (p * (log_p - log_m)).sum(-1)
    kl_q = (torch.xlogy(q, q) - q * log_m).sum(-1)
    js = 0.5 * (kl_p + kl_q)
    weight = visible.to(js.dtype)
    return (js * weight).sum() / weight.sum().clamp(min=1.0)


# -- prediction -----------------------------------------------------------------------------------


@torch.no_grad()
def predict_coords(model: nn.Module, images: torch.Tensor, device, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Normalized (N, 21, 2) keypoints the model finds in ``images`` (N, 3, S, S) in [-1, 1], on the
    CPU, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        parts = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            parts.append(model(chunk)["coords"].float().cpu())
        return torch.cat(parts) if parts else torch.zeros(0, N_KEYPOINTS, 2)
    finally:
        model.train(was_training)


class KeypointsTask(Task):
    """2D hand keypoint regression (direct or heatmap head), scored by PCK."""

    config_cls = KeypointsConfig

    # -- setup --------------------------------------------------------------------------------

    def setup(self, run):
        self.bind(run)
        cfg, acc = self.config, run.accelerator
        self.image_size = square_image_size(run.dataset, "task 'keypoints'")
        component = run.components["regressor"]
        model = component.build(role="keypoints", image_size=self.image_size, num_keypoints=N_KEYPOINTS,
                                head=cfg.head)
        self._check_output(model, component.name)
        model = model.to(self.device, memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.opt = acc.prepare(model, opt)
        self.augment = self._build_augment(run.components.get("augment"))
        self.total_steps = int(run.recipe.train.steps)
        self.val_images, self.val_keypoints = self._val_set(run)

    def _check_output(self, model, name):
        # One forward on a tiny batch now, so a backbone of another contract fails before training.
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(1, 3, self.image_size, self.image_size))
        model.train(was_training)
        coords = out.get("coords") if isinstance(out, dict) else None
        if coords is None or tuple(coords.shape) != (1, N_KEYPOINTS, 2):
            got = {k: tuple(t.shape) for k, t in out.items()} if isinstance(out, dict) else type(out).__name__
            raise HandforgeError(f"model.regressor: backbone '{name}' must return "
                                 f"{{\"coords\": (N, {N_KEYPOINTS}, 2)}} for role \"keypoints\"; it returned {got}")
        if self.config.head == "heatmap" and "heatmaps" not in out:
            raise HandforgeError(f"model.regressor: backbone '{name}' was asked for head = \"heatmap\" but "
                                 f"returned no \"heatmaps\"")

    def _build_augment(self, component):
        if component is None:
            return None
        if component.entry.info.get("signature") != "batch":  # forward(batch) -> batch, keypoints moved too
            raise HandforgeError(f"{component.path}: augmentation '{component.name}' moves images only; the "
                                 f"keypoints task needs one that moves the keypoints with the image "
                                 f"(e.g. keypoint_affine)")
        augment = component.build(image_size=self.image_size)
        return augment.to(self.device) if isinstance(augment, nn.Module) else augment

    def _val_set(self, run):
        data, count = run.recipe.data, self.config.val_samples
        try:
            held_out = data.build(split="val")
        except HandforgeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise HandforgeError(f"task 'keypoints': dataset '{data.name}' has no val split to validate on: "
                                 f"{type(exc).__name__}: {exc}") from exc
        if len(held_out) < count:
            raise HandforgeError(f"task.val_samples = {count}, but dataset '{data.name}' has {len(held_out)} "
                                 f"val images")
        parts = [fetch(held_out, range(i, min(i + EVAL_BATCH, count))) for i in range(0, count, EVAL_BATCH)]
        return torch.cat([p["image"] for p in parts]), torch.cat([p["keypoints"] for p in parts])

    # -- training -----------------------------------------------------------------------------

    def lr(self, step: int) -> float:
        """The learning rate of (1-based) ``step``: linear warm-up to ``lr``, then cosine annealing
        towards 0 (torch's CosineAnnealingLR with T_max = the steps after warm-up, stepped after each
        step, so the first one after warm-up runs at the full rate)."""
        cfg = self.config
        if step <= cfg.warmup_steps:
            return cfg.lr * step / cfg.warmup_steps
        progress = (step - 1 - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def losses(self, out: dict, keypoints: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of a forward's output against (N, 21, 3) keypoints: ``l1``, ``heatmap``
        (when weighted) and their weighted sum ``loss``."""
        cfg = self.config
        target, visible = keypoints[..., :2].float(), keypoints[..., 2] > 0
        terms = {"l1": masked_l1(out["coords"].float(), target, visible)}
        terms["loss"] = terms["l1"]
        if cfg.heatmap_weight:
            terms["heatmap"] = heatmap_js(out["heatmaps"], target, visible, cfg.heatmap_sigma)
            terms["loss"] = terms["loss"] + cfg.heatmap_weight * terms["heatmap"]
        return terms

    def train_step(self, batch, step):
        acc = self.accelerator
        if self.augment is not None:
            batch = self.augment(batch)
        for group in self.opt.param_groups:
            group["lr"] = self.lr(step)
        self.model.train()
        with acc.accumulate(self.model):
            images = batch["image"].contiguous(memory_format=torch.channels_last)
            terms = self.losses(self.model(images), batch["keypoints"])
            acc.backward(terms["loss"])
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        logs = {name: t.detach() for name, t in terms.items()}
        logs["lr"] = torch.tensor(self.lr(step), device=self.device)
        return logs

    # -- evaluation ---------------------------------------------------------------------------

    def predict(self, images: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """(N, 21, 2) normalized keypoints of ``images`` by the current (or given) weights, on the CPU."""
        return predict_coords(model or self.accelerator.unwrap_model(self.model), images, self.device)

    def predict_val(self, model: nn.Module | None = None) -> torch.Tensor:
        """Predictions for the val images. Each process predicts its share and all of them are
        gathered, so every process holds the same tensor (and computes the same metrics: the loop's
        best-checkpoint decision must agree on every process)."""
        acc, count = self.accelerator, len(self.val_images)
        if acc.num_processes == 1:
            return self.predict(self.val_images, model)
        if model is None:
            self._share_buffers()
        share = math.ceil(count / acc.num_processes)
        start = min(acc.process_index * share, count)
        mine = self.predict(self.val_images[start:start + share], model)
        padded = torch.zeros(share, N_KEYPOINTS, 2)  # gather needs one shape everywhere
        padded[:len(mine)] = mine
        # Shares are whole until one partial one, then empty: the first `count` gathered rows are in order.
        return acc.gather(padded.to(self.device)).cpu()[:count]

    def _share_buffers(self):
        """Give every process rank 0's buffers (BatchNorm statistics). DDP broadcasts them before each
        training forward, but that forward then updates each process's copy with its own batch: the
        shares would be predicted by slightly different networks, none of them the checkpointed one."""
        for buffer in self.accelerator.unwrap_model(self.model).buffers():
            buffer.copy_(broadcast(buffer.detach().clone(), from_process=0))

    def report(self, predicted: torch.Tensor) -> dict[str, float]:
        target, visible = self.val_keypoints[..., :2], self.val_keypoints[..., 2] > 0
        values = dict(keypoint_report(predicted, target, visible, self.image_size))
        values["val_l1"] = masked_l1(predicted, target, visible).item()
        return values

    def evaluate_val(self, step: int | None = None) -> dict[str, float]:
        """The metrics of the current weights on the val images; writes their overlay on the main process."""
        predicted = self.predict_val()
        if self.run.is_main_process and self.config.overlay_count:
            step = self.run.step if step is None else step
            self.write_overlay(self.run.path("overlays", f"step_{step:08d}.png"), predicted)
        return self.report(predicted)

    def write_overlay(self, path, predicted: torch.Tensor) -> pathlib.Path:
        """Val images with their true (green) and predicted (red) skeletons, captioned with the mean
        pixel error of the visible joints."""
        n = min(self.config.overlay_count, len(predicted))
        truth = self.val_keypoints[:n]
        guess = torch.cat([predicted[:n], torch.ones(n, N_KEYPOINTS, 1)], -1)
        visible = truth[..., 2] > 0
        error = (guess[..., :2] - truth[..., :2]).norm(dim=-1) * self.image_size
        mean = (error * visible).sum(1) / visible.sum(1).clamp(min=1)
        return save_grid(path, self.val_images[:n], keypoints=[truth, guess],
                         skeleton_colours=[TRUE_COLOUR, PREDICTED_COLOUR],
                         captions=[f"{e:.1f} px" for e in mean.tolist()])

    def sample(self, batch):
        """Training images with the skeletons the current weights find in them."""
        count = self.config.overlay_count
        if not count:
            return None
        images = batch["image"][:count]
        coords = self.predict(images)
        return {"image": images, "keypoints": torch.cat([coords, torch.ones(len(coords), N_KEYPOINTS, 1)], -1)}

    def best_weights(self) -> tuple[nn.Module, int] | None:
        """The model of ``checkpoints/best`` (the loop's, by ``eval.best_metric``) and its step; None
        when the run kept no best checkpoint."""
        best = pathlib.Path(self.run.run_dir) / "checkpoints" / "best"
        weights, state = best / CHECKPOINT_WEIGHTS, best / "train_state.json"
        if not (weights.is_file() and state.is_file()):
            return None
        model = copy.deepcopy(self.accelerator.unwrap_model(self.model))
        model.load_state_dict(load_file(str(weights), device="cpu"))
        step = int(json.loads(state.read_text()).get("best_step", -1))
        return model.to(self.device), step

    def finish(self):
        """The val report of the last weights and of the best checkpoint's: logged by the loop as one
        ``final`` record; ``final/report.md`` on the main process."""
        rows = {"last": self.report(self.predict_val())}
        record = dict(rows["last"])
        best = self.best_weights()
        if best is not None:
            model, step = best
            rows[f"best (step {step})"] = self.report(self.predict_val(model))
            record.update({f"best/{k}": value for k, value in rows[f"best (step {step})"].items()})
            record["best_step"] = step
        if self.run.is_main_process:
            atomic_write_bytes(self.run.path("final", "report.md"),
                               markdown_report(rows, len(self.val_images), self.image_size).encode())
        last = rows["last"]
        self.accelerator.print(f"val PCK@0.05 {last['pck@0.05']:.3f}, EPE {last['epe_px']:.2f} px (last weights)"
                               + (f"; best {record['best/pck@0.05']:.3f} at step {record['best_step']}"
                                  if best is not None else ""))
        return record

    # -- state --------------------------------------------------------------------------------

    def state_dict(self):
        if isinstance(self.augment, nn.Module):  # an augmentation with state resumes from it
            return {f"augment.{k}": t.detach().contiguous() for k, t in self.augment.state_dict().items()}
        return {}

    def load_state_dict(self, state):
        part = {k.removeprefix("augment."): t for k, t in state.items() if k.startswith("augment.")}
        if isinstance(self.augment, nn.Module) and part:
            self.augment.load_state_dict(part)

    def export_modules(self):
        return {"regressor": self.accelerator.unwrap_model(self.model)}


def markdown_report(rows: dict[str, dict], count: int, image_size: int) -> str:
    lines = [f"# Keypoints: {count} val images, {image_size} px", "",
             "| weights | " + " | ".join(REPORT_KEYS) + " |", "|---|" + "---:|" * len(REPORT_KEYS)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:.4f}" for k in REPORT_KEYS) + " |")
    return "\n".join(lines) + "\n"


# -- registration ---------------------------------------------------------------------------------


class Pck:
    """PCK@0.05 of the image, PCK@0.2 of the bbox, AUC over 0-30 px, EPE and L1 of the keypoints
    task's current weights on its val images (and an overlay PNG)."""

    def __init__(self, config=None, **_):
        self.config = config

    def evaluate(self, run) -> dict[str, float]:
        evaluate = getattr(run.task, "evaluate_val", None)
        if evaluate is None:
            raise HandforgeError(f"metric 'pck' scores a keypoints task's weights; task "
                                 f"{type(run.task).__name__} is not one")
        return evaluate(run.step)


@hookimpl
def register_tasks(register):
    register(
        "keypoints", KeypointsTask, config=KeypointsConfig, needs=("image", "keypoints"),
        slots=(
            Slot("regressor", "backbone", default="mobilelite", summary="the keypoint network"),
            Slot("augment", "augmentation", optional=True,
                 summary="moves images and keypoints together, on the device (keypoint_affine)"),
        ),
    )


@hookimpl
def register_metrics(register):
    register("pck", Pck, needs=("keypoints",))
