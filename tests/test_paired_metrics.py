"""ssim, psnr and the hand-box metrics: equal to scikit-image's SSIM and PSNR (the peer package)
image by image, a hand box that follows the keypoints, sharpness that falls when a hand is blurred,
and the same numbers from `handforge evaluate` on two folders matched by name and in a run."""
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from handforge.keypoint_math import box_masks, hand_boxes
from handforge.plugins.metrics import paired_math
from handforge.plugins.metrics.paired_math import (laplacian_variance, paired_scores, psnr,
                                                   ssim)

skimage_metrics = pytest.importorskip("skimage.metrics")


def sk_ssim(a, b):
    return skimage_metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                                 channel_axis=-1, data_range=255)


def as_tensor(arrays):
    return torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2)


def noisy_pairs(n=6, h=40, w=52, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    b[0] = a[0]  # identical
    a[1], b[1] = 0, 255  # flat and opposite
    a[2, : h // 2] = 255  # half saturated
    return a, b


def test_ssim_equals_scikit_image_per_image(one_thread):
    a, b = noisy_pairs()
    ours = ssim(as_tensor(a), as_tensor(b)).numpy()
    theirs = np.array([sk_ssim(x, y) for x, y in zip(a, b)])
    assert np.abs(ours - theirs).max() < 1e-6
    assert ours[0] == pytest.approx(1.0, abs=1e-6) and ours[3] < 0.95


def test_ssim_of_flat_images_equals_scikit_image(one_thread):
    # flat colours far from mid-range: the variances are differences of large blurred squares there
    colours = [((0, 0, 0), (0, 0, 0)), ((7, 200, 13), (250, 13, 0)), ((255, 255, 255), (254, 1, 128)),
               ((128, 60, 3), (129, 61, 90))]
    a = np.stack([np.broadcast_to(np.uint8(ca), (33, 37, 3)) for ca, _ in colours])
    b = np.stack([np.broadcast_to(np.uint8(cb), (33, 37, 3)) for _, cb in colours])
    ours = ssim(as_tensor(a), as_tensor(b)).numpy()
    theirs = np.array([sk_ssim(x, y) for x, y in zip(a, b)])
    assert np.abs(ours - theirs).max() < 1e-6
    assert ours[0] == 1.0 and ours[1] < 0.2


def test_ssim_in_chunks_equals_ssim_in_one_piece(one_thread, monkeypatch):
    a, b = noisy_pairs(n=5, h=30, w=24, seed=3)
    whole = ssim(as_tensor(a), as_tensor(b).float())  # uint8 beside float, channels-last beside not
    monkeypatch.setattr(paired_math, "CHUNK_PIXELS", 2 * 30 * 24)  # chunks of 2, 2 and 1 images
    chunked = paired_math.ssim_map(as_tensor(a).contiguous(), as_tensor(b).float())
    assert chunked.shape == (5, 3, 20, 14)
    assert torch.allclose(chunked.mean(dim=(1, 2, 3)), whole, atol=1e-7, rtol=0)
    theirs = np.array([sk_ssim(x, y) for x, y in zip(a, b)])
    assert np.abs(chunked.mean(dim=(1, 2, 3)).numpy() - theirs).max() < 1e-6


def test_ssim_chunks_shared_over_threads_equal_the_chunks_in_turn(monkeypatch):
    a, b = noisy_pairs(n=7, h=30, w=24, seed=4)
    monkeypatch.setattr(paired_math, "CHUNK_PIXELS", 30 * 24)  # one image a chunk, 7 chunks
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        in_turn = paired_math.ssim_map(as_tensor(a), as_tensor(b))
        torch.set_num_threads(2)  # two Python threads take the chunks
        shared = paired_math.ssim_map(as_tensor(a), as_tensor(b))
        assert torch.get_num_threads() == 2  # restored after the ops ran on one thread each
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(shared, in_turn)
    theirs = np.array([sk_ssim(x, y) for x, y in zip(a, b)])
    assert np.abs(shared.mean(dim=(1, 2, 3)).numpy() - theirs).max() < 1e-6


def test_psnr_equals_scikit_image_and_identical_images_are_infinite():
    a, b = noisy_pairs()
    ours = psnr(as_tensor(a), as_tensor(b)).numpy()
    assert ours[0] == math.inf
    with np.errstate(divide="ignore"):
        theirs = [skimage_metrics.peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a[1:], b[1:])]
    assert np.allclose(ours[1:], theirs, atol=1e-4)
    assert ours[1] == pytest.approx(0.0, abs=1e-6)  # 0 vs 255 everywhere: MSE = 255^2


def hand(cx, cy, spread=0.05):
    """21 visible keypoints on a small fan around (cx, cy), normalised."""
    angles = np.linspace(-1.2, 1.2, 21)
    radius = np.r_[0, np.tile(np.linspace(0.4, 1.0, 4), 5)] * spread
    points = np.stack([cx + radius * np.sin(angles), cy - radius * np.cos(angles), np.ones(21)], axis=1)
    return torch.tensor(points, dtype=torch.float32)


def test_hand_boxes_follow_the_keypoints_and_stay_inside():
    keypoints = torch.stack([hand(0.5, 0.5), hand(0.2, 0.7), hand(0.98, 0.02), torch.zeros(21, 3)])
    boxes, has = hand_boxes(keypoints, 100, 200, margin=0.25, min_size=10)
    assert has.tolist() == [True, True, True, False]
    for box, points in zip(boxes[:3], keypoints[:3]):
        x0, y0, x1, y1 = box.tolist()
        assert x1 - x0 == pytest.approx(y1 - y0)  # square
        assert 0 <= x0 and x1 <= 200 and 0 <= y0 and y1 <= 100
    # the first two: the box holds every keypoint with the margin, centred on their extent
    for box, points in zip(boxes[:2], keypoints[:2]):
        xs, ys = points[:, 0] * 200, points[:, 1] * 100
        extent = max(xs.max() - xs.min(), ys.max() - ys.min())
        assert box[2] - box[0] == pytest.approx(float(extent) * 1.5, rel=1e-5)
        assert (box[0] + box[2]) / 2 == pytest.approx(float(xs.max() + xs.min()) / 2, rel=1e-5)
    # moving the hand moves its box by the same amount
    moved, _ = hand_boxes(torch.stack([hand(0.6, 0.55)]), 100, 200)
    assert (moved[0] - boxes[0]).tolist() == pytest.approx([20, 5, 20, 5], abs=1e-4)
    # the box near a corner was moved inside, not shrunk
    assert boxes[2, 2] == pytest.approx(200) and boxes[2, 1] == pytest.approx(0)
    assert boxes[3].abs().sum() == 0
    mask = box_masks(boxes[:1], 100, 200)
    assert mask.sum() == pytest.approx(float(((boxes[0, 2] - boxes[0, 0]).round()) ** 2), rel=0.1)


def texture(size=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_hand_scores_see_only_the_hand_and_sharpness_falls_with_blur():
    target = texture()
    blurred_hand = target.copy()
    box = (24, 24, 48, 48)
    region = Image.fromarray(target).crop(box).filter(ImageFilter.GaussianBlur(2))
    blurred_hand[24:48, 24:48] = np.asarray(region)
    blurred_elsewhere = target.copy()
    blurred_elsewhere[:16] = np.asarray(Image.fromarray(target[:16]).filter(ImageFilter.GaussianBlur(2)))
    keypoints = torch.stack([hand(0.56, 0.6, spread=0.12)] * 3)
    real = as_tensor(np.stack([target] * 3))
    fake = as_tensor(np.stack([target, blurred_hand, blurred_elsewhere]))
    scores = paired_scores(real, fake, keypoints)
    assert scores["hand"].tolist() == [1, 1, 1]
    assert scores["hand_sharpness"][0] == pytest.approx(1.0)
    assert scores["hand_sharpness"][1] < 0.3  # a blurred hand has far less Laplacian energy
    assert scores["hand_sharpness"][2] == pytest.approx(1.0)  # blur outside the box does not count
    assert scores["hand_psnr"][0] == math.inf and scores["hand_psnr"][2] == math.inf
    assert scores["hand_ssim"][1] < scores["ssim"][1] < 1  # the damage is concentrated in the hand
    # the hand-box SSIM is the SSIM map averaged over the box: scikit-image's full map, masked
    _, full = skimage_metrics.structural_similarity(target, blurred_hand, gaussian_weights=True, sigma=1.5,
                                                    use_sample_covariance=False, channel_axis=-1, data_range=255,
                                                    full=True)
    boxes, _ = hand_boxes(keypoints[1:2], 64, 64)
    mask = box_masks(boxes, 64, 64)[0, 0].numpy().astype(bool)
    mask[:5], mask[-5:], mask[:, :5], mask[:, -5:] = False, False, False, False  # where the window fits
    assert float(scores["hand_ssim"][1]) == pytest.approx(full[mask].mean(), abs=1e-4)


def test_laplacian_variance_matches_a_numpy_computation():
    image = texture(32, seed=3).astype(np.float64)
    luma = image @ np.array([0.299, 0.587, 0.114])
    lap = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4 * luma[1:-1, 1:-1]
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 5:20, 8:30] = 1
    expected = lap[4:19, 7:29].var()  # pixel (i, j) has its response at (i - 1, j - 1)
    ours = laplacian_variance(as_tensor(image[None].astype(np.uint8)), mask)
    assert float(ours) == pytest.approx(expected, rel=1e-4)


# -- through the components: handforge evaluate and a run -------------------------------------------


def write_folder(root, images, keypoints=None):
    root.mkdir(parents=True)
    labels = {}
    for i, image in enumerate(images):
        name = f"seq{i % 2}/{i:03d}.png"
        (root / name).parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(root / name)
        if keypoints is not None:
            labels[name] = {"keypoints": keypoints[i].tolist()}
    if keypoints is not None:
        (root / "labels.json").write_text(json.dumps(labels))
    return root


def test_evaluate_on_two_folders_matched_by_name(tmp_path, capsys):
    from conftest import cli_exit

    a, b = noisy_pairs(n=5, h=48, w=48, seed=1)
    keypoints = torch.stack([hand(0.3 + 0.1 * i, 0.5, spread=0.15) for i in range(5)])
    write_folder(tmp_path / "real", list(a), keypoints)
    write_folder(tmp_path / "fake", list(b[::-1][:4][::-1]))  # fakes named 000..003 hold b[1..4]
    code, out, err = cli_exit(capsys, "evaluate", "--real", tmp_path / "real", "--fake", tmp_path / "fake",
                              "--metrics", "ssim,psnr,hand_ssim", "--json")
    assert code == 0, err
    values = json.loads(out)["metrics"]
    fakes = b[1:5]
    expected = np.mean([sk_ssim(x, y) for x, y in zip(a[:4], fakes)])
    assert values["ssim"] == pytest.approx(expected, abs=1e-4)
    with np.errstate(divide="ignore"):
        per_image = [skimage_metrics.peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a[:4], fakes)]
    assert values["psnr"] == pytest.approx(np.mean(per_image), abs=1e-3) and values["psnr_identical"] == 0
    assert values["hand_images"] == 4
    assert 0 < values["hand_ssim"] < 1
    code, out, err = cli_exit(capsys, "evaluate", "--real", tmp_path / "real", "--fake", tmp_path / "fake",
                              "--metrics", "hand_sharpness", "--json")
    assert json.loads(out)["metrics"]["hand_images"] == 3  # the flat target 001 has no sharpness ratio
    assert "1 of 5 images have no --fake of the same name" in err
    (tmp_path / "fake" / "seq1" / "009.png").write_bytes((tmp_path / "fake" / "seq0" / "000.png").read_bytes())
    code, _, err = cli_exit(capsys, "evaluate", "--real", tmp_path / "real", "--fake", tmp_path / "fake",
                            "--metrics", "ssim")
    assert code == 2 and "1 of 5 fakes have none in" in err and "seq1/009.png" in err
    code, _, err = cli_exit(capsys, "evaluate", "--real", tmp_path / "fake", "--fake", tmp_path / "fake",
                            "--metrics", "hand_ssim")
    assert code == 2 and "needs the keypoints of the target images" in err and "labels.json" in err


def test_in_a_run_each_sample_is_compared_with_its_generation(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    import tar_fixtures as fx
    from handforge.plugins.datasets.tar_shards.dataset import SynthSLPairs, TarPairsConfig
    from handforge.plugins.metrics.inputs import RunInputs
    from handforge.plugins.metrics.paired import HandPairedConfig, HandSsim, PairedConfig, Psnr, Ssim
    from handforge.plugins.metrics.sources import uint8_images

    fx.synthsl(tmp_path, size=32)
    dataset = SynthSLPairs(TarPairsConfig(root=str(tmp_path), size=32))

    class CopyReference:  # the pose-transfer baseline: the reference frame, unchanged
        def generate(self, batch):
            assert "image" not in batch
            return batch["reference"]

    accelerator = types.SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"),
                                        is_main_process=True)
    run = types.SimpleNamespace(accelerator=accelerator, device=torch.device("cpu"), dataset=dataset,
                                task=CopyReference(), recipe=types.SimpleNamespace(data=types.SimpleNamespace(name="synthsl")),
                                step=1)
    inputs = RunInputs(run, num=6, batch_size=4)
    values = Ssim(PairedConfig()).measure(inputs)
    values.update(Psnr(PairedConfig()).measure(inputs))
    values.update(HandSsim(HandPairedConfig()).measure(inputs))
    real = uint8_images(torch.stack([dataset[i]["image"] for i in range(6)])).permute(0, 2, 3, 1).numpy()
    fake = uint8_images(torch.stack([dataset[i]["reference"] for i in range(6)])).permute(0, 2, 3, 1).numpy()
    assert values["ssim"] == pytest.approx(np.mean([sk_ssim(x, y) for x, y in zip(real, fake)]), abs=1e-4)
    assert values["psnr"] == pytest.approx(np.mean([skimage_metrics.peak_signal_noise_ratio(x, y, data_range=255)
                                                    for x, y in zip(real, fake)]), abs=1e-3)
    assert values["hand_images"] == 6


def test_registered_for_recipes(host):
    for name in ("ssim", "psnr", "hand_ssim", "hand_psnr", "hand_sharpness"):
        entry = host.registry("metric").get(name)
        assert "image" in entry.needs


@pytest.fixture
def reset_accelerate():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_evaluate_a_run_directory_against_its_own_val_split(tmp_path, capsys, reset_accelerate, one_thread):
    """--fake RUN alone: each val sample's image against the generation made from that sample."""
    from conftest import cli_exit
    from test_generate import tiny_raw, train

    from handforge.runs import load_run
    from handforge.plugins.metrics.sources import fetch_samples, uint8_images

    run_dir = train(tiny_raw(tmp_path, "pose", pose=True))
    code, out, err = cli_exit(capsys, "evaluate", "--fake", run_dir, "--metrics", "ssim,hand_ssim", "--num", "6",
                              "--json")
    assert code == 0, err
    values = json.loads(out)["metrics"]
    run = load_run(run_dir, split="val")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        samples = fetch_samples(run.dataset, list(range(6)))
        with torch.no_grad():
            fakes = run.task.generate({k: v for k, v in samples.items() if k != "image"})
    real = uint8_images(samples["image"]).permute(0, 2, 3, 1).numpy()
    fake = uint8_images(fakes).permute(0, 2, 3, 1).numpy()
    assert values["ssim"] == pytest.approx(np.mean([sk_ssim(x, y) for x, y in zip(real, fake)]), abs=1e-4)
    assert values["hand_images"] >= 1 and -1 <= values["hand_ssim"] <= 1
    code, _, err = cli_exit(capsys, "evaluate", "--real", run_dir, "--fake", run_dir, "--metrics", "ssim", "--num", "4")
    assert code == 2 and "compares image pairs" in err
