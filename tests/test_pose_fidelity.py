"""``pose_fidelity``: a keypoints run judges the poses of generated images, on sources and in a run."""
import json

import pytest
import torch
from safetensors.torch import load_model

from handforge.errors import HandforgeError, RecipeError
from handforge.plugins.metrics.inputs import SourceInputs
from handforge.keypoint_math import keypoint_report
from handforge.plugins.metrics.pose_fidelity import KeypointJudge, PoseFidelity, PoseFidelityConfig
from handforge.plugins.metrics.sources import open_source
from test_generate import tiny_raw, train

SIZE = 32
DATASET = f"dataset:procedural_hands:size={SIZE},hand_size=[0.55,0.8]"


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def keypoints_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kp")
    return train({
        "name": "kp", "seed": 0, "output_dir": str(root / "runs"),
        "task": {"name": "keypoints", "val_samples": 8},
        "data": {"name": "procedural_hands", "size": SIZE, "hand_size": [0.55, 0.8]},
        "model": {"regressor": {"name": "simple_cnn", "width": 4}},
        "train": {"steps": 3, "batch_size": 8, "log_every": 1, "progress": False, "tensorboard": False},
        "eval": {"every": 3, "best_metric": "pck@0.05", "best_mode": "max", "metrics": [{"name": "pck"}]},
    })


def test_scores_equal_keypoint_report_of_the_judges_predictions(keypoints_run, host):
    # Fakes and reals from one source: both sides must be the report of the regressor's own output
    # on those images, which is rebuilt here from the registry and the weight file.
    source = open_source(DATASET, num=24, host=host)
    inputs = SourceInputs(open_source(DATASET, num=24, host=host), source, batch_size=10, cache=False)
    metric = PoseFidelity(PoseFidelityConfig(regressor=str(keypoints_run)))
    values = metric.measure(inputs)

    entry = host.registry("backbone").get("simple_cnn")
    model = entry.factory(entry.config_cls(width=4), role="keypoints", image_size=SIZE, num_keypoints=21,
                          head="regression")
    load_model(model, str(keypoints_run / "weights" / "regressor.safetensors"))
    batch = source.read_all()
    with torch.no_grad():
        found = model.eval()(batch.images.float() / 127.5 - 1)["coords"]
    expected = keypoint_report(found, batch.keypoints[..., :2], batch.keypoints[..., 2] > 0, SIZE)
    for name, value in expected.items():
        assert values[f"pose_{name}"] == pytest.approx(value, abs=1e-6)
        assert values[f"pose_real_{name}"] == pytest.approx(value, abs=1e-6)


def test_larger_images_are_resized_to_the_judges_input(keypoints_run):
    judge = KeypointJudge(keypoints_run)
    images = torch.randint(0, 256, (2, 3, 2 * SIZE, 2 * SIZE), dtype=torch.uint8)
    small = torch.nn.functional.interpolate(images.float(), size=(SIZE, SIZE), mode="bilinear", antialias=True)
    with torch.no_grad():
        direct = judge.model(small / 127.5 - 1)["coords"]
    assert torch.allclose(judge(images), direct, atol=1e-5)
    # The only evaluation was at the last step: the best checkpoint holds the final weights.
    assert torch.equal(KeypointJudge(keypoints_run, "best")(images), judge(images))


def test_in_a_pose_gan_run_the_metric_is_logged(keypoints_run, tmp_path):
    raw = tiny_raw(tmp_path, "posegan", pose=True)
    raw["data"] = {"name": "procedural_hands", "size": SIZE, "hand_size": [0.55, 0.8]}
    raw["eval"] = {"every": 2, "metrics": [{"name": "pose_fidelity", "regressor": str(keypoints_run),
                                           "num_samples": 12, "batch_size": 6}]}
    run_dir = train(raw)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("type") == "eval"]
    assert [r["step"] for r in evals] == [2]
    for prefix in ("pose_", "pose_real_"):
        assert 0.0 <= evals[0][f"{prefix}pck@0.2bbox"] <= 1.0 and evals[0][f"{prefix}epe_px"] > 0


def test_the_regressor_option_is_required_and_checked(keypoints_run, tmp_path, host):
    from handforge.recipe import resolve_component

    with pytest.raises(RecipeError, match="regressor: required"):
        resolve_component({"name": "pose_fidelity"}, "metric", "eval.metrics[0]", host=host)
    with pytest.raises(HandforgeError, match="not a run directory"):
        PoseFidelity(PoseFidelityConfig(regressor=str(tmp_path)))
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "recipe.toml").write_bytes((keypoints_run / "recipe.toml").read_bytes())
    with pytest.raises(HandforgeError, match=r"no checkpoints/best/model.safetensors \(did the run finish with eval"):
        PoseFidelity(PoseFidelityConfig(regressor=str(tmp_path / "copy"), checkpoint="best"))
    gan = train(tiny_raw(tmp_path, "label"))
    with pytest.raises(HandforgeError, match="task 'gan' has no 'regressor'"):
        PoseFidelity(PoseFidelityConfig(regressor=str(gan)))


def test_a_source_without_keypoints_is_named(keypoints_run, tmp_path, host):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (SIZE, SIZE), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    inputs = SourceInputs(None, open_source(str(tmp_path), host=host), cache=False, metric="pose_fidelity")
    metric = PoseFidelity(PoseFidelityConfig(regressor=str(keypoints_run), reference=False))
    with pytest.raises(HandforgeError, match="needs the keypoints of the --fake images"):
        metric.measure(inputs)


def test_evaluate_command_takes_the_regressor(keypoints_run, capsys):
    from handforge.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--real", DATASET + ",split=val", "--fake", DATASET, "--metrics", "pose_fidelity",
              "--regressor", str(keypoints_run), "--num", "8", "--no-cache", "--json"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    metrics = json.loads(out)["metrics"]
    assert set(metrics) == {f"{p}{k}" for p in ("pose_", "pose_real_")
                            for k in ("pck@0.05", "pck@0.2bbox", "auc@30px", "epe_px")}
