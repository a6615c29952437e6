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
from handforge.threads import map_single_threaded

DATA_RANGE = 255.0
K1, K2 = 0.01, 0.03
WINDOW, SIGMA = 11, 1.5
# variance of the Laplacian over fewer pixels than this is no measure of sharpness
MIN_BOX_PIXELS = 16
# SSIM runs over batches in chunks of about this many pixels per image x images: its maps then stay
# in the CPU's cache (measured on 256 px, one thread: chunks of one image 369 img/s, of two 320,
# of four 275).
CHUNK_PIXELS = 1 << 16


def gaussian_taps(size: int = WINDOW, sigma: float = SIGMA, dtype=torch.float32) -> torch.Tensor:
    """The normalised 1-D Gaussian the 2-D window is the outer product of."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-x * x / (2 * sigma * sigma))
    return (taps / taps.sum()).to(dtype)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """The SSIM map (N, C, H - 10, W - 10): pixel (i, j) is the window centred on (i + 5, j + 5).

    Wang et al.'s formula needs the local means of x and y, the sum of their variances and their
    covariance, which four blurred maps give instead of the usual five: with s = x + y and d = x - y,
    4 mu_x mu_y = mu_s^2 - mu_d^2, 2 (mu_x^2 + mu_y^2) = mu_s^2 + mu_d^2, 2 (var_x + var_y) =
    var_s + var_d and 4 cov_xy = var_s - var_d (each of the formula's four factors doubled, so C1
    and C2 enter as 2 C1 and 2 C2). x and y are centred on their images' means first, which leaves
    the variances as they are and keeps the squares small (fp32 then agrees with scikit-image's
    float64 to ~1e-7, flat images included, where a variance is a difference of equal squares).
    The blur is separable: one 11x1 then one 1x11 depthwise convolution over channels-last maps
    (oneDNN vectorises over the 4C channels; two passes do 22 multiply-adds a pixel instead of the
    2-D window's 121, ~2.5x faster), with no padding: the map is the valid region, which is what
    scikit-image averages after cropping (win_size - 1) / 2 pixels a side. The two layout changes
    (into channels-last maps and back to planes) cost about as much as the blur itself.
    """
    if x.shape != y.shape:
        raise ValueError(f"images of different shapes: {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels, got {tuple(x.shape[-2:])}")
    n, c, h, w = x.shape
    dtype = x.dtype if x.is_floating_point() else torch.float32
    taps = gaussian_taps(dtype=dtype).to(x.device)
    windows = (taps.view(1, 1, 1, -1).expand(4 * c, 1, 1, -1).contiguous(),
               taps.view(1, 1, -1, 1).expand(4 * c, 1, -1, 1).contiguous())
    ratio = torch.empty((n, c, h - 10, w - 10), dtype=dtype, device=x.device)
    per_chunk = max(1, CHUNK_PIXELS // (h * w))
    if n > per_chunk and x.device.type == "cpu":
        # Each op on a chunk is too small to pay for a thread barrier, and on a busy machine the
        # barriers wait for descheduled threads (measured on 2 shared cores: 200 img/s on one
        # thread, 8 on two). So the chunks go to Python threads, every op on one thread.
        def chunk(i):
            _ssim_map(x[i:i + per_chunk], y[i:i + per_chunk], data_range, windows, ratio[i:i + per_chunk])

        map_single_threaded(chunk, range(0, n, per_chunk))
    else:
        _ssim_map(x, y, data_range, windows, ratio)
    return ratio


def _ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float, windows: tuple[torch.Tensor, torch.Tensor],
              out: torch.Tensor) -> None:
    """The SSIM map of one chunk into ``out`` (N, C, H - 10, W - 10)."""
    dtype = out.dtype
    n, c, h, w = x.shape
    # each image's channels centred near their mean (that of every 4th row and column, rounded:
    # integers stay exact): variances are differences of blurred squares, whose fp32 rounding grows
    # with the squares' magnitude
    x, y = x.contiguous(), y.contiguous()  # broadcasting the centres over contiguous planes is fast
    centre_x = x[..., ::4, ::4].mean(dim=(2, 3), keepdim=True, dtype=dtype).round_()
    centre_y = y[..., ::4, ::4].mean(dim=(2, 3), keepdim=True, dtype=dtype).round_()
    xc, yc = torch.sub(x, centre_x), torch.sub(y, centre_y)
    maps = torch.empty((n, h, w, 4, c), dtype=dtype, device=x.device)  # channels last: s, d, s^2, d^2
    planes = maps.permute(3, 0, 4, 1, 2)  # (4, N, C, H, W) views
    torch.add(xc, yc, out=planes[0])
    torch.sub(xc, yc, out=planes[1])
    torch.mul(planes[:2], planes[:2], out=planes[2:])
    stacked = maps.view(n, h, w, 4 * c).permute(0, 3, 1, 2)  # a channels-last (N, 4C, H, W) view, no copy
    # Vertical pass first: its output keeps the image's full width, and oneDNN's depthwise 1x11 runs
    # ~2x faster on that than on the 10-narrower rows a horizontal pass leaves (measured at 256 px,
    # one thread: 0.87 ms against 1.60 ms for the pair on 12 channels).
    blurred = F.conv2d(F.conv2d(stacked, windows[1], groups=4 * c), windows[0], groups=4 * c)
    # back to planes, (4, N, C, H - 10, W - 10), so that the arithmetic below runs over contiguous memory
    pixels = (h - 10) * (w - 10)
    moments = blurred.permute(0, 2, 3, 1).reshape(n, pixels, 4 * c).transpose(1, 2).contiguous()
    moments = moments.view(n, 4, c, h - 10, w - 10).transpose(0, 1)
    means, variances = moments[:2], moments[2:]
    torch.addcmul(variances, means, means, value=-1, out=variances)  # var_s, var_d
    means.add_(torch.stack([centre_x + centre_y, centre_x - centre_y]))  # uncentred
    means.square_()  # (mu_x + mu_y)^2, (mu_x - mu_y)^2
    sums, differences = moments[0::2], moments[1::2]  # (mean_s2, var_s), (mean_d2, var_d)
    constants = torch.tensor([2 * (K1 * data_range) ** 2, 2 * (K2 * data_range) ** 2], dtype=dtype)  # see the docstring
    sums.add_(constants.to(x.device).view(2, 1, 1, 1, 1))
    numerator = torch.sub(sums, differences)
    denominator = sums.add_(differences)
    torch.div(numerator[0].mul_(numerator[1]), denominator[0].mul_(denominator[1]), out=out)


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
