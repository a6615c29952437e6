"""``train.read = "stream"``: a dataset's stream() feeding the run loop. Each rank's share once per
epoch, a new order each epoch, DataLoader workers, validation of the option, skip counts in the
log, and an interrupted run resumed to bit-identical weights."""
import json
import pathlib
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, cli_exit, launch_two_processes
from handforge import hookimpl
from handforge.errors import RecipeError
from handforge.loop import Trainer
from handforge.plugin_manager import PluginHost
from handforge.recipe import resolve
from handforge.stream import StreamBatches
from handforge.toml_writer import dumps

HERE = pathlib.Path(__file__).parent
TOY, STREAM = HERE / "toy_plugin.py", HERE / "stream_plugin.py"
sys.path.insert(0, str(HERE))
import stream_plugin  # noqa: E402
import tar_fixtures as fx  # noqa: E402


def raw_recipe(root, data=None, **train):
    return {
        "name": "toy", "seed": 1, "output_dir": str(root / "runs"), "plugins": [str(TOY), str(STREAM)],
        "task": {"name": "toy_task"},
        "data": data or {"name": "toy_stream", "size": 4, "length": 36, "bad_every": 7},
        "model": {"generator": {"name": "toy_linear", "ch": 3}},
        "train": {"steps": 10, "batch_size": 8, "log_every": 1, "checkpoint_every": 3, "progress": False,
                  "tensorboard": False, "read": "stream", **train},
    }


def identities(batches) -> list[int]:
    return [i for b in batches for i in b["identity"].tolist()]


def take(stream, n) -> list[dict]:
    return [stream.next() for _ in range(n)]


# -- the batches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_read_each_sample_once_per_epoch_in_a_new_order_each_epoch(workers):
    config = stream_plugin.ToyStreamConfig(length=32)
    dataset = stream_plugin.ToyStream(config)
    ranks = [StreamBatches(dataset, 4, seed=0, num_workers=workers, device="cpu", rank=r, world=2) for r in (0, 1)]
    # 32 samples, 2 ranks (x workers) of 16 (8): 4 whole batches of 4 per rank and epoch
    epochs = [[identities(take(stream, 4)) for stream in ranks] for _ in range(2)]
    for epoch, (first, second) in enumerate(epochs):
        assert not set(first) & set(second)
        assert sorted(first + second) == list(range(32)), epoch
    assert [s.epoch for s in ranks] == [1, 1] and [s.offset for s in ranks] == [4, 4]
    assert epochs[0] != epochs[1]  # the epoch number reached the stream: another order
    # batches are collated as in map-style reading: stacked samples, as dataset[i] gives them
    batch = take(StreamBatches(dataset, 4, seed=0, num_workers=0, device="cpu"), 1)[0]
    assert batch["image"].shape == (4, 3, 4, 4)
    assert all(torch.equal(batch["image"][k], dataset[i]["image"]) for k, i in enumerate(batch["identity"].tolist()))


def test_tar_shards_are_split_over_ranks_and_workers_and_skips_counted(tmp_path):
    from handforge.plugins.datasets.tar_shards.dataset import BosphorusPairs, TarPairsConfig

    truth = fx.bosphorus(tmp_path, clips=tuple(f"0001.1.{c:03d}" for c in range(4)), frames=2)
    (tmp_path / "train" / "0009.9.009.tar.gz").write_bytes(b"not a shard")
    data = BosphorusPairs(TarPairsConfig(root=str(tmp_path), size=8, shuffle_buffer=3, on_error="skip"))
    # 5 shards over 2 ranks x 2 workers: whole shards per worker, 1 batch of 2 per good shard
    ranks = [StreamBatches(data, 2, seed=0, num_workers=2, device="cpu", rank=r, world=2) for r in (0, 1)]
    seen = []
    for stream in ranks:
        while (batch := stream.next()) is not None and stream.epoch == 0:
            seen += [round(float(v) * 127.5 + 127.5) for v in batch["image"][:, 0, 0, 0]]
    assert sorted(seen) == sorted(value for value, _ in truth.values())
    # counted in the worker processes, summed here: the damaged shard once in epoch 0, and once
    # more if a worker met it in epoch 1 before the batch that ended each loop above
    counts = sum((r.skipped for r in ranks), Counter())
    assert set(counts) == {"damaged shard"} and 1 <= counts["damaged shard"] <= 2


def test_a_stream_without_a_whole_batch_names_the_rank():
    from handforge.errors import DataError

    dataset = stream_plugin.ToyStream(stream_plugin.ToyStreamConfig(length=6))
    with pytest.raises(DataError, match="rank 1 of 2 gave no whole batch of 4 in epoch 0"):
        StreamBatches(dataset, 4, seed=0, num_workers=0, device="cpu", rank=1, world=2).next()


# -- the recipe option ------------------------------------------------------------------------------


def test_validate_refuses_stream_for_a_dataset_without_stream(tmp_path, capsys):
    raw = raw_recipe(tmp_path, data={"name": "toy_images", "size": 4})
    with pytest.raises(RecipeError) as error:
        resolve(raw, host=PluginHost())
    assert len(error.value.problems) == 1
    problem = error.value.problems[0]
    assert problem.startswith('train.read: "stream" needs a dataset with a stream(') and "'toy_images'" in problem
    assert str(TOY) in problem  # the plugin that registered it
    recipe = tmp_path / "r.toml"
    recipe.write_text(dumps(raw))
    code, _, err = cli_exit(capsys, "validate", recipe)
    assert code == 2 and "train.read" in err and "toy_images" in err and "Traceback" not in err
    raw["train"]["read"] = "streamed"
    with pytest.raises(RecipeError, match=r"train.read: expected one of 'index', 'stream'"):
        resolve(raw, host=PluginHost())
    resolve(raw_recipe(tmp_path), host=PluginHost())  # a dataset with stream(): valid


# -- through the loop: counts and resume -------------------------------------------------------------


def expected_skipped(config, batches: int, batch_size: int) -> int:
    """Bad samples the stream has passed when the loop took ``batches`` batches (one process, no
    workers): a batch carries the skips found since the previous one, an epoch's end its last."""
    skipped = 0
    for epoch in range(batches):
        order = stream_plugin.epoch_order(config, epoch)
        good = [i for i in order if not stream_plugin.is_bad(config, i)]
        per_epoch = len(good) // batch_size
        if batches > per_epoch:
            skipped, batches = skipped + len(order) - len(good), batches - per_epoch
            continue
        last = good[batches * batch_size - 1]
        return skipped + sum(stream_plugin.is_bad(config, i) for i in order[: order.index(last)])
    raise AssertionError("unreachable")


class Interrupt:
    """Stops the run like Ctrl-C right after the checkpoint of ``step`` is saved."""

    def __init__(self, step: int):
        self.step = step

    @hookimpl
    def on_checkpoint_saved(self, run, step, path):
        if step == self.step:
            raise KeyboardInterrupt


def train(raw, interrupt_at: int = 0):
    """One run in this process; ``interrupt_at``: stop it after that step's checkpoint."""
    from accelerate.state import AcceleratorState, GradientState

    host = PluginHost()
    recipe = resolve(raw, host=host)
    if interrupt_at:
        host.pm.register(Interrupt(interrupt_at))
    try:
        Trainer(recipe, host).run()
    finally:  # the next run builds its own Accelerator
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def log_of(root) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"}
            for x in (root / "runs/toy/metrics.jsonl").read_text().splitlines()]


def test_interrupted_and_resumed_stream_run_is_bit_identical(tmp_path, one_thread):
    """Stopped right after the step-4 checkpoint (epoch 1, one batch in), then resumed: the run
    passes over what epoch 1 had given, and ends with the same weights and the same log (skip
    counts included) as an uninterrupted one."""
    train(raw_recipe(tmp_path / "a", checkpoint_every=4))
    with pytest.raises(KeyboardInterrupt):
        train(raw_recipe(tmp_path / "b", checkpoint_every=4), interrupt_at=4)
    state = json.loads((tmp_path / "b/runs/toy/checkpoints/step_00000004/train_state.json").read_text())
    # 36 samples, 5 bad: 31 good, 3 batches of 8 an epoch; step 4 is epoch 1's first batch
    assert (state["stream"][0]["epoch"], state["stream"][0]["offset"], state["batches"]) == (1, 1, 4)
    assert not (tmp_path / "b/runs/toy/weights").exists()
    train({**raw_recipe(tmp_path / "b", checkpoint_every=4), "resume": True})
    wa, wb = (load_file(tmp_path / d / "runs/toy/weights/net.safetensors") for d in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    logs = [log_of(tmp_path / d) for d in "ab"]
    assert [r["step"] for r in logs[0]] == list(range(1, 11)) and logs[0] == logs[1]
    config = stream_plugin.ToyStreamConfig(length=36, bad_every=7)
    assert [r["skipped"] for r in logs[0]] == [expected_skipped(config, s, 8) for s in range(1, 11)]
    assert logs[0][-1]["skipped_kinds"] == {"damaged": logs[0][-1]["skipped"]} and logs[0][-1]["skipped"] > 15


def test_resuming_without_stream_positions_warns_in_the_log(tmp_path, one_thread, capsys):
    """A checkpoint saved while reading by index has no stream positions: the stream starts over,
    and metrics.jsonl says so."""
    train(raw_recipe(tmp_path, steps=2, checkpoint_every=2, read="index"))
    train({**raw_recipe(tmp_path, steps=3, checkpoint_every=2), "resume": True})
    records = [json.loads(x) for x in (tmp_path / "runs/toy/metrics.jsonl").read_text().splitlines()]
    warnings = [r for r in records if r["type"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["step"] == 2 and "starts epoch 0 over" in warnings[0]["message"]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert "warning:" in capsys.readouterr().out


def test_two_processes_share_the_stream_and_checkpoint_both_positions(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(dumps(raw_recipe(tmp_path, steps=3, checkpoint_every=3, batch_size=4)))
    result = launch_two_processes(REPO / "run.py", "run", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "toy"
    state = json.loads((run / "checkpoints/step_00000003/train_state.json").read_text())
    assert [(p["epoch"], p["offset"]) for p in state["stream"]] == [(0, 3), (0, 3)]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # the log counts both processes' skips: the sum of what the checkpoint says each skipped
    assert records[-1]["skipped"] == sum(Counter(p["skipped"])["damaged"] for p in state["stream"]) > 0
