"""Metric costs against same-run references: PRDC, the Fréchet distance, FID Inception features.

    python bench/metrics.py [--n 10000] [--dim 2048] [--images 32] [--batch 8 16 32] [--threads 2]
                            [--skip-prdc] [--skip-frechet] [--skip-inception]

Three tables, each with the reference beside ours from the same run:

- prdc: ``prdc(real, fake, k=5)`` on N x N random 2048-d features against the prdc package's
  steps on three whole ``torch.cdist`` matrices (bench/_metric_math.py). Goal: 10k x 10k < 10 s.
- frechet: ``frechet_distance`` at D = 2048 against pytorch-fid's formula with
  ``scipy.linalg.sqrtm`` (bench/_metric_math.py).
- inception: img/s at 299 px of the folded eager FID Inception against a bare loop over the
  same TorchScript file, and the largest feature difference (bench/_inception.py; needs
  ``handforge weights fetch inception_fid``). Goal: >= 2x that loop, features within 1e-4.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="real and fake samples for prdc")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension for prdc and frechet")
    parser.add_argument("--images", type=int, default=32, help="images through the Inception per pass")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32], help="Inception batch sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-prdc", action="store_true")
    parser.add_argument("--skip-frechet", action="store_true")
    parser.add_argument("--skip-inception", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    math_rows = []
    if not args.skip_prdc:
        math_rows += _metric_math.prdc_rows(args.n, args.dim)
    if not args.skip_frechet:
        math_rows += _metric_math.frechet_rows(args.dim)
    if math_rows:
        _metric_math.print_table(math_rows)
        prdc_row = next((r for r in math_rows if r["benchmark"] == "prdc"), None)
        if prdc_row and (args.n, args.dim) == (10000, 2048):
            print(f"\ngoal: prdc 10k x 10k x 2048 < {_metric_math.PRDC_GOAL_S:.0f} s: {prdc_row['ours_s']:.1f} s")

    if not args.skip_inception:
        rows = _inception.rows(args.images, args.batch)
        print("\n| batch | TorchScript img/s | ours img/s | ours / TorchScript | max abs diff |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['batch']} | {r['torchscript_img_s']:.2f} | {r['ours_img_s']:.2f} | {r['ratio']:.2f}x "
                  f"| {r['max_abs_diff']:.1e} |")
        best_theirs = max(r["torchscript_img_s"] for r in rows)
        best_ours = max(r["ours_img_s"] for r in rows)
        print(f"\nbest of each: ours {best_ours:.2f} img/s, TorchScript {best_theirs:.2f} img/s "
              f"({best_ours / best_theirs:.2f}x); goal >= 2x, max abs diff < 1e-4")

    print(f"\ntorch threads {args.threads}; 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
