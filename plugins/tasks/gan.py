"""The ``gan`` task: a generator and a discriminator trained against each other, with an EMA generator.

Slots (filled under ``[model.<slot>]`` of a recipe):

- ``generator``, ``discriminator``: backbones built with ``role``, ``image_size``, ``n_classes``
  and ``conditioner`` (the built conditioner of their side);
- ``g_conditioner``, ``d_conditioner``: how conditions enter each network (default ``none``);
  their ``condition(batch)`` makes the ``cond`` both networks receive. When D's output is
  ``(logits, aux)`` (an auxiliary head: ``acgan``, ``d2dce``), ``d_conditioner.d_aux_loss(aux, cond)``
  on real images joins the D loss and ``d_conditioner.g_aux_loss(aux, cond)`` on fakes the G loss;
- ``loss``: ``d_loss(real_logits, fake_logits)``, ``g_loss(fake_logits)`` and optionally
  ``d_penalty(D, real, fake, cond, step)`` (R1, gradient penalty), added to the D loss in every D
  step it returns a tensor for, on the images D saw; ``step`` is ``iteration * d_steps + i``;
- the generator may regularise itself: when it has ``g_penalty(z, cond, step) -> tensor | None``
  (StyleGAN2's path length regularisation), the task calls it in every G step with fresh noise
  ``z`` (N, z_dim), the conditions of the fakes and the iteration ``step``, and adds what it returns
  to the G loss (None: nothing this step, e.g. a lazy regulariser off its interval). It is called
  on the unwrapped generator: its graph joins the G loss's, whose one backward lets DDP reduce
  every gradient once, as for ``d_penalty``;
- ``augment`` (optional): an nn.Module applied to real and fake images before the discriminator
  (DiffAugment / ADA style), built with ``image_size``. With a spatial ``d_conditioner`` (maps
  aligned with the image) it is called as ``augment(images, maps) -> (images, maps)`` so that
  geometric transforms move the maps too. Its optional ``observe(real_logits)`` is called after
  every D step (ADA adapts its strength), its optional ``log()`` values join the step's logs, and
  its buffers are saved with the task's state.

One iteration (one ``train_step``) is ``d_steps`` discriminator updates, then one generator
update, all inside one ``accelerator.accumulate`` block. Each D step draws noise and runs G
without a graph; the G step draws new noise and runs G again (``reuse_fakes`` keeps the last D
step's fakes with their graph instead: one G forward less, a different iteration). Fake images
take the conditions of the real batch they are compared with (the G step's, the last D step's). Logged: ``d_loss`` and ``g_loss`` (the adversarial terms
alone), ``d_real``, ``d_fake`` (mean logits), and when present ``d_penalty``, ``g_penalty``,
``d_aux``, ``g_aux`` and the augmentation's values.

Sampling (``sample``, ``generate``) uses the EMA generator, optionally with the truncation trick
and standing statistics (see :mod:`handforge.plugins.tasks.sampling`). Truncation is BigGAN's
(latent entries redrawn) unless the generator declares ``truncation = "w"`` (``stylegan2``): then
the option is StyleGAN's psi, passed as ``generator(z, cond, psi=...)``, and z is left alone. A
generator whose forward takes ``rng`` gets the task's seeded CPU generator in sample grids, for
its own random draws (StyleGAN2's noise inputs): the grid stays a function of the weights alone.
"""
import contextlib
import copy
import inspect

import attrs
import torch
import torch.nn as nn
from attrs import validators as v

from handforge import hookimpl
from handforge.data import square_image_size
from handforge.errors import HandforgeError
from handforge.task import Slot, Task

from .sampling import standing_statistics, truncate


def add_terms(total, logs: dict, **terms):
    """``total`` plus every term that is not None (auxiliary losses, penalties off their lazy
    interval are None), each also logged under its name."""
    for name, value in terms.items():
        if value is not None:
            logs[name] = value
            total = total + value
    return total


def _truncation(instance, attribute, value):
    # Rejection redraws of n entries take about ln(n) / P(|z| <= t) rounds: below t = 0.01, thousands.
    if value != 0 and value < 0.01:
        raise ValueError(f"{attribute.name}: must be 0 (off) or >= 0.01, got {value!r}")


@attrs.define
class GanConfig:
    g_lr: float = 2e-4
    d_lr: float = 2e-4
    betas: tuple[float, float] = attrs.field(  # Adam, both networks
        default=(0.0, 0.999), converter=tuple, validator=v.deep_iterable(v.and_(v.ge(0.0), v.lt(1.0))))
    d_steps: int = attrs.field(default=1, validator=v.ge(1))  # D updates per G update (WGAN-GP's n_critic)
    reuse_fakes: bool = attrs.field(default=False, metadata={
        "help": "the G step reuses the last D step's fakes (kept with their graph) instead of drawing new "
                "noise and running G again: one G forward less per iteration (~13% of a 64 px BigGAN "
                "iteration on CPU), but the G step then sees the same z as D did, and G's BatchNorm "
                "statistics move once per iteration instead of twice; off = BigGAN/StudioGAN's iteration"})
    # EMA generator: 0 = none. Its decay warms up as min(ema_decay, (1 + t) / (10 + t)), t = step - ema_start,
    # so early samples are not dominated by the initial weights; before ema_start the EMA copies G.
    ema_decay: float = attrs.field(default=0.999, validator=[v.ge(0.0), v.lt(1.0)])
    ema_start: int = attrs.field(default=0, validator=v.ge(0))
    sample_count: int = attrs.field(default=64, validator=v.ge(1))  # images per sample grid
    truncation: float = attrs.field(default=0.0, validator=[v.ge(0.0), _truncation], metadata={
        "help": "sampling only: the truncation trick; 0 = off. BigGAN's: latent entries with |z| above this "
                "are redrawn; for generators that declare truncation = \"w\" (stylegan2) StyleGAN's psi: "
                "w is pulled to the average w, w_avg + psi (w - w_avg) (0.5-0.7 typical)"})
    standing_stats: int = attrs.field(default=0, validator=v.ge(0), metadata={
        "help": "sampling only: recompute the generator's BatchNorm statistics over this many batches "
                "of its own samples first (BigGAN); 0 = off. For BatchNorm generators whose eval-mode "
                "samples look off (typically with an EMA generator); no effect without BatchNorm"})


def batch_size(batch: dict) -> int:
    return next(t for t in batch.values() if torch.is_tensor(t)).shape[0]


def split_output(output):
    """(logits, aux) of a discriminator's output; aux is None without an auxiliary head."""
    return output if isinstance(output, tuple) else (output, None)


def takes_keyword(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read: the base contract, forward(z, cond)
        return False


def takes_two_arguments(fn) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call decide
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


class GanTask(Task):
    """Adversarial training of a (conditional) generator and discriminator, with an EMA generator."""

    config_cls = GanConfig

    # -- setup --------------------------------------------------------------------------------

    def setup(self, run):
        self.bind(run)
        cfg, acc = self.config, run.accelerator
        size, n_classes = self._image_size(run.dataset), len(run.class_names)

        self.g_cond = run.components["g_conditioner"].build(role="generator", n_classes=n_classes, image_size=size)
        self.d_cond = run.components["d_conditioner"].build(role="discriminator", n_classes=n_classes,
                                                            image_size=size)

        def backbone(role, conditioner):
            net = run.components[role].build(role=role, image_size=size, n_classes=n_classes, conditioner=conditioner)
            return net.to(self.device, memory_format=torch.channels_last)

        G, D = backbone("generator", self.g_cond), backbone("discriminator", self.d_cond)
        self.loss = run.components["loss"].build()
        self.spatial = bool(getattr(self.d_cond, "spatial", False))  # D's cond: maps aligned with the image
        self.augment = self._build_augment(run.components.get("augment"), run.components["d_conditioner"], size)

        opt_g = torch.optim.Adam(G.parameters(), lr=cfg.g_lr, betas=cfg.betas)
        opt_d = torch.optim.Adam(D.parameters(), lr=cfg.d_lr, betas=cfg.betas)
        self.G, self.D, self.opt_g, self.opt_d = acc.prepare(G, D, opt_g, opt_d)

        generator = acc.unwrap_model(self.G)
        self.z_dim = generator.z_dim
        self.ema = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        self.seed = getattr(run.recipe, "seed", 0) or 0
        seeded = torch.Generator().manual_seed(self.seed)
        self.fixed_z = torch.randn(cfg.sample_count, self.z_dim, generator=seeded).to(self.device)

    def _build_augment(self, component, d_component, size):
        if component is None:
            return None
        if component.entry.info.get("signature") == "batch":
            raise HandforgeError(
                f"model.augment: augmentation '{component.name}' transforms data batches (images with their "
                f"labels, for tasks like keypoints); the discriminator's augmentation takes images (and pose "
                f"maps): use diffaug or ada")
        augment = component.build(image_size=size)
        if self.spatial and not takes_two_arguments(getattr(augment, "forward", augment)):
            raise HandforgeError(
                f"augmentation '{component.name}' takes images only, but d_conditioner '{d_component.name}' "
                f"gives the discriminator maps aligned with the image: the augmentation must move them too "
                f"(forward(images, maps) -> (images, maps)); use one that does, or a non-spatial d_conditioner")
        return augment.to(self.device) if isinstance(augment, nn.Module) else augment

    @staticmethod
    def _image_size(dataset) -> int:
        return square_image_size(dataset, "task 'gan'")

    # -- training -----------------------------------------------------------------------------

    def train_step(self, batch, step):
        cfg, acc = self.config, self.accelerator
        logs = {}
        with acc.accumulate(self.G, self.D):
            for i in range(cfg.d_steps):
                batch = self._to_device(batch if i == 0 else self._next_batch())
                g_cond, d_cond = self.g_cond.condition(batch), self.d_cond.condition(batch)
                # With reuse_fakes the last D step's fakes keep their graph for the G step.
                with torch.set_grad_enabled(cfg.reuse_fakes and i == cfg.d_steps - 1):
                    fake = self._fakes(batch, g_cond)
                real = batch["image"].contiguous(memory_format=torch.channels_last)
                real_in, real_cond = self._augment(real, d_cond)
                fake_in, fake_cond = self._augment(fake.detach(), d_cond)
                real_logits, real_aux = split_output(self.D(real_in, real_cond))
                fake_logits, _ = split_output(self.D(fake_in, fake_cond))
                d_loss = self.loss.d_loss(real_logits, fake_logits)
                # ACGAN / ReACGAN: the auxiliary objective learns from real images.
                d_aux = self.d_cond.d_aux_loss(real_aux, real_cond) if real_aux is not None else None
                d_total = add_terms(d_loss, logs, d_aux=d_aux, d_penalty=self._d_penalty(
                    real_in, fake_in, real_cond, step * cfg.d_steps + i))
                acc.backward(d_total)
                self.opt_d.step()
                self.opt_d.zero_grad(set_to_none=True)
                self._observe(real_logits)

            self.D.requires_grad_(False)
            if not cfg.reuse_fakes:  # fresh noise and a second G forward, as BigGAN's iteration has it
                fake = self._fakes(batch, g_cond)
            with self._d_no_sync():
                fake_in, fake_cond = self._augment(fake, d_cond)
                fake_logits_g, fake_aux = split_output(self.D(fake_in, fake_cond))
                g_loss = self.loss.g_loss(fake_logits_g)
                g_aux = self.d_cond.g_aux_loss(fake_aux, fake_cond) if fake_aux is not None else None
            g_total = add_terms(g_loss, logs, g_aux=g_aux, g_penalty=self._g_penalty(fake.shape[0], g_cond, step))
            acc.backward(g_total)
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
            self.D.requires_grad_(True)

        if self.ema is not None and acc.sync_gradients:
            self._update_ema(step)
        logs.update(d_loss=d_loss, g_loss=g_loss, d_real=real_logits.mean(), d_fake=fake_logits.mean())
        logs = {name: value.detach() for name, value in logs.items()}
        log = getattr(self.augment, "log", None)
        if log is not None:
            logs.update({name: torch.as_tensor(value, dtype=torch.float32, device=self.device).reshape(())
                         for name, value in log().items()})
        return logs

    def _fakes(self, batch, g_cond):
        return self.G(torch.randn(batch_size(batch), self.z_dim, device=self.device), g_cond)

    def _augment(self, images, cond):
        """(images, cond) as the discriminator sees them."""
        if self.augment is None:
            return images, cond
        if self.spatial:
            return self.augment(images, cond)
        return self.augment(images), cond

    def _d_penalty(self, real, fake, cond, d_step):
        penalty = getattr(self.loss, "d_penalty", None)
        return None if penalty is None else penalty(self.D, real, fake.detach(), cond, d_step)

    def _g_penalty(self, n, cond, step):
        penalty = getattr(self.accelerator.unwrap_model(self.G), "g_penalty", None)
        if penalty is None:
            return None
        return penalty(torch.randn(n, self.z_dim, device=self.device), cond, step)

    def _observe(self, real_logits):
        observe = getattr(self.augment, "observe", None)
        if observe is None:
            return
        logits = real_logits.detach()
        if self.accelerator.num_processes > 1:
            # One statistic for all processes (as StyleGAN2-ADA): every process then holds the same
            # augmentation state, and the one the main process checkpoints is everyone's.
            logits = self.accelerator.gather(logits)
        observe(logits)

    def _d_no_sync(self):
        # D has no gradients in the G step: keep DDP from waiting for them to be reduced.
        # (Under accumulation, outside a sync step, `accumulate` already did this.)
        return self.accelerator.no_sync(self.D) if self.accelerator.sync_gradients else contextlib.nullcontext()

    def _next_batch(self) -> dict:
        next_batch = getattr(self.run, "next_batch", None)
        if next_batch is None:
            raise HandforgeError("task 'gan' with d_steps > 1 needs run.next_batch() from the run loop")
        return next_batch()

    def _to_device(self, batch: dict) -> dict:
        return {k: t.to(self.device, non_blocking=True) if torch.is_tensor(t) else t for k, t in batch.items()}

    @torch.no_grad()
    def _update_ema(self, step: int):
        t = step - self.config.ema_start
        decay = min(self.config.ema_decay, (1 + t) / (10 + t)) if t >= 0 else 0.0
        generator = self.accelerator.unwrap_model(self.G)
        torch._foreach_lerp_(list(self.ema.parameters()), list(generator.parameters()), 1.0 - decay)
        for ema_buffer, buffer in zip(self.ema.buffers(), generator.buffers()):
            ema_buffer.copy_(buffer)

    # -- sampling -----------------------------------------------------------------------------

    @torch.no_grad()
    def _generate(self, z, batch, rng=None):
        """Images for noise z and the conditions of ``batch``. ``rng`` (a CPU generator) makes the
        truncation redraws and standing-statistics noise deterministic; None uses the global RNG."""
        cfg, cond = self.config, self.g_cond.condition(batch)
        generator = self.ema if self.ema is not None else self.accelerator.unwrap_model(self.G)
        options = {}
        if getattr(generator, "truncation", None) == "w":
            if cfg.truncation:
                options["psi"] = cfg.truncation
        elif cfg.truncation:
            z = truncate(z, cfg.truncation, rng)
        if rng is not None and takes_keyword(generator.forward, "rng"):
            options["rng"] = rng
        if cfg.standing_stats:
            def noise():
                if rng is None:
                    return torch.randn(z.shape, device=self.device)
                return torch.randn(z.shape, generator=rng).to(self.device)

            generator = standing_statistics(generator, cfg.standing_stats, noise, cond)
        was_training = generator.training
        generator.eval()
        try:
            return generator(z, cond, **options).float().contiguous()
        finally:
            generator.train(was_training)

    def sample(self, batch):
        """The fixed noise, conditioned on the first ``sample_count`` conditions of ``batch``."""
        count = self.config.sample_count
        batch = self._to_device({k: t[:count] if torch.is_tensor(t) else t for k, t in batch.items()})
        n = batch_size(batch) if self.g_cond.fields else count
        # A seeded generator keeps the grid a function of the weights alone (truncation, standing stats).
        rng = torch.Generator().manual_seed(self.seed + 1)
        return {"image": self._generate(self.fixed_z[:n], batch, rng)}

    @property
    def condition_fields(self) -> tuple:
        """The sample fields ``generate`` reads (the generator's conditioner's)."""
        return tuple(self.g_cond.fields)

    def generate(self, batch, seeds=None):
        """Images for the conditions in ``batch``. With ``seeds`` ((N,) integers) image i's noise
        (and its truncation redraws) come from a generator seeded with ``seeds[i]`` alone; the draws a
        whole batch shares (a generator's own noise inputs, standing statistics) from one seeded with
        ``seeds[0]``. Without, everything comes from the global RNG."""
        batch = self._to_device(batch)
        if seeds is None:
            return self._generate(torch.randn(batch_size(batch), self.z_dim, device=self.device), batch)
        seeds = [int(s) for s in seeds]
        if len(seeds) != batch_size(batch):
            raise HandforgeError(f"task 'gan': {len(seeds)} seeds for a batch of {batch_size(batch)} conditions")
        rows = []
        for seed in seeds:
            rng = torch.Generator().manual_seed(seed)
            z = torch.randn(1, self.z_dim, generator=rng)
            if self.config.truncation and getattr(self._sampling_generator(), "truncation", None) != "w":
                # Truncated here, per image: _generate's own truncation keeps entries already within.
                z = truncate(z, self.config.truncation, rng)
            rows.append(z)
        z = torch.cat(rows).to(self.device)
        return self._generate(z, batch, torch.Generator().manual_seed(seeds[0]))

    def variations(self, individuals, others, count, *, strength, generator):
        """One z per individual. Pose-conditioned (a spatial conditioner, or one that reads keypoints):
        that z under each of the ``count`` poses of ``others``. Otherwise ``count`` perturbations of it,
        z_j = sqrt(1 - s^2) z + s eps_j with s = ``strength``: each z_j is again N(0, I) (the prior
        the generator was trained on), s -> 0 is the individual itself and s = 1 an independent draw
        under the same label, like SDEdit's strength. Every random number comes from ``generator``."""
        if not 0 < strength <= 1:
            raise HandforgeError(f"--strength must be in (0, 1], got {strength}")
        individuals, others = self._to_device(individuals), self._to_device(others)
        k = batch_size(individuals)
        z = torch.randn(k, self.z_dim, generator=generator).repeat_interleave(count, dim=0)
        if not (getattr(self.g_cond, "spatial", False) or "keypoints" in self.condition_fields):
            eps = torch.randn(z.shape, generator=generator)
            z = z * (1.0 - strength * strength) ** 0.5 + eps * strength
        images = self._generate(z.to(self.device), others, generator)
        return images.reshape(k, count, *images.shape[1:])

    def _sampling_generator(self):
        return self.ema if self.ema is not None else self.accelerator.unwrap_model(self.G)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self):
        state = {}
        if self.ema is not None:
            state.update({f"ema.{k}": t for k, t in self.ema.state_dict().items()})
        if isinstance(self.augment, nn.Module):  # ADA's strength p: resume continues from it
            state.update({f"augment.{k}": t for k, t in self.augment.state_dict().items()})
        return {k: t.detach().contiguous() for k, t in state.items()}

    def load_state_dict(self, state):
        for prefix, module in (("ema.", self.ema), ("augment.", self.augment)):
            part = {k.removeprefix(prefix): t for k, t in state.items() if k.startswith(prefix)}
            if isinstance(module, nn.Module) and part:
                module.load_state_dict(part)

    def export_modules(self):
        unwrap = self.accelerator.unwrap_model
        modules = {"generator": unwrap(self.G), "discriminator": unwrap(self.D)}
        if self.ema is not None:
            modules["generator_ema"] = self.ema
        return modules


@hookimpl
def register_tasks(register):
    register(
        "gan", GanTask, config=GanConfig, needs=("image",),
        slots=(
            Slot("generator", "backbone", summary="the generator network", role="generator"),
            Slot("discriminator", "backbone", summary="the discriminator network", role="discriminator"),
            Slot("g_conditioner", "conditioner", default="none", summary="how conditions enter G", role="generator"),
            Slot("d_conditioner", "conditioner", default="none", summary="how conditions enter D", role="discriminator"),
            Slot("loss", "loss", default="hinge", summary="adversarial loss"),
            Slot("augment", "augmentation", optional=True,
                 summary="applied to real and fake images (and spatial condition maps) before D"),
        ),
    )
