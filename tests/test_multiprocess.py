"""Two CPU processes under `accelerate launch` (gloo DDP): same parameters, one writer."""
import json

import pytest
from conftest import REPO, launch_two_processes

REPORT_PLUGIN = REPO / "tests" / "rank_report_plugin.py"


# The GAN quickstart (G and D prepared apart, one accumulate block) and the diffusion quickstart
# (one denoiser plus its EMA copy, which each process updates from the synchronised weights).
RECIPES = {"quickstart": [], "diffusion_quickstart": ["task.sample_count=4", "task.sampling_steps=2", "train.keep_last=2"]}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_two_processes_end_identical_and_only_rank0_writes(tmp_path, recipe):
    result = launch_two_processes(REPO / "run.py", "run", REPO / "recipes" / f"{recipe}.toml", *RECIPES[recipe],
                                  f"output_dir={tmp_path / 'runs'}", "train.steps=4", "train.log_every=1",
                                  "train.batch_size=8", "train.checkpoint_every=2", "train.progress=false",
                                  f"plugins=[{json.dumps(str(REPORT_PLUGIN))}]",
                                  env={"HANDFORGE_TEST_REPORT_DIR": str(tmp_path)})
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
