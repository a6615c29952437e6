"""``handforge generate --variations N --of K``: N images of each of K synthetic individuals, from GAN
and diffusion runs, through the export path; the manifest's grouping, determinism, the GAN's z
perturbation and fixed-noise pose variations checked against the generator's plain forward."""
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from handforge.errors import HandforgeError
from handforge.imaging import to_uint8
from test_generate import FINGERSPELLING, reset_accelerate, tiny_raw, train  # noqa: F401  (fixture)

PLUGIN = pathlib.Path(__file__).parent / "diffusion_plugin.py"


@pytest.fixture(scope="module")
def label_gan(tmp_path_factory):
    return train(tiny_raw(tmp_path_factory.mktemp("vlabel"), "vlabel"))


@pytest.fixture(scope="module")
def pose_gan(tmp_path_factory):
    return train(tiny_raw(tmp_path_factory.mktemp("vpose"), "vpose", pose=True))


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vdiff")
    return train({
        "name": "vdiff", "seed": 2, "output_dir": str(root / "runs"), "plugins": [str(PLUGIN)],
        "task": {"name": "diffusion", "num_timesteps": 50, "sampling_steps": 4, "sample_count": 4},
        "data": {"name": "procedural_hands", "size": 16},
        "model": {"denoiser": {"name": "test_tiny_denoiser"}, "conditioner": {"name": "test_denoise_label"}},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "progress": False, "tensorboard": False},
    })


def variations(run_dir, out, **options):
    from handforge.plugins.export.variations import VariationOptions, export_variations

    defaults = {"variations": 3, "individuals": 4, "batch_size": 6, "progress": False, "workers": 2}
    return export_variations(VariationOptions(run_dir=run_dir, out=out, **{**defaults, **options}))


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB")).astype(np.int64)


def manifest_of(out) -> dict:
    return json.loads((pathlib.Path(out) / "manifest.json").read_text())


def by_individual(out) -> dict:
    groups = {}
    for record in manifest_of(out)["images"]:
        groups.setdefault(record["individual"], []).append(pixels(pathlib.Path(out) / record["file"]))
    return groups


def mean_distance(images_a, images_b) -> float:
    return float(np.mean([np.abs(a - b).mean() for a in images_a for b in images_b if a is not b]))


def test_gan_label_variations_group_by_individual_and_follow_the_z_perturbation(label_gan, tmp_path):
    from handforge.runs import load_run

    result = variations(label_gan, tmp_path / "a", strength=0.3, seed=5)
    assert result.complete and result.total == result.written == 12
    manifest = manifest_of(tmp_path / "a")
    settings, records = manifest["settings"], manifest["images"]
    assert settings["method"] == "perturb" and settings["strength"] == 0.3 and settings["variations"] == 3
    assert [(r["individual"], r["variation"]) for r in records] == [(k, j) for k in range(4) for j in range(3)]
    assert [r["label"] for r in records[::3]] == [0, 1, 2, 3]  # individual k: class k mod C
    assert all(r["file"].startswith(f"individual_{r['individual']:04d}/") for r in records)
    assert [r["batch"] for r in records] == [0] * 6 + [1] * 6  # batch_size 6 // N 3: two individuals a batch

    # An independent reading of the contract: one z per individual, z_j = sqrt(1 - s^2) z + s eps_j
    # from the batch's seeded generator, through the EMA generator's plain forward.
    run = load_run(label_gan, split="train", checkpoint="last")
    ema = run.task.ema.eval()
    for b in (0, 1):
        batch = [r for r in records if r["batch"] == b]
        rng = torch.Generator().manual_seed(batch[0]["batch_seed"])
        z = torch.randn(2, 8, generator=rng).repeat_interleave(3, dim=0)
        z = z * (1 - 0.09) ** 0.5 + torch.randn(z.shape, generator=rng) * 0.3
        with torch.no_grad():
            images = ema(z, torch.tensor([r["label"] for r in batch]))
        for record, expected in zip(batch, to_uint8(images)):
            assert np.array_equal(pixels(tmp_path / "a" / record["file"]), expected), record["file"]

    groups = by_individual(tmp_path / "a")
    for images in groups.values():  # variations differ from each other ...
        assert all(np.abs(images[0] - other).max() > 0 for other in images[1:])
    within = np.mean([mean_distance(images, images) for images in groups.values()])
    between = np.mean([mean_distance(groups[a], groups[b]) for a in groups for b in groups if a < b])
    assert within < between  # ... and stay nearer their individual than other individuals are


def test_variations_are_a_function_of_the_seed_and_continue_when_interrupted(label_gan, tmp_path):
    def files(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}

    variations(label_gan, tmp_path / "a", seed=1)
    partial = variations(label_gan, tmp_path / "b", seed=1, limit=6)
    assert not partial.complete and partial.written == 6 and not manifest_of(tmp_path / "b")["complete"]
    rest = variations(label_gan, tmp_path / "b", seed=1)
    assert rest.complete and rest.written == 6
    assert files(tmp_path / "a") == files(tmp_path / "b")
    variations(label_gan, tmp_path / "c", seed=2)
    assert files(tmp_path / "a").keys() == files(tmp_path / "c").keys() != files(tmp_path / "a")
    with pytest.raises(HandforgeError, match="other settings.*strength"):
        variations(label_gan, tmp_path / "a", seed=1, strength=0.9)


def test_pose_variations_keep_the_noise_and_take_the_poses_of_the_class(pose_gan, tmp_path):
    from handforge.runs import load_run

    variations(pose_gan, tmp_path / "p", variations=3, individuals=2, strength=0.2)
    manifest = manifest_of(tmp_path / "p")
    assert manifest["settings"]["method"] == "poses" and manifest["settings"]["strength"] is None
    records = manifest["images"]
    run = load_run(pose_gan, split="train", checkpoint="last")
    for record in records:  # the pose is the real sample's
        source = run.dataset[record["source_index"]]
        assert source["label"] == record["label"] == record["individual"] % FINGERSPELLING
        assert torch.equal(torch.tensor(record["keypoints"]), source["keypoints"])
    first = [r["keypoints"] for r in records if r["individual"] == 0]
    assert first[0] != first[1] != first[2]

    # The same z for all of an individual's poses: the generator's forward with z repeated.
    rng = torch.Generator().manual_seed(records[0]["batch_seed"])
    z = torch.randn(2, 8, generator=rng).repeat_interleave(3, dim=0)
    batch = {"keypoints": torch.tensor([r["keypoints"] for r in records]),
             "label": torch.tensor([r["label"] for r in records])}
    with torch.no_grad():
        images = run.task.ema.eval()(z, run.task.g_cond.condition(batch))
    for record, expected in zip(records, to_uint8(images)):
        assert np.array_equal(pixels(tmp_path / "p" / record["file"]), expected), record["file"]
    # Strength does not enter: pose variations are the poses alone.
    variations(pose_gan, tmp_path / "q", variations=3, individuals=2, strength=0.9)
    for record in records:
        assert np.array_equal(pixels(tmp_path / "p" / record["file"]), pixels(tmp_path / "q" / record["file"]))


def test_diffusion_variations_through_the_command_line(diffusion_run, tmp_path, capsys):
    from conftest import cli_exit

    out = tmp_path / "d"
    code, stdout, _ = cli_exit(capsys, "generate", diffusion_run, "--variations", 2, "--of", 3, "--out", out,
                               "--strength", 0.6, "--no-progress", "--batch-size", 4)
    assert code == 0 and "generated 6 images" in stdout
    manifest = manifest_of(out)
    assert manifest["complete"] and manifest["settings"]["task"] == "diffusion"
    assert manifest["settings"]["method"] == "perturb" and manifest["settings"]["strength"] == 0.6
    assert [(r["individual"], r["variation"]) for r in manifest["images"]] == [(k, j) for k in range(3) for j in range(2)]
    groups = by_individual(out)
    assert all(np.abs(images[0] - images[1]).max() > 0 for images in groups.values())
    again = tmp_path / "e"
    assert cli_exit(capsys, "generate", diffusion_run, "--variations", 2, "--of", 3, "--out", again,
                    "--strength", 0.6, "--no-progress", "--batch-size", 4)[0] == 0
    assert all(np.array_equal(a, b) for k in groups for a, b in zip(groups[k], by_individual(again)[k]))


@pytest.mark.parametrize("args, message", [
    (["--variations", 0, "--of", 2], "--variations must be at least 1"),
    (["--variations", 2, "--of", 0], "--of must be at least 1"),
    (["--variations", 2, "--of", 2, "--strength", 0], r"--strength must be in \(0, 1\], got 0"),
    (["--variations", 2, "--of", 2, "--strength", 1.5], r"--strength must be in \(0, 1\]"),
    (["--variations", 2], "--variations N needs --of K"),
    (["--variations", 2, "--of", 2, "--per-class", 1], "--per-class and --variations"),
    (["--per-class", 1, "--strength", 0.5], "--strength: only with --variations"),
    ([], "give --per-class N"),
])
def test_bad_variation_options_name_the_flag(label_gan, tmp_path, capsys, args, message):
    import re

    from conftest import cli_exit

    code, _, err = cli_exit(capsys, "generate", label_gan, "--out", tmp_path / "x", "--no-progress", *args)
    assert code == 2 and re.search(message, err) and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_a_classifier_run_cannot_make_variations(tmp_path, capsys):
    from conftest import cli_exit

    run_dir = train({
        "name": "vclf", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "task": {"name": "classifier", "mode": "real", "real_per_class": 1, "val_samples": 4, "test_samples": 4},
        "data": {"name": "procedural_hands", "size": 16, "classes": "fingerspelling"},
        "model": {"classifier": {"name": "resnet18", "width": 4}},
        "train": {"steps": 1, "batch_size": 4, "log_every": 1, "progress": False, "tensorboard": False},
    })
    code, _, err = cli_exit(capsys, "generate", run_dir, "--variations", 2, "--of", 2, "--out", tmp_path / "x",
                            "--no-progress")
    assert code == 2 and "--variations" in err and "cannot make variations" in err and "classifier" in err, err
    assert not (tmp_path / "x").exists()
