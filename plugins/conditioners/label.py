"""Label conditioners: none, conditional BatchNorm (generator), projection head (discriminator).

The conditioner interface (including the vector norms and shared embedding that BigGAN-style
generators use) is described in :mod:`handforge.plugins.conditioners.base`.
"""
import torch
import torch.nn as nn

from handforge import hookimpl

from .base import BatchNorm, Conditioner, LinearHead, VectorBatchNorm, maybe_sn  # noqa: F401  (re-exported)


# -- layers -------------------------------------------------------------------------------------


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without affine parameters, then a per-class gain and bias (de Vries et al. 2017).

    The gain embedding starts at 1 and the bias at 0, so at initialisation it is plain BatchNorm.
    """

    def __init__(self, num_features: int, n_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.gain = nn.Embedding(n_classes, num_features)
        self.bias = nn.Embedding(n_classes, num_features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x, cond, extra=None):
        gain, bias = self.gain(cond)[:, :, None, None], self.bias(cond)[:, :, None, None]
        return self.bn(x) * gain + bias


class ProjectionHead(nn.Module):
    """Projection discriminator output (Miyato & Koyama 2018): out = w . h + b + <embed(y), h>."""

    def __init__(self, num_features: int, n_classes: int, spectral_norm: bool = False):
        super().__init__()
        self.linear = maybe_sn(nn.Linear(num_features, 1), spectral_norm)
        self.embed = nn.Embedding(n_classes, num_features)
        nn.init.xavier_uniform_(self.embed.weight)
        self.embed = maybe_sn(self.embed, spectral_norm)

    def forward(self, h, cond):
        return self.linear(h).squeeze(1) + (self.embed(cond) * h).sum(dim=1)


# -- conditioners -------------------------------------------------------------------------------


class NoCondition(Conditioner):
    """No condition: plain BatchNorm on the generator, a linear head on the discriminator.

    A BigGAN-style backbone still gets vector norms driven by its z chunks (see the base class);
    a denoiser gets only its time embedding."""

    roles = ("generator", "discriminator", "denoiser")


class ClassBatchNorm(Conditioner):
    """Class-conditional BatchNorm on the generator: per-class gain and bias, initialised to identity;
    on a denoiser, a class embedding added to the time embedding."""

    name, roles, fields = "cbn", ("generator", "denoiser"), ("label",)

    def norm(self, num_features: int, *, extra_dim: int = 0, spectral_norm: bool = False) -> nn.Module:
        if extra_dim:  # BigGAN: the class enters through the shared embedding, part of the vector
            return VectorBatchNorm(num_features, extra_dim, spectral_norm)
        return ConditionalBatchNorm(num_features, self.n_classes)

    def denoiser_embedding(self, dim: int) -> nn.Module:
        # Denoiser side: a class embedding added to the time embedding; row n_classes is the null
        # class that drop() gives (classifier-free guidance), starting at zero (= unconditional).
        embedding = nn.Embedding(self.n_classes + 1, dim)
        with torch.no_grad():
            embedding.weight[self.n_classes].zero_()
        return embedding

    def drop(self, cond, mask):
        return torch.where(mask.to(cond.device), torch.full_like(cond, self.n_classes), cond)

    def shared_embedding(self, dim: int) -> nn.Module:
        embedding = nn.Embedding(self.n_classes, dim)
        nn.init.orthogonal_(embedding.weight)  # BigGAN initialises every weight orthogonally
        return embedding


class Projection(Conditioner):
    """Projection discriminator head (Miyato & Koyama 2018): linear(h) + <embed(y), h>."""

    name, roles, fields = "projection", ("discriminator",), ("label",)

    def head(self, num_features: int, *, spectral_norm: bool = False) -> nn.Module:
        return ProjectionHead(num_features, self.n_classes, spectral_norm)


@hookimpl
def register_conditioners(register):
    register("none", NoCondition)
    register("cbn", ClassBatchNorm, needs=("label",))
    register("projection", Projection, needs=("label",))
