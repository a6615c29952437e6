"""The pose prior (issue 16): rotation maths against SciPy and closed forms, training through the loop,
sample-poses -> procedural_hands poses_file -> keypoints, and bad inputs."""
import json

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from conftest import REPO, run_cli
from handforge.errors import DataError
from handforge.plugins.datasets.handshape_poses import HandshapePoses, HandshapePosesConfig
from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig
from handforge.plugins.datasets.procedural_hands import kinematics as kin
from handforge.plugins.tasks.pose_prior import gaussian_kl
from handforge.rotations import (axis_angle_to_matrix, geodesic_angle, matrix_to_axis_angle, matrix_to_rot6d,
                                 rot6d_to_matrix)

GEN = np.random.default_rng(0)


def random_rotvecs(n):
    axes = GEN.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.concatenate([GEN.uniform(0, np.pi, n - 4), [0.0, 1e-9, np.pi - 1e-4, np.pi - 1e-7]])
    return axes * angles[:, None]


def test_axis_angle_matrix_round_trip_matches_scipy():
    rotvecs = random_rotvecs(500)
    matrices = axis_angle_to_matrix(torch.tensor(rotvecs))
    np.testing.assert_allclose(matrices.numpy(), Rotation.from_rotvec(rotvecs).as_matrix(), atol=1e-12)
    back = matrix_to_axis_angle(matrices).numpy()
    # near pi, v and -v are the same rotation: compare the rotations, then the vectors away from pi
    np.testing.assert_allclose(Rotation.from_rotvec(back).as_matrix(), matrices.numpy(), atol=1e-6)
    away = np.linalg.norm(rotvecs, axis=1) < np.pi - 1e-3
    np.testing.assert_allclose(back[away], rotvecs[away], atol=1e-7)


def test_six_d_round_trip_and_gram_schmidt():
    matrices = torch.tensor(Rotation.random(200, random_state=1).as_matrix())
    torch.testing.assert_close(rot6d_to_matrix(matrix_to_rot6d(matrices)), matrices)
    raw = torch.tensor(GEN.normal(size=(200, 6)))  # any 6 numbers give a rotation
    r = rot6d_to_matrix(raw)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, torch.eye(3, dtype=r.dtype).expand_as(r))
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(200, dtype=r.dtype))
    torch.testing.assert_close(r[..., 0], raw[:, :3] / raw[:, :3].norm(dim=1, keepdim=True))  # first column: a / |a|


def test_geodesic_angle_is_the_relative_rotation_angle():
    a, b = Rotation.random(100, random_state=2), Rotation.random(100, random_state=3)
    expected = (a.inv() * b).magnitude()
    got = geodesic_angle(torch.tensor(a.as_matrix()), torch.tensor(b.as_matrix()))
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-3)  # the clamp at 1 - 1e-6 costs < 1.5e-3 rad
    assert float(geodesic_angle(torch.eye(3), torch.eye(3))) < 2e-3


def test_kl_matches_closed_form_of_torch_distributions():
    mu, logvar = torch.randn(64, 32, dtype=torch.float64), torch.randn(64, 32, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(q, p).sum(-1))


def test_handshape_poses_are_procedural_hands_templates_within_limits():
    data = HandshapePoses(HandshapePosesConfig(pose_noise=0.0, length=64), "train")
    batch = data.__getitems__(list(range(64)))
    templates = kin.anatomical_to_pose(data.classes.templates)
    # without noise every right pose is one of the templates exactly
    distance = (batch["hand_pose"][:, None] - templates[None]).abs().amax(-1).amin(-1)
    assert float(distance.max()) < 1e-6
    assert batch["hand_pose90"].shape == (64, 90)
    val = HandshapePoses(HandshapePosesConfig(length=64), "val").__getitems__([0])["hand_pose"]
    train = HandshapePoses(HandshapePosesConfig(length=64), "train").__getitems__([0])["hand_pose"]
    assert not torch.equal(val, train)


def write_recipe(tmp_path, text):
    path = tmp_path / "prior.toml"
    path.write_text(text)
    return path


PRIOR = """
name = "prior"
seed = 0
output_dir = "{out}"
[task]
name = "pose_prior"
input = "hand_pose"
beta = 0.01
kl_warmup_steps = 100
eval_poses = 512
[data]
name = "handshape_poses"
[model.prior]
name = "hand_vae"
hidden = 128
[train]
steps = 400
batch_size = 256
log_every = 100
progress = false
tensorboard = false
"""


@pytest.fixture(scope="module")
def trained_prior(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prior")
    result = run_cli("run", write_recipe(tmp, PRIOR.format(out=tmp)), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return tmp / "prior"


def test_prior_reconstructs_held_out_poses_after_short_training(trained_prior):
    records = [json.loads(line) for line in (trained_prior / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in records if r["type"] == "final")
    first = next(r for r in records if r["type"] == "train")
    # held-out (val) poses reconstructed from the posterior mean; an untrained decoder is ~60 degrees off
    assert final["rec_deg"] < 9.0 and final["rec_deg_p95"] < 20.0, final
    assert first["rec_deg"] > 2 * final["rec_deg"]
    assert 0 < final["kl"] < 60 and 0 <= final["precision"] <= 1
    assert (trained_prior / "weights" / "prior.safetensors").is_file()
    assert (trained_prior / "final" / "report.md").is_file()


def test_sampled_poses_drive_procedural_hands(trained_prior, tmp_path):
    out = tmp_path / "poses.npz"
    result = run_cli("sample-poses", trained_prior, "--num", 300, "--out", out, "--seed", 3, "--temperature", 0.8)
    assert result.returncode == 0, result.stderr
    file = np.load(out)
    assert file["right"].shape == (300, 45) and file["energy"].shape == (300,)
    assert np.isfinite(file["energy"]).all()
    again = tmp_path / "again.npz"
    assert run_cli("sample-poses", trained_prior, "--num", 300, "--out", again, "--seed", 3,
                   "--temperature", 0.8).returncode == 0
    np.testing.assert_array_equal(np.load(again)["right"], file["right"])  # the seed fixes the poses

    data = ProceduralHands(ProceduralHandsConfig(poses_file=str(out), length=40, size=32), "train")
    batch = data.__getitems__(list(range(40)))
    assert "label" not in batch
    rows = torch.from_numpy(file["right"])
    right = batch["handedness"] == 1
    as_right = torch.where(right[:, None], batch["hand_pose"], batch["hand_pose"] * torch.tensor([1.0, -1, -1]).repeat(15))
    match = (as_right[:, None] - rows[None]).abs().amax(-1)  # each sample renders one row of the file
    assert float(match.amin(1).max()) < 1e-6
    # the 3D keypoints are the forward kinematics of that pose: the same shape up to a rigid move and scale
    params = data.sample_params(list(range(40)))
    joints, _ = kin.forward_kinematics(as_right, data.rest_skeletons(params))
    mine = torch.cdist(batch["joints3d"], batch["joints3d"])
    theirs = torch.cdist(joints, joints)
    ratio = (mine / theirs.clamp_min(1e-9))[theirs > 1e-3]
    mine_scaled = mine / params["hand_length"][:, None, None]
    torch.testing.assert_close(mine_scaled, theirs, atol=1e-4, rtol=1e-4)
    assert float(ratio.std()) > 0  # individuals differ in size


def test_poses_file_from_a_prepared_split_folder(tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    left = (GEN.normal(0, 0.2, size=(10, 45))).astype(np.float32)
    np.save(folder / "left.npy", left)
    data = ProceduralHands(ProceduralHandsConfig(poses_file=str(folder), length=10, size=16, left_fraction=1.0))
    batch = data.__getitems__(list(range(10)))
    assert (batch["handedness"] == 0).all()
    match = (batch["hand_pose"][:, None] - torch.from_numpy(left)[None]).abs().amax(-1)
    assert float(match.amin(1).max()) < 1e-6


@pytest.mark.parametrize("content, message", [
    ({"hands": np.zeros((3, 45), np.float32)}, "no hand poses, expected key 'right' or 'left' (it has hands)"),
    ({"right": np.zeros((3, 44), np.float32)}, "key 'right': expected (N, 45)"),
    ({"right": np.full((3, 45), np.nan, np.float32)}, "key 'right': NaN at pose 0, value 0"),
])
def test_bad_poses_file_names_the_file_and_key(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    with pytest.raises(DataError, match=None) as error:
        ProceduralHands(ProceduralHandsConfig(poses_file=str(path)))
    assert str(path) in str(error.value) and message in str(error.value), str(error.value)


def test_bad_inputs_exit_2_with_one_message(tmp_path, trained_prior):
    missing = run_cli("inspect", "procedural_hands", f"poses_file={tmp_path / 'nope.npz'}", "--num", 1)
    assert missing.returncode == 2 and "nope.npz" in missing.stderr and "Traceback" not in missing.stderr
    for args, text in [(("--num", 0), "--num must be at least 1"), (("--temperature", -1), "--temperature"),
                       (("--out", tmp_path / "x.txt"), "must end in .npz")]:
        options = {"--num": 5, "--out": tmp_path / "p.npz", **dict([args])}
        result = run_cli("sample-poses", trained_prior, *[str(x) for kv in options.items() for x in kv])
        assert result.returncode == 2 and text in result.stderr and "Traceback" not in result.stderr, result.stderr
    not_a_run = run_cli("sample-poses", tmp_path, "--num", 5, "--out", tmp_path / "p.npz")
    assert not_a_run.returncode == 2 and "not a run directory" in not_a_run.stderr


def test_the_shipped_hand_prior_recipe_trains_on_a_prepared_mocap_tree(tmp_path):
    # A fixture tree of AMASS SMPL+H sequences whose hands hold handshape poses (realistic, unlike noise).
    source = HandshapePoses(HandshapePosesConfig(length=4000), "train").__getitems__(list(range(4000)))["hand_pose90"]
    root = tmp_path / "mocap" / "CMU"
    root.mkdir(parents=True)
    for s in range(20):
        full = np.zeros((200, 156), np.float32)
        full[:, 66:156] = source[s * 200:(s + 1) * 200].numpy()
        np.savez(root / f"seq{s}_poses.npz", poses=full, mocap_framerate=np.array(120.0))
    prepared = tmp_path / "prepared"
    result = run_cli("prepare", "mocap", tmp_path / "mocap", "--out", prepared)
    assert result.returncode == 0, result.stderr
    result = run_cli("run", REPO / "recipes" / "hand_prior.toml", f"data.root={prepared}", f"output_dir={tmp_path}",
                     "train.steps=150", "train.batch_size=256", "task.eval_poses=256", "task.kl_warmup_steps=50",
                     "model.prior.hidden=128", "train.progress=false", "eval.every=0", "train.checkpoint_every=0",
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    final = [json.loads(line) for line in (tmp_path / "hand_prior" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["type"] == "final" and final["rec_deg"] < 15.0, final
    out = tmp_path / "poses.npz"
    assert run_cli("sample-poses", tmp_path / "hand_prior", "--num", 20, "--out", out).returncode == 0
    assert set(np.load(out).files) >= {"left", "right", "energy"}


def test_pose_to_anatomical_inverts_anatomical_to_pose_over_the_joint_limits():
    from handforge.plugins.datasets.procedural_hands.handshapes import ANGLE_HI, ANGLE_LO
    angles = ANGLE_LO + torch.rand(3000, 15, 3, generator=torch.Generator().manual_seed(0)) * (ANGLE_HI - ANGLE_LO)
    back = kin.pose_to_anatomical(kin.anatomical_to_pose(angles))
    assert float((back - angles).abs().max()) < 0.1  # degrees; a PIP bend beyond 90 included
    assert kin.within_limits(back.clamp(ANGLE_LO, ANGLE_HI), ANGLE_LO, ANGLE_HI).all()
    outside = angles.clone()
    outside[:, 1, 0] = ANGLE_HI[1, 0] + 20.0  # index PIP bent 20 degrees past its limit
    flags = kin.within_limits(kin.pose_to_anatomical(kin.anatomical_to_pose(outside)), ANGLE_LO, ANGLE_HI)
    assert not flags[:, 1].any()
