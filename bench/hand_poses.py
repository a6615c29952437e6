"""Speed of the mocap pose pipeline (issue 16, measure 5).

    python bench/hand_poses.py [--files 500] [--frames 400] [--batches 200]

(a) ``handforge prepare mocap`` over a synthetic tree of ``--files`` AMASS SMPL+H ``.npz`` files of
    ``--frames`` frames each: frames scanned per second (reading, splitting, writing included).
(b) Batches of 8192 standardized ``hand_pose90`` from the prepared train split: ``HandPoses.batch``
    (one gather from the memory maps) beside the seed's kind of loader, a map-style Dataset whose
    ``__getitem__`` builds one sample's dict (lhand_pose, rhand_pose, x90, standardized) and a
    ``torch.utils.data.DataLoader`` that collates 8192 of them, in the same run.
(c) One ``pose_prior`` training step (hand_vae, hidden 512, latent 32, 90 inputs) at batch 8192.
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np
import torch

from handforge.plugins.backbones.hand_vae import HandVae, HandVaeConfig
from handforge.plugins.datasets.hand_poses import HandPoses, HandPosesConfig
from handforge.plugins.datasets.mocap_poses.prepare import prepare_mocap
from handforge.plugins.tasks.pose_prior import gaussian_kl, reconstruction_terms
from handforge.rotations import axis_angle_to_matrix

BATCH = 8192


class PerSampleDataset(torch.utils.data.Dataset):
    """The seed's kind: one pose per __getitem__, a dict of tensors, standardized one by one."""

    def __init__(self, left, right, mean, std):
        self.left, self.right, self.mean, self.std = left, right, mean, std

    def __len__(self):
        return len(self.left)

    def __getitem__(self, i):
        lhand = torch.from_numpy(np.array(self.left[i]))
        rhand = torch.from_numpy(np.array(self.right[i]))
        x90 = (torch.cat([lhand, rhand]) - self.mean) / self.std
        return {"lhand_pose": lhand, "rhand_pose": rhand, "x90": x90, "frame_idx": i}


def timed(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--baseline-batches", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for f in range(args.files):
            folder = tmp / "mocap" / ("CMU", "KIT", "BMLmovi")[f % 3]
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(folder / f"seq{f:05d}_poses.npz", poses=rng.normal(0, 0.3, (args.frames, 156)).astype(np.float32),
                     mocap_framerate=np.array(120.0))
        frames = args.files * args.frames
        start = time.perf_counter()
        prepare_mocap(tmp / "mocap", tmp / "prepared", seed=0, total=frames)
        prepare_s = time.perf_counter() - start

        data = HandPoses(HandPosesConfig(root=str(tmp / "prepared"), standardize=True), "train")
        n = len(data)
        gen = np.random.default_rng(1)
        indices = [gen.integers(0, n, BATCH) for _ in range(8)]
        ours_s = timed(lambda: [data.batch(i) for i in indices], max(1, args.batches // 8)) / len(indices)

        baseline = PerSampleDataset(data.arrays["left"], data.arrays["right"], data.mean, data.std)
        sampler = torch.utils.data.RandomSampler(baseline, replacement=True, num_samples=BATCH * (args.baseline_batches + 1))
        loader = torch.utils.data.DataLoader(baseline, batch_size=BATCH, sampler=sampler, num_workers=0)
        iterator = iter(loader)
        next(iterator)
        start = time.perf_counter()
        for _ in range(args.baseline_batches):
            next(iterator)
        base_s = (time.perf_counter() - start) / args.baseline_batches
        sample = data.batch(indices[0])

    model = HandVae(HandVaeConfig(hidden=512, latent_dim=32), joints=30)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = sample * 0.3

    def step():
        out = model(x)
        target = axis_angle_to_matrix(x.view(BATCH, 30, 3))
        loss = reconstruction_terms("matrix", out["rotations"], target).mean() + 0.01 * gaussian_kl(
            out["mu"], out["logvar"]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s = timed(step, args.steps)
    print(f"(a) prepare mocap: {args.files} files x {args.frames} frames = {frames} frames in {prepare_s:.1f} s: "
          f"{frames / prepare_s:,.0f} frames/s")
    print(f"\n(b) standardized hand_pose90 batches of {BATCH} from the prepared train split ({n} poses), torch "
          f"threads {torch.get_num_threads()}:\n")
    print("| loader | samples/s | vs baseline |\n|---|---:|---:|")
    print(f"| per-sample Dataset + DataLoader (baseline) | {BATCH / base_s:,.0f} | 1.0x |")
    print(f"| HandPoses.batch (one memory-map gather) | {BATCH / ours_s:,.0f} | {base_s / ours_s:.0f}x |")
    print(f"\n(c) pose_prior training step, hand_vae hidden 512 latent 32, 90 inputs, batch {BATCH}: "
          f"{step_s * 1000:.0f} ms ({BATCH / step_s:,.0f} poses/s) on CPU")


if __name__ == "__main__":
    main()
