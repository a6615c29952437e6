"""NaN and infinite keypoints or poses in a file are refused by every dataset that reads them, through
the one check in bad_data (same wording everywhere), under the dataset's on_error policy."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from handforge.errors import DataError

from test_freihand import dot_image, keypoint_file, spread_keypoints, write_freihand
from test_hagrid import V1_TREE, edit_entry, make, write_hagrid
from test_image_folder import build, flat, normalized

NOT_FINITE = r"(NaN|inf|-inf) at .*, not a finite number"
NON_FINITE = "non-finite keypoints"  # the kind skipped samples are counted under


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_check_finds_the_first_non_finite_number_and_names_its_place(bad):
    from handforge.plugins.datasets.bad_data import BadData, check_finite, non_finite

    values = np.arange(21 * 3, dtype=np.float64).reshape(21, 3)
    assert non_finite(values) is None and check_finite(values, "f.json")
    values[7, 2] = values[9, 0] = bad
    shown = {"nan": "NaN", "inf": "inf", "-inf": "-inf"}[str(bad)]
    assert non_finite(values, axes=("joint", "value")) == f"{shown} at joint 7, value 2, not a finite number"
    assert non_finite(values) == f"{shown} at [7, 2], not a finite number"
    assert non_finite(values, axes=("joint",)) == f"{shown} at joint 7 [2], not a finite number"
    with pytest.raises(DataError, match=rf"^f\.json: {shown} at \[7, 2\]"):
        check_finite(values, "f.json")
    lenient = BadData("toy", "skip")
    assert not check_finite(values, "f.json", bad=lenient) and dict(lenient.counts) == {NON_FINITE: 1}
    with pytest.raises(DataError, match=r"on_error = \"skip\""):
        check_finite(values, "f.json", bad=BadData("toy", "raise"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_keypoint_json_refuses_nan_as_it_refuses_inf(tmp_path, bad):
    name = dot_image(tmp_path, "plain.png", (50, 40), {})
    keypoints = spread_keypoints({}, corner=(5, 5), step=(2, 2))
    keypoints[2 * 9] = bad  # joint 9's x (json writes NaN and Infinity; Python's reader takes them)
    keypoints[2 * 3] = keypoints[2 * 3 + 1] = None  # a null joint is missing, not an error
    path = keypoint_file(tmp_path, [{"image_path": name, "keypoints": spread_keypoints({}, (5, 5), (2, 2))},
                                    {"image_path": name, "keypoints": keypoints}])
    from handforge.plugins.datasets.keypoint_json import KeypointJson, KeypointJsonConfig

    with pytest.raises(DataError, match=rf"train\.json: entry 1 'keypoints': {'NaN' if bad != bad else 'inf'} "
                                        rf"at joint 9, coordinate 0, not a finite number"):
        KeypointJson(KeypointJsonConfig(train=str(path), size=16))


def test_freihand_names_the_item_with_the_same_words(tmp_path):
    from handforge.plugins.datasets.freihand import prepare_freihand
    from test_freihand import fixture_cameras

    _, _, xyz = fixture_cameras()
    xyz[2, 5, 1] = np.inf
    write_freihand(tmp_path / "root", xyz=xyz)
    with pytest.raises(DataError, match=r"training_xyz\.json: inf at item 2, joint 5, coordinate 1, not a finite number"):
        prepare_freihand(tmp_path / "root", tmp_path / "out")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_hagrid_counts_nan_and_inf_landmarks_as_one_kind(tmp_path, capsys, bad):
    root, ann = write_hagrid(tmp_path, V1_TREE)
    edit_entry(ann, "call", "u1_0", lambda e: e["landmarks"][0][3].__setitem__(1, bad))
    with pytest.raises(DataError, match=rf"call\.json: 'u1_0': hand 0: landmarks hold {NOT_FINITE}"):
        make(root, ann, val_fraction=0.0)
    data = make(root, ann, val_fraction=0.0, on_error="skip")
    assert len(data) == 2 and dict(data.bad.counts) == {NON_FINITE: 1}  # inf was "bad landmarks", NaN "NaN landmarks"
    assert f"(1 {NON_FINITE})" in capsys.readouterr().err


def test_image_folder_refuses_a_nan_even_on_an_invisible_joint(tmp_path, capsys):
    for name in ("a.png", "b.png"):
        flat(tmp_path, name)
    good = normalized({}, 20, 30)
    hidden_nan = [list(p) for p in good]
    hidden_nan[4] = [float("nan"), 0.5, 0]  # invisible, but NaN is no "missing" marker: null is
    hidden_null = [list(p) for p in good]
    hidden_null[4] = [None, None, 0]
    (tmp_path / "keypoints.json").write_text(json.dumps({"a.png": hidden_null, "b.png": hidden_nan}))
    with pytest.raises(DataError, match=r"entry 'b\.png': NaN at joint 4, value 0, not a finite number"):
        build(tmp_path)
    data = build(tmp_path, on_error="skip")
    assert data.files == ["a.png"] and data[0]["keypoints"][4].tolist() == [0, 0, 0]
    assert f"1 {NON_FINITE}" in capsys.readouterr().err


def write_export(folder, keypoints):
    """A minimal `handforge generate` folder: two PNGs and a complete manifest with keypoints."""
    (folder / "a").mkdir(parents=True)
    images = []
    for i, points in enumerate(keypoints):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(folder / "a" / f"{i:06d}.png")
        images.append({"index": i, "file": f"a/{i:06d}.png", "batch": 0, "seed": i, "label": 0, "class_name": "a",
                       "keypoints": points})
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "complete": True, "settings": {},
                                                      "class_names": ["a"], "images": images}))


def test_the_generated_dataset_refuses_a_nan_keypoint_in_its_manifest(tmp_path):
    from handforge.plugins.export.generated_dataset import GeneratedConfig, GeneratedImages

    good = [[0.5, 0.5, 1.0]] * 21
    write_export(tmp_path / "ok", [good, good])
    assert GeneratedImages(GeneratedConfig(path=str(tmp_path / "ok")))[1]["keypoints"].shape == (21, 3)
    bad = [list(p) for p in good]
    bad[6] = [0.5, float("nan"), 1.0]
    write_export(tmp_path / "bad", [good, bad])
    with pytest.raises(DataError, match=r"manifest\.json 'keypoints': NaN at image 1 \[6, 1\], not a finite number"):
        GeneratedImages(GeneratedConfig(path=str(tmp_path / "bad")))


def test_the_cached_dataset_refuses_a_planted_nan(tmp_path):
    from handforge.plugins.datasets.cache import Cached, CachedConfig, prepare_cache

    table = tmp_path / "hands.toml"
    table.write_text('name = "procedural_hands"\nsize = 16\nlength = 6\nseed = 1\n')
    prepare_cache(table, tmp_path / "cache", split="train", batch=6)
    file = tmp_path / "cache" / "train" / "fields.npz"
    with np.load(file) as stored:
        arrays = {k: stored[k] for k in stored.files}
    field = next(k for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating))
    assert torch.isfinite(Cached(CachedConfig(path=str(tmp_path / "cache")))[0][field]).all()
    arrays[field].reshape(len(arrays[field]), -1)[3, 2] = np.nan
    np.savez(file, **arrays)
    with pytest.raises(DataError, match=rf"fields\.npz '{field}': NaN at sample 3 .*not a finite number"):
        Cached(CachedConfig(path=str(tmp_path / "cache")))


def test_every_message_has_the_same_words():
    """One check: the phrase each dataset's test above matches is the check's own."""
    from handforge.plugins.datasets import bad_data
    from handforge.plugins.datasets.bad_data import non_finite

    assert bad_data.NON_FINITE == NON_FINITE
    assert re.fullmatch(NOT_FINITE, non_finite([1.0, float("-inf")]))


def test_an_evaluate_folder_whose_labels_hold_a_nan_keypoint_is_refused(tmp_path):
    from handforge.plugins.metrics.sources import FolderSource

    good = normalized({}, 8, 8)
    bad = [list(p) for p in good]
    bad[2] = [float("nan"), 0.5, 1]
    for name in ("0.png", "1.png"):
        flat(tmp_path, name, size=(8, 8))
    (tmp_path / "dataset.json").write_text(json.dumps({"class_names": ["a"]}))
    (tmp_path / "labels.json").write_text(json.dumps({"0.png": {"label": 0, "keypoints": good},
                                                      "1.png": {"label": 0, "keypoints": bad}}))
    with pytest.raises(DataError, match=r"labels\.json 'keypoints': NaN at image 1, joint 2, value 0, not a finite number"):
        FolderSource(tmp_path)
