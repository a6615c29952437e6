"""Speed of the metric math (plugins/metrics: prdc, frechet_distance) against peers in the same
run, as table rows; ``python bench/metrics.py`` runs and prints them.

- prdc: ``prdc(real, fake, k=5)`` on N x N float32 features (a fixed random mixing of Gaussian
  samples, rectified, like pooled CNN activations) against the ``prdc`` package itself
  (``prdc.compute_prdc``: scikit-learn ``pairwise_distances``, n_jobs=8, on the same features as
  numpy arrays). Without the package (``pip install -c constraints.txt -e ".[bench]"``) the
  reference is a torch port of its steps on three whole ``torch.cdist`` matrices, labelled so.
  "max |diff|" is the largest difference of the four values.
- frechet: ``frechet_distance`` on the sample means and covariances of two N x D float64 feature
  sets (low-rank-plus-noise mixing with a decaying spectrum, rectified; N = 10k, D = 2048 by
  default) against pytorch-fid's formula written from its definition with
  ``scipy.linalg.sqrtm`` (skipped when scipy is missing); "|diff|" is the absolute difference.
  scipy runs on its own BLAS's default threads, not --threads.

Each time is the median wall-clock seconds over ``repeats`` calls after a small warm-up call; on
a shared machine read them with the load average bench/metrics.py prints below its tables.
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


def _timed(function, *args, repeats: int = 1):
    """Median seconds of ``repeats`` calls, and the last call's result."""
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def prdc_package(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """The prdc package's own ``compute_prdc`` on the same features as numpy arrays."""
    from prdc import compute_prdc

    return {name: float(value) for name, value in compute_prdc(real.numpy(), fake.numpy(), k).items()}


def _features(n: int, dim: int, seed: int, scale: float, shift: float) -> torch.Tensor:
    """Non-negative, correlated features, like pooled CNN activations: one fixed random mixing of
    Gaussian samples (drawn with ``seed``), scaled, shifted and rectified."""
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(1234)) / dim ** 0.5
    samples = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return (samples @ mixing * scale + shift).relu()


def prdc_rows(n: int = 10000, dim: int = 2048, k: int = 5, reference: bool = True,
              repeats: int = 3, reference_repeats: int = 3) -> list[dict]:
    """One row: ours vs the prdc package (or, without it, the torch port of its steps)."""
    real, fake = _features(n, dim, 0, 1.0, 0.3), _features(n, dim, 1, 1.02, 0.3)
    prdc(real[:256], fake[:256], k)  # warm-up: thread pool, allocator
    ours_s, ours = _timed(prdc, real, fake, k, repeats=repeats)
    row = {"benchmark": "prdc", "size": f"{n} x {n} x {dim}, k={k}", "ours": f"blocked {DEFAULT_BLOCK}",
           "ours_s": ours_s, "reference": None, "reference_s": None, "speedup": None, "max_abs_diff": None,
           "values": ours, "repeats": f"{repeats} / {reference_repeats}"}
    if reference:
        try:
            import prdc as _package  # noqa: F401
            peer, row["reference"] = prdc_package, "prdc package compute_prdc"
        except ImportError:
            peer, row["reference"] = prdc_full_matrices, "torch port of prdc's steps (prdc not installed)"
        peer(real[:256], fake[:256], k)
        row["reference_s"], theirs = _timed(peer, real, fake, k, repeats=reference_repeats)
        row["speedup"] = row["reference_s"] / ours_s
        row["max_abs_diff"] = max(abs(ours[name] - theirs[name]) for name in ours)
        row["reference_values"] = theirs
    return [row]


def pytorch_fid_scipy(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's formula from its definition: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)),
    retrying with eps = 1e-6 added to both diagonals when sqrtm is not finite, as pytorch-fid does."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sample_stats(n: int, dim: int, seed: int, scale: float, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean and covariance of n x dim float64 features: a low-rank-plus-noise mixing with a
    decaying spectrum (rank dim / 4, singular values ~ 1 / sqrt(i)), shifted and rectified."""
    rank = max(dim // 4, 1)
    mixing_rng = torch.Generator().manual_seed(4321)
    spectrum = (torch.arange(1, rank + 1, dtype=torch.float64) ** -0.5).unsqueeze(1)
    mixing = torch.randn(rank, dim, generator=mixing_rng, dtype=torch.float64) * spectrum
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g, dtype=torch.float64) @ mixing
    x = (x * scale + 0.1 * torch.randn(n, dim, generator=g, dtype=torch.float64) + shift).relu()
    mean = x.mean(0)
    centred = x - mean
    return mean.numpy(), (centred.T @ centred / (n - 1)).numpy()


def frechet_rows(dim: int = 2048, n: int = 10000, repeats: int = 5, reference_repeats: int = 3) -> list[dict]:
    """One row: ours vs scipy's sqrtm-based formula on sample covariances of n x dim features."""
    mu1, sigma1 = _sample_stats(n, dim, 0, 1.0, 0.2)
    mu2, sigma2 = _sample_stats(n, dim, 1, 1.1, 0.2)
    stats = [mu1, sigma1, mu2, sigma2]
    frechet_distance(*[s[:64, :64] if s.ndim == 2 else s[:64] for s in stats])  # warm-up
    ours_s, ours = _timed(frechet_distance, *stats, repeats=repeats)
    row = {"benchmark": "frechet", "size": f"D = {dim}, sample cov of {n}", "ours": "Cholesky + eigvalsh, float64",
           "ours_s": ours_s, "reference": "pytorch-fid formula, scipy.linalg.sqrtm", "reference_s": None,
           "speedup": None, "max_abs_diff": None, "values": {"fid": ours},
           "repeats": f"{repeats} / {reference_repeats}"}
    try:
        import scipy  # noqa: F401
    except ImportError:
        row["reference"] += " (scipy not installed)"
        return [row]
    row["reference_s"], theirs = _timed(pytorch_fid_scipy, *stats, repeats=reference_repeats)
    row["speedup"] = row["reference_s"] / ours_s
    row["max_abs_diff"] = abs(ours - theirs)
    row["reference_values"] = {"fid": theirs}
    return [row]


def print_table(rows: list[dict]) -> None:
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    print("| benchmark | size | repeats (ours / ref) | ours | ours s (median) | reference | reference s (median) "
          "| speedup | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['benchmark']} | {row['size']} | {row.get('repeats', '-')} | {row['ours']} | {row['ours_s']:.2f} | {row['reference']} | "
              f"{number(row['reference_s'], '.2f')} | {number(row['speedup'], '.2f')} | "
              f"{number(row['max_abs_diff'], '.3g')} |")
    for row in rows:
        values = ", ".join(f"{name} {value:.6g}" for name, value in row["values"].items())
        theirs = row.get("reference_values")
        peer = "" if theirs is None else "; reference " + ", ".join(f"{n} {v:.6g}" for n, v in theirs.items())
        print(f"{row['benchmark']}: ours {values}{peer}")
