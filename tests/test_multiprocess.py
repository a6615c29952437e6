"""Two CPU processes under `accelerate launch` (gloo DDP): same parameters, one writer."""
import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO

REPORT_PLUGIN = REPO / "tests" / "rank_report_plugin.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The GAN quickstart (G and D prepared apart, one accumulate block) and the diffusion quickstart
# (one denoiser plus its EMA copy, which each process updates from the synchronised weights).
RECIPES = {"quickstart": [], "diffusion_quickstart": ["task.sample_count=4", "task.sampling_steps=2", "train.keep_last=2"]}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_two_processes_end_identical_and_only_rank0_writes(tmp_path, recipe):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HANDFORGE_TEST_REPORT_DIR": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(REPO / "run.py"), "run", str(REPO / "recipes" / f"{recipe}.toml"), *RECIPES[recipe],
               f"output_dir={tmp_path / 'runs'}", "train.steps=4", "train.log_every=1", "train.batch_size=8",
               "train.checkpoint_every=2", "train.progress=false", f"plugins=[{json.dumps(str(REPORT_PLUGIN))}]"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["processes"] == 2 and r["status"] == "completed" and r["step"] == 4 for r in reports)
    assert reports[0]["params"] == reports[1]["params"]

    run_dir = tmp_path / "runs" / recipe
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]  # one writer, no duplicates
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    final = run_dir / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in final.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert not list(run_dir.rglob(".tmp-*"))
