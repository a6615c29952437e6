"""Sampling-time tricks of BigGAN (Brock et al. 2019) for generators: truncated noise, standing statistics.

- :func:`truncate` trades variety for fidelity: latent entries beyond a threshold are redrawn, so
  every sample stays near the mode of the prior. Thresholds of 0.5-1.0 are typical.
- :func:`standing_statistics` re-estimates a generator's BatchNorm running statistics from many
  batches of its own samples. BatchNorm in eval mode uses running averages collected during
  training with momentum from a moving generator (and, for an EMA generator, from the training
  generator's weights, not the EMA's): they can disagree with the statistics the sampling weights
  produce, which shows as washed-out or saturated eval-mode samples. Recomputing them from the
  sampling weights themselves fixes that; BigGAN samples this way.
"""
import copy

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def truncate(z: torch.Tensor, threshold: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of ``z`` whose entries with ``|z| > threshold`` are redrawn from N(0, 1) until within.

    Entries already within are kept, so a fixed noise stays fixed. With a (CPU) ``generator`` the
    redraws are deterministic; without one they come from the global RNG of ``z``'s device.
    """
    z = z.clone()
    outside = z.abs() > threshold
    while outside.any():
        count = int(outside.sum())
        if generator is not None:
            fresh = torch.randn(count, generator=generator, dtype=z.dtype).to(z.device)
        else:
            fresh = torch.randn(count, device=z.device, dtype=z.dtype)
        z[outside] = fresh
        outside = z.abs() > threshold
    return z


def batch_norms(module: nn.Module) -> list:
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def standing_statistics(generator: nn.Module, batches: int, noise, cond) -> nn.Module:
    """A copy of ``generator`` in eval mode whose BatchNorm running statistics are the cumulative
    average over ``batches`` forward passes of ``generator(noise(), cond)`` in train mode.

    The generator passed in is left untouched. One without BatchNorm is returned as is.
    """
    if not batch_norms(generator):
        return generator
    net = copy.deepcopy(generator)
    for norm in batch_norms(net):
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: every batch weighs the same
    net.train()
    for _ in range(batches):
        net(noise(), cond)
    return net.eval()
