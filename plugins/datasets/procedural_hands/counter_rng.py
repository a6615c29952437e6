"""Counter-based random numbers: value j of sample i is a hash of (stream key, i, j).

A sample's draws never depend on which other samples share its batch, on the process that
renders it, or on the order of requests, so a dataset index is a complete description.
"""
import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, without overflowing int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser: a bijective hash of uint32 values held in int64."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def stream(*salts: int) -> torch.Tensor:
    """A uint32 stream key from integers (seed, stream kind)."""
    h = torch.zeros((), dtype=torch.int64)
    for salt in salts:
        h = _mix(_mix(h ^ (salt & _M32)) ^ ((salt >> 32) & _M32))
    return h


_COUNTERS = _mix(torch.arange(512, dtype=torch.int64) + 0x2545F491)


def uniform(key: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) uniforms in [0, 1): value j of id i is hash(key, i, j), whatever the batch."""
    h = _mix(_mix((ids & _M32) ^ key) ^ ((ids >> 32) & _M32))[:, None]
    counter = _COUNTERS[:n] if n <= len(_COUNTERS) else _mix(torch.arange(n, dtype=torch.int64) + 0x2545F491)
    h = _mix(_mix((h + counter) & _M32) ^ h)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def normal(u: torch.Tensor) -> torch.Tensor:
    """Approximately standard normal from (..., 3) uniforms (Irwin-Hall), bounded by +-3."""
    return (u[..., 0] + u[..., 1] + u[..., 2] - 1.5) * 2.0


def between(u, lo, hi):
    return lo + u * (hi - lo)
