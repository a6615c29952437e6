"""Adversarial losses: hinge and non-saturating, as objects with ``d_loss`` and ``g_loss``.

A loss takes the discriminator's raw logits, shape (N,), and returns a scalar tensor:

- ``d_loss(real_logits, fake_logits)``: what the discriminator minimises;
- ``g_loss(fake_logits)``: what the generator minimises.

Both are means over the batch (real and fake terms each averaged, then summed).
"""
import torch
import torch.nn.functional as F

from handforge import hookimpl


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


class NonSaturating:
    """Non-saturating logistic loss (Goodfellow et al. 2014; StyleGAN): binary cross-entropy on logits.

    d_loss = mean(softplus(-D(x))) + mean(softplus(D(G(z))))   # -log sigmoid(real) - log(1 - sigmoid(fake))
    g_loss = mean(softplus(-D(G(z))))                          # -log sigmoid(fake)
    """

    def __init__(self, config=None, **_):
        pass

    def d_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()

    def g_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return F.softplus(-fake_logits).mean()


@hookimpl
def register_losses(register):
    register("hinge", Hinge)
    register("nonsaturating", NonSaturating)
