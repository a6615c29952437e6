"""A run writes only inside <output_dir>/<name>: names that are paths, an output_dir that is a file,
and symbolic links out of the run directory are refused with one message (exit 2)."""
import os
import pathlib

import pytest

from conftest import cli_exit
from handforge.errors import HandforgeError, RecipeError
from handforge.plugin_manager import PluginHost
from handforge.recipe import resolve
from handforge.run_paths import run_path
from handforge.toml_writer import dumps

TOY = pathlib.Path(__file__).with_name("toy_plugin.py")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def toy_recipe(tmp_path, **changes):
    raw = {"name": "t", "output_dir": str(tmp_path / "runs"), "plugins": [str(TOY)],
           "task": {"name": "toy_task"}, "data": {"name": "toy_images", "size": 4, "length": 16},
           "model": {"generator": {"name": "toy_linear"}},
           "train": {"steps": 2, "batch_size": 4, "progress": False, "checkpoint_every": 1}}
    raw.update(changes)
    path = tmp_path / "r.toml"
    path.write_text(dumps(raw))
    return path


def files_under(folder: pathlib.Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# -- name: one path component --------------------------------------------------------------------


@pytest.mark.parametrize("name, reason", [
    ("../elsewhere/x", "holds a path separator"), ("/tmp/x", "is an absolute path"), ("a/b", "holds a path separator"),
    ("..", "is '..'"), (".", "is '.'"), ("", "is empty"), ("a\\b", "holds a path separator"),
])
def test_a_name_that_is_a_path_is_refused_naming_the_key(name, reason):
    raw = {"name": name, "task": {"name": "toy_task"}, "data": {"name": "toy_images"},
           "model": {"generator": {"name": "toy_linear"}}}
    host = PluginHost()
    host.load_file(TOY)
    with pytest.raises(RecipeError) as err:
        resolve(raw, host=host)
    assert err.value.problems == [p for p in err.value.problems if p.startswith("name: ")]
    assert f"name: {name!r} {reason}" in str(err.value)


def test_a_name_override_that_leaves_output_dir_writes_nothing(capsys, tmp_path):
    recipe = toy_recipe(tmp_path)
    code, out, err = cli_exit(capsys, "run", recipe, "name=../escaped")
    assert code == 2 and "name: '../escaped' holds a path separator" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "runs").exists()
    code, _, err = cli_exit(capsys, "run", recipe, f"name={tmp_path / 'abs'}")
    assert code == 2 and "is an absolute path" in err and not (tmp_path / "abs").exists()


# -- output_dir / run directory that is a file ---------------------------------------------------


@pytest.mark.parametrize("layout, message", [
    ("output_dir", "output_dir: {tmp}/occupied is a file, not a folder"),
    ("parent", "output_dir: {tmp}/occupied/runs: its parent {tmp}/occupied is a file, not a folder"),
    ("run_dir", "name: {tmp}/runs/t is a file, not a folder"),
])
def test_a_file_where_the_run_directory_goes_is_named_with_its_key(capsys, tmp_path, layout, message):
    output_dir = {"output_dir": tmp_path / "occupied", "parent": tmp_path / "occupied" / "runs",
                  "run_dir": tmp_path / "runs"}[layout]
    occupied = tmp_path / ("runs/t" if layout == "run_dir" else "occupied")
    occupied.parent.mkdir(parents=True, exist_ok=True)
    occupied.write_text("not a folder")
    code, out, err = cli_exit(capsys, "run", toy_recipe(tmp_path, output_dir=str(output_dir)))
    assert code == 2, err
    assert message.format(tmp=tmp_path) in err and "Errno" not in err and "Traceback" not in err, err
    assert occupied.read_text() == "not a folder"


# -- symbolic links out of the run directory -----------------------------------------------------


@pytest.mark.parametrize("entry", ["weights", "checkpoints", "samples", "tensorboard", "metrics.jsonl", "recipe.toml"])
def test_a_link_out_of_the_run_directory_is_refused_and_nothing_written_through_it(capsys, tmp_path, entry):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    target = elsewhere / "metrics.jsonl" if "." in entry else elsewhere
    (run_dir / entry).symlink_to(target, target_is_directory="." not in entry)
    code, out, err = cli_exit(capsys, "run", toy_recipe(tmp_path))
    assert code == 2, err
    assert f"{run_dir / entry} is a symbolic link to {target}" in err and "outside the run directory" in err, err
    assert files_under(elsewhere) == []


def test_links_that_stay_inside_the_run_directory_are_followed(capsys, tmp_path):
    run_dir = tmp_path / "runs" / "t"
    (run_dir / "exported").mkdir(parents=True)
    (run_dir / "weights").symlink_to(run_dir / "exported", target_is_directory=True)
    code, out, err = cli_exit(capsys, "run", toy_recipe(tmp_path))
    assert code == 0, err
    assert files_under(run_dir / "exported") == ["net.safetensors"]


def test_run_path_checks_every_level_and_the_checkpoint_writer_uses_it(tmp_path):
    from handforge.checkpoint import CheckpointManager

    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    (run_dir / "inner").mkdir(parents=True)
    outside.mkdir()
    (run_dir / "alias").symlink_to(run_dir / "inner", target_is_directory=True)  # inside: fine
    (run_dir / "inner" / "out").symlink_to(outside, target_is_directory=True)  # leads out, one level down
    assert run_path(run_dir, "alias", "report.md") == run_dir / "alias" / "report.md"
    with pytest.raises(HandforgeError, match=r"alias/out is a symbolic link to .*outside.*outside the run directory"):
        run_path(run_dir, "alias", "out", "report.md")
    (run_dir / "a_file").write_text("x")
    with pytest.raises(HandforgeError, match=r"a_file is a file, not a folder"):
        run_path(run_dir, "a_file", "report.md")
    (run_dir / "checkpoints").mkdir()
    os.symlink(outside, run_dir / "checkpoints" / "best")
    with pytest.raises(HandforgeError, match=r"checkpoints/best is a symbolic link"):
        CheckpointManager(None, run_dir, keep_last=1).save(None, {"step": 1}, name="best")
    assert files_under(outside) == []


def test_tasks_write_through_run_context_path_which_refuses_a_link_out(tmp_path):
    from handforge.task import RunContext

    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    run_dir.mkdir()
    outside.mkdir()
    (run_dir / "overlays").symlink_to(outside, target_is_directory=True)  # the keypoints task's overlays
    run = RunContext(recipe=None, accelerator=None, run_dir=run_dir, dataset=None, components={})
    assert run.path("final", "report.md") == run_dir / "final" / "report.md"
    with pytest.raises(HandforgeError, match=rf"{run_dir}/overlays is a symbolic link to {outside}"):
        run.path("overlays", "step_00000001.png")
