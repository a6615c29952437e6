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
    assert final["val_rec_deg"] < 9.0 and final["val_rec_deg_p95"] < 20.0, final
    assert first["rec_deg"] > 2 * final["val_rec_deg"]
    assert 0 < final["val_kl"] < 60 and 0 <= final["val_precision"] <= 1
    assert not any(key.startswith("test_") for key in final)  # handshape_poses has no test split
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
    assert final["type"] == "final" and final["val_rec_deg"] < 15.0 and final["test_rec_deg"] < 15.0, final
    assert final["test_poses"] == 256 and final["val_poses"] == 256
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


# -- energy (handforge energy) and the held-out splits of the report ----------------------------------


@pytest.fixture
def fresh_accelerate():
    """In-process commands build an Accelerator each; reset its global state after the test."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def loaded_vae(run_dir, hidden, joints):
    """The run's exported prior in a fresh hand_vae, loaded from its safetensors file, eval mode."""
    from safetensors.torch import load_model

    from handforge.plugins.backbones.hand_vae import HandVae, HandVaeConfig
    model = HandVae(HandVaeConfig(hidden=hidden), joints=joints)
    load_model(model, str(run_dir / "weights" / "prior.safetensors"))
    return model.eval()


def hand_energy(model, poses, beta, draws=None):
    """Energy written out from the encoder / decoder outputs: squared Frobenius distance of the
    rotation matrices (SciPy's) at z = mu, or averaged over z = mu + sigma * eps for each eps in
    ``draws``, plus beta x the closed-form Gaussian KL (NumPy)."""
    x = torch.as_tensor(poses, dtype=torch.float32)
    target = Rotation.from_rotvec(x.double().numpy().reshape(-1, 3)).as_matrix().reshape(len(x), -1, 3, 3)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        zs = [mu] if draws is None else [mu + (0.5 * logvar).exp() * eps for eps in draws]
        rec = np.mean([((model.decode(z).double().numpy() - target) ** 2).sum((1, 2, 3)) for z in zs], axis=0)
    mu, logvar = mu.double().numpy(), logvar.double().numpy()
    kl = 0.5 * (mu ** 2 + np.exp(logvar) - 1.0 - logvar).sum(1)
    return rec + beta * kl


def test_energy_command_equals_a_hand_computation_and_ranks_real_poses_low(trained_prior, tmp_path, capsys,
                                                                         fresh_accelerate):
    from conftest import cli_exit
    real = HandshapePoses(HandshapePosesConfig(length=300), "val").__getitems__(list(range(300)))["hand_pose"].numpy()
    uniform = np.random.default_rng(1).uniform(-1.5, 1.5, size=(300, 45)).astype(np.float32)
    model = loaded_vae(trained_prior, hidden=128, joints=15)
    results = {}
    for name, poses in (("real", real), ("uniform", uniform)):
        np.savez(tmp_path / f"{name}.npz", right=poses)
        out = tmp_path / f"{name}.npy"
        code, stdout, stderr = cli_exit(capsys, "energy", trained_prior, tmp_path / f"{name}.npz", "--out", out, "--json")
        assert code == 0, stderr
        summary, energies = json.loads(stdout), np.load(out)
        expected = hand_energy(model, poses, beta=0.01)
        np.testing.assert_allclose(energies, expected, rtol=1e-4, atol=1e-4)
        assert summary["count"] == 300 and summary["beta"] == 0.01 and summary["samples"] == 0
        for key, value in (("mean", expected.mean()), ("median", np.median(expected)),
                           ("p5", np.percentile(expected, 5)), ("p95", np.percentile(expected, 95))):
            assert summary[key] == pytest.approx(value, rel=1e-4), key
        results[name] = energies
    # poses like the training ones are far more probable than uniform noise in axis-angle space
    assert np.percentile(results["real"], 95) * 10 < np.percentile(results["uniform"], 5)

    # K posterior draws: the reconstruction averaged over eps_k ~ N(0, I) from the seeded generator
    code, stdout, stderr = cli_exit(capsys, "energy", trained_prior, tmp_path / "real.npz", "--samples", 3,
                                    "--seed", 7, "--out", tmp_path / "k3.npy")
    assert code == 0, stderr
    generator = torch.Generator().manual_seed(7)
    draws = [torch.randn(300, model.latent_dim, generator=generator) for _ in range(3)]
    np.testing.assert_allclose(np.load(tmp_path / "k3.npy"), hand_energy(model, real, 0.01, draws),
                               rtol=1e-4, atol=1e-4)
    assert "averaged over 3 posterior draws (seed 7)" in stdout


def test_energy_command_bad_inputs_exit_2_with_one_message(trained_prior, tmp_path, capsys, fresh_accelerate):
    from conftest import cli_exit
    from test_generate import tiny_raw, train
    good = tmp_path / "good.npz"
    np.savez(good, right=np.zeros((4, 45), np.float32))
    cases = {
        "shape": ({"right": np.zeros((4, 44), np.float32)}, "key 'right': expected (N, 45)"),
        "nan": ({"right": np.full((4, 45), np.nan, np.float32)}, "key 'right': NaN at pose 0, value 0"),
        "pickle": ({"right": np.array([{"a": 1}], dtype=object)}, "pickled objects, which handforge never unpickles"),
        "left_only": ({"left": np.zeros((4, 45), np.float32)}, "no 'right' poses; this prior (input = \"hand_pose\")"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **content)
        code, _, err = cli_exit(capsys, "energy", trained_prior, path)
        assert code == 2 and message in err and str(path) in err and "Traceback" not in err, err
    np.save(tmp_path / "single.npy", np.zeros((4, 45), np.float32))
    (tmp_path / "taken.npy").write_bytes(b"mine")
    prepared = tmp_path / "prepared"
    (prepared / "val").mkdir(parents=True)
    (prepared / "dataset_metadata.json").write_text("{}")
    for args, message in [
        ((tmp_path / "nope", good), "not a run directory (no recipe.toml)"),
        ((trained_prior, tmp_path / "nope.npz"), "nope.npz: no such file or folder"),
        ((trained_prior, tmp_path / "single.npy"), "a single array, not an .npz archive"),
        ((trained_prior, good, "--out", tmp_path / "taken.npy"), "taken.npy exists; choose another file or add --overwrite"),
        ((trained_prior, good, "--out", tmp_path / "e.txt"), "must end in .npy"),
        ((trained_prior, good, "--samples", -1), "--samples must be 0"),
        ((trained_prior, prepared), "is a prepared mocap folder; add --split test"),
        ((trained_prior, prepared, "--split", "test"), "has no folder test/"),
    ]:
        code, _, err = cli_exit(capsys, "energy", *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    assert (tmp_path / "taken.npy").read_bytes() == b"mine"  # refused, not replaced
    (tmp_path / "taken.npz").write_bytes(b"mine")
    code, _, err = cli_exit(capsys, "sample-poses", trained_prior, "--num", 2, "--out", tmp_path / "taken.npz")
    assert code == 2 and "taken.npz exists; choose another file or add --overwrite" in err, err
    code, _, err = cli_exit(capsys, "energy", trained_prior, good, "--out", tmp_path / "taken.npy", "--overwrite")
    assert code == 0 and np.load(tmp_path / "taken.npy").shape == (4,), err
    gan = train(tiny_raw(tmp_path, "gan"))
    code, _, err = cli_exit(capsys, "energy", gan, good)
    assert code == 2 and "is a run of task 'gan', not pose_prior" in err, err


def write_prepared(root, splits):
    """A prepared mocap folder as `handforge prepare mocap` lays it out, from (N, 90) arrays per split."""
    for split, poses in splits.items():
        folder = root / split
        folder.mkdir(parents=True)
        np.save(folder / "left.npy", np.ascontiguousarray(poses[:, :45], dtype=np.float32))
        np.save(folder / "right.npy", np.ascontiguousarray(poses[:, 45:], dtype=np.float32))
        np.save(folder / "source.npy", np.zeros(len(poses), np.int16))
        np.save(folder / "frame.npy", np.arange(len(poses), dtype=np.int32))
    (root / "dataset_metadata.json").write_text(json.dumps({"sources": ["CMU"]}))


def test_report_scores_val_and_test_splits_each_from_its_own_poses(tmp_path, capsys, fresh_accelerate):
    from conftest import cli_exit
    from handforge.prdc import prdc
    from handforge.runs import load_run
    torch.set_num_threads(1)
    handshapes = HandshapePoses(HandshapePosesConfig(length=3300), "train").__getitems__(list(range(3300)))["hand_pose90"]
    uniform = torch.from_numpy(np.random.default_rng(2).uniform(-1.2, 1.2, size=(400, 90)).astype(np.float32))
    # val: poses like the training ones; test: uniform noise, which a prior of handshapes cannot explain
    write_prepared(tmp_path / "prepared", {"train": handshapes[:3000].numpy(), "val": handshapes[3000:].numpy(),
                                           "test": uniform.numpy()})
    code, _, err = cli_exit(capsys, "run", REPO / "recipes" / "hand_prior.toml", f"data.root={tmp_path / 'prepared'}",
                            f"output_dir={tmp_path}", "train.steps=300", "train.batch_size=256", "task.eval_poses=200",
                            "task.kl_warmup_steps=50", "model.prior.hidden=64", "train.progress=false", "eval.every=0",
                            "train.checkpoint_every=0")
    assert code == 0, err
    run_dir = tmp_path / "hand_prior"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final, last_eval = records[-1], records[-2]
    assert final["type"] == "final" and last_eval["type"] == "eval"
    report = json.loads((run_dir / "final" / "report.json").read_text())
    assert set(report) == {"val", "test", "samples"} and report["val"]["poses"] == report["test"]["poses"] == 200
    for split in ("val", "test"):
        for key in ("rec_deg", "rec_deg_p95", "kl", "energy", "precision", "recall", "density", "coverage"):
            assert final[f"{split}_{key}"] == report[split][key] == pytest.approx(last_eval[f"{split}_{key}"])
    assert final["test_rec_deg"] > 3 * final["val_rec_deg"] and final["test_energy"] > 10 * final["val_energy"]
    assert "| test | 200 |" in (run_dir / "final" / "report.md").read_text()

    # test's numbers come from 200 test poses spread over the 400 (every other one): rebuilt here
    # from the exported weights
    model = loaded_vae(run_dir, hidden=64, joints=30)
    test = uniform[::2]
    with torch.no_grad():
        mu, logvar = model.encode(test)
        rotations = model.decode(mu).double().numpy().reshape(-1, 3, 3)
    truth = Rotation.from_rotvec(test.double().numpy().reshape(-1, 3))
    degrees = np.degrees((Rotation.from_matrix(rotations).inv() * truth).magnitude())
    assert report["test"]["rec_deg"] == pytest.approx(degrees.mean(), abs=0.1)  # the 1e-6 clamp: < 0.1 degree
    assert report["test"]["rec_deg_p95"] == pytest.approx(np.percentile(degrees, 95), abs=0.1)
    assert report["test"]["energy"] == pytest.approx(hand_energy(model, test, beta=0.01).mean(), rel=1e-4)
    task = load_run(run_dir, device="cpu").task
    samples = task.sample_poses(200, 1.0, torch.Generator().manual_seed(0))
    for key, value in prdc(test, samples, k=5).items():
        assert report["test"][key] == pytest.approx(value), key

    # and the energy command reads the prepared folder's split itself
    code, stdout, err = cli_exit(capsys, "energy", run_dir, tmp_path / "prepared", "--split", "test", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["count"] == 400 and summary["mean"] == pytest.approx(
        hand_energy(model, uniform, beta=0.01).mean(), rel=1e-4)


def test_test_poses_option_finds_a_prepared_test_split_or_reads_the_file_given(tmp_path):
    from types import SimpleNamespace

    from handforge.errors import HandforgeError
    from handforge.plugins.tasks.pose_prior import PosePriorConfig, PosePriorTask
    poses = GEN.normal(0, 0.3, size=(40, 90)).astype(np.float32)
    write_prepared(tmp_path / "prepared", {"val": poses[:20], "test": poses})
    (tmp_path / "no_test").mkdir()

    def test_sets(root, **options):
        task = PosePriorTask(PosePriorConfig(eval_poses=16, **options))
        config = SimpleNamespace(root=None if root is None else str(root))
        return task._test_poses(SimpleNamespace(recipe=SimpleNamespace(data=SimpleNamespace(config=config))))

    spread = np.arange(16) * 40 // 16  # 16 rows evenly over the 40, not the first 16
    np.testing.assert_array_equal(test_sets(tmp_path / "prepared")["test"].numpy(), poses[spread])  # left 45, right 45
    assert test_sets(tmp_path / "no_test") == {} and test_sets(None) == {}
    assert test_sets(tmp_path / "prepared", test_poses="none") == {}
    np.savez(tmp_path / "right.npz", right=poses[:, 45:])
    np.testing.assert_array_equal(test_sets(None, test_poses=str(tmp_path / "right.npz"), input="right")["test"].numpy(),
                                  poses[spread, 45:])
    with pytest.raises(HandforgeError, match="right.npz: no 'left' poses; this prior .input = \"both\". scores left"):
        test_sets(None, test_poses=str(tmp_path / "right.npz"))
    np.savez(tmp_path / "uneven.npz", right=poses[:, 45:], left=poses[:30, :45])
    with pytest.raises(HandforgeError, match="'left' has 30 poses, 'right' 40"):
        test_sets(None, test_poses=str(tmp_path / "uneven.npz"))
    np.savez(tmp_path / "few.npz", right=poses[:5, 45:])
    with pytest.raises(HandforgeError, match="5 poses; scoring needs more than prdc_k = 5"):
        test_sets(None, test_poses=str(tmp_path / "few.npz"), input="right")
