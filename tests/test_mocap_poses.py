"""Mocap hand-pose readers (fixtures in each release's on-disk layout) and the hand_poses dataset."""
import io
import json
import pathlib
import pickle
import re

import numpy as np
import pytest
import torch

from handforge.data import check_sample
from handforge.errors import DataError
from handforge.plugins.datasets.hand_poses import HandPoses, HandPosesConfig
from handforge.pose_standardization import write_standardization
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
    save_object_npz(tmp_path / "g60.npz", framerate=np.array(60.0), lhand={"params": {"fullpose": left}},
                    rhand={"params": {"fullpose": right}})
    assert read_sequence(tmp_path / "g60.npz").frame_rate == 60.0  # the file's rate wins
    save_object_npz(tmp_path / "g_norate.npz", lhand={"params": {"fullpose": left}},
                    rhand={"params": {"fullpose": right}})
    assert read_sequence(tmp_path / "g_norate.npz").frame_rate == 120.0  # GRAB's capture rate


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
    assert (seq.source, seq.flat_hand_mean, seq.frame_rate) == ("arctic", False, 30.0)


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


def write_prepared(root, splits, standardized=True):
    """A prepared folder written by hand (raw arrays), plus prepare's standardized rows when asked."""
    for split, n in splits.items():
        folder = root / split
        folder.mkdir(parents=True)
        np.save(folder / "left.npy", poses(n, 45))
        np.save(folder / "right.npy", poses(n, 45) + 1.0)
        np.save(folder / "source.npy", (np.arange(n) % 2).astype(np.int16))
        np.save(folder / "frame.npy", np.arange(n, dtype=np.int32))
    (root / "dataset_metadata.json").write_text(json.dumps({"sources": ["CMU", "GRAB"]}))
    if standardized:
        write_standardization(root, list(splits))


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
    rows = data.__getitems__([2, 1])  # the sample contract, as one batch
    assert list(rows) == ["hand_pose90"]
    np.testing.assert_array_equal(rows["hand_pose90"].numpy(), np.concatenate([left, right], 1)[[2, 1]])
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


SOURCES = ["CMU", "GRAB", "arctic"]


def write_labelled(root, splits, standardized=True):
    """write_prepared with source and frame values that differ from the row index (so a mix-up shows)."""
    write_prepared(root, splits, standardized)
    for split, n in splits.items():
        np.save(root / split / "source.npy", ((np.arange(n) * 5 + 1) % 3).astype(np.int16))
        np.save(root / split / "frame.npy", (1000 + 37 * np.arange(n) % 101).astype(np.int32))
    (root / "dataset_metadata.json").write_text(json.dumps({"sources": SOURCES}))


def load(root, split):
    return {name: np.load(root / split / f"{name}.npy") for name in ("left", "right", "source", "frame")}


def test_hand_poses_return_dict_raw(tmp_path):
    write_labelled(tmp_path, {"train": 40, "val": 13})
    data = HandPoses(HandPosesConfig(root=str(tmp_path), return_dict=True), "val")
    a, rows = load(tmp_path, "val"), [12, 0, 5, 5, -2]
    wanted = [12, 0, 5, 5, 11]
    batch = data.batch(rows)
    assert set(batch) == {"lhand_pose", "rhand_pose", "x90", "dataset_name", "frame_idx"}  # no mean/std
    np.testing.assert_array_equal(batch["lhand_pose"].numpy(), a["left"][wanted])
    np.testing.assert_array_equal(batch["rhand_pose"].numpy(), a["right"][wanted])
    np.testing.assert_array_equal(batch["x90"].numpy(), np.concatenate([a["left"], a["right"]], 1)[wanted])
    assert batch["dataset_name"] == [SOURCES[int(a["source"][i])] for i in wanted]
    assert batch["frame_idx"].dtype == torch.int64 and batch["frame_idx"].tolist() == a["frame"][wanted].tolist()
    assert {k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)} == {
        "lhand_pose": (5, 45), "rhand_pose": (5, 45), "x90": (5, 90), "frame_idx": (5,)}
    # The option picks batch()'s default; the sample contract stays hand_pose90 either way.
    assert torch.equal(data.batch(rows, return_dict=False), batch["x90"])
    assert set(data[3]) == {"hand_pose90"} and set(data.__getitems__(rows)) == {"hand_pose90"}
    check_sample(data.__getitems__(rows), "hand_poses", batched=True)
    check_sample(data[3], "hand_poses")


def test_hand_poses_return_dict_standardized_with_train_statistics(tmp_path):
    write_labelled(tmp_path, {"train": 200, "val": 10, "test": 7})
    train = load(tmp_path, "train")
    raw_train = np.concatenate([train["left"], train["right"]], 1).astype(np.float64)
    mean, std = raw_train.mean(0).astype(np.float32), raw_train.std(0).astype(np.float32)
    for split in ("train", "val", "test"):
        data = HandPoses(HandPosesConfig(root=str(tmp_path), standardize=True), split)
        a = load(tmp_path, split)
        rows = np.random.default_rng(2).permutation(len(data))
        batch = data.batch(rows, return_dict=True)
        assert set(batch) == {"lhand_pose", "rhand_pose", "x90", "dataset_name", "frame_idx", "mean", "std"}
        np.testing.assert_array_equal(batch["mean"].numpy(), mean)
        np.testing.assert_array_equal(batch["std"].numpy(), std)
        raw = np.concatenate([a["left"], a["right"]], 1)[rows]
        # Bit for bit the float32 (x - mean) / std; the raw halves stay raw.
        np.testing.assert_array_equal(batch["x90"].numpy(), (raw - mean) / std)
        np.testing.assert_array_equal(batch["lhand_pose"].numpy(), a["left"][rows])
        np.testing.assert_array_equal(data.batch(rows).numpy(), (raw - mean) / std)
        np.testing.assert_array_equal(data.__getitems__(rows)["hand_pose90"].numpy(), (raw - mean) / std)
        np.testing.assert_array_equal(data[int(rows[1])]["hand_pose90"].numpy(), ((raw - mean) / std)[1])
        assert batch["dataset_name"] == [SOURCES[int(a["source"][i])] for i in rows]


def test_hand_poses_batch_loader_one_gather_per_batch(tmp_path):
    from handforge.plugins.datasets.hand_poses import batch_loader
    write_prepared(tmp_path, {"train": 50, "val": 9})
    data = HandPoses(HandPosesConfig(root=str(tmp_path), standardize=True), "train")
    everything = data.batch(np.arange(50)).numpy()
    loader = batch_loader(data, batch_size=16, shuffle=True, seed=3)
    epochs = [[b.numpy() for b in loader] for _ in range(2)]
    for batches in epochs:
        assert [len(b) for b in batches] == [16, 16, 16, 2]
        seen = np.concatenate(batches)
        order = [int(np.flatnonzero((everything == row).all(1))[0]) for row in seen]
        assert sorted(order) == list(range(50)) and order != list(range(50))  # each pose once, shuffled
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))  # a new order each epoch
    again = batch_loader(data, batch_size=16, shuffle=True, seed=3)
    np.testing.assert_array_equal(np.concatenate(list(again)), np.concatenate(epochs[0]))  # (seed, epoch) fix it
    plain = list(batch_loader(data, batch_size=16, drop_last=True, return_dict=True))
    assert len(plain) == 3 and plain[1]["frame_idx"].tolist() == list(range(16, 32))
    np.testing.assert_array_equal(plain[1]["x90"].numpy(), everything[16:32])


def test_hand_poses_pickles_the_folder_not_the_arrays(tmp_path):
    import pickle
    write_prepared(tmp_path, {"train": 2000, "val": 9})
    data = HandPoses(HandPosesConfig(root=str(tmp_path), standardize=True), "train")
    blob = pickle.dumps(data)
    assert len(blob) < 20_000  # 2000 x 90 float32 would be 720 kB
    copy = pickle.loads(blob)
    assert torch.equal(copy.batch([7, 1999, 0]), data.batch([7, 1999, 0]))


def test_hand_poses_refuses_bad_indices_splits_and_sources(tmp_path):
    write_labelled(tmp_path, {"train": 6, "val": 4})
    data = HandPoses(HandPosesConfig(root=str(tmp_path)), "val")
    with pytest.raises(IndexError, match="hand_poses: index -5 out of range for 4"):
        data.batch([0, -5])
    with pytest.raises(IndexError, match="integers, got float64"):
        data.batch(np.array([0.0, 1.0]))
    assert data.batch([]).shape == (0, 90)
    with pytest.raises(DataError, match="split must be one of train, val, test"):
        HandPoses(HandPosesConfig(root=str(tmp_path)), "holdout")
    np.save(tmp_path / "val" / "source.npy", np.array([0, 1, 3, 2], dtype=np.int16))
    with pytest.raises(DataError, match=r"val/source\.npy: values 0\.\.3, but dataset_metadata\.json lists 3"):
        HandPoses(HandPosesConfig(root=str(tmp_path)), "val")


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


@pytest.mark.parametrize("chunk", [None, 7])  # one pass, and many chunks with a ragged last one
def test_prepare_mocap_writes_rows_standardized_with_train_statistics(tmp_path, monkeypatch, chunk):
    import handforge.pose_standardization as standardization
    if chunk:
        monkeypatch.setattr(standardization, "CHUNK", chunk)
    root = tmp_path / "mocap"
    for d in ("CMU", "GRAB"):
        (root / d).mkdir(parents=True)
        for s in range(6):
            full = poses(25, 156) * (1 + s) + s
            full[:, 70] = 0.5  # a value constant everywhere: std 0, divided by 1
            np.savez(root / d / f"seq{s}_poses.npz", poses=full, mocap_framerate=np.array(120.0))
    prepare_mocap(root, tmp_path / "out", seed=3, total=300)
    out = tmp_path / "out"
    train = load(out, "train")
    raw = np.concatenate([train["left"], train["right"]], 1).astype(np.float64)
    mean, std = raw.mean(0), raw.std(0)
    written = json.loads((out / "standardization.json").read_text())
    np.testing.assert_allclose(written["mean"], mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.array(written["std"])[std > 0], std[std > 0], rtol=1e-6)
    assert written["std"][70 - 66] == 1.0 and written["poses"] == len(raw)
    m32, s32 = np.float32(written["mean"]), np.float32(written["std"])
    for split in ("train", "val", "test"):
        a = load(out, split)
        rows = np.load(out / split / "x90_standardized.npy")
        np.testing.assert_array_equal(rows, (np.concatenate([a["left"], a["right"]], 1) - m32) / s32)
        data = HandPoses(HandPosesConfig(root=str(out), standardize=True), split)
        pick = np.random.default_rng(0).integers(0, len(data), 9)
        np.testing.assert_array_equal(data.batch(pick).numpy(), rows[pick])


def test_hand_poses_standardized_needs_what_prepare_writes(tmp_path):
    write_prepared(tmp_path, {"train": 20, "val": 5}, standardized=False)
    HandPoses(HandPosesConfig(root=str(tmp_path)), "val")  # raw reads need no statistics
    with pytest.raises(DataError, match=r"standardization\.json: missing.*prepare the folder again"):
        HandPoses(HandPosesConfig(root=str(tmp_path), standardize=True), "val")
    write_standardization(tmp_path, ["train", "val"])
    np.save(tmp_path / "val/x90_standardized.npy", np.zeros((4, 90), np.float32))
    with pytest.raises(DataError, match=r"val/x90_standardized\.npy: expected \(5, 90\) float32"):
        HandPoses(HandPosesConfig(root=str(tmp_path), standardize=True), "val")
    (tmp_path / "standardization.json").write_text(json.dumps({"mean": [0.0] * 90, "std": [1.0] * 89}))
    with pytest.raises(DataError, match=r"standardization\.json: 'std' must be 90 finite numbers"):
        HandPoses(HandPosesConfig(root=str(tmp_path), standardize=True), "train")


# -- prepare mocap: priority table, --fps, --drop-flat / --drop-static, determinism -------------

from handforge.cli import main  # noqa: E402
from handforge.plugins.datasets.mocap_poses import priorities, sampling  # noqa: E402
from handforge.plugins.datasets.mocap_poses.prepare import Filters, prepare_mocap  # noqa: E402


def amass_file(path, hands, rate=120.0):
    """An AMASS SMPL+H sequence whose hands (N, 90: left then right) are ``hands``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    full = poses(len(hands), 156)
    full[:, 66:156] = hands
    members = {"poses": full, "trans": poses(len(hands), 3)}
    if rate is not None:
        members["mocap_framerate"] = np.array(rate)
    np.savez(path, **members)


def marked(n, mark):
    """(n, 90) hands whose first value is the sequence mark and second the frame index."""
    hands = poses(n, 90)
    hands[:, 0], hands[:, 1] = mark, np.arange(n)
    return hands


def two_dataset_tree(root, frames=20, per=10):
    for d, base in (("CMU", 0), ("GRAB", 100)):
        for s in range(per):
            amass_file(root / d / f"seq{s}_poses.npz", marked(frames, base + s))


def prepare_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "mocap", *map(str, args)])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def all_frames(out):
    """(source name, mark, frame index) of every prepared frame, all splits."""
    meta = json.loads((out / "dataset_metadata.json").read_text())
    rows = []
    for split in ("train", "val", "test"):
        left = np.load(out / split / "left.npy")
        source, frame = np.load(out / split / "source.npy"), np.load(out / split / "frame.npy")
        assert np.array_equal(left[:, 1], frame)  # frame.npy is the index of the frame in its file
        rows += [(meta["sources"][s], int(m), int(f)) for s, m, f in zip(source, left[:, 0], frame)]
    return meta, rows


def test_shipped_table_is_package_data_and_matches_the_seed_table():
    import importlib.resources
    shipped = importlib.resources.files("handforge.plugins.datasets.mocap_poses") / "priorities.toml"
    assert shipped.is_file()
    table = priorities.load_table()
    assert table.path == str(shipped)
    assert table.shares == {"high": 0.60, "medium": 0.25, "low": 0.15} and table.total == 1_500_000
    assert [table.priority_of(d) for d in ("GRAB", "arctic", "SignAvatars_v2", "kungfu", "CMU", "KIT")] == \
        ["high", "high", "high", "medium", "low", "low"]


def test_table_file_replaces_priorities(tmp_path, capsys):
    root = tmp_path / "mocap"
    two_dataset_tree(root)
    code, _, err = prepare_cli(capsys, root, "--out", tmp_path / "shipped", "--total", 100)
    assert code == 0, err
    meta, rows = all_frames(tmp_path / "shipped")
    # shipped table: GRAB high (0.60), CMU unlisted -> low (0.15); renormalized over the two present
    assert meta["priority"] == {"CMU": "low", "GRAB": "high"}
    assert sum(r[0] == "GRAB" for r in rows) == 80 and sum(r[0] == "CMU" for r in rows) == 20
    table = tmp_path / "mine.toml"
    table.write_text('total = 50\nunlisted = "exclude"\n[shares]\nfirst = 0.9\nsecond = 0.1\n'
                     '[datasets]\nfirst = ["C*"]\nsecond = ["GRAB", "HDM05"]\n')
    code, _, err = prepare_cli(capsys, root, "--out", tmp_path / "mine", "--table", table)
    assert code == 0, err
    meta, rows = all_frames(tmp_path / "mine")
    assert meta["priority"] == {"CMU": "first", "GRAB": "second"} and meta["total_target"] == 50
    assert sum(r[0] == "CMU" for r in rows) == 45 and sum(r[0] == "GRAB" for r in rows) == 5
    assert meta["missing_datasets"] == {"second": ["HDM05"]}
    assert any("HDM05" in w and str(table) in w for w in meta["warnings"])
    # unlisted = "exclude": a dataset no list names is left out, its files counted
    table.write_text('unlisted = "exclude"\n[shares]\nhigh = 1.0\n[datasets]\nhigh = ["GRAB"]\n')
    meta = prepare_mocap(root, tmp_path / "excl", total=40, table=table)
    assert meta["sources"] == ["GRAB"] and meta["excluded_files"] == {"CMU": 10}


BAD_TABLES = {
    "unknown key": ('totl = 5\n[shares]\nlow = 1.0\n', r"unknown key 'totl'"),
    "two priorities": ('[shares]\nhigh = 0.5\nlow = 0.5\n[datasets]\nhigh = ["GRAB"]\nlow = ["CMU", "GRAB"]\n',
                       r"'datasets\.low': 'GRAB' is also listed under 'datasets\.high'"),
    "sum": ('[shares]\nhigh = 0.5\nlow = 0.4\n[datasets]\nhigh = ["GRAB"]\n',
            r"'shares': the shares sum to 0\.9,"),
    "negative": ('[shares]\nhigh = 1.1\nlow = -0.1\n[datasets]\nhigh = ["GRAB"]\n',
                 r"'shares\.low': -0\.1 is negative"),
    "total": ('total = 1.5e6\n[shares]\nlow = 1.0\n', r"'total': expected a positive whole number"),
    "no share": ('[shares]\nlow = 1.0\n[datasets]\nurgent = ["GRAB"]\n', r"'datasets\.urgent': no share"),
    "two patterns": ('[shares]\nhigh = 0.5\nlow = 0.5\n[datasets]\nhigh = ["C*"]\nlow = ["*U", "GRAB"]\n',
                     r"dataset 'CMU' matches patterns of two priorities \(datasets\.high 'C\*', datasets\.low '\*U'\)"),
    "not TOML": ('[shares\nlow = 1\n', r"invalid TOML"),
    "none present": ('[shares]\nhigh = 0.6\nlow = 0.4\n[datasets]\nhigh = ["BMLmovi"]\n',
                     r"names none of the datasets under .*found: CMU, GRAB"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_table_exits_2_naming_file_and_key(tmp_path, capsys, case):
    root = tmp_path / "mocap"
    two_dataset_tree(root, per=2)
    text, message = BAD_TABLES[case]
    table = tmp_path / "bad_table.toml"
    table.write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = prepare_cli(capsys, root, "--out", tmp_path / "out", "--table", table)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{table}: " in err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even a temp folder


def test_fps_keeps_the_frame_nearest_each_tick(tmp_path):
    root = tmp_path / "mocap"
    amass_file(root / "CMU" / "a_poses.npz", marked(50, 1), rate=120.0)
    amass_file(root / "CMU" / "b_poses.npz", marked(40, 2), rate=100.0)
    amass_file(root / "CMU" / "c_poses.npz", marked(9, 3), rate=20.0)
    meta = prepare_mocap(root, tmp_path / "out", (1.0, 0.0, 0.0), total=1000, filters=Filters(fps=30))
    _, rows = all_frames(tmp_path / "out")
    kept = {m: [f for _, mark, f in rows if mark == m] for m in (1, 2, 3)}
    assert kept[1] == list(range(0, 50, 4))  # 120 -> 30 fps: every 4th frame from frame 0
    # 100 fps: for each tick j/30 s, the frame nearest in time (a hand-written search)
    ticks = [j / 30 for j in range(40) if j / 30 <= 39 / 100]
    assert kept[2] == [min(range(40), key=lambda i: abs(i / 100 - t)) for t in ticks]
    assert kept[2][:6] == [0, 3, 7, 10, 13, 17]
    assert kept[3] == list(range(9))  # slower than --fps: all frames
    assert meta["dropped"] == {"fps": 50 - 13 + 40 - len(ticks), "flat_hands": 0, "static": 0}


def test_fps_refuses_a_sequence_without_frame_rate(tmp_path, capsys):
    root = tmp_path / "mocap"
    amass_file(root / "CMU" / "ok_poses.npz", marked(8, 1))
    amass_file(root / "CMU" / "norate_poses.npz", marked(8, 2), rate=None)
    code, _, err = prepare_cli(capsys, root, "--out", tmp_path / "out", "--fps", 30)
    assert code == 2 and "norate_poses.npz: no frame rate" in err and "--fps" in err
    assert not (tmp_path / "out").exists()
    meta = prepare_mocap(root, tmp_path / "out", total=100, on_error="skip", filters=Filters(fps=30))
    assert sum(meta["unreadable"].values()) == 1 and meta["datasets"]["CMU"]["files"] == 1


def naive_moving(hands, threshold):
    kept = [0]
    for i in range(1, len(hands)):
        if np.abs(hands[i] - hands[kept[-1]]).max() > threshold:
            kept.append(i)
    return kept


def test_moving_frames_matches_the_frame_by_frame_rule():
    rng = np.random.default_rng(3)
    # long still stretches (windows must grow past them) between bursts of motion
    steps = rng.normal(0, 0.004, size=(3000, 90)) * (rng.random((3000, 1)) < 0.3)
    walk = np.cumsum(steps, axis=0).astype(np.float32)
    for threshold in (0.0, 0.005, 0.02, 0.1):
        assert sampling.moving_frames(walk, threshold).tolist() == naive_moving(walk, threshold)


def test_drop_flat_and_static_drop_exactly_those_frames(tmp_path):
    a = poses(1, 90)[0]
    frames = [a,                     # 0 kept (first)
              a + 0.004,             # 1 static: moved 0.004 <= 0.01 since frame 0
              a + 0.02,              # 2 moved 0.02 since frame 0: kept
              np.zeros(90),          # 3 flat (body-only frame)
              np.zeros(90),          # 4 flat
              a + 0.029,             # 5 static: 0.009 since frame 2, the last kept (flat frames don't count)
              a + 0.0301,            # 6 moved 0.0101 since frame 2: kept
              np.r_[np.zeros(45), a[45:] + 0.5]]  # 7 left hand flat, right moved: not flat, kept
    hands = np.stack(frames).astype(np.float32)
    root = tmp_path / "mocap"
    amass_file(root / "CMU" / "s_poses.npz", hands)
    amass_file(root / "CMU" / "t_poses.npz", np.zeros((5, 90), np.float32))  # a body-only capture
    meta = prepare_mocap(root, tmp_path / "out", (1.0, 0.0, 0.0), total=1000,
                         filters=Filters(drop_flat=True, static_threshold=0.01))
    assert np.load(tmp_path / "out/train/frame.npy").tolist() == [0, 2, 6, 7]
    np.testing.assert_array_equal(np.load(tmp_path / "out/train/left.npy"), hands[[0, 2, 6, 7], :45])
    assert meta["dropped"] == {"fps": 0, "flat_hands": 2 + 5, "static": 2}
    assert meta["datasets"]["CMU"]["available"] == 4 and meta["splits"]["train"]["sequences"] == 1
    # without --drop-flat the zero frames are frames like any other: 4 is static after 3
    meta = prepare_mocap(root, tmp_path / "out2", (1.0, 0.0, 0.0), total=1000,
                         filters=Filters(static_threshold=0.01))
    assert np.load(tmp_path / "out2/train/frame.npy").tolist() == [0, 2, 3, 5, 7, 0]
    assert meta["dropped"]["static"] == 3 + 4


def test_fair_split_spreads_then_refills():
    assert sampling.fair_split(100, [1000, 10, 10]).tolist() == [80, 10, 10]
    assert sampling.fair_split(90, [1000, 1000, 1000]).tolist() == [30, 30, 30]
    assert sampling.fair_split(10, [5, 5, 5]).tolist() == [4, 3, 3]
    assert sampling.fair_split(100, [3, 4]).tolist() == [3, 4]
    rng = np.random.default_rng(0)
    for _ in range(200):
        caps = rng.integers(0, 50, size=rng.integers(1, 8))
        budget = int(rng.integers(0, 300))
        given = sampling.fair_split(budget, caps)
        assert given.sum() == min(budget, caps.sum()) and (given <= caps).all() and (given >= 0).all()
        # max-min fair: a bin below its capacity is within one of the fullest bin
        open_bins = given < caps
        if open_bins.any():
            assert given.max() - given[open_bins].min() <= 1


def test_priority_spread_over_datasets_then_sequences(tmp_path):
    root = tmp_path / "mocap"
    amass_file(root / "GRAB" / "long_poses.npz", marked(1000, 1))
    for s in range(10):
        amass_file(root / "arctic" / f"short{s}_poses.npz", marked(10, 10 + s))
    meta = prepare_mocap(root, tmp_path / "out", total=100)  # both high: 50 each, 5 per short sequence
    assert meta["datasets"]["GRAB"]["kept"] == 50 and meta["datasets"]["arctic"]["kept"] == 50
    _, rows = all_frames(tmp_path / "out")
    long_frames = sorted(f for _, m, f in rows if m == 1)
    assert long_frames == np.linspace(0, 999, 50).round().astype(int).tolist()  # an even stride
    assert all(sum(m == k for _, m, _ in rows) == 5 for k in range(10, 20))


def test_rerun_writes_identical_bytes(tmp_path):
    root = tmp_path / "mocap"
    two_dataset_tree(root, frames=30)
    amass_file(root / "CMU" / "still_poses.npz", np.zeros((12, 90), np.float32))
    filters = Filters(fps=60, drop_flat=True, static_threshold=0.001)
    for name in ("a", "b"):
        prepare_mocap(root, tmp_path / name, seed=7, total=300, filters=filters)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 17  # 3 splits x (4 arrays + standardized rows), metadata, statistics
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    prepare_mocap(root, tmp_path / "c", seed=8, total=300, filters=filters)
    assert (tmp_path / "c/train/frame.npy").read_bytes() != (tmp_path / "a/train/frame.npy").read_bytes() or \
        (tmp_path / "c/val/source.npy").read_bytes() != (tmp_path / "a/val/source.npy").read_bytes()


def test_split_fractions_hold_for_the_sequences_written(tmp_path):
    root = tmp_path / "mocap"
    for s in range(10):
        amass_file(root / "CMU" / f"hands{s}_poses.npz", marked(6, s))
        amass_file(root / "CMU" / f"body{s}_poses.npz", np.zeros((6, 90), np.float32))  # dropped whole
    for seed in range(5):
        meta = prepare_mocap(root, tmp_path / f"out{seed}", (0.5, 0.5, 0.0), seed=seed, total=1000,
                             filters=Filters(drop_flat=True))
        assert [meta["splits"][k]["sequences"] for k in ("train", "val", "test")] == [5, 5, 0]
        assert meta["datasets"]["CMU"] == {"files": 20, "read": 120, "available": 60, "kept": 60,
                                           "dropped": {"fps": 0, "flat_hands": 60, "static": 0}}
