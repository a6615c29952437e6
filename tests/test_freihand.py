"""`handforge prepare freihand` on a tiny FreiHAND-layout tree, and the `keypoint_json` dataset."""
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from handforge.errors import DataError, HandforgeError
from handforge.plugins.datasets.freihand import prepare_freihand
from handforge.plugins.datasets.keypoint_json import KeypointJson, KeypointJsonConfig
from conftest import cli_exit

N_IDS, SIDE = 6, 224


cli = cli_exit  # handforge ARGS in this process: (exit code, stdout, stderr)


def fixture_cameras(n_ids: int = N_IDS, seed: int = 0):
    """Per id: K, the 2D keypoints chosen first (pixels), and xyz = z * K^-1 [u, v, 1] that project onto them."""
    rng = np.random.default_rng(seed)
    K = np.zeros((n_ids, 3, 3))
    K[:, 0, 0], K[:, 1, 1] = rng.uniform(400, 600, n_ids), rng.uniform(400, 600, n_ids)
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = rng.uniform(100, 124, n_ids), rng.uniform(100, 124, n_ids), 1.0
    uv = rng.uniform(5, SIDE - 5, (n_ids, 21, 2))
    z = rng.uniform(0.3, 0.9, (n_ids, 21, 1))
    rays = np.einsum("nij,nkj->nki", np.linalg.inv(K), np.concatenate([uv, np.ones((n_ids, 21, 1))], axis=2))
    return K, uv, rays * z


def write_freihand(root: pathlib.Path, versions=(0, 1), n_ids: int = N_IDS, K=None, xyz=None, skip=()):
    """A FreiHAND v2 tree: training_K.json, training_xyz.json and small JPEGs for ``versions``."""
    K_default, uv, xyz_default = fixture_cameras(n_ids)
    K = K_default if K is None else K
    xyz = xyz_default if xyz is None else xyz
    (root / "training/rgb").mkdir(parents=True, exist_ok=True)
    as_json = lambda value: json.dumps(value.tolist() if isinstance(value, np.ndarray) else value)  # noqa: E731
    (root / "training_K.json").write_text(as_json(K))
    (root / "training_xyz.json").write_text(as_json(xyz))
    for v in versions:
        for i in range(n_ids):
            index = i + n_ids * v
            if index not in skip:
                shade = (40 * v + 10 * i) % 256
                Image.new("RGB", (SIDE, SIDE), (shade, 100, 200)).save(root / f"training/rgb/{index:08d}.jpg")
    return uv


def read_split(out: pathlib.Path, split: str) -> list:
    return json.loads((out / f"{split}.json").read_text())


def image_index(entry: dict) -> int:
    return int(pathlib.Path(entry["image_path"]).stem)


# -- prepare freihand -------------------------------------------------------------------------------


def test_projection_matches_the_chosen_keypoints_and_the_split_is_by_id(capsys, tmp_path):
    root, out = tmp_path / "FreiHAND", tmp_path / "prepared"
    uv = write_freihand(root)
    code, stdout, err = cli(capsys, "prepare", "freihand", root, "--out", out, "--val-fraction", 0.34, "--seed", 3)
    assert code == 0, err
    train, val = read_split(out, "train"), read_split(out, "val")
    assert len(train) + len(val) == 2 * N_IDS
    for entry in train + val:
        index = image_index(entry)
        path = pathlib.Path(entry["image_path"])
        assert path.is_absolute() and path.is_file() and path == root.resolve() / f"training/rgb/{index:08d}.jpg"
        assert entry["source"] == "FreiHAND" and len(entry["keypoints"]) == 42
        np.testing.assert_allclose(np.reshape(entry["keypoints"], (21, 2)), uv[index % N_IDS], atol=1e-4)
    # Both versions of an id land in the same split; round(0.34 * 6) = 2 ids are val.
    train_ids = {image_index(e) % N_IDS for e in train}
    val_ids = {image_index(e) % N_IDS for e in val}
    assert not train_ids & val_ids and len(val_ids) == 2 and len(train_ids) == N_IDS - 2
    assert sorted(image_index(e) for e in val) == sorted(i + N_IDS * v for i in val_ids for v in (0, 1))
    report = json.loads((out / "prepare.json").read_text())
    assert report["train"] == {"ids": 4, "images": 8} and report["val"] == {"ids": 2, "images": 4}
    assert report["seed"] == 3 and report["val_fraction"] == 0.34 and report["root"] == str(root.resolve())
    assert report["versions"]["0"] == {"found": N_IDS, "used": True}
    assert report["versions"]["3"] == {"found": 0, "used": False}
    # Absent versions are reported, not an error: users often have version 0 only.
    assert f"version 1: {N_IDS} of {N_IDS} images found, used" in stdout
    assert f"version 2: 0 of {N_IDS} images found, skipped" in stdout


def test_the_split_depends_on_the_seed_alone(tmp_path):
    root = tmp_path / "root"
    write_freihand(root, versions=(0,))

    def val_ids(seed, out):
        prepare_freihand(root, tmp_path / out, val_fraction=0.5, seed=seed)
        return frozenset(image_index(e) for e in read_split(tmp_path / out, "val"))

    assert val_ids(0, "a") == val_ids(0, "b")
    assert len({val_ids(seed, f"s{seed}") for seed in range(6)}) > 1
    assert prepare_freihand(root, tmp_path / "none", val_fraction=0.0)["val"] == {"ids": 0, "images": 0}


def test_missing_images_are_an_error_unless_allowed(tmp_path):
    root = tmp_path / "root"
    write_freihand(root, versions=(0, 1, 3), skip={N_IDS + 2, N_IDS + 4, 3 * N_IDS + 5})
    with pytest.raises(DataError, match=rf"rgb/{N_IDS + 2:08d}\.jpg: missing; 3 of the {3 * N_IDS} images of the "
                                        rf"versions present \(0, 1, 3\) are missing"):
        prepare_freihand(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the check
    report = prepare_freihand(root, tmp_path / "out", allow_missing=True, val_fraction=0.0)
    assert report["skipped_missing"] == 3 and report["train"]["images"] == 3 * N_IDS - 3
    written = {image_index(e) for e in read_split(tmp_path / "out", "train")}
    assert written == set(range(2 * N_IDS)) - {N_IDS + 2, N_IDS + 4} | set(range(3 * N_IDS, 4 * N_IDS)) - {3 * N_IDS + 5}


def test_no_images_at_all(tmp_path):
    write_freihand(tmp_path, versions=())
    with pytest.raises(DataError, match=r"training/rgb: none of the 24 images 00000000\.jpg \.\. 00000023\.jpg"):
        prepare_freihand(tmp_path, tmp_path / "out")


def _with_file(tmp_path, name: str, content: str):
    write_freihand(tmp_path, versions=(0,))
    (tmp_path / name).write_text(content)


@pytest.mark.parametrize("name, content, message", [
    ("training_K.json", "[[1, 2", r"training_K\.json: not valid JSON"),
    ("training_K.json", "{}", r"training_K\.json: expected a non-empty list of 3x3 intrinsic matrices, got dict"),
    ("training_xyz.json", "[]", r"training_xyz\.json: expected a non-empty list .* \(empty\)"),
])
def test_malformed_json_names_the_file(tmp_path, name, content, message):
    _with_file(tmp_path, name, content)
    with pytest.raises(DataError, match=message):
        prepare_freihand(tmp_path, tmp_path / "out")


def test_missing_annotation_file(tmp_path):
    write_freihand(tmp_path, versions=(0,))
    (tmp_path / "training_xyz.json").unlink()
    with pytest.raises(DataError, match=r"training_xyz\.json: not found"):
        prepare_freihand(tmp_path, tmp_path / "out")
    with pytest.raises(DataError, match=r"nowhere: FreiHAND root folder not found"):
        prepare_freihand(tmp_path / "nowhere", tmp_path / "out")


def test_bad_annotations_name_the_file_and_the_item(tmp_path):
    K, _, xyz = fixture_cameras()
    cases = []
    cases.append(({"xyz": xyz[:-1]}, r"training_K\.json has 6 matrices but .*training_xyz\.json has 5 joint lists"))
    ragged = xyz.tolist()
    ragged[4] = ragged[4][:20]
    cases.append(({"xyz": ragged}, r"training_xyz\.json: item 4 has shape \(20, 3\), expected \(21, 3\)"))
    flat = K.tolist()
    flat[2] = [1, 2, 3]
    cases.append(({"K": flat}, r"training_K\.json: item 2 has shape \(3,\), expected \(3, 3\)"))
    behind = xyz.copy()
    behind[3, 7, 2] = -0.2
    cases.append(({"xyz": behind}, r"training_xyz\.json: item 3 joint 7 has z = -0\.2 <= 0"))
    nan = xyz.tolist()
    nan[1][0][0] = None
    cases.append(({"xyz": nan}, r"training_xyz\.json: NaN at item 1, joint 0, coordinate 0, not a finite number"))
    cases.append(({"K": np.swapaxes(K, 1, 2)}, r"training_K\.json: item 0 is not an intrinsic matrix"))
    for n, (files, message) in enumerate(cases):
        root = tmp_path / f"case{n}"
        write_freihand(root, versions=(0,), K=files.get("K"), xyz=files.get("xyz"))
        with pytest.raises(DataError, match=message):
            prepare_freihand(root, root / "out")


def test_output_folder_and_options_are_checked(capsys, tmp_path):
    write_freihand(tmp_path / "root", versions=(0,))
    prepare_freihand(tmp_path / "root", tmp_path / "out")
    code, _, err = cli(capsys, "prepare", "freihand", tmp_path / "root", "--out", tmp_path / "out")
    assert code == 2 and "already holds train.json, val.json, prepare.json" in err and "--overwrite" in err
    code, _, err = cli(capsys, "prepare", "freihand", tmp_path / "root", "--out", tmp_path / "out", "--overwrite")
    assert code == 0, err
    with pytest.raises(HandforgeError, match=r"--val-fraction must be in \[0, 1\), got 1.0"):
        prepare_freihand(tmp_path / "root", tmp_path / "other", val_fraction=1.0)


# -- keypoint_json ----------------------------------------------------------------------------------

DOT_COLOURS = {0: (255, 0, 0), 8: (0, 255, 0), 20: (0, 0, 255)}  # one channel per traced joint


def dot_image(folder: pathlib.Path, name: str, size: tuple, pixels: dict, background=(0, 0, 0)) -> str:
    """A PNG with a 3x3 dot of one primary colour centred on each given pixel (column, row)."""
    image = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(background, dtype=np.uint8)
    for joint, (col, row) in pixels.items():
        image[row - 1:row + 2, col - 1:col + 2] = DOT_COLOURS[joint]
    Image.fromarray(image).save(folder / name)
    return name


def dot_centre(image: torch.Tensor, channel: int) -> np.ndarray:
    """Normalized (x, y) of the centroid of one channel's dot: pixel j covers [j, j + 1] / side."""
    others = torch.cat([image[:channel], image[channel + 1:]]).amax(dim=0)
    # How much purer this primary is than grey (0 on any grey background), minus bicubic ringing.
    weights = ((image[channel] - others) / 2 - 0.1).clamp(min=0).numpy()
    rows, cols = np.indices(weights.shape)
    total = weights.sum()
    assert total > 0, "the dot vanished"
    return np.array([((cols + 0.5) * weights).sum() / total / weights.shape[1],
                     ((rows + 0.5) * weights).sum() / total / weights.shape[0]])


def keypoint_file(folder: pathlib.Path, entries: list, name: str = "train.json") -> pathlib.Path:
    path = folder / name
    path.write_text(json.dumps(entries))
    return path


def spread_keypoints(dots: dict, corner=(60, 50), step=(9, 7)) -> list:
    """21 pixel keypoints on a grid from ``corner``, the ``dots`` joints at their dot's pixel centre."""
    points = [[corner[0] + step[0] * (j % 5), corner[1] + step[1] * (j // 5)] for j in range(21)]
    for joint, (col, row) in dots.items():
        points[joint] = [col + 0.5, row + 0.5]  # continuous coordinates: pixel col spans [col, col + 1]
    return [c for p in points for c in p]


def test_samples_follow_the_contract_and_keypoints_normalize(tmp_path):
    root, out = tmp_path / "root", tmp_path / "prepared"
    uv = write_freihand(root, versions=(0,))
    prepare_freihand(root, out, val_fraction=0.34)
    for split in ("train", "val"):
        data = KeypointJson(KeypointJsonConfig(train=str(out / "train.json"), val=str(out / "val.json"), size=64),
                            split=split)
        entries = read_split(out, split)
        assert len(data) == len(entries) and data.class_names == []
        sample = data[len(data) - 1]
        assert set(sample) == {"image", "keypoints"}
        assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
        assert -1 <= sample["image"].min() and sample["image"].max() <= 1
        kp = sample["keypoints"]
        assert kp.shape == (21, 3) and kp.dtype == torch.float32 and torch.all(kp[:, 2] == 1)
        np.testing.assert_allclose(kp[:, :2].numpy(), uv[image_index(entries[-1])] / SIDE, atol=1e-5)
    limited = KeypointJson(KeypointJsonConfig(train=str(out / "train.json"), limit=2))
    assert len(limited) == 2 and limited[0]["image"].shape == (3, 128, 128)


def test_a_dot_at_a_keypoint_lands_on_the_normalized_keypoint(tmp_path):
    dots = {0: (40, 150), 8: (170, 30), 20: (101, 203)}
    name = dot_image(tmp_path, "dots.png", (224, 224), dots)
    path = keypoint_file(tmp_path, [{"image_path": name, "keypoints": spread_keypoints(dots)}])
    sample = KeypointJson(KeypointJsonConfig(train=str(path), size=96))[0]
    # Measured error <= 0.03 output px; half a source pixel (the other pixel convention) would be 0.21.
    tolerance = 0.08 / 96
    for channel, joint in enumerate(DOT_COLOURS):
        found = dot_centre(sample["image"], channel)
        np.testing.assert_allclose(found, sample["keypoints"][joint, :2].numpy(), atol=tolerance)
        np.testing.assert_allclose(found, (np.array(dots[joint]) + 0.5) / 224, atol=tolerance)


@pytest.mark.parametrize("pad", ["black", "edge"])
def test_a_keypoint_crop_moves_keypoints_with_the_pixels_and_pads(tmp_path, pad):
    # Keypoints near the top-left corner of a wide image: the enlarged square leaves the image.
    dots = {0: (4, 6), 8: (40, 30), 20: (20, 44)}
    name = dot_image(tmp_path, "corner.png", (160, 100), dots, background=(90, 90, 90))
    keypoints = spread_keypoints(dots, corner=(8, 10), step=(6, 5))
    path = keypoint_file(tmp_path, [{"image_path": name, "keypoints": keypoints}])
    data = KeypointJson(KeypointJsonConfig(train=str(path), size=64, crop="keypoints", margin=1.5, pad=pad))
    sample = data[0]
    kp = sample["keypoints"][:, :2].numpy()
    # The keypoints' box, enlarged 1.5 times, is the square: its longer side spans 1 / 1.5 of it, centred.
    low, high = kp.min(axis=0), kp.max(axis=0)
    assert (high - low).max() == pytest.approx(1 / 1.5, abs=1e-5)
    np.testing.assert_allclose((low + high) / 2, [0.5, 0.5], atol=1e-5)
    for channel, joint in enumerate(DOT_COLOURS):  # measured error <= 0.02 output px
        np.testing.assert_allclose(dot_centre(sample["image"], channel), kp[joint], atol=0.1 / 64)
    corner = sample["image"][:, :3, :3]  # outside the image: padding
    expected = -1.0 if pad == "black" else 90 / 127.5 - 1
    assert torch.allclose(corner, torch.full_like(corner, expected), atol=0.02)


def test_missing_joints_are_invisible(tmp_path):
    name = dot_image(tmp_path, "plain.png", (50, 40), {})
    keypoints = spread_keypoints({}, corner=(5, 5), step=(2, 2))
    keypoints[2 * 3], keypoints[2 * 3 + 1] = None, None  # joint 3: null
    keypoints[2 * 9 + 1] = None  # joint 9: y null
    path = keypoint_file(tmp_path, [{"image_path": name, "keypoints": keypoints}])
    for crop in ("none", "keypoints"):
        kp = KeypointJson(KeypointJsonConfig(train=str(path), size=16, crop=crop))[0]["keypoints"]
        assert kp[3].tolist() == [0, 0, 0] and kp[9].tolist() == [0, 0, 0]
        assert kp[:, 2].sum() == 19  # (a NaN is refused instead: test_non_finite.py)


def test_dataset_errors_name_the_file(tmp_path):
    name = dot_image(tmp_path, "ok.png", (32, 32), {})
    good = spread_keypoints({}, corner=(2, 2), step=(1, 1))

    def build(entries, split="train", **options):
        path = keypoint_file(tmp_path, entries, name="bad.json") if entries is not None else tmp_path / "absent.json"
        return KeypointJson(KeypointJsonConfig(**{split: str(path)}, **options), split=split)

    with pytest.raises(DataError, match=r"absent\.json: keypoint JSON file not found"):
        build(None)
    with pytest.raises(DataError, match=r"bad\.json: entry 1: no 'keypoints'"):
        build([{"image_path": name, "keypoints": good}, {"image_path": name}])
    with pytest.raises(DataError, match=r"bad\.json: entry 0 'keypoints': expected a list of 42 numbers .* got 40"):
        build([{"image_path": name, "keypoints": good[:40]}])
    for wrong in ("1", True, [1.0]):
        with pytest.raises(DataError, match=r"bad\.json: entry 2 'keypoints': holds a value that is neither"):
            build([{"image_path": name, "keypoints": good}] * 2
                  + [{"image_path": name, "keypoints": [wrong] + good[1:]}])
    with pytest.raises(DataError, match=r"bad\.json: entry 0 'keypoints': inf at joint 2, coordinate 1, not a finite number"):
        build([{"image_path": name, "keypoints": good[:5] + [float("inf")] + good[6:]}])
    with pytest.raises(DataError, match=r"bad\.json: entry 1 'image_path': expected a file path, got 3"):
        build([{"image_path": name, "keypoints": good}, {"image_path": 3, "keypoints": good}])
    with pytest.raises(DataError, match=r"bad\.json: entry 0: image .*gone\.png not found"):
        build([{"image_path": "gone.png", "keypoints": good}])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad\.json: entry 0: cannot read the image .*broken\.png"):
        build([{"image_path": "broken.png", "keypoints": good}])
    far = good[:40] + [3000.0, 20.0]
    with pytest.raises(DataError, match=r"bad\.json: entry 0: the keypoints span 2998 px, more than 4 times the 32x32"):
        build([{"image_path": name, "keypoints": far}], crop="keypoints")
    assert build([{"image_path": name, "keypoints": far}])[0]["keypoints"][20, 0] == pytest.approx(3000 / 32)
    with pytest.raises(DataError, match=r"bad\.json: holds no entries"):
        build([])
    with pytest.raises(DataError, match=r"keypoint_json: no val file: set the dataset option val"):
        KeypointJson(KeypointJsonConfig(train="x.json"), split="val")


def test_inspect_loads_a_prepared_freihand(capsys, tmp_path):
    root, out = tmp_path / "root", tmp_path / "prepared"
    uv = write_freihand(root, versions=(0,))
    prepare_freihand(root, out, val_fraction=0.0)
    code, stdout, err = cli(capsys, "inspect", "keypoint_json", f"train={json.dumps(str(out / 'train.json'))}",
                            "size=32", "--num", 2, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["length"] == N_IDS and report["class_names"] == []
    first = report["samples"][0]
    assert first["shapes"] == {"image": [3, 32, 32], "keypoints": [21, 3]}
    np.testing.assert_allclose(np.reshape(first["keypoints"], (21, 3))[:, :2], uv[0] / SIDE, atol=1e-4)


def test_the_shipped_freihand_recipe_trains_on_a_prepared_tree(capsys, tmp_path):
    # The recipe as shipped, pointed at a prepared fixture and shortened (2 steps, 32 px, tiny val).
    from conftest import REPO

    write_freihand(tmp_path / "FreiHAND_pub_v2")
    code, _, err = cli(capsys, "prepare", "freihand", tmp_path / "FreiHAND_pub_v2", "--out", tmp_path / "prepared",
                       "--val-fraction", "0.5")
    assert code == 0, err
    code, _, err = cli(capsys, "run", REPO / "recipes" / "keypoints_freihand.toml", f"output_dir={tmp_path / 'runs'}",
                       f'data.train="{tmp_path / "prepared" / "train.json"}"',
                       f'data.val="{tmp_path / "prepared" / "val.json"}"', "data.size=32", "task.val_samples=4",
                       "task.warmup_steps=1", "train.steps=2", "train.batch_size=4", "eval.every=2",
                       "train.progress=false", "train.tensorboard=false")
    assert code == 0, err
    run = tmp_path / "runs" / "keypoints_freihand"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("type") == "eval"]
    assert [r["step"] for r in evals] == [2] and 0.0 <= evals[0]["pck@0.2bbox"] <= 1.0
    assert (run / "weights" / "regressor.safetensors").is_file()
