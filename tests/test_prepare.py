"""`handforge prepare`: a dataset's first N samples as PNG files, labels.json and dataset.json.

procedural_hands is reached only through the registry and the CLI (its module is being moved).
"""
import json
import pathlib
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import cli_exit, run_cli
from handforge.imaging import to_uint8
from handforge.prepare import prepare
from handforge.recipe import resolve_component

DATASET = "procedural_hands"


cli = cli_exit  # handforge ARGS in this process: (exit code, stdout, stderr)


def read_labels(folder: pathlib.Path) -> dict:
    return json.loads((folder / "labels.json").read_text())


def folder_bytes(folder: pathlib.Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# A local plugin: a dataset without `size`/`seed` options, with a short default length, no
# __getitems__ (so prepare falls back to __getitem__ + collate) and a second image field.
TINY_PLUGIN = textwrap.dedent('''
    import attrs
    import torch
    from handforge import hookimpl

    @attrs.define
    class TinyConfig:
        length: int = 4
        side: int = 8

    class TinyPairs(torch.utils.data.Dataset):
        def __init__(self, config, split="train"):
            self.config = config
        def __len__(self):
            return self.config.length
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            side = self.config.side
            return {"image": torch.rand(3, side, side, generator=g) * 2 - 1,
                    "reference": torch.rand(3, side, side, generator=g) * 2 - 1,
                    "keypoints": torch.rand(21, 3, generator=g),
                    "identity": torch.tensor(i // 2)}

    @hookimpl
    def register_datasets(register):
        register("tiny_pairs", TinyPairs, config=TinyConfig)
''')


@pytest.fixture
def tiny_host(host, tmp_path):
    plugin = tmp_path / "tiny_plugin.py"
    plugin.write_text(TINY_PLUGIN)
    host.load_file(plugin)
    return host


def test_writes_numbered_pngs_and_labels_equal_to_the_dataset(capsys, tmp_path):
    out = tmp_path / "prepared"
    # Options after the flags, and a batch that does not divide N (4 + 4 + 2).
    code, stdout, err = cli(capsys, "prepare", DATASET, "--num", 10, "--out", out, "--batch", 4, "size=16")
    assert code == 0, err
    assert stdout.count("\n") == 1 and "prepared 10 images of 16x16" in stdout and str(out) in stdout
    assert "images/s" in stdout

    names = [f"{i:06d}.png" for i in range(10)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["dataset.json", "labels.json"])
    dataset = resolve_component({"name": DATASET, "size": 16}, "dataset", "data").build(split="train")
    expected = dataset.__getitems__(list(range(10)))
    pixels = to_uint8(expected["image"])
    for i, name in enumerate(names):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.mode == "RGB" and png.size == (16, 16)
            assert np.array_equal(np.asarray(png), pixels[i]), f"{name} is not sample {i}"

    labels = read_labels(out)
    assert list(labels) == names
    for i, name in enumerate(names):
        entry = labels[name]
        assert set(entry) == set(expected) - {"image"} | {"class_name"}
        assert entry["label"] == expected["label"][i].item() and isinstance(entry["label"], int)
        assert entry["identity"] == expected["identity"][i].item()
        assert entry["handedness"] == expected["handedness"][i].item()
        assert entry["class_name"] == dataset.class_names[entry["label"]]
        keypoints = np.array(entry["keypoints"])
        assert keypoints.shape == (21, 3) and set(keypoints[:, 2]) <= {0.0, 1.0}
        np.testing.assert_allclose(keypoints, expected["keypoints"][i].numpy(), atol=1e-6)
        np.testing.assert_allclose(entry["joints3d"], expected["joints3d"][i].numpy(), atol=1e-6)

    info = json.loads((out / "dataset.json").read_text())
    assert info["dataset"] == DATASET and info["split"] == "train" and info["num"] == 10
    assert info["options"]["size"] == 16 and info["options"]["length"] == 50_000  # a larger length is kept
    assert info["class_names"] == dataset.class_names and info["handforge_version"]
    assert info["image_fields"] == ["image"] and "keypoints" in info["label_fields"]


def test_deterministic_and_shortcuts_equal_their_options(capsys, tmp_path):
    runs = {
        "a": ["--size", 24, "--seed", 3],
        "b": ["--seed", 3, "--size", 24],
        "options": ["size=24", "seed=3"],
        "seed0": ["--size", 24],
        "val": ["--size", 24, "--seed", 3, "--split", "val"],
    }
    for name, extra in runs.items():
        code, _, err = cli(capsys, "prepare", DATASET, "--num", 6, "--out", tmp_path / name, *extra)
        assert code == 0, err
    a = folder_bytes(tmp_path / "a")
    assert a == folder_bytes(tmp_path / "b") == folder_bytes(tmp_path / "options")  # same bytes, every file
    with Image.open(tmp_path / "a" / "000005.png") as png:
        assert png.size == (24, 24)
    info = json.loads(a["dataset.json"])
    assert info["options"]["seed"] == 3 and info["options"]["size"] == 24
    for other in ("seed0", "val"):  # another seed or split: other samples
        assert read_labels(tmp_path / other) != read_labels(tmp_path / "a")
    assert json.loads((tmp_path / "val" / "dataset.json").read_text())["split"] == "val"


@pytest.mark.parametrize("args, message", [
    (["procedural_hand", "--num", 2], "'procedural_hand' is neither a converter nor a dataset (did you mean 'procedural_hands'?)"),
    ([DATASET, "--num", 2, "sise=16"], "procedural_hands.sise: unknown key (did you mean 'size'?)"),
    ([DATASET, "--num", 2, 'size="x"'], 'procedural_hands.size: expected int, got str "x"'),
    ([DATASET, "--num", 2, "size=x"], 'procedural_hands.size: expected int, got str "x"'),
    ([DATASET, "--num", 30, "length=20"], "has 20 samples, fewer than --num 30: raise its length option (length=30)"),
    ([DATASET, "--num", 2, "--seed", 1, "seed=2"], "--seed 1 and seed=2 disagree"),
    ([DATASET, "--num", 0], "--num must be at least 1"),
])
def test_bad_input_exits_2_with_one_message(capsys, tmp_path, args, message):
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "prepare", *args, "--out", out)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and stdout == ""
    assert not out.exists() or not any(out.iterdir())


def test_refuses_a_non_empty_folder_unless_overwrite(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "prepare", DATASET, "--num", 2, "--out", out, "size=16")
    assert code == 2 and f"--out {out}: folder exists and is not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    code, _, err = cli(capsys, "prepare", DATASET, "--num", 12, "--out", out, "size=16", "--overwrite")
    assert code == 0, err
    code, _, err = cli(capsys, "prepare", DATASET, "--num", 3, "--out", out, "size=16", "--overwrite")
    assert code == 0, err
    # A smaller run leaves no stale images behind, and the user's own file stays.
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png",
                                                     "dataset.json", "labels.json", "notes.txt"]
    assert list(read_labels(out)) == ["000000.png", "000001.png", "000002.png"]


def test_length_raised_to_num_and_other_image_fields_in_their_folder(tiny_host, tmp_path):
    out = tmp_path / "tiny"
    result = prepare("tiny_pairs", 10, out, host=tiny_host)  # its default length is 4
    assert result.num == 10 and result.image_fields == ("image", "reference")
    info = json.loads((out / "dataset.json").read_text())
    assert info["options"] == {"length": 10, "side": 8} and info["class_names"] is None
    names = [f"{i:06d}.png" for i in range(10)]
    assert sorted(p.name for p in (out / "reference").iterdir()) == names
    with Image.open(out / "reference" / "000009.png") as png:
        assert png.size == (8, 8) and png.mode == "RGB"
    labels = read_labels(out)
    assert list(labels) == names and set(labels["000009.png"]) == {"keypoints", "identity"}
    assert labels["000009.png"]["identity"] == 4

    # A length the user chose is theirs: too short is an error that says which option to raise.
    with pytest.raises(Exception, match=r"tiny_pairs' \(train\) has 4 samples.*raise its length option \(length=10\)"):
        prepare("tiny_pairs", 10, tmp_path / "short", options=["length=4"], host=tiny_host)


def test_shortcut_for_an_option_the_dataset_lacks(tiny_host, tmp_path):
    from handforge.errors import HandforgeError

    for flag, value in (("size", 16), ("seed", 1)):
        with pytest.raises(HandforgeError) as error:
            prepare("tiny_pairs", 2, tmp_path / flag, host=tiny_host, **{flag: value})
        assert str(error.value) == (f"dataset 'tiny_pairs' has no option '{flag}' (given by --{flag}); "
                                    f"its options: length, side")
        assert not (tmp_path / flag).exists()


def test_real_entry_point(tmp_path):
    out = tmp_path / "out"
    result = run_cli("prepare", DATASET, "--num", 3, "--out", out, "--size", 16, "pose_noise=0.5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("prepared 3 images of 16x16 from dataset 'procedural_hands'")
    assert json.loads((out / "dataset.json").read_text())["options"]["pose_noise"] == 0.5
    assert len(list(out.glob("*.png"))) == 3
