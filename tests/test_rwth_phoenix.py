"""The `rwth_phoenix` dataset on a tiny tree in the layout of ph2014-dev-set-handshape-annotations."""
import json
import math
import pathlib

import pytest
import torch
from PIL import Image

from handforge.cli import main
from handforge.errors import DataError
from handforge.plugins.datasets.rwth_phoenix import INDEX_NAME, RwthPhoenix, RwthPhoenixConfig

WIDTH, HEIGHT = 92, 132  # the set's crops are portrait
# Per class: (number of images, colour). Written in the index out of alphabetical order on purpose.
CLASSES = {"index_flex": (6, (200, 40, 40)), "1": (5, (40, 200, 40)), "b_thumb": (4, (40, 40, 200)),
           "3_hook": (2, (200, 200, 40))}
FOLDER = "images/dev/01April_2010_Thursday_tagesschau_default-8/1"


def image_name(class_name: str, k: int) -> str:
    return f"{FOLDER}/*.png_fn{k:06d}-{class_name}.png"  # a literal '*', as in the real index


def write_phoenix(root: pathlib.Path, classes=CLASSES, extra_lines=()) -> pathlib.Path:
    """Images of one flat colour per class and the index naming them; returns the index."""
    (root / FOLDER).mkdir(parents=True, exist_ok=True)
    lines = []
    for class_name, (count, colour) in classes.items():
        for k in range(count):
            Image.new("RGB", (WIDTH, HEIGHT), colour).save(root / image_name(class_name, k))
            lines.append(f"{image_name(class_name, k)} {class_name}")
    index = root / INDEX_NAME
    index.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return index


def build(index, split="train", **options) -> RwthPhoenix:
    return RwthPhoenix(RwthPhoenixConfig(index=str(index), **options), split=split)


def colour_of(image: torch.Tensor) -> tuple:
    """The RGB colour at the centre of a [-1, 1] image."""
    h, w = image.shape[1:]
    return tuple(round(float(x)) for x in (image[:, h // 2, w // 2] + 1) * 127.5)


def test_classes_sorted_labels_follow_the_lines_and_star_names_load(tmp_path):
    index = write_phoenix(tmp_path)
    data = build(index, val_fraction=0.0)
    assert data.class_names == ["1", "3_hook", "b_thumb", "index_flex"]  # sorted, not in file order
    assert len(data) == sum(n for n, _ in CLASSES.values())
    assert all("*" in line.path.name for line in data.lines)
    for i in range(len(data)):
        sample = data[i]
        assert set(sample) == {"image", "label"} and sample["label"].dtype == torch.int64
        assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
        name = data.class_names[sample["label"].item()]
        assert name == data.lines[i].class_name
        assert colour_of(sample["image"]) == CLASSES[name][1]
    assert data.image_size == 64


def test_fit_pads_crops_or_stretches_the_portrait_crops(tmp_path):
    index = write_phoenix(tmp_path, classes={"a": (1, (250, 250, 250))})
    padded = build(index, val_fraction=0.0, size=66)[0]["image"]
    # Padded to a 132 square: 20 source pixels each side are black, 20 / 132 * 66 = 10 output columns
    # (the bicubic kernel blends 2 more on either side of the border).
    assert torch.all(padded[:, :, :9] == -1) and torch.all(padded[:, :, -9:] == -1)
    assert torch.allclose(padded[:, :, 13:-13], torch.full_like(padded[:, :, 13:-13], 250 / 127.5 - 1), atol=0.02)
    for fit in ("crop", "stretch"):
        image = build(index, val_fraction=0.0, size=66, fit=fit)[0]["image"]
        assert torch.allclose(image, torch.full_like(image, 250 / 127.5 - 1), atol=0.02)
    edge = build(index, val_fraction=0.0, size=66, pad="edge")[0]["image"]
    assert torch.allclose(edge, torch.full_like(edge, 250 / 127.5 - 1), atol=0.02)


def test_min_samples_drops_small_classes_and_says_so(tmp_path, capsys):
    index = write_phoenix(tmp_path)
    data = build(index, val_fraction=0.0, min_samples=5)
    assert data.class_names == ["1", "index_flex"] and len(data) == 11
    assert data.dropped_classes == {"3_hook": 2, "b_thumb": 4}
    err = capsys.readouterr().err
    assert "dropped 2 classes with fewer than 5 images (6 images): 3_hook (2), b_thumb (4)" in err
    with pytest.raises(DataError, match="min_samples = 50 dropped every class"):
        build(index, min_samples=50)


def test_the_classes_option_fixes_the_label_ids(tmp_path, capsys):
    index = write_phoenix(tmp_path)
    order = ["index_flex", "b_thumb", "1", "3_hook", "y"]  # "y" has no image: it keeps its id all the same
    data = build(index, val_fraction=0.0, classes=order)
    assert data.class_names == order
    assert [data.class_names[data[i]["label"].item()] for i in range(len(data))] == [
        line.class_name for line in data.lines]
    with pytest.raises(DataError, match=rf"{INDEX_NAME}: line 16: class '3_hook' is not in the classes option"):
        build(index, classes=["index_flex", "b_thumb", "1"])
    skipped = build(index, val_fraction=0.0, classes=["index_flex", "b_thumb", "1"], on_error="skip")
    assert len(skipped) == 15
    assert "skipped 2 of 17 samples (2 unknown class)" in capsys.readouterr().err


def test_the_split_is_stratified_seeded_and_disjoint(tmp_path):
    counts = {f"c{k}": (n, (10 * k, 0, 0)) for k, n in enumerate([1, 2, 7, 10, 13])}
    index = write_phoenix(tmp_path, classes=counts)
    fraction = 0.3
    train, val = build(index, val_fraction=fraction), build(index, "val", val_fraction=fraction)
    train_paths, val_paths = {line.path for line in train.lines}, {line.path for line in val.lines}
    assert not train_paths & val_paths and len(train_paths | val_paths) == 33
    for name, (n, _) in counts.items():
        expected = min(math.floor(fraction * n + 0.5), n - 1)  # rounded share; a class keeps one train image
        got = sum(line.class_name == name for line in val.lines)
        assert got == expected, name
        assert train.class_names == val.class_names == sorted(counts)
    again = build(index, "val", val_fraction=fraction)
    assert [line.path for line in again.lines] == [line.path for line in val.lines]
    other = build(index, "val", val_fraction=fraction, seed=7)
    assert {line.path for line in other.lines} != val_paths
    with pytest.raises(DataError, match=r"the val split is empty; set val_fraction"):
        build(index, "val", val_fraction=0.0)


def test_bad_lines_raise_with_the_line_number_or_are_skipped_and_counted(tmp_path, capsys):
    index = write_phoenix(tmp_path, extra_lines=["images/only_a_path.png", "", f"{FOLDER}/gone.png 1"])
    with pytest.raises(DataError, match=rf"{INDEX_NAME}: line 18: expected '<image path> <class name>', "
                                        r"got 'images/only_a_path.png'.*on_error"):
        build(index)
    data = build(index, val_fraction=0.0, on_error="skip")
    assert len(data) == 17
    err = capsys.readouterr().err
    assert "skipped 2 of 19 samples (1 malformed line, 1 missing image); first: " in err
    index.write_text(f"{FOLDER}/gone.png 1\n")
    with pytest.raises(DataError, match=rf"line 1: image .*gone\.png not found"):
        build(index)
    with pytest.raises(DataError, match=r"nowhere\.txt: index file not found"):
        build(tmp_path / "nowhere.txt")


def test_a_corrupt_image_raises_naming_line_and_file_or_is_replaced(tmp_path, capsys):
    index = write_phoenix(tmp_path, classes={"a": (3, (90, 90, 90)), "b": (3, (10, 20, 30))})
    (tmp_path / image_name("a", 1)).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    data = build(index, val_fraction=0.0)
    with pytest.raises(DataError, match=rf"{INDEX_NAME}: line 2: .*fn000001-a\.png: cannot decode"):
        data[1]
    skipping = build(index, val_fraction=0.0, on_error="skip")
    assert colour_of(skipping[1]["image"]) == (90, 90, 90) and skipping[1]["label"].item() == 0  # the next: a, 2
    assert [s["label"].item() for s in skipping.__getitems__([0, 1, 3])] == [0, 0, 1]
    assert skipping.bad.counts == {"unreadable image": 1}


def test_a_windows_unpacked_tree_without_stars_is_found(tmp_path):
    index = write_phoenix(tmp_path, classes={"a": (2, (1, 2, 3))})
    for k in range(2):
        star = tmp_path / image_name("a", k)
        star.rename(star.with_name(star.name.replace("*", "_")))
    data = build(index, val_fraction=0.0)
    assert len(data) == 2 and "_.png_fn" in data.lines[0].path.name


def test_root_option_and_inspect_through_the_cli(tmp_path, capsys):
    write_phoenix(tmp_path / "archive")
    index = tmp_path / "elsewhere" / "index.txt"
    index.parent.mkdir()
    index.write_text((tmp_path / "archive" / INDEX_NAME).read_text())
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "rwth_phoenix", f"index={json.dumps(str(index))}",
              f"root={json.dumps(str(tmp_path / 'archive'))}", "size=32", "--num", "3", "--json"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    report = json.loads(out)
    assert report["length"] == 17 - 2 and report["class_names"] == ["1", "3_hook", "b_thumb", "index_flex"]
    first = report["samples"][0]
    assert first["shapes"] == {"image": [3, 32, 32], "label": []}
    assert first["label_name"] == "index_flex"  # the index's first line, kept first in train
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "rwth_phoenix", f"index={json.dumps(str(index))}", "--json"])
    assert exit_.value.code == 2 and "line 1: image" in capsys.readouterr().err
