"""The `hagrid` dataset on small HaGRID v1 / v2 trees written here in the native layout."""
import json
import pathlib
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_freihand import DOT_COLOURS, cli, dot_centre

from handforge.data import check_sample
from handforge.errors import DataError
from handforge.plugins.datasets.bad_data import read_rgb_reduced
from handforge.plugins.datasets.hagrid import (V1_CLASSES, V2_CLASSES, Hagrid, HagridConfig, reduction_for_crop,
                                              split_users)

W, H = 160, 120  # not square: x is normalized by W, y by H


def grid_points(box) -> np.ndarray:
    """21 landmarks (pixels, continuous) at pixel centres on a grid inside ``box`` = (x, y, w, h)."""
    x, y, w, h = box
    return np.array([[x + 2 + (w - 5) * (j % 5) // 4 + 0.5, y + 2 + (h - 5) * (j // 5) // 4 + 0.5]
                     for j in range(21)])


def hand(label, box, landmarks=True) -> dict:
    return {"label": label, "box": box, "points": grid_points(box) if landmarks else None}


def write_hagrid(folder: pathlib.Path, images: dict, version="v1", leading="right", ann_name="ann"):
    """``images``: {gesture: {key: (user, [hand, ...])}} -> (images root, annotations folder).

    Each image is a grey JPEG with a 3x3 dot of one primary colour on landmarks 0, 8 and 20 of
    each hand that has landmarks (4:4:4, quality 100, so the colours survive the compression)."""
    root, ann = folder / "images", folder / ann_name
    ann.mkdir(parents=True, exist_ok=True)
    for gesture, entries in images.items():
        (root / gesture).mkdir(parents=True, exist_ok=True)
        data = {}
        for key, (user, hands) in entries.items():
            pixels = np.full((H, W, 3), 90, dtype=np.uint8)
            for h in hands:
                for joint, colour in DOT_COLOURS.items():
                    if h["points"] is not None:
                        col, row = np.floor(h["points"][joint]).astype(int)
                        pixels[row - 1:row + 2, col - 1:col + 2] = colour
            Image.fromarray(pixels).save(root / gesture / f"{key}.jpg", quality=100, subsampling=0)
            x = [[h["box"][0] / W, h["box"][1] / H, h["box"][2] / W, h["box"][3] / H] for h in hands]
            marks = [[] if h["points"] is None else (h["points"] / (W, H)).tolist() for h in hands]
            entry = {"bboxes": x, "labels": [h["label"] for h in hands], "user_id": user}
            if version == "v1":
                entry.update(landmarks=marks, leading_hand=leading, leading_conf=1.0)
            else:
                entry.update(hand_landmarks=marks, united_bbox=None, united_label=None,
                             meta={"age": [30.0], "gender": ["female"], "race": ["White"]})
            data[key] = entry
        (ann / f"{gesture}.json").write_text(json.dumps(data))
    return root, ann


def make(root, ann, split="train", **options) -> Hagrid:
    return Hagrid(HagridConfig(root=str(root), annotations=str(ann), **options), split=split)


A, B, C = (20, 30, 40, 36), (100, 40, 30, 44), (60, 10, 24, 20)

V1_TREE = {  # two users; each gesture image also shows the free hand (no_gesture)
    "call": {"u1_0": ("u1", [hand("call", A), hand("no_gesture", B, landmarks=False)]),
             "u2_0": ("u2", [hand("call", B)])},
    "fist": {"u1_1": ("u1", [hand("no_gesture", C), hand("fist", A)])},
}


# -- labels, fields, handedness --------------------------------------------------------------------


def test_v1_samples_labels_keypoints_and_handedness(tmp_path):
    root, ann = write_hagrid(tmp_path, V1_TREE, leading="left")
    data = make(root, ann, version="v1", no_gesture="keep", val_fraction=0.0, size=32)
    assert data.class_names == list(V1_CLASSES) + ["no_gesture"] and len(V1_CLASSES) == 18
    assert data.version == "v1" and data.image_size == 32 and len(data) == 5
    samples = [data[i] for i in range(len(data))]
    for i, sample in enumerate(samples):
        check_sample(sample, where=f"sample {i}")
        assert set(sample) == {"image", "label", "keypoints", "handedness"}
    names = [data.class_names[s["label"]] for s in samples]
    assert names == ["call", "no_gesture", "call", "no_gesture", "fist"]
    # leading_hand "left" (0) is the gesture hand; the free hand is the other one, as in the official code.
    assert [int(s["handedness"]) for s in samples] == [0, 1, 0, 1, 0]
    no_marks = samples[1]["keypoints"]
    assert torch.equal(no_marks, torch.zeros(21, 3))
    assert all(torch.all(s["keypoints"][:, 2] == 1) for i, s in enumerate(samples) if i != 1)


def test_v1_classes_are_the_procedural_hagrid_classes():
    # The same ids for synthetic and real hands: a classifier trained on one is scored on the other.
    from handforge.plugins.datasets.procedural_hands.handshapes import ClassSet

    assert list(ClassSet("hagrid").names) == list(V1_CLASSES)
    assert list(V2_CLASSES) == sorted(V2_CLASSES) and set(V1_CLASSES) < set(V2_CLASSES)


def test_v2_is_detected_and_has_no_handedness(tmp_path):
    tree = {"hand_heart": {"k0": ("u1", [hand("hand_heart", A), hand("hand_heart", B)])},
            "palm": {"k1": ("u2", [hand("palm", C)])}}
    root, ann = write_hagrid(tmp_path, tree, version="v2")
    data = make(root, ann, val_fraction=0.0, size=24)
    assert data.version == "v2" and data.class_names == list(V2_CLASSES) and len(V2_CLASSES) == 33
    assert len(data) == 3  # both hands of the two-handed gesture
    sample = data[0]
    assert set(sample) == {"image", "label", "keypoints"}
    assert [data.class_names[data[i]["label"]] for i in range(3)] == ["hand_heart", "hand_heart", "palm"]


def test_provides_follows_the_version_option():
    from handforge.plugin_manager import get_host

    entry = get_host().registries["dataset"].get("hagrid")
    assert entry.fields_provided(HagridConfig(root="r", annotations="a", version="v1")) == {
        "image", "label", "keypoints", "handedness"}
    assert entry.fields_provided(HagridConfig(root="r", annotations="a")) == {"image", "label", "keypoints"}


def test_version_clashes_are_errors(tmp_path):
    root, ann = write_hagrid(tmp_path, V1_TREE)
    with pytest.raises(DataError, match=r"call\.json: has 'landmarks', a HaGRID v1 field, but version = \"v2\""):
        make(root, ann, version="v2")
    write_hagrid(tmp_path, {"palm": {"k9": ("u3", [hand("palm", A)])}}, version="v2")
    with pytest.raises(DataError, match=r"the annotations mix v1 and v2: .*call\.json has 'landmarks', "
                                        r".*palm\.json has 'hand_landmarks'"):
        make(root, ann)


# -- crops and keypoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_dot_at_a_landmark_lands_on_the_crop_keypoint(tmp_path, version):
    box = (50, 34, 40, 36)
    gesture = "like"
    root, ann = write_hagrid(tmp_path, {gesture: {"k": ("u", [hand(gesture, box)])}}, version=version)
    size, scale = 96, 1.5
    sample = make(root, ann, val_fraction=0.0, size=size, scale=scale)[0]
    kp = sample["keypoints"].numpy()
    # Independent of the dataset: the square of side scale * longer box side, centred on the box.
    side = scale * max(box[2], box[3])
    left, top = box[0] + box[2] / 2 - side / 2, box[1] + box[3] / 2 - side / 2
    expected = (grid_points(box) - (left, top)) / side
    np.testing.assert_allclose(kp[:, :2], expected, atol=1e-5)
    # Measured error <= 0.02 output px; the other pixel convention (half a source pixel) would be 0.8.
    for channel, joint in enumerate(DOT_COLOURS):
        np.testing.assert_allclose(dot_centre(sample["image"], channel), kp[joint, :2], atol=0.15 / size)


@pytest.mark.parametrize("pad", ["black", "edge"])
def test_a_box_at_the_corner_is_padded_and_keypoints_follow(tmp_path, pad):
    box = (2, 2, 30, 28)  # the 1.5x square leaves the image at the top left
    root, ann = write_hagrid(tmp_path, {"ok": {"k": ("u", [hand("ok", box)])}})
    sample = make(root, ann, val_fraction=0.0, size=64, pad=pad)[0]
    for channel, joint in enumerate(DOT_COLOURS):
        np.testing.assert_allclose(dot_centre(sample["image"], channel), sample["keypoints"][joint, :2].numpy(),
                                   atol=0.15 / 64)
    corner = sample["image"][:, :2, :2]
    expected = -1.0 if pad == "black" else 90 / 127.5 - 1
    assert torch.allclose(corner, torch.full_like(corner, expected), atol=0.03)


def test_a_box_partly_outside_is_clipped_before_cropping(tmp_path):
    root, ann = write_hagrid(tmp_path, {"ok": {"k": ("u", [hand("ok", (140, 80, 20, 40))])}})
    entry = json.loads((ann / "ok.json").read_text())
    entry["k"]["bboxes"][0] = [140 / W, 80 / H, 60 / W, 80 / H]  # reaches far past the right and bottom edges
    (ann / "ok.json").write_text(json.dumps(entry))
    kp = make(root, ann, val_fraction=0.0, size=32)[0]["keypoints"].numpy()
    side = 1.5 * 40  # the clipped box is 20 x 40 pixels
    expected = (grid_points((140, 80, 20, 40)) - (150 - side / 2, 100 - side / 2)) / side
    np.testing.assert_allclose(kp[:, :2], expected, atol=1e-5)


def test_a_large_jpeg_is_decoded_reduced_and_the_dots_still_land(tmp_path):
    # About 1600x1200, not a multiple of 8: the reduced image is 201x151, a rounded-up size, and
    # the geometry must follow the exact factor 8, not 1601 / 201.
    width, height, box, size = 1601, 1201, (700, 500, 240, 220), 32
    pixels = np.full((height, width, 3), 90, dtype=np.uint8)
    points = grid_points(box)
    for joint, colour in DOT_COLOURS.items():
        # 25x25 stored pixels (3 at 1/8 scale): big enough to survive two shrinks; centroid = the point.
        col, row = np.floor(points[joint]).astype(int)
        pixels[row - 12:row + 13, col - 12:col + 13] = colour
    (tmp_path / "images" / "ok").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "images" / "ok" / "k.jpg", quality=95, subsampling=0)
    (tmp_path / "ann").mkdir()
    entry = {"bboxes": [[box[0] / width, box[1] / height, box[2] / width, box[3] / height]], "labels": ["ok"],
             "user_id": "u", "landmarks": [(points / (width, height)).tolist()], "leading_hand": "right"}
    (tmp_path / "ann" / "ok.json").write_text(json.dumps({"k": entry}))
    data = make(tmp_path / "images", tmp_path / "ann", val_fraction=0.0, size=size)
    image, factor, stored = data.decode(0)
    # The 360-pixel crop is 45 pixels at 1/8 scale, still at least 32.
    assert (factor, image.size, stored) == (8.0, (201, 151), (width, height))
    sample = data[0]
    side = 1.5 * 240
    expected = (points - (820 - side / 2, 610 - side / 2)) / side
    np.testing.assert_allclose(sample["keypoints"][:, :2].numpy(), expected, atol=1e-5)
    # Measured error <= 0.03 output px; a geometry off by the rounding (1601 / 201) would be ~0.4 px.
    for channel, joint in enumerate(DOT_COLOURS):
        np.testing.assert_allclose(dot_centre(sample["image"], channel), expected[joint], atol=0.15 / size)


def test_the_reduction_keeps_the_crop_at_least_the_output_size(tmp_path):
    assert [reduction_for_crop(side, 32) for side in (31, 63, 64, 128, 255, 256, 5000)] == [1, 1, 2, 4, 4, 8, 8]
    # Only JPEGs shrink while decoding: a PNG (whatever its name) decodes whole.
    path = tmp_path / "really_a.png"
    Image.fromarray(np.full((120, 160, 3), 7, dtype=np.uint8)).save(path, format="PNG")
    image, factor = read_rgb_reduced(str(path), lambda w, h: 8)
    assert (image.size, factor) == ((160, 120), 1.0)


# -- splits and filters ----------------------------------------------------------------------------


def many_users(n_users=6):
    return {"peace": {f"u{u}_{k}": (f"u{u}", [hand("peace", A), hand("no_gesture", B, landmarks=(k == 0))])
                      for u in range(n_users) for k in range(2)}}


def users_of(data: Hagrid) -> set:
    return {pathlib.Path(p).stem.split("_")[0] for p in data.images}


def test_the_split_is_by_user_and_seeded(tmp_path):
    root, ann = write_hagrid(tmp_path, many_users())
    train, val = make(root, ann, val_fraction=0.34, seed=3), make(root, ann, "val", val_fraction=0.34, seed=3)
    assert not users_of(train) & users_of(val) and len(users_of(val)) == 2
    assert users_of(train) | users_of(val) == {f"u{u}" for u in range(6)}
    assert len(train) + len(val) == 12  # no_gesture dropped: one hand per image
    assert users_of(make(root, ann, "val", val_fraction=0.34, seed=3)) == users_of(val)
    assert len({frozenset(split_users([f"u{u}" for u in range(6)], 0.34, s)) for s in range(8)}) > 1
    # Options that drop hands do not move users between splits.
    kept = make(root, ann, "val", val_fraction=0.34, seed=3, no_gesture="keep", landmarks_only=True)
    assert users_of(kept) == users_of(val)


def test_v2_train_and_val_sub_folders_are_the_official_split(tmp_path):
    write_hagrid(tmp_path, {"grip": {"a": ("u1", [hand("grip", A)])}}, version="v2", ann_name="annotations/train")
    root, _ = write_hagrid(tmp_path, {"grip": {"b": ("u2", [hand("grip", B)]), "c": ("u2", [hand("grip", C)])}},
                           version="v2", ann_name="annotations/val")
    ann = tmp_path / "annotations"
    assert len(make(root, ann)) == 1 and len(make(root, ann, "val", val_fraction=0.5)) == 2


def test_no_gesture_landmarks_only_and_classes(tmp_path):
    root, ann = write_hagrid(tmp_path, many_users(2))
    dropped = make(root, ann, val_fraction=0.0)
    kept = make(root, ann, val_fraction=0.0, no_gesture="keep")
    assert len(dropped) == 4 and "no_gesture" not in dropped.class_names
    assert len(kept) == 8 and kept.class_names[-1] == "no_gesture"
    assert sorted(int(kept[i]["label"]) for i in range(8)) == [9] * 4 + [18] * 4  # peace is v1 class 9 (sorted names)
    posed = make(root, ann, val_fraction=0.0, no_gesture="keep", landmarks_only=True)
    assert len(posed) == 6 and all(torch.all(posed[i]["keypoints"][:, 2] == 1) for i in range(6))
    chosen = make(root, ann, val_fraction=0.0, classes=["peace", "call"], no_gesture="keep")
    assert chosen.class_names == ["peace", "call", "no_gesture"] and int(chosen[0]["label"]) == 0
    with pytest.raises(DataError, match=r"no samples in split 'train'"):
        make(root, ann, val_fraction=0.0, classes=["call"])
    with pytest.raises(DataError, match=r"classes \['grip'\] are not HaGRID v1 gestures; they are: call, dislike"):
        make(root, ann, classes=["grip"])


# -- bad data --------------------------------------------------------------------------------------


def edit_entry(ann: pathlib.Path, gesture: str, key: str, change):
    path = ann / f"{gesture}.json"
    data = json.loads(path.read_text())
    change(data[key])
    path.write_text(json.dumps(data))  # json writes NaN as NaN, which Python's reader takes back


BAD_ENTRIES = [
    ("box outside the image", r"hand 0: box \[1\.2, 0\.1, 0\.1, 0\.1\] lies outside the image",
     lambda e: e["bboxes"].__setitem__(0, [1.2, 0.1, 0.1, 0.1])),
    ("non-finite keypoints", r"hand 0: landmarks hold NaN at joint 3, coordinate 0, not a finite number",
     lambda e: e["landmarks"][0][3].__setitem__(0, float("nan"))),
    ("bad landmarks", r"hand 0: landmarks expected 21 \[x, y\] pairs, got shape \(20, 2\)",
     lambda e: e["landmarks"][0].pop()),
    ("malformed annotation", r"no 'user_id'", lambda e: e.pop("user_id")),
    ("unknown label", r"hand 0: unknown label 'wave' for HaGRID v1", lambda e: e["labels"].__setitem__(0, "wave")),
]


@pytest.mark.parametrize("kind, message, change", BAD_ENTRIES, ids=[b[0] for b in BAD_ENTRIES])
def test_bad_entries_raise_naming_the_file_or_are_skipped_and_counted(capsys, tmp_path, kind, message, change):
    root, ann = write_hagrid(tmp_path, V1_TREE)
    edit_entry(ann, "call", "u1_0", change)
    with pytest.raises(DataError, match=rf"call\.json: 'u1_0': {message}.*on_error = \"skip\""):
        make(root, ann, val_fraction=0.0)
    data = make(root, ann, val_fraction=0.0, on_error="skip")
    assert len(data) == 2 and dict(data.bad.counts) == {kind: 1}
    assert f"hagrid (train): skipped 1 of 3 samples (1 {kind})" in capsys.readouterr().err


def test_a_missing_image(capsys, tmp_path):
    root, ann = write_hagrid(tmp_path, V1_TREE)
    (root / "fist" / "u1_1.jpg").unlink()
    with pytest.raises(DataError, match=r"fist\.json: 'u1_1': image .*fist/u1_1\.jpg not found"):
        make(root, ann, val_fraction=0.0)
    data = make(root, ann, val_fraction=0.0, on_error="skip")
    assert len(data) == 2 and dict(data.bad.counts) == {"missing image": 1}
    assert "skipped 1 of 3 samples (1 missing image)" in capsys.readouterr().err


def test_a_corrupt_image_is_found_when_read(tmp_path):
    root, ann = write_hagrid(tmp_path, V1_TREE)
    path = root / "call" / "u2_0.jpg"
    path.write_bytes(path.read_bytes()[:300])  # truncated
    data = make(root, ann, val_fraction=0.0)
    with pytest.raises(DataError, match=r"call/u2_0\.jpg: cannot decode the image"):
        data[1]
    data = make(root, ann, val_fraction=0.0, on_error="skip")
    assert torch.equal(data[1]["image"], data[2]["image"])  # replaced by the next readable sample
    assert dict(data.bad.counts) == {"unreadable image": 1}
    assert re.search(r"skipped 1 samples? \(1 unreadable image\); first: .*u2_0\.jpg", data.bad.summary())


def test_truncated_json_always_stops_naming_the_file(tmp_path):
    root, ann = write_hagrid(tmp_path, V1_TREE)
    text = (ann / "fist.json").read_text()
    (ann / "fist.json").write_text(text[: len(text) // 2])
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=r"fist\.json: not valid JSON .*truncated download"):
            make(root, ann, on_error=on_error)
    (ann / "fist.json").write_text("[]")
    with pytest.raises(DataError, match=r"fist\.json: expected an object \{image_key"):
        make(root, ann)


def test_missing_folders_are_named(tmp_path):
    root, ann = write_hagrid(tmp_path, V1_TREE)
    with pytest.raises(DataError, match=r"nowhere: hagrid annotations folder not found"):
        make(root, tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"gone: hagrid images root not found"):
        make(tmp_path / "gone", ann)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: holds no <gesture>\.json annotation files"):
        make(root, tmp_path / "empty")


# -- the command line ------------------------------------------------------------------------------


def test_inspect_hagrid_json(capsys, tmp_path):
    root, ann = write_hagrid(tmp_path, V1_TREE)
    code, stdout, err = cli(capsys, "inspect", "hagrid", f"root={json.dumps(str(root))}",
                            f"annotations={json.dumps(str(ann))}", 'version="v1"', "val_fraction=0.0", "size=32",
                            "--num", 3, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["length"] == 3 and report["class_names"] == list(V1_CLASSES)
    first = report["samples"][0]
    assert first["shapes"] == {"image": [3, 32, 32], "label": [], "keypoints": [21, 3], "handedness": []}
    assert [s["label_name"] for s in report["samples"]] == ["call", "call", "fist"]
    assert first["handedness"] == 1  # leading_hand "right"
    side = 1.5 * 40
    expected = (grid_points(A) - (40 - side / 2, 48 - side / 2)) / side
    np.testing.assert_allclose(np.reshape(first["keypoints"], (21, 3))[:, :2], expected, atol=1e-4)
