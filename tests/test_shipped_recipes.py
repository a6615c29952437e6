"""Every recipe in recipes/ validates as shipped, and runs (shortened) on the built-in dataset."""
import pytest

from conftest import REPO, run_cli
from handforge.recipe import load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates(path, host):
    recipe = load_recipe(path, host=host)
    assert recipe.name == path.stem and recipe.data.name == "procedural_hands"


def test_unconditional_recipe_runs(tmp_path):
    # quickstart.toml itself runs in test_loop.py (resume) and test_multiprocess.py
    result = run_cli("run", REPO / "recipes" / "gan_unconditional.toml", f"output_dir={tmp_path}",
                     "train.steps=2", "train.batch_size=8", "train.progress=false")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "gan_unconditional" / "samples" / "step_00000002.png").is_file()
