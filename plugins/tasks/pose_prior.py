"""The ``pose_prior`` task: a VAE prior over hand poses, VPoser's recipe (Pavlakos et al. 2019).

Slot ``prior``: a backbone built with ``role="pose_prior"`` and ``joints`` (15 or 30), with
``encode(pose) -> (mu, logvar)``, ``decode(z) -> (B, joints, 3, 3)`` rotations, ``decode_pose(z)``
(axis-angle) and ``set_statistics(mean, std)`` (``hand_vae``).

Input (``input``): ``both`` = ``hand_pose90`` (left 45 + right 45, the ``hand_poses`` dataset),
``right`` / ``left`` = one half of it, ``hand_pose`` = a one-hand dataset's 45 values
(``handshape_poses``, ``procedural_hands``). Poses are axis-angle, MANO joint order.

Loss per pose: reconstruction of the joints' rotation matrices (``matrix``: squared Frobenius
distance summed over joints; ``geodesic``: squared geodesic angle summed over joints) plus
``beta_t`` x KL(q(z|x) || N(0, I)), with ``beta_t`` rising linearly from 0 to ``beta`` over
``kl_warmup_steps`` (a warm-up against posterior collapse). The **energy** of a pose is this loss
at full ``beta`` with z at the posterior mean: a negative ELBO up to the beta weighting and
constants; low for poses like the training ones. An EMA of the weights (``ema_decay``) is what
samples, scores and is exported (``weights/prior.safetensors``).

Metric ``pose_prior`` and :meth:`PosePriorTask.finish` score held-out (val) poses: per-joint
geodesic reconstruction error in degrees (mean, 95th percentile), KL, energy; and as many poses
sampled at temperature 1: diversity (mean pairwise distance of the axis-angle vectors) and
precision / recall / density / coverage against the held-out poses (:func:`handforge.prdc.prdc`).

Command: ``handforge sample-poses RUN --num N --out poses.npz [--temperature T] [--seed S]
[--checkpoint weights|last|best|PATH]`` writes ``right`` and/or ``left`` (N, 45) float32 and their
``energy`` (N,): the file ``procedural_hands`` reads as ``poses_file``.
"""
from __future__ import annotations

import copy
import io
import math
import pathlib
from typing import Literal

import attrs
import numpy as np
import torch
import torch.nn as nn
from attrs import validators as v

from handforge import hookimpl
from handforge.errors import HandforgeError
from handforge.fileio import atomic_write_bytes
from handforge.prdc import prdc
from handforge.rotations import axis_angle_to_matrix, geodesic_angle
from handforge.task import Slot, Task

from .classifier import fetch

INPUTS = {"both": ("hand_pose90", slice(0, 90)), "right": ("hand_pose90", slice(45, 90)),
          "left": ("hand_pose90", slice(0, 45)), "hand_pose": ("hand_pose", slice(0, 45))}
STATISTICS_POSES = 16384  # training poses the input standardization is computed from
MIN_STD = 1e-3  # radians: a joint value (nearly) constant in the data is divided by this, not ~0
CHUNK = 4096
REPORT_KEYS = ("rec_deg", "rec_deg_p95", "kl", "energy", "diversity", "precision", "recall", "density", "coverage")


@attrs.define
class PosePriorConfig:
    input: Literal["both", "right", "left", "hand_pose"] = attrs.field(default="both", metadata={
        "help": "both: hand_pose90 (90 values); right / left: one half of it; hand_pose: a one-hand dataset's 45"})
    reconstruction: Literal["matrix", "geodesic"] = attrs.field(default="matrix", metadata={
        "help": "matrix: squared Frobenius distance of the rotation matrices; geodesic: squared angle"})
    beta: float = attrs.field(default=0.01, validator=v.ge(0.0), metadata={"help": "weight of the KL term"})
    kl_warmup_steps: int = attrs.field(default=1000, validator=v.ge(0), metadata={
        "help": "beta rises linearly from 0 over these steps (0: full beta from the start)"})
    lr: float = attrs.field(default=1e-3, validator=v.gt(0.0))
    weight_decay: float = attrs.field(default=1e-5, validator=v.ge(0.0))  # AdamW
    ema_decay: float = attrs.field(default=0.999, validator=[v.ge(0.0), v.lt(1.0)], metadata={
        "help": "EMA of the weights used to sample, score and export; 0 = the trained weights"})
    eval_poses: int = attrs.field(default=2048, validator=v.ge(16), metadata={
        "help": "held-out (val) poses scored, and poses sampled for PRDC / diversity"})
    prdc_k: int = attrs.field(default=5, validator=v.ge(1))


def reconstruction_terms(kind: str, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, J, 3, 3) predicted and true rotations -> (B,) reconstruction loss summed over joints."""
    if kind == "geodesic":
        return geodesic_angle(predicted, target).square().sum(-1)
    return (predicted - target).square().sum((-3, -2, -1))


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, in nats: (B, D) -> (B,)."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs of distinct rows."""
    n = len(x)
    if n < 2:
        return float("nan")
    total = 0.0
    for start in range(0, n, CHUNK):
        total += torch.cdist(x[start:start + CHUNK].double(), x.double()).sum().item()
    return total / (n * (n - 1))


class PosePriorTask(Task):
    """VPoser-style VAE prior of hand poses: reconstruction + beta * KL with a warm-up."""

    config_cls = PosePriorConfig

    def setup(self, run):
        self.bind(run)
        cfg = self.config
        self.field, self.columns = INPUTS[cfg.input]
        self.width = self.columns.stop - self.columns.start
        if getattr(run.dataset, "mean", None) is not None:
            raise HandforgeError(f"task 'pose_prior': dataset '{run.recipe.data.name}' is standardized; the prior "
                                 f"needs the raw axis-angle poses (set data.standardize = false)")
        component = run.components["prior"]
        model = component.build(role="pose_prior", image_size=None, joints=self.width // 3)
        for member in ("encode", "decode", "decode_pose", "set_statistics", "latent_dim"):
            if not hasattr(model, member):
                raise HandforgeError(f"model.prior: backbone '{component.name}' has no {member}; the pose_prior "
                                     f"task needs a pose-prior backbone (hand_vae)")
        train = self._poses(run.dataset, min(len(run.dataset), STATISTICS_POSES))
        model.set_statistics(train.mean(0), train.std(0).clamp_min(MIN_STD))
        model = model.to(self.device)
        self.ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.opt = run.accelerator.prepare(model, opt)
        self.val_poses = self._val_poses(run)

    def _poses(self, dataset, count: int) -> torch.Tensor:
        parts = [fetch(dataset, range(i, min(i + CHUNK, count)))[self.field] for i in range(0, count, CHUNK)]
        return self.select(torch.cat(parts)) if parts else torch.zeros(0, self.width)

    def select(self, values: torch.Tensor) -> torch.Tensor:
        """The columns of a batch's pose field this prior models, float32."""
        return values[:, self.columns].float()

    def _val_poses(self, run) -> torch.Tensor:
        data = run.recipe.data
        try:
            held_out = data.build(split="val")
        except HandforgeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise HandforgeError(f"task 'pose_prior': dataset '{data.name}' has no val split to score on: "
                                 f"{type(exc).__name__}: {exc}") from exc
        count = min(self.config.eval_poses, len(held_out))
        if count <= self.config.prdc_k:
            raise HandforgeError(f"task 'pose_prior': dataset '{data.name}' has {len(held_out)} val poses; "
                                 f"scoring needs more than prdc_k = {self.config.prdc_k}")
        return self._poses(held_out, count)

    # -- training -----------------------------------------------------------------------------

    def beta_at(self, step: int) -> float:
        cfg = self.config
        if cfg.kl_warmup_steps == 0:
            return cfg.beta
        return cfg.beta * min(1.0, step / cfg.kl_warmup_steps)

    def train_step(self, batch, step):
        acc, cfg = self.accelerator, self.config
        pose = self.select(batch[self.field])
        beta = self.beta_at(step)
        self.model.train()
        with acc.accumulate(self.model):
            out = self.model(pose)
            target = axis_angle_to_matrix(pose.view(len(pose), -1, 3))
            rec = reconstruction_terms(cfg.reconstruction, out["rotations"], target).mean()
            kl = gaussian_kl(out["mu"], out["logvar"]).mean()
            loss = rec + beta * kl
            acc.backward(loss)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.ema is not None and acc.sync_gradients:
            self._update_ema(step)
        with torch.no_grad():
            error = geodesic_angle(out["rotations"].detach(), target).mean() * (180.0 / math.pi)
        return {"loss": loss.detach(), "rec": rec.detach(), "kl": kl.detach(), "rec_deg": error,
                "beta": torch.tensor(beta, device=self.device)}

    def _update_ema(self, step: int):
        # The decay warms up like the GAN task's, so the first steps' weights do not linger.
        decay = min(self.config.ema_decay, (1 + step) / (10 + step))
        model = self.accelerator.unwrap_model(self.model)
        torch._foreach_lerp_(list(self.ema.parameters()), list(model.parameters()), 1.0 - decay)
        for ema_buffer, buffer in zip(self.ema.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    # -- the prior ----------------------------------------------------------------------------

    def prior(self) -> nn.Module:
        """The weights that sample and score: the EMA, else the trained model."""
        return self.ema if self.ema is not None else self.accelerator.unwrap_model(self.model)

    @torch.no_grad()
    def posterior(self, poses: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per pose (N, width): ``energy``, ``rec`` and ``kl`` (N,), ``joint_deg`` (N, joints): the
        geodesic error of each joint reconstructed from the posterior mean."""
        prior, cfg = self.prior(), self.config
        was_training = prior.training
        prior.eval()
        parts = {"energy": [], "rec": [], "kl": [], "joint_deg": []}
        try:
            for start in range(0, len(poses), CHUNK):
                x = poses[start:start + CHUNK].to(self.device).float()
                mu, logvar = prior.encode(x)
                target = axis_angle_to_matrix(x.view(len(x), -1, 3))
                rotations = prior.decode(mu)
                rec = reconstruction_terms(cfg.reconstruction, rotations, target)
                kl = gaussian_kl(mu, logvar)
                parts["energy"].append((rec + cfg.beta * kl).cpu())
                parts["rec"].append(rec.cpu())
                parts["kl"].append(kl.cpu())
                parts["joint_deg"].append((geodesic_angle(rotations, target) * (180.0 / math.pi)).cpu())
        finally:
            prior.train(was_training)
        return {k: torch.cat(p) for k, p in parts.items()}

    def energy(self, poses: torch.Tensor) -> torch.Tensor:
        """(N,) energy (negative ELBO at the posterior mean, with the KL weighted by beta) of (N, width) poses."""
        self._check_width(poses)
        return self.posterior(poses)["energy"]

    def _check_width(self, poses):
        if poses.ndim != 2 or poses.shape[1] != self.width:
            raise HandforgeError(f"pose_prior: poses must be (N, {self.width}) for input = "
                                 f"\"{self.config.input}\", got {tuple(poses.shape)}")

    @torch.no_grad()
    def sample_poses(self, count: int, temperature: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """(count, width) axis-angle poses decoded from z ~ N(0, temperature^2 I)."""
        prior = self.prior()
        was_training = prior.training
        prior.eval()
        try:
            z = torch.randn(count, prior.latent_dim, generator=generator) * temperature
            return torch.cat([prior.decode_pose(z[i:i + CHUNK].to(self.device)).cpu()
                              for i in range(0, count, CHUNK)]) if count else torch.zeros(0, self.width)
        finally:
            prior.train(was_training)

    def hands(self, poses: torch.Tensor) -> dict[str, np.ndarray]:
        """(N, width) poses as the ``left`` / ``right`` (N, 45) arrays of a poses file."""
        x = poses.cpu().numpy().astype(np.float32)
        if self.config.input == "both":
            return {"left": x[:, :45], "right": x[:, 45:]}
        return {"left": x} if self.config.input == "left" else {"right": x}

    def report(self, generator: torch.Generator | None = None) -> dict[str, float]:
        """The scores of the module docstring on the val poses and as many sampled ones."""
        held_out = self.val_poses
        post = self.posterior(held_out)
        joint = post["joint_deg"].flatten()
        samples = self.sample_poses(len(held_out), 1.0, generator or torch.Generator().manual_seed(0))
        values = {"rec_deg": joint.mean().item(), "rec_deg_p95": torch.quantile(joint.double(), 0.95).item(),
                  "kl": post["kl"].mean().item(), "energy": post["energy"].mean().item(),
                  "diversity": mean_pairwise_distance(samples),
                  "val_diversity": mean_pairwise_distance(held_out)}
        values.update(prdc(held_out, samples, k=self.config.prdc_k))
        return values

    def finish(self):
        values = self.report()
        if self.run.is_main_process:
            lines = [f"# Pose prior: {len(self.val_poses)} val poses, as many samples at temperature 1", "",
                     "| " + " | ".join(REPORT_KEYS) + " |", "|" + "---:|" * len(REPORT_KEYS),
                     "| " + " | ".join(f"{values[k]:.4f}" for k in REPORT_KEYS) + " |", "",
                     f"val poses' own diversity: {values['val_diversity']:.4f}", ""]
            atomic_write_bytes(self.run.path("final", "report.md"), "\n".join(lines).encode())
        self.accelerator.print(f"val reconstruction {values['rec_deg']:.2f} deg per joint (p95 "
                               f"{values['rec_deg_p95']:.2f}), KL {values['kl']:.2f}; samples: precision "
                               f"{values['precision']:.3f}, recall {values['recall']:.3f}")
        return values

    # -- state --------------------------------------------------------------------------------

    def state_dict(self):
        if self.ema is None:
            return {}
        return {f"ema.{k}": t.detach().contiguous() for k, t in self.ema.state_dict().items()}

    def load_state_dict(self, state):
        part = {k.removeprefix("ema."): t for k, t in state.items() if k.startswith("ema.")}
        if self.ema is not None and part:
            self.ema.load_state_dict(part)

    def export_modules(self):
        return {"prior": self.prior()}


class PosePriorMetric:
    """Val reconstruction error (degrees), KL and energy of the pose prior; diversity and PRDC of its samples."""

    def __init__(self, config=None, **_):
        self.config = config

    def evaluate(self, run) -> dict[str, float]:
        if not isinstance(run.task, PosePriorTask):
            raise HandforgeError(f"metric 'pose_prior' scores a pose_prior task; task {type(run.task).__name__} "
                                 f"is not one")
        return run.task.report()


# -- the sample-poses command -----------------------------------------------------------------------


def configure(parser):
    parser.add_argument("run_dir", type=pathlib.Path, metavar="RUN", help="a pose_prior run directory")
    parser.add_argument("--num", type=int, required=True, help="poses to sample")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="the .npz file to write")
    parser.add_argument("--temperature", type=float, default=1.0, help="standard deviation of the latent noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default="weights", help="weights (the exported EMA), last, best or a path")


def command(args) -> int:
    from handforge.runs import load_run

    if args.num < 1:
        raise HandforgeError(f"sample-poses: --num must be at least 1, got {args.num}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise HandforgeError(f"sample-poses: --temperature must be a positive number, got {args.temperature}")
    if args.out.suffix != ".npz":
        raise HandforgeError(f"sample-poses: --out {args.out}: must end in .npz")
    run = load_run(args.run_dir, device="cpu", checkpoint=args.checkpoint)
    task = run.task
    if not isinstance(task, PosePriorTask):
        raise HandforgeError(f"sample-poses: {args.run_dir} is a run of task '{run.recipe.task.name}', not pose_prior")
    poses = task.sample_poses(args.num, args.temperature, torch.Generator().manual_seed(args.seed))
    arrays = task.hands(poses)
    arrays["energy"] = task.energy(poses).numpy().astype(np.float32)
    arrays["temperature"] = np.float32(args.temperature)
    arrays["seed"] = np.int64(args.seed)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(args.out, buffer.getvalue())
    print(f"{args.out}: {args.num} poses ({', '.join(k for k in ('left', 'right') if k in arrays)}), "
          f"mean energy {float(arrays['energy'].mean()):.3f}")
    return 0


def needs(config: PosePriorConfig) -> tuple:
    return (INPUTS[config.input][0],)


@hookimpl
def register_tasks(register):
    register("pose_prior", PosePriorTask, config=PosePriorConfig, needs=needs,
             slots=(Slot("prior", "backbone", default="hand_vae", summary="the pose VAE (role pose_prior)"),))


@hookimpl
def register_metrics(register):
    register("pose_prior", PosePriorMetric)


@hookimpl
def register_commands(cli):
    cli.add_command("sample-poses", "sample hand poses from a trained pose_prior run into a poses .npz",
                    configure, command)
