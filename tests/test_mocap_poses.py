"""Mocap hand-pose readers (fixtures in each release's on-disk layout) and the hand_poses dataset."""
import io
import json
import pathlib
import pickle

import numpy as np
import pytest
import torch

from handforge.errors import DataError
from handforge.plugins.datasets.hand_poses import HandPoses, HandPosesConfig
from handforge.plugins.datasets.mocap_poses import read_sequence

RNG = np.random.default_rng(0)
N = 7


def poses(n, width):
    return RNG.normal(0, 0.3, size=(n, width)).astype(np.float32)


def save_dict_npy(path, value):
    """What np.save(dict) writes: a 0-d object array (the ARCTIC .mano.npy layout)."""
    array = np.empty((), dtype=object)
    array[()] = value
    np.save(path, array, allow_pickle=True)


def save_object_npz(path, **members):
    """GRAB's layout: each member a 0-d object array holding a nested dict."""
    packed = {}
    for key, value in members.items():
        array = np.empty((), dtype=object)
        array[()] = value
        packed[key] = array
    np.savez(path, **packed)


def test_amass_smplh(tmp_path):
    full = poses(N, 156)
    np.savez(tmp_path / "a_poses.npz", poses=full, mocap_framerate=np.array(120.0), trans=poses(N, 3))
    seq = read_sequence(tmp_path / "a_poses.npz")
    np.testing.assert_array_equal(seq.left, full[:, 66:111])
    np.testing.assert_array_equal(seq.right, full[:, 111:156])
    assert (seq.source, seq.frame_rate, seq.flat_hand_mean) == ("amass_smplh", 120.0, True)


def test_amass_smplx_poses_and_split_keys(tmp_path):
    full = poses(N, 165)
    np.savez(tmp_path / "x.npz", poses=full, mocap_frame_rate=np.array(60.0))
    seq = read_sequence(tmp_path / "x.npz")
    np.testing.assert_array_equal(seq.left, full[:, 75:120])
    np.testing.assert_array_equal(seq.right, full[:, 120:165])
    assert (seq.source, seq.frame_rate) == ("amass_smplx", 60.0)
    hands = poses(N, 90)
    np.savez(tmp_path / "s.npz", pose_hand=hands, root_orient=poses(N, 3), pose_body=poses(N, 63),
             mocap_frame_rate=np.array(30.0))
    seq = read_sequence(tmp_path / "s.npz")
    np.testing.assert_array_equal(seq.left, hands[:, :45])
    np.testing.assert_array_equal(seq.right, hands[:, 45:])


def test_motionx(tmp_path):
    full = poses(N, 322)
    np.save(tmp_path / "m.npy", full)
    seq = read_sequence(tmp_path / "m.npy")
    np.testing.assert_array_equal(seq.left, full[:, 66:111])
    np.testing.assert_array_equal(seq.right, full[:, 111:156])
    assert seq.source == "motionx"


def test_grab_nested_pickled_dicts(tmp_path):
    left, right = poses(N, 45), poses(N, 45)
    save_object_npz(tmp_path / "g.npz", framerate=np.array(120.0),
                    lhand={"params": {"fullpose": left, "hand_pose": poses(N, 24)}},
                    rhand={"params": {"fullpose": right, "hand_pose": poses(N, 24)}},
                    body={"params": {"fullpose": poses(N, 165)}})
    seq = read_sequence(tmp_path / "g.npz")
    np.testing.assert_array_equal(seq.left, left)
    np.testing.assert_array_equal(seq.right, right)
    assert (seq.source, seq.frame_rate, seq.flat_hand_mean) == ("grab", 120.0, True)


@pytest.mark.parametrize("comps", [24, 12])
def test_grab_pca_only_refused(tmp_path, comps):
    save_object_npz(tmp_path / "g.npz", lhand={"params": {"hand_pose": poses(N, comps)}},
                    rhand={"params": {"hand_pose": poses(N, comps)}})
    with pytest.raises(DataError, match=rf"g\.npz 'lhand/params/hand_pose'.*PCA.*{comps} components"):
        read_sequence(tmp_path / "g.npz")


def test_arctic_mano_npy(tmp_path):
    left, right = poses(N, 45), poses(N, 45)
    save_dict_npy(tmp_path / "s01_box.mano.npy",
                  {side: {"rot": poses(N, 3), "pose": p, "trans": poses(N, 3), "shape": poses(10, 1)[:, 0]}
                   for side, p in (("left", left), ("right", right))})
    seq = read_sequence(tmp_path / "s01_box.mano.npy")
    np.testing.assert_array_equal(seq.left, left)
    np.testing.assert_array_equal(seq.right, right)
    assert (seq.source, seq.flat_hand_mean) == ("arctic", False)


class Planted:
    """Unpickling this would write a marker file."""
    marker = None

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "ran"))


def test_planted_object_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    Planted.marker = str(marker)
    save_dict_npy(tmp_path / "evil.mano.npy", {"left": {"pose": Planted()}, "right": {}})
    with pytest.raises(DataError, match=r"evil\.mano\.npy.*pathlib"):
        read_sequence(tmp_path / "evil.mano.npy")
    save_object_npz(tmp_path / "evil.npz", lhand={"params": {"fullpose": Planted()}}, rhand={})
    with pytest.raises(DataError, match=r"evil\.npz.*pathlib"):
        read_sequence(tmp_path / "evil.npz")
    assert not marker.exists()


def test_nan_refused_naming_file_and_key(tmp_path):
    full = poses(N, 156)
    full[3, 70] = np.nan
    np.savez(tmp_path / "bad.npz", poses=full)
    with pytest.raises(DataError, match=r"bad\.npz 'poses'.*NaN"):
        read_sequence(tmp_path / "bad.npz")


def test_unknown_layouts_refused(tmp_path):
    np.savez(tmp_path / "nohands.npz", trans=poses(N, 3))
    with pytest.raises(DataError, match=r"nohands\.npz: no hand poses"):
        read_sequence(tmp_path / "nohands.npz")
    np.savez(tmp_path / "wide.npz", poses=poses(N, 100))
    with pytest.raises(DataError, match=r"wide\.npz 'poses'.*156.*165"):
        read_sequence(tmp_path / "wide.npz")
    np.save(tmp_path / "m.npy", poses(N, 300))
    with pytest.raises(DataError, match=r"m\.npy.*322"):
        read_sequence(tmp_path / "m.npy")


def write_prepared(root, splits):
    for split, n in splits.items():
        folder = root / split
        folder.mkdir(parents=True)
        np.save(folder / "left.npy", poses(n, 45))
        np.save(folder / "right.npy", poses(n, 45) + 1.0)
        np.save(folder / "source.npy", (np.arange(n) % 2).astype(np.int16))
        np.save(folder / "frame.npy", np.arange(n, dtype=np.int32))
    (root / "dataset_metadata.json").write_text(json.dumps({"sources": ["CMU", "GRAB"]}))


def test_hand_poses_dataset_shapes_and_batches(tmp_path):
    write_prepared(tmp_path, {"train": 50, "val": 9})
    data = HandPoses(HandPosesConfig(root=str(tmp_path)), "val")
    assert len(data) == 9
    left, right = np.load(tmp_path / "val/left.npy"), np.load(tmp_path / "val/right.npy")
    sample = data[4]["hand_pose90"]
    assert sample.shape == (90,) and sample.dtype == torch.float32
    np.testing.assert_array_equal(sample.numpy(), np.concatenate([left[4], right[4]]))
    batch = data.batch([8, 0, 3, 3, -1])
    np.testing.assert_array_equal(batch.numpy(), np.concatenate([left, right], 1)[[8, 0, 3, 3, 8]])
    rows = data.__getitems__([2, 1])
    assert [r["hand_pose90"].shape for r in rows] == [(90,), (90,)]
    with pytest.raises(IndexError, match="hand_poses"):
        data.batch([9])


def test_hand_poses_standardized_with_train_statistics(tmp_path):
    write_prepared(tmp_path, {"train": 200, "val": 30})
    train = HandPoses(HandPosesConfig(root=str(tmp_path), standardize=True), "train")
    x = train.batch(np.arange(len(train))).double()
    np.testing.assert_allclose(x.mean(0).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0, unbiased=False).numpy(), 1, atol=1e-4)
    val = HandPoses(HandPosesConfig(root=str(tmp_path), standardize=True), "val")
    raw = np.concatenate([np.load(tmp_path / "train/left.npy"), np.load(tmp_path / "train/right.npy")], 1)
    expected = (np.concatenate([np.load(tmp_path / "val/left.npy"), np.load(tmp_path / "val/right.npy")], 1)
                - raw.mean(0)) / raw.std(0)
    np.testing.assert_allclose(val.batch(np.arange(30)).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_hand_poses_refuses_wrong_layout(tmp_path):
    write_prepared(tmp_path, {"train": 5, "val": 5})
    np.save(tmp_path / "val/left.npy", poses(5, 44))
    with pytest.raises(DataError, match=r"val/left\.npy.*45"):
        HandPoses(HandPosesConfig(root=str(tmp_path)), "val")


def test_prepare_mocap_splits_by_sequence_and_feeds_hand_poses(tmp_path):
    from handforge.plugins.datasets.mocap_poses.prepare import prepare_mocap
    root = tmp_path / "mocap"
    for d in ("CMU", "GRAB"):
        (root / d).mkdir(parents=True)
        for s in range(10):
            full = poses(20, 156)
            full[:, 66] = s  # marks the sequence in every frame
            np.savez(root / d / f"seq{s}_poses.npz", poses=full, mocap_framerate=np.array(120.0))
    meta = prepare_mocap(root, tmp_path / "out", seed=1, total=200)
    assert meta["sources"] == ["CMU", "GRAB"]
    seen = {}
    for split in ("train", "val", "test"):
        left = np.load(tmp_path / "out" / split / "left.npy")
        source = np.load(tmp_path / "out" / split / "source.npy")
        seen[split] = set(zip(source.tolist(), left[:, 0].tolist()))
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"])
    assert sum(c["sequences"] for c in meta["splits"].values()) == 20
    # high (GRAB) 60% of 200 over 10 sequences, low (CMU) the rest of the present shares
    assert meta["splits"]["train"]["frames"] + meta["splits"]["val"]["frames"] + meta["splits"]["test"]["frames"] == 200
    again = prepare_mocap(root, tmp_path / "out2", seed=1, total=200)
    assert again == meta
    np.testing.assert_array_equal(np.load(tmp_path / "out/train/left.npy"), np.load(tmp_path / "out2/train/left.npy"))
    data = HandPoses(HandPosesConfig(root=str(tmp_path / "out")), "train")
    assert data.batch([0]).shape == (1, 90)
