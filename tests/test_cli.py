"""The command line: exit codes, one-line errors, listings, inspect."""
import json
import pathlib

from PIL import Image

from conftest import cli_exit, run_cli
from handforge.toml_writer import dumps

TOY = pathlib.Path(__file__).with_name("toy_plugin.py")


cli = cli_exit  # handforge ARGS in this process: (exit code, stdout, stderr)


def toy_recipe(tmp_path, **changes):
    raw = {"name": "t", "output_dir": str(tmp_path / "runs"), "plugins": [str(TOY)],
           "task": {"name": "toy_task"}, "data": {"name": "toy_images", "size": 4, "length": 16},
           "model": {"generator": {"name": "toy_linear"}}, "train": {"steps": 2, "batch_size": 4}}
    raw.update(changes)
    path = tmp_path / "r.toml"
    path.write_text(dumps(raw))
    return path


def test_validate_ok_and_errors(capsys, tmp_path):
    code, out, _ = cli(capsys, "validate", toy_recipe(tmp_path))
    assert code == 0 and "ok — task 'toy_task' on dataset 'toy_images'" in out
    code, _, err = cli(capsys, "validate", toy_recipe(tmp_path), "train.stepz=3", 'model.generator.ch="64"')
    assert code == 2
    assert "2 problems" in err and "train.stepz: unknown key (did you mean 'steps'?)" in err
    assert 'model.generator.ch: expected int, got str "64"' in err
    assert "Traceback" not in err


def test_bad_input_through_the_real_entry_point_is_one_message(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    result = run_cli("validate", bad)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "line 1" in lines[0], result.stderr
    result = run_cli("list", "backbonez")
    assert result.returncode == 2 and "unknown kind 'backbonez' (did you mean 'backbone'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_env_shows_traceback(tmp_path):
    result = run_cli("validate", tmp_path / "missing.toml", env={"HANDFORGE_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_run_py_without_subcommand_means_run(capsys, tmp_path):
    code, out, _ = cli(capsys, toy_recipe(tmp_path), "train.progress=false")
    assert code == 0 and "run finished: 2 steps" in out
    assert (tmp_path / "runs/t/weights/net.safetensors").is_file()


def test_plugins_list_and_show(capsys):
    code, out, _ = cli(capsys, "plugins", "--json")
    plugins = json.loads(out)
    assert code == 0 and any(p["dist"] == "handforge" and p["hooks"] for p in plugins)
    code, out, _ = cli(capsys, "list", "task", "--json")
    assert code == 0 and "gan" in [row["name"] for row in json.loads(out)]
    code, out, _ = cli(capsys, "list", "datasets", "proc*")
    assert code == 0 and "procedural_hands" in out
    code, out, _ = cli(capsys, "show", "task", "gan", "--json")
    shown = json.loads(out)
    assert code == 0 and {s["name"] for s in shown["slots"]} >= {"generator", "discriminator", "loss"}
    assert {o["name"] for o in shown["options"]} >= {"g_lr", "d_lr"}
    code, out, _ = cli(capsys, "show", "dataset", "procedural_hands")
    assert code == 0 and "provides:" in out and "size: int" in out
    code, _, err = cli(capsys, "show", "backbone", "deep_conf")
    assert code == 2 and "did you mean 'deep_conv'" in err


def test_inspect_prints_json_and_draws_grid(capsys, tmp_path):
    grid = tmp_path / "grid.png"
    code, out, _ = cli(capsys, "inspect", "procedural_hands", "size=32", "--num", "3", "--json", "--grid", grid)
    assert code == 0
    report = json.loads(out)
    assert report["dataset"] == "procedural_hands" and len(report["samples"]) == 3
    first = report["samples"][0]
    assert first["shapes"]["image"] == [3, 32, 32] and len(first["keypoints"]) == 63
    assert first["label_name"] == report["class_names"][first["label"]]
    assert Image.open(grid).size[0] >= 3 * 32
    code, _, err = cli(capsys, "inspect", "procedural_hands", "size=\"32\"")
    assert code == 2 and 'dataset.size: expected int, got str "32"' in err
