"""Hand keypoint regressors for the ``keypoints`` task: ``simple_cnn``, ``mobilelite`` and
``mobilelite_attn``.

Each is built with ``role="keypoints"``, an ``image_size`` divisible by 32 (every body ends at
stride 32), ``num_keypoints`` and ``head``:

- ``head="regression"`` (seed 001): global average pooling and fully connected layers straight
  to ``num_keypoints x 2`` normalized coordinates.
- ``head="heatmap"`` (MMPose's SimpleBaseline head, made light): two upsample + conv stages take
  the stride-32 features to stride 8, a 1x1 conv gives one logit map per keypoint, and
  :func:`soft_argmax` (integral regression, Sun et al. 2018) decodes them into coordinates, so
  both heads train with the same coordinate loss.

``forward(images (N,3,S,S) in [-1,1])`` returns ``{"coords": (N,K,2)}`` (x, y in [0,1] of the
image: 0 the left/top edge, 1 the right/bottom edge) plus ``"heatmaps": (N,K,S/8,S/8)`` logits
for the heatmap head. :func:`flops_per_image` counts a network's FLOPs for the benchmark.
"""
from __future__ import annotations

import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F
from attrs import validators as v

from handforge import hookimpl
from handforge.errors import HandforgeError
from handforge.plugins.backbones.classifiers import ConvNormAct, round_channels

ROLE = "keypoints"
HEADS = ("regression", "heatmap")
BODY_STRIDE = 32  # every body halves the image five times
HEATMAP_STRIDE = 8  # MMPose's top-down heatmaps: a quarter to an eighth of the input


def check_context(name: str, role: str, image_size, num_keypoints, head: str) -> None:
    """A HandforgeError naming the backbone for a context it cannot build."""
    if role != ROLE:
        raise HandforgeError(f"backbone '{name}' is a keypoint regressor (role '{ROLE}'), not {role!r}")
    if not isinstance(image_size, int) or image_size < BODY_STRIDE or image_size % BODY_STRIDE:
        raise HandforgeError(f"backbone '{name}' needs an image size that is a multiple of {BODY_STRIDE} "
                             f"(>= {BODY_STRIDE}), got {image_size!r}")
    if not isinstance(num_keypoints, int) or num_keypoints < 1:
        raise HandforgeError(f"backbone '{name}' needs num_keypoints >= 1, got {num_keypoints!r}")
    if head not in HEADS:
        raise HandforgeError(f"backbone '{name}' has heads {list(HEADS)}, not {head!r}")


# -- decoding and counting --------------------------------------------------------------------------


def soft_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) logits -> (N, K, 2) expected x, y in [0, 1] of the image.

    A softmax over each map's h*w cells, then the expectation of the cell centres
    ((j + 0.5) / w, (i + 0.5) / h): differentiable, so a coordinate loss trains the maps."""
    n, k, h, w = heatmaps.shape
    # float32: a bf16 softmax over hundreds of cells loses the sub-cell precision this is for.
    probs = heatmaps.float().reshape(n, k, h * w).softmax(-1).reshape(n, k, h, w)
    xs = (torch.arange(w, device=heatmaps.device, dtype=torch.float32) + 0.5) / w
    ys = (torch.arange(h, device=heatmaps.device, dtype=torch.float32) + 0.5) / h
    x = (probs.sum(2) * xs).sum(-1)  # marginal over columns
    y = (probs.sum(3) * ys).sum(-1)  # marginal over rows
    return torch.stack((x, y), -1)


def _layer_macs(module: nn.Module, inputs, output) -> int:
    """Multiply-accumulates of one call on a batch of one."""
    if isinstance(module, nn.Conv2d):  # every output value: (C_in / groups) * kh * kw products
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.ConvTranspose2d):  # every input value scatters into C_out / groups * kh * kw
        kh, kw = module.kernel_size
        return inputs[0].numel() * (module.out_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    extra = getattr(module, "extra_macs", None)  # products outside layers, e.g. attention matmuls
    return int(extra(inputs, output)) if callable(extra) else 0


@torch.no_grad()
def flops_per_image(module: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass on one (3, S, S) image: 2 x the multiply-accumulates of every
    Conv2d, ConvTranspose2d and Linear (and of modules that report ``extra_macs``), counted with
    forward hooks. Norms, activations and biases are left out, as in papers' FLOP tables."""
    macs = []
    hooks = [m.register_forward_hook(lambda m, i, o: macs.append(_layer_macs(m, i, o)))
             for m in module.modules()]
    was_training = module.training
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else "cpu"
    try:
        module.eval()
        module(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        module.train(was_training)
        for hook in hooks:
            hook.remove()
    return 2 * sum(macs)


# -- heads ------------------------------------------------------------------------------------------


class RegressionHead(nn.Module):
    """Global average pooling, an optional hidden layer, and a linear layer to K x 2 coordinates."""

    def __init__(self, channels: int, num_keypoints: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.num_keypoints = num_keypoints
        layers = []
        if hidden:
            layers += [nn.Linear(channels, hidden), nn.ReLU6(), nn.Dropout(dropout)]
            channels = hidden
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(channels, num_keypoints * 2)
        # Start at the image centre: the L1 loss begins at its typical scale instead of at
        # whatever offsets random weights produce.
        nn.init.normal_(self.out.weight, 0.0, 0.01)
        nn.init.constant_(self.out.bias, 0.5)

    def forward(self, features):
        coords = self.out(self.hidden(features.mean((2, 3))))
        return {"coords": coords.reshape(-1, self.num_keypoints, 2)}


class HeatmapHead(nn.Module):
    """SimpleBaseline-style: from stride 32 to stride 8 in two (nearest x2 upsampling, 3x3 conv,
    BN, ReLU) stages, then a 1x1 conv to one logit map per keypoint, decoded by soft-argmax.
    Upsample + conv instead of MMPose's 4x4 deconvolutions: no checkerboard, fewer weights."""

    def __init__(self, channels: int, num_keypoints: int, width: int):
        super().__init__()
        stages = []
        for _ in range((BODY_STRIDE // HEATMAP_STRIDE).bit_length() - 1):
            stages += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, width, 3, 1, 1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.upsample = nn.Sequential(*stages)
        self.out = nn.Conv2d(width, num_keypoints, 1)
        # Near-flat maps at first (MMPose initialises its final layer with std 0.001): soft-argmax
        # then predicts the image centre, like the regression head.
        nn.init.normal_(self.out.weight, 0.0, 0.001)
        nn.init.zeros_(self.out.bias)

    def forward(self, features):
        heatmaps = self.out(self.upsample(features))
        return {"coords": soft_argmax(heatmaps), "heatmaps": heatmaps}


class KeypointNet(nn.Module):
    """A body that ends at stride 32 and one of the two heads."""

    def __init__(self, body: nn.Module, channels: int, num_keypoints: int, head: str, image_size: int,
                 hidden: int = 0, dropout: float = 0.0, heatmap_width: int = 64):
        super().__init__()
        self.body = body
        self.image_size, self.num_keypoints, self.head_kind = image_size, num_keypoints, head
        self.feature_channels = channels
        if head == "regression":
            self.head = RegressionHead(channels, num_keypoints, hidden, dropout)
        else:
            self.head = HeatmapHead(channels, num_keypoints, heatmap_width)

    def forward(self, images):
        return self.head(self.body(images))


HEATMAP_WIDTH_HELP = "heatmap head only: channels of its two upsampling stages"


# -- simple_cnn -------------------------------------------------------------------------------------


@attrs.define
class SimpleCnnConfig:
    width: int = attrs.field(default=32, validator=v.ge(4), metadata={
        "help": "channels after the stem and of the first stage; the next stages double it (32: 32-64-128-256)"})
    heatmap_width: int = attrs.field(default=64, validator=v.ge(4), metadata={"help": HEATMAP_WIDTH_HELP})


def simple_cnn_body(width: int) -> nn.Sequential:
    """A stride-2 conv stem, then four stages of (3x3 stride-2 conv, 3x3 conv), each conv with BN
    and ReLU, at widths w, 2w, 4w, 8w."""

    def conv(c_in, c_out, stride):
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    layers, channels = conv(3, width, 2), width
    for stage in range(4):
        c_out = width * 2 ** stage
        layers += conv(channels, c_out, 2) + conv(c_out, c_out, 1)
        channels = c_out
    return nn.Sequential(*layers)


def build_simple_cnn(config: SimpleCnnConfig | None, role: str = ROLE, image_size: int = 128,
                     num_keypoints: int = 21, head: str = "regression", **_) -> KeypointNet:
    """Plain CNN keypoint regressor (seed 001): conv-BN-ReLU stages, GAP, one linear layer."""
    config = config or SimpleCnnConfig()
    check_context("simple_cnn", role, image_size, num_keypoints, head)
    body = simple_cnn_body(config.width)
    return KeypointNet(body, config.width * 8, num_keypoints, head, image_size, heatmap_width=config.heatmap_width)


# -- mobilelite and mobilelite_attn ----------------------------------------------------------------

STEM_CHANNELS = 32
# (output channels, stride) of the seven inverted bottlenecks; expansion 4 everywhere.
MOBILELITE_BLOCKS = ((32, 1), (48, 2), (48, 1), (64, 2), (64, 1), (96, 2), (128, 2))
EXPANSION = 4
HIDDEN = 256  # the regression head's hidden layer


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou et al., CVPR 2021).

    Squeeze-and-excitation pools each channel to one number and so throws away where things
    are; keypoint regression needs exactly that. Coordinate attention pools along W and along H
    separately, keeping a position along the other axis, encodes both strips with one shared
    1x1 conv, and gates the features with the product of a per-row and a per-column sigmoid:
    a channel can single out the rows and columns where a finger is."""

    def __init__(self, channels: int, reduction: int = 32):
        super().__init__()
        mid = max(8, channels // reduction)  # the paper's floor of 8
        self.encode = nn.Sequential(nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.Hardswish())
        self.gate_h = nn.Conv2d(mid, channels, 1)
        self.gate_w = nn.Conv2d(mid, channels, 1)

    def forward(self, x):
        h, w = x.shape[2:]
        rows = x.mean(3, keepdim=True)  # (N, C, H, 1)
        cols = x.mean(2, keepdim=True).transpose(2, 3)  # (N, C, W, 1)
        strips = self.encode(torch.cat((rows, cols), 2))
        rows, cols = strips.split((h, w), 2)
        return x * self.gate_h(rows).sigmoid() * self.gate_w(cols.transpose(2, 3)).sigmoid()


class InvertedBottleneck(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection, identity shortcut
    when stride and channels are kept; ``attention`` (if any) acts on the expanded depthwise
    features, where the CA paper puts it in MobileNetV2."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int, attention: bool = False,
                 reduction: int = 32):
        super().__init__()
        hidden = c_in * expansion
        self.c_in, self.c_out, self.stride = c_in, c_out, stride
        self.expand = ConvNormAct(c_in, hidden, 1)
        self.depthwise = ConvNormAct(hidden, hidden, 3, stride, groups=hidden)
        self.attention = CoordinateAttention(hidden, reduction) if attention else nn.Identity()
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.project_bn(self.project(self.attention(self.depthwise(self.expand(x)))))
        return x + out if self.residual else out


class GlobalSelfAttention(nn.Module):
    """Multi-head self-attention over the cells of the stride-32 map (16 at 128 px, 49 at 224 px),
    pre-norm, with a learned position embedding (attention alone cannot tell cells apart) and a
    residual scaled by ``gamma``, which starts at 0 so the block starts as the identity. The
    body's channels are multiples of 8, so they always split into the 4 heads."""

    def __init__(self, channels: int, grid: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.position = nn.Parameter(torch.randn(1, grid * grid, channels) * 0.02)
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        if tokens.shape[1] != self.position.shape[1]:
            raise HandforgeError(f"mobilelite_attn: built for a {int(self.position.shape[1] ** 0.5)}^2 feature "
                                 f"grid, got {h}x{w}; build it for this image size")
        q, k, val = self.qkv(self.norm(tokens + self.position)).reshape(n, h * w, 3, self.heads, -1).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), val.transpose(1, 2))
        out = self.proj(out.transpose(1, 2).reshape(n, h * w, c))
        return x + self.gamma * out.transpose(1, 2).reshape(n, c, h, w)

    def extra_macs(self, inputs, output) -> int:
        """Q K^T and attention x V: each tokens^2 x channels products."""
        _, c, h, w = inputs[0].shape
        return 2 * (h * w) ** 2 * c


@attrs.define
class MobileLiteConfig:
    width: float = attrs.field(default=1.0, validator=[v.gt(0.0), v.le(4.0)], metadata={
        "help": "channel multiplier of the stem and blocks (rounded to multiples of 8); 1.0: 32-48-48-64-64-96-128"})
    dropout: float = attrs.field(default=0.2, validator=[v.ge(0.0), v.lt(1.0)], metadata={
        "help": "regression head only: dropout after its 256-unit hidden layer"})
    heatmap_width: int = attrs.field(default=64, validator=v.ge(4), metadata={"help": HEATMAP_WIDTH_HELP})


@attrs.define
class MobileLiteAttnConfig(MobileLiteConfig):
    reduction: int = attrs.field(default=32, validator=v.ge(1), metadata={
        "help": "coordinate attention: its hidden channels are max(8, block channels / reduction)"})
    global_attention: bool = attrs.field(default=False, metadata={
        "help": "add 4-head self-attention over the cells of the last (stride-32) feature map"})


def mobilelite_body(width: float, attention: bool = False, reduction: int = 32) -> tuple[nn.Sequential, int]:
    """Stem (3x3 stride-2 conv, BN, ReLU6) and the seven inverted bottlenecks; returns the body
    and its output channels."""
    channels = round_channels(STEM_CHANNELS * width)
    layers = [ConvNormAct(3, channels, 3, 2)]
    for c_out, stride in MOBILELITE_BLOCKS:
        c_out = round_channels(c_out * width)
        layers.append(InvertedBottleneck(channels, c_out, stride, EXPANSION, attention, reduction))
        channels = c_out
    body = nn.Sequential(*layers)
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
    return body, channels


def build_mobilelite(config: MobileLiteConfig | None, role: str = ROLE, image_size: int = 128,
                     num_keypoints: int = 21, head: str = "regression", **_) -> KeypointNet:
    """MobileNetV2-style keypoint regressor: seven inverted bottlenecks, expansion 4."""
    config = config or MobileLiteConfig()
    check_context("mobilelite", role, image_size, num_keypoints, head)
    body, channels = mobilelite_body(config.width)
    return KeypointNet(body, channels, num_keypoints, head, image_size, HIDDEN, config.dropout, config.heatmap_width)


def build_mobilelite_attn(config: MobileLiteAttnConfig | None, role: str = ROLE, image_size: int = 128,
                          num_keypoints: int = 21, head: str = "regression", **_) -> KeypointNet:
    """mobilelite with coordinate attention in every inverted bottleneck."""
    config = config or MobileLiteAttnConfig()
    check_context("mobilelite_attn", role, image_size, num_keypoints, head)
    body, channels = mobilelite_body(config.width, attention=True, reduction=config.reduction)
    if config.global_attention:
        body.append(GlobalSelfAttention(channels, image_size // BODY_STRIDE))
    return KeypointNet(body, channels, num_keypoints, head, image_size, HIDDEN, config.dropout, config.heatmap_width)


@hookimpl
def register_backbones(register):
    register("simple_cnn", build_simple_cnn, config=SimpleCnnConfig, roles=(ROLE,))
    register("mobilelite", build_mobilelite, config=MobileLiteConfig, roles=(ROLE,))
    register("mobilelite_attn", build_mobilelite_attn, config=MobileLiteAttnConfig, roles=(ROLE,))
