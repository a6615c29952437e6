"""FLOP counting and this machine's fp32 matmul rate, for benchmarks that report efficiency.

``count_flops(fn)`` runs ``fn()`` once under ``torch.utils.flop_counter.FlopCounterMode`` and
returns (result, flops). The counter knows the matrix ops (mm, addmm, bmm, convolutions and their
backwards, scaled_dot_product_attention): elementwise work (activations, norms, optimizer
updates) counts zero, so the figure is the arithmetic a matmul unit could do, and achieved
GFLOP/s over the matmul rate says how close a step comes to the machine's dense-compute bound.

``matmul_rate(threads)`` is that bound as measured here: an n x n fp32 ``torch.mm`` repeated on
``threads`` threads, 2 n^3 FLOPs each, best repetition (the peak; on a shared machine the best
is the least disturbed).
"""
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn):
    """(fn(), FLOPs counted while it ran)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()


def matmul_rate(threads: int, n: int = 2048, reps: int = 10, warmup: int = 2) -> dict:
    """GFLOP/s of an n x n fp32 matmul on ``threads`` threads: best and median of ``reps``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
        out = torch.empty(n, n)
        for _ in range(warmup):
            torch.mm(a, b, out=out)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    times.sort()
    flops = 2 * n**3
    return {"n": n, "threads": threads, "reps": reps,
            "gflops_best": flops / times[0] / 1e9, "gflops_median": flops / times[len(times) // 2] / 1e9}
