"""bench/keypoints.py: its training step is the keypoints task's (same weights after one step), and
its accuracy runs are the shipped recipe with only the budget, network and bookkeeping changed."""
import copy
import json
import sys

import accelerate
import pytest
import torch

from conftest import REPO
from handforge.recipe import load_recipe, read_toml, resolve
from handforge.task import RunContext

sys.path.insert(0, str(REPO / "bench"))
import keypoints as bench  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPE = REPO / "recipes" / "keypoints_mobilelite.toml"


def test_training_step_leaves_the_weights_the_task_leaves(tmp_path):
    # The task at step 1 with no warm-up runs at the full lr (cosine at 0), without augmentation:
    # then one bench step from the same weights on the same batch must give the same weights.
    recipe = load_recipe(RECIPE, overrides=["data.size=32", 'model.regressor.name="simple_cnn"',
                                            "model.regressor.width=8", "task.val_samples=4",
                                            "task.overlay_count=0", "task.warmup_steps=0", "train.steps=10"])
    accelerate.state.AcceleratorState._reset_state(True)
    torch.manual_seed(0)
    components = {k: c for k, c in recipe.model.items() if k != "augment"}
    run = RunContext(recipe=recipe, accelerator=accelerate.Accelerator(cpu=True), run_dir=tmp_path,
                     dataset=recipe.data.build(split="train"), components=components)
    task = run.task = recipe.task.build()
    task.setup(run)
    model = copy.deepcopy(task.accelerator.unwrap_model(task.model))
    initial = {name: t.clone() for name, t in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=bench.LR, weight_decay=bench.WEIGHT_DECAY)
    batch = run.dataset.__getitems__(list(range(8)))
    batch["keypoints"][0, :5, 2] = 0  # hidden joints: both must leave them out of the loss

    logs = task.train_step(batch, 1)
    loss = bench.training_step(model, opt, batch["image"], batch["keypoints"])

    assert loss.item() == pytest.approx(logs["l1"].item(), rel=1e-6)
    theirs = task.accelerator.unwrap_model(task.model).state_dict()
    for name, tensor in model.state_dict().items():
        # The same operations in the same order: bit for bit, so even weight decay's ~1e-7 share shows.
        assert torch.equal(tensor, theirs[name]), name
    assert not torch.equal(initial["body.0.weight"], theirs["body.0.weight"])  # the step did move the weights


@pytest.mark.parametrize("backbone, head", [("simple_cnn", "regression"), ("mobilelite_attn", "regression"),
                                            ("mobilelite", "heatmap")])
def test_accuracy_recipe_is_the_shipped_one_but_for_budget_network_and_bookkeeping(tmp_path, backbone, head):
    base = read_toml(RECIPE)
    pristine = json.loads(json.dumps(base))
    raw = bench.accuracy_recipe(base, backbone, head, steps=300, size=64, val_samples=200, output_dir=tmp_path)
    assert base == pristine  # the base serves every row

    recipe = resolve(raw, source=RECIPE)
    assert recipe.model["regressor"].name == backbone and recipe.task.config.head == head
    assert recipe.train.steps == 300 and recipe.eval.every == 0 and recipe.train.checkpoint_every == 0
    assert recipe.task.config.val_samples == 200
    # The recipe warms up for 100 of its 1500 steps: the same fifteenth of 300 is 20.
    assert recipe.task.config.warmup_steps == base["task"]["warmup_steps"] * 300 // base["train"]["steps"] == 20
    # What the comparison is about stays as shipped.
    assert recipe.data.name == base["data"]["name"] and recipe.train.batch_size == base["train"]["batch_size"]
    assert recipe.task.config.lr == base["task"]["lr"] and recipe.model["augment"].name == "keypoint_affine"
    assert list(recipe.data.config.hand_size) == base["data"]["hand_size"]
    assert recipe.run_dir.parent == tmp_path


def test_sizes_that_are_not_multiples_of_32_are_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "100"])
    assert "multiple of 32" in capsys.readouterr().err
