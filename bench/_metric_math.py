"""Speed of the metric math (plugins/metrics: prdc, frechet_distance) against straightforward
references in the same run, as table rows; ``python bench/metrics.py`` runs and prints them.

- prdc: ``prdc(real, fake, k=5)`` on N x N random float32 features against the steps of the
  ``prdc`` package (clovaai/generative-evaluation-prdc) ported to torch, unchunked: three full
  ``torch.cdist`` matrices, k-NN radii by ``kthvalue(k + 1)`` over rows that include the sample
  itself, the four metrics from whole-matrix comparisons (peak memory 3 N^2 x 4 bytes + masks).
  Both run on the same inputs on --threads threads; "max |diff|" is the largest difference of the
  four values.
- frechet: ``frechet_distance`` on two D x D covariances (A A^T / 2D with A a random D x 2D
  matrix, so positive definite) against pytorch-fid's formula with ``scipy.linalg.sqrtm``
  (skipped when scipy is missing); "|diff|" is the absolute difference of the two distances.
  scipy runs on its own BLAS's default threads, not --threads. Note: LAPACK's ``eigvalsh`` on 2
  threads of a machine that other processes keep busy can be several times slower than on 1.

Times are wall-clock seconds of one call after a small warm-up call; on a shared machine read
them with the load average bench/metrics.py prints below its tables.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from handforge.plugins.metrics.frechet import frechet_distance
from handforge.prdc import DEFAULT_BLOCK, prdc

PRDC_GOAL_S = 10.0  # 10k x 10k x 2048 on 2 cores


def prdc_full_matrices(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """The prdc package's computation on whole distance matrices, in torch."""
    real_radius = torch.cdist(real, real).kthvalue(k + 1, dim=1).values
    fake_radius = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    d = torch.cdist(real, fake)
    inside_real = d < real_radius.unsqueeze(1)
    return {
        "precision": float(inside_real.any(0).double().mean()),
        "recall": float((d < fake_radius.unsqueeze(0)).any(1).double().mean()),
        "density": float(inside_real.sum(0).double().mean() / k),
        "coverage": float((d.amin(1) < real_radius).double().mean()),
    }


def _timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def _features(n: int, dim: int, seed: int, scale: float, shift: float) -> torch.Tensor:
    """Non-negative, correlated features, like pooled CNN activations: one fixed random mixing of
    Gaussian samples (drawn with ``seed``), scaled, shifted and rectified."""
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(1234)) / dim ** 0.5
    samples = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return (samples @ mixing * scale + shift).relu()


def prdc_rows(n: int = 10000, dim: int = 2048, k: int = 5, reference: bool = True) -> list[dict]:
    """One row: ours vs the full-matrix reference on n real and n fake features."""
    real, fake = _features(n, dim, 0, 1.0, 0.3), _features(n, dim, 1, 1.02, 0.3)
    prdc(real[:256], fake[:256], k)  # warm-up: thread pool, allocator
    ours_s, ours = _timed(prdc, real, fake, k)
    row = {"benchmark": "prdc", "size": f"{n} x {n} x {dim}, k={k}", "ours": f"blocked {DEFAULT_BLOCK}",
           "ours_s": ours_s, "reference": "full torch.cdist (prdc package's steps)", "reference_s": None,
           "speedup": None, "max_abs_diff": None, "values": ours}
    if reference:
        prdc_full_matrices(real[:256], fake[:256], k)
        row["reference_s"], theirs = _timed(prdc_full_matrices, real, fake, k)
        row["speedup"] = row["reference_s"] / ours_s
        row["max_abs_diff"] = max(abs(ours[name] - theirs[name]) for name in ours)
    return [row]


def pytorch_fid_scipy(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's calculate_frechet_distance (its eps retry never triggers for these inputs)."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_rows(dim: int = 2048) -> list[dict]:
    """One row: ours vs scipy's sqrtm-based formula on dim x dim covariances."""
    rng = np.random.default_rng(0)
    stats = []
    for scale in (1.0, 1.3):
        a = rng.standard_normal((dim, 2 * dim)) * scale
        stats += [rng.standard_normal(dim) * 0.1, a @ a.T / (2 * dim)]
    frechet_distance(*[s[:64, :64] if s.ndim == 2 else s[:64] for s in stats])  # warm-up
    ours_s, ours = _timed(frechet_distance, *stats)
    row = {"benchmark": "frechet", "size": f"D = {dim}", "ours": "Cholesky + eigvalsh, float64", "ours_s": ours_s,
           "reference": "pytorch-fid formula, scipy.linalg.sqrtm", "reference_s": None, "speedup": None,
           "max_abs_diff": None, "values": {"fid": ours}}
    try:
        import scipy  # noqa: F401
    except ImportError:
        row["reference"] += " (scipy not installed)"
        return [row]
    row["reference_s"], theirs = _timed(pytorch_fid_scipy, *stats)
    row["speedup"] = row["reference_s"] / ours_s
    row["max_abs_diff"] = abs(ours - theirs)
    return [row]


def print_table(rows: list[dict]) -> None:
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    print("| benchmark | size | ours | ours s | reference | reference s | speedup | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['benchmark']} | {row['size']} | {row['ours']} | {row['ours_s']:.2f} | {row['reference']} | "
              f"{number(row['reference_s'], '.2f')} | {number(row['speedup'], '.2f')} | "
              f"{number(row['max_abs_diff'], '.3g')} |")
