import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from handforge.imaging import FINGER_COLOURS, draw_skeleton, joint_colour, make_grid, save_grid, to_uint8


def test_to_uint8_exact_values():
    x = torch.tensor([-1.0, 1.0, 0.0, -2.0, 3.0, float("nan"), -1 + 1 / 127.5, 1 - 0.4 / 127.5])
    images = x.view(1, 1, 1, -1).expand(2, 3, 1, -1)  # (N, 3, H, W)
    out = to_uint8(images)
    assert out.dtype == np.uint8 and out.shape == (2, 1, 8, 3)
    # -1 -> 0, 1 -> 255, 0 -> 127.5 -> 128 (round half to even), out of range clamped, nan -> 0.
    assert out[0, 0, :, 0].tolist() == [0, 255, 128, 0, 255, 0, 1, 255]
    assert (out == out[:1, :, :, :1]).all()  # same on every channel and image


def test_to_uint8_rounds_to_nearest():
    # (v + 1) * 127.5 = k + 0.5 needs v + 1 = (2k + 1) / 255, a binary fraction only for k = 127:
    # v = 0 is the one exact tie, and it goes to the even neighbour, 128 (numpy's rint). Everywhere
    # else the result is the nearest integer (the scaling is done in float64).
    values = torch.linspace(-1, 1, 100_001, dtype=torch.float32)
    exact = (values.double() + 1) * 127.5
    out = to_uint8(values.view(1, 1, 1, -1))[0, 0, :, 0].astype(np.int64)
    assert np.abs(out - exact.numpy()).max() <= 0.5
    assert out.tolist() == torch.floor(exact + 0.5).long().tolist()
    assert to_uint8(torch.zeros(1, 3, 1, 1)).item(0) == 128
    eps = 2.0 ** -20
    assert to_uint8(np.array([-eps, eps], dtype=np.float32).reshape(1, 1, 1, 2))[0, 0, :, 0].tolist() == [127, 128]


def test_to_uint8_accepts_numpy_and_layout():
    images = np.zeros((2, 3, 4, 5), dtype=np.float32)
    images[1, 0] = 1.0  # image 1 is red
    out = to_uint8(images)
    assert out.shape == (2, 4, 5, 3)
    assert out[1, 2, 3].tolist() == [255, 128, 128]
    assert to_uint8(torch.from_numpy(images).to(torch.bfloat16)).tolist() == out.tolist()


def test_make_grid_shape_and_placement():
    n, h, w, nrow, padding = 5, 7, 9, 3, 2
    images = torch.linspace(-1, 1, n).view(n, 1, 1, 1).expand(n, 3, h, w)
    grid = make_grid(images, nrow=nrow, padding=padding)
    rows = math.ceil(n / nrow)
    assert grid.shape == (rows * (h + padding) + padding, nrow * (w + padding) + padding, 3)
    assert grid.dtype == np.uint8
    expected = to_uint8(images)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        assert (grid[y:y + h, x:x + w] == expected[i]).all()
    assert (grid[:padding] == 255).all() and (grid[:, :padding] == 255).all()
    # The sixth cell is empty: all pad value.
    y, x = padding + (h + padding), padding + 2 * (w + padding)
    assert (grid[y:y + h, x:x + w] == 255).all()


def test_make_grid_default_nrow():
    grid = make_grid(np.zeros((10, 3, 4, 4)), padding=0)
    assert grid.shape == (3 * 4, 4 * 4, 3)  # ceil(sqrt(10)) = 4 per row, 3 rows


def _one_visible(x, y, joint=5, n=1):
    keypoints = np.zeros((n, 21, 3), dtype=np.float32)
    keypoints[:, :, :2] = 0.5
    keypoints[:, joint] = (x, y, 1.0)
    return keypoints


def test_keypoint_dot_lands_on_its_pixel(tmp_path):
    cell = 96
    images = -torch.ones(2, 3, 32, 32)  # black, upscaled 3x to 96
    keypoints = _one_visible(0.25, 0.75, joint=5, n=2)
    keypoints[1, 5, 2] = 0.0  # the second image's only joint is invisible
    path = save_grid(tmp_path / "grid.png", images, keypoints=keypoints, nrow=2, padding=2, min_cell=cell)
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape == (cell + 4, 2 * cell + 6, 3)
    x0, y0 = 2, 2
    px, py = x0 + int(0.25 * cell), y0 + int(0.75 * cell)
    assert tuple(png[py, px]) == joint_colour(5) == FINGER_COLOURS[1]
    # Far from the dot the first cell is untouched (black); the second cell is entirely black.
    assert (png[y0:y0 + 40, x0 + 40:x0 + cell] == 0).all()
    second = png[y0:y0 + cell, x0 + cell + 2:x0 + 2 * cell + 2]
    assert (second == 0).all()


def test_invisible_keypoints_draw_nothing(tmp_path):
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    keypoints = torch.rand(3, 21, 3)
    keypoints[..., 2] = 0
    plain = np.asarray(Image.open(save_grid(tmp_path / "a.png", images)))
    drawn = np.asarray(Image.open(save_grid(tmp_path / "b.png", images, keypoints=keypoints)))
    assert (plain == drawn).all()


def test_bones_skip_invisible_joints():
    size = 64
    keypoints = np.zeros((21, 3))
    # A straight index finger along y = 0.5; its tip (8) invisible.
    for j, x in zip((0, 5, 6, 7, 8), (0.1, 0.3, 0.5, 0.7, 0.9)):
        keypoints[j] = (x, 0.5, 1.0)
    keypoints[8, 2] = 0.0
    canvas = Image.new("RGB", (size, size))
    draw_skeleton(ImageDraw.Draw(canvas), keypoints, size=(size, size), radius=1, width=1)
    pixels = np.asarray(canvas)
    row = pixels[size // 2 - 1: size // 2 + 1].max(axis=0)  # the line's row(s)
    lit = np.flatnonzero(row.any(axis=-1))
    assert lit.min() <= int(0.1 * size) and lit.max() < int(0.75 * size)  # nothing towards the hidden tip
    assert (pixels[: size // 2 - 4] == 0).all() and (pixels[size // 2 + 4:] == 0).all()


def test_save_grid_upscales_captions_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "samples" / "deep" / "step_000100.png"
    images = torch.rand(5, 3, 24, 20) * 2 - 1
    keypoints = torch.rand(5, 21, 3)
    keypoints[..., 2] = (keypoints[..., 2] > 0.3).float()
    path = save_grid(target, images, keypoints=keypoints, captions=["fist", "palm", "ok", "a very long class name", "v"],
                     nrow=3, min_cell=96)
    assert path == target and path.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["step_000100.png"]
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        width, height = png.size
    # 20 px wide -> scaled by 96/20 = 4.8 -> 96 x 116 cells, plus a caption band under each row.
    assert width == 3 * (96 + 2) + 2
    assert height > 2 * (116 + 2) + 2
    # Overwriting goes through a temp file too and leaves only the one file.
    save_grid(target, images)
    assert sorted(p.name for p in target.parent.iterdir()) == ["step_000100.png"]


def test_save_grid_keeps_big_images_unscaled(tmp_path):
    images = np.zeros((1, 3, 128, 100), dtype=np.float32)
    with Image.open(save_grid(tmp_path / "big.png", images, padding=0)) as png:
        assert png.size == (100, 128)


def test_save_grid_checks_shapes(tmp_path):
    with pytest.raises(ValueError, match="keypoints"):
        save_grid(tmp_path / "x.png", torch.zeros(2, 3, 8, 8), keypoints=torch.zeros(3, 21, 3))
    with pytest.raises(ValueError, match="captions"):
        save_grid(tmp_path / "x.png", torch.zeros(2, 3, 8, 8), captions=["one"])
    assert not list(tmp_path.iterdir())
