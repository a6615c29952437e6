"""What a component of each kind must be: one ``typing.Protocol`` per kind (and per variant), the
single statement of the contracts between tasks, the run loop and the components they build.

The registry checks them twice. When a plugin registers a class, the class must define every
method of its kind's protocol (``register`` raises :class:`~handforge.errors.RegistryError` naming
the plugin, the component and what is missing). Data attributes (``class_names``, ``fields``, ...)
are often set in ``__init__``, and a factory that is a plain function shows nothing until it is
called, so :meth:`handforge.recipe.Component.build` checks the built object once more, methods and
attributes, and raises :class:`~handforge.errors.ContractError` naming the recipe path, the kind,
the component, its plugin and what is missing.

Variants (:data:`CONTRACTS`): an augmentation or a loss picks its protocol with ``register(...,
signature=...)`` (the first of its kind's signatures is the default); a backbone or a conditioner
adds the members of the ``role`` it is built for. The protocols are ``runtime_checkable``, so
``isinstance(obj, handforge.contracts.Metric)`` works too; what they cannot say (optional
members, how a factory is called) is in each docstring and in ``docs/plugins.md``.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import attrs
import torch
import torch.nn as nn

from . import task as task_module
from .errors import ContractError

# -- datasets -----------------------------------------------------------------------------------


@runtime_checkable
class Dataset(Protocol):
    """``factory(config, *, split)`` with ``split`` "train" or "val" (:data:`handforge.data.SPLITS`).

    A map-style dataset: ``len(dataset)`` samples, ``dataset[i]`` a dict of tensors whose keys are
    sample fields (:data:`handforge.data.FIELDS`, shapes and dtypes as listed there) and exactly
    the fields the registration ``provides``. Optional: ``__getitems__(indices) -> dict`` returning
    an already batched dict (the loader then fetches whole batches in one call), and
    ``image_size`` (an int, or (H, W)) so tasks need not read a sample to learn it.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class StreamingDataset(Dataset, Protocol):
    """A dataset that can also be read front to back, for ``train.read = "stream"`` (optional; the
    recipe is refused when the dataset has no ``stream``). ``stream(rank, world, epoch, shuffle)``
    returns a ``torch.utils.data.IterableDataset`` of process ``rank``'s share (of ``world``) of
    epoch ``epoch``: the shares of all ranks hold each sample once; the stream splits its share
    again over DataLoader workers (``torch.utils.data.get_worker_info()``); ``shuffle`` mixes the
    order by the epoch. It must be a function of its arguments and the dataset's options (no
    global RNG), so that a resumed run reads what an uninterrupted one did. Samples are as
    ``dataset[i]``'s; the map-style reading stays in use for sample 0, sample grids and metrics.
    Optional on the stream: ``skipped() -> dict[str, int]``, what it left out so far in this
    process by kind (bad data under ``on_error = "skip"``): the loop logs the counts."""

    def stream(self, rank: int, world: int, epoch: int, shuffle: bool) -> torch.utils.data.IterableDataset: ...


@runtime_checkable
class LabelledDataset(Dataset, Protocol):
    """A dataset that provides ``label``: ``class_names[label]`` names each class id."""

    class_names: list[str]


# -- backbones ----------------------------------------------------------------------------------


@runtime_checkable
class Backbone(Protocol):
    """``factory(config, *, role, image_size, **context) -> torch.nn.Module``.

    The task passes ``role`` and the context that role needs; a backbone that cannot serve a
    role raises :class:`~handforge.errors.HandforgeError` naming itself. The roles the built-in
    tasks build (``CONTRACTS["backbone"].roles`` adds their members):

    - ``generator``, ``discriminator`` (task ``gan``): context ``image_size``, ``n_classes``,
      ``conditioner`` (the built :class:`Conditioner` of that side). ``generator(z, cond)`` takes
      noise (N, ``z_dim``) and the conditioner's ``cond`` and returns (N, 3, H, W) in [-1, 1];
      ``discriminator(x, cond)`` returns logits (N,), or ``(logits, aux)`` when the
      conditioner's head has an auxiliary output. Optional on a generator:
      ``g_penalty(z, cond, step) -> tensor | None`` (a regulariser added to its loss),
      ``truncation = "w"`` (StyleGAN's psi: ``forward(z, cond, psi=...)``) and a ``rng``
      keyword in ``forward`` for its own random draws in sample grids.
    - ``classifier`` (task ``classifier``): context ``image_size``, ``n_classes``;
      ``forward(x) -> (N, n_classes)`` logits; its last ``nn.Linear`` is the head.
    - ``pose_transfer`` (task ``pose_transfer``): context ``image_size``, ``conditioner`` (a
      :class:`PoseTransferSide`); ``forward(reference, reference_maps, target_maps)`` returns the
      reference's individual in the target pose, (N, 3, H, W) in [-1, 1]. The task's
      ``discriminator`` is built as for ``gan`` and may return patch logits (N, 1, h, w).
    - ``perceptual`` (task ``pose_transfer``'s perceptual loss): context ``image_size``;
      ``feature_maps(x, layers)`` returns the feature maps of images in [-1, 1] at those layers.
    - ``keypoints`` (task ``keypoints``, metric ``pose_fidelity``): context ``image_size``,
      ``num_keypoints``, ``head`` ("regression" or "heatmap"); ``forward(x)`` returns
      ``{"coords": (N, K, 2)}`` in [0, 1] of the image, plus ``"heatmaps"`` (N, K, h, w) logits
      for the heatmap head.
    """

    def forward(self, *inputs: Any) -> Any: ...


@runtime_checkable
class Generator(Backbone, Protocol):
    """A backbone built with ``role="generator"``: ``z_dim`` is the size of the noise it takes."""

    z_dim: int


# -- conditioners -------------------------------------------------------------------------------


@runtime_checkable
class Conditioner(Protocol):
    """``factory(config, *, role, n_classes, image_size) -> conditioner``: how a condition (label,
    keypoints) enters a network. ``role`` is "generator", "discriminator" or "denoiser"; one that cannot serve
    the role raises :class:`~handforge.errors.HandforgeError`. A backbone never looks at labels or
    keypoints: it asks its side's conditioner for the layers that consume them and passes the
    opaque ``cond`` along. The modules a conditioner returns belong to the backbone (trained,
    saved and EMA-averaged with it).

    ``fields`` are the sample fields it reads (also registered as ``needs``); ``condition(batch)``
    makes the ``cond`` the task passes to both networks (a label tensor, maps made on the device
    from ``batch["keypoints"]``, a tuple, or None). The role's members are in
    :class:`GeneratorSide`, :class:`DiscriminatorSide`, :class:`DenoiserSide` and
    :class:`PoseTransferSide`; a class that declares ``roles`` (a
    tuple of role names) needs only those sides' members. Optional: ``spatial = True`` when
    ``cond`` is (N, K, H, W) maps aligned with the image (an augmentation then moves them with
    the image); ``shared_embedding(dim) -> nn.Module | None`` (BigGAN's shared class embedding);
    ``d_aux_loss(aux, cond)`` and ``g_aux_loss(aux, cond)`` when its head returns ``(logits,
    aux)`` (the task adds them to D's loss on real images and G's on fakes).
    """

    fields: tuple

    def condition(self, batch: dict) -> Any: ...


@runtime_checkable
class GeneratorSide(Conditioner, Protocol):
    """``norm(num_features, *, extra_dim=0, spectral_norm=False)``: a normalisation layer whose
    ``forward(x, cond)`` (``forward(x, cond, extra)`` with ``extra_dim > 0``: BigGAN-style
    generators pass a vector of that size) returns x normalised; ``latent_dim`` and
    ``latent(cond) -> (N, latent_dim) | None``: a vector the generator mixes into its noise (0 and
    None when there is none)."""

    latent_dim: int

    def norm(self, num_features: int, **options: Any) -> nn.Module: ...

    def latent(self, cond: Any) -> torch.Tensor | None: ...


@runtime_checkable
class DenoiserSide(Conditioner, Protocol):
    """A diffusion denoiser's conditioner: ``input_channels`` and ``merge_input(x, cond) -> x``
    (channels concatenated to x_t, 0 and the identity when none); ``denoiser_embedding(dim) ->
    nn.Module | None`` (maps ``cond`` to an (N, dim) vector added to the time embedding, None when
    there is none); ``drop(cond, mask) -> cond``: the null condition on the rows where the (N,)
    bool mask is set (classifier-free guidance).

    Optional (not checked: a conditioner without it is built as before): ``denoiser_modulation(
    channels) -> nn.Module | None``, a layer whose ``forward(h, cond)`` returns (N, channels, h, w)
    features modulated by the condition, typically h * (1 + gamma) + beta with gamma, beta made
    from ``cond`` at h's resolution. A denoiser applies one after each normalisation of its
    residual blocks (SPADE's place); it should start as the identity (gamma, beta zero), so that
    training starts from the unmodulated network. None, or no such method: no modulation, and
    the denoiser is exactly the unmodulated network (same modules, same state_dict)."""

    input_channels: int

    def merge_input(self, x: torch.Tensor, cond: Any) -> torch.Tensor: ...

    def denoiser_embedding(self, dim: int) -> nn.Module | None: ...

    def drop(self, cond: Any, mask: torch.Tensor) -> Any: ...


@runtime_checkable
class DiscriminatorSide(Conditioner, Protocol):
    """``input_channels`` and ``merge_input(x, cond) -> x``: channels concatenated to the image
    before D's first layer (0 and the identity when none); ``head(num_features, *,
    spectral_norm=False)``: D's output layer, ``forward(h, cond)`` on pooled features (N, F)
    returning logits (N,) or ``(logits, aux)``."""

    input_channels: int

    def merge_input(self, x: torch.Tensor, cond: Any) -> torch.Tensor: ...

    def head(self, num_features: int, **options: Any) -> nn.Module: ...


@runtime_checkable
class PoseTransferSide(Conditioner, Protocol):
    """A pose-transfer generator's conditioner (task ``pose_transfer``): pose maps for the target
    (``condition(batch)``, from ``keypoints``) and for the reference (the task passes a batch whose
    ``keypoints`` are the reference's); ``map_channels``, the maps' channel count; and the two ways
    the generator re-injects the target's maps into its decoder: ``norm(num_features)`` (a layer
    ``forward(x, maps)``: SPADE in ``spade``) or ``input_channels`` / ``merge_input(x, maps)`` (maps
    concatenated to a block's input: ``concat``)."""

    map_channels: int
    input_channels: int

    def norm(self, num_features: int, **options: Any) -> nn.Module: ...

    def merge_input(self, x: torch.Tensor, cond: Any) -> torch.Tensor: ...


# -- augmentations ------------------------------------------------------------------------------


@runtime_checkable
class ImageAugmentation(Protocol):
    """``factory(config, *, image_size)``; the default ``signature="images"``. Called on real and
    fake images before the discriminator, differentiably: ``augment(images) -> images``, or, with
    a spatial conditioner, ``augment(images, maps) -> (images, maps)`` moving the maps with the
    image. Optional: ``observe(real_logits)`` after every D step (ADA adapts its strength),
    ``log() -> dict[str, float]`` (joins the step's logs); as an ``nn.Module`` its buffers are
    checkpointed with the task."""

    def __call__(self, images: torch.Tensor, *maps: torch.Tensor) -> Any: ...


@runtime_checkable
class BatchAugmentation(Protocol):
    """``factory(config, *, image_size)``, registered with ``signature="batch"``: applied to each
    training batch on the device, ``augment(batch) -> batch``, moving labels that live in image
    coordinates (keypoints) with the image."""

    def __call__(self, batch: dict) -> dict: ...


# -- losses, metrics, tasks ---------------------------------------------------------------------


@runtime_checkable
class AdversarialLoss(Protocol):
    """``factory(config)``; the default ``signature="adversarial"`` (task ``gan``'s ``loss`` slot).

    ``d_loss(real_logits, fake_logits)`` and ``g_loss(fake_logits)`` take the discriminator's
    logits (N,) and return the scalar each network minimises. Optional:
    ``d_penalty(D, real, fake, cond, step) -> tensor | None``, added to D's loss in every D step
    with the (augmented) images D just saw, the ``cond`` of the real ones and the D step index;
    None means nothing this step (a lazy regulariser off its interval)."""

    def d_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor: ...

    def g_loss(self, fake_logits: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Metric(Protocol):
    """``factory(config)``; ``evaluate(run) -> dict[str, float]`` on the eval schedule, on every
    process (each must return the same numbers; ``run`` is a :class:`handforge.task.RunContext`:
    ``run.task``, ``run.dataset``, ``run.recipe``, ``run.device``). The names it returns go to
    ``metrics.jsonl`` and may be ``eval.best_metric``. Optional: ``measure(inputs)``, the same
    measurement on two image sources, for ``handforge evaluate``."""

    def evaluate(self, run: Any) -> dict[str, float]: ...


@runtime_checkable
class Task(Protocol):
    """``factory(config)``: a training program; subclass :class:`handforge.task.Task`, which has
    every method but ``setup`` and ``train_step`` (the loop's order of calls is in its docstring).
    Optional: ``generate(batch) -> (N, 3, H, W)`` for metrics and ``handforge generate``."""

    def setup(self, run: Any) -> None: ...

    def train_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]: ...

    def sample(self, batch: dict) -> dict | None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def export_modules(self) -> dict[str, nn.Module]: ...

    def finish(self) -> dict | None: ...


# -- the contract of each kind ------------------------------------------------------------------


@attrs.frozen
class KindContract:
    """A kind's protocol, its variants, and whether its components are ``nn.Module`` instances."""

    kind: str
    protocol: type
    signatures: dict = attrs.field(factory=dict)  # register(..., signature=NAME) -> protocol; first = default
    roles: dict = attrs.field(factory=dict)  # build context role -> protocol with that role's members
    module: bool = False  # a torch.nn.Module
    # Roles a class serves only when it declares them (added after third-party classes were
    # written against the others, which must keep registering unchanged).
    opt_in_roles: tuple = ()
    when_provides: dict = attrs.field(factory=dict)  # provided field -> protocol the dataset also meets


CONTRACTS = {c.kind: c for c in (
    KindContract("dataset", Dataset, when_provides={"label": LabelledDataset}),
    KindContract("backbone", Backbone, roles={"generator": Generator}, module=True),
    KindContract("conditioner", Conditioner,
                 roles={"generator": GeneratorSide, "discriminator": DiscriminatorSide,
                        "denoiser": DenoiserSide, "pose_transfer": PoseTransferSide},
                 opt_in_roles=("denoiser", "pose_transfer")),
    KindContract("augmentation", ImageAugmentation,
                 signatures={"images": ImageAugmentation, "batch": BatchAugmentation}),
    KindContract("loss", AdversarialLoss, signatures={"adversarial": AdversarialLoss}),
    KindContract("metric", Metric),
    KindContract("task", Task),
)}

# Methods a base class defines only to say "write me": inheriting one is not implementing it.
PLACEHOLDERS = frozenset({
    nn.Module.forward,
    torch.utils.data.Dataset.__getitem__,
    task_module.Task.setup,
    task_module.Task.train_step,
})
_DUNDER_MEMBERS = {"__len__", "__getitem__", "__call__"}
_MISSING = object()


def members(protocol: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(methods, data attributes) a protocol requires, its parent protocols' included."""
    methods, attributes = [], []
    for klass in reversed(protocol.__mro__):
        if not klass.__dict__.get("_is_protocol", False) or klass is Protocol:
            continue
        for name, value in vars(klass).items():
            if callable(value) and (not name.startswith("_") or name in _DUNDER_MEMBERS) and name not in methods:
                methods.append(name)
        attributes += [a for a in klass.__dict__.get("__annotations__", {}) if a not in attributes]
    return tuple(methods), tuple(attributes)


def signature_of(kind: str, info: dict) -> str | None:
    """The variant a registration picked (``signature=``), or the kind's default; None without variants."""
    contract = CONTRACTS.get(kind)
    if contract is None or not contract.signatures:
        return None
    return info.get("signature", next(iter(contract.signatures)))


def protocols_for(kind: str, info: dict, role: str | None = None, provided=()) -> list[type]:
    contract = CONTRACTS[kind]
    signature = signature_of(kind, info)
    found = [contract.signatures[signature] if signature is not None else contract.protocol]
    if role is not None and role in contract.roles:
        found.append(contract.roles[role])
    found += [p for field, p in contract.when_provides.items() if field in provided]
    return found


def _lookup(cls: type, name: str):
    """``name`` as the class defines or inherits it (not the metaclass: every class is callable)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return _MISSING


def _implemented(value) -> bool:
    if value is _MISSING or value is None:
        return False
    function = getattr(value, "__func__", value)  # staticmethod, classmethod, bound method
    return function not in PLACEHOLDERS and (callable(function) or isinstance(value, property))


def _class_has_method(cls: type, name: str) -> bool:
    if name == "__call__" and issubclass(cls, nn.Module):
        name = "forward"  # a module is called through forward
    return _implemented(_lookup(cls, name))


def missing_on_class(cls: type, protocols) -> list[str]:
    """Methods of ``protocols`` a class does not define (attributes can wait for the instance)."""
    missing = []
    for protocol in protocols:
        methods, _ = members(protocol)
        missing += [m for m in methods if not _class_has_method(cls, m) and m not in missing]
    return missing


def missing_on_instance(obj, protocols) -> list[str]:
    """Methods and attributes of ``protocols`` that ``obj`` lacks."""
    missing = []
    for protocol in protocols:
        methods, attributes = members(protocol)
        for name in methods:
            if name in _DUNDER_MEMBERS:  # Python finds these on the type, never on the instance
                ok = _class_has_method(type(obj), name)
            else:
                ok = _implemented(getattr(obj, name, _MISSING))
            if not ok and name not in missing:
                missing.append(name)
        missing += [a for a in attributes if not hasattr(obj, a) and a not in missing]
    return missing


def _declared_roles(cls: type, contract: KindContract, info: dict) -> tuple:
    """The roles a registered class says it serves (a ``roles`` class attribute or ``register(...,
    roles=...)``); all of the kind's roles but the opt-in ones when it says nothing."""
    roles = info.get("roles", _lookup(cls, "roles"))
    if isinstance(roles, (tuple, list, frozenset, set)) and all(isinstance(r, str) for r in roles):
        return tuple(r for r in roles if r in contract.roles)
    return tuple(r for r in contract.roles if r not in contract.opt_in_roles)


def check_registration(kind: str, factory, info: dict) -> str | None:
    """Why a registration breaks its kind's contract, or None. Only a class can be checked here."""
    contract = CONTRACTS.get(kind)
    if contract is None:
        return None
    if contract.signatures:
        signature = info.get("signature", next(iter(contract.signatures)))
        if signature not in contract.signatures:
            return (f"signature {signature!r} is not one of the {kind} contracts: "
                    f"{', '.join(repr(s) for s in contract.signatures)}")
    if not isinstance(factory, type):
        return None  # a function: its result is checked when it is built
    if contract.module and not issubclass(factory, nn.Module):
        return f"{factory.__qualname__} is not a torch.nn.Module subclass; a {kind} is one"
    protocols = protocols_for(kind, info)
    protocols += [contract.roles[r] for r in _declared_roles(factory, contract, info)]
    missing = missing_on_class(factory, protocols)
    if missing:
        return (f"{factory.__qualname__} lacks {', '.join(missing)} "
                f"(a {kind}{_variant(kind, info)} has {', '.join(_all_methods(protocols))})")
    return None


def _variant(kind: str, info: dict) -> str:
    signature = signature_of(kind, info)
    return f" with signature {signature!r}" if signature is not None else ""


def _all_methods(protocols) -> list[str]:
    names = []
    for protocol in protocols:
        names += [m for m in members(protocol)[0] if m not in names]
    return names


def check_built(entry, obj, context: dict, config, path: str) -> None:
    """Raise ContractError when a built component lacks what its kind requires."""
    contract = CONTRACTS.get(entry.kind)
    if contract is None:
        return
    where = f"{path}: {entry.kind} '{entry.name}' (plugin {entry.origin})"
    if contract.module and not isinstance(obj, nn.Module):
        raise ContractError(f"{where} built a {type(obj).__name__}, not a torch.nn.Module")
    provided = entry.fields_provided(config) if contract.when_provides else ()
    protocols = protocols_for(entry.kind, entry.info, context.get("role"), provided)
    missing = missing_on_instance(obj, protocols)
    if missing:
        role = f" for role {context['role']!r}" if context.get("role") in contract.roles else ""
        raise ContractError(f"{where} built a {type(obj).__name__}{role} without {', '.join(missing)}; "
                            f"see docs/plugins.md for what a {entry.kind} has")
