"""The seed's U-Net (dim 64, dim_mults 1-2-4-8, 35.7M parameters): one training step and DDIM
sampling, ours beside denoising-diffusion-pytorch's Unet + GaussianDiffusion, as a table.

    python bench/diffusion_step.py [--size 64] [--batch 16] [--sampling-steps 50] [--repeats 3]
                                   [--threads 2] [--device cpu|cuda] [--allocator tuned|default]
                                   [--only train|sampling] [--profile]

Both sides: sigmoid schedule, 1000 timesteps, v prediction, MSE, Adam (lr 2e-5, betas 0.9/0.99);
sampling is deterministic DDIM (eta 0) over ``--sampling-steps`` steps with x0 clipped. Ours is the
``unet`` backbone with the diffusion task's schedule and DDIM sampler; the peer's weights are
copied into ours first, so both run the same network (parameter counts are checked equal). The
repeats are interleaved (ours, peer, ours, peer, ...) after one warm-up each, so a noisy machine
hits both alike; the table has medians and ours/peer ratios of img/s (> 1: ours is faster).
Both run in one process, so under the same glibc allocator settings (``--allocator``, default
handforge's own, see bench/_allocator.py). ``--profile``: one training step of each under
``torch.profiler`` (CPU), split by category (bench/_step_profile.py), side by side.
Needs the benchmark-only extra: pip install -c constraints.txt denoising-diffusion-pytorch
(it pulls a torchvision wheel built for another torch; the peer is imported with stand-ins for it, and
a broken torchvision makes Lightning fail to import, so remove it afterwards: pip uninstall torchvision)
"""
import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from peer_ddpm import import_peer  # noqa: E402
from _allocator import STATES, allocator_state, run_under  # noqa: E402
from _step_profile import ORDER, profile_step  # noqa: E402

from handforge.plugins.backbones.unet import UnetConfig, build_unet  # noqa: E402
from handforge.plugins.conditioners.label import NoCondition  # noqa: E402
from handforge.plugins.tasks.diffusion.guidance import predictor  # noqa: E402
from handforge.plugins.tasks.diffusion.samplers import run_sampler  # noqa: E402
from handforge.plugins.tasks.diffusion.schedules import Schedule, target  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Ours:
    name = "handforge unet"

    def __init__(self, peer_state, size, device):
        self.net = build_unet(UnetConfig(dim=64, dim_mults=[1, 2, 4, 8]), role="denoiser", image_size=size,
                              conditioner=NoCondition(role="denoiser"))
        self.net.load_state_dict(dict(zip(self.net.state_dict(), peer_state.values())))
        self.net.to(device)
        self.schedule = Schedule("sigmoid", 1000)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=2e-5, betas=(0.9, 0.99))
        self.size, self.device = size, device

    def train_step(self, x0):
        x0 = x0.contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, 1000, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        a, s = self.schedule.coefficients(t, x0)
        out = self.net(a * x0 + s * noise, t.float(), None)
        loss = (out - target("pred_v", x0, noise, a, s)).pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample(self, n, steps):
        x = torch.randn(n, 3, self.size, self.size, device=self.device).contiguous(memory_format=torch.channels_last)
        predict = predictor(self.net, self.schedule, "pred_v", None)
        return run_sampler("ddim", self.schedule, predict, x, 999, steps=steps, eta=0.0)


class Peer:
    name = "denoising-diffusion-pytorch"

    def __init__(self, peer, unet, size, steps, device):
        self.diffusion = peer.GaussianDiffusion(unet, image_size=size, timesteps=1000, sampling_timesteps=steps,
                                                objective="pred_v", beta_schedule="sigmoid").to(device)
        self.opt = torch.optim.Adam(self.diffusion.parameters(), lr=2e-5, betas=(0.9, 0.99))

    def train_step(self, x0):
        loss = self.diffusion(x0 * 0.5 + 0.5)  # it normalises [0, 1] images to [-1, 1] itself
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample(self, n, steps):
        return self.diffusion.sample(batch_size=n)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sampling-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--allocator", choices=STATES, default="tuned",
                    help="glibc allocator settings of this process (both sides): handforge's (tuned) or glibc's")
    ap.add_argument("--only", choices=("train", "sampling"), help="time one of the two measures")
    ap.add_argument("--profile", action="store_true", help="profile one training step of each, side by side")
    args = ap.parse_args()
    run_under(args.allocator)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peer = import_peer()
    if peer is None:
        sys.exit("bench/diffusion_step.py needs denoising-diffusion-pytorch: "
                 "pip install -c constraints.txt denoising-diffusion-pytorch")
    torch.manual_seed(0)
    peer_unet = peer.Unet(dim=64, dim_mults=(1, 2, 4, 8), channels=3)
    ours = Ours(peer_unet.state_dict(), args.size, device)
    theirs = Peer(peer, peer_unet, args.size, args.sampling_steps, device)
    counts = [sum(p.numel() for p in m.parameters()) for m in (ours.net, peer_unet)]
    assert counts[0] == counts[1], counts
    x0 = torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1
    rows = {}
    measures = [("train", "train step", lambda m: m.train_step(x0)),
                ("sampling", f"DDIM-{args.sampling_steps} sampling", lambda m: m.sample(args.batch, args.sampling_steps))]
    for key, what, call in measures:
        if args.only not in (None, key):
            continue
        for m in (ours, theirs):
            timed(lambda: call(m), device)  # warm-up
        times = {ours.name: [], theirs.name: []}
        for _ in range(args.repeats):
            for m in (ours, theirs):
                times[m.name].append(timed(lambda: call(m), device))
        rows[what] = {k: statistics.median(v) for k, v in times.items()}
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, {args.threads} threads, allocator {allocator_state()}"
    print(f"U-Net dim 64, mults 1-2-4-8 ({counts[0] / 1e6:.1f}M params both), {args.size} px, batch {args.batch}, "
          f"{dev}, median of {args.repeats} interleaved repeats")
    print(f"| {'measure':<20} | {'ours s':>8} | {'ours img/s':>10} | {'peer s':>8} | {'peer img/s':>10} | {'ratio':>6} |")
    print(f"|{'-' * 22}|{'-' * 10}|{'-' * 12}|{'-' * 10}|{'-' * 12}|{'-' * 8}|")
    for what, r in rows.items():
        o, p = r[ours.name], r[theirs.name]
        print(f"| {what:<20} | {o:8.3f} | {args.batch / o:10.2f} | {p:8.3f} | {args.batch / p:10.2f} | {p / o:5.2f}x |")
    if args.profile and device.type == "cpu":
        print()
        runs = {ours.name: [], theirs.name: []}
        for _ in range(args.repeats):  # interleaved like the timings: load changes hit both alike
            for m in (ours, theirs):
                runs[m.name].append(profile_step(lambda: m.train_step(x0), [ours.net if m is ours else peer_unet]))
        print(profile_table(runs))


def profile_table(runs):
    """One training step's CPU time by category (median over the profiled repeats), ours beside the peer's."""
    names = list(runs)

    def median_ms(name, cat):
        return statistics.median([next((c["ms"] for c in r["categories"] if c["category"] == cat), 0.0)
                                  for r in runs[name]])

    present = {c["category"] for rs in runs.values() for r in rs for c in r["categories"]}
    lines = [f"One training step by category, median of {len(runs[names[0]])} profiled steps each", "",
             f"| category | {names[0]} ms | {names[1]} ms | difference ms |", "|---|---|---|---|"]
    for cat in (c for c in ORDER if c in present):
        a, b = median_ms(names[0], cat), median_ms(names[1], cat)
        lines.append(f"| {cat} | {a:.0f} | {b:.0f} | {a - b:+.0f} |")
    a, b = (statistics.median(r["total_ms"] for r in runs[n]) for n in names)
    lines.append(f"| all (profiled self time) | {a:.0f} | {b:.0f} | {a - b:+.0f} |")
    for n in names:
        last = runs[n][-1]
        lines += ["", f"{n}, top ops of the last profiled step:", "", "| op | calls | ms |", "|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['calls']} | {o['self_ms']:.0f} |" for o in last["top_ops"][:10]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
