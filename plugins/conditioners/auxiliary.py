"""Label conditioners with an auxiliary objective (acgan, d2dce) and label-in-the-latent (cadain).

- ``acgan`` (Odena et al. 2017), discriminator: a class classifier beside the adversarial output,
  both linear on the same pooled features; cross-entropy on real images trains D, on fakes trains G.
- ``d2dce`` (Kang et al. 2021, ReACGAN): the classifier is replaced by the Data-to-Data
  Cross-Entropy on L2-normalised embeddings and class proxies (:func:`d2d_ce`).
- ``cadain``, generator: the label enters through the latent, StyleGAN's way of conditioning its
  mapping network (and through it every AdaIN); the norm layers stay plain BatchNorm.

The conditioner interface is described in :mod:`handforge.plugins.conditioners.base`. The task
adds ``d_aux_loss(aux, labels)`` to D's loss on real images and ``g_aux_loss(aux, labels)`` to
G's loss on fakes, where ``aux`` is the second element of the head's output.
"""
import math

import attrs
import torch
import torch.nn as nn
import torch.nn.functional as F
from attrs import validators as v

from handforge import hookimpl

from .base import Conditioner, maybe_sn

# -- the D2D-CE loss ----------------------------------------------------------------------------


def d2d_ce(embed, proxy, labels, *, temperature: float, margin_positive: float, margin_negative: float):
    """Data-to-Data Cross-Entropy (Kang et al. 2021, eq. 7), averaged over the batch.

    ``embed`` (N, D) and ``proxy`` (N, D) (the proxy of each sample's own class) are unit vectors.
    For sample i with label y_i::

        p_i  = min(f_i . v_{y_i} - m_p, 0) / tau                      (positive: sample to its proxy)
        n_ij = max(f_i . f_j     - m_n, 0) / tau   for j != i, y_j != y_i   (negatives: other classes)
        L_i  = -log( exp(p_i) / (exp(p_i) + sum_j exp(n_ij)) )

    Samples of the sample's own class are left out of the negatives (false-negative removal). The
    margins make already-satisfied pairs (f.v >= m_p, f_i.f_j <= m_n) contribute a constant, so
    easy samples stop pulling on the network. The log-sum-exp is exact (no shift of one term
    only, unlike StudioGAN's implementation).
    """
    positive = (embed * proxy).sum(dim=1).sub(margin_positive).clamp(max=0.0) / temperature
    negative = (embed @ embed.T).sub(margin_negative).clamp(min=0.0) / temperature
    # Excluded pairs (itself, same class) get -inf: exp(-inf) = 0 in the sum, and zero gradient.
    negative = negative.masked_fill(labels[:, None] == labels[None, :], float("-inf"))
    logits = torch.cat([positive[:, None], negative], dim=1)
    return (torch.logsumexp(logits, dim=1) - positive).mean()


# -- heads --------------------------------------------------------------------------------------


class AuxClassifierHead(nn.Module):
    """ACGAN output: (w . h + b, class logits W_c h + b_c), both linear on the pooled features."""

    def __init__(self, num_features: int, n_classes: int, spectral_norm: bool = False):
        super().__init__()
        self.linear = maybe_sn(nn.Linear(num_features, 1), spectral_norm)
        self.classifier = maybe_sn(nn.Linear(num_features, n_classes), spectral_norm)

    def forward(self, h, cond=None):
        return self.linear(h).squeeze(1), self.classifier(h)


class D2DCEHead(nn.Module):
    """ReACGAN output: (w . h + b, (normalize(W_e h + b_e), normalize(proxy[y]))).

    Projecting both onto the unit sphere is ReACGAN's first cure: it bounds the classifier's
    gradients, whose explosion collapses ACGAN early in training.
    """

    def __init__(self, num_features: int, n_classes: int, embed_dim: int, spectral_norm: bool = False):
        super().__init__()
        self.linear = maybe_sn(nn.Linear(num_features, 1), spectral_norm)
        self.embed = maybe_sn(nn.Linear(num_features, embed_dim), spectral_norm)
        self.proxy = maybe_sn(nn.Embedding(n_classes, embed_dim), spectral_norm)

    def forward(self, h, cond):
        embed = F.normalize(self.embed(h), dim=1)
        proxy = F.normalize(self.proxy(cond), dim=1)
        return self.linear(h).squeeze(1), (embed, proxy)


# -- conditioners -------------------------------------------------------------------------------


@attrs.define
class AcganConfig:
    weight: float = attrs.field(default=1.0, validator=v.ge(0.0))  # factor on the cross-entropy


class AuxClassifier(Conditioner):
    """ACGAN (Odena et al. 2017): a linear class classifier beside D's output, cross-entropy on labels."""

    name, roles, fields = "acgan", ("discriminator",), ("label",)

    def __init__(self, config=None, **context):
        super().__init__(config or AcganConfig(), **context)

    def head(self, num_features: int, *, spectral_norm: bool = False) -> nn.Module:
        return AuxClassifierHead(num_features, self.n_classes, spectral_norm)

    def d_aux_loss(self, aux, cond):
        return self.config.weight * F.cross_entropy(aux, cond)

    def g_aux_loss(self, aux, cond):
        # G is rewarded for fakes that D classifies as the label they were generated with.
        return self.config.weight * F.cross_entropy(aux, cond)


@attrs.define
class D2dceConfig:
    # Defaults: StudioGAN's ReACGAN recipe for CIFAR10 (32 px, 10 classes: closest to ours).
    weight: float = attrs.field(default=0.5, validator=v.ge(0.0))  # cond_lambda
    temperature: float = attrs.field(default=0.5, validator=v.gt(0.0))  # tau
    margin_positive: float = attrs.field(default=0.98, validator=[v.ge(-1.0), v.le(1.0)])  # m_p
    # m_n: StudioGAN ties it to 1 - m_p (it adds m_p - 1 to the sample similarities).
    margin_negative: float = attrs.field(default=0.02, validator=[v.ge(-1.0), v.le(1.0)])
    embed_dim: int = attrs.field(default=512, validator=v.ge(1))  # d_embed_dim


class DataToDataCE(Conditioner):
    """ReACGAN (Kang et al. 2021): normalised embeddings and class proxies, Data-to-Data Cross-Entropy."""

    name, roles, fields = "d2dce", ("discriminator",), ("label",)

    def __init__(self, config=None, **context):
        super().__init__(config or D2dceConfig(), **context)

    def head(self, num_features: int, *, spectral_norm: bool = False) -> nn.Module:
        return D2DCEHead(num_features, self.n_classes, self.config.embed_dim, spectral_norm)

    def _loss(self, aux, cond):
        cfg = self.config
        embed, proxy = aux
        return cfg.weight * d2d_ce(embed, proxy, cond, temperature=cfg.temperature,
                                   margin_positive=cfg.margin_positive, margin_negative=cfg.margin_negative)

    def d_aux_loss(self, aux, cond):
        return self._loss(aux, cond)

    def g_aux_loss(self, aux, cond):
        # As in ReACGAN: the same criterion on fakes, so G places them near their class proxy.
        return self._loss(aux, cond)


class LatentLabel(Conditioner):
    """Class-conditional AdaIN: the label is appended to the latent (StyleGAN's mapping input).

    ``latent(labels)`` is the one-hot label scaled to unit second moment (StyleGAN normalises its
    mapping inputs that way). The backbone's first layer on the latent is linear, so it learns the
    class embedding itself: W [z; e_y] = W_z z + W[:, y], an embedding table owned, trained, saved
    and EMA-averaged with the generator, with no parameter living in the conditioner.
    """

    name, roles, fields = "cadain", ("generator",), ("label",)

    @property
    def latent_dim(self) -> int:
        return self.n_classes

    def latent(self, cond):
        one_hot = F.one_hot(cond, self.n_classes).to(torch.get_default_dtype())
        return one_hot * math.sqrt(self.n_classes)


@hookimpl
def register_conditioners(register):
    register("acgan", AuxClassifier, config=AcganConfig, needs=("label",))
    register("d2dce", DataToDataCE, config=D2dceConfig, needs=("label",))
    register("cadain", LatentLabel, needs=("label",))
