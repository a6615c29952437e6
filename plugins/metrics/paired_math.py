"""Image-to-image scores of generated images against their targets, batched in torch: SSIM (Wang,
Bovik, Sheikh and Simoncelli 2004: an 11-tap Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03,
the mean of the SSIM map over the pixels whose window lies inside the image, each channel on its
own), PSNR, and both inside the hand's box, with the sharpness of the hand (the variance of the
Laplacian) relative to the target's.

Images are float (N, C, H, W) on the 0..255 scale (uint8 images converted). The results are per
image; the metrics average them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from handforge.keypoint_math import box_masks, hand_boxes

DATA_RANGE = 255.0
K1, K2 = 0.01, 0.03
WINDOW, SIGMA = 11, 1.5
# variance of the Laplacian over fewer pixels than this is no measure of sharpness
MIN_BOX_PIXELS = 16
# SSIM runs over batches in chunks of about this many pixels per image x images: its dozen maps
# then stay in the CPU's cache (measured on 256 px: chunks of 1-4 images ~2x faster than 64).
CHUNK_PIXELS = 1 << 17


def gaussian_taps(size: int = WINDOW, sigma: float = SIGMA, dtype=torch.float32) -> torch.Tensor:
    """The normalised 1-D Gaussian the 2-D window is the outer product of."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-x * x / (2 * sigma * sigma))
    return (taps / taps.sum()).to(dtype)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """The SSIM map (N, C, H - 10, W - 10): pixel (i, j) is the window centred on (i + 5, j + 5).

    Wang et al.'s formula needs the local means of x and y, the sum of their variances and their
    covariance, which four blurred maps give instead of the usual five: with s = (x + y) / 2 and
    d = (x - y) / 2, mu_x mu_y = mu_s^2 - mu_d^2, mu_x^2 + mu_y^2 = 2 (mu_s^2 + mu_d^2),
    var_x + var_y = 2 (var_s + var_d) and cov_xy = var_s - var_d. s is centred on mid-range, so
    every map stays within +-data_range / 2 before squaring (fp32 then agrees with a float64
    computation to ~1e-7). The blur is one 11x11 depthwise convolution over channels-last maps: on
    a CPU several times faster than two separable passes in torch (oneDNN vectorises over channels).
    """
    if x.shape != y.shape:
        raise ValueError(f"images of different shapes: {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels, got {tuple(x.shape[-2:])}")
    n, c, h, w = x.shape
    per_chunk = max(1, CHUNK_PIXELS // (h * w))
    if n > per_chunk and x.device.type == "cpu":
        # One thread for the chunks: each op on a chunk is too small to pay for a thread barrier,
        # and on a busy machine the barriers wait for descheduled threads (measured on 2 shared
        # cores: 200 img/s on one thread, 8 on two).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return torch.cat([_ssim_map(x[i:i + per_chunk], y[i:i + per_chunk], data_range)
                              for i in range(0, n, per_chunk)])
        finally:
            torch.set_num_threads(threads)
    return _ssim_map(x, y, data_range)


def _ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    n, c, h, w = x.shape
    dtype = x.dtype if x.is_floating_point() else torch.float32
    half = data_range / 2
    xh, yh = x.permute(0, 2, 3, 1).to(dtype), y.permute(0, 2, 3, 1).to(dtype)  # channels last
    s = torch.add(xh, yh).sub_(data_range).mul_(0.5)
    d = torch.sub(xh, yh).mul_(0.5)
    maps = torch.stack([s, d, s * s, d * d], dim=3).view(n, h, w, 4 * c)
    taps = gaussian_taps(dtype=dtype).to(x.device)
    window = (taps[:, None] * taps[None, :]).expand(4 * c, 1, -1, -1).contiguous()
    blurred = F.conv2d(maps.permute(0, 3, 1, 2), window, groups=4 * c)  # a channels-last view, no copy
    # map-major, so that the arithmetic below runs over contiguous memory
    ms, md, es, ed = blurred.permute(0, 2, 3, 1).reshape(n, h - 10, w - 10, 4, c).permute(3, 0, 1, 2, 4).contiguous()
    var_s = torch.addcmul(es, ms, ms, value=-1, out=es)
    var_d = torch.addcmul(ed, md, md, value=-1, out=ed)
    mean_s2 = ms.add_(half).square_()  # ((mu_x + mu_y) / 2)^2, uncentred
    mean_d2 = md.square_()
    # numerator and denominator both divided by 4: (mu_x mu_y + c1/2)(cov + c2/2) / (...)
    c1, c2 = (K1 * data_range) ** 2 / 2, (K2 * data_range) ** 2 / 2
    numerator = torch.sub(mean_s2, mean_d2).add_(c1).mul_(torch.sub(var_s, var_d).add_(c2))
    denominator = mean_s2.add_(mean_d2).add_(c1).mul_(var_s.add_(var_d).add_(c2))
    return numerator.div_(denominator).permute(0, 3, 1, 2)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-image SSIM (N,): the mean of the map over its pixels and channels."""
    return ssim_map(x, y, data_range).mean(dim=(1, 2, 3))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB (N,); +inf for identical images (or regions, with ``mask`` (N, 1, H, W))."""
    error = (x.float() - y.float()) ** 2
    if mask is None:
        mse = error.mean(dim=(1, 2, 3))
    else:
        mse = (error * mask).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * x.shape[1]).clamp_min(1)
    with torch.no_grad():
        return torch.where(mse > 0, 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-30)),
                           torch.full_like(mse, math.inf))


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's "L" conversion


def laplacian_variance(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image (N,): the variance of the Laplacian of the luma inside ``mask`` (N, 1, H, W)."""
    weights = torch.tensor(LUMA, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    luma = (images.float() * weights).sum(dim=1, keepdim=True)
    response = F.conv2d(luma, LAPLACIAN.to(images.device).view(1, 1, 3, 3))
    inner = mask[..., 1:-1, 1:-1]  # the response of pixel (i, j) sits at (i - 1, j - 1)
    count = inner.sum(dim=(1, 2, 3)).clamp_min(1)
    mean = (response * inner).sum(dim=(1, 2, 3)) / count
    return (((response - mean.view(-1, 1, 1, 1)) ** 2) * inner).sum(dim=(1, 2, 3)) / count


def paired_scores(real: torch.Tensor, fake: torch.Tensor, keypoints: torch.Tensor | None,
                  margin: float = 0.25) -> dict[str, torch.Tensor]:
    """Every per-image score of one batch of (target, generated) images, uint8 or 0..255 float
    (N, 3, H, W), with the targets' keypoints for the hand scores: {name: (N,)}. ``hand`` is 1 for
    images whose hand box could be scored (a visible point, a box of at least MIN_BOX_PIXELS);
    ``hand_textured`` where the target's hand is also not flat (a sharpness ratio exists)."""
    real, fake = real.float(), fake.float()
    full = ssim_map(real, fake)
    scores = {"ssim": full.mean(dim=(1, 2, 3)), "psnr": psnr(real, fake)}
    if keypoints is None:
        return scores
    height, width = real.shape[-2:]
    boxes, has = hand_boxes(keypoints.to(real.device).float(), height, width, margin)
    mask = box_masks(boxes, height, width)
    pad = (WINDOW - 1) // 2
    inner = mask[..., pad:height - pad, pad:width - pad]  # the SSIM map's pixels
    counted = inner.sum(dim=(1, 2, 3))
    usable = has & (counted >= MIN_BOX_PIXELS)
    scores["hand_ssim"] = (full * inner).sum(dim=(1, 2, 3)) / (counted * full.shape[1]).clamp_min(1)
    scores["hand_psnr"] = psnr(real, fake, mask=mask)
    sharp_real, sharp_fake = laplacian_variance(real, mask), laplacian_variance(fake, mask)
    scores["hand_sharpness"] = sharp_fake / sharp_real.clamp_min(1e-6)
    scores["hand"] = usable.float()
    # a flat target hand (variance 0) gives no ratio: left out of the sharpness only
    scores["hand_textured"] = (usable & (sharp_real > 1e-6)).float()
    return scores
