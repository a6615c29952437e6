"""The keypoints task: its loss against hand computations and SciPy, the learning-rate schedule
against torch's CosineAnnealingLR, the context its backbone gets, the pck metric against
keypoint_report on the same predictions, overlays, and a short run that lowers the validation L1
and keeps a best checkpoint that reproduces its evaluation."""
import json
import math

import accelerate
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scipy.spatial.distance import jensenshannon

from conftest import REPO, launch_two_processes
from handforge.errors import HandforgeError
from handforge.imaging import save_grid
from handforge.plugins.backbones.keypoint_nets import SimpleCnnConfig, build_simple_cnn
from handforge.keypoint_math import keypoint_report
from handforge.plugins.tasks.keypoints import (PREDICTED_COLOUR, TRUE_COLOUR, KeypointsConfig, KeypointsTask, Pck,
                                               gaussian_targets, heatmap_js, masked_l1, predict_coords)
from handforge.recipe import Component, load_recipe, resolve_component
from handforge.registry import Entry
from handforge.task import RunContext

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPE = REPO / "recipes" / "keypoints_mobilelite.toml"
# A regressor small enough to train in seconds: simple_cnn at width 8 on 32 px hands.
SMALL = ["data.size=32", "data.hand_size=[0.6, 0.8]", 'model.regressor.name="simple_cnn"',
         "model.regressor.width=8", "task.val_samples=48", "task.overlay_count=4", "train.batch_size=16",
         "train.progress=false"]


# -- losses ----------------------------------------------------------------------------------------


def test_l1_counts_only_visible_joints_by_hand():
    pred = torch.tensor([[[0.1, 0.2], [0.5, 0.5], [0.9, 0.0]]], requires_grad=True)
    target = torch.tensor([[[0.2, 0.4], [0.0, 1.0], [0.6, 0.3]]])
    visible = torch.tensor([[True, False, True]])
    # Visible joints 0 and 2: |0.1-0.2| + |0.2-0.4| + |0.9-0.6| + |0.0-0.3| = 0.9 over 4 coordinates.
    loss = masked_l1(pred, target, visible)
    assert loss.item() == pytest.approx(0.9 / 4)
    loss.backward()
    assert torch.equal(pred.grad[0, 1], torch.zeros(2))  # the invisible joint learns nothing
    assert torch.allclose(pred.grad[0, 0], torch.tensor([-0.25, -0.25]))
    nothing = masked_l1(pred, target, torch.zeros(1, 3, dtype=torch.bool))
    assert nothing.item() == 0.0


def test_task_loss_ignores_invisible_joints():
    task = KeypointsTask(KeypointsConfig())
    keypoints = torch.rand(2, 21, 3)
    keypoints[..., 2] = (torch.arange(21) % 3 != 0).float()  # every third joint invisible
    coords = torch.rand(2, 21, 2, requires_grad=True)
    terms = task.losses({"coords": coords}, keypoints)
    visible = keypoints[..., 2] > 0
    expected = (coords - keypoints[..., :2]).abs()[visible].mean()
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6) and set(terms) == {"l1", "loss"}
    terms["loss"].backward()
    assert (coords.grad[~visible] == 0).all() and (coords.grad[visible] != 0).all()


def test_gaussian_targets_follow_the_formula():
    target = torch.tensor([[[0.3, 0.7], [0.55, 0.1]]])
    h, w, sigma = 6, 8, 1.5
    maps = gaussian_targets(target, h, w, sigma)
    for k, (x, y) in enumerate(target[0].tolist()):
        i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        # cell (i, j) has its centre at ((j + 0.5) / w, (i + 0.5) / h) of the image
        expected = np.exp(-(((j + 0.5) / w - x) ** 2 * w ** 2 + ((i + 0.5) / h - y) ** 2 * h ** 2) / (2 * sigma ** 2))
        assert np.allclose(maps[0, k].numpy(), expected / expected.sum(), atol=1e-7)
    # A target on a cell centre far from the edges: the map's expectation is that centre (soft-argmax).
    centre = torch.tensor([[[4.5 / 16, 9.5 / 16]]])
    m = gaussian_targets(centre, 16, 16, 1.0)[0, 0]
    cells = (torch.arange(16) + 0.5) / 16
    assert (m.sum(0) * cells).sum().item() == pytest.approx(4.5 / 16, abs=1e-6)
    assert (m.sum(1) * cells).sum().item() == pytest.approx(9.5 / 16, abs=1e-6)


def test_heatmap_term_is_scipys_jensen_shannon_over_visible_joints():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 21, 5, 7, generator=generator) * 2
    target = torch.rand(2, 21, 2, generator=generator)
    visible = torch.rand(2, 21, generator=generator) > 0.3
    value = heatmap_js(logits, target, visible, sigma=1.0)
    p = logits.reshape(2, 21, -1).softmax(-1).double().numpy()
    q = gaussian_targets(target, 5, 7, 1.0).reshape(2, 21, -1).double().numpy()
    # SciPy returns the Jensen-Shannon distance, the square root of the divergence (natural log).
    js = [jensenshannon(p[n, k], q[n, k]) ** 2 for n in range(2) for k in range(21) if visible[n, k]]
    assert value.item() == pytest.approx(np.mean(js), rel=1e-5)
    exact = torch.log(gaussian_targets(target, 5, 7, 1.0))  # softmax(log q) = q: no divergence
    assert heatmap_js(exact, target, visible, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_cosine_schedule_is_torchs_after_warm_up():
    task = KeypointsTask(KeypointsConfig(lr=1e-3, warmup_steps=5))
    task.total_steps = 25
    assert [task.lr(s) for s in range(1, 6)] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    reference = []
    for _ in range(20):  # steps 6..25 run at torch's rate before its scheduler.step()
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [task.lr(s) for s in range(6, 26)] == pytest.approx(reference)


def test_heatmap_weight_needs_the_heatmap_head():
    with pytest.raises(HandforgeError, match="task.heatmap_weight: only the heatmap head"):
        load_recipe(RECIPE, overrides=["task.heatmap_weight=1.0"])


# -- the task --------------------------------------------------------------------------------------


def task_run(tmp_path, *overrides, components=None):
    """The task of the shipped recipe (shrunk by SMALL and ``overrides``), set up as the loop does."""
    recipe = load_recipe(RECIPE, overrides=SMALL + list(overrides))
    accelerate.state.AcceleratorState._reset_state(True)
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    run = RunContext(recipe=recipe, accelerator=accelerator, run_dir=tmp_path, dataset=recipe.data.build(split="train"),
                     components={**recipe.model, **(components or {})})
    run.task = recipe.task.build()
    run.task.setup(run)
    return run.task, run


def spy_regressor(seen: list, output=None):
    def build(config, **context):
        seen.append(context)
        net = build_simple_cnn(SimpleCnnConfig(width=4), **context)
        if output is not None:
            net.forward = lambda images: output(images)
        return net

    return Component("spy", None, Entry("backbone", "spy", build, None, "test", None, None, ""), "model.regressor")


@pytest.mark.parametrize("head", ["regression", "heatmap"])
def test_head_option_reaches_the_backbone(tmp_path, head):
    seen = []
    task, run = task_run(tmp_path, f'task.head="{head}"', components={"regressor": spy_regressor(seen)})
    assert seen == [{"role": "keypoints", "image_size": 32, "num_keypoints": 21, "head": head}]
    batch = run.dataset.__getitems__(list(range(16)))
    logs = task.train_step(batch, 1)
    assert all(torch.isfinite(t) for t in logs.values())


def test_heatmap_head_trains_with_the_heatmap_term(tmp_path):
    task, run = task_run(tmp_path, 'task.head="heatmap"', "task.heatmap_weight=0.5")
    batch = run.dataset.__getitems__(list(range(16)))
    logs = task.train_step(batch, 1)
    assert logs["loss"].item() == pytest.approx(logs["l1"].item() + 0.5 * logs["heatmap"].item(), rel=1e-5)


def test_backbones_of_another_contract_and_image_only_augmentations_are_refused(tmp_path):
    with pytest.raises(HandforgeError, match=r"model.regressor: backbone 'spy' must return \{\"coords\""):
        task_run(tmp_path, components={"regressor": spy_regressor([], output=lambda x: torch.zeros(len(x), 42))})
    diffaug = resolve_component({"name": "diffaug"}, "augmentation", "model.augment")
    with pytest.raises(HandforgeError, match="model.augment: augmentation 'diffaug' moves images only"):
        task_run(tmp_path, components={"augment": diffaug})
    with pytest.raises(HandforgeError, match="task.val_samples = 1000000"):
        task_run(tmp_path, "task.val_samples=1000000")


def test_augmentation_runs_on_the_batch_before_the_model(tmp_path):
    calls = []

    class Mirror(torch.nn.Module):
        def forward(self, batch):
            calls.append(batch)
            keypoints = batch["keypoints"].clone()
            keypoints[..., 0] = 1 - keypoints[..., 0]
            return {**batch, "image": batch["image"].flip(-1), "keypoints": keypoints}

    entry = Entry("augmentation", "mirror", lambda config, **_: Mirror(), None, "test", None, None, "",
                  needs=("image", "keypoints"), info={"signature": "batch"})
    task, run = task_run(tmp_path, components={"augment": Component("mirror", None, entry, "model.augment")})
    seen = []
    task.accelerator.unwrap_model(task.model).register_forward_hook(
        lambda m, args, out: seen.append((args[0], out["coords"].detach())))
    batch = run.dataset.__getitems__(list(range(16)))
    logs = task.train_step(batch, 1)
    assert len(calls) == 1 and len(seen) == 1 and torch.equal(seen[0][0], batch["image"].flip(-1))
    moved = calls[0]["keypoints"].clone()
    moved[..., 0] = 1 - moved[..., 0]
    assert logs["l1"].item() == pytest.approx(masked_l1(seen[0][1], moved[..., :2], moved[..., 2] > 0).item())


def test_pck_metric_is_keypoint_report_of_the_val_predictions(tmp_path):
    task, run = task_run(tmp_path, "task.val_samples=40")
    run.step = 7
    values = Pck().evaluate(run)
    # The val set is the first val_samples of the val split, read afresh here.
    val = run.recipe.data.build(split="val").__getitems__(list(range(40)))
    model = task.accelerator.unwrap_model(task.model)
    model.eval()
    with torch.no_grad():
        predicted = model(val["image"])["coords"]
    visible = val["keypoints"][..., 2] > 0
    expected = keypoint_report(predicted, val["keypoints"][..., :2], visible, 32)
    assert set(values) == set(expected) | {"val_l1"}
    assert all(values[k] == pytest.approx(expected[k], rel=1e-6) for k in expected)
    diffs = np.abs(predicted.numpy() - val["keypoints"][..., :2].numpy())[visible.numpy()]
    assert values["val_l1"] == pytest.approx(diffs.mean(), rel=1e-5)
    overlay = tmp_path / "overlays" / "step_00000007.png"
    pixels = np.asarray(Image.open(overlay).convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels[::7]}
    assert TRUE_COLOUR in colours and PREDICTED_COLOUR in colours


def test_pck_metric_refuses_other_tasks():
    run = RunContext(recipe=None, accelerator=None, run_dir=None, dataset=None, components={}, task=object())
    with pytest.raises(HandforgeError, match="metric 'pck' scores a keypoints task"):
        Pck().evaluate(run)


def test_overlay_colours_land_on_the_joints(tmp_path):
    images = -torch.ones(1, 3, 32, 32)
    truth = torch.zeros(1, 21, 3)
    guess = torch.zeros(1, 21, 3)
    truth[0, 0] = torch.tensor([0.25, 0.25, 1.0])  # one visible joint each
    guess[0, 0] = torch.tensor([0.75, 0.75, 1.0])
    path = save_grid(tmp_path / "o.png", images, keypoints=[truth, guess], skeleton_colours=[TRUE_COLOUR,
                     PREDICTED_COLOUR], padding=0, min_cell=96)
    png = np.asarray(Image.open(path).convert("RGB"))
    assert tuple(png[24, 24]) == TRUE_COLOUR and tuple(png[72, 72]) == PREDICTED_COLOUR
    with pytest.raises(ValueError, match="2 skeleton colours for 1 sets"):
        save_grid(tmp_path / "x.png", images, keypoints=truth, skeleton_colours=[TRUE_COLOUR, PREDICTED_COLOUR])


def test_sample_draws_the_predictions_on_training_images(tmp_path):
    task, run = task_run(tmp_path)
    batch = run.dataset.__getitems__(list(range(8)))
    out = task.sample(batch)
    assert torch.equal(out["image"], batch["image"][:4])
    expected = predict_coords(task.accelerator.unwrap_model(task.model), batch["image"][:4], "cpu")
    assert torch.equal(out["keypoints"][..., :2], expected) and (out["keypoints"][..., 2] == 1).all()


# -- a run -----------------------------------------------------------------------------------------


def test_short_run_lowers_val_l1_and_keeps_a_best_checkpoint_that_reproduces_its_eval(tmp_path):
    from handforge.loop import train

    recipe = load_recipe(RECIPE, overrides=SMALL + [
        f"output_dir={json.dumps(str(tmp_path))}", "train.steps=40", "eval.every=10", "train.sample_every=20",
        "train.checkpoint_every=0", "task.warmup_steps=0", "task.lr=2e-3"])
    run = train(recipe)
    run_dir = run.run_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    # Lower than after 10 steps, and lower than predicting the image centre (the untrained head).
    val = recipe.data.build(split="val").__getitems__(list(range(48)))["keypoints"]
    visible = val[..., 2] > 0
    centre_l1 = (val[..., :2] - 0.5).abs()[visible].mean().item()
    assert evals[-1]["val_l1"] < evals[0]["val_l1"] and evals[-1]["val_l1"] < 0.95 * centre_l1, (evals, centre_l1)
    assert all(math.isfinite(r[k]) for r in evals for k in ("pck@0.05", "pck@0.2bbox", "auc@30px", "epe_px"))
    assert sorted(p.name for p in (run_dir / "overlays").iterdir()) == [f"step_{s:08d}.png" for s in (10, 20, 30, 40)]
    assert (run_dir / "samples" / "step_00000020.png").is_file()

    # checkpoints/best holds the weights of the eval with the best PCK@0.05, as safetensors: loaded
    # into a fresh network they reproduce that eval exactly.
    best = max(evals, key=lambda r: r["pck@0.05"])
    state = json.loads((run_dir / "checkpoints" / "best" / "train_state.json").read_text())
    assert state["best_step"] == best["step"] and state["best"] == best["pck@0.05"]
    net = build_simple_cnn(SimpleCnnConfig(width=8), role="keypoints", image_size=32, num_keypoints=21)
    net.load_state_dict(load_file(str(run_dir / "checkpoints" / "best" / "model.safetensors")))
    images = recipe.data.build(split="val").__getitems__(list(range(48)))["image"]
    report = keypoint_report(predict_coords(net, images, "cpu"), val[..., :2], visible, 32)
    assert report["pck@0.05"] == pytest.approx(best["pck@0.05"]) and report["epe_px"] == pytest.approx(best["epe_px"])

    final = [r for r in records if r["type"] == "final"]
    assert len(final) == 1 and final[0]["best_step"] == best["step"]
    assert final[0]["best/epe_px"] == pytest.approx(best["epe_px"])
    assert final[0]["epe_px"] == pytest.approx(evals[-1]["epe_px"])  # the last weights: the last eval's
    last = load_file(str(run_dir / "weights" / "regressor.safetensors"))
    assert set(last) == set(net.state_dict())
    assert "| last |" in (run_dir / "final" / "report.md").read_text()


PLUGIN = '''
import json, os, pathlib
from handforge import hookimpl

@hookimpl
def on_eval_end(run, step, metrics):
    out = pathlib.Path(os.environ["KEYPOINTS_TEST_DIR"]) / f"eval_rank{run.accelerator.process_index}.json"
    out.write_text(json.dumps(metrics))
'''


@pytest.mark.slow
def test_two_processes_agree_on_the_metrics(tmp_path):
    """Each process predicts its share of an odd number of val images; the gathered predictions give
    both the same metrics, which are the ones of one process evaluating the final weights alone."""
    plugin = tmp_path / "eval_report.py"
    plugin.write_text(PLUGIN)
    result = launch_two_processes(REPO / "run.py", "run", RECIPE, f"output_dir={tmp_path / 'runs'}", *SMALL,
                                  "task.val_samples=7", "train.steps=8", "eval.every=8", "train.checkpoint_every=0",
                                  "task.lr=5e-3", f"plugins=[{json.dumps(str(plugin))}]",
                                  env={"KEYPOINTS_TEST_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"eval_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    recipe = load_recipe(RECIPE, overrides=SMALL)
    val = recipe.data.build(split="val").__getitems__(list(range(7)))
    net = build_simple_cnn(SimpleCnnConfig(width=8), role="keypoints", image_size=32, num_keypoints=21)
    weights = tmp_path / "runs" / "keypoints_mobilelite" / "weights" / "regressor.safetensors"
    net.load_state_dict(load_file(str(weights)))
    alone = keypoint_report(predict_coords(net, val["image"], "cpu"), val["keypoints"][..., :2],
                            val["keypoints"][..., 2] > 0, 32)
    # rel 1e-6: batch-size rounding is ~1e-9 here; predicting rank 1's share with its own BatchNorm
    # statistics (not rank 0's, the checkpointed ones) is ~2e-5 off after these 8 steps.
    assert all(ranks[0][k] == pytest.approx(alone[k], rel=1e-6) for k in alone)
