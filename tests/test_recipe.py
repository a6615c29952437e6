"""Recipe validation: every problem at once, each with its TOML path; overrides; round trip."""
import pathlib
import tomllib

import pytest

from handforge.errors import RecipeError
from handforge.plugin_manager import PluginHost
from handforge.recipe import apply_overrides, load_recipe, parse_override, resolve
from handforge.toml_writer import dumps

TOY = pathlib.Path(__file__).with_name("toy_plugin.py")


@pytest.fixture
def toy_host():
    host = PluginHost()
    host.load_file(TOY)
    return host


def good(**changes):
    raw = {
        "name": "t", "seed": 3,
        "task": {"name": "toy_task"},
        "data": {"name": "toy_images", "size": 8},
        "model": {"generator": {"name": "toy_linear", "ch": 4}},
        "train": {"steps": 5},
    }
    raw.update(changes)
    return raw


def problems(raw, host):
    with pytest.raises(RecipeError) as err:
        resolve(raw, host=host)
    return err.value.problems


def test_valid_recipe_fills_defaults(toy_host):
    recipe = resolve(good(), host=toy_host)
    assert recipe.model["generator"].config.ch == 4
    assert recipe.model["loss"].name == "toy_l1"  # slot default
    assert "conditioner" not in recipe.model  # optional slot left out
    assert recipe.train.steps == 5 and recipe.train.batch_size == 64
    assert recipe.run_dir == pathlib.Path("runs/t")


def test_all_problems_reported_at_once_with_paths(toy_host):
    raw = good(
        data={"name": "toy_imagez"},
        model={"generator": {"name": "toy_linear", "ch": "64", "betas": [0.0, "x"]}, "genrator": {}},
        train={"stepz": 10, "batch_size": 0, "mixed_precision": "fp8"},
        sed=1,
    )
    found = problems(raw, toy_host)
    expected = [
        "sed: unknown key (did you mean 'seed'?)",
        'model.generator.ch: expected int, got str "64"',
        'model.generator.betas[1]: expected float, got str "x"',
        "model.genrator: task 'toy_task' has no slot 'genrator' (did you mean 'generator'?); "
        "its slots: generator, loss, conditioner",
        "train.stepz: unknown key (did you mean 'steps'?)",
        "train.batch_size: must be >= 1, got 0",
        "data.name: unknown dataset 'toy_imagez' (did you mean 'toy_images'?); available: toy_images, toy_keypoints",
    ]
    for line in expected:
        assert line in found, (line, found)
    assert any(p.startswith("train.mixed_precision: expected one of 'no', 'fp16', 'bf16'") for p in found)
    assert len(found) == len(expected) + 1


def test_missing_tables_and_slots(toy_host):
    found = problems({"model": {}}, toy_host)
    assert "task: required table missing (which task? see `handforge list task`)" in found
    assert "data: required table missing (which dataset? see `handforge list dataset`)" in found
    found = problems(good(model={}), toy_host)
    assert found == ["model.generator: required backbone slot of task 'toy_task' is missing"]
    found = problems(good(task={"lr": 1.0}), toy_host)
    assert found == ["task.name: required key missing (which task? see `handforge list task`)"]


def test_component_without_options_rejects_keys(toy_host):
    raw = good(model={"generator": {"name": "toy_linear"}, "loss": {"name": "toy_l2", "reduction": "sum"}})
    assert problems(raw, toy_host) == ["model.loss.reduction: unknown key (loss 'toy_l2' takes no options)"]


def test_field_compatibility_checked_before_any_tensor(toy_host):
    raw = good(model={"generator": {"name": "toy_linear"}, "conditioner": {"name": "toy_label"}})
    assert problems(raw, toy_host) == [
        "model.conditioner: conditioner 'toy_label' needs field 'label'; dataset 'toy_images' provides: image"]
    raw["data"]["labels"] = True  # the dataset's fields depend on its options
    assert resolve(raw, host=toy_host).model["conditioner"].name == "toy_label"


def test_malformed_toml_reports_file_line_and_column(tmp_path, toy_host):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[train]\nsteps = = 3\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(path, host=toy_host)
    message = str(err.value)
    assert str(path) in message and "line 3" in message and "column" in message


def test_missing_file(tmp_path, toy_host):
    with pytest.raises(RecipeError, match="nope.toml: file not found"):
        load_recipe(tmp_path / "nope.toml", host=toy_host)


@pytest.mark.parametrize("text, keys, value", [
    ("train.steps=200", ["train", "steps"], 200),
    ("train.lr=3e-4", ["train", "lr"], 3e-4),
    ("resume=true", ["resume"], True),
    ("model.generator.betas=[0.0, 0.99]", ["model", "generator", "betas"], [0.0, 0.99]),
    ('data.name="toy_images"', ["data", "name"], "toy_images"),
    ("data.name=toy_images", ["data", "name"], "toy_images"),  # a bare word is a string
    ("model.generator.ch=\"64\"", ["model", "generator", "ch"], "64"),
])
def test_override_values_are_toml(text, keys, value):
    assert parse_override(text) == (keys, value)


def test_overrides_are_validated_like_the_file(tmp_path, toy_host):
    path = tmp_path / "r.toml"
    path.write_text(dumps(good()))
    recipe = load_recipe(path, ["train.steps=7", "model.generator.ch=2"], host=toy_host)
    assert recipe.train.steps == 7 and recipe.model["generator"].config.ch == 2
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ['model.generator.ch="64"', "train.stepz=1", "oops"], host=toy_host)
    assert err.value.problems == ["override 'oops': expected key.path=value"]
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ['model.generator.ch="64"', "train.stepz=1"], host=toy_host)
    assert set(err.value.problems) == {'model.generator.ch: expected int, got str "64"',
                                       "train.stepz: unknown key (did you mean 'steps'?)"}
    with pytest.raises(RecipeError, match="train.steps is not a table"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])


def test_resolved_recipe_round_trips(tmp_path, toy_host):
    recipe = resolve(good(), host=toy_host)
    text = dumps(recipe.to_dict())
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    again = load_recipe(path, host=toy_host)
    assert again.to_dict() == recipe.to_dict() == tomllib.loads(text)
    assert again.digest() == recipe.digest()
    assert resolve(good(seed=4), host=toy_host).digest() != recipe.digest()


def test_local_plugin_named_in_recipe(tmp_path):
    host = PluginHost()
    path = tmp_path / "r.toml"
    raw = good(plugins=[str(TOY)])
    path.write_text(dumps(raw))
    recipe = load_recipe(path, host=host)
    assert recipe.plugins == [str(TOY.resolve())]
    raw["plugins"] = ["./not_there.py"]
    path.write_text(dumps(raw))
    with pytest.raises(RecipeError, match=r"plugins\[0\]: plugin file ./not_there.py not found"):
        load_recipe(path, host=PluginHost())
