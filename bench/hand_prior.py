"""The hand pose prior's quality on held-out poses of a fixture mocap tree (issue 16, measure 4).

    python bench/hand_prior.py [--frames 20000] [--steps 2000] [--batch 512] [--hidden 256] [--samples 2000]

1. A fixture tree of AMASS SMPL+H sequences whose hands hold realistic poses: procedural_hands'
   handshape templates plus joint noise (``handshape_poses``), one handshape stream per hand.
2. ``handforge prepare mocap`` -> train / val / test by sequence; ``recipes/hand_prior.toml`` trains
   on it (scaled down by the flags: the shipped recipe is sized for a GPU and 1.5M frames).
3. On the test split (never seen in training or model selection): per-joint geodesic
   reconstruction error (degrees, mean and 95th percentile) from the posterior mean, KL; for
   ``--samples`` poses sampled at temperature 1 and 0.8: share of joints within procedural_hands'
   anatomical limits, diversity (mean pairwise distance of the 90-D vectors) and precision / recall /
   density / coverage against the test poses (:func:`handforge.prdc.prdc`, k = 5); the mean energy
   (negative ELBO) of every set under the prior, uniform noise included.

Beside them, the same measures of a Gaussian fitted to the training poses (mean and full
covariance of the 90 values), the simplest prior, and of the test poses themselves (limits,
diversity: what the data has).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]

from handforge.plugins.datasets.handshape_poses import HandshapePoses, HandshapePosesConfig  # noqa: E402
from handforge.plugins.datasets.procedural_hands import LEFT_POSE_SIGN  # noqa: E402
from handforge.plugins.datasets.procedural_hands import kinematics as kin  # noqa: E402
from handforge.plugins.datasets.procedural_hands.handshapes import ANGLE_HI, ANGLE_LO  # noqa: E402
from handforge.prdc import prdc  # noqa: E402
from handforge.runs import load_run  # noqa: E402

FRAMES_PER_SEQUENCE = 200


def fixture_tree(root: pathlib.Path, frames: int) -> None:
    poses = HandshapePoses(HandshapePosesConfig(length=frames), "train")
    folder = root / "CMU"
    folder.mkdir(parents=True)
    for s, start in enumerate(range(0, frames, FRAMES_PER_SEQUENCE)):
        rows = poses.__getitems__(list(range(start, min(start + FRAMES_PER_SEQUENCE, frames))))["hand_pose90"]
        full = np.zeros((len(rows), 156), np.float32)
        full[:, 66:156] = rows.numpy()
        np.savez(folder / f"seq{s:04d}_poses.npz", poses=full, mocap_framerate=np.array(120.0))


def cli(*args):
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(map(str, args[:2]))} failed:\n{result.stderr}")
    return result


def limits_share(x90: torch.Tensor) -> float:
    """Share of the joints (both hands, 30 per pose) within the anatomical limits."""
    right = x90[:, 45:]
    left = x90[:, :45] * LEFT_POSE_SIGN  # into the right-hand frame the limits are written in
    inside = [kin.within_limits(kin.pose_to_anatomical(h), ANGLE_LO, ANGLE_HI) for h in (left, right)]
    return float(torch.cat(inside, 1).float().mean())


def diversity(x: torch.Tensor) -> float:
    d = torch.cdist(x.double(), x.double())
    return float(d.sum() / (len(x) * (len(x) - 1)))


def sample_row(name, samples, test, task):
    row = {"set": name, "limits": limits_share(samples), "diversity": diversity(samples),
           "energy": float(task.energy(samples).mean())}
    row.update(prdc(test, samples, k=5) if samples is not test else {})
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        fixture_tree(tmp / "mocap", args.frames)
        cli("prepare", "mocap", tmp / "mocap", "--out", tmp / "prepared")
        start = time.perf_counter()
        cli("run", REPO / "recipes" / "hand_prior.toml", f"data.root={tmp / 'prepared'}", f"output_dir={tmp}",
            f"train.steps={args.steps}", f"train.batch_size={args.batch}", f"model.prior.hidden={args.hidden}",
            "task.kl_warmup_steps=500", "task.eval_poses=1024", "eval.every=0", "train.checkpoint_every=0",
            "train.progress=false")
        train_s = time.perf_counter() - start
        split = lambda name: torch.from_numpy(np.concatenate(  # noqa: E731
            [np.load(tmp / "prepared" / name / f"{h}.npy") for h in ("left", "right")], 1))
        train, test = split("train"), split("test")
        test = test[torch.randperm(len(test))[:args.samples]]
        run = load_run(tmp / "hand_prior", device="cpu")
        task = run.task
        post = task.posterior(test)
        joint = post["joint_deg"].flatten().double()
        generator = torch.Generator().manual_seed(1)
        rows = [sample_row("test poses (the data)", test, test, task),
                sample_row("VAE samples, T = 1", task.sample_poses(args.samples, 1.0, generator), test, task),
                sample_row("VAE samples, T = 0.8", task.sample_poses(args.samples, 0.8, generator), test, task)]
        mean, cov = train.double().mean(0), torch.cov(train.double().T) + 1e-6 * torch.eye(90, dtype=torch.float64)
        gaussian = torch.distributions.MultivariateNormal(mean, cov).sample((args.samples,)).float()
        rows.append(sample_row("Gaussian fit to train (baseline)", gaussian, test, task))
        rows.append(sample_row("uniform in [-1, 1] per value", torch.rand(args.samples, 90) * 2 - 1, test, task))
        report = json.loads((tmp / "hand_prior" / "final" / "report.json").read_text())
    print(f"fixture: {args.frames} frames of handshape poses in {args.frames // FRAMES_PER_SEQUENCE} sequences; "
          f"trained {args.steps} steps x {args.batch} (hidden {args.hidden}) in {train_s:.0f} s on CPU")
    print(f"\ntest split ({len(test)} poses): per-joint geodesic reconstruction error {joint.mean():.2f} deg mean, "
          f"{torch.quantile(joint, 0.95):.2f} deg p95; KL {post['kl'].mean():.2f} nats; energy {post['energy'].mean():.3f}")
    print("the run's own report (final/report.json, 1024 poses spread over each split): " + "; ".join(
        f"{split} {report[split]['rec_deg']:.2f} deg (p95 {report[split]['rec_deg_p95']:.2f}), KL {report[split]['kl']:.2f}, "
        f"energy {report[split]['energy']:.3f}, precision {report[split]['precision']:.3f}, "
        f"recall {report[split]['recall']:.3f}" for split in ("val", "test") if split in report))
    keys = ("energy", "limits", "diversity", "precision", "recall", "density", "coverage")
    print("\n| set | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for row in rows:
        print(f"| {row['set']} | " + " | ".join(f"{row[k]:.3f}" if k in row else "-" for k in keys) + " |")
    print("\nenergy: mean negative ELBO under the prior (reconstruction at the posterior mean + beta x KL); "
          "limits: share of joints within procedural_hands' anatomical limits; diversity: mean pairwise L2 of "
          "the 90-D axis-angle vectors; PRDC against the test poses, k = 5")
    print(json.dumps({"rec_deg": float(joint.mean()), "rec_deg_p95": float(torch.quantile(joint, 0.95))}))


if __name__ == "__main__":
    main()
