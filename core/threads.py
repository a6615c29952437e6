"""Independent pieces of CPU torch work on Python threads, each op on one intra-op thread.

torch's intra-op threads meet at a barrier after every op. On a busy or virtualised machine a
barrier waits for whichever thread the kernel descheduled, so a workload of many short ops (an SSIM
chunk, a U-Net forward on a few images) loses much of the second core. Cutting the work into as many
pieces as torch has threads and running each piece on its own Python thread, single-threaded, has no
barriers: torch ops release the GIL, so the pieces run in parallel and each waits only for itself.

torch's thread count is global, so it is 1 for the whole process while the pieces run and restored
afterwards (once the last of several overlapping calls ends); grad and inference mode are per
thread, so the caller's are carried into each piece.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


_lock = threading.Lock()
_active = 0  # calls of map_single_threaded running now, in any thread
_restore = 1  # torch's thread count before the first of them


def map_single_threaded(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(item) for item in items]``, on up to ``torch.get_num_threads()`` Python threads, every
    torch op inside on one thread; results in the order of ``items``. A call made while another runs
    (inside a piece, or from a second thread) sees one torch thread and runs its items in turn; the
    last call to finish restores the thread count the first one found."""
    global _active, _restore
    items = list(items)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def piece(item):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(item)

    with _lock:
        threads = torch.get_num_threads()
        if _active == 0:
            _restore = threads
        _active += 1
        torch.set_num_threads(1)
    try:
        if threads > 1 and len(items) > 1:
            with ThreadPoolExecutor(min(threads, len(items))) as pool:
                return list(pool.map(piece, items))
        return [fn(item) for item in items]
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                torch.set_num_threads(_restore)


def split_rows(value, rows: slice, batch: int):
    """``value`` cut to ``rows`` along dim 0 wherever it is a tensor of ``batch`` rows (inside tuples,
    lists and dicts too); anything else, a per-batch constant, is passed whole."""
    if torch.is_tensor(value):
        return value[rows] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(split_rows(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: split_rows(v, rows, batch) for k, v in value.items()}
    return value


def batch_on_threads(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)`` for a batch whose rows are independent (an eval-mode network: no batch norm
    statistics), computed as one slice of rows per torch thread through :func:`map_single_threaded`
    and concatenated. The first argument sets the batch; on one thread, one row or a non-CPU device
    it is ``fn(*args)`` itself."""
    batch = args[0].shape[0]
    threads = torch.get_num_threads()
    if args[0].device.type != "cpu" or threads < 2 or batch < 2 or torch.is_autocast_enabled("cpu"):
        return fn(*args)
    per = -(-batch // threads)
    slices = [slice(i, min(i + per, batch)) for i in range(0, batch, per)]
    return torch.cat(map_single_threaded(lambda rows: fn(*(split_rows(a, rows, batch) for a in args)), slices))
