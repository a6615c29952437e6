"""The ``gan`` task: a generator and a discriminator trained against each other, with an EMA generator.

Slots (filled under ``[model.<slot>]`` of a recipe):

- ``generator``, ``discriminator``: backbones built with ``role``, ``image_size``, ``n_classes``
  and ``conditioner`` (the built conditioner of their side);
- ``g_conditioner``, ``d_conditioner``: how conditions enter each network (default ``none``);
  their ``condition(batch)`` makes the ``cond`` both networks receive;
- ``loss``: an object with ``d_loss(real_logits, fake_logits)`` and ``g_loss(fake_logits)``;
- ``augment`` (optional): a callable on (N, C, H, W) images, applied the same way to real and
  fake images before the discriminator (DiffAugment / ADA style), built with ``image_size``.

One iteration (one ``train_step``) is ``d_steps`` discriminator updates, then one generator
update, all inside one ``accelerator.accumulate`` block. Fake images take the conditions of the
real batch they are compared with.
"""
import contextlib
import copy

import attrs
import torch
import torch.nn as nn
from attrs import validators as v

from handforge import hookimpl
from handforge.errors import HandforgeError
from handforge.task import Slot, Task


@attrs.define
class GanConfig:
    g_lr: float = 2e-4
    d_lr: float = 2e-4
    betas: tuple[float, float] = attrs.field(  # Adam, both networks
        default=(0.0, 0.999), converter=tuple, validator=v.deep_iterable(v.and_(v.ge(0.0), v.lt(1.0))))
    d_steps: int = attrs.field(default=1, validator=v.ge(1))  # D updates per G update
    # EMA generator: 0 = none. Its decay warms up as min(ema_decay, (1 + t) / (10 + t)), t = step - ema_start,
    # so early samples are not dominated by the initial weights; before ema_start the EMA copies G.
    ema_decay: float = attrs.field(default=0.999, validator=[v.ge(0.0), v.lt(1.0)])
    ema_start: int = attrs.field(default=0, validator=v.ge(0))
    sample_count: int = attrs.field(default=64, validator=v.ge(1))  # images per sample grid


def batch_size(batch: dict) -> int:
    return next(t for t in batch.values() if torch.is_tensor(t)).shape[0]


class GanTask(Task):
    """Adversarial training of a (conditional) generator and discriminator, with an EMA generator."""

    def __init__(self, config=None, **_):
        self.config = config or GanConfig()

    # -- setup --------------------------------------------------------------------------------

    def setup(self, run):
        cfg, acc = self.config, run.accelerator
        self.run, self.accelerator, self.device = run, acc, acc.device
        size, n_classes = self._image_size(run.dataset), len(run.class_names)

        self.g_cond = run.components["g_conditioner"].build(role="generator", n_classes=n_classes)
        self.d_cond = run.components["d_conditioner"].build(role="discriminator", n_classes=n_classes)

        def backbone(role, conditioner):
            net = run.components[role].build(role=role, image_size=size, n_classes=n_classes, conditioner=conditioner)
            return net.to(self.device, memory_format=torch.channels_last)

        G, D = backbone("generator", self.g_cond), backbone("discriminator", self.d_cond)
        self.loss = run.components["loss"].build()
        augment = run.components.get("augment")
        augment = augment.build(image_size=size) if augment is not None else nn.Identity()
        self.augment = augment.to(self.device) if isinstance(augment, nn.Module) else augment

        opt_g = torch.optim.Adam(G.parameters(), lr=cfg.g_lr, betas=cfg.betas)
        opt_d = torch.optim.Adam(D.parameters(), lr=cfg.d_lr, betas=cfg.betas)
        self.G, self.D, self.opt_g, self.opt_d = acc.prepare(G, D, opt_g, opt_d)

        generator = acc.unwrap_model(self.G)
        self.z_dim = generator.z_dim
        self.ema = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        seeded = torch.Generator().manual_seed(getattr(run.recipe, "seed", 0) or 0)
        self.fixed_z = torch.randn(cfg.sample_count, self.z_dim, generator=seeded).to(self.device)

    @staticmethod
    def _image_size(dataset) -> int:
        size = getattr(dataset, "image_size", None)
        if size is None:
            size = tuple(dataset[0]["image"].shape[-2:])
        if isinstance(size, int):
            return size
        if len(size) != 2 or size[0] != size[1]:
            raise HandforgeError(f"task 'gan' needs square images, the dataset's are {tuple(size)}")
        return int(size[0])

    # -- training -----------------------------------------------------------------------------

    def train_step(self, batch, step):
        cfg, acc = self.config, self.accelerator
        with acc.accumulate(self.G, self.D):
            for i in range(cfg.d_steps):
                batch = self._to_device(batch if i == 0 else self._next_batch())
                g_cond, d_cond = self.g_cond.condition(batch), self.d_cond.condition(batch)
                # The last D step's fakes keep their graph: the G step reuses them (one G forward less).
                with torch.set_grad_enabled(i == cfg.d_steps - 1):
                    fake = self.G(torch.randn(batch_size(batch), self.z_dim, device=self.device), g_cond)
                real = batch["image"].contiguous(memory_format=torch.channels_last)
                real_logits = self.D(self.augment(real), d_cond)
                fake_logits = self.D(self.augment(fake.detach()), d_cond)
                d_loss = self.loss.d_loss(real_logits, fake_logits)
                acc.backward(d_loss)
                self.opt_d.step()
                self.opt_d.zero_grad(set_to_none=True)

            self.D.requires_grad_(False)
            with self._d_no_sync():
                g_loss = self.loss.g_loss(self.D(self.augment(fake), d_cond))
            acc.backward(g_loss)
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
            self.D.requires_grad_(True)

        if self.ema is not None and acc.sync_gradients:
            self._update_ema(step)
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(),
                "d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean()}

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
    def _generate(self, z, batch):
        generator = self.ema if self.ema is not None else self.accelerator.unwrap_model(self.G)
        was_training = generator.training
        generator.eval()
        try:
            return generator(z, self.g_cond.condition(batch)).float().contiguous()
        finally:
            generator.train(was_training)

    def sample(self, batch):
        """The fixed noise, conditioned on the first ``sample_count`` conditions of ``batch``."""
        count = self.config.sample_count
        batch = self._to_device({k: t[:count] if torch.is_tensor(t) else t for k, t in batch.items()})
        n = batch_size(batch) if self.g_cond.fields else count
        return {"image": self._generate(self.fixed_z[:n], batch)}

    def generate(self, batch):
        batch = self._to_device(batch)
        return self._generate(torch.randn(batch_size(batch), self.z_dim, device=self.device), batch)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self):
        if self.ema is None:
            return {}
        return {f"ema.{k}": t.detach().contiguous() for k, t in self.ema.state_dict().items()}

    def load_state_dict(self, state):
        ema = {k.removeprefix("ema."): t for k, t in state.items() if k.startswith("ema.")}
        if self.ema is not None and ema:
            self.ema.load_state_dict(ema)

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
            Slot("generator", "backbone", summary="the generator network"),
            Slot("discriminator", "backbone", summary="the discriminator network"),
            Slot("g_conditioner", "conditioner", default="none", summary="how conditions enter G"),
            Slot("d_conditioner", "conditioner", default="none", summary="how conditions enter D"),
            Slot("loss", "loss", default="hinge", summary="adversarial loss"),
            Slot("augment", "augmentation", optional=True, summary="applied to real and fake images before D"),
        ),
    )
