"""The `image_folder` dataset: labels from sub-folders, keypoints.json mapped through the resize, bad data."""
import json
import math
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from test_freihand import DOT_COLOURS, dot_centre, dot_image

from handforge.cli import main
from handforge.errors import DataError
from handforge.plugins.datasets.image_folder import ImageFolder, ImageFolderConfig, provided_fields


def build(path, split="train", **options) -> ImageFolder:
    return ImageFolder(ImageFolderConfig(path=str(path), **options), split=split)


def flat(folder: pathlib.Path, name: str, colour=(50, 60, 70), size=(20, 30)) -> pathlib.Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def normalized(dots: dict, width: int, height: int) -> dict:
    """21 keypoints normalized to the image, the dot joints at their dot's pixel centre, the rest spread."""
    points = [[(5 + 3 * (j % 5)) / width, (5 + 3 * (j // 5)) / height, 1] for j in range(21)]
    for joint, (col, row) in dots.items():
        points[joint] = [(col + 0.5) / width, (row + 0.5) / height, 1]
    return points


def test_class_subfolders_give_sorted_labels_and_only_images_count(tmp_path):
    for k in range(3):
        flat(tmp_path, f"palm_up/{k}.JPG", (200, 0, 0))
    flat(tmp_path, "fist/deeper/a.webp", (0, 200, 0))
    flat(tmp_path, "fist/b.bmp", (0, 200, 0))
    (tmp_path / "fist" / "notes.txt").write_text("not an image")
    flat(tmp_path, ".hidden/c.png")
    flat(tmp_path, "fist/.d.png")
    data = build(tmp_path, size=16)
    assert data.class_names == ["fist", "palm_up"]
    assert data.files == ["fist/b.bmp", "fist/deeper/a.webp", "palm_up/0.JPG", "palm_up/1.JPG", "palm_up/2.JPG"]
    assert [data[i]["label"].item() for i in range(len(data))] == [0, 0, 1, 1, 1]
    sample = data[2]
    assert set(sample) == {"image", "label"} and sample["image"].shape == (3, 16, 16)
    assert provided_fields(data.config) == ("image", "label")
    with pytest.raises(DataError, match=r"no images .* found at the top level \(recursive = false\)"):
        build(tmp_path, recursive=False)


def test_a_flat_folder_has_no_labels_and_sub_folders_can_be_ignored(tmp_path):
    for k in range(4):
        flat(tmp_path, f"palm_{k}.png")
    flat(tmp_path, "extra/other.png")
    data = build(tmp_path)
    assert set(data[0]) == {"image"} and data.class_names == [] and len(data) == 5
    assert provided_fields(data.config) == ("image",)
    assert len(build(tmp_path, recursive=False)) == 4
    with pytest.raises(DataError, match=r"palm_0\.png: lies outside the class sub-folders"):
        build(tmp_path, labels="folders")
    with pytest.raises(DataError, match=r"nowhere: image folder not found"):
        build(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images \(jpg, jpeg, png, bmp, webp\) found"):
        build(tmp_path / "empty")


@pytest.mark.parametrize("fit", ["pad", "crop", "stretch"])
def test_a_dot_at_a_keypoint_lands_on_the_mapped_keypoint(tmp_path, fit):
    width, height = 120, 80
    dots = {0: (45, 20), 8: (70, 60), 20: (58, 40)}  # inside the centred 80 x 80 square too
    dot_image(tmp_path, "hand.png", (width, height), dots, background=(90, 90, 90))
    (tmp_path / "keypoints.json").write_text(json.dumps({"hand.png": normalized(dots, width, height)}))
    points = normalized(dots, width, height)
    data = build(tmp_path, size=64, fit=fit)
    assert provided_fields(data.config) == ("image", "keypoints")
    keypoints = data[0]["keypoints"].numpy()
    left, top, side_x, side_y = {"pad": (0, -20, 120, 120), "crop": (20, 0, 80, 80), "stretch": (0, 0, 120, 80)}[fit]
    for channel, joint in enumerate(DOT_COLOURS):
        col, row = dots[joint]
        expected = [(col + 0.5 - left) / side_x, (row + 0.5 - top) / side_y]  # the mapping, worked by hand
        np.testing.assert_allclose(keypoints[joint, :2], expected, atol=1e-6)
        np.testing.assert_allclose(dot_centre(data[0]["image"], channel), expected, atol=0.12 / 64)
    u = np.array(points)[:, 0] * width
    inside = ((u >= 20) & (u <= 100)).sum() if fit == "crop" else 21  # the crop keeps columns 20 .. 100
    assert keypoints[:, 2].sum() == inside and (fit != "crop" or 3 <= inside < 21)
    assert (keypoints[keypoints[:, 2] == 0, :2] == 0).all()


def test_prepare_labels_json_entries_are_accepted(tmp_path):
    flat(tmp_path, "000000.png", size=(32, 32))
    points = normalized({}, 32, 32)
    points[4] = [None, None, 0]
    entry = {"keypoints": points, "label": 3, "class_name": "fist"}
    (tmp_path / "labels.json").write_text(json.dumps({"000000.png": entry}))
    assert "keypoints" not in provided_fields(ImageFolderConfig(path=str(tmp_path)))
    keypoints = build(tmp_path, keypoints="labels.json", size=32)[0]["keypoints"]
    assert keypoints[4].tolist() == [0, 0, 0] and keypoints[:, 2].sum() == 20
    np.testing.assert_allclose(keypoints[0, :2], [5 / 32, 5 / 32], atol=1e-6)


def test_the_split_is_stratified_by_class_and_seeded(tmp_path):
    counts = {"a": 1, "b": 4, "c": 9}
    for name, n in counts.items():
        for k in range(n):
            flat(tmp_path, f"{name}/{k}.png")
    train, val = build(tmp_path, val_fraction=0.25), build(tmp_path, "val", val_fraction=0.25)
    assert not set(train.files) & set(val.files) and len(train) + len(val) == 14
    for label, (name, n) in enumerate(counts.items()):
        assert val.labels.count(label) == min(math.floor(0.25 * n + 0.5), n - 1), name
    assert build(tmp_path, "val", val_fraction=0.25).files == val.files
    assert build(tmp_path, "val", val_fraction=0.25, seed=3).files != val.files
    with pytest.raises(DataError, match=r"the val split is empty; set val_fraction"):
        build(tmp_path, "val")


def test_bad_keypoint_files_raise_naming_the_entry_or_skip_counted(tmp_path, capsys):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        flat(tmp_path, name)
    good = normalized({}, 20, 30)
    nan = [list(p) for p in good]
    nan[7] = [float("nan"), 0.5, 1]
    table = {"a.png": good, "b.png": good[:20], "c.png": nan, "ghost.png": good}  # d.png: no entry
    (tmp_path / "keypoints.json").write_text(json.dumps(table))
    cases = [(r"entry 'b\.png': expected 21 \[x, y, visibility\] triples", {}),
             (r"entry 'c\.png': NaN at joint 7, value 0, not a finite number", {"b.png": good}),
             (r"entry 'ghost\.png': names no image in", {"b.png": good, "c.png": good}),
             (r"d\.png: has no entry in keypoints\.json", {"b.png": good, "c.png": good, "ghost.png": None})]
    for message, fixes in cases:
        fixed = {**table, **fixes}
        (tmp_path / "keypoints.json").write_text(json.dumps({k: x for k, x in fixed.items() if x is not None}))
        with pytest.raises(DataError, match=message):
            build(tmp_path)
    (tmp_path / "keypoints.json").write_text(json.dumps(table))
    data = build(tmp_path, on_error="skip")
    assert data.files == ["a.png"]
    err = capsys.readouterr().err
    for counted in ("1 malformed keypoints", "1 non-finite keypoints", "1 keypoints without image", "1 no keypoints"):
        assert counted in err
    (tmp_path / "keypoints.json").write_text(json.dumps(table)[:40])
    with pytest.raises(DataError, match=r"keypoints\.json: not valid JSON"):
        build(tmp_path, on_error="skip")  # a truncated file has no entries to skip to
    with pytest.raises(DataError, match=r"absent\.json: keypoint file not found"):
        build(tmp_path, keypoints="absent.json")


def test_images_outside_classes_and_corrupt_images_with_skip(tmp_path, capsys):
    flat(tmp_path, "a/0.png", (10, 10, 10))
    flat(tmp_path, "a/1.png", (20, 20, 20))
    flat(tmp_path, "b/0.png", (30, 30, 30))
    flat(tmp_path, "stray.png")
    (tmp_path / "a" / "1.png").write_bytes(b"broken")
    data = build(tmp_path, labels="folders", on_error="skip", size=8, fit="stretch")
    assert data.files == ["a/0.png", "a/1.png", "b/0.png"]
    assert "skipped 1 sample (1 outside class folders)" in capsys.readouterr().err
    replaced = data[1]  # a/1.png cannot be decoded: the next readable sample stands in
    assert replaced["label"].item() == 1 and (replaced["image"] + 1).mul(127.5).round().unique().tolist() == [30]
    assert data.bad.counts["unreadable image"] == 1
    strict = build(tmp_path / "a", size=8)
    with pytest.raises(DataError, match=r"a/1\.png: cannot decode the image"):
        strict[1]


def test_inspect_through_the_cli(tmp_path, capsys):
    dots = {0: (10, 12), 8: (30, 20), 20: (22, 34)}
    dot_image(tmp_path, "hand.png", (40, 48), dots)
    (tmp_path / "keypoints.json").write_text(json.dumps({"hand.png": normalized(dots, 40, 48)}))
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "image_folder", f"path={json.dumps(str(tmp_path))}", "size=24", "fit=\"stretch\"", "--json"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    report = json.loads(out)
    assert report["length"] == 1 and report["class_names"] == []
    sample = report["samples"][0]
    assert sample["shapes"] == {"image": [3, 24, 24], "keypoints": [21, 3]}
    np.testing.assert_allclose(np.reshape(sample["keypoints"], (21, 3))[8, :2], [30.5 / 40, 20.5 / 48], atol=1e-4)
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "image_folder", f"path={json.dumps(str(tmp_path / 'none'))}", "--json"])
    assert exit_.value.code == 2 and "image folder not found" in capsys.readouterr().err


def test_samples_pass_the_contract_check(tmp_path):
    from handforge.data import check_sample

    flat(tmp_path, "x/0.png", size=(33, 17))
    flat(tmp_path, "y/0.png", size=(17, 33))
    data = build(tmp_path, size=20)
    for sample in data.__getitems__([0, 1]):
        check_sample(sample)
        assert sample["image"].shape == (3, 20, 20) and torch.isfinite(sample["image"]).all()
