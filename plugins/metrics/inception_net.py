"""The FID Inception network (TF InceptionV3 of 2015-12-05) as a fast eager PyTorch module.

The standard FID feature extractor ships as a TorchScript file (pytorch-fid, clean-fid and
StyleGAN2-ADA all use the same weights). Its layers are ``Conv2dLayer`` = conv (no bias) ->
batch norm (no scale, eps 1e-3) -> ReLU, inside the InceptionA..E blocks of torchvision's
InceptionV3, with TF's quirks: every average pool excludes the padding
(``count_include_pad=False``) and the last block pools with a *max* pool. It ends at the
2048-d average pool: the file holds no classification layer, so it gives no logits (the
Inception Score needs another model).

This module computes the same function faster on a CPU:

- batch norm is folded into the convolutions when the weights are loaded;
- 1x1 convolutions that read the same input are stacked into one convolution (one big matrix
  product instead of three or four small ones);
- a 1x1 convolution after a padding-excluding average pool is moved before the pool (both are
  linear and the pool's weights sum to one, so the bias passes through unchanged), which
  lets it join the stack above; the pool then runs on the few output channels;
- tensors are channels_last, which oneDNN convolves without reordering;
- the stem runs on a few images at a time, whose activations stay in cache.

On one core this does ~110 ms per image against ~180 ms for the TorchScript: ~100 GFLOP/s,
about this machine's fp32 matrix-multiply rate, so what is left to gain is in the FLOPs.

Input: (N, 3, 299, 299) float32, already normalized to the TF range (x - 128) / 128.
Output: (N, 2048) float32. :func:`load_folded` fills a fresh module from the TorchScript's
state dict, whose names it maps (``layers.<block>.<branch>.{weight,beta,mean,var}``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from handforge.errors import HandforgeError

BN_EPS = 1e-3  # the TF graph's batch-norm epsilon
# The stem's activations are the largest (64 x 147 x 147 floats per image): a few images at a
# time stay in cache. Measured on one core: 26 ms per image in chunks of 2 against 36 ms on a
# batch of 16, while the later blocks prefer the whole batch (as much as 8x8 maps allow).
STEM_CHUNK = 2


class FoldedConv(nn.Conv2d):
    """A convolution with its batch norm folded in (so it has a bias), then ReLU if ``relu``."""

    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, padding=0, relu: bool = True):
        super().__init__(c_in, c_out, kernel, stride=stride, padding=padding, bias=True)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return F.relu(y, inplace=True) if self.relu else y


_conv = FoldedConv  # a short name for the block definitions below


def _relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x, inplace=True)


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Block(nn.Module):
    """A block whose convolutions each come from one or more source layers of the TorchScript.

    ``SOURCES`` maps an attribute (a :class:`FoldedConv`) to the source layer names, relative to the
    block, whose folded weights are stacked along the output channels, in that order.
    """

    SOURCES: dict[str, tuple[str, ...]] = {}


class Stem(_Block):
    SOURCES = {"conv0": ("conv",), "conv1": ("conv_1",), "conv2": ("conv_2",),
               "conv3": ("conv_3",), "conv4": ("conv_4",)}

    def __init__(self):
        super().__init__()
        self.conv0 = _conv(3, 32, 3, stride=2)
        self.conv1 = _conv(32, 32, 3)
        self.conv2 = _conv(32, 64, 3, padding=1)
        self.conv3 = _conv(64, 80, 1)
        self.conv4 = _conv(80, 192, 3)

    def forward(self, x):
        x = F.max_pool2d(self.conv2(self.conv1(self.conv0(x))), 3, stride=2)
        return F.max_pool2d(self.conv4(self.conv3(x)), 3, stride=2)


class BlockA(_Block):
    """35x35: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool -> 1x1."""

    SOURCES = {"heads": ("conv", "tower.conv", "tower_1.conv", "tower_2.conv"),
               "tower_5x5": ("tower.conv_1",), "tower_3x3a": ("tower_1.conv_1",),
               "tower_3x3b": ("tower_1.conv_2",)}

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.splits = (64, 48, 64, pool_features)
        # No ReLU inside: the pooled part gets it after its pool.
        self.heads = _conv(c_in, sum(self.splits), 1, relu=False)
        self.tower_5x5 = _conv(48, 64, 5, padding=2)
        self.tower_3x3a = _conv(64, 96, 3, padding=1)
        self.tower_3x3b = _conv(96, 96, 3, padding=1)

    def forward(self, x):
        heads = self.heads(x)
        _relu(heads[:, :176])
        plain, t5, t3, pooled = heads.split(self.splits, dim=1)
        t3 = self.tower_3x3b(self.tower_3x3a(t3))
        return torch.cat([plain, self.tower_5x5(t5), t3, _relu(_avg_pool(pooled))], dim=1)


class BlockB(_Block):
    """35x35 -> 17x17: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | maxpool."""

    SOURCES = {"conv": ("conv",), "tower_1x1": ("tower.conv",), "tower_3x3a": ("tower.conv_1",),
               "tower_3x3b": ("tower.conv_2",)}

    def __init__(self, c_in: int):
        super().__init__()
        self.conv = _conv(c_in, 384, 3, stride=2)
        self.tower_1x1 = _conv(c_in, 64, 1)
        self.tower_3x3a = _conv(64, 96, 3, padding=1)
        self.tower_3x3b = _conv(96, 96, 3, stride=2)

    def forward(self, x):
        t = self.tower_3x3b(self.tower_3x3a(self.tower_1x1(x)))
        return torch.cat([self.conv(x), t, F.max_pool2d(x, 3, stride=2)], dim=1)


class BlockC(_Block):
    """17x17: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avgpool -> 1x1."""

    SOURCES = {"heads": ("conv", "tower.conv", "tower_1.conv", "tower_2.conv"),
               "t1_1x7": ("tower.conv_1",), "t1_7x1": ("tower.conv_2",),
               "t2_7x1a": ("tower_1.conv_1",), "t2_1x7a": ("tower_1.conv_2",),
               "t2_7x1b": ("tower_1.conv_3",), "t2_1x7b": ("tower_1.conv_4",)}

    def __init__(self, c7: int):
        super().__init__()
        self.splits = (192, c7, c7, 192)
        self.heads = _conv(768, sum(self.splits), 1, relu=False)  # the pooled part: ReLU after its pool
        self.t1_1x7 = _conv(c7, c7, (1, 7), padding=(0, 3))
        self.t1_7x1 = _conv(c7, 192, (7, 1), padding=(3, 0))
        self.t2_7x1a = _conv(c7, c7, (7, 1), padding=(3, 0))
        self.t2_1x7a = _conv(c7, c7, (1, 7), padding=(0, 3))
        self.t2_7x1b = _conv(c7, c7, (7, 1), padding=(3, 0))
        self.t2_1x7b = _conv(c7, 192, (1, 7), padding=(0, 3))

    def forward(self, x):
        heads = self.heads(x)
        _relu(heads[:, :sum(self.splits[:3])])
        plain, t1, t2, pooled = heads.split(self.splits, dim=1)
        t1 = self.t1_7x1(self.t1_1x7(t1))
        t2 = self.t2_1x7b(self.t2_7x1b(self.t2_1x7a(self.t2_7x1a(t2))))
        return torch.cat([plain, t1, t2, _relu(_avg_pool(pooled))], dim=1)


class BlockD(_Block):
    """17x17 -> 8x8: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | maxpool."""

    SOURCES = {"heads": ("tower.conv", "tower_1.conv"), "t1_3x3": ("tower.conv_1",),
               "t2_1x7": ("tower_1.conv_1",), "t2_7x1": ("tower_1.conv_2",),
               "t2_3x3": ("tower_1.conv_3",)}

    def __init__(self):
        super().__init__()
        self.heads = _conv(768, 384, 1)
        self.t1_3x3 = _conv(192, 320, 3, stride=2)
        self.t2_1x7 = _conv(192, 192, (1, 7), padding=(0, 3))
        self.t2_7x1 = _conv(192, 192, (7, 1), padding=(3, 0))
        self.t2_3x3 = _conv(192, 192, 3, stride=2)

    def forward(self, x):
        t1, t2 = self.heads(x).split(192, dim=1)
        t2 = self.t2_3x3(self.t2_7x1(self.t2_1x7(t2)))
        return torch.cat([self.t1_3x3(t1), t2, F.max_pool2d(x, 3, stride=2)], dim=1)


class BlockE(_Block):
    """8x8: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1.

    TF's graph average-pools in the first E block and max-pools in the second; a 1x1
    convolution commutes only with the average pool, so only that one joins the stacked heads.
    """

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        heads = ("conv", "tower_conv", "tower_1_conv")
        self.SOURCES = {
            "heads": heads if max_pool else heads + ("tower_2_conv",),
            "a_1x3": ("tower_mixed_conv",), "a_3x1": ("tower_mixed_conv_1",),
            "b_3x3": ("tower_1_conv_1",),
            "b_1x3": ("tower_1_mixed_conv",), "b_3x1": ("tower_1_mixed_conv_1",),
        }
        if max_pool:
            self.SOURCES["pool_1x1"] = ("tower_2_conv",)
            self.pool_1x1 = _conv(c_in, 192, 1)
        self.splits = (320, 384, 448) if max_pool else (320, 384, 448, 192)
        # With the average-pooled part stacked in, ReLU waits until after its pool.
        self.heads = _conv(c_in, sum(self.splits), 1, relu=max_pool)
        self.a_1x3 = _conv(384, 384, (1, 3), padding=(0, 1))
        self.a_3x1 = _conv(384, 384, (3, 1), padding=(1, 0))
        self.b_3x3 = _conv(448, 384, 3, padding=1)
        self.b_1x3 = _conv(384, 384, (1, 3), padding=(0, 1))
        self.b_3x1 = _conv(384, 384, (3, 1), padding=(1, 0))

    def forward(self, x):
        heads = self.heads(x)
        if self.max_pool:
            pooled = self.pool_1x1(F.max_pool2d(x, 3, stride=1, padding=1))
        else:
            _relu(heads[:, :1152])
            pooled = _relu(_avg_pool(heads[:, 1152:]))
        plain, a, b = heads[:, :1152].split(self.splits[:3], dim=1)
        b = self.b_3x3(b)
        return torch.cat([plain, self.a_1x3(a), self.a_3x1(a), self.b_1x3(b), self.b_3x1(b), pooled], dim=1)


class FIDInception(nn.Module):
    """(N, 3, 299, 299) float32 in [-1, 0.9921875] -> (N, 2048) pool features (no logits)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({
            "stem": Stem(),
            "mixed": BlockA(192, 32), "mixed_1": BlockA(256, 64), "mixed_2": BlockA(288, 64),
            "mixed_3": BlockB(288),
            "mixed_4": BlockC(128), "mixed_5": BlockC(160), "mixed_6": BlockC(160),
            "mixed_7": BlockC(192),
            "mixed_8": BlockD(),
            "mixed_9": BlockE(1280, max_pool=False), "mixed_10": BlockE(2048, max_pool=True),
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = iter(self.blocks.values())
        stem = next(blocks)
        x = torch.cat([stem(part) for part in x.split(STEM_CHUNK)]) if len(x) > STEM_CHUNK else stem(x)
        for block in blocks:
            x = block(x)
        return x.mean(dim=(2, 3))


def _folded(state: dict, name: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """conv -> BN(beta, mean, var; no scale) as one conv's (weight, bias), computed in float64."""
    try:
        weight, beta, mean, var = (state[f"{name}.{p}"].double() for p in ("weight", "beta", "mean", "var"))
    except KeyError as exc:
        raise HandforgeError(f"{where}: not the FID Inception network: no parameter {exc.args[0]}") from None
    scale = (var + BN_EPS).rsqrt()
    return weight * scale[:, None, None, None], beta - mean * scale


def load_folded(state: dict, where: str = "state dict") -> FIDInception:
    """A new :class:`FIDInception` holding ``state`` (the TorchScript's state dict) folded.

    Keys may carry any prefix before ``layers.`` (the fid-helper file nests the network as
    ``net.layers``, StyleGAN2-ADA's as ``layers``). ``where`` names the file in errors.
    """
    prefixes = {k[: k.index("layers.")] for k in state if "layers." in k}
    if len(prefixes) != 1:
        raise HandforgeError(f"{where}: not the FID Inception network (no single 'layers.' prefix)")
    prefix = prefixes.pop() + "layers."
    # Built without initialization (every parameter is overwritten below; random init of 24M
    # weights would cost more than the folding).
    with torch.device("meta"):
        model = FIDInception()
    model = model.to_empty(device="cpu")
    filled = set()
    for block_name, block in model.blocks.items():
        source_prefix = prefix if block_name == "stem" else f"{prefix}{block_name}."
        for attr, sources in block.SOURCES.items():
            pairs = [_folded(state, source_prefix + s, where) for s in sources]
            conv = getattr(block, attr)
            weight = torch.cat([w for w, _ in pairs])
            bias = torch.cat([b for _, b in pairs])
            if weight.shape != conv.weight.shape:
                raise HandforgeError(f"{where}: {source_prefix}{'+'.join(sources)} has shape "
                                     f"{tuple(weight.shape)}, expected {tuple(conv.weight.shape)}")
            with torch.no_grad():
                conv.weight.copy_(weight)
                conv.bias.copy_(bias)
            filled.update((id(conv.weight), id(conv.bias)))
    assert filled == {id(p) for p in model.parameters()}, "a convolution has no source layer"
    return model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
