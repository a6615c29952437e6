"""The example third-party package, installed for real and found through its entry point."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, run_cli
from handforge.toml_writer import dumps

EXAMPLE = REPO / "examples" / "handforge-example-plugin"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True, capture_output=True, text=True)
    return target


def env_with(site):
    return {"PYTHONPATH": str(site), "HANDFORGE_DISABLE_PLUGIN_AUTOLOAD": "0"}


def test_plugins_lists_it_with_its_version(site):
    result = run_cli("plugins", "--json", env=env_with(site))
    assert result.returncode == 0, result.stderr
    example = [p for p in json.loads(result.stdout) if p["name"] == "example"]
    assert example == [{"name": "example", "source": "entrypoint", "dist": "handforge-example-plugin",
                        "version": "0.2.0", "hooks": ["register_augmentations", "register_metrics"],
                        "error": None}]


def test_recipe_uses_its_augmentation_and_metric(site, tmp_path):
    recipe = {
        "name": "ex", "output_dir": str(tmp_path / "runs"),
        "task": {"name": "gan"},
        "data": {"name": "procedural_hands", "size": 32, "length": 256},
        "model": {"generator": {"name": "deep_conv", "ch": 8, "z_dim": 16},
                  "discriminator": {"name": "deep_conv", "ch": 8},
                  "augment": {"name": "random_grayscale", "p": 0.5}},
        "train": {"steps": 4, "batch_size": 8, "log_every": 2, "progress": False},
        "eval": {"every": 2, "best_metric": "color_moments", "metrics": [{"name": "color_moments", "num_samples": 16}]},
    }
    path = tmp_path / "ex.toml"
    path.write_text(dumps(recipe))
    result = run_cli("run", path, env=env_with(site))
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "ex"
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(0 < e["color_moments"] < 10 for e in evals)
    assert (run_dir / "checkpoints" / "best" / "train_state.json").is_file()
    lock = (run_dir / "plugins.lock").read_text().splitlines()
    assert "handforge-example-plugin==0.2.0" in lock
    # without the package the same recipe is rejected before training, naming the component
    result = run_cli("validate", path)
    assert result.returncode == 2 and "model.augment.name: unknown augmentation 'random_grayscale'" in result.stderr
