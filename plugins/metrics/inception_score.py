"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs") from classifier logits.

IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the mean of p(y|x) over the samples scored together.
As in the original code (openai/improved-gan; also StyleGAN's and StudioGAN's), the N samples are
split into ``splits`` consecutive parts [s N // splits, (s + 1) N // splits), each scored on its own,
and the mean and the population standard deviation (numpy's default, ddof=0) of the parts' scores
are reported.
"""
from __future__ import annotations

import math

import torch

from handforge.errors import HandforgeError


def _split_score(log_p: torch.Tensor) -> float:
    """exp of the mean KL(p(y|x) || p(y)) of one split, from its log-probabilities (n, C)."""
    # log p(y) = log mean_x p(y|x), in log space so that tiny probabilities do not underflow first
    log_marginal = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])
    # p * (log p - log p(y)); exp(log p) is 0 where p underflowed, and 0 * finite = 0 as wanted
    kl = (log_p.exp() * (log_p - log_marginal)).sum(1)
    return math.exp(float(kl.mean()))


def inception_score(logits: torch.Tensor, splits: int = 1) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` consecutive parts of ``logits`` (N, C).

    Logits are turned into log p(y|x) by log-softmax in float64; any device.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise HandforgeError(f"inception score: logits must be a tensor of shape (N, classes), got {shape}")
    if not isinstance(splits, int) or splits < 1:
        raise HandforgeError(f"inception score: splits must be a positive integer, got {splits!r}")
    n = logits.shape[0]
    if n < splits:
        raise HandforgeError(f"inception score: {n} samples cannot be split into {splits} parts")
    log_p = torch.log_softmax(logits.detach().to(torch.float64), dim=1)
    if not torch.isfinite(log_p).all():
        raise HandforgeError("inception score: logits contain NaN or infinite values")
    scores = [_split_score(log_p[s * n // splits:(s + 1) * n // splits]) for s in range(splits)]
    mean = sum(scores) / splits
    std = math.sqrt(sum((score - mean) ** 2 for score in scores) / splits)
    return mean, std
