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
``kl_warmup_steps`` (a warm-up against posterior collapse). An EMA of the weights (``ema_decay``)
is what samples, scores and is exported (``weights/prior.safetensors``).

The **energy** of a pose x, with the EMA weights in eval mode (no dropout):
``E(x) = R(decode(mu(x)), x) + beta * KL(q(z|x) || N(0, I))``, R the training loss's reconstruction
term (``reconstruction``), ``beta`` the full one (not the warm-up's). Deterministic: z at the
posterior mean. With ``samples = K`` R is averaged over K draws z ~ q(z|x) from a seeded generator,
a Monte-Carlo estimate of ``E_q[R] + beta * KL``, which is 2 s^2 x the negative ELBO of a Gaussian
likelihood with variance s^2 = beta / 2 per rotation-matrix entry (``geodesic``: per joint angle), up
to a constant: the same ranking of poses. Low for poses like the training ones.

Metric ``pose_prior`` and :meth:`PosePriorTask.finish` score each held-out split: ``val`` (the
dataset's val split) and ``test`` (``test_poses``: by default a prepared folder's ``test/``, read with
:func:`handforge.pose_files.load_poses`), ``eval_poses`` of each spread evenly over it: per-joint geodesic
reconstruction error in degrees (mean, 95th percentile), KL, energy, the split's own diversity; and
PRDC (:func:`handforge.prdc.prdc`) of as many poses sampled at temperature 1 against it. Keys are
prefixed by the split (``val_rec_deg``, ``test_rec_deg``, ...); ``diversity`` is the samples' (mean
pairwise distance of the axis-angle vectors). :meth:`PosePriorTask.finish` also writes
``final/report.json`` (``{"val": {...}, "test": {...}, "samples": {...}}``) and ``final/report.md``.

Commands: ``handforge sample-poses RUN --num N --out poses.npz [--temperature T] [--seed S]
[--checkpoint weights|last|best|PATH] [--overwrite]`` writes ``right`` and/or ``left`` (N, 45)
float32 and their ``energy`` (N,): the file ``procedural_hands`` reads as ``poses_file``.
``handforge energy RUN POSES [--split S] [--samples K] [--seed S] [--out e.npy] [--json]`` scores a
poses file (or folder, or a prepared folder's split): count, mean, median, p5, p95 of the energies.
"""
from __future__ import annotations

import copy
import io
import json
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
from handforge.pose_files import HANDS, load_poses
from handforge.prdc import prdc
from handforge.rotations import axis_angle_to_matrix, geodesic_angle
from handforge.task import Slot, Task

from .classifier import fetch

INPUTS = {"both": ("hand_pose90", slice(0, 90)), "right": ("hand_pose90", slice(45, 90)),
          "left": ("hand_pose90", slice(0, 45)), "hand_pose": ("hand_pose", slice(0, 45))}
STATISTICS_POSES = 16384  # training poses the input standardization is computed from
MIN_STD = 1e-3  # radians: a joint value (nearly) constant in the data is divided by this, not ~0
CHUNK = 4096
# Per split, in final/report.md; "diversity" there is the split's own poses'.
REPORT_KEYS = ("rec_deg", "rec_deg_p95", "kl", "energy", "precision", "recall", "density", "coverage", "diversity")


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
        "help": "poses scored of each held-out split (val, test), and as many sampled for PRDC / diversity"})
    prdc_k: int = attrs.field(default=5, validator=v.ge(1))
    test_poses: str = attrs.field(default="auto", metadata={
        "help": "scored as split 'test' beside val: auto = <data.root>/test when that prepared split exists, "
                "none, or a poses .npz / split folder"})


def reconstruction_terms(kind: str, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, J, 3, 3) predicted and true rotations -> (B,) reconstruction loss summed over joints."""
    if kind == "geodesic":
        return geodesic_angle(predicted, target).square().sum(-1)
    return (predicted - target).square().sum((-3, -2, -1))


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, in nats: (B, D) -> (B,)."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)


def spread(length: int, count: int) -> torch.Tensor:
    """``count`` <= ``length`` distinct indices evenly spaced over range(length), from 0."""
    return torch.arange(count, dtype=torch.int64) * length // max(count, 1)


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
        self.eval_sets = {"val": self._val_poses(run), **self._test_poses(run)}

    def _poses(self, dataset, count: int) -> torch.Tensor:
        """``count`` poses spread evenly over ``dataset``: a prepared split is ordered by sequence, so
        its first rows would be a few seconds of one recording."""
        index = spread(len(dataset), count).tolist()
        parts = [fetch(dataset, index[i:i + CHUNK])[self.field] for i in range(0, count, CHUNK)]
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

    def _test_poses(self, run) -> dict[str, torch.Tensor]:
        """``{"test": poses}`` from ``test_poses`` (``eval_poses`` of them, spread), or {} when there is none.
        A dataset's splits are train and val only; a prepared folder's test split is read as the
        poses folder it is, with the one poses-file reader."""
        option = self.config.test_poses
        if option == "none":
            return {}
        if option == "auto":
            root = getattr(run.recipe.data.config, "root", None)
            folder = pathlib.Path(root) / "test" if isinstance(root, str) and root else None
            if folder is None or not any((folder / f"{hand}.npy").is_file() for hand in HANDS):
                return {}
            source = folder
        else:
            source = pathlib.Path(option)
        poses = self.poses_from_hands(load_poses(source, "task.test_poses"), f"task.test_poses {source}")
        poses = poses[spread(len(poses), min(self.config.eval_poses, len(poses)))]
        if len(poses) <= self.config.prdc_k:
            raise HandforgeError(f"task.test_poses {source}: {len(poses)} poses; scoring needs more than "
                                 f"prdc_k = {self.config.prdc_k}")
        return {"test": poses}

    def poses_from_hands(self, hands: dict[str, torch.Tensor], where: str) -> torch.Tensor:
        """The (N, width) poses this prior models from a poses file's ``left`` / ``right`` arrays
        (the inverse of :meth:`hands`): ``both`` needs both hands (left then right), ``hand_pose``
        and ``right`` the right one, ``left`` the left one."""
        wanted = {"both": ("left", "right"), "left": ("left",)}.get(self.config.input, ("right",))
        missing = [hand for hand in wanted if hand not in hands]
        if missing:
            raise HandforgeError(f"{where}: no '{missing[0]}' poses; this prior (input = \"{self.config.input}\") "
                                 f"scores {' + '.join(wanted)} (it has {', '.join(hands)})")
        if len({len(hands[hand]) for hand in wanted}) > 1:
            raise HandforgeError(f"{where}: 'left' has {len(hands['left'])} poses, 'right' {len(hands['right'])}; "
                                 f"a two-hand prior scores rows of both, so they must match")
        return torch.cat([hands[hand] for hand in wanted], 1)

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
    def posterior(self, poses: torch.Tensor, samples: int = 0,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per pose (N, width): ``energy``, ``rec`` and ``kl`` (N,), ``joint_deg`` (N, joints): the
        geodesic error of each joint reconstructed from the posterior mean.

        ``rec`` (and so ``energy = rec + beta * kl``) is the training loss's reconstruction term at
        z = mu (``samples = 0``), or its mean over ``samples`` draws z = mu + sigma * eps with eps
        from ``generator`` (CPU; default seed 0), drawn chunk by chunk, draw by draw, in order."""
        prior, cfg = self.prior(), self.config
        if samples and generator is None:
            generator = torch.Generator().manual_seed(0)
        was_training = prior.training
        prior.eval()
        parts = {"energy": [], "rec": [], "kl": [], "joint_deg": []}
        try:
            for start in range(0, len(poses), CHUNK):
                x = poses[start:start + CHUNK].to(self.device).float()
                mu, logvar = prior.encode(x)
                target = axis_angle_to_matrix(x.view(len(x), -1, 3))
                rotations = prior.decode(mu)
                if samples:
                    sigma = (0.5 * logvar).exp()
                    rec = sum(reconstruction_terms(cfg.reconstruction, prior.decode(
                        mu + sigma * torch.randn(mu.shape, generator=generator).to(mu)), target)
                        for _ in range(samples)) / samples
                else:
                    rec = reconstruction_terms(cfg.reconstruction, rotations, target)
                kl = gaussian_kl(mu, logvar)
                parts["energy"].append((rec + cfg.beta * kl).cpu())
                parts["rec"].append(rec.cpu())
                parts["kl"].append(kl.cpu())
                parts["joint_deg"].append((geodesic_angle(rotations, target) * (180.0 / math.pi)).cpu())
        finally:
            prior.train(was_training)
        return {k: torch.cat(p) for k, p in parts.items()}

    def energy(self, poses: torch.Tensor, samples: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N,) energy of (N, width) poses: reconstruction (at the posterior mean, or averaged over
        ``samples`` posterior draws) + beta x KL; see the module docstring."""
        self._check_width(poses)
        return self.posterior(poses, samples, generator)["energy"]

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

    def split_scores(self, poses: torch.Tensor, samples: torch.Tensor) -> dict[str, float]:
        """The scores of one held-out split: reconstruction, KL, energy of its poses, their own
        diversity, and PRDC of ``samples`` (as many as the split's poses) against them."""
        post = self.posterior(poses)
        joint = post["joint_deg"].flatten()
        scores = {"poses": len(poses), "rec_deg": joint.mean().item(),
                  "rec_deg_p95": torch.quantile(joint.double(), 0.95).item(),
                  "kl": post["kl"].mean().item(), "energy": post["energy"].mean().item(),
                  "diversity": mean_pairwise_distance(poses)}
        scores.update(prdc(poses, samples, k=self.config.prdc_k))
        return scores

    def scores(self, generator: torch.Generator | None = None) -> dict[str, dict[str, float]]:
        """``{"val": {...}, "test": {...} (when there is a test split), "samples": {...}}``: each split's
        :meth:`split_scores` against the first len(split) of one draw of samples at temperature 1,
        and that draw's size and diversity."""
        count = max(len(p) for p in self.eval_sets.values())
        samples = self.sample_poses(count, 1.0, generator or torch.Generator().manual_seed(0))
        result = {split: self.split_scores(poses, samples[:len(poses)]) for split, poses in self.eval_sets.items()}
        result["samples"] = {"count": count, "temperature": 1.0, "diversity": mean_pairwise_distance(samples)}
        return result

    @staticmethod
    def flat(scores: dict[str, dict[str, float]]) -> dict[str, float]:
        """The flat record of :meth:`scores` for metrics.jsonl: ``val_rec_deg``, ``test_rec_deg``, ...,
        and the samples' ``diversity`` (``val_diversity`` is the val poses' own)."""
        values = {f"{split}_{k}": v for split, part in scores.items() if split != "samples" for k, v in part.items()}
        values["diversity"] = scores["samples"]["diversity"]
        return values

    def report(self, generator: torch.Generator | None = None) -> dict[str, float]:
        """The scores of the module docstring per held-out split, flat (:meth:`flat`)."""
        return self.flat(self.scores(generator))

    def finish(self):
        scores = self.scores()
        splits = [s for s in scores if s != "samples"]
        if self.run.is_main_process:
            atomic_write_bytes(self.run.path("final", "report.json"), (json.dumps(scores, indent=2) + "\n").encode())
            header = ("split", "poses", *REPORT_KEYS)
            lines = [f"# Pose prior: held-out splits, {int(scores['samples']['count'])} samples at temperature 1", "",
                     "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
                     *(f"| {s} | {int(scores[s]['poses'])} | " + " | ".join(f"{scores[s][k]:.4f}" for k in REPORT_KEYS)
                       + " |" for s in splits), "",
                     f"samples' diversity: {scores['samples']['diversity']:.4f} (the column diversity is each "
                     f"split's own poses'); PRDC against each split with as many samples as it has poses", ""]
            atomic_write_bytes(self.run.path("final", "report.md"), "\n".join(lines).encode())
        for s in splits:
            part = scores[s]
            self.accelerator.print(f"{s} reconstruction {part['rec_deg']:.2f} deg per joint (p95 {part['rec_deg_p95']:.2f}), "
                                   f"KL {part['kl']:.2f}, energy {part['energy']:.3f}; samples: precision "
                                   f"{part['precision']:.3f}, recall {part['recall']:.3f}")
        return self.flat(scores)

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


# -- the sample-poses and energy commands -----------------------------------------------------------


def add_checkpoint_argument(parser):
    parser.add_argument("--checkpoint", default="weights", help="weights (the exported EMA), last, best or a path")


def check_out(path: pathlib.Path, suffix: str, overwrite: bool, command: str) -> None:
    """The user's output file: it has ``suffix`` and, unless --overwrite, does not exist yet."""
    if path.suffix != suffix:
        raise HandforgeError(f"{command}: --out {path}: must end in {suffix}")
    if path.is_dir():
        raise HandforgeError(f"{command}: --out {path} is a folder; give a file name ending in {suffix}")
    if path.exists() and not overwrite:
        raise HandforgeError(f"{command}: --out {path} exists; choose another file or add --overwrite")


def load_prior_run(run_dir: pathlib.Path, checkpoint: str, command: str):
    """The run's pose_prior task, rebuilt on the CPU with the weights ``checkpoint`` names."""
    from handforge.runs import load_run

    run = load_run(run_dir, device="cpu", checkpoint=checkpoint)
    if not isinstance(run.task, PosePriorTask):
        raise HandforgeError(f"{command}: {run_dir} is a run of task '{run.recipe.task.name}', not pose_prior")
    return run.task


def configure(parser):
    parser.add_argument("run_dir", type=pathlib.Path, metavar="RUN", help="a pose_prior run directory")
    parser.add_argument("--num", type=int, required=True, help="poses to sample")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="the .npz file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--temperature", type=float, default=1.0, help="standard deviation of the latent noise")
    parser.add_argument("--seed", type=int, default=0)
    add_checkpoint_argument(parser)


def command(args) -> int:
    if args.num < 1:
        raise HandforgeError(f"sample-poses: --num must be at least 1, got {args.num}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise HandforgeError(f"sample-poses: --temperature must be a positive number, got {args.temperature}")
    check_out(args.out, ".npz", args.overwrite, "sample-poses")
    task = load_prior_run(args.run_dir, args.checkpoint, "sample-poses")
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


def configure_energy(parser):
    parser.add_argument("run_dir", type=pathlib.Path, metavar="RUN", help="a pose_prior run directory")
    parser.add_argument("poses", type=pathlib.Path, metavar="POSES",
                        help="a poses .npz (right / left (N, 45), what sample-poses writes), a folder with "
                             "right.npy / left.npy, or a prepared mocap folder with --split")
    parser.add_argument("--split", help="POSES is a prepared mocap folder: score its SPLIT folder (train, val, test)")
    parser.add_argument("--samples", type=int, default=0, metavar="K",
                        help="0 (default): z at the posterior mean; K: the reconstruction term averaged over K "
                             "draws from q(z|x), seeded by --seed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --samples draws")
    parser.add_argument("--out", type=pathlib.Path, help="write the per-pose energies, (N,) float32, to this .npy")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--json", action="store_true", help="machine-readable summary")
    add_checkpoint_argument(parser)


def energy_summary(energies: np.ndarray) -> dict[str, float]:
    """Count, mean, median, 5th and 95th percentile (linear interpolation), min and max."""
    x = np.asarray(energies, dtype=np.float64)
    p5, median, p95 = np.percentile(x, [5, 50, 95])
    return {"count": int(len(x)), "mean": float(x.mean()), "median": float(median), "p5": float(p5),
            "p95": float(p95), "min": float(x.min()), "max": float(x.max())}


def energy_command(args) -> int:
    if args.samples < 0:
        raise HandforgeError(f"energy: --samples must be 0 (the posterior mean) or more, got {args.samples}")
    if args.out is not None:
        check_out(args.out, ".npy", args.overwrite, "energy")
    source = args.poses
    if args.split is not None:
        source = args.poses / args.split
        if not source.is_dir():
            raise HandforgeError(f"energy: --split {args.split}: {args.poses} has no folder {args.split}/ "
                                 f"(POSES with --split is a prepared mocap folder)")
    elif args.poses.is_dir() and (args.poses / "dataset_metadata.json").is_file():
        raise HandforgeError(f"energy: {args.poses} is a prepared mocap folder; add --split test (or val, train)")
    hands = load_poses(source, "energy: POSES")  # before the run: a bad file costs no model building
    task = load_prior_run(args.run_dir, args.checkpoint, "energy")
    poses = task.poses_from_hands(hands, f"energy: POSES {source}")
    energies = task.energy(poses, args.samples, torch.Generator().manual_seed(args.seed)).numpy().astype(np.float32)
    if args.out is not None:
        buffer = io.BytesIO()
        np.save(buffer, energies, allow_pickle=False)
        atomic_write_bytes(args.out, buffer.getvalue())
    cfg = task.config
    summary = {"run": str(args.run_dir), "poses": str(source), "checkpoint": args.checkpoint,
               **energy_summary(energies), "reconstruction": cfg.reconstruction, "beta": cfg.beta,
               "samples": args.samples, "seed": args.seed if args.samples else None,
               "out": None if args.out is None else str(args.out)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    at = f"averaged over {args.samples} posterior draws (seed {args.seed})" if args.samples else "at the posterior mean"
    print(f"{source}: energy of {summary['count']} poses under {args.run_dir} ({args.checkpoint}): "
          f"mean {summary['mean']:.4f}, median {summary['median']:.4f}, p5 {summary['p5']:.4f}, "
          f"p95 {summary['p95']:.4f}")
    print(f"energy = {cfg.reconstruction} reconstruction {at} + {cfg.beta:g} x KL"
          + (f"; per pose in {args.out}" if args.out is not None else ""))
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
    cli.add_command("energy", "score hand poses under a trained pose_prior run: per-pose energy (negative ELBO)",
                    configure_energy, energy_command)
