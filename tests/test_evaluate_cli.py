"""`handforge evaluate`, `fit-judge` and `weights` on image folders written by the tests, checked
against the metric math applied directly to independently read features."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from handforge.cli import main
from test_metrics_plugin import ensure_metrics_builtin, scipy_frechet, write_png

SIZE = 16


class PixelStats:
    """A test extractor: each channel average-pooled to 4x4 (48 numbers per image)."""

    name = "pixel_stats"
    key = {"extractor": "pixel_stats", "version": 1}

    def __init__(self, options):
        pass

    def features(self, images):
        return torch.nn.functional.avg_pool2d(images.float(), images.shape[-1] // 4).flatten(1)


def pooled(array):
    """The same features, from an (N, H, W, 3) array, in numpy."""
    n, h, w, _ = array.shape
    return array.astype(np.float64).reshape(n, 4, h // 4, 4, w // 4, 3).mean((2, 4)).transpose(0, 3, 1, 2).reshape(n, -1)


def brute_prdc(real, fake, k):
    """Naeem et al.'s definitions with full distance matrices."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    real_radius = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the sample itself
    fake_radius = np.sort(dist(fake, fake), axis=1)[:, k]
    rf = dist(real, fake)
    return {
        "precision": (rf < real_radius[:, None]).any(0).mean(),
        "recall": (rf < fake_radius[None, :]).any(1).mean(),
        "density": (rf < real_radius[:, None]).sum(0).mean() / k,
        "coverage": (rf.min(1) < real_radius).mean(),
    }


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """``cli(*args) -> (exit code, stdout, stderr)``, in this process, with the test extractor registered."""
    from handforge.plugin_manager import get_host
    from handforge.plugins.metrics import extractors

    ensure_metrics_builtin()
    get_host(reload=True)
    from handforge.weights import weights_dir

    # Fetched weights stay where they are when the cache root moves to the test's folder.
    monkeypatch.setenv("HANDFORGE_WEIGHTS", str(weights_dir()))
    monkeypatch.setenv("HANDFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(extractors.EXTRACTORS, "pixel_stats",
                        extractors.ExtractorEntry("pixel_stats", PixelStats, "test"))
    torch.set_num_threads(1)

    def call(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        out = capsys.readouterr()
        return exit_info.value.code, out.out, out.err

    yield call
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def image_folder(path, n, seed, brightness=0, classes=None):
    """n random images (smooth blobs + noise), as PNGs; in class sub-folders when ``classes``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i in range(n):
        cy, cx = rng.uniform(2, SIZE - 2, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(4, 20))
        colour = rng.uniform(60, 255, 3)
        image = blob[..., None] * colour + rng.uniform(0, 40 + brightness, (SIZE, SIZE, 3))
        folder = path / classes[i % len(classes)] if classes else path
        write_png(folder / f"{i:03d}.png", np.clip(image, 0, 255))
    return path


def read_folder(path):
    files = sorted(path.rglob("*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def test_evaluate_json_matches_the_math_on_independently_read_features(cli, tmp_path):
    real, fake = image_folder(tmp_path / "real", 60, seed=0), image_folder(tmp_path / "fake", 50, seed=1, brightness=60)
    code, out, err = cli("evaluate", "--real", real, "--fake", fake, "--metrics", "fid,prdc", "--extractor",
                         "pixel_stats", "--k", "3", "--batch-size", "16", "--json")
    assert code == 0, err
    report = json.loads(out)
    a, b = pooled(read_folder(real)), pooled(read_folder(fake))
    values = report["metrics"]
    assert set(values) == {"fd_pixel_stats", "precision", "recall", "density", "coverage"}
    assert values["fd_pixel_stats"] == pytest.approx(scipy_frechet(a, b), rel=1e-6)
    expected = brute_prdc(a, b, k=3)
    assert {k: values[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert 0 < values["precision"] < 1  # the sets differ: the check above is not about trivial values
    assert report["real"] == {"source": f"folder {real}", "images": 60, "skipped": 0}
    assert report["fake"]["images"] == 50

    code, out, _ = cli("evaluate", "--real", real, "--fake", fake, "--metrics", "fid", "--extractor", "pixel_stats")
    assert code == 0 and f"fd_pixel_stats  {values['fd_pixel_stats']:.6g}" in out and "real: folder" in out


def test_identical_folders_score_perfectly(cli, tmp_path):
    real = image_folder(tmp_path / "real", 80, seed=0)  # more images than features: a full-rank covariance
    code, out, err = cli("evaluate", "--real", real, "--fake", real, "--metrics", "prdc,fid", "--extractor",
                         "pixel_stats", "--json", "--no-cache")
    assert code == 0, err
    values = json.loads(out)["metrics"]
    scale = np.trace(np.cov(pooled(read_folder(real)), rowvar=False))  # the terms that cancel are this size
    assert abs(values["fd_pixel_stats"]) < 1e-9 * scale
    assert values["precision"] == values["recall"] == values["coverage"] == 1.0


def test_reference_cache_is_written_with_its_key_reused_and_a_mismatch_refused(cli, tmp_path):
    from handforge.plugins.metrics.frechet import FeatureStats
    from handforge.plugins.metrics.reference import reference_path

    real, fake = image_folder(tmp_path / "real", 30, seed=0), image_folder(tmp_path / "fake", 30, seed=1)
    args = ("evaluate", "--real", real, "--fake", fake, "--metrics", "fid", "--extractor", "pixel_stats", "--json")
    code, out, err = cli(*args)
    assert code == 0, err
    first = json.loads(out)["metrics"]["fd_pixel_stats"]
    files = sorted((tmp_path / "cache" / "reference").glob("*-stats-*.npz"))
    assert len(files) == 1  # the real side only: generated images change with the weights
    stats = FeatureStats.load(files[0])
    key = stats.key
    assert key["path"] == str(real.resolve()) and key["num"] == 30 and key["extractor"] == PixelStats.key
    assert files[0] == reference_path("stats", key)

    # Reused: statistics moved by a known offset in the cache move the score by its square norm.
    shift = np.zeros(48)
    shift[0] = 10.0
    FeatureStats.from_moments(stats.count, stats.mean + torch.from_numpy(shift), stats.cov).save(files[0], key)
    code, out, _ = cli(*args)
    b = pooled(read_folder(fake))
    a_mean = stats.mean.numpy() + shift
    expected = scipy_frechet(pooled(read_folder(real)), b) + ((a_mean - b.mean(0)) ** 2).sum() - \
        ((stats.mean.numpy() - b.mean(0)) ** 2).sum()
    assert json.loads(out)["metrics"]["fd_pixel_stats"] == pytest.approx(expected, rel=1e-6)
    code, out, _ = cli(*args, "--no-cache")
    assert json.loads(out)["metrics"]["fd_pixel_stats"] == pytest.approx(first, rel=1e-9)

    # Refused: a file under this key's name that holds another key's statistics.
    stats.save(files[0], {**key, "num": 29})
    code, _, err = cli(*args)
    assert code == 2 and str(files[0]) in err and "num: stored 29, expected 30" in err and "delete the file" in err


def test_fit_judge_then_is_fhd_and_cas_on_labelled_folders(cli, tmp_path):
    from handforge.plugins.metrics.inception_score import inception_score
    from handforge.plugins.metrics.judge_classifier import JudgeClassifier

    names = ["fist", "palm", "point"]
    real = image_folder(tmp_path / "real", 48, seed=0, classes=names)
    fake = image_folder(tmp_path / "fake", 36, seed=1, classes=names)
    judge_path = tmp_path / "judge.safetensors"
    code, out, err = cli("fit-judge", real, "--out", judge_path, "--size", SIZE, "--epochs", 2, "--width", 4,
                         "--batch-size", 16, "--val", fake)
    assert code == 0, err
    assert "epoch 2/2" in out and "val accuracy" in out and judge_path.is_file()
    judge = JudgeClassifier.load(judge_path)
    assert judge.class_names == names and judge.image_size == SIZE

    code, out, err = cli("evaluate", "--real", real, "--fake", fake, "--metrics", "fid,is,cas", "--extractor",
                         "hand_features", "--classifier", judge_path, "--splits", 2, "--size", SIZE, "--epochs", 1,
                         "--json")
    assert code == 0, err
    values = json.loads(out)["metrics"]
    fake_images = torch.from_numpy(read_folder(fake)).permute(0, 3, 1, 2)
    real_images = torch.from_numpy(read_folder(real)).permute(0, 3, 1, 2)
    assert (values["is"], values["is_std"]) == pytest.approx(inception_score(judge.logits(fake_images), splits=2))
    assert values["fhd"] == pytest.approx(scipy_frechet(judge.features(real_images), judge.features(fake_images)),
                                          rel=1e-5, abs=1e-9)
    assert 0 <= values["cas_top1"] <= 1 and 0 <= values["cas_class_mean"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--real", "{tmp}/nowhere", "--fake", "{tmp}/real", "--metrics", "fid", "--extractor", "pixel_stats"],
     "--real {tmp}/nowhere: no such folder"),
    (["--real", "{tmp}/real", "--fake", "{tmp}/real", "--metrics", "fid,prcd", "--extractor", "pixel_stats"],
     "unknown metric 'prcd' (did you mean 'prdc'?)"),
    (["--real", "{tmp}/real", "--fake", "{tmp}/real", "--metrics", "cas"],
     "metric 'cas' needs labelled images, but --fake (folder {tmp}/real) has no labels"),
    (["--fake", "{tmp}/real", "--metrics", "is"], "--metrics is.classifier: required"),
    (["--fake", "{tmp}/real", "--metrics", "fid", "--extractor", "pixel_stats"], "metric 'fid' needs --real images"),
    (["--real", "{tmp}/real", "--fake", "{tmp}/real", "--metrics", "fid", "--weights", "{tmp}/no.pt"],
     "inception_fid weights: no file {tmp}/no.pt"),
    (["--real", "{tmp}/real", "--fake", "{tmp}/real", "--metrics", "fid"],
     "handforge weights fetch inception_fid"),
])
def test_bad_input_gives_one_clear_message(cli, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HANDFORGE_WEIGHTS", str(tmp_path / "no_weights"))  # the Inception file is missing
    image_folder(tmp_path / "real", 4, seed=0)
    code, out, err = cli("evaluate", *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and out == ""
    assert err.startswith("handforge: error: ") and message.format(tmp=tmp_path) in err, err
    assert "Traceback" not in err


def test_weights_list_reports_a_missing_file(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HANDFORGE_WEIGHTS", str(tmp_path / "w"))
    code, out, err = cli("weights", "list")
    assert code == 0, err
    assert "inception_fid  missing" in out and str(tmp_path / "w") in out


def test_inception_path_matches_the_math_on_its_features(cli, tmp_path, monkeypatch):
    """Needs the real FID Inception weights (`handforge weights fetch inception_fid`); skipped without them."""
    from handforge.plugins.metrics import extractors
    from handforge.prdc import prdc
    from handforge.plugins.metrics.weight_files import INCEPTION_FID
    from handforge.weights import weights_dir

    weights = weights_dir() / INCEPTION_FID.file_name
    if not weights.is_file():
        pytest.skip(f"needs the FID Inception weights at {weights} (`handforge weights fetch inception_fid`)")
    seen = []
    features = extractors.InceptionFID.features

    def recording(self, images):
        out = features(self, images)
        seen.append((images.clone(), out))
        return out

    monkeypatch.setattr(extractors.InceptionFID, "features", recording)
    real, fake = image_folder(tmp_path / "real", 8, seed=0), image_folder(tmp_path / "fake", 8, seed=1, brightness=60)
    code, out, err = cli("evaluate", "--real", real, "--fake", fake, "--metrics", "fid,prdc", "--k", "3",
                         "--resize", "legacy", "--json")
    assert code == 0, err
    values = json.loads(out)["metrics"]
    (real_images, a), (fake_images, b) = seen  # one batch per side
    assert torch.equal(real_images, torch.from_numpy(read_folder(real)).permute(0, 3, 1, 2))
    assert torch.equal(fake_images, torch.from_numpy(read_folder(fake)).permute(0, 3, 1, 2))
    assert a.shape == (8, 2048) and a.dtype == torch.float32
    # With n < 2048 samples, tr sqrtm(cov_a cov_b) is the nuclear norm of A B^T / (n - 1) (A, B the
    # centred features): the eigenvalues of cov_a cov_b are those of M M^T with M = A B^T / (n - 1).
    centred_a, centred_b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    trace_sqrt = torch.linalg.svdvals(centred_a @ centred_b.T / 7).sum()
    expected = ((a.double().mean(0) - b.double().mean(0)) ** 2).sum() + (centred_a ** 2).sum() / 7 + \
        (centred_b ** 2).sum() / 7 - 2 * trace_sqrt
    assert values["fid"] == pytest.approx(expected.item(), rel=1e-6)
    assert {k: values[k] for k in ("precision", "recall", "density", "coverage")} == pytest.approx(prdc(a, b, k=3))
