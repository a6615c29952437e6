"""The synthsl and bosphorus datasets on shards the tests write: what a sample holds (the frame,
its sequence's reference, both hands' keypoints mapped from the stored body layout), the streaming
reader's split over ranks and workers, and hostile or damaged shards: refused by name or skipped
with a count, a planted pickle never run."""
import io
import os
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tar_fixtures as fx  # noqa: E402

from handforge.data import check_sample  # noqa: E402
from handforge.errors import DataError  # noqa: E402
from handforge.plugins.datasets.tar_shards.dataset import BosphorusPairs, SynthSLPairs, TarPairsConfig  # noqa: E402
from handforge.plugins.datasets.tar_shards.layouts import SYNTHSL_HANDS, SYNTHSL_JOINTS  # noqa: E402


def pixel(image: torch.Tensor) -> int:
    return round((float(image[0, 0, 0]) + 1) * 127.5)


def test_synthsl_hand_mapping_follows_the_smplx_joint_names():
    # Independent of the table: the right wrist is SMPL-X joint 21, its thumb tip 71, pinky base 46.
    right = SYNTHSL_HANDS[21:]
    assert [SYNTHSL_JOINTS[right[i]] for i in (0, 4, 17, 20)] == [21, 71, 46, 75]
    assert len(set(SYNTHSL_HANDS)) == 42 and len(SYNTHSL_JOINTS) == 96


def test_synthsl_samples_pair_each_frame_with_its_sequence_reference(tmp_path):
    truth = fx.synthsl(tmp_path)
    data = SynthSLPairs(TarPairsConfig(root=str(tmp_path), size=32))
    assert len(data) == len(truth) == 6
    keys = [entry.key for entry in data.entries]
    for i, key in enumerate(keys):
        sample = data[i]
        check_sample(sample, "synthsl")
        value, wrist = truth[key]
        assert pixel(sample["image"]) == value
        assert pixel(sample["reference"]) == 200 + (key.startswith("seqB"))
        assert sample["keypoints"][0].tolist() == pytest.approx([wrist[0], wrist[1], 1.0], abs=1e-6)
        assert sample["keypoints"][20, :2].tolist() == pytest.approx([wrist[0] + 0.2, wrist[1] + 0.1], abs=1e-6)
        assert sample["reference_keypoints"][0].tolist() == pytest.approx([0.5, 0.5, 1.0])
    # the left hand is stored as "not found" (0, 0): invisible
    left = SynthSLPairs(TarPairsConfig(root=str(tmp_path), size=32, hand="left"))[0]["keypoints"]
    assert left[:, 2].sum() == 0
    assert len(SynthSLPairs(TarPairsConfig(root=str(tmp_path)), split="val")) == 1


def test_reference_frame_is_another_frame_of_the_same_sequence(tmp_path):
    truth = fx.synthsl(tmp_path)
    data = SynthSLPairs(TarPairsConfig(root=str(tmp_path), size=32, reference="frame", seed=3))
    assert len(data) == 6
    values = {key: value for key, (value, _) in truth.items()}
    for i, entry in enumerate(data.entries):
        sample = data[i]
        same_sequence = {v for k, v in values.items() if k.split(".")[0] == entry.sequence and k != entry.key}
        assert pixel(sample["reference"]) in same_sequence
        # its keypoints are that frame's: the wrist of the frame whose colour the reference has
        (key,) = [k for k, v in values.items() if v == pixel(sample["reference"])]
        assert sample["reference_keypoints"][0, :2].tolist() == pytest.approx(truth[key][1], abs=1e-6)
        assert torch.equal(data[i]["reference"], sample["reference"])  # fixed per sample
    with pytest.raises(DataError, match="needs the map-style reading"):
        data.stream()


def test_bosphorus_crops_frames_and_keypoints_to_the_signing_area(tmp_path):
    truth = fx.bosphorus(tmp_path)
    data = BosphorusPairs(TarPairsConfig(root=str(tmp_path), size=64))
    assert len(data) == 6
    for i, entry in enumerate(data.entries):
        sample = data[i]
        check_sample(sample, "bosphorus")
        assert sample["image"].shape == (3, 64, 64)
        value, wrist = truth[(entry.sequence, int(entry.key))]
        assert pixel(sample["image"]) == value and pixel(sample["reference"]) == 250
        # the seed's mapping of x to the crop 480..1440 of 1920: (x - 0.25) / 0.5
        assert sample["keypoints"][0, :2].tolist() == pytest.approx([(wrist[0] - 0.25) / 0.5, wrist[1]], abs=1e-6)


def signer(n: int, hands_at, seed: int) -> np.ndarray:
    """(n, 2) points: a skeleton over 0.35..0.65 of the frame, and at ``hands_at`` (42 indices) two
    hands, each 21 points within 0.05 of its wrist."""
    points = np.random.default_rng(seed).uniform(0.35, 0.65, (n, 2))
    for side, wrist in enumerate(((0.40, 0.62), (0.60, 0.62))):
        for joint, index in enumerate(hands_at[21 * side:21 * side + 21]):
            points[index] = (wrist[0] + 0.002 * joint, wrist[1] - 0.0015 * joint)
    return points


def test_hand_points_that_are_no_hands_are_refused_naming_the_option(tmp_path):
    from handforge.plugins.datasets.tar_shards.layouts import BOSPHORUS_HANDS
    clips = ("0001.1.001", "0001.1.002", "0002.3.004")
    fx.bosphorus(tmp_path, clips=clips)

    def references(hands_at):
        fx.write_tar(tmp_path / "base_kps.tar.gz", [(f"{c}.pickle", pickle.dumps(signer(96, hands_at, i)))
                                                    for i, c in enumerate(clips)], compress=True)

    references(list(BOSPHORUS_HANDS))  # the layout the default assumes: opens
    assert BosphorusPairs(TarPairsConfig(root=str(tmp_path))).hand_points == list(BOSPHORUS_HANDS)
    shifted = list(range(54, 96))  # hands stored after 21 other points: the default reads one hand wrong
    references(shifted)
    with pytest.raises(DataError, match=r"base_kps\.tar\.gz: the hand points \(the bosphorus layout's default\) "
                                        r"do not look like hands: in 3 of the 6 hands"):
        BosphorusPairs(TarPairsConfig(root=str(tmp_path)))
    data = BosphorusPairs(TarPairsConfig(root=str(tmp_path), hand_points=shifted))  # the fix the message names
    assert data.reference(clips[0])[1][0, :2].tolist() == pytest.approx([(0.60 - 0.25) / 0.5, 0.62], abs=1e-6)
    with pytest.raises(DataError, match=r"\(option hand_points\) do not look like hands"):
        BosphorusPairs(TarPairsConfig(root=str(tmp_path), hand_points=list(range(42))))


@pytest.mark.parametrize("make, cls", [(fx.synthsl, SynthSLPairs), (fx.bosphorus, BosphorusPairs)])
def test_stream_splits_samples_over_readers_without_overlap(tmp_path, make, cls):
    make(tmp_path)
    data = cls(TarPairsConfig(root=str(tmp_path), size=16, shuffle_buffer=4))
    everything = sorted(pixel(s["image"]) * 100 + round(float(s["keypoints"][0, 0]) * 100) for s in data.stream())
    assert everything == sorted(pixel(data[i]["image"]) * 100 + round(float(data[i]["keypoints"][0, 0]) * 100)
                                for i in range(len(data)))
    parts = [[pixel(s["image"]) for s in data.stream(rank=r, world=2)] for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(e // 100 for e in everything)
    assert parts[0] and parts[1]
    # DataLoader workers split each rank's share further: 2 ranks x 2 workers read everything once
    loaded = [pixel(s["image"]) for r in range(2)
              for s in torch.utils.data.DataLoader(data.stream(rank=r, world=2), batch_size=None, num_workers=2)]
    assert sorted(loaded) == sorted(parts[0] + parts[1])


def test_stream_order_depends_on_seed_and_epoch(tmp_path):
    fx.bosphorus(tmp_path, clips=tuple(f"0001.1.{c:03d}" for c in range(6)), frames=1)
    data = BosphorusPairs(TarPairsConfig(root=str(tmp_path), size=8, shuffle_buffer=3))
    order = lambda stream: [pixel(s["image"]) for s in stream]  # noqa: E731
    assert order(data.stream(epoch=0)) == order(data.stream(epoch=0))
    assert sorted(order(data.stream(epoch=1))) == sorted(order(data.stream(epoch=0)))
    assert any(order(data.stream(epoch=e)) != order(data.stream(epoch=0)) for e in range(1, 5))


# -- hostile and damaged shards ----------------------------------------------------------------------


def hostile_members(kind: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo({"dotdot": "../../escape.rgb.png", "absolute": "/etc/evil.rgb.png",
                            "symlink": "seqA.00009.rgb.png"}[kind])
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


def append_member(path, info: tarfile.TarInfo, data: bytes = b"") -> None:
    with tarfile.open(path, "a") as tar:
        info.size = len(data) if info.isfile() else 0
        tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_members_are_refused_by_name_or_counted(tmp_path, kind):
    fx.synthsl(tmp_path)
    info = hostile_members(kind)
    append_member(tmp_path / "training.tar", info, fx.png(4, 4, 0))
    with pytest.raises(DataError) as error:
        len(SynthSLPairs(TarPairsConfig(root=str(tmp_path))))
    assert info.name in str(error.value) and "training.tar" in str(error.value)
    with pytest.raises(DataError, match="training.tar"):
        list(SynthSLPairs(TarPairsConfig(root=str(tmp_path))).stream())
    skipping = SynthSLPairs(TarPairsConfig(root=str(tmp_path), size=8, on_error="skip"))
    assert len(skipping) == 6 and skipping.bad.counts["refused member"] == 1
    assert len(list(SynthSLPairs(TarPairsConfig(root=str(tmp_path), on_error="skip")).stream())) == 6
    assert not (tmp_path.parent / "escape.rgb.png").exists()


class WritesMarker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_planted_keypoint_pickle_is_never_run(tmp_path):
    fx.synthsl(tmp_path)
    marker = tmp_path / "marker"
    members = [("seqA.00000.rgb.png", fx.png(8, 8, 5)), ("seqA.00000.keypoints.pkl", pickle.dumps(WritesMarker(marker)))]
    fx.write_tar(tmp_path / "test.tar", members)
    data = SynthSLPairs(TarPairsConfig(root=str(tmp_path), size=8), split="val")
    with pytest.raises(DataError, match=r"test.tar: seqA.00000.keypoints.pkl: the pickle names (io|builtins)\.open"):
        data[0]
    with pytest.raises(DataError, match=r"(io|builtins)\.open"):
        list(data.stream())
    assert not marker.exists()
    pickle.loads(pickle.dumps(WritesMarker(tmp_path / "proof")))  # what plain pickle would have done
    assert (tmp_path / "proof").exists()


def test_a_damaged_shard_is_skipped_with_a_count_and_the_epoch_goes_on(tmp_path, capsys):
    fx.bosphorus(tmp_path)
    good = (tmp_path / "train" / "0001.1.002.tar.gz").read_bytes()
    (tmp_path / "train" / "0001.1.002.tar.gz").write_bytes(good[: len(good) // 2])  # cut off midway
    (tmp_path / "train" / "0009.9.009.tar.gz").write_bytes(b"not a shard at all")
    with pytest.raises(DataError, match=r"0001.1.002.tar.gz: damaged"):
        len(BosphorusPairs(TarPairsConfig(root=str(tmp_path))))
    data = BosphorusPairs(TarPairsConfig(root=str(tmp_path), size=8, on_error="skip"))
    assert 4 <= len(data) < 6  # the intact clips and whatever preceded the damage
    assert data.bad.counts["damaged shard"] == 2
    assert "skipped" in capsys.readouterr().err
    stream = BosphorusPairs(TarPairsConfig(root=str(tmp_path), size=8, on_error="skip")).stream()
    assert len(list(stream)) >= 4 and stream.skipped() == {"damaged shard": 2}  # what the loop logs
    assert "damaged shard" in capsys.readouterr().err  # summarised after the pass, in any process


def test_shapes_that_break_the_layout_name_the_member(tmp_path):
    fx.synthsl(tmp_path)
    members = [("seqA.00000.rgb.png", fx.png(8, 8, 5)), ("seqA.00000.keypoints.pkl", pickle.dumps(np.zeros((10, 2))))]
    fx.write_tar(tmp_path / "test.tar", members)
    with pytest.raises(DataError, match=r"seqA.00000.keypoints.pkl: keypoints of shape \(10, 2\)"):
        SynthSLPairs(TarPairsConfig(root=str(tmp_path)), split="val")[0]
    with pytest.raises(DataError, match="base_kps_tar.tar: reference archive not found"):
        (tmp_path / "base_kps_tar.tar").unlink()
        SynthSLPairs(TarPairsConfig(root=str(tmp_path)))


def test_registered_with_the_fields_they_provide(host):
    for name in ("synthsl", "bosphorus"):
        entry = host.registry("dataset").get(name)
        assert set(entry.provides) == {"image", "reference", "keypoints", "reference_keypoints"}
