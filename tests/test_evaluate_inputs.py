"""`handforge evaluate` checks its inputs before any weight file: missing or empty folders, files
that are not images and folders of mixed sizes are reported together, both sides in one message,
while the Inception weights are absent."""
import pytest

from test_evaluate_cli import cli, image_folder, write_png  # noqa: F401 - cli is a fixture

import numpy as np


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDFORGE_WEIGHTS", str(tmp_path / "no_weights"))  # the Inception file is missing


def evaluate(cli, *args):
    code, out, err = cli("evaluate", *args, "--metrics", "fid")
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert "weights" not in err, err  # the inputs are reported before any weight lookup
    return err


def test_a_missing_and_an_empty_folder_are_reported_together(cli, tmp_path, no_weights):
    (tmp_path / "empty").mkdir()
    err = evaluate(cli, "--real", tmp_path / "nowhere", "--fake", tmp_path / "empty")
    assert err.startswith("handforge: error: 2 problems with the input images:")
    assert f"  - --real {tmp_path}/nowhere: no such folder" in err
    assert f"  - --fake {tmp_path}/empty: no image files" in err


def test_unreadable_images_and_mixed_sizes_are_reported_together(cli, tmp_path, no_weights):
    real, fake = image_folder(tmp_path / "real", 4, seed=0), image_folder(tmp_path / "fake", 4, seed=1)
    (real / "garbage.png").write_bytes(b"not a png at all")
    whole = (real / "000.png").read_bytes()
    (real / "truncated.png").write_bytes(whole[: len(whole) // 2])
    write_png(fake / "big.png", np.zeros((32, 32, 3)))
    err = evaluate(cli, "--real", real, "--fake", fake)
    assert "3 problems with the input images:" in err
    assert f"--real {real}/garbage.png: cannot read the image" in err
    assert f"--real {real}/truncated.png: cannot read the image" in err
    assert f"--fake {fake}: the images of one folder must share one size, and 4 are 16x16" in err
    assert f"1 are 32x32 (e.g. {fake}/big.png)" in err


def test_one_problem_is_one_line_and_good_inputs_reach_the_weight_check(cli, tmp_path, no_weights):
    real = image_folder(tmp_path / "real", 4, seed=0)
    (real / "garbage.png").write_bytes(b"not a png at all")
    err = evaluate(cli, "--real", real, "--fake", real)
    assert err.count("garbage.png: cannot read the image") == 2 and "2 problems" in err  # both sides read it
    code, _, err = cli("evaluate", "--real", real, "--fake", real, "--metrics", "fid", "--skip-bad")
    assert code == 2 and "handforge weights fetch inception_fid" in err  # skipped files are no input problem
    (real / "garbage.png").unlink()
    code, _, err = cli("evaluate", "--real", tmp_path / "nowhere", "--fake", real, "--metrics", "fid")
    assert code == 2 and err.strip() == f"handforge: error: --real {tmp_path}/nowhere: no such folder (give an " \
                                        f"image folder, a run directory, or dataset:NAME[:key=value,...])"
