"""Resuming from a checkpoint whose RNG state file is missing, damaged or planted stops with one
message naming the file (exit 2), and a planted pickle is never run."""
import pathlib
import pickle

import pytest
import torch

from conftest import cli_exit
from handforge.errors import HandforgeError
from handforge.toml_writer import dumps

TOY = pathlib.Path(__file__).with_name("toy_plugin.py")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class Planted:
    """Unpickling this would write the marker file: it must never be unpickled."""

    marker = None

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "unpickled"))


def planted(marker: pathlib.Path, torch_format: bool) -> bytes:
    Planted.marker = str(marker)
    if not torch_format:
        return pickle.dumps(Planted())
    buffer = __import__("io").BytesIO()
    torch.save(Planted(), buffer)
    return buffer.getvalue()


def test_the_planted_pickles_would_run_if_unpickled(tmp_path):
    """The control: a plain unpickler does run them, so the marker tests below mean something."""
    pickle.loads(planted(tmp_path / "plain", torch_format=False))
    torch.load(__import__("io").BytesIO(planted(tmp_path / "torch", torch_format=True)), weights_only=False)
    assert (tmp_path / "plain").read_text() == (tmp_path / "torch").read_text() == "unpickled"


def wrong_states(tmp_path) -> bytes:
    """A real torch file of RNG-like states whose numpy state is truncated (an allowed object, wrong shape)."""
    import numpy as np

    state = list(np.random.get_state())
    state[1] = state[1][:10]
    buffer = __import__("io").BytesIO()
    torch.save({"random_state": __import__("random").getstate(), "numpy_random_seed": tuple(state),
                "torch_manual_seed": torch.get_rng_state()}, buffer)
    return buffer.getvalue()


def first_run(tmp_path, capsys) -> tuple[pathlib.Path, pathlib.Path]:
    raw = {"name": "t", "seed": 1, "output_dir": str(tmp_path / "runs"), "plugins": [str(TOY)],
           "task": {"name": "toy_task"}, "data": {"name": "toy_images", "size": 4, "length": 16},
           "model": {"generator": {"name": "toy_linear"}},
           "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "progress": False, "tensorboard": False}}
    recipe = tmp_path / "r.toml"
    recipe.write_text(dumps(raw))
    code, _, err = cli_exit(capsys, "run", recipe)
    assert code == 0, err
    return recipe, tmp_path / "runs/t/checkpoints/step_00000002/random_states_0.pkl"


@pytest.mark.parametrize("damage, message", [
    ("planted pickle", r"not an RNG state file \(UnpicklingError"),
    ("planted torch file", r"not an RNG state file \(UnpicklingError"),
    ("garbage", r"not an RNG state file"),
    ("another object", r"not the RNG states a checkpoint saves: holds a list"),
    ("wrong numpy state", r"not the RNG states a checkpoint saves: an RNG state does not fit"),
    ("missing", r"missing"),
])
def test_resume_with_a_bad_rng_state_stops_naming_the_file(tmp_path, capsys, damage, message):
    recipe, states = first_run(tmp_path, capsys)
    marker = tmp_path / "marker"
    if damage == "missing":
        states.unlink()
    else:
        buffer = __import__("io").BytesIO()
        torch.save([1, 2, 3], buffer)
        states.write_bytes({"planted pickle": lambda: planted(marker, False),
                            "planted torch file": lambda: planted(marker, True),
                            "garbage": lambda: b"\x80\x04not a pickle at all",
                            "another object": buffer.getvalue,
                            "wrong numpy state": lambda: wrong_states(tmp_path)}[damage]())
    code, out, err = cli_exit(capsys, "run", recipe, "resume=true", "train.steps=4")
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{states}: " in lines[0] and "cannot resume exactly" in lines[0], err
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not marker.exists()
    assert not (tmp_path / "runs/t/checkpoints/step_00000004").exists()  # no step was trained


def test_the_states_a_checkpoint_saves_pass_and_resume_goes_on(tmp_path, capsys):
    from handforge.checkpoint import check_rng_states

    recipe, states = first_run(tmp_path, capsys)
    check_rng_states(states)  # what accelerate wrote is accepted
    code, out, err = cli_exit(capsys, "run", recipe, "resume=true", "train.steps=4")
    assert code == 0 and "resumed from" in out, err
    with pytest.raises(HandforgeError, match="missing"):
        check_rng_states(tmp_path / "nowhere.pkl")
