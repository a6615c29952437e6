"""Metric costs against same-run peers: PRDC, the Fréchet distance, FID Inception features.

    python bench/metrics.py [--n 10000] [--dim 2048] [--k 5] [--prdc-repeats 3] [--prdc-peer-repeats 3]
                            [--frechet-n 10000] [--frechet-repeats 5] [--frechet-peer-repeats 3]
                            [--images 32] [--batch 8 16 32] [--repeats 5] [--threads 2]
                            [--skip-prdc] [--skip-frechet] [--skip-inception]

The peers are optional: ``pip install -c constraints.txt -e ".[bench]"`` (prdc, scipy).
Three tables, each with the peer beside ours and the ratio from the same run; every time is a
median over its repeats:

- prdc: ``prdc(real, fake, k)`` on N x N 2048-d features against the prdc package's own
  ``compute_prdc`` on the same features (without the package: a torch port of its steps,
  labelled so) (bench/_metric_math.py); the four values of both are printed with their largest
  difference. Goal: 10k x 10k < 10 s.
- frechet: ``frechet_distance`` on the sample means and covariances of two 10k x 2048 feature
  sets against pytorch-fid's formula with ``scipy.linalg.sqrtm`` (bench/_metric_math.py); both
  distances and their difference are printed.
- inception: img/s at 299 px of the folded eager FID Inception against a bare loop over the
  same TorchScript file, achieved GFLOP/s beside the fp32 matmul rate measured in the same run,
  the largest feature difference, and the per-image cost of the two resize modes
  (bench/_inception.py; needs ``handforge weights fetch inception_fid``: without the file the
  rows are skipped with the reason printed). Goal: >= 2x that loop, features within 1e-4.

The 1-min load average is printed before and after: the 2 cores are easily shared, and a
number taken under load says little.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _inception  # noqa: E402
import _metric_math  # noqa: E402
from _flops import matmul_rate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="real and fake samples for prdc")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension for prdc and frechet")
    parser.add_argument("--k", type=int, default=5, help="nearest neighbours for prdc")
    parser.add_argument("--prdc-repeats", type=int, default=3, help="timed calls of ours for prdc (median)")
    parser.add_argument("--prdc-peer-repeats", type=int, default=3, help="timed calls of the prdc package (median)")
    parser.add_argument("--frechet-n", type=int, default=10000, help="samples behind each Fréchet covariance")
    parser.add_argument("--frechet-repeats", type=int, default=5, help="timed calls of ours for frechet (median)")
    parser.add_argument("--frechet-peer-repeats", type=int, default=3, help="timed calls of scipy's sqrtm formula")
    parser.add_argument("--images", type=int, default=32, help="images through the Inception per pass")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32], help="Inception batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="Inception passes per batch size (median counts)")
    parser.add_argument("--threads", type=int, default=2)
    for part in ("prdc", "frechet", "inception"):
        parser.add_argument(f"--skip-{part}", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    math_rows = [] if args.skip_prdc else _metric_math.prdc_rows(
        args.n, args.dim, args.k, repeats=args.prdc_repeats, reference_repeats=args.prdc_peer_repeats)
    math_rows += [] if args.skip_frechet else _metric_math.frechet_rows(
        args.dim, args.frechet_n, repeats=args.frechet_repeats, reference_repeats=args.frechet_peer_repeats)
    if math_rows:
        _metric_math.print_table(math_rows)
        prdc_row = next((r for r in math_rows if r["benchmark"] == "prdc"), None)
        if prdc_row and (args.n, args.dim) == (10000, 2048):
            print(f"\ngoal: prdc 10k x 10k x 2048 < {_metric_math.PRDC_GOAL_S:.0f} s: {prdc_row['ours_s']:.1f} s (median)\n")

    if not args.skip_inception:
        if math_rows:
            print()
        reason = _inception.missing_weights()
        if reason is not None:
            print(f"inception rows skipped: {reason}")
        else:
            network_rows = _inception.rows(args.images, args.batch, args.repeats)
            _inception.print_tables(network_rows, _inception.resize_rows(), matmul_rate(args.threads)["gflops_best"])

    print(f"\ntorch threads {args.threads}; 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
