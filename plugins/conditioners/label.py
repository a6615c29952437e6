"""Label conditioners: none, conditional BatchNorm (generator), projection head (discriminator).

A conditioner decides how a condition enters a network. A backbone never looks at labels or
keypoints itself: it asks the conditioner of its side for the layers that consume them, and
passes an opaque ``cond`` through its forward. The interface (duck-typed; subclass
:class:`Conditioner` to inherit the unconditional defaults):

``factory(config, *, role, n_classes, **context) -> conditioner``
    ``role`` is "generator" or "discriminator"; a conditioner that cannot serve ``role``
    raises :class:`~handforge.errors.HandforgeError`.
``conditioner.fields -> tuple[str, ...]``
    the sample fields it reads (also registered as ``needs``).
``conditioner.condition(batch) -> cond``
    what the task passes as ``cond`` to ``forward(..., cond)``: here the label tensor (N,), or
    None. A spatial conditioner (spade) would return maps made from ``batch["keypoints"]``.
``conditioner.norm(num_features) -> nn.Module``
    a normalisation layer for (N, C, H, W) features, ``forward(x, cond) -> x``.
``conditioner.head(num_features, *, spectral_norm=False) -> nn.Module``
    the discriminator's output layer on pooled features h (N, F), ``forward(h, cond) -> (N,)``.

Backbones call only what they need (a generator ``norm``, a discriminator ``head``); the
modules returned belong to the backbone, so they are trained, saved and EMA-averaged with it.
"""
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm as sn

from handforge import hookimpl
from handforge.errors import HandforgeError

ROLES = ("generator", "discriminator")


def maybe_sn(module: nn.Module, enabled: bool) -> nn.Module:
    return sn(module) if enabled else module


# -- layers -------------------------------------------------------------------------------------


class BatchNorm(nn.BatchNorm2d):
    """Plain BatchNorm that accepts (and ignores) a condition."""

    def forward(self, x, cond=None):
        return super().forward(x)


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

    def forward(self, x, cond):
        gain, bias = self.gain(cond)[:, :, None, None], self.bias(cond)[:, :, None, None]
        return self.bn(x) * gain + bias


class LinearHead(nn.Module):
    """Unconditional output: out = w . h + b."""

    def __init__(self, num_features: int, spectral_norm: bool = False):
        super().__init__()
        self.linear = maybe_sn(nn.Linear(num_features, 1), spectral_norm)

    def forward(self, h, cond=None):
        return self.linear(h).squeeze(1)


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


class Conditioner:
    """Base conditioner: no condition, plain BatchNorm, linear head. Subclasses override parts."""

    name = "none"
    roles = ROLES
    fields: tuple = ()

    def __init__(self, config=None, *, role: str, n_classes: int = 0, **_):
        if role not in self.roles:
            other = {"generator": "d_conditioner", "discriminator": "g_conditioner"}[role]
            raise HandforgeError(
                f"conditioner '{self.name}' works on the {' and '.join(self.roles)} side only, "
                f"not as the {role}'s conditioner (use it as {other}, or pick another)"
            )
        if "label" in self.fields and n_classes < 1:
            raise HandforgeError(f"conditioner '{self.name}' needs class labels, but the dataset has no class_names")
        self.config, self.role, self.n_classes = config, role, n_classes

    def condition(self, batch: dict):
        if not self.fields:
            return None
        missing = [f for f in self.fields if f not in batch]
        if missing:
            raise HandforgeError(f"conditioner '{self.name}' needs field(s) {missing}; the batch has {sorted(batch)}")
        return batch[self.fields[0]] if len(self.fields) == 1 else tuple(batch[f] for f in self.fields)

    def norm(self, num_features: int) -> nn.Module:
        return BatchNorm(num_features)

    def head(self, num_features: int, *, spectral_norm: bool = False) -> nn.Module:
        return LinearHead(num_features, spectral_norm)


class NoCondition(Conditioner):
    """No condition: plain BatchNorm on the generator, a linear head on the discriminator."""


class ClassBatchNorm(Conditioner):
    """Class-conditional BatchNorm on the generator: per-class gain and bias, initialised to identity."""

    name, roles, fields = "cbn", ("generator",), ("label",)

    def norm(self, num_features: int) -> nn.Module:
        return ConditionalBatchNorm(num_features, self.n_classes)


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
