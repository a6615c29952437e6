"""The run loop end to end on a toy task: run directory, schedules, checkpoints, NaN, resume."""
import json
import pathlib
import tomllib

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli
from handforge.checkpoint import CheckpointManager
from handforge.errors import HandforgeError, NonFiniteLossError
from handforge.loop import Trainer
from handforge.plugin_manager import PluginHost
from handforge.recipe import load_recipe, resolve
from handforge.toml_writer import dumps

HERE = pathlib.Path(__file__).parent
TOY, KILL = HERE / "toy_plugin.py", HERE / "kill_plugin.py"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tensorboard_scalars(root) -> dict:
    """tag -> [(step, value)] read from TensorBoard event files (TFRecord framing + Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for file in sorted(pathlib.Path(root).rglob("events.out.tfevents.*")):
        data, offset = file.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def toy_raw(tmp_path, **train):
    return {
        "name": "toy", "seed": 1, "output_dir": str(tmp_path / "runs"), "plugins": [str(TOY)],
        "task": {"name": "toy_task"},
        "data": {"name": "toy_images", "size": 4, "length": 40},
        "model": {"generator": {"name": "toy_linear", "ch": 3}},
        "train": {"steps": 6, "batch_size": 8, "log_every": 2, "progress": False, **train},
    }


def toy_run(tmp_path, **train):
    host = PluginHost()
    recipe = resolve(toy_raw(tmp_path, **train), host=host)
    return Trainer(recipe, host).run(), host


def test_run_directory_contents(tmp_path):
    run, host = toy_run(tmp_path, checkpoint_every=2, keep_last=2, sample_every=3)
    d = run.run_dir
    assert load_recipe(d / "recipe.toml", host=host).to_dict() == run.recipe.to_dict()
    lock = (d / "plugins.lock").read_text().splitlines()
    assert lock == [f"{TOY}  # local file"]
    checkpoints = sorted(p.name for p in (d / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004", "step_00000006"]  # rotated: keep_last = 2
    assert json.loads((d / "checkpoints/step_00000006/train_state.json").read_text())["step"] == 6
    assert sorted(p.name for p in (d / "samples").iterdir()) == ["step_00000003.png", "step_00000006.png"]
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["type"] == "train" and r["loss"] >= 0 and r["samples_per_s"] > 0 for r in records)
    assert tensorboard_scalars(d / "tensorboard")["train/loss"] == [(r["step"], pytest.approx(r["loss"]))
                                                                     for r in records]
    exported = load_file(d / "weights/net.safetensors")
    net = run.accelerator.unwrap_model(run.task.net)
    assert torch.equal(exported["weight"], net.weight.detach())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    host = PluginHost()
    raw = toy_raw(tmp_path, checkpoint_every=2)
    raw["task"]["nan_at_step"] = 5
    recipe = resolve(raw, host=host)
    with pytest.raises(NonFiniteLossError) as err:
        Trainer(recipe, host).run()
    message = str(err.value)
    assert "step 5" in message and "'loss' = nan" in message and "step_00000004" in message
    manager = CheckpointManager(None, recipe.run_dir, 3)
    assert manager.latest().name == "step_00000004"
    records = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 4


def test_existing_checkpoints_need_resume(tmp_path):
    toy_run(tmp_path)
    with pytest.raises(HandforgeError, match="already holds checkpoints: add resume=true"):
        toy_run(tmp_path)


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    calls = []

    def dying_save(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the second save dies halfway: some files written, then gone
            real_save(self, output_dir, **kwargs)
            raise KeyboardInterrupt
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dying_save)
    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path, checkpoint_every=2)
    checkpoints = tmp_path / "runs/toy/checkpoints"
    assert (checkpoints / ".tmp-step_00000004").is_dir()  # the partial save
    assert CheckpointManager(None, tmp_path / "runs/toy", 3).latest().name == "step_00000002"
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    host = PluginHost()
    raw = toy_raw(tmp_path, checkpoint_every=2)
    raw["resume"] = True
    run = Trainer(resolve(raw, host=host), host).run()
    assert run.step == 6
    assert not (checkpoints / ".tmp-step_00000004").exists()  # the retried save replaced it


def write_recipe(path, raw):
    path.write_text(dumps(raw))
    return path


def tiny_quickstart(root):
    """recipes/quickstart.toml shrunk: the real GAN (Adam, EMA, BatchNorm, spectral norm)."""
    raw = tomllib.loads((REPO / "recipes" / "quickstart.toml").read_text())
    raw["output_dir"] = str(root / "runs")
    raw["model"]["generator"].update(ch=8, z_dim=16)
    raw["model"]["discriminator"]["ch"] = 8
    raw["train"].update(steps=6, batch_size=8, log_every=2, sample_every=3, checkpoint_every=2, progress=False)
    return raw


@pytest.mark.parametrize("make_recipe", [lambda root: toy_raw(root, checkpoint_every=2), tiny_quickstart],
                         ids=["toy", "quickstart_gan"])
def test_killed_and_resumed_run_is_bit_identical(tmp_path, make_recipe):
    """A hard kill (os._exit) right after the step-4 checkpoint, then resume=true, ends with the
    same weights, bit for bit, as a run that was never interrupted."""
    straight, killed = make_recipe(tmp_path / "a"), make_recipe(tmp_path / "b")
    killed["plugins"] = killed.get("plugins", []) + [str(KILL)]
    env = {"HANDFORGE_TEST_KILL_AT": "4"}
    a = run_cli("run", write_recipe(tmp_path / "a.toml", straight), env=env)
    assert a.returncode == 0, a.stderr
    b = run_cli("run", write_recipe(tmp_path / "b.toml", killed), env=env)
    assert b.returncode == 17, b.stderr
    name = straight["name"]
    assert CheckpointManager(None, tmp_path / "b/runs" / name, 3).latest().name == "step_00000004"
    assert not (tmp_path / "b/runs" / name / "weights").exists()
    c = run_cli("run", tmp_path / "b.toml", "resume=true", env={"HANDFORGE_TEST_KILL_AT": "0"})
    assert c.returncode == 0, c.stderr
    assert "resumed from" in c.stdout
    weights = sorted(p.name for p in (tmp_path / "a/runs" / name / "weights").iterdir())
    assert weights and weights == sorted(p.name for p in (tmp_path / "b/runs" / name / "weights").iterdir())
    for file in weights:
        wa = load_file(tmp_path / "a/runs" / name / "weights" / file)
        wb = load_file(tmp_path / "b/runs" / name / "weights" / file)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), file
    # the logged losses match too (steps 2 and 4 before the kill, 6 after the resume)
    logs = [[{k: v for k, v in json.loads(x).items() if k != "samples_per_s"}
             for x in (tmp_path / d / "runs" / name / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in logs[0]] == [2, 4, 6] and logs[0] == logs[1]
