"""FID Inception throughput: the bare TorchScript loop against handforge's folded eager network,
as table rows; ``python bench/metrics.py`` runs and prints them.

Needs the weight file (``handforge weights fetch inception_fid``). Inputs are procedural hands
rendered at 128 px, quantized to uint8 and clean-resized to 299 px once, so both sides time the
network alone on the same (x - 128) / 128 tensors:

- torchscript: ``torch.jit.load`` of the file, called on NCHW batches under ``torch.no_grad``
  (what pytorch-fid / clean-fid style loops do); one warm-up call first, since TorchScript's
  profiling executor optimizes during its first calls.
- ours: ``load_network()`` (batch norm folded, stacked 1x1 convolutions, channels_last) under
  ``torch.inference_mode``, one warm-up call first.

Each figure is the median of `repeats` passes over all images (at least 5 by default; the
median resists the odd disturbed pass on a shared machine); the two sides alternate pass by pass. "max |diff|" compares the
features of all images. GFLOP/s counts 2 x multiply-adds of the convolutions (11.4 GFLOP per
image); the fp32 matmul rate on the same threads (bench/_flops.py) is printed beside it, as the
bound a network of convolutions can reach. The resize table gives milliseconds per image of
each resize mode from S px to 299 px. bench/metrics.py prints the load average
before and after: compare runs only when it is low.
"""
import statistics
import time
import warnings

import torch

from handforge.plugins.metrics import inception
from handforge.plugins.metrics.weight_files import INCEPTION_FID
from handforge.errors import HandforgeError
from handforge.weights import locate


def missing_weights() -> str | None:
    """Why the Inception rows cannot run (the weight file is absent or wrong), or None."""
    try:
        locate(INCEPTION_FID)
    except HandforgeError as error:
        return str(error)
    return None


GFLOP_PER_IMAGE = 11.42  # 2 x multiply-adds of all convolutions at 299 px (measured with FlopCounterMode)


def _hand_images(n: int, size: int) -> torch.Tensor:
    from handforge.imaging import to_uint8
    from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig
    images = ProceduralHands(ProceduralHandsConfig(size=size, length=max(n, 1))).__getitems__(list(range(n)))["image"]
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()


def _timed_pass(fn, x: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    features = torch.cat([fn(chunk) for chunk in x.split(batch)])
    return time.perf_counter() - start, features


def rows(n_images: int = 32, batch_sizes=(8, 16, 32), repeats: int = 5) -> list[dict]:
    """One row per batch size: images/s of the TorchScript loop and of ours, ratio, max |diff|."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(locate(INCEPTION_FID)), map_location="cpu").eval()
    network = inception.load_network()
    x = inception.network_input(_hand_images(n_images, 128), "clean")
    x_nchw = x.contiguous()

    def run_scripted(chunk):
        with torch.no_grad():
            return scripted(chunk)

    def run_ours(chunk):
        with torch.inference_mode():
            return network(chunk)

    run_scripted(x_nchw[:2])
    run_ours(x[:2])
    out = []
    for batch in batch_sizes:
        times = {"torchscript": [], "ours": []}
        for _ in range(repeats):
            t, reference = _timed_pass(run_scripted, x_nchw, batch)
            times["torchscript"].append(t)
            t, ours = _timed_pass(run_ours, x, batch)
            times["ours"].append(t)
        rate = {k: n_images / statistics.median(v) for k, v in times.items()}
        out.append({"batch": batch, "images": n_images, "torchscript_img_s": rate["torchscript"],
                    "ours_img_s": rate["ours"], "ratio": rate["ours"] / rate["torchscript"],
                    "ours_gflop_s": rate["ours"] * GFLOP_PER_IMAGE,
                    "max_abs_diff": (ours - reference).abs().max().item()})
    return out


def resize_rows(sizes=(64, 128, 256), n_images: int = 16) -> list[dict]:
    """Milliseconds per image of each resize mode, S px uint8 -> the network's 299 px input."""
    out = []
    for size in sizes:
        images = _hand_images(n_images, size)
        row = {"size": size}
        for mode in inception.RESIZE_MODES:
            inception.network_input(images[:2], mode)
            start = time.perf_counter()
            inception.network_input(images, mode)
            row[f"{mode}_ms"] = (time.perf_counter() - start) * 1000 / n_images
        out.append(row)
    return out


def print_tables(network_rows: list[dict], size_rows: list[dict], matmul_gflop_s: float) -> None:
    """The network table (img/s, ratio, achieved GFLOP/s beside the matmul rate) and the resize table."""
    print(f"FID Inception at 299 px, {network_rows[0]['images']} images per pass; "
          f"fp32 matmul rate {matmul_gflop_s:.0f} GFLOP/s\n")
    print("| batch | TorchScript img/s | ours img/s | ours / TorchScript | ours GFLOP/s | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in network_rows:
        print(f"| {r['batch']} | {r['torchscript_img_s']:.2f} | {r['ours_img_s']:.2f} | {r['ratio']:.2f}x "
              f"| {r['ours_gflop_s']:.0f} | {r['max_abs_diff']:.1e} |")
    best_theirs = max(r["torchscript_img_s"] for r in network_rows)
    best_ours = max(r["ours_img_s"] for r in network_rows)
    print(f"\nbest batch size of each (medians): ours {best_ours:.2f} img/s, TorchScript {best_theirs:.2f} img/s "
          f"({best_ours / best_theirs:.2f}x); goal >= 2x, max abs diff < 1e-4")
    print("\n| input px | clean resize ms/img | legacy resize ms/img |")
    print("|---:|---:|---:|")
    for r in size_rows:
        print(f"| {r['size']} | {r['clean_ms']:.2f} | {r['legacy_ms']:.2f} |")
