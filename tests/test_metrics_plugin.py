"""The metrics plugin: judge classifier, CAS, extractors, sources, reference cache, in-loop
evaluation in a tiny GAN run (one and two processes)."""
import json
import pathlib

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from safetensors.torch import save_file

import handforge.plugins
from handforge.errors import HandforgeError
from handforge.imaging import to_uint8
from handforge.plugin_manager import PluginHost

METRICS_MODULE = "handforge.plugins.metrics"
SIZE = 16


def ensure_metrics_builtin() -> None:
    """The metrics plugin as a built-in (a no-op once plugins/__init__.py lists it)."""
    if METRICS_MODULE not in handforge.plugins.BUILTIN_MODULES:
        handforge.plugins.BUILTIN_MODULES = (*handforge.plugins.BUILTIN_MODULES, METRICS_MODULE)


def metrics_host() -> PluginHost:
    ensure_metrics_builtin()
    host = PluginHost()
    host.load_builtins()
    return host


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Reference cache in the test's folder; Accelerate's singleton state reset afterwards."""
    from handforge.weights import weights_dir

    # Fetched weights stay where they are when the cache root moves to the test's folder.
    monkeypatch.setenv("HANDFORGE_WEIGHTS", str(weights_dir()))
    monkeypatch.setenv("HANDFORGE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def hands(num, split="train", size=SIZE, **options):
    """Samples 0 .. num-1 of procedural_hands as (uint8 images (N, 3, H, W), labels, class names)."""
    from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig

    dataset = ProceduralHands(ProceduralHandsConfig(size=size, **options), split)
    samples = dataset.__getitems__(list(range(num)))
    images = torch.from_numpy(to_uint8(samples["image"])).permute(0, 3, 1, 2).contiguous()
    return images, samples["label"], dataset.class_names


def tiny_judge(path, num=64):
    from handforge.plugins.metrics.judge_classifier import JudgeClassifier

    images, labels, names = hands(num)
    judge = JudgeClassifier.fit(images, labels, class_names=names, size=SIZE, epochs=1, width=4, depth=2,
                                batch_size=32)
    judge.save(path)
    return judge


def scipy_frechet(features_a, features_b) -> float:
    """pytorch-fid's formula, written with numpy and scipy: the independent reference."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(root).all():
        offset = np.eye(len(s1)) * 1e-6
        root = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root.real))


# -- judge classifier and CAS ------------------------------------------------------------------------


COLOURS = torch.tensor([[230, 40, 40], [40, 220, 40], [40, 60, 230], [230, 220, 40]], dtype=torch.uint8)


def squares(n, seed=0):
    """uint8 images whose class is the colour of a square (placed at random) over grey noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(COLOURS)
    images = (torch.rand(n, 1, SIZE, SIZE, generator=g) * 120).to(torch.uint8).repeat(1, 3, 1, 1)
    corners = torch.randint(0, SIZE - 6, (n, 2), generator=g).tolist()
    for i, (c, (y, x)) in enumerate(zip(labels.tolist(), corners)):
        images[i, :, y:y + 6, x:x + 6] = COLOURS[c].view(3, 1, 1)
    return images, labels


def test_cas_high_on_separable_data_and_chance_on_shuffled_labels():
    from handforge.plugins.metrics.cas import classification_accuracy_score
    from handforge.plugins.metrics.sources import Batch

    names = ["red", "green", "blue", "yellow"]
    train, test = Batch(*squares(256, seed=1)), Batch(*squares(200, seed=2))
    options = dict(size=SIZE, epochs=6, width=8, seed=0)
    good = classification_accuracy_score(train, test, names, **options)
    shuffled = Batch(train.images, train.labels[torch.randperm(256, generator=torch.Generator().manual_seed(3))])
    bad = classification_accuracy_score(shuffled, test, names, **options)
    assert good["cas_top1"] > 0.95 and good["cas_class_mean"] > 0.95, good
    assert bad["cas_top1"] < 0.45 and bad["cas_class_mean"] < 0.45, bad  # chance is 0.25


def test_judge_save_load_round_trip(tmp_path):
    from handforge.plugins.metrics.judge_classifier import JudgeClassifier, load_classifier, read_metadata

    judge = tiny_judge(tmp_path / "judge.safetensors")
    loaded = JudgeClassifier.load(tmp_path / "judge.safetensors")
    images = hands(20, split="val")[0]
    assert loaded.class_names == judge.class_names and loaded.image_size == SIZE
    assert (loaded.width, loaded.depth, loaded.feature_dim) == (4, 2, 16)
    assert torch.equal(loaded.logits(images), judge.logits(images))
    assert torch.equal(loaded.features(images), judge.features(images))
    assert loaded.logits(images).shape == (20, 18)
    assert read_metadata(tmp_path / "judge.safetensors")["handforge_format"] == "judge_classifier/1"
    assert load_classifier(tmp_path / "judge.safetensors") is load_classifier(tmp_path / "judge.safetensors")

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"handforge_format": "mystery/1"})
    with pytest.raises(HandforgeError, match="other.safetensors: not a classifier checkpoint handforge knows"):
        load_classifier(tmp_path / "other.safetensors")
    with pytest.raises(HandforgeError, match="missing.safetensors not found.*handforge fit-judge"):
        load_classifier(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(HandforgeError, match="junk.safetensors: not a safetensors file"):
        load_classifier(tmp_path / "junk.safetensors")


def test_registered_classifier_format_is_loadable(tmp_path):
    """The seam for the classifier task: its own checkpoint format serves `is` and `hand_features`."""
    from handforge.plugins.metrics import judge_classifier as jc
    from handforge.plugins.metrics.extractors import ExtractorOptions, build_extractor

    class Linear:
        class_names = ["a", "b"]

        def __init__(self, path, metadata, device):
            self.scale = float(metadata["scale"])

        def features(self, images):
            return images.float().mean((2, 3)) * self.scale

        def logits(self, images):
            return self.features(images)[:, :2]

    save_file({"w": torch.zeros(1)}, str(tmp_path / "task.safetensors"),
              metadata={"handforge_format": "test_task_classifier/3", "scale": "2"})
    jc.register_classifier_format("test_task_classifier", Linear)
    try:
        extractor = build_extractor("hand_features", ExtractorOptions(classifier=str(tmp_path / "task.safetensors")))
        images = torch.full((2, 3, 4, 4), 10, dtype=torch.uint8)
        assert torch.equal(extractor.features(images), torch.full((2, 3), 20.0))
        assert extractor.logits(images).shape == (2, 2)
    finally:
        jc.CLASSIFIER_FORMATS.pop("test_task_classifier")


# -- extractors -------------------------------------------------------------------------------------


def test_extractor_registry_errors():
    from handforge.plugins.metrics.extractors import ExtractorOptions, build_extractor, register_extractor

    with pytest.raises(HandforgeError, match="unknown feature extractor 'hand_feature'.*did you mean 'hand_features'"):
        build_extractor("hand_feature")
    with pytest.raises(HandforgeError, match="'hand_features' needs a judge classifier checkpoint"):
        build_extractor("hand_features", ExtractorOptions())
    with pytest.raises(HandforgeError, match="'inception_fid' is registered twice"):
        register_extractor("inception_fid", lambda options: None)


def test_metric_options_are_checked_by_the_recipe_loader():
    from handforge.errors import RecipeError
    from handforge.recipe import resolve_component

    host = metrics_host()
    with pytest.raises(RecipeError, match="m.extractor: unknown feature extractor 'inception'"):
        resolve_component({"name": "fid", "extractor": "inception"}, "metric", "m", host=host)
    with pytest.raises(RecipeError, match="no classification layer"):
        resolve_component({"name": "is", "extractor": "inception_fid"}, "metric", "m", host=host)
    with pytest.raises(RecipeError, match="m.classifier: required"):
        resolve_component({"name": "is"}, "metric", "m", host=host)
    with pytest.raises(RecipeError, match="m.k: must be >= 1"):
        resolve_component({"name": "prdc", "k": 0}, "metric", "m", host=host)
    assert host.registry("metric").get("cas").fields_needed(None) == {"image", "label"}
    # Files are looked for when the metric is built, before a run trains.
    missing = resolve_component({"name": "fid", "extractor": "hand_features", "classifier": "gone.safetensors"},
                                "metric", "m", host=host)
    with pytest.raises(HandforgeError, match="gone.safetensors not found"):
        missing.build()


# -- sources ---------------------------------------------------------------------------------------------


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_folder_source_labels_from_class_folders_and_errors(tmp_path):
    from handforge.plugins.metrics.sources import open_source

    rng = np.random.default_rng(0)
    pixels = {}
    for cls in ("b_palm", "a_fist"):
        for i in range(3):
            pixels[f"{cls}/{i}.png"] = rng.integers(0, 256, (8, 8, 3))
            write_png(tmp_path / "set" / cls / f"{i}.png", pixels[f"{cls}/{i}.png"])
    (tmp_path / "set" / "notes.txt").write_text("not an image")
    write_png(tmp_path / "set" / ".hidden" / "x.png", np.zeros((4, 4, 3)))
    source = open_source(tmp_path / "set")
    assert source.class_names == ["a_fist", "b_palm"] and len(source) == 6
    batch = source.read_all(batch_size=4)
    order = [f"{cls}/{i}.png" for cls in ("a_fist", "b_palm") for i in range(3)]
    assert torch.equal(batch.images, torch.from_numpy(np.stack([pixels[k] for k in order])).permute(0, 3, 1, 2))
    assert batch.labels.tolist() == [0, 0, 0, 1, 1, 1]

    subset = open_source(tmp_path / "set", num=4, seed=1)
    assert len(subset) == 4 and subset.files == open_source(tmp_path / "set", num=4, seed=1).files
    assert subset.files != open_source(tmp_path / "set", num=4, seed=2).files

    (tmp_path / "set" / "a_fist" / "9.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(HandforgeError, match=r"a_fist/9.png: cannot read the image.*--skip-bad"):
        open_source(tmp_path / "set").read_all()
    skipping = open_source(tmp_path / "set", skip_bad=True)
    assert len(skipping.read_all().images) == 6 and skipping.skipped == 1

    write_png(tmp_path / "mixed" / "1.png", np.zeros((8, 8, 3)))
    write_png(tmp_path / "mixed" / "2.png", np.zeros((8, 6, 3)))
    with pytest.raises(HandforgeError, match=r"2.png: 6x8 pixels, but .*1.png is 8x8"):
        open_source(tmp_path / "mixed").read_all()
    with pytest.raises(HandforgeError, match="--real .*nowhere: no such folder"):
        open_source(tmp_path / "nowhere", option="--real")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HandforgeError, match="empty: no image files"):
        open_source(tmp_path / "empty")
    unlabelled = open_source(tmp_path / "mixed")
    assert unlabelled.class_names is None and not unlabelled.has_labels


def test_dataset_source_and_prepared_folder_read_the_same_images(tmp_path):
    from handforge.prepare import prepare
    from handforge.plugins.metrics.sources import open_source, split_options

    assert split_options('size=16,classes="a,b",hand_size=[0.5, 0.8]') == \
        ['size=16', 'classes="a,b"', 'hand_size=[0.5, 0.8]']
    host = metrics_host()
    text = 'dataset:procedural_hands:size=16,classes="fingerspelling",hand_size=[0.5,0.8],split=val'
    source = open_source(text, num=10, host=host)
    batch = source.read_all(batch_size=4)
    images, labels, names = hands(10, split="val", classes="fingerspelling", hand_size=[0.5, 0.8])
    assert torch.equal(batch.images, images) and torch.equal(batch.labels, labels)
    assert source.class_names == names and batch.keypoints.shape == (10, 21, 3)
    assert source.cache_key["split"] == "val" and source.cache_key["image_size"] == [16, 16]

    prepare("procedural_hands", 10, tmp_path / "prepared", size=16, split="val", host=host,
            options=['classes="fingerspelling"', "hand_size=[0.5,0.8]"])
    folder = open_source(tmp_path / "prepared")  # labels.json and dataset.json, not the file tree
    read = folder.read_all()
    assert torch.equal(read.images, images) and torch.equal(read.labels, labels) and folder.class_names == names
    assert torch.allclose(read.keypoints, batch.keypoints, atol=1e-6)

    with pytest.raises(HandforgeError, match="unknown dataset 'procedural_hand'"):
        open_source("dataset:procedural_hand", num=4, host=host)
    with pytest.raises(HandforgeError, match="procedural_hands.sizes: unknown key"):
        open_source("dataset:procedural_hands:sizes=16", num=4, host=host)
    with pytest.raises(HandforgeError, match="split must be 'train' or 'val'"):
        open_source("dataset:procedural_hands:split=test", num=4, host=host)


# -- runs: in-loop evaluation, the run-directory source ---------------------------------------------


def tiny_gan_raw(root, judge, steps=4, num=48, **eval_options):
    return {
        "name": "tiny", "seed": 0, "output_dir": str(root / "runs"),
        "task": {"name": "gan"}, "data": {"name": "procedural_hands", "size": SIZE},
        "model": {"generator": {"name": "deep_conv", "ch": 4, "z_dim": 8}, "discriminator": {"name": "deep_conv", "ch": 4},
                  "g_conditioner": {"name": "cbn"}, "d_conditioner": {"name": "projection"}},
        "train": {"steps": steps, "batch_size": 8, "log_every": 2, "progress": False, "tensorboard": False},
        "eval": {"every": 2, "best_metric": "fhd", **eval_options, "metrics": [
            {"name": "fid", "extractor": "hand_features", "classifier": str(judge), "num_samples": num,
             "batch_size": 32},
            {"name": "prdc", "extractor": "hand_features", "classifier": str(judge), "num_samples": num,
             "batch_size": 32, "k": 3},
            {"name": "is", "classifier": str(judge), "num_samples": num, "batch_size": 32},
            {"name": "cas", "num_samples": num, "batch_size": 32, "size": SIZE, "epochs": 1, "width": 4},
        ]},
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step label-conditioned GAN run at 16 px with fid (FHD), prdc, is and cas evaluated every 2 steps."""
    import os

    from handforge.loop import Trainer
    from handforge.recipe import resolve

    root = tmp_path_factory.mktemp("run")
    before = os.environ.get("HANDFORGE_CACHE")
    os.environ["HANDFORGE_CACHE"] = str(root / "cache")
    torch.set_num_threads(1)
    try:
        judge = tiny_judge(root / "judge.safetensors")
        host = metrics_host()
        run = Trainer(resolve(tiny_gan_raw(root, root / "judge.safetensors"), host=host), host).run()
    finally:
        if before is None:
            os.environ.pop("HANDFORGE_CACHE")
        else:
            os.environ["HANDFORGE_CACHE"] = before
    return {"root": root, "run": run, "judge": judge, "host": host}


def eval_records(run_dir):
    lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "eval"]


def test_in_loop_evaluation_logs_metrics_and_keeps_the_best_checkpoint(finished_run):
    run, judge, root = finished_run["run"], finished_run["judge"], finished_run["root"]
    records = eval_records(run.run_dir)
    assert [r["step"] for r in records] == [2, 4]
    keys = {"fhd", "precision", "recall", "density", "coverage", "is", "is_std", "cas_top1", "cas_class_mean"}
    assert all(keys <= set(r) for r in records)
    assert all(0 <= r["cas_top1"] <= 1 and 1 <= r["is"] <= 18 for r in records)
    best = json.loads((run.run_dir / "checkpoints" / "best" / "train_state.json").read_text())
    assert best["best"] == min(r["fhd"] for r in records)

    # The last evaluation, recomputed independently from the final weights.
    real_images, _, _ = hands(48)
    real = judge.features(real_images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the metrics' seed 0, process 0
        from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig

        conditions = ProceduralHands(ProceduralHandsConfig(size=SIZE)).__getitems__(list(range(32)))
        first = run.task.generate(conditions)
        conditions = ProceduralHands(ProceduralHandsConfig(size=SIZE)).__getitems__(list(range(32, 48)))
        fakes = torch.cat([first, run.task.generate(conditions)])
    fake = judge.features(torch.from_numpy(to_uint8(fakes)).permute(0, 3, 1, 2))
    assert records[-1]["fhd"] == pytest.approx(scipy_frechet(real, fake), rel=1e-6, abs=1e-9)
    p = np.exp(torch.log_softmax(judge.logits(torch.from_numpy(to_uint8(fakes)).permute(0, 3, 1, 2)).double(), 1).numpy())
    expected_is = np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean())
    assert records[-1]["is"] == pytest.approx(expected_is, rel=1e-9)

    # The real statistics were cached once, with their key, and hold the real features' moments.
    files = sorted((root / "cache" / "reference").glob("*-stats-*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as data:
        key = json.loads(str(data["key"]))
        assert np.allclose(data["mean"], real.double().numpy().mean(0), atol=1e-10)
        assert np.allclose(data["cov"], np.cov(real.double().numpy(), rowvar=False), atol=1e-10)
    assert key["dataset"] == "procedural_hands" and key["num"] == 48 and key["image_size"] == [SIZE, SIZE]
    assert key["extractor"]["extractor"] == "hand_features"


def test_run_directory_source_generates_with_the_exported_weights(finished_run):
    from handforge.plugins.metrics.sources import open_source

    run = finished_run["run"]
    source = open_source(run.run_dir, num=12, seed=5, host=finished_run["host"])
    assert isinstance(source.run.task, type(run.task)) and source.class_names == run.class_names
    batch = source.read_all(batch_size=8)
    from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig

    val = ProceduralHands(ProceduralHandsConfig(size=SIZE), "val")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        fakes = torch.cat([run.task.generate(val.__getitems__(list(range(0, 8)))),
                           run.task.generate(val.__getitems__(list(range(8, 12))))])
    assert torch.equal(batch.images, torch.from_numpy(to_uint8(fakes)).permute(0, 3, 1, 2))
    assert torch.equal(batch.labels, val.__getitems__(list(range(12)))["label"])


def test_run_directory_without_weights_is_refused(finished_run, tmp_path):
    import shutil

    from handforge.plugins.metrics.sources import open_source

    broken = tmp_path / "broken"
    shutil.copytree(finished_run["run"].run_dir, broken, ignore=shutil.ignore_patterns("checkpoints"))
    for file in (broken / "weights").iterdir():
        file.unlink()
    with pytest.raises(HandforgeError, match="none of the task's weight files.*generator_ema.safetensors"):
        open_source(broken, num=4, host=finished_run["host"])


def test_cached_reference_with_another_key_is_refused(finished_run, monkeypatch):
    from handforge.plugins.metrics.frechet import FeatureStats
    from handforge.plugins.metrics.reference import load_stats, reference_path

    monkeypatch.setenv("HANDFORGE_CACHE", str(finished_run["root"] / "cache"))
    file = sorted((finished_run["root"] / "cache" / "reference").glob("*-stats-*.npz"))[0]
    stats = FeatureStats.load(file)
    key = stats.key
    assert reference_path("stats", key) == file and load_stats(key).count == 48
    other = {**key, "num": 47}
    stats.save(reference_path("stats", other), key)  # a file whose content does not match its name
    with pytest.raises(HandforgeError, match=r"-stats-.*\.npz: the cached feature statistics were made for "
                                             r"another setup \(num: stored 48, expected 47\)"):
        load_stats(other)


def test_two_processes_gather_to_the_same_numbers(tmp_path):
    # Fresh processes from `accelerate launch`: debug_launcher forks, and a fork of a process whose
    # OpenMP pool has run (any earlier test) can hang in the child's first parallel region.

    from conftest import REPO, launch_two_processes

    judge = tiny_judge(tmp_path / "judge.safetensors")
    result = launch_two_processes(REPO / "tests" / "two_process_metrics.py", tmp_path, tmp_path / "judge.safetensors")
    # The rank that failed first is the cause; the other only reports its peer going away.
    failing = [line for line in result.stderr.splitlines() if line.startswith("[rank1]")]
    assert result.returncode == 0, "\n".join(failing[-40:]) + "\n" + result.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and set(ranks[0]["metrics"]) == {"2"}
    assert {"fhd", "precision", "recall", "density", "coverage", "is", "cas_top1"} <= set(ranks[0]["metrics"]["2"])
    # The gathered real features are samples 0 .. 44 in order, as one process would read them.
    expected = judge.features(hands(45)[0])
    for rank in ranks:
        assert torch.allclose(torch.tensor(rank["real"]), expected, atol=1e-5)
    records = eval_records(tmp_path / "runs" / "tiny")
    assert [r["step"] for r in records] == [2]  # one writer
    assert records[0]["fhd"] == pytest.approx(ranks[0]["metrics"]["2"]["fhd"])
