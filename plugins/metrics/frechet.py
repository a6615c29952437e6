"""Gaussian feature statistics and the Fréchet distance between two of them (the math of FID).

``FeatureStats`` accumulates the mean and covariance of feature vectors chunk by chunk, in
float64 on the CPU, without keeping the features; it saves to and loads from ``.npz`` files whose
stored key protects cached reference statistics from being reused for another setup.

``frechet_distance`` computes pytorch-fid's ``calculate_frechet_distance`` without scipy (see its
docstring for why the values agree).
"""
from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from handforge.errors import HandforgeError
from handforge.fileio import atomic_write_bytes

# Rows converted to float64 at a time in ``update``: bounds the temporary copy (4096 x 2048
# features = 64 MiB) whatever the size of the chunk a caller passes.
_UPDATE_ROWS = 4096
_FILE_FORMAT = "handforge.feature_stats/1"
# pytorch-fid raises when an imaginary part of sqrtm's diagonal exceeds this.
_IMAGINARY_TOLERANCE = 1e-3
# A covariance's eigenvalue below -this x its largest one is more than round-off: not a covariance.
_PSD_RELATIVE_TOLERANCE = 1e-9


class FeatureStatsKeyError(HandforgeError):
    """Cached statistics were made for another (dataset, size, extractor, ...) than asked for."""


def _float64(array, what: str) -> torch.Tensor:
    """Any tensor (any device, any float dtype) or array-like -> CPU float64 tensor, checked finite."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach().to("cpu", torch.float64)
    else:
        tensor = torch.as_tensor(np.asarray(array, dtype=np.float64))
    if not torch.isfinite(tensor).all():
        raise HandforgeError(f"{what} contains NaN or infinite values")
    return tensor


class FeatureStats:
    """Streaming mean and unbiased covariance of feature vectors (N, D).

    Kept on the CPU in float64: the count, and sums taken about a fixed ``shift`` (the mean of the
    first chunk) -- the sum of ``x - shift`` and of the outer products ``(x - shift)(x - shift)^T``
    (one ``X^T X`` per chunk). Summing about a point near the mean instead of about 0 keeps
    ``sum_outer - n mean mean^T`` from cancelling catastrophically when the features' mean is large
    against their spread. ``mean`` and ``cov`` are CPU float64 torch tensors; ``cov`` has the N - 1
    denominator, equal to ``numpy.cov(X, rowvar=False)`` on all the features at once.
    """

    def __init__(self) -> None:
        self._count = 0
        self._shift: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._sum_outer: torch.Tensor | None = None
        self.key: dict | None = None  # the key stored in the file this came from, if loaded

    @property
    def dim(self) -> int | None:
        return None if self._shift is None else self._shift.shape[0]

    @property
    def count(self) -> int:
        return self._count

    def _start(self, shift: torch.Tensor) -> None:
        dim = shift.shape[0]
        self._shift = shift.clone()
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._sum_outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features) -> "FeatureStats":
        """Add a chunk of feature vectors (N, D) of any float dtype on any device."""
        if not isinstance(features, torch.Tensor):
            features = torch.as_tensor(np.asarray(features))
        if features.ndim != 2:
            raise HandforgeError(f"feature statistics: expected features of shape (N, D), got {tuple(features.shape)}")
        if self.dim is not None and features.shape[1] != self.dim:
            raise HandforgeError(f"feature statistics: features have {features.shape[1]} dimensions, "
                                 f"the statistics so far have {self.dim}")
        for start in range(0, features.shape[0], _UPDATE_ROWS):
            part = _float64(features[start:start + _UPDATE_ROWS], "feature statistics: features")
            if self._shift is None:
                self._start(part.mean(0))
            part = part - self._shift
            self._sum += part.sum(0)
            self._sum_outer.addmm_(part.T, part)
            self._count += part.shape[0]
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another accumulator's samples to this one (e.g. another rank's); returns self."""
        if other._count == 0:
            return self
        if self._count == 0:
            self._start(other._shift)
            self._sum.copy_(other._sum)
            self._sum_outer.copy_(other._sum_outer)
            self._count = other._count
            return self
        if other.dim != self.dim:
            raise HandforgeError(f"feature statistics: cannot merge {other.dim}-dimensional statistics "
                                 f"into {self.dim}-dimensional ones")
        # Re-centre the other's sums on our shift: y - a = (y - b) + delta with delta = b - a.
        delta = other._shift - self._shift
        n = other._count
        self._sum_outer += (other._sum_outer + torch.outer(other._sum, delta) + torch.outer(delta, other._sum)
                            + n * torch.outer(delta, delta))
        self._sum += other._sum + n * delta
        self._count += n
        return self

    def _need_two(self) -> None:
        if self._count < 2:
            raise HandforgeError(f"feature statistics need at least 2 samples for a covariance, got {self._count}")

    @property
    def mean(self) -> torch.Tensor:
        """(D,) float64 CPU tensor."""
        self._need_two()
        return self._shift + self._sum / self._count

    @property
    def cov(self) -> torch.Tensor:
        """(D, D) float64 CPU tensor, unbiased (N - 1 denominator)."""
        self._need_two()
        centred = self._sum_outer - torch.outer(self._sum, self._sum) / self._count
        return (centred + centred.T) / (2 * (self._count - 1))  # symmetric to the last bit

    @classmethod
    def from_moments(cls, count: int, mean, cov) -> "FeatureStats":
        """Statistics with a given sample count, mean (D,) and unbiased covariance (D, D)."""
        mean, cov = _float64(mean, "feature statistics: mean"), _float64(cov, "feature statistics: cov")
        if count < 2 or mean.ndim != 1 or cov.shape != (mean.shape[0],) * 2:
            raise HandforgeError(f"feature statistics: need count >= 2, mean (D,) and cov (D, D); got count "
                                 f"{count}, mean {tuple(mean.shape)}, cov {tuple(cov.shape)}")
        stats = cls()
        stats._start(mean)  # about the mean itself, the sum is 0 and the outer sum is (n - 1) cov
        stats._sum_outer.copy_(cov * (count - 1))
        stats._count = int(count)
        return stats

    def save(self, path, key: dict) -> Path:
        """Write count, mean, cov and ``key`` (stored as JSON) to an ``.npz`` file, atomically."""
        try:
            key_json = json.dumps(key, sort_keys=True)
        except TypeError as e:
            raise HandforgeError(f"{path}: the statistics key must be JSON-serializable: {e}") from None
        try:
            self._need_two()
        except HandforgeError as e:
            raise HandforgeError(f"{path}: {e}") from None
        buffer = io.BytesIO()
        np.savez(buffer, format=np.array(_FILE_FORMAT), count=np.array(self._count, dtype=np.int64),
                 mean=self.mean.numpy(), cov=self.cov.numpy(), key=np.array(key_json))
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path, expect_key: dict | None = None) -> "FeatureStats":
        """Read statistics written by ``save``; with ``expect_key``, raise ``FeatureStatsKeyError``
        (a ``HandforgeError``) naming the file and each differing key entry unless the stored key
        equals it (compared after a JSON round trip, so tuples and lists are the same)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["format"]) != _FILE_FORMAT:
                    raise ValueError(f"format {str(data['format'])!r}, expected {_FILE_FORMAT!r}")
                count, mean, cov = int(data["count"]), data["mean"], data["cov"]
                stored_key = json.loads(str(data["key"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise HandforgeError(f"{path}: not a readable feature statistics file ({e})") from None
        if expect_key is not None:
            differences = key_differences(stored_key, expect_key)
            if differences:
                raise FeatureStatsKeyError(f"{path}: the cached feature statistics were made for another setup "
                                           f"({'; '.join(differences)}); delete the file to recompute them")
        try:
            stats = cls.from_moments(count, mean, cov)
        except HandforgeError as e:
            raise HandforgeError(f"{path}: {e}") from None
        stats.key = stored_key
        return stats


def key_differences(stored: dict, expected: dict) -> list[str]:
    """'name: stored X, expected Y' for each entry where two statistics keys differ."""
    expected = json.loads(json.dumps(expected, sort_keys=True))
    missing = "<missing>"
    out = []
    for name in sorted(set(stored) | set(expected)):
        a, b = stored.get(name, missing), expected.get(name, missing)
        if a != b:
            out.append(f"{name}: stored {a if a is missing else json.dumps(a)}, "
                       f"expected {b if b is missing else json.dumps(b)}")
    return out


def _eigen_factor(sigma: torch.Tensor, name: str) -> torch.Tensor:
    """F with F F^T = sigma from ``eigh``: V sqrt(W), round-off-sized negative eigenvalues set to 0
    (larger ones mean sigma is no covariance)."""
    w, v = torch.linalg.eigh(sigma)
    tolerance = _PSD_RELATIVE_TOLERANCE * max(float(w.abs().max()), 1e-300)
    if float(w.min()) < -tolerance:
        raise HandforgeError(f"Fréchet distance: {name} is not positive semi-definite (eigenvalue "
                             f"{float(w.min()):.3g}, largest {float(w.max()):.3g}); is it a covariance matrix?")
    return v * w.clamp(min=0).sqrt()


def _product_eigenvalues(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of sigma1 @ sigma2, through a symmetric matrix with the same spectrum.

    With F F^T = s (s one of the two, s' the other), s s' = F (F^T s') and F^T s' F = (F^T s') F
    have the same eigenvalues (AB and BA always do), and F^T s' F is symmetric: ``eigvalsh``.
    F is a Cholesky factor when either matrix is positive definite (so, by Sylvester's law of
    inertia, a non-PSD other one still shows as negative eigenvalues); when both are singular
    (fewer samples than dimensions) it comes from ``eigh`` of sigma1."""
    factor, info = torch.linalg.cholesky_ex(sigma1)
    other = sigma2
    if info != 0:
        factor, info = torch.linalg.cholesky_ex(sigma2)
        other = sigma1
        if info != 0:
            factor, other = _eigen_factor(sigma1, "sigma1"), sigma2
    sandwich = factor.T @ other @ factor
    return torch.linalg.eigvalsh((sandwich + sandwich.T) / 2)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)), as pytorch-fid's
    ``calculate_frechet_distance``; inputs are tensors (any device) or arrays, computed in float64.

    Why it equals pytorch-fid's value: the eigenvalues of a matrix's principal square root are
    the square roots of its eigenvalues, so tr(sqrtm(s1 s2)) = sum_i sqrt(lambda_i(s1 s2)). For
    covariances the lambda_i are the eigenvalues of the symmetric PSD matrix F^T s2 F with
    F F^T = s1 (see ``_product_eigenvalues``), real and >= 0 in exact arithmetic. scipy's
    ``sqrtm`` on the non-symmetric product reaches the same numbers through a Schur form; here two
    O(D^3) symmetric steps replace it (Cholesky or ``eigh``, two matmuls, ``eigvalsh``).

    pytorch-fid's safeguards, mapped onto this formulation:

    - Imaginary part: in floating point some lambda_i of a singular product come out slightly
      negative; their square roots are imaginary (i sqrt(-lambda_i)), which is where scipy's
      ``sqrtm`` gets an imaginary part. pytorch-fid raises when an imaginary part on sqrtm's
      diagonal exceeds 1e-3; here the same bound is applied to the eigenvalues of the square
      root (its diagonal in the product's eigenbasis): a HandforgeError when some
      lambda_i < -1e-6. Otherwise, as pytorch-fid keeps the real part, negative lambda_i add 0
      (Re sqrt(lambda) = 0 for lambda < 0). When neither covariance is positive definite,
      sigma1 is factored through ``eigh`` and rejected if it has an eigenvalue below round-off
      (-1e-9 x its largest): it is no covariance.
    - Non-finite square root: scipy's Schur recurrence divides by sums of eigenvalue square roots,
      which can vanish for a singular product; on inf/NaN pytorch-fid warns and recomputes
      sqrtm((s1 + eps I)(s2 + eps I)), keeping the traces of the unmodified covariances. The
      symmetric route has no such division, so singular products (N < D samples) need no retry
      and give sqrt(0) = 0 for the null directions; the same retry, with the same formula, is
      made when this computation fails anyway (no convergence, or non-finite eigenvalues).
    """
    mu1, mu2 = _float64(mu1, "Fréchet distance: mu1"), _float64(mu2, "Fréchet distance: mu2")
    sigma1, sigma2 = _float64(sigma1, "Fréchet distance: sigma1"), _float64(sigma2, "Fréchet distance: sigma2")
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise HandforgeError(f"Fréchet distance: the means must be vectors of one length, got "
                             f"{tuple(mu1.shape)} and {tuple(mu2.shape)}")
    if sigma1.shape != (mu1.shape[0],) * 2 or sigma2.shape != sigma1.shape:
        raise HandforgeError(f"Fréchet distance: the covariances must be ({mu1.shape[0]}, {mu1.shape[0]}), "
                             f"got {tuple(sigma1.shape)} and {tuple(sigma2.shape)}")
    try:
        eigenvalues = _product_eigenvalues(sigma1, sigma2)
        failed = not torch.isfinite(eigenvalues).all()
    except torch.linalg.LinAlgError:
        failed = True
    if failed:
        warnings.warn(f"Fréchet distance: the covariance product's square root is not finite; adding {eps} "
                      f"to the covariances' diagonals (as pytorch-fid does)", RuntimeWarning, stacklevel=2)
        offset = eps * torch.eye(sigma1.shape[0], dtype=torch.float64)
        eigenvalues = _product_eigenvalues(sigma1 + offset, sigma2 + offset)
        if not torch.isfinite(eigenvalues).all():
            raise HandforgeError("Fréchet distance: the covariance product has no finite square root, "
                                 f"even with {eps} added to the diagonals")
    smallest = float(eigenvalues.min())
    if smallest < -_IMAGINARY_TOLERANCE ** 2:
        raise HandforgeError(f"Fréchet distance: the square root of the covariance product has an imaginary "
                             f"component {(-smallest) ** 0.5:.3g} > {_IMAGINARY_TOLERANCE} (eigenvalue "
                             f"{smallest:.3g}); are both matrices covariances?")
    trace_sqrt = float(eigenvalues.clamp(min=0).sqrt().sum())
    diff = mu1 - mu2
    return float(diff @ diff) + float(sigma1.trace()) + float(sigma2.trace()) - 2.0 * trace_sqrt
