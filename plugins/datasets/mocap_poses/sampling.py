"""Which frames of a sequence ``prepare mocap`` keeps: frame-rate subsampling, flat / static hand
filters, and the even split of a frame budget over datasets and sequences. Pure functions of
their inputs (no randomness), so a rerun keeps the same frames."""
from __future__ import annotations

import numpy as np

# A body-only capture stores its hands as exact zeros; 1e-5 rad (far below any fitted pose's
# finger angles) also admits float noise around those zeros.
FLAT_ATOL = 1e-5


def fps_indices(n: int, rate: float, fps: float) -> np.ndarray:
    """Frames of an ``n``-frame sequence at ``rate`` frames/s kept for at most ``fps`` frames/s:
    for each time j / fps (j = 0, 1, ...) the nearest frame, so frame 0 first and an exact stride
    where the ratio is whole (120 -> 30: every 4th); all frames when the sequence is no faster."""
    if n == 0 or rate <= fps:
        return np.arange(n, dtype=np.int64)
    step = rate / fps
    count = int(np.floor((n - 1) / step + 1e-9)) + 1
    picked = np.floor(np.arange(count) * step + 0.5).astype(np.int64)
    return np.unique(picked[picked < n])


def flat_frames(hands: np.ndarray) -> np.ndarray:
    """(N,) True where every one of a frame's pose values (both hands) is ~0."""
    return np.abs(hands).max(axis=1) <= FLAT_ATOL if len(hands) else np.zeros(0, bool)


def moving_frames(hands: np.ndarray, threshold: float) -> np.ndarray:
    """Positions of the frames kept when a frame is dropped unless some value of it differs by more
    than ``threshold`` from the last kept frame; the first frame is always kept.

    Sequential by nature (each decision depends on the last kept frame), so it scans forward from
    each kept frame in growing windows: one numpy pass per kept frame, not one per frame."""
    n = len(hands)
    if n == 0:
        return np.zeros(0, np.int64)
    kept, last = [0], 0
    while True:
        start, width, found = last + 1, 16, None
        while start < n and found is None:
            stop = min(n, start + width)
            moved = np.flatnonzero(np.abs(hands[start:stop] - hands[last]).max(axis=1) > threshold)
            if moved.size:
                found = start + int(moved[0])
            start, width = stop, width * 2
        if found is None:
            return np.asarray(kept, np.int64)
        kept.append(found)
        last = found


def fair_split(budget: int, capacities) -> np.ndarray:
    """Split ``budget`` items over bins with these capacities as evenly as the capacities allow
    (max-min fair: a bin short of its even share gives the rest to the others). Every bin gets
    min(capacity, L) for the highest level L that fits, and the few units left over go one each to
    the earliest bins with room; the sum is min(budget, sum of capacities)."""
    caps = np.asarray(capacities, dtype=np.int64)
    if budget >= caps.sum():
        return caps.copy()
    low, high = 0, int(caps.max())
    while low < high:  # the highest level whose allocation fits the budget
        mid = (low + high + 1) // 2
        low, high = (mid, high) if np.minimum(caps, mid).sum() <= budget else (low, mid - 1)
    given = np.minimum(caps, low)
    given[np.flatnonzero(caps > low)[: int(budget - given.sum())]] += 1
    return given


def even_stride(available: int, take: int) -> np.ndarray:
    """``take`` positions spread evenly over ``available`` (first and last included)."""
    if take <= 0:
        return np.zeros(0, np.int64)
    return np.linspace(0, available - 1, take).round().astype(np.int64)
