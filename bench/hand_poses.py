"""Speed of the mocap pose pipeline (issue 16, measure 5).

    python bench/hand_poses.py [--files 500] [--frames 400] [--repeats 15] [--parts abc]

(a) ``handforge prepare mocap`` over a synthetic tree of ``--files`` AMASS SMPL+H ``.npz`` files of
    ``--frames`` frames each: frames scanned per second (reading, splitting, writing the raw and the
    standardized rows included).
(b) Batches of 8192 standardized ``hand_pose90`` from the prepared train split: ``HandPoses.batch``
    (one gather of the rows ``prepare`` standardized, random rows, on torch's threads) and ``batch_loader`` (the DataLoader over index
    arrays the Lightning datamodule uses, a shuffled epoch) beside the seed's kind of loader, a
    map-style Dataset whose ``__getitem__`` builds one sample's dict (lhand_pose, rhand_pose, x90,
    standardized) and a ``torch.utils.data.DataLoader`` that collates 8192 of them, in the same run.
    Each figure is the median of ``--repeats`` timed rounds (the cores may be shared: noisy).
(c) One ``pose_prior`` training step (hand_vae, hidden 512, latent 32, 90 inputs) at batch 8192.

``--parts`` picks which of them run ((b) still prepares its folder; (c) then trains on random poses).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import numpy as np
import torch

from handforge.plugins.backbones.hand_vae import HandVae, HandVaeConfig
from handforge.plugins.datasets.hand_poses import HandPoses, HandPosesConfig, batch_loader
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
    """Median seconds of one ``fn()`` over ``repeats`` rounds, after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_tree(root: pathlib.Path, files: int, frames: int) -> None:
    rng = np.random.default_rng(0)
    for f in range(files):
        folder = root / ("CMU", "KIT", "BMLmovi")[f % 3]
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / f"seq{f:05d}_poses.npz", poses=rng.normal(0, 0.3, (frames, 156)).astype(np.float32),
                 mocap_framerate=np.array(120.0))


def loading(prepared: pathlib.Path, args) -> tuple[dict, torch.Tensor, int]:
    """Seconds per batch of 8192 for each loader of part (b), one sample batch, the split's size."""
    data = HandPoses(HandPosesConfig(root=str(prepared), standardize=True), "train")
    n = len(data)
    gen = np.random.default_rng(1)
    indices = [gen.integers(0, n, BATCH) for _ in range(8)]
    seconds = {"batch": timed(lambda: [data.batch(i) for i in indices], args.repeats) / len(indices)}

    loader = batch_loader(data, BATCH, shuffle=True, drop_last=True)
    per_epoch = len(loader)
    seconds["loader"] = timed(lambda: [b.shape for b in loader], args.repeats) / per_epoch

    baseline = PerSampleDataset(data.arrays["left"], data.arrays["right"], data.mean, data.std)
    sampler = torch.utils.data.RandomSampler(baseline, replacement=True, num_samples=BATCH * args.baseline_batches)
    per_sample = torch.utils.data.DataLoader(baseline, batch_size=BATCH, sampler=sampler, num_workers=0)
    seconds["baseline"] = timed(lambda: [b["x90"].shape for b in per_sample], args.repeats) / args.baseline_batches
    return seconds, data.batch(indices[0]), n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per loader in (b); the median")
    parser.add_argument("--baseline-batches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--parts", default="abc", help="which parts to run, e.g. b")
    args = parser.parse_args()
    frames = args.files * args.frames
    sample = None
    if "a" in args.parts or "b" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = pathlib.Path(tmp)
            write_tree(tmp / "mocap", args.files, args.frames)
            start = time.perf_counter()
            prepare_mocap(tmp / "mocap", tmp / "prepared", seed=0, total=frames)
            prepare_s = time.perf_counter() - start
            if "a" in args.parts:
                print(f"(a) prepare mocap: {args.files} files x {args.frames} frames = {frames} frames in "
                      f"{prepare_s:.1f} s: {frames / prepare_s:,.0f} frames/s")
            if "b" in args.parts:
                seconds, sample, n = loading(tmp / "prepared", args)
                base = seconds["baseline"]
                print(f"\n(b) standardized hand_pose90 batches of {BATCH} from the prepared train split ({n} poses), "
                      f"torch threads {torch.get_num_threads()}, median of {args.repeats} rounds:\n")
                print("| loader | samples/s | vs baseline |\n|---|---:|---:|")
                print(f"| per-sample Dataset + DataLoader (baseline) | {BATCH / base:,.0f} | 1.0x |")
                print(f"| HandPoses.batch (one memory-map gather, random rows) | {BATCH / seconds['batch']:,.0f} | "
                      f"{base / seconds['batch']:.0f}x |")
                print(f"| batch_loader (DataLoader over index arrays, shuffled epoch) | "
                      f"{BATCH / seconds['loader']:,.0f} | {base / seconds['loader']:.0f}x |")
    if "c" not in args.parts:
        return
    model = HandVae(HandVaeConfig(hidden=512, latent_dim=32), joints=30)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = (sample if sample is not None else torch.randn(BATCH, 90)) * 0.3

    def step():
        out = model(x)
        target = axis_angle_to_matrix(x.view(BATCH, 30, 3))
        loss = reconstruction_terms("matrix", out["rotations"], target).mean() + 0.01 * gaussian_kl(
            out["mu"], out["logvar"]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s = timed(step, args.steps)
    print(f"\n(c) pose_prior training step, hand_vae hidden 512 latent 32, 90 inputs, batch {BATCH}: "
          f"{step_s * 1000:.0f} ms ({BATCH / step_s:,.0f} poses/s) on CPU")


if __name__ == "__main__":
    main()
