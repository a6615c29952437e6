"""Images per second of the procedural_hands renderer (one __getitems__ call per batch), as a table.

    python bench/procedural_hands.py [--sizes 32 64 128] [--batch 64] [--batches 30] [--threads 1 2]

Reports the mean over all batches and the best batch: on a shared machine the best one shows
what the renderer costs when nothing else competes for the cores.
"""
import argparse
import time

import torch

from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig


def measure(size: int, batch: int, batches: int) -> tuple[float, float]:
    dataset = ProceduralHands(ProceduralHandsConfig(size=size, length=batch * (batches + 1)))
    dataset.__getitems__(list(range(batch)))  # warm up
    times = []
    for i in range(1, batches + 1):
        start = time.perf_counter()
        dataset.__getitems__(list(range(i * batch, (i + 1) * batch)))
        times.append(time.perf_counter() - start)
    return batch * len(times) / sum(times), batch / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"procedural_hands, batches of {args.batch}, torch {torch.__version__}")
    print(f"{'size':>6} {'threads':>8} {'mean img/s':>11} {'best img/s':>11}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in args.sizes:
            mean, best = measure(size, args.batch, args.batches)
            print(f"{size:>6} {threads:>8} {mean:>11.0f} {best:>11.0f}")


if __name__ == "__main__":
    main()
