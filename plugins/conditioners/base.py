"""The base of the built-in conditioners: how a condition (label, keypoints) enters a network.

What a conditioner must be is :class:`handforge.contracts.Conditioner` (with the
``GeneratorSide`` and ``DiscriminatorSide`` members; ``docs/plugins.md`` explains each). The
:class:`Conditioner` here implements all of it with the unconditional defaults, so a built-in
conditioner overrides only what it changes:

- ``norm``: plain BatchNorm, or with ``extra_dim > 0`` (BigGAN-style generators, ``big_resnet``)
  BigGAN's conditional BatchNorm on an (N, extra_dim) vector, the block's chunk of z
  (hierarchical z) concatenated with the shared class embedding: gain ``1 + W_g e`` and bias
  ``W_b e``. A conditioner whose ``norm`` takes no ``extra_dim`` (``spade``) still works there:
  the backbone then feeds all of z to its input;
- ``shared_embedding``: None (``none``: the norms see the z chunks only, as in unconditional
  BigGAN); ``cbn`` gives the class embedding;
- ``latent``, ``merge_input``: nothing to add; ``head``: a linear layer; ``d_aux_loss`` /
  ``g_aux_loss``: only conditioners whose head returns ``(logits, aux)`` (``acgan``, ``d2dce``).

Backbones call only what they need; the modules returned belong to the backbone, so they are
trained, saved and EMA-averaged with it.
"""
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm as sn

from handforge.errors import HandforgeError

ROLES = ("generator", "discriminator")


def maybe_sn(module: nn.Module, enabled: bool) -> nn.Module:
    return sn(module) if enabled else module


class BatchNorm(nn.BatchNorm2d):
    """Plain BatchNorm that accepts (and ignores) a condition."""

    def forward(self, x, cond=None):
        return super().forward(x)


class VectorBatchNorm(nn.Module):
    """BatchNorm without affine parameters, modulated by a vector e: bn(x) * (1 + W_g e) + W_b e.

    BigGAN's conditional BatchNorm (Brock et al. 2019): e (N, extra_dim) is the shared class
    embedding concatenated with the block's chunk of z, or the z chunk alone without labels. The
    maps have no bias (the "1 +" carries the identity) and start orthogonal, as in BigGAN; with
    zero weights the layer is plain BatchNorm.
    """

    def __init__(self, num_features: int, extra_dim: int, spectral_norm: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.gain = nn.Linear(extra_dim, num_features, bias=False)
        self.bias = nn.Linear(extra_dim, num_features, bias=False)
        for linear in (self.gain, self.bias):
            nn.init.orthogonal_(linear.weight)  # before spectral norm, which reads the initial weight
        self.gain, self.bias = maybe_sn(self.gain, spectral_norm), maybe_sn(self.bias, spectral_norm)

    def forward(self, x, cond=None, extra=None):
        if extra is None:
            raise HandforgeError("conditional BatchNorm built with extra_dim > 0 needs its vector: "
                                 "the backbone must call it as norm(x, cond, extra)")
        gain, bias = 1 + self.gain(extra), self.bias(extra)
        return self.bn(x) * gain[:, :, None, None] + bias[:, :, None, None]


class LinearHead(nn.Module):
    """Unconditional output: out = w . h + b."""

    def __init__(self, num_features: int, spectral_norm: bool = False):
        super().__init__()
        self.linear = maybe_sn(nn.Linear(num_features, 1), spectral_norm)

    def forward(self, h, cond=None):
        return self.linear(h).squeeze(1)


class Conditioner:
    """Base conditioner: no condition, plain BatchNorm, linear head. Subclasses override parts."""

    name = "none"
    roles = ROLES
    fields: tuple = ()
    spatial = False
    latent_dim = 0
    input_channels = 0

    def __init__(self, config=None, *, role: str, n_classes: int = 0, **context):
        if role not in self.roles:
            other = {"generator": "d_conditioner", "discriminator": "g_conditioner"}[role]
            raise HandforgeError(
                f"conditioner '{self.name}' works on the {' and '.join(self.roles)} side only, "
                f"not as the {role}'s conditioner (use it as {other}, or pick another)"
            )
        if "label" in self.fields and n_classes < 1:
            raise HandforgeError(f"conditioner '{self.name}' needs class labels, but the dataset has no class_names")
        self.config, self.role, self.n_classes = config, role, n_classes
        self.image_size = context.get("image_size")

    def condition(self, batch: dict):
        if not self.fields:
            return None
        missing = [f for f in self.fields if f not in batch]
        if missing:
            raise HandforgeError(f"conditioner '{self.name}' needs field(s) {missing}; the batch has {sorted(batch)}")
        return batch[self.fields[0]] if len(self.fields) == 1 else tuple(batch[f] for f in self.fields)

    def norm(self, num_features: int, *, extra_dim: int = 0, spectral_norm: bool = False) -> nn.Module:
        # With a vector (BigGAN's z chunks) the gains come from it even without labels.
        return VectorBatchNorm(num_features, extra_dim, spectral_norm) if extra_dim else BatchNorm(num_features)

    def shared_embedding(self, dim: int):
        return None

    def latent(self, cond):
        return None

    def merge_input(self, x, cond):
        return x

    def head(self, num_features: int, *, spectral_norm: bool = False) -> nn.Module:
        return LinearHead(num_features, spectral_norm)

    def d_aux_loss(self, aux, cond):
        raise NotImplementedError(f"conditioner '{self.name}' has no auxiliary loss")

    def g_aux_loss(self, aux, cond):
        raise NotImplementedError(f"conditioner '{self.name}' has no auxiliary loss")
