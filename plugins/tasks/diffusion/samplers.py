"""Reverse-process samplers over a :class:`Schedule`: DDPM ancestral, DDIM (steps, eta) and
DPM-Solver++ 2M. Each takes ``predict(x, t) -> (x0, eps)`` (the denoiser, its objective and any
guidance folded in), the starting noisy image and the timestep it is at, so the same code samples
from pure noise (start T - 1) and finishes a partial re-noising (SDEdit, start < T - 1).

The network evaluations per image are what a user pays for: DDPM takes start + 1, DDIM and
DPM-Solver++ ``steps`` (fewer for a partial start).
"""
import torch

SAMPLERS = ("ddpm", "ddim", "dpm_solver")


def timesteps(start: int, steps: int) -> list[int]:
    """``steps`` integer timesteps from ``start`` down to 0, evenly spaced (duplicates removed)."""
    grid = torch.linspace(start, 0, max(1, min(steps, start + 1)), dtype=torch.float64).round().long()
    return list(dict.fromkeys(grid.tolist()))


def _noise(like, generator):
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


def _t(value, x):
    return torch.full((x.shape[0],), float(value), device=x.device)


def ddpm(schedule, predict, x, start, generator=None, **_):
    """Ancestral sampling (Ho et al. 2020): x_{t-1} ~ q(x_{t-1} | x_t, x0_hat), one step per timestep."""
    for t in range(start, -1, -1):
        x0, _ = predict(x, _t(t, x))
        ab = schedule.alpha_bar[t]
        ab_prev = schedule.alpha_bar[t - 1] if t > 0 else torch.ones((), dtype=torch.float64)
        beta = schedule.betas[t]
        # Posterior q(x_{t-1} | x_t, x0): mean c0 x0 + ct x_t, variance beta (1 - ab_prev) / (1 - ab).
        c0 = float(beta * ab_prev.sqrt() / (1 - ab))
        ct = float((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab))
        x = c0 * x0 + ct * x
        if t > 0:
            x = x + float((beta * (1 - ab_prev) / (1 - ab)).sqrt()) * _noise(x, generator)
    return x


def ddim(schedule, predict, x, start, steps=50, eta=0.0, generator=None, **_):
    """DDIM (Song et al. 2021) on an even grid of ``steps`` timesteps; eta = 0 is deterministic,
    eta = 1 has DDPM's posterior variance between the grid's timesteps."""
    grid = timesteps(start, steps)
    for i, t in enumerate(grid):
        x0, eps = predict(x, _t(t, x))
        ab = float(schedule.alpha_bar[t])
        ab_prev = float(schedule.alpha_bar[grid[i + 1]]) if i + 1 < len(grid) else 1.0
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
        x = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _noise(x, generator)
    return x


def dpm_solver(schedule, predict, x, start, steps=20, generator=None, **_):
    """DPM-Solver++ 2M (Lu et al. 2022), multistep second order in the data prediction, on an even
    grid of ``steps`` timesteps; the first step is first order and the last, to the clean image
    (sigma = 0, where log-SNR is infinite), takes x0_hat itself."""
    grid = timesteps(start, steps)
    previous = None  # (x0_hat, h) of the last step, for the second-order correction
    for i, t in enumerate(grid):
        x0, _ = predict(x, _t(t, x))
        if i + 1 == len(grid):
            return x0
        ab_s, ab_t = float(schedule.alpha_bar[t]), float(schedule.alpha_bar[grid[i + 1]])
        alpha_t, sigma_s, sigma_t = ab_t ** 0.5, (1 - ab_s) ** 0.5, (1 - ab_t) ** 0.5
        lam = lambda ab: 0.5 * torch.log(torch.tensor(ab / (1 - ab), dtype=torch.float64))  # noqa: E731
        h = float(lam(ab_t) - lam(ab_s))
        if previous is None:
            d = x0
        else:
            prev_x0, prev_h = previous
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (sigma_t / sigma_s) * x - alpha_t * float(torch.expm1(torch.tensor(-h))) * d
        previous = (x0, h)
    return x


def run_sampler(name, schedule, predict, x, start, *, steps, eta, generator=None):
    fn = {"ddpm": ddpm, "ddim": ddim, "dpm_solver": dpm_solver}[name]
    return fn(schedule, predict, x, start, steps=steps, eta=eta, generator=generator)
