"""``handforge generate`` and the ``generated`` dataset: manifest round trip (bit-for-bit regeneration),
determinism, resume of an interrupted export, pose-conditioned exports, option errors."""
import hashlib
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from handforge.errors import HandforgeError
from handforge.imaging import to_uint8

SIZE = 16
FINGERSPELLING = 16  # classes of procedural_hands' "fingerspelling" set


@pytest.fixture(autouse=True)
def reset_accelerate():
    torch.set_num_threads(1)
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_raw(root, name, pose=False, truncation=0.0):
    g_cond = {"name": "spade", "maps": "limbs", "hidden": 4} if pose else {"name": "cbn"}
    d_cond = {"name": "concat", "maps": "limbs"} if pose else {"name": "projection"}
    return {
        "name": name, "seed": 0, "output_dir": str(root / "runs"),
        "task": {"name": "gan", "truncation": truncation},
        "data": {"name": "procedural_hands", "size": SIZE, "classes": "fingerspelling"},
        "model": {"generator": {"name": "deep_conv", "ch": 4, "z_dim": 8}, "discriminator": {"name": "deep_conv", "ch": 4},
                  "g_conditioner": g_cond, "d_conditioner": d_cond},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "progress": False, "tensorboard": False},
    }


def train(raw):
    from handforge.loop import Trainer
    from handforge.plugin_manager import PluginHost
    from handforge.recipe import resolve

    from accelerate.state import AcceleratorState, GradientState

    torch.set_num_threads(1)
    host = PluginHost()
    host.load_builtins()
    run = Trainer(resolve(raw, host=host), host).run()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return run.run_dir


@pytest.fixture(scope="module")
def label_run(tmp_path_factory):
    return train(tiny_raw(tmp_path_factory.mktemp("label"), "label"))


@pytest.fixture(scope="module")
def pose_run(tmp_path_factory):
    return train(tiny_raw(tmp_path_factory.mktemp("pose"), "pose", pose=True))


def export(run_dir, out, **options):
    from handforge.plugins.export.generate import ExportOptions, export

    defaults = {"per_class": 2, "batch_size": 5, "progress": False, "workers": 2}
    return export(ExportOptions(run_dir=run_dir, out=out, **{**defaults, **options}))


def png_pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def files_of(folder) -> dict:
    folder = pathlib.Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_label_export_manifest_regenerates_every_image_bit_for_bit(label_run, tmp_path):
    from handforge.runs import load_run

    result = export(label_run, tmp_path / "out", truncation=0.7, seed=3)
    assert result.complete and result.written == result.total == 2 * FINGERSPELLING
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    settings = manifest["settings"]
    assert manifest["complete"] and len(manifest["class_names"]) == FINGERSPELLING
    assert settings["recipe_sha256"] == hashlib.sha256((label_run / "recipe.toml").read_bytes()).hexdigest()
    step = label_run / "checkpoints" / "step_00000002"
    digest = hashlib.sha256()
    for file in sorted(p for p in step.rglob("*") if p.is_file()):
        digest.update(file.relative_to(step).as_posix().encode() + b"\0" + file.read_bytes())
    assert settings["checkpoint_sha256"] == digest.hexdigest()
    assert settings["truncation"] == 0.7 and settings["condition_fields"] == ["label"] and settings["poses"] is None
    labels = [r["label"] for r in manifest["images"]]
    assert labels == sorted(list(range(FINGERSPELLING)) * 2)
    assert len({r["seed"] for r in manifest["images"]}) == len(labels)
    assert all(r["file"].startswith(r["class_name"] + "/") for r in manifest["images"])

    # Regenerated from the manifest alone, by the task's plain forward with each image's own noise.
    run = load_run(label_run, split="train", checkpoint="last")
    run.task.config.truncation = settings["truncation"]
    generator = run.task.ema.eval()
    groups = {}
    for record in manifest["images"]:
        groups.setdefault(record["batch"], []).append(record)
    for records in groups.values():
        z = []
        for record in records:
            rng = torch.Generator().manual_seed(record["seed"])
            row = torch.randn(1, 8, generator=rng)
            while (row.abs() > 0.7).any():  # BigGAN truncation: redraw entries beyond the threshold
                outside = row.abs() > 0.7
                row[outside] = torch.randn(int(outside.sum()), generator=rng)
            z.append(row)
        with torch.no_grad():
            images = generator(torch.cat(z), torch.tensor([r["label"] for r in records]))
        for record, pixels in zip(records, to_uint8(images)):
            assert np.array_equal(png_pixels(tmp_path / "out" / record["file"]), pixels), record["file"]


def test_generated_dataset_reads_the_export_back(label_run, tmp_path, host):
    from handforge.data import check_sample

    export(label_run, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    entry = host.registry("dataset").get("generated")
    config = entry.config_cls(path=str(tmp_path / "out"))
    assert entry.fields_provided(config) == frozenset({"image", "label"})
    dataset = entry.factory(config, split="train")
    assert len(dataset) == len(manifest["images"]) and dataset.class_names == manifest["class_names"]
    for i in (0, 7, len(dataset) - 1):
        sample = dataset[i]
        check_sample(sample)
        record = manifest["images"][i]
        expected = torch.from_numpy(png_pixels(tmp_path / "out" / record["file"])).permute(2, 0, 1).double() / 127.5 - 1
        assert torch.allclose(sample["image"].double(), expected, atol=1e-6)
        assert sample["label"].item() == record["label"] and set(sample) == {"image", "label"}
    val = entry.factory(entry.config_cls(path=str(tmp_path / "out"), val_fraction=0.5), split="val")
    assert [r["index"] for r in val.records] == [r["index"] for r in manifest["images"] if r["index"] % 2 == 1]


def test_export_is_deterministic_and_an_interrupted_one_continues(label_run, tmp_path):
    whole = export(label_run, tmp_path / "whole", workers=1)
    again = export(label_run, tmp_path / "again", workers=3)
    assert whole.complete and again.complete
    assert files_of(tmp_path / "whole") == files_of(tmp_path / "again")

    part = export(label_run, tmp_path / "part", limit=7)  # stops after whole batches: 2 of 5 images
    assert not part.complete and part.written == 10
    manifest = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert not manifest["complete"] and len(list((tmp_path / "part").rglob("*.png"))) == 10
    from handforge.errors import DataError
    from handforge.plugins.export.generated_dataset import GeneratedConfig, GeneratedImages

    with pytest.raises(DataError, match="incomplete"):
        GeneratedImages(GeneratedConfig(path=str(tmp_path / "part")))
    # A lost file redoes its batch; an edited setting is refused, naming it.
    (tmp_path / "part" / manifest["images"][6]["file"]).unlink()
    with pytest.raises(HandforgeError, match="seed: 0 there, 1 now"):
        export(label_run, tmp_path / "part", seed=1)
    rest = export(label_run, tmp_path / "part")
    assert rest.complete and rest.written == 2 * FINGERSPELLING - 5
    assert files_of(tmp_path / "part") == files_of(tmp_path / "whole")


def test_pose_conditioned_export_uses_real_keypoints_of_each_class(pose_run, tmp_path, host):
    from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig

    result = export(pose_run, tmp_path / "real", per_class=1, checkpoint="weights")
    assert result.complete
    manifest = json.loads((tmp_path / "real" / "manifest.json").read_text())
    assert manifest["settings"]["condition_fields"] == ["keypoints"] and manifest["settings"]["poses"] == "real"
    train = ProceduralHands(ProceduralHandsConfig(size=SIZE, classes="fingerspelling"), "train")
    labels = train.__getitems__(list(range(400)))["label"].tolist()
    for record in manifest["images"]:
        first = labels.index(record["label"])  # the class's first training sample
        assert record["source_index"] == first
        assert torch.equal(torch.tensor(record["keypoints"]), train[first]["keypoints"])
    dataset = host.registry("dataset").get("generated").factory(
        host.registry("dataset").get("generated").config_cls(path=str(tmp_path / "real")))
    assert set(dataset[0]) == {"image", "label", "keypoints"}
    assert torch.equal(dataset[3]["keypoints"], torch.tensor(manifest["images"][3]["keypoints"]))

    export(pose_run, tmp_path / "sampled", per_class=1, checkpoint="weights", poses="sampled")
    sampled = json.loads((tmp_path / "sampled" / "manifest.json").read_text())
    assert sampled["settings"]["pose_seed"] == 1
    other = ProceduralHands(ProceduralHandsConfig(size=SIZE, classes="fingerspelling", seed=1), "train")
    record = sampled["images"][0]
    assert torch.equal(torch.tensor(record["keypoints"]), other[record["source_index"]]["keypoints"])
    assert record["keypoints"] != manifest["images"][0]["keypoints"]


def test_option_errors_name_the_option(label_run, tmp_path):
    with pytest.raises(HandforgeError, match="--checkpoint best: .*not a complete checkpoint"):
        export(label_run, tmp_path / "a", checkpoint="best")
    with pytest.raises(HandforgeError, match="--checkpoint nowhere: not a checkpoint folder"):
        export(label_run, tmp_path / "a", checkpoint="nowhere")
    with pytest.raises(HandforgeError, match="--truncation 0.001"):
        export(label_run, tmp_path / "a", truncation=0.001)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(HandforgeError, match="not empty and holds no manifest.json"):
        export(label_run, tmp_path / "full")


def test_generate_command_line(label_run, tmp_path, capsys):
    from handforge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(label_run), "--per-class", "1", "--out", str(tmp_path / "cli"), "--no-progress",
              "--batch-size", "8"])
    assert exit_info.value.code == 0
    assert "generated 16 images" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").rglob("*.png"))) == FINGERSPELLING


@pytest.mark.slow
def test_two_processes_split_the_export_and_write_the_same_files(label_run, tmp_path):
    # `accelerate launch` (fresh processes: a fork of this one can hang in OpenMP, see conftest).
    from conftest import REPO, launch_two_processes

    export(label_run, tmp_path / "one")
    result = launch_two_processes(REPO / "run.py", "generate", label_run, "--per-class", "2", "--batch-size", "5",
                                  "--workers", "2", "--no-progress", "--out", tmp_path / "two")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["images"]) == 2 * FINGERSPELLING
    # Each image's noise comes from its own seed, so the split across processes changes no byte.
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")
