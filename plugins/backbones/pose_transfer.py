"""Networks of the ``pose_transfer`` task: the ``pose_transfer_unet`` generator and the ``patch_gan``
discriminator.

``pose_transfer_unet`` (role ``pose_transfer``) re-draws a reference image in a target pose. Its
encoder reads the reference with the pose maps of both the reference and the target (the input of
the seed's plain U-Net); every encoder level halves the resolution down to 8x8, and the decoder
climbs back with a skip connection from the encoder level of the same size. With ``reinject``
(default) the target's maps enter every decoder block again, through the conditioner:

- ``g_conditioner = "spade"``: each decoder norm is SPADE, modulated per pixel by the target maps;
- ``g_conditioner = "concat"``: the maps, resized, are concatenated to each decoder block's input.

With ``reinject = false`` the decoder is the plain pix2pix-style U-Net's (BatchNorm, the pose seen
at the input only): the baseline. Widths: ``ch`` at the image size, doubling per level up to
``ch_max``; ``ch = 0`` takes 64 from 128 px on and 32 below (the seed's 256 px width is pix2pix's 64).

``patch_gan`` (role ``discriminator``) is pix2pix's PatchGAN (Isola et al. 2017): 4x4 convolutions,
``n_layers`` of them with stride 2, then two with stride 1, one logit per overlapping patch. Three
strided layers see 70x70 pixels (the "70x70 PatchGAN"); ``n_layers = 0`` picks 3 from 128 px on,
2 at 64 px (34x34) and 1 below. Its input is the image with the conditioner's channels
(``concat``: the target's pose maps). Output (N, 1, h, w) logits; the adversarial losses average
them.
"""
import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F
from attrs import validators as v
from torch.nn.utils.parametrizations import spectral_norm as sn

from handforge import hookimpl
from handforge.errors import HandforgeError

BOTTOM = 8  # the U-Net's lowest resolution
NORMS = ("batch", "instance", "none")


def _check_size(name: str, image_size) -> int:
    """Levels from the image down to 8x8; a power of two from 16 px on."""
    if not isinstance(image_size, int) or image_size < 16 or image_size & (image_size - 1):
        raise HandforgeError(f"backbone '{name}' needs a power-of-two image size >= 16, got {image_size!r}")
    return (image_size // BOTTOM).bit_length() - 1


def _check_role(name: str, role: str, expected: str) -> None:
    if role != expected:
        raise HandforgeError(f"backbone '{name}' has role {expected!r} (task pose_transfer), not {role!r}")


# -- the generator ------------------------------------------------------------------------------


@attrs.define
class PoseTransferUnetConfig:
    ch: int = attrs.field(default=0, validator=v.ge(0), metadata={
        "help": "channels at the image size, doubling per level; 0 = 64 from 128 px on, else 32"})
    ch_max: int = attrs.field(default=512, validator=v.ge(1), metadata={"help": "widest level"})
    reinject: bool = attrs.field(default=True, metadata={
        "help": "the target pose re-enters every decoder block (spade: SPADE norms; concat: concatenated "
                "maps); false: the plain U-Net, pose at the input only"})


def conv3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class Down(nn.Module):
    """Halve the resolution (4x4 conv, stride 2), then a 3x3 conv; BatchNorm, LeakyReLU 0.2."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2),
            conv3(c_out, c_out), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))

    def forward(self, x):
        return self.body(x)


class Up(nn.Module):
    """Double the resolution (nearest), join the skip features, two 3x3 convs with norms and ReLU.

    ``mode`` is how the target maps come in: "none" (plain BatchNorm), "norm" (the conditioner's
    norm layers, SPADE) or "concat" (the conditioner concatenates the maps to both convs' inputs)."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, conditioner, mode: str):
        super().__init__()
        self.mode, self.conditioner = mode, conditioner
        extra = conditioner.input_channels if mode == "concat" else 0
        self.conv1, self.conv2 = conv3(c_in + c_skip + extra, c_out), conv3(c_out + extra, c_out)
        make_norm = conditioner.norm if mode == "norm" else nn.BatchNorm2d
        self.norm1, self.norm2 = make_norm(c_out), make_norm(c_out)

    def _norm(self, norm, x, maps):
        return norm(x, maps) if self.mode == "norm" else norm(x)

    def _input(self, x, maps):
        return self.conditioner.merge_input(x, maps) if self.mode == "concat" else x

    def forward(self, x, skip, maps):
        x = torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skip], dim=1)
        x = F.relu(self._norm(self.norm1, self.conv1(self._input(x, maps)), maps))
        return F.relu(self._norm(self.norm2, self.conv2(self._input(x, maps)), maps))


class PoseTransferUnet(nn.Module):
    """reference (N, 3, H, W), reference maps and target maps (N, K, H, W) -> (N, 3, H, W) in [-1, 1]."""

    def __init__(self, image_size: int, conditioner, ch: int = 0, ch_max: int = 512, reinject: bool = True):
        super().__init__()
        levels = _check_size("pose_transfer_unet", image_size)
        ch = ch or (64 if image_size >= 128 else 32)
        widths = [min(ch * 2**i, ch_max) for i in range(levels + 1)]  # image size .. 8x8
        maps = int(conditioner.map_channels)
        if reinject:
            mode = "concat" if getattr(conditioner, "input_channels", 0) else "norm"
        else:
            mode = "none"
        self.mode = mode
        self.stem = nn.Sequential(conv3(3 + 2 * maps, widths[0]), nn.LeakyReLU(0.2))
        self.down = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(levels))
        self.middle = nn.Sequential(conv3(widths[-1], widths[-1]), nn.BatchNorm2d(widths[-1]), nn.ReLU())
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], widths[i], conditioner, mode)
                                for i in reversed(range(levels)))
        self.out = conv3(widths[0], 3)

    def forward(self, reference, reference_maps, target_maps):
        h = self.stem(torch.cat([reference, reference_maps.to(reference.dtype), target_maps.to(reference.dtype)], 1))
        skips = [h]
        for down in self.down:
            h = down(h)
            skips.append(h)
        h = self.middle(skips.pop())
        for up in self.up:
            h = up(h, skips.pop(), target_maps)
        return torch.tanh(self.out(h))


def build_pose_transfer_unet(config=None, *, role: str, image_size: int, conditioner=None, **_):
    """U-Net re-drawing a reference image in a target pose, the pose re-injected in every decoder block."""
    config = config or PoseTransferUnetConfig()
    _check_role("pose_transfer_unet", role, "pose_transfer")
    if conditioner is None or not getattr(conditioner, "map_channels", 0):
        raise HandforgeError("backbone 'pose_transfer_unet' needs a pose-map conditioner (g_conditioner "
                             "'spade' or 'concat')")
    return PoseTransferUnet(image_size, conditioner, config.ch, config.ch_max, config.reinject)


# -- the discriminator ------------------------------------------------------------------------------


@attrs.define
class PatchGanConfig:
    ch: int = attrs.field(default=64, validator=v.ge(1), metadata={"help": "channels of the first layer"})
    n_layers: int = attrs.field(default=0, validator=[v.ge(0), v.le(6)], metadata={
        "help": "stride-2 layers: 3 sees 70x70 pixels per logit; 0 = 3 from 128 px on, 2 at 64 px, else 1"})
    norm: str = attrs.field(default="batch", validator=v.in_(NORMS))
    spectral_norm: bool = attrs.field(default=False, metadata={"help": "spectral norm on every conv"})


def default_layers(image_size: int) -> int:
    return 3 if image_size >= 128 else 2 if image_size >= 64 else 1


class PatchGan(nn.Module):
    def __init__(self, image_size: int, conditioner, ch: int = 64, n_layers: int = 0, norm: str = "batch",
                 spectral_norm: bool = False):
        super().__init__()
        n_layers = n_layers or default_layers(image_size)
        self.conditioner = conditioner
        c_in = 3 + int(getattr(conditioner, "input_channels", 0))

        def conv(a, b, stride):
            return sn(nn.Conv2d(a, b, 4, stride=stride, padding=1)) if spectral_norm else nn.Conv2d(a, b, 4, stride, 1)

        def normed(c):
            return {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d}.get(norm, lambda _: nn.Identity())(c)

        layers, width = [conv(c_in, ch, 2), nn.LeakyReLU(0.2)], ch
        for i in range(1, n_layers + 1):
            out = ch * min(2**i, 8)
            layers += [conv(width, out, 2 if i < n_layers else 1), normed(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(conv(width, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x, cond=None):
        return self.net(self.conditioner.merge_input(x, cond))


def build_patch_gan(config=None, *, role: str, image_size: int, conditioner=None, **_):
    """pix2pix's PatchGAN discriminator: one logit per 70x70 (or smaller) patch, optional spectral norm."""
    config = config or PatchGanConfig()
    _check_role("patch_gan", role, "discriminator")
    if conditioner is None:
        raise HandforgeError("backbone 'patch_gan' needs its conditioner (d_conditioner)")
    return PatchGan(int(image_size), conditioner, config.ch, config.n_layers, config.norm, config.spectral_norm)


@hookimpl
def register_backbones(register):
    register("pose_transfer_unet", build_pose_transfer_unet, config=PoseTransferUnetConfig, roles=("pose_transfer",))
    register("patch_gan", build_patch_gan, config=PatchGanConfig, roles=("discriminator",))
