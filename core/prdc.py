"""Precision, recall, density and coverage of fake features against real ones (Naeem et al. 2020,
"Reliable Fidelity and Diversity Metrics for Generative Models"), streamed in blocks.

Definitions (as in the authors' reference code): the k-NN radius of a sample is its distance to
the k-th nearest OTHER sample of its own set; B(x, r) is the open ball (strictly closer than r).

- precision: fraction of fakes inside at least one real ball B(r_i, radius_i)
- recall:    fraction of reals inside at least one fake ball
- density:   (1/k) x mean over fakes of the number of real balls containing the fake
- coverage:  fraction of reals whose ball contains at least one fake (its nearest fake)

Ties: a radius is a value (the k-th smallest distance), so which of several equally near samples
is "the" k-th does not matter; a sample exactly at a ball's radius is outside it (strict <, as in
the reference code). A sample with k duplicates has radius 0; such a ball contains nothing. (The
expansion below gives duplicates a round-off distance instead of 0, so a k-th neighbour distance
within 8 eps sqrt(D) x 2 ||x||^2 of 0 is taken as such a tie.)

Computation: squared distances ||x||^2 + ||y||^2 - 2 x.y from matmuls in float32 (float64 when an
input is float64), clamped at 0, and compared with squared radii (no square roots). Both sets are
first shifted by the real mean, which leaves distances unchanged and makes the norms -- and so
the expansion's round-off -- small. Only one block x block tile of distances exists at a time:

1. k-NN radii of each set: tiles (I, J) with J >= I only, since the set's distance matrix is
   symmetric; a tile updates the running k smallest of its rows (tile I) and of its columns
   (tile J).
2. One pass over real x fake tiles accumulates, per fake, how many real balls contain it
   (density; precision is "count > 0"), and per real the smallest distance to a fake relative to
   its radius (coverage) and whether it is inside any fake ball (recall).

Peak memory beyond the inputs: shifted float32 copies of both sets ((N + M) x D x 4 bytes) plus
a few block x block tiles (at most 4 x block^2 x 4 bytes: 16 MiB at the default block of 1024).

It lives in the core so that every plugin (the metrics on image features, the pose prior on pose
vectors) uses this one implementation.
"""
from __future__ import annotations

import torch

from handforge.errors import HandforgeError

DEFAULT_BLOCK = 1024
# Squared distances within this many eps sqrt(D) x (||x||^2 + ||y||^2) of 0 are taken as exact ties
# (measured: the expansion's error on a zero distance stays below 1 unit).
_ROUNDOFF_UNITS = 8


def _check(real: torch.Tensor, fake: torch.Tensor, k: int, chunk_size: int | None) -> None:
    for name, x in (("real", real), ("fake", fake)):
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise HandforgeError(f"prdc: {name} features must be a tensor of shape (N, D), got {shape}")
        if not x.is_floating_point():
            raise HandforgeError(f"prdc: {name} features must be floating point, got {x.dtype}")
    if real.shape[1] != fake.shape[1]:
        raise HandforgeError(f"prdc: real and fake features differ in dimension ({real.shape[1]} vs {fake.shape[1]})")
    if not isinstance(k, int) or k < 1:
        raise HandforgeError(f"prdc: k must be a positive integer, got {k!r}")
    if k >= min(len(real), len(fake)):
        raise HandforgeError(f"prdc: k={k} needs more than k samples in each set (the k-th nearest other "
                             f"sample); got {len(real)} real and {len(fake)} fake")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise HandforgeError(f"prdc: chunk_size must be a positive integer, got {chunk_size!r}")


def _squared_distances(x: torch.Tensor, x_norms: torch.Tensor, y: torch.Tensor, y_norms: torch.Tensor) -> torch.Tensor:
    """(len(x), len(y)) tile of squared Euclidean distances, clamped at 0."""
    tile = torch.addmm(y_norms.unsqueeze(0), x, y.T, alpha=-2.0)
    return tile.add_(x_norms.unsqueeze(1)).clamp_(min=0)


def _merge_smallest(best: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k smallest of the running ``best`` (rows, k) and a tile's ``candidates``."""
    smallest = candidates.topk(min(k, candidates.shape[1]), dim=1, largest=False, sorted=False).values
    return torch.cat([best, smallest], dim=1).topk(k, dim=1, largest=False, sorted=False).values


def knn_radii_squared(x: torch.Tensor, norms: torch.Tensor, k: int, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Squared distance of each row of x to its k-th nearest other row (k < len(x)); ``norms``
    are the rows' squared norms."""
    n = x.shape[0]
    best = torch.full((n, k), float("inf"), dtype=x.dtype, device=x.device)
    starts = range(0, n, block)
    for i in starts:
        rows = slice(i, min(i + block, n))
        for j in starts:
            if j < i:
                continue
            cols = slice(j, min(j + block, n))
            tile = _squared_distances(x[rows], norms[rows], x[cols], norms[cols])
            if i == j:
                tile.fill_diagonal_(float("inf"))  # a sample is not its own neighbour
            best[rows] = _merge_smallest(best[rows], tile, k)
            if i != j:
                best[cols] = _merge_smallest(best[cols], tile.T, k)
    radii = best.amax(1)
    # k duplicates of a sample give it radius 0, but the expansion computes their distance as
    # round-off (about eps sqrt(D) x 2 ||x||^2) instead: snap that to the exact tie it stands for.
    roundoff = _ROUNDOFF_UNITS * torch.finfo(x.dtype).eps * x.shape[1] ** 0.5 * 2 * norms
    return radii.masked_fill(radii <= roundoff, 0.0)


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5, chunk_size: int | None = None) -> dict[str, float]:
    """Precision, recall, density, coverage of ``fake`` (M, D) against ``real`` (N, D) features.

    ``chunk_size``: rows per block of the tiles (default 1024); it bounds memory, not results.
    Runs on the inputs' device. Needs k < N and k < M.
    """
    _check(real, fake, k, chunk_size)
    block = chunk_size or DEFAULT_BLOCK
    dtype = torch.float64 if torch.float64 in (real.dtype, fake.dtype) else torch.float32
    centre = real.mean(0, dtype=torch.float64).to(dtype)
    x = real.detach().to(dtype) - centre
    y = fake.detach().to(device=x.device, dtype=dtype) - centre
    x_norms, y_norms = x.square().sum(1), y.square().sum(1)
    # A NaN or inf feature (or one too large to square) makes its norm non-finite: one O(N) check.
    for name, norms in (("real", x_norms), ("fake", y_norms)):
        if not torch.isfinite(norms).all():
            raise HandforgeError(f"prdc: {name} features contain NaN or infinite values (or values too large "
                                 f"to square in {dtype})")
    real_r2 = knn_radii_squared(x, x_norms, k, block)
    fake_r2 = knn_radii_squared(y, y_norms, k, block)
    # A zero radius contains nothing: as -inf it also fails the unclamped comparisons below.
    real_r2 = real_r2.masked_fill(real_r2 == 0, float("-inf"))
    fake_r2 = fake_r2.masked_fill(fake_r2 == 0, float("-inf"))

    n, m = x.shape[0], y.shape[0]
    balls_per_fake = torch.zeros(m, dtype=torch.float64, device=x.device)
    nearest_fake = torch.full((n,), float("inf"), dtype=dtype, device=x.device)  # min_j d2 - ||x_i||^2
    recall_margin = torch.full((n,), float("inf"), dtype=dtype, device=x.device)  # min_j d2 - fake_r2_j - ||x_i||^2
    for i in range(0, n, block):
        rows = slice(i, min(i + block, n))
        # threshold per real row such that "partial < threshold" <=> d2 < radius^2, where
        # partial = ||y||^2 - 2 x.y leaves out the row's own ||x||^2 (one pass over the tile fewer)
        threshold = (real_r2[rows] - x_norms[rows]).unsqueeze(1)
        for j in range(0, m, block):
            cols = slice(j, min(j + block, m))
            partial = torch.addmm(y_norms[cols].unsqueeze(0), x[rows], y[cols].T, alpha=-2.0)
            inside_real = (partial < threshold).to(dtype)
            balls_per_fake[cols] += (torch.ones(1, inside_real.shape[0], dtype=dtype, device=x.device)
                                     @ inside_real).squeeze(0).to(torch.float64)
            nearest_fake[rows] = torch.minimum(nearest_fake[rows], partial.amin(1))
            partial -= fake_r2[cols].unsqueeze(0)
            recall_margin[rows] = torch.minimum(recall_margin[rows], partial.amin(1))
    # Clamping d2 at 0 matters only against a zero radius, which is -inf here.
    covered = (nearest_fake + x_norms).clamp(min=0) < real_r2
    recalled = recall_margin + x_norms < 0
    return {
        "precision": float((balls_per_fake > 0).double().mean()),
        "recall": float(recalled.double().mean()),
        "density": float(balls_per_fake.sum() / (k * m)),
        "coverage": float(covered.double().mean()),
    }
