"""The metric math against independent references: Fréchet distance against pytorch-fid's formula
written with scipy.linalg.sqrtm, feature statistics against numpy, PRDC against a brute-force
NumPy implementation of Naeem et al.'s definitions, Inception Score against closed forms."""
import json
import math
import warnings

import numpy as np
import pytest
import torch

from handforge.errors import HandforgeError
from handforge.plugins.metrics.frechet import FeatureStats, FeatureStatsKeyError, frechet_distance
from handforge.plugins.metrics.inception_score import inception_score
from handforge.prdc import prdc

try:
    import scipy.linalg as scipy_linalg
except ImportError:  # scipy comes with the `test` extra; without it only the scipy references are skipped
    scipy_linalg = None
needs_scipy = pytest.mark.skipif(scipy_linalg is None, reason="scipy is not installed")


# ---------------------------------------------------------------- Fréchet distance

def pytorch_fid_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance, restated with scipy's sqrtm."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about singular products
        covmean = scipy_linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy_linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def gaussian_features(rng, n, dim, scale=1.0, offset=0.0):
    """Samples of a correlated Gaussian: standard normals through a random linear map."""
    return rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) * scale + offset


def moments(x):
    return x.mean(0), np.cov(x, rowvar=False)


@needs_scipy
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    a = moments(gaussian_features(rng, 500, 64))
    b = moments(gaussian_features(rng, 400, 64, scale=0.7, offset=0.3))
    expected = pytorch_fid_reference(*a, *b)
    assert frechet_distance(*a, *b) == pytest.approx(expected, rel=1e-6)
    # torch input, float32, either order
    torch_args = [torch.as_tensor(v, dtype=torch.float32) for v in (*b, *a)]
    expected32 = pytorch_fid_reference(*[t.double().numpy() for t in torch_args])
    assert frechet_distance(*torch_args) == pytest.approx(expected32, rel=1e-6)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    var1, var2 = rng.uniform(0.1, 3.0, 32), rng.uniform(0.1, 3.0, 32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_of_identical_statistics_is_zero():
    mu, sigma = moments(gaussian_features(np.random.default_rng(4), 300, 64))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


@needs_scipy
@pytest.mark.parametrize("n1, n2", [(40, 30), (20, 500), (500, 20)])
def test_frechet_rank_deficient_matches_scipy(n1, n2):
    """N < D: singular covariances; both singular goes through eigh, one singular through Cholesky
    of the other."""
    rng = np.random.default_rng(n1 + n2)
    a = moments(gaussian_features(rng, n1, 64))
    b = moments(gaussian_features(rng, n2, 64, scale=0.5, offset=1.0))
    value = frechet_distance(*a, *b)
    assert math.isfinite(value)
    assert value == pytest.approx(pytorch_fid_reference(*a, *b), rel=1e-6)


@needs_scipy
def test_frechet_retries_with_eps_like_pytorch_fid(monkeypatch):
    """When the square root fails, the covariances get eps on the diagonal inside the square root
    only, as in pytorch-fid's retry (the traces stay those of the unmodified covariances)."""
    rng = np.random.default_rng(5)
    a, b = moments(gaussian_features(rng, 30, 48)), moments(gaussian_features(rng, 30, 48))
    eps = 1e-2  # large enough for the retry's effect to be far above the tolerance
    offset = np.eye(48) * eps
    covmean = scipy_linalg.sqrtm((a[1] + offset) @ (b[1] + offset)).real
    diff = a[0] - b[0]
    expected = diff @ diff + np.trace(a[1]) + np.trace(b[1]) - 2 * np.trace(covmean)

    real_eigvalsh, calls = torch.linalg.eigvalsh, []

    def failing_once(matrix):
        calls.append(matrix)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("did not converge (simulated)")
        return real_eigvalsh(matrix)

    monkeypatch.setattr(torch.linalg, "eigvalsh", failing_once)
    with pytest.warns(RuntimeWarning, match="adding 0.01"):
        value = frechet_distance(*a, *b, eps=eps)
    assert len(calls) == 2
    assert value == pytest.approx(expected, rel=1e-6)
    assert abs(value - pytorch_fid_reference(*a, *b)) > 1e-3  # the retry did change the value


@needs_scipy
def test_frechet_tiny_negative_eigenvalue_is_kept_as_real_part():
    """An eigenvalue -1e-8 of the product gives pytorch-fid an imaginary part 1e-4 < 1e-3: accepted."""
    sigma1, sigma2 = np.eye(8), np.diag([1.0] * 7 + [-1e-8])
    mu = np.zeros(8)
    assert frechet_distance(mu, sigma1, mu, sigma2) == pytest.approx(
        pytorch_fid_reference(mu, sigma1, mu, sigma2), rel=1e-12)


@needs_scipy
def test_frechet_imaginary_component_is_an_error_like_pytorch_fid():
    sigma1, sigma2 = np.eye(8), np.diag([1.0] * 7 + [-1e-4])  # imaginary part 1e-2 > 1e-3
    mu = np.zeros(8)
    with pytest.raises(ValueError, match="Imaginary component"):
        pytorch_fid_reference(mu, sigma1, mu, sigma2)
    with pytest.raises(HandforgeError, match="imaginary component 0.01"):
        frechet_distance(mu, sigma1, mu, sigma2)


def test_frechet_rejects_non_covariances_and_bad_shapes():
    mu = np.zeros(4)
    singular_indefinite = np.diag([1.0, 1.0, 0.0, -1.0])
    with pytest.raises(HandforgeError, match="sigma1 is not positive semi-definite"):
        frechet_distance(mu, singular_indefinite, mu, np.diag([1.0, 1.0, 1.0, 0.0]))
    with pytest.raises(HandforgeError, match="covariances must be"):
        frechet_distance(mu, np.eye(3), mu, np.eye(4))
    with pytest.raises(HandforgeError, match="means must be"):
        frechet_distance(mu, np.eye(4), np.zeros(5), np.eye(4))
    with pytest.raises(HandforgeError, match="sigma2 contains NaN"):
        frechet_distance(mu, np.eye(4), mu, np.full((4, 4), np.nan))


# ---------------------------------------------------------------- feature statistics

def fed_in_chunks(x, sizes, dtype=torch.float64):
    stats, start = FeatureStats(), 0
    for size in sizes:
        stats.update(torch.as_tensor(x[start:start + size], dtype=dtype))
        start += size
    assert start == len(x)
    return stats


def test_feature_stats_match_numpy_in_uneven_chunks():
    x = gaussian_features(np.random.default_rng(6), 301, 24, offset=2.0)
    stats = fed_in_chunks(x, [1, 7, 100, 193])
    assert stats.count == 301
    assert isinstance(stats.mean, torch.Tensor) and stats.mean.dtype == torch.float64
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_feature_stats_accept_float32_and_a_large_offset():
    """float32 chunks are accumulated in float64 exactly; sums about the first chunk's mean keep a
    large common offset (1e4, spread 1) from cancelling the covariance away."""
    x = (np.random.default_rng(7).standard_normal((500, 8)) + 1e4).astype(np.float32)
    stats = fed_in_chunks(x, [250, 250], dtype=torch.float32)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.mean.numpy(), x64.mean(0), rtol=1e-13)


def test_feature_stats_merge_equals_one_pass():
    x = gaussian_features(np.random.default_rng(8), 250, 16, offset=-3.0)
    whole = fed_in_chunks(x, [250])
    merged = fed_in_chunks(x[:90], [90]).merge(fed_in_chunks(x[90:], [60, 100]))
    assert merged.count == 250
    np.testing.assert_allclose(merged.mean.numpy(), whole.mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(merged.cov.numpy(), whole.cov.numpy(), rtol=1e-10, atol=1e-12)
    empty_then = FeatureStats().merge(whole).merge(FeatureStats())
    np.testing.assert_allclose(empty_then.cov.numpy(), whole.cov.numpy(), rtol=1e-12)


def test_feature_stats_errors():
    stats = FeatureStats().update(torch.ones(1, 5))
    with pytest.raises(HandforgeError, match="at least 2 samples"):
        stats.cov
    with pytest.raises(HandforgeError, match="5 dimensions|have 4 dimensions"):
        stats.update(torch.ones(3, 4))
    with pytest.raises(HandforgeError, match="shape"):
        stats.update(torch.ones(3))
    with pytest.raises(HandforgeError, match="NaN"):
        FeatureStats().update(torch.tensor([[1.0, float("nan")]]))


def test_feature_stats_save_load_round_trip(tmp_path):
    x = gaussian_features(np.random.default_rng(9), 120, 12)
    stats = fed_in_chunks(x, [50, 70])
    key = {"dataset": "procedural_hands", "size": 64, "extractor": "inception_v3", "resize": [299, 299]}
    path = stats.save(tmp_path / "ref" / "stats.npz", key)
    loaded = FeatureStats.load(path, expect_key={**key, "resize": (299, 299)})  # tuple == stored list
    assert loaded.count == 120 and loaded.key == key
    np.testing.assert_array_equal(loaded.mean.numpy(), stats.mean.numpy())
    np.testing.assert_allclose(loaded.cov.numpy(), stats.cov.numpy(), rtol=1e-15)
    with np.load(path) as data:  # a plain npz, readable without handforge
        assert json.loads(str(data["key"])) == key
    assert [p.name for p in path.parent.iterdir()] == ["stats.npz"]  # no temporary left over
    # loaded statistics keep accumulating like the original
    more = gaussian_features(np.random.default_rng(10), 30, 12)
    np.testing.assert_allclose(loaded.update(torch.as_tensor(more)).cov.numpy(),
                               np.cov(np.concatenate([x, more]), rowvar=False), rtol=1e-10)


def test_feature_stats_key_mismatch_names_file_and_entries(tmp_path):
    path = fed_in_chunks(np.eye(3), [3]).save(tmp_path / "stats.npz", {"dataset": "a", "size": 64, "resize": 299})
    with pytest.raises(FeatureStatsKeyError) as caught:
        FeatureStats.load(path, expect_key={"dataset": "a", "size": 128, "extractor": "clip"})
    message = str(caught.value)
    assert str(path) in message
    assert "size: stored 64, expected 128" in message
    assert 'extractor: stored <missing>, expected "clip"' in message
    assert "resize: stored 299, expected <missing>" in message
    assert "dataset" not in message
    assert isinstance(caught.value, HandforgeError)


def test_feature_stats_unreadable_file_names_it(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(HandforgeError, match="broken.npz: not a readable feature statistics file"):
        FeatureStats.load(path)
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(HandforgeError, match="other.npz: not a readable"):
        FeatureStats.load(tmp_path / "other.npz")


@needs_scipy
def test_frechet_of_streamed_statistics_matches_scipy():
    rng = np.random.default_rng(11)
    x, y = gaussian_features(rng, 200, 32), gaussian_features(rng, 150, 32, scale=0.8, offset=0.5)
    a, b = fed_in_chunks(x, [64, 64, 72]), fed_in_chunks(y, [150])
    expected = pytorch_fid_reference(*moments(x), *moments(y))
    assert frechet_distance(a.mean, a.cov, b.mean, b.cov) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- PRDC

def prdc_brute_force(real, fake, k):
    """Naeem et al.'s definitions on full float64 distance matrices (the k-th nearest other
    sample is index k of a sorted row that includes the sample itself at distance 0)."""
    def distances(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    real_radius = np.sort(distances(real, real), axis=1)[:, k]
    fake_radius = np.sort(distances(fake, fake), axis=1)[:, k]
    d = distances(real, fake)
    inside_real = d < real_radius[:, None]
    return {
        "precision": inside_real.any(0).mean(),
        "recall": (d < fake_radius[None, :]).any(1).mean(),
        "density": inside_real.sum(0).mean() / k,
        "coverage": (d.min(1) < real_radius).mean(),
    }


def assert_prdc_equal(ours, expected):
    assert set(ours) == {"precision", "recall", "density", "coverage"}
    for name in expected:
        assert ours[name] == pytest.approx(expected[name], abs=1e-12), name


@pytest.mark.parametrize("k, chunk_size", [(1, 7), (3, 50), (5, None), (10, 33)])
def test_prdc_matches_brute_force(k, chunk_size):
    rng = np.random.default_rng(k)
    real = rng.standard_normal((203, 16)) + 5.0
    fake = rng.standard_normal((158, 16)) * 1.3 + 5.4
    expected = prdc_brute_force(real, fake, k)
    assert 0 < expected["precision"] < 1 and 0 < expected["coverage"] < 1  # a test that can fail
    assert_prdc_equal(prdc(torch.as_tensor(real), torch.as_tensor(fake), k=k, chunk_size=chunk_size), expected)


def test_prdc_float32_matches_brute_force():
    rng = np.random.default_rng(12)
    real = rng.standard_normal((180, 64)).astype(np.float32) + 3
    fake = (rng.standard_normal((190, 64)) * 1.1 + 3.1).astype(np.float32)
    expected = prdc_brute_force(real.astype(np.float64), fake.astype(np.float64), 5)
    assert_prdc_equal(prdc(torch.from_numpy(real), torch.from_numpy(fake), k=5, chunk_size=64), expected)


def isolated_points(rng, count, dim, distance):
    """Points far from the unit clouds and from each other: no cloud sample's k-th neighbour."""
    directions = rng.standard_normal((count, dim))
    return distance * directions / np.linalg.norm(directions, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prdc_ties_from_duplicates_match_brute_force(dtype):
    """A sample repeated k + 1 times has radius exactly 0: its ball is empty, even for a sample of
    the other set at distance 0. (The repeated samples are isolated, so that the copies in the
    other set sit on no other ball's boundary, where exact ties go either way with round-off -- in
    the reference code's float64 too.)"""
    rng = np.random.default_rng(13)
    k, dim = 3, 64
    real_repeated, fake_repeated = isolated_points(rng, 6, dim, 60.0), isolated_points(rng, 5, dim, 60.0)
    real = np.concatenate([rng.standard_normal((40, dim)) * 2, np.repeat(real_repeated, k + 1, axis=0),
                           fake_repeated])
    fake = np.concatenate([rng.standard_normal((50, dim)) * 2 + 0.2, np.repeat(fake_repeated, k + 1, axis=0),
                           real_repeated])
    real, fake = real.astype(np.float32).astype(np.float64), fake.astype(np.float32).astype(np.float64)
    expected = prdc_brute_force(real, fake, k)
    ours = prdc(torch.as_tensor(real, dtype=dtype), torch.as_tensor(fake, dtype=dtype), k=k, chunk_size=16)
    assert_prdc_equal(ours, expected)


def test_prdc_identical_and_far_apart_sets():
    real = torch.as_tensor(np.random.default_rng(14).standard_normal((150, 32)), dtype=torch.float32)
    same = prdc(real, real.clone(), k=5, chunk_size=40)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = prdc(real, real + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_bad_input():
    real, fake = torch.randn(10, 4), torch.randn(20, 4)
    with pytest.raises(HandforgeError, match="k=10 needs more than k samples.*10 real and 20 fake"):
        prdc(real, fake, k=10)
    with pytest.raises(HandforgeError, match="k must be a positive integer"):
        prdc(real, fake, k=0)
    with pytest.raises(HandforgeError, match="differ in dimension"):
        prdc(real, torch.randn(20, 5))
    with pytest.raises(HandforgeError, match="fake features contain NaN"):
        prdc(real, torch.cat([fake, torch.full((1, 4), float("nan"))]), k=3)
    with pytest.raises(HandforgeError, match="shape"):
        prdc(real[0], fake)
    with pytest.raises(HandforgeError, match="chunk_size"):
        prdc(real, fake, k=3, chunk_size=0)


# ---------------------------------------------------------------- Inception Score

def test_inception_score_of_confident_evenly_used_classes_is_the_class_count():
    classes = 10
    logits = 60.0 * torch.eye(classes).repeat(20, 1)  # p(y|x) one-hot to exp(-60); each class 20 times
    mean, std = inception_score(logits)
    assert mean == pytest.approx(classes, rel=1e-9) and std == 0.0


def test_inception_score_of_a_single_class_or_uniform_predictions_is_one():
    one_class = torch.zeros(50, 7)
    one_class[:, 3] = 40.0
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-12)
    assert inception_score(torch.randn(1, 5).repeat(30, 1))[0] == pytest.approx(1.0, abs=1e-12)


def test_inception_score_matches_the_formula_per_consecutive_split():
    logits = torch.randn(103, 6, generator=torch.Generator().manual_seed(0)) * 3

    def reference(part):  # the original numpy formula on probabilities
        p = torch.softmax(part.double(), 1).numpy()
        return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), 1))))

    splits = 4
    scores = [reference(logits[s * 103 // splits:(s + 1) * 103 // splits]) for s in range(splits)]
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)
    assert std > 0


def test_inception_score_splits_see_their_own_classes():
    """Two halves, each confidently one class: each split scores 1; scored together, 2."""
    logits = torch.zeros(40, 2)
    logits[:20, 0] = logits[20:, 1] = 50.0
    assert inception_score(logits, splits=1)[0] == pytest.approx(2.0, rel=1e-9)
    assert inception_score(logits, splits=2) == pytest.approx((1.0, 0.0), abs=1e-9)


def test_inception_score_bad_input():
    with pytest.raises(HandforgeError, match="3 samples cannot be split into 4 parts"):
        inception_score(torch.randn(3, 5), splits=4)
    with pytest.raises(HandforgeError, match="splits must be a positive integer"):
        inception_score(torch.randn(3, 5), splits=0)
    with pytest.raises(HandforgeError, match="shape"):
        inception_score(torch.randn(5))
    with pytest.raises(HandforgeError, match="NaN or infinite"):
        inception_score(torch.tensor([[0.0, float("nan")]]))
