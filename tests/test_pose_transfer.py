"""The pose_transfer task, its networks (pose_transfer_unet, patch_gan), its losses, and its recipes
run through the real loop: on procedural pairs, on SynthSL and Bosphorus tar fixtures, under
2-process DDP, and killed and resumed to bit-identical weights."""
import json
import pathlib
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, launch_two_processes, run_cli
from handforge.keypoint_math import box_masks, hand_boxes
from handforge.toml_writer import dumps

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tar_fixtures as fx  # noqa: E402

KILL = pathlib.Path(__file__).parent / "kill_plugin.py"
RECIPE = REPO / "recipes" / "pose_transfer_hands.toml"
METRICS = ("ssim", "psnr", "hand_ssim", "hand_sharpness")  # the shipped recipe's
# The shipped recipes' networks shrunk so a step takes well under a second on a CPU.
SMALL = ["model.generator.ch=8", "model.generator.ch_max=32", "model.discriminator.ch=8",
         "model.g_conditioner.hidden=8"]


def build(host, kind, name, **context):
    entry = host.registry(kind).get(name)
    config = entry.config_cls() if entry.config_cls is not None else None
    return entry.factory(config, **context) if config is not None else entry.factory(**context)


def conditioner(host, name="spade", role="pose_transfer", size=32, maps="limbs"):
    entry = host.registry("conditioner").get(name)
    return entry.factory(entry.config_cls(maps=maps), role=role, n_classes=0, image_size=size)


def unet(host, size=32, cond="spade", **options):
    from handforge.plugins.backbones.pose_transfer import PoseTransferUnet

    return PoseTransferUnet(size, conditioner(host, cond, size=size), **options)


# -- the networks ------------------------------------------------------------------------------


def receptive_field(net, size: int) -> int:
    """Width of the input region the centre logit depends on (its gradient's support)."""
    x = torch.randn(1, 3, size, size, requires_grad=True)
    out = net(x, None)
    h, w = out.shape[-2:]
    out[0, 0, h // 2, w // 2].backward()
    columns = (x.grad.abs().sum(dim=(0, 1, 2)) > 0).nonzero()
    return int(columns.max() - columns.min() + 1)


def test_patch_gan_sees_70_pixels_with_three_strided_layers(host):
    from handforge.plugins.backbones.pose_transfer import PatchGan

    none = host.registry("conditioner").get("none").factory(None, role="discriminator", n_classes=0)
    # pix2pix's receptive fields: 1 strided layer -> 16, 2 -> 34, 3 -> 70 (Isola et al. 2017, sec. 4.4).
    for layers, field in ((1, 16), (2, 34), (3, 70)):
        net = PatchGan(256, none, ch=4, n_layers=layers, norm="none").eval()
        assert receptive_field(net, 256) == field, layers
    # the default depth follows the image size
    assert len([m for m in PatchGan(64, none, ch=4).net if isinstance(m, torch.nn.Conv2d)]) == 4  # 2 strided
    assert len([m for m in PatchGan(256, none, ch=4).net if isinstance(m, torch.nn.Conv2d)]) == 5


def test_patch_gan_reads_the_target_maps_through_its_conditioner(host):
    from handforge.plugins.backbones.pose_transfer import PatchGan

    concat = conditioner(host, "concat", role="discriminator", size=64)
    net = PatchGan(64, concat, ch=8, spectral_norm=True)
    assert net.net[0].in_channels == 3 + 20
    maps = torch.rand(2, 20, 64, 64)
    logits = net(torch.randn(2, 3, 64, 64), maps)
    assert logits.shape == (2, 1, 14, 14)  # 64 -> 32 -> 16, then two 4x4 stride-1 convs
    assert hasattr(net.net[0], "parametrizations")  # spectral norm on


def test_unet_widths_follow_the_image_size(host):
    from handforge.plugins.backbones.pose_transfer import build_pose_transfer_unet

    cond = conditioner(host, size=64)
    small = build_pose_transfer_unet(role="pose_transfer", image_size=64, conditioner=cond)
    assert small.stem[0].out_channels == 32 and len(small.down) == 3  # 64 -> 8 px
    big = build_pose_transfer_unet(role="pose_transfer", image_size=256, conditioner=conditioner(host, size=256))
    assert big.stem[0].out_channels == 64 and len(big.down) == 5
    assert [d.body[0].out_channels for d in big.down] == [128, 256, 512, 512, 512]  # capped at ch_max
    assert small.stem[0].in_channels == 3 + 2 * 20  # reference + both poses' limb maps


@pytest.mark.parametrize("cond, reinject, mode", [("spade", True, "norm"), ("concat", True, "concat"),
                                                  ("spade", False, "none")])
def test_the_target_pose_reaches_the_decoder_as_configured(host, cond, reinject, mode):
    from handforge.plugins.conditioners.pose import Spade

    torch.manual_seed(0)
    net = unet(host, 32, cond, ch=8, reinject=reinject)
    assert net.mode == mode
    spade_norms = sum(isinstance(m, Spade) for m in net.up.modules())
    assert spade_norms == (2 * len(net.up) if mode == "norm" else 0)
    first = net.up[0].conv1.in_channels
    assert first == 32 + 16 + (20 if mode == "concat" else 0)  # widths 8, 16, 32 (32 -> 8 px): 8 px level + skip
    if mode == "norm":  # SPADE's gamma / beta start at zero: give them weight to see the maps act
        for m in net.modules():
            if isinstance(m, Spade):
                torch.nn.init.normal_(m.gamma.weight, std=0.1)
    # With re-injection, the decoder alone responds to the target pose: change the maps only where
    # the encoder no longer sees them (the decoder's inputs), by calling the decoder directly.
    ref, ref_maps, maps = torch.randn(2, 3, 32, 32), torch.rand(2, 20, 32, 32), torch.rand(2, 20, 32, 32)
    net.eval()
    out = net(ref, ref_maps, maps)
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1
    h = net.stem(torch.cat([ref, ref_maps, maps], 1))
    skips = [h] + [h := d(h) for d in net.down]
    bottom = net.middle(skips[-1])

    def decode(target):
        x = bottom
        for up, skip in zip(net.up, reversed(skips[:-1])):
            x = up(x, skip, target)
        return x

    changed = (decode(maps) - decode(torch.rand(2, 20, 32, 32))).abs().max()
    assert (changed > 1e-4) == (mode != "none")


def test_unet_refuses_a_conditioner_without_maps(host):
    from handforge.errors import HandforgeError
    from handforge.plugins.backbones.pose_transfer import build_pose_transfer_unet

    with pytest.raises(HandforgeError, match="pose-map conditioner"):
        build_pose_transfer_unet(role="pose_transfer", image_size=32, conditioner=None)
    with pytest.raises(HandforgeError, match="role 'pose_transfer'"):
        build_pose_transfer_unet(role="generator", image_size=32, conditioner=conditioner(host))


def test_mobilenet_feature_maps_for_the_perceptual_term(host):
    net = build(host, "backbone", "mobilenet_v2", role="perceptual", image_size=64).eval()
    maps = net.feature_maps(torch.rand(2, 3, 64, 64) * 2 - 1, [2, 5, 12])
    # ImageNet strides whatever the image size: 1/4, 1/8, 1/16
    assert [tuple(m.shape[1:]) for m in maps] == [(24, 16, 16), (32, 8, 8), (96, 4, 4)]


# -- the losses ----------------------------------------------------------------------------------


def test_lsgan_is_mao_et_al(host):
    loss = build(host, "loss", "lsgan")
    real, fake = torch.tensor([[0.5, 2.0]]), torch.tensor([[-1.0, 0.25]])
    assert loss.d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 1.0) / 2 + 0.5 * (1.0 + 0.0625) / 2)
    assert loss.g_loss(fake).item() == pytest.approx(0.5 * (4.0 + 0.5625) / 2)


def test_hand_weighted_l1_counts_the_hand_box_more():
    from handforge.plugins.tasks.pose_transfer import PoseTransferConfig, PoseTransferTask

    task = PoseTransferTask(PoseTransferConfig(hand_weight=3.0, hand_margin=0.0))
    keypoints = torch.zeros(1, 21, 3)
    keypoints[0, :, 0] = torch.linspace(0.25, 0.5, 21)  # x from 8 to 16 px of 32
    keypoints[0, :, 1] = 0.5
    keypoints[0, :, 2] = 1
    fake, real = torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    fake[..., 0, 0] = 1.0  # an error outside the hand
    base = task.l1(fake, real, keypoints)
    assert base.item() == pytest.approx(3 / (3 * 32 * 32))
    # the same error inside the box (x 8..16 px, a 16 px box centred there: min_size) counts 4 times
    boxes, _ = hand_boxes(keypoints, 32, 32, margin=0.0)
    mask = box_masks(boxes, 32, 32)[0, 0]
    y, x = mask.nonzero()[0].tolist()
    inside = torch.zeros_like(fake)
    inside[..., y, x] = 1.0
    assert task.l1(inside, real, keypoints).item() == pytest.approx(4 * base.item())
    task.config.hand_weight = 0.0
    assert task.l1(inside, real, keypoints).item() == pytest.approx(base.item())


# -- through the real loop -------------------------------------------------------------------------


def test_the_shipped_recipe_trains_scores_and_draws_its_grid(tmp_path):
    result = run_cli("run", RECIPE, f"output_dir={tmp_path}", "train.steps=3", "train.batch_size=4",
                     "train.sample_every=3", "train.progress=false", "data.size=32", "task.sample_count=3",
                     "eval.metrics=[" + ", ".join(f'{{name = "{m}", num_samples = 8}}' for m in METRICS) + "]", *SMALL)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "pose_transfer_hands"
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["type"] == "eval" and final["hand_images"] == 8
    assert 0 < final["ssim"] < 1 and final["psnr"] > 0 and 0 <= final["hand_ssim"] < 1
    from PIL import Image

    grid = Image.open(run / "samples" / "step_00000003.png")
    # 4 cells a row (reference | pose | generated | target), 3 rows; cells of 96 px, 2 px padding
    assert grid.size == (4 * 96 + 5 * 2, 3 * 96 + 4 * 2)
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["discriminator.safetensors",
                                                                   "generator.safetensors"]


def test_perceptual_weight_without_a_network_names_the_key(tmp_path):
    result = run_cli("run", RECIPE, f"output_dir={tmp_path}", "train.steps=1", "task.perceptual_weight=1",
                     "data.size=32", *SMALL)
    assert result.returncode == 2 and "task.perceptual_weight" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_dataset_without_references_is_refused_at_validation(tmp_path):
    result = run_cli("validate", RECIPE, "data.reference=false")
    assert result.returncode == 2, result.stderr
    assert "reference" in result.stderr and "Traceback" not in result.stderr


def test_perceptual_term_runs_with_a_feature_network(tmp_path):
    # pretrained = false: random features, so the test needs no fetched weights; the path is the same
    result = run_cli("run", RECIPE, f"output_dir={tmp_path}", "train.steps=2", "train.batch_size=2",
                     "train.progress=false", "data.size=32", "task.perceptual_weight=1", "eval.metrics=[]",
                     "model.perceptual.name=mobilenet_v2", *SMALL)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "pose_transfer_hands" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perceptual"] > 0 for r in records if r["type"] == "train")


@pytest.mark.parametrize("layout", ["synthsl", "bosphorus"])
def test_the_tar_recipes_validate_and_run_two_steps_on_fixtures(tmp_path, layout):
    root = tmp_path / "data"
    if layout == "synthsl":
        fx.synthsl(root, size=256)
    else:
        fx.bosphorus(root)
        (root / "train" / "0009.9.009.tar.gz").write_bytes(b"not a shard")  # skipped and counted, in the log
    recipe = REPO / "recipes" / f"pose_transfer_{layout}.toml"
    assert run_cli("validate", recipe, f"data.root={root}").returncode == 0
    result = run_cli("run", recipe, f"data.root={root}", f"output_dir={tmp_path / 'runs'}", "train.steps=2",
                     "train.batch_size=2", "train.progress=false", "task.sample_count=2", "eval.metrics=[]",
                     "model.generator.ch=4", "model.generator.ch_max=16", "model.discriminator.ch=4",
                     "model.g_conditioner.hidden=4", timeout=900)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / f"pose_transfer_{layout}"
    assert (run / "weights" / "generator.safetensors").is_file()
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["step"] == 2 and final["skipped"] == (layout == "bosphorus")  # read as a stream (the recipe's)
    if layout == "bosphorus":
        assert final["skipped_kinds"] == {"damaged shard": 1}


def tiny(root, **train):
    return {
        "name": "tiny_pose_transfer", "seed": 3, "output_dir": str(root / "runs"),
        "task": {"name": "pose_transfer", "hand_weight": 2.0, "sample_count": 2},
        "data": {"name": "procedural_hands", "size": 16, "reference": True},
        "model": {"generator": {"name": "pose_transfer_unet", "ch": 4, "ch_max": 8},
                  "discriminator": {"name": "patch_gan", "ch": 4},
                  "g_conditioner": {"name": "spade", "maps": "limbs", "hidden": 4},
                  "d_conditioner": {"name": "concat", "maps": "limbs"}},
        "train": {"steps": 6, "batch_size": 4, "log_every": 1, "sample_every": 3, "checkpoint_every": 2,
                  "progress": False, **train},
    }


def write(path, raw):
    path.write_text(dumps(raw))
    return path


def test_killed_and_resumed_run_is_bit_identical(tmp_path):
    straight, killed = tiny(tmp_path / "a"), tiny(tmp_path / "b")
    killed["plugins"] = [str(KILL)]
    env = {"HANDFORGE_TEST_KILL_AT": "4"}
    assert run_cli("run", write(tmp_path / "a.toml", straight), env=env).returncode == 0
    b = run_cli("run", write(tmp_path / "b.toml", killed), env=env)
    assert b.returncode == 17, b.stderr
    c = run_cli("run", tmp_path / "b.toml", "resume=true", env={"HANDFORGE_TEST_KILL_AT": "0"})
    assert c.returncode == 0, c.stderr
    for file in ("generator.safetensors", "discriminator.safetensors"):
        wa = load_file(tmp_path / "a/runs/tiny_pose_transfer/weights" / file)
        wb = load_file(tmp_path / "b/runs/tiny_pose_transfer/weights" / file)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), file


def test_two_processes_train_the_same_weights(tmp_path):
    recipe = write(tmp_path / "r.toml", tiny(tmp_path, steps=3, checkpoint_every=3))
    result = launch_two_processes(REPO / "run.py", "run", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny_pose_transfer"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000003").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
