"""The conditioner interface: how a condition (label, keypoints) enters a network.

A backbone never looks at labels or keypoints itself: it asks the conditioner of its side for
the layers that consume them and passes an opaque ``cond`` through its forward. The interface
is duck-typed; subclass :class:`Conditioner` to inherit the unconditional defaults.

``factory(config, *, role, n_classes, **context) -> conditioner``
    ``role`` is "generator", "discriminator", "denoiser" or "pose_transfer"; a conditioner that cannot serve ``role`` raises
    :class:`~handforge.errors.HandforgeError`. ``context`` holds ``image_size``.
``conditioner.fields -> tuple[str, ...]``
    the sample fields it reads (also registered as ``needs``).
``conditioner.condition(batch) -> cond``
    what the task passes as ``cond`` to ``forward(..., cond)``: the label tensor (N,), maps
    made on the device from ``batch["keypoints"]`` (N, K, H, W), a tuple, or None.
``conditioner.spatial -> bool``
    True when ``cond`` is (N, K, H, W) maps aligned with the image: geometric augmentations
    must then move the maps with the image (the task passes them to the augmentation).
``conditioner.norm(num_features) -> nn.Module``
    generator side: a normalisation layer for (N, C, H, W) features, ``forward(x, cond) -> x``
    (plain BatchNorm; class-conditional in ``cbn``; spatially modulated in ``spade``).
``conditioner.norm(num_features, *, extra_dim=0, spectral_norm=False)``
    with ``extra_dim > 0`` (BigGAN-style generators, ``big_resnet``), a layer whose
    ``forward(x, cond, extra)`` also takes an (N, extra_dim) vector: the block's chunk of z
    (hierarchical z) concatenated with the shared class embedding; BigGAN's conditional
    BatchNorm, gain ``1 + W_g e`` and bias ``W_b e``. A conditioner whose ``norm`` takes no
    ``extra_dim`` (``spade``) still works there: the backbone then feeds all of z to its input.
``conditioner.shared_embedding(dim) -> nn.Module | None``
    the module mapping ``cond`` to (N, dim) that such a backbone registers once (BigGAN shares
    one class embedding across blocks); None when there is none (``none``: the norms see the z
    chunks only, as in unconditional BigGAN).
``conditioner.latent_dim -> int`` and ``conditioner.latent(cond) -> (N, latent_dim) | None``
    generator side: a vector the backbone mixes into its latent (StyleGAN's mapping input
    for ``cadain``); 0 and None when the conditioner has none.
``conditioner.input_channels -> int`` and ``conditioner.merge_input(x, cond) -> x``
    discriminator side: extra channels concatenated to the image before the first layer
    (``concat``); 0 and the identity by default.
``conditioner.denoiser_embedding(dim) -> nn.Module | None`` and ``conditioner.drop(cond, mask)``
    denoiser side (``role="denoiser"``, the diffusion task): a module mapping ``cond`` to an
    (N, dim) vector the U-Net adds to its time embedding (None when there is none), and ``cond``
    with the null condition on the rows of the (N,) bool ``mask`` (classifier-free guidance). The
    denoiser also reads ``input_channels``/``merge_input`` (channels concatenated to x_t).
``conditioner.denoiser_modulation(channels) -> nn.Module | None``
    denoiser side, optional: a layer ``forward(h, cond) -> h`` applied after each norm of the
    denoiser's residual blocks (``spade``: h * (1 + gamma) + beta from the pose maps at h's
    resolution, zero at initialisation); None (the default) adds nothing.
``conditioner.map_channels``
    pose-transfer side (``role="pose_transfer"``, the pose_transfer task): the channels of the
    maps ``condition`` makes; the generator re-injects the target's maps through ``norm``
    (``spade``) or ``input_channels``/``merge_input`` (``concat``).
``conditioner.head(num_features, *, spectral_norm=False) -> nn.Module``
    discriminator side: the output layer on pooled features h (N, F). ``forward(h, cond)``
    returns logits (N,), or ``(logits, aux)`` when the conditioner has an auxiliary objective
    (``acgan``, ``d2dce``); the task then adds ``d_aux_loss(aux, cond)`` to the discriminator's
    loss on real images and ``g_aux_loss(aux, cond)`` to the generator's on fakes.

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
            other = {"generator": "d_conditioner", "discriminator": "g_conditioner"}.get(role)
            hint = f"use it as {other}, or pick another" if other else "pick another"
            raise HandforgeError(
                f"conditioner '{self.name}' works on the {' and '.join(self.roles)} side only, "
                f"not as the {role}'s conditioner ({hint})"
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

    def denoiser_embedding(self, dim: int):
        return None

    def denoiser_modulation(self, channels: int):
        return None

    def drop(self, cond, mask):
        """The null condition on the rows of ``mask`` (classifier-free guidance); nothing to drop here."""
        return cond

    def head(self, num_features: int, *, spectral_norm: bool = False) -> nn.Module:
        return LinearHead(num_features, spectral_norm)

    def d_aux_loss(self, aux, cond):
        raise NotImplementedError(f"conditioner '{self.name}' has no auxiliary loss")

    def g_aux_loss(self, aux, cond):
        raise NotImplementedError(f"conditioner '{self.name}' has no auxiliary loss")
