"""Every recipe in recipes/ validates as shipped, and runs (shortened) on the built-in dataset."""
import json
import math

import pytest
from safetensors.torch import load_file

from conftest import REPO, run_cli
from handforge.recipe import load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.toml"))


# Recipes for data the user brings; each runs end to end on a fixture tree in the test named here.
USER_DATA = {"keypoints_freihand": "tests/test_freihand.py::test_the_shipped_freihand_recipe_trains_on_a_prepared_tree",
             "hand_prior": "tests/test_pose_prior.py::test_the_shipped_hand_prior_recipe_trains_on_a_prepared_mocap_tree",
             **{f"pose_transfer_{layout}": "tests/test_pose_transfer.py::test_the_tar_recipes_validate_and_run_two_steps_on_fixtures"
                for layout in ("synthsl", "bosphorus")}}

# Datasets that need no files: a recipe on them runs as shipped.
BUILT_IN_DATA = ("procedural_hands", "handshape_poses")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates(path, host):
    recipe = load_recipe(path, host=host)
    assert recipe.name == path.stem
    assert recipe.data.name in BUILT_IN_DATA or path.stem in USER_DATA, recipe.data.name


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_header_says_how_to_run_it(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(line.startswith("# Run:") and f"recipes/{path.name}" in line for line in header), header[:3]


def test_unconditional_recipe_runs(tmp_path):
    # quickstart.toml itself runs in test_loop.py (resume) and test_multiprocess.py
    result = run_cli("run", REPO / "recipes" / "gan_unconditional.toml", f"output_dir={tmp_path}",
                     "train.steps=2", "train.batch_size=8", "train.progress=false")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "gan_unconditional" / "samples" / "step_00000002.png").is_file()


# Shrunk to 32 px and width 4 (their shipped sizes take seconds per step on a CPU); every other
# setting (conditioners, augmentation, loss, d_steps, optimiser) runs as shipped.
SMALL = ["data.size=32", "model.generator.ch=4", "model.discriminator.ch=4"]
GAN_RECIPES = {
    "handshape_spade_biggan": SMALL + ["model.g_conditioner.hidden=8"],
    "handshape_reacgan": SMALL,
    "palm_wgangp": SMALL,
    "handshape_stylegan2_ada": SMALL + ["model.generator.ch_max=16", "model.discriminator.ch_max=16"],
    "handshape_stylegan3": SMALL + ["model.generator.ch_max=16", "model.discriminator.ch_max=16",
                                    "model.generator.num_layers=4"],
}


@pytest.mark.slow
def test_gan_recipes_run_shortened(tmp_path):
    for name, overrides in GAN_RECIPES.items():
        result = run_cli("run", REPO / "recipes" / f"{name}.toml", f"output_dir={tmp_path}", "train.steps=2",
                         "train.batch_size=4", "train.progress=false", *overrides)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        run_dir = tmp_path / name
        assert (run_dir / "samples" / "step_00000002.png").is_file(), name
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["step"] == 2 and all(math.isfinite(last[k]) for k in ("d_loss", "g_loss")), (name, last)


# The diffusion recipes, shrunk: 32 px, U-Net width 8, 4 sampling steps; everything else as shipped.
DIFFUSION_SMALL = ["data.size=32", "model.denoiser.dim=8", "task.sampling_steps=4", "task.sample_count=4"]


# The quickstart's documented SPADE variant (docs/diffusion.md): the pose through SPADE modulation.
SPADE_QUICKSTART = ["model.conditioner.name=spade", "model.conditioner.hidden=8"]


@pytest.mark.parametrize("name,extra", [("diffusion_quickstart", []), ("diffusion_quickstart", SPADE_QUICKSTART),
                                        ("handshape_diffusion_pose", []), ("palm_ddpm", [])],
                         ids=["diffusion_quickstart", "diffusion_quickstart_spade", "handshape_diffusion_pose",
                              "palm_ddpm"])
def test_diffusion_recipes_run_shortened(tmp_path, name, extra):
    result = run_cli("run", REPO / "recipes" / f"{name}.toml", f"output_dir={tmp_path}", "train.steps=2",
                     "train.batch_size=4", "train.sample_every=2", "train.progress=false", *DIFFUSION_SMALL,
                     *extra)
    assert result.returncode == 0, f"{name}: {result.stderr}"
    assert (tmp_path / name / "samples" / "step_00000002.png").is_file()
    last = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and math.isfinite(last["loss"]), last
    # The exported denoiser has SPADE's modulation layers exactly when the conditioner is spade.
    weights = load_file(tmp_path / name / "weights" / "denoiser.safetensors")
    assert any(".modulation." in k for k in weights) == (extra == SPADE_QUICKSTART)
