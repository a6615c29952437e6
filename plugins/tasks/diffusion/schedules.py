"""The forward process: beta schedules, alpha_bar, SNR, q_sample, and the exact conversions between
the three things a denoiser may predict (noise eps, clean image x0, velocity v; Salimans & Ho 2022).

With a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t):  x_t = a x0 + s eps,  v = a eps - s x0,
so (a, s) is a rotation and every conversion below is its exact inverse.
"""
import math

import torch

SCHEDULES = ("linear", "cosine", "sigmoid")
OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")


def linear_betas(T: int) -> torch.Tensor:
    # Ho et al. 2020's 1e-4..0.02 at T = 1000, rescaled so other T keep the same end alpha_bar.
    scale = 1000 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2), t in [0, 1]."""
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(torch.zeros_like(t))


def sigmoid_alpha_bar(t: torch.Tensor, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """Jabri et al. 2022: alpha_bar(t) = (sigmoid(end/tau) - sigmoid((t (end - start) + start) / tau))
    / (sigmoid(end/tau) - sigmoid(start/tau)), t in [0, 1]."""
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    return (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)


def betas_from_alpha_bar(alpha_bar_fn, T: int) -> torch.Tensor:
    t = torch.linspace(0, 1, T + 1, dtype=torch.float64)
    ab = alpha_bar_fn(t)
    # Clipped as in the papers: the last betas of a continuous schedule approach 1.
    return (1 - ab[1:] / ab[:-1]).clamp(0, 0.999)


def make_betas(name: str, T: int) -> torch.Tensor:
    if name == "linear":
        return linear_betas(T)
    if name == "cosine":
        return betas_from_alpha_bar(cosine_alpha_bar, T)
    if name == "sigmoid":
        return betas_from_alpha_bar(sigmoid_alpha_bar, T)
    raise ValueError(f"unknown schedule {name!r}; one of {SCHEDULES}")


class Schedule:
    """A discrete schedule of T steps, kept in float64 and indexed by (possibly fractional) t."""

    def __init__(self, name: str, T: int):
        self.name, self.T = name, T
        self.betas = make_betas(name, T)
        self.alpha_bar = torch.cumprod(1 - self.betas, dim=0)
        self._log_alpha_bar = {}  # device -> log alpha_bar with t = -1 prepended

    def snr(self, t=None) -> torch.Tensor:
        ab = self.alpha_bar if t is None else self.at(t)
        return ab / (1 - ab)  # on t's device

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at timesteps t (N,), linearly interpolated in log alpha_bar between integers
        (fractional times of solvers); t < 0 means the clean image, alpha_bar = 1."""
        # Computed where t lives: a training step on an accelerator needs no copy of t to the host.
        t = torch.as_tensor(t).to(torch.float64)
        log_ab = self._log_alpha_bar.get(t.device)
        if log_ab is None:  # index 0: t = -1, the clean image
            log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), self.alpha_bar.log()]).to(t.device)
            self._log_alpha_bar[t.device] = log_ab
        u = (t + 1).clamp(0, self.T)
        lo = u.floor().long().clamp(max=self.T - 1)
        w = u - lo
        return torch.exp(log_ab[lo] * (1 - w) + log_ab[(lo + 1).clamp(max=self.T)] * w)

    def coefficients(self, t, like: torch.Tensor):
        """(a, s) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)) at t, shaped to broadcast over ``like``."""
        ab = self.at(t)
        shape = (-1,) + (1,) * (like.ndim - 1)
        a = ab.sqrt().to(like.device, like.dtype).reshape(shape)
        s = (1 - ab).sqrt().to(like.device, like.dtype).reshape(shape)
        return a, s

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x0) = N(a x0, s^2 I), drawn with the given standard normal noise."""
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise


# -- conversions between predictions (a, s broadcastable; exact inverses of one another) ------------

def x0_from_eps(x_t, eps, a, s):
    return (x_t - s * eps) / a


def eps_from_x0(x_t, x0, a, s):
    return (x_t - a * x0) / s


def v_from(x0, eps, a, s):
    return a * eps - s * x0


def x0_from_v(x_t, v, a, s):
    return a * x_t - s * v


def eps_from_v(x_t, v, a, s):
    return s * x_t + a * v


def to_x0_eps(objective: str, x_t, output, a, s):
    """(x0, eps) that a denoiser's ``output`` under ``objective`` means."""
    if objective == "pred_noise":
        return x0_from_eps(x_t, output, a, s), output
    if objective == "pred_x0":
        return output, eps_from_x0(x_t, output, a, s)
    if objective == "pred_v":
        return x0_from_v(x_t, output, a, s), eps_from_v(x_t, output, a, s)
    raise ValueError(f"unknown objective {objective!r}; one of {OBJECTIVES}")


def target(objective: str, x0, eps, a, s):
    """What a denoiser trained with ``objective`` should output for (x0, eps)."""
    return {"pred_noise": lambda: eps, "pred_x0": lambda: x0, "pred_v": lambda: v_from(x0, eps, a, s)}[objective]()


def min_snr_weight(objective: str, snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) expressed for the x0 loss,
    divided by what the objective's MSE already weighs x0 errors by (SNR for eps, SNR + 1 for v)."""
    clipped = snr.clamp(max=gamma)
    if objective == "pred_noise":
        return clipped / snr
    if objective == "pred_x0":
        return clipped
    return clipped / (snr + 1)
