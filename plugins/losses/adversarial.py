"""Adversarial losses: hinge, non-saturating (with optional lazy R1), logistic, WGAN-GP, least squares.

Each follows :class:`handforge.contracts.AdversarialLoss`: ``d_loss(real_logits, fake_logits)``
and ``g_loss(fake_logits)`` on the discriminator's raw logits (N,) (or patch logits (N, 1, h, w):
every term is a mean), and optionally
``d_penalty(D, real, fake, cond, step) -> tensor | None`` with ``step = iteration * d_steps + i``
(None: nothing this step, a lazy regulariser off its interval or the penalty turned off).

Terms are means over the batch (real and fake terms each averaged, then summed).
"""
import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v

from handforge import hookimpl

from .penalties import gradient_penalty, r1


class Hinge:
    """Hinge loss (Lim & Ye 2017; SNGAN, BigGAN): D max-margin at +-1, G raises fake logits.

    d_loss = mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))
    g_loss = -mean(D(G(z)))
    """

    def __init__(self, config=None, **_):
        pass

    def d_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()

    def g_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return -fake_logits.mean()


def r1_gamma_field(default: float):
    return attrs.field(default=default, validator=v.ge(0.0), metadata={
        "help": "R1 weight gamma: adds gamma/2 * E||grad D(real)||^2 to the D loss; 0 = off"})


def r1_interval_field():
    return attrs.field(default=16, validator=v.ge(1), metadata={
        "help": "lazy R1: computed every N discriminator steps and scaled by N (1 = every step)"})


@attrs.define
class NonSaturatingConfig:
    r1_gamma: float = r1_gamma_field(0.0)
    r1_interval: int = r1_interval_field()


@attrs.define
class LogisticConfig:
    # StyleGAN2's defaults (its gamma depends on resolution and data set: 10 is its FFHQ config-f value).
    r1_gamma: float = r1_gamma_field(10.0)
    r1_interval: int = r1_interval_field()


class NonSaturating:
    """Non-saturating logistic loss (Goodfellow et al. 2014; StyleGAN), optionally with lazy R1.

    d_loss = mean(softplus(-D(x))) + mean(softplus(D(G(z))))   # -log sigmoid(real) - log(1 - sigmoid(fake))
    g_loss = mean(softplus(-D(G(z))))                          # -log sigmoid(fake)
    d_penalty = r1_interval * r1_gamma / 2 * E[||grad_x D(x)||^2] on real x, every r1_interval-th
                discriminator step (lazy regularisation, Karras et al. 2020); None on the others.
    """

    config_cls = NonSaturatingConfig

    def __init__(self, config=None, **_):
        self.config = config or self.config_cls()

    def d_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()

    def g_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return F.softplus(-fake_logits).mean()

    def d_penalty(self, D, real, fake, cond, step: int):
        gamma, interval = self.config.r1_gamma, self.config.r1_interval
        if gamma == 0 or step % interval:
            return None
        # Scaling by the interval keeps the penalty's average strength that of R1 on every step.
        return r1(D, real, cond) * (gamma / 2 * interval)


class Logistic(NonSaturating):
    """StyleGAN2's loss: non-saturating logistic loss with lazy R1 on by default (gamma 10, every 16 D steps).

    Sometimes called ``logistic_r1``; it is registered as ``logistic`` because R1 is one
    of its options, not part of its identity: ``r1_gamma = 0`` turns it into plain ``nonsaturating``.
    """

    config_cls = LogisticConfig


@attrs.define
class WganGpConfig:
    gp_lambda: float = attrs.field(default=10.0, validator=v.ge(0.0), metadata={
        "help": "gradient penalty weight lambda (0 = plain WGAN without any Lipschitz constraint)"})
    drift: float = attrs.field(default=0.0, validator=v.ge(0.0), metadata={
        "help": "ProGAN's drift epsilon: adds epsilon * mean(D(real)^2) to the D loss (ProGAN used 0.001); 0 = off"})


class WganGp:
    """Wasserstein loss with gradient penalty (Gulrajani et al. 2017).

    d_loss = mean(D(G(z))) - mean(D(x)) + drift * mean(D(x)^2)   # drift: ProGAN, keeps logits near 0
    g_loss = -mean(D(G(z)))
    d_penalty = gp_lambda * E[(||grad D(x_hat)||_2 - 1)^2], x_hat = e x + (1 - e) G(z), e ~ U(0,1) per sample

    The critic updates per generator update (n_critic, 5 in the paper) are the gan task's
    ``d_steps``; the paper's Adam settings are lr 1e-4, betas (0, 0.9). The critic should have no
    BatchNorm (the penalty is per sample) and usually no spectral norm.
    """

    def __init__(self, config=None, **_):
        self.config = config or WganGpConfig()

    def d_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        loss = fake_logits.mean() - real_logits.mean()
        if self.config.drift:
            loss = loss + self.config.drift * real_logits.square().mean()
        return loss

    def g_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return -fake_logits.mean()

    def d_penalty(self, D, real, fake, cond, step: int):
        if self.config.gp_lambda == 0:
            return None
        return self.config.gp_lambda * gradient_penalty(D, real, fake, cond)


class LeastSquares:
    """Least-squares GAN (Mao et al. 2017, targets a = 0, b = c = 1; pix2pixHD, CycleGAN):

    d_loss = mean((D(x) - 1)^2) / 2 + mean(D(G(z))^2) / 2
    g_loss = mean((D(G(z)) - 1)^2) / 2
    """

    def __init__(self, config=None, **_):
        pass

    def d_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return 0.5 * (real_logits - 1).square().mean() + 0.5 * fake_logits.square().mean()

    def g_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return 0.5 * (fake_logits - 1).square().mean()


@hookimpl
def register_losses(register):
    register("hinge", Hinge)
    register("lsgan", LeastSquares)
    register("nonsaturating", NonSaturating, config=NonSaturatingConfig)
    register("logistic", Logistic, config=LogisticConfig)
    register("wgan_gp", WganGp, config=WganGpConfig)
