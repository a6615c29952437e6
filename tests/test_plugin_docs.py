"""docs/plugins.md cannot rot: its Python blocks, put one after another, are loaded as a local
plugin file, its two TOML recipes train with it for 2 steps, and each example is used the way the
page says. The page must also name every member of every contract in handforge.contracts."""
import json
import re
import tomllib

import pytest
import torch

from conftest import REPO
from handforge import contracts
from handforge.data import check_sample, first_samples
from handforge.loop import Trainer
from handforge.plugin_manager import PluginHost
from handforge.recipe import resolve

DOC = REPO / "docs" / "plugins.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def doc_plugin(tmp_path):
    """(host, the plugin module): the page's code as my_plugin.py, loaded as a recipe loads it."""
    file = tmp_path / "my_plugin.py"
    file.write_text("\n\n".join(blocks("python")), encoding="utf-8")
    host = PluginHost()
    host.load_builtins()
    info = host.load_file(file)
    return host, host.pm.get_plugin(info.name)


def doc_recipe(name: str, tmp_path) -> dict:
    raw = next(r for r in map(tomllib.loads, blocks("toml")) if r["name"] == name)
    raw["plugins"] = [str(tmp_path / "my_plugin.py")]
    raw["output_dir"] = str(tmp_path / "runs")
    raw["train"].update(steps=2, batch_size=8, progress=False, tensorboard=False)
    return raw


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_the_page_has_one_example_of_every_kind(doc_plugin):
    host, module = doc_plugin
    registered = {kind: [e.name for e in host.registry(kind) if e.plugin.endswith("my_plugin.py")]
                  for kind in contracts.CONTRACTS}
    assert registered == {"dataset": ["squares"], "backbone": ["mlp"], "conditioner": ["onehot"],
                          "augmentation": ["random_flip"], "loss": ["least_squares"],
                          "metric": ["pixel_mean_gap"], "task": ["tiny_classifier"]}
    for kind, protocol in [("dataset", contracts.LabelledDataset), ("conditioner", contracts.GeneratorSide),
                           ("augmentation", contracts.ImageAugmentation), ("loss", contracts.AdversarialLoss)]:
        assert any(isinstance(v, type) and contracts.missing_on_class(v, [protocol]) == []
                   for v in vars(module).values()), kind


def test_the_gan_recipe_trains_with_every_example_component(doc_plugin, tmp_path, one_thread):
    host, _ = doc_plugin
    recipe = resolve(doc_recipe("squares_gan", tmp_path), host=host)
    run = Trainer(recipe, host).run()
    train, evals = records(recipe.run_dir, "train"), records(recipe.run_dir, "eval")
    assert [r["step"] for r in train] == [2] and all(torch.isfinite(torch.tensor(r["d_loss"])) for r in train)
    assert [r["step"] for r in evals] == [2]
    # The metric's number, recomputed here from its definition with the same noise.
    batch = first_samples(run.dataset, 64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fake = run.task.generate(batch)
    expected = (batch["image"].mean((0, 2, 3)) - fake.mean((0, 2, 3))).abs().mean().item()
    assert evals[0]["pixel_mean_gap"] == pytest.approx(expected, rel=1e-6)
    assert type(run.task.loss).__name__ == "LeastSquares" and type(run.task.augment).__name__ == "RandomFlip"


def test_the_conditioner_also_drives_a_builtin_backbone(doc_plugin, tmp_path, one_thread):
    """`onehot` has both sides' members, so deep_conv (which calls norm) takes it as well."""
    host, _ = doc_plugin
    raw = doc_recipe("squares_gan", tmp_path)
    raw["model"]["generator"] = {"name": "deep_conv", "ch": 8}
    raw["eval"] = {}
    recipe = resolve(raw, host=host)
    Trainer(recipe, host).run()
    assert [r["step"] for r in records(recipe.run_dir, "train")] == [2]


def test_the_task_recipe_trains_a_builtin_backbone(doc_plugin, tmp_path, one_thread):
    host, _ = doc_plugin
    recipe = resolve(doc_recipe("squares_classifier", tmp_path), host=host)
    run = Trainer(recipe, host).run()
    assert [r["step"] for r in records(recipe.run_dir, "train")] == [2]
    assert (recipe.run_dir / "weights" / "classifier.safetensors").is_file()
    head = [m for m in run.task.export_modules()["classifier"].modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.out_features == 3  # red, green, blue


def test_the_dataset_follows_the_sample_contract(doc_plugin):
    host, _ = doc_plugin
    entry = host.registry("dataset").get("squares")
    train, val = (entry.factory(entry.config_cls(size=8, length=6), split=s) for s in ("train", "val"))
    for i in range(len(train)):
        check_sample(train[i], where=f"squares {i}")
        image, label = train[i]["image"], int(train[i]["label"])
        # The square is the only place where the labelled channel is 1.
        assert train.class_names[label] == ["red", "green", "blue"][i % 3]
        assert (image[label] == 1).sum() == 16 and (image[(label + 1) % 3] == 1).sum() == 0
    assert not torch.equal(train[0]["image"], val[0]["image"])
    assert torch.equal(train[-1]["image"], train[5]["image"])
    with pytest.raises(IndexError, match="squares: index 6"):
        train[6]


def test_the_loss_is_the_least_squares_formula(doc_plugin):
    host, _ = doc_plugin
    loss = host.registry("loss").get("least_squares").factory(None)
    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([0.0, 1.0, 3.0])
    # Mao et al. 2017, a=0, b=c=1: 1/2 E[(D(x)-1)^2] + 1/2 E[D(G(z))^2], and 1/2 E[(D(G(z))-1)^2].
    d = 0.5 * ((0.25 + 1.0 + 4.0) / 3) + 0.5 * ((0.0 + 1.0 + 9.0) / 3)
    g = 0.5 * ((1.0 + 0.0 + 4.0) / 3)
    assert loss.d_loss(real, fake).item() == pytest.approx(d)
    assert loss.g_loss(fake).item() == pytest.approx(g)


def test_the_flip_moves_the_maps_with_the_images(doc_plugin):
    host, _ = doc_plugin
    entry = host.registry("augmentation").get("random_flip")
    flip_all = entry.factory(entry.config_cls(p=1.0), image_size=4)
    images, maps = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    out_images, out_maps = flip_all(images, maps)
    assert torch.equal(out_images, images.flip(-1)) and torch.equal(out_maps, maps.flip(-1))
    assert torch.equal(entry.factory(entry.config_cls(p=0.0), image_size=4)(images), images)


def test_the_page_names_every_member_of_every_contract():
    text = DOC.read_text(encoding="utf-8")
    for contract in contracts.CONTRACTS.values():
        protocols = [contract.protocol, *contract.signatures.values(), *contract.roles.values(),
                     *contract.when_provides.values()]
        for protocol in protocols:
            assert f"`{protocol.__name__}`" in text, protocol
            methods, attributes = contracts.members(protocol)
            for name in methods + attributes:
                assert name in text, f"docs/plugins.md does not mention {protocol.__name__}.{name}"
