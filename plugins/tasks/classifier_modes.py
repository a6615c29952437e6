"""The losses of the classifier task's four modes, as functions of explicit random draws.

Every random choice of one step (mixup weights, partners, whether mixgen mixes in generated
images) is drawn first by :func:`draw`, then the loss is a plain function of the batches, the
draws and the schedule value ``f`` -- so a test can compute each mode's loss by hand.

- ``real``: mixup within the real batch.
- ``gen``: mixup within the generated batch while pre-training, then as ``real``.
- ``mixgen``: with probability ``1 - f(epoch)`` the real batch is mixed with the generated batch
  (lambda on the real images), otherwise as ``real``.
- ``reggen``: mixupCE(real) + f(epoch) * mixupCE(generated), both batches in one forward pass
  (so BatchNorm normalises them together).

Mixup (Zhang et al. 2018): ``x = lam * x_a + (1 - lam) * x_b``, loss
``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)``, ``lam ~ Beta(alpha, alpha)``; alpha = 0
turns it off (lam = 1).
"""
from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F

MODES = ("real", "gen", "mixgen", "reggen")
Mode = Literal["real", "gen", "mixgen", "reggen"]


def schedule(t: float, kind: str, a: float, b: float) -> float:
    """The weight of generated data at epoch ``t``: ``decay`` a*exp(-b t), ``growth`` a + (1-a)(1-exp(-b t))."""
    if kind == "decay":
        return a * math.exp(-b * t)
    if kind == "growth":
        return a + (1.0 - a) * (1.0 - math.exp(-b * t))
    raise ValueError(f"unknown schedule {kind!r} (decay or growth)")


@attrs.frozen
class Draws:
    """One step's random choices. ``perm``/``gen_perm``: mixup partners within the real/generated
    batch; ``use_gen``: mixgen mixes real with generated images this step."""

    lam: float
    perm: torch.Tensor
    gen_lam: float = 1.0
    gen_perm: torch.Tensor | None = None
    use_gen: bool = False


def draw(n_real: int, n_gen: int, alpha: float, f: float, generator: torch.Generator) -> Draws:
    """Draws from a CPU ``generator``: lam ~ Beta(alpha, alpha) (1 when alpha = 0), random
    partner permutations, and ``use_gen`` with probability 1 - f."""

    lam = _beta(alpha, generator)
    perm = torch.randperm(n_real, generator=generator)
    gen_lam = _beta(alpha, generator)
    gen_perm = torch.randperm(n_gen, generator=generator) if n_gen else None
    use_gen = bool(torch.rand((), generator=generator) < 1.0 - f)
    return Draws(lam, perm, gen_lam, gen_perm, use_gen)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """lam ~ Beta(alpha, alpha) from a seeded CPU generator (torch's Beta takes none)."""
    if alpha <= 0:
        return 1.0
    # Johnk (1964): with U, V uniform, X = U^(1/a), Y = V^(1/a); accept when X + Y <= 1, X/(X+Y) ~ Beta(a, a).
    while True:
        u, v = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        x, y = u ** (1.0 / alpha), v ** (1.0 / alpha)
        if 0.0 < x + y <= 1.0:
            return x / (x + y)


def mix(x_a: torch.Tensor, x_b: torch.Tensor, lam: float) -> torch.Tensor:
    return x_a if lam == 1.0 else lam * x_a + (1.0 - lam) * x_b


def mixup_ce(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float) -> torch.Tensor:
    loss = F.cross_entropy(logits, y_a)
    return loss if lam == 1.0 else lam * loss + (1.0 - lam) * F.cross_entropy(logits, y_b)


def mixup_within(model, x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """Mixup CE of ``model`` on a batch mixed with a permutation of itself."""
    perm = perm.to(x.device)
    return mixup_ce(model(mix(x, x[perm], lam)), y, y[perm], lam)


def mode_loss(mode: str, model, real: tuple, gen: tuple | None, draws: Draws, f: float,
              pretraining: bool = False) -> dict[str, torch.Tensor]:
    """The loss of one step (key ``loss``) and its parts. ``real``/``gen``: (images, labels);
    ``f``: the schedule value this epoch; ``pretraining``: gen mode's first phase."""
    x, y = real
    if mode == "real" or (mode == "gen" and not pretraining):
        return {"loss": mixup_within(model, x, y, draws.lam, draws.perm)}
    xg, yg = gen
    if mode == "gen":
        return {"loss": mixup_within(model, xg, yg, draws.gen_lam, draws.gen_perm)}
    if mode == "mixgen":
        if draws.use_gen:
            loss = mixup_ce(model(mix(x, xg, draws.lam)), y, yg, draws.lam)
        else:
            loss = mixup_within(model, x, y, draws.lam, draws.perm)
        return {"loss": loss, "mixed_gen": torch.tensor(float(draws.use_gen), device=x.device)}
    if mode == "reggen":
        # One forward over both mixed batches: under DDP a second forward before the backward
        # would mark every parameter ready twice.
        perm, gen_perm = draws.perm.to(x.device), draws.gen_perm.to(x.device)
        inputs = torch.cat([mix(x, x[perm], draws.lam), mix(xg, xg[gen_perm], draws.gen_lam)])
        real_logits, gen_logits = model(inputs).split([len(x), len(xg)])
        real_loss = mixup_ce(real_logits, y, y[perm], draws.lam)
        gen_loss = mixup_ce(gen_logits, yg, yg[gen_perm], draws.gen_lam)
        return {"loss": real_loss + f * gen_loss, "loss_real": real_loss, "loss_gen": gen_loss}
    raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
