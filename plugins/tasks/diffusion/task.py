"""The ``diffusion`` task: a denoiser trained on the forward process of :mod:`.schedules`, sampled
with the samplers of :mod:`.samplers`, conditioned through the conditioner registry.

Slots: ``denoiser`` (a backbone built with ``role="denoiser"``, ``image_size``, ``n_classes``,
``conditioner`` and ``channels=3``; ``forward(x, t, cond)`` with t the (N,) float timesteps) and
``conditioner`` (built with ``role="denoiser"``; default ``none``). One step: random timesteps,
x_t = q_sample(x0, t, eps), MSE of the output against the objective's target (optionally min-SNR
weighted), inside one ``accelerator.accumulate`` block. With a conditional conditioner a
``cond_drop`` share of the rows get the null condition (``conditioner.drop``), so that guidance can
be used at sampling time. Sampling uses the EMA denoiser.
"""
import copy

import torch

from handforge.data import square_image_size
from handforge.errors import HandforgeError
from handforge.task import Task

from .config import DiffusionConfig
from .guidance import check_guidance, predictor
from .samplers import run_sampler
from .schedules import Schedule, min_snr_weight, target


def batch_size(batch: dict) -> int:
    return next(t for t in batch.values() if torch.is_tensor(t)).shape[0]


class DiffusionTask(Task):
    """DDPM training of a (conditional) denoiser; DDPM, DDIM or DPM-Solver sampling, with guidance."""

    config_cls = DiffusionConfig

    def setup(self, run):
        self.bind(run)
        cfg, acc = self.config, run.accelerator
        self.size, n_classes = square_image_size(run.dataset, "task 'diffusion'"), len(run.class_names)
        self.cond_name = run.components["conditioner"].name
        self.cond = run.components["conditioner"].build(role="denoiser", n_classes=n_classes, image_size=self.size)
        net = run.components["denoiser"].build(role="denoiser", image_size=self.size, n_classes=n_classes,
                                               conditioner=self.cond, channels=3).to(self.device)
        self.conditional = bool(getattr(self.cond, "conditional", bool(getattr(self.cond, "fields", ()))))
        if self.conditional and cfg.cond_drop > 0 and not hasattr(self.cond, "drop"):
            raise HandforgeError(f"task.cond_drop = {cfg.cond_drop}: conditioner '{self.cond_name}' has no "
                                 f"drop(cond, mask) for classifier-free guidance; set task.cond_drop = 0")
        check_guidance(cfg.guidance_scale, self.conditional, self.cond_name)
        self.schedule = Schedule(cfg.schedule, cfg.num_timesteps)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.net, self.opt = acc.prepare(net, opt)
        self.ema = copy.deepcopy(acc.unwrap_model(self.net)).eval().requires_grad_(False) if cfg.ema_decay else None
        self.seed = getattr(run.recipe, "seed", 0) or 0
        seeded = torch.Generator().manual_seed(self.seed)
        self.fixed_noise = torch.randn(cfg.sample_count, 3, self.size, self.size, generator=seeded)

    # -- training -----------------------------------------------------------------------------

    def train_step(self, batch, step):
        cfg, acc = self.config, self.accelerator
        with acc.accumulate(self.net):
            batch = self._to_device(batch)
            x0 = batch["image"].float()
            n = x0.shape[0]
            cond = self.cond.condition(batch)
            if self.conditional and cfg.cond_drop > 0:
                cond = self.cond.drop(cond, torch.rand(n, device=self.device) < cfg.cond_drop)
            t = torch.randint(0, cfg.num_timesteps, (n,), device=self.device)
            noise = torch.randn_like(x0)
            a, s = self.schedule.coefficients(t, x0)
            output = self.net(a * x0 + s * noise, t.float(), cond).float()
            per_image = (output - target(cfg.objective, x0, noise, a, s)).pow(2).mean(dim=(1, 2, 3))
            if cfg.min_snr_gamma:
                weight = min_snr_weight(cfg.objective, self.schedule.snr(t), cfg.min_snr_gamma)
                per_image = per_image * weight.to(per_image)
            loss = per_image.mean()
            acc.backward(loss)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.ema is not None and acc.sync_gradients:
            self._update_ema(step)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def _update_ema(self, step: int):
        t = step - self.config.ema_start
        decay = min(self.config.ema_decay, (1 + t) / (10 + t)) if t >= 0 else 0.0
        net = self.accelerator.unwrap_model(self.net)
        torch._foreach_lerp_(list(self.ema.parameters()), list(net.parameters()), 1.0 - decay)
        for ema_buffer, buffer in zip(self.ema.buffers(), net.buffers()):
            ema_buffer.copy_(buffer)

    def _to_device(self, batch: dict) -> dict:
        return {k: t.to(self.device, non_blocking=True) if torch.is_tensor(t) else t for k, t in batch.items()}

    # -- sampling -----------------------------------------------------------------------------

    def _sampling_net(self):
        return self.ema if self.ema is not None else self.accelerator.unwrap_model(self.net)

    @torch.no_grad()
    def denoise(self, x, batch, start: int, generator=None, steps=None):
        """Run the configured sampler from x at timestep ``start`` down to the clean image, under the
        conditions of ``batch``. ``generator`` (CPU) draws the samplers' noise; None: the global RNG."""
        cfg = self.config
        check_guidance(cfg.guidance_scale, self.conditional, self.cond_name)
        net = self._sampling_net()
        was_training = net.training
        net.eval()
        try:
            predict = predictor(net, self.schedule, cfg.objective, self.cond.condition(batch), conditioner=self.cond,
                                guidance_scale=cfg.guidance_scale, clip=cfg.clip_denoised)
            out = run_sampler(cfg.sampler, self.schedule, predict, x.to(self.device), start,
                              steps=steps or cfg.sampling_steps, eta=cfg.eta, generator=generator)
        finally:
            net.train(was_training)
        return out.clamp(-1, 1).float().contiguous()

    def sample(self, batch):
        """The fixed noise, conditioned on the first ``sample_count`` conditions of ``batch``."""
        count = self.config.sample_count
        batch = self._to_device({k: t[:count] if torch.is_tensor(t) else t for k, t in batch.items()})
        n = batch_size(batch) if getattr(self.cond, "fields", ()) else count
        rng = torch.Generator().manual_seed(self.seed + 1)
        return {"image": self.denoise(self.fixed_noise[:n], batch, self.schedule.T - 1, rng)}

    @property
    def condition_fields(self) -> tuple:
        return tuple(getattr(self.cond, "fields", ()))

    def generate(self, batch, seeds=None):
        """Images for the conditions in ``batch``; with ``seeds`` image i's starting noise comes
        from a generator seeded with ``seeds[i]`` (the samplers' later noise from ``seeds[0]``)."""
        batch = self._to_device(batch)
        n = batch_size(batch)
        shape = (1, 3, self.size, self.size)
        if seeds is None:
            return self.denoise(torch.randn(n, *shape[1:]), batch, self.schedule.T - 1)
        seeds = [int(s) for s in seeds]
        if len(seeds) != n:
            raise HandforgeError(f"task 'diffusion': {len(seeds)} seeds for a batch of {n} conditions")
        noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return self.denoise(noise, batch, self.schedule.T - 1, torch.Generator().manual_seed(seeds[0]))

    def variations(self, individuals, others, count, *, strength, generator):
        """Pose-conditioned: each individual's noise under ``count`` other poses. Otherwise SDEdit
        (Meng et al. 2022): one generated image per individual, re-noised to timestep
        strength * (T - 1) with ``count`` different noises and denoised under the same label."""
        if not 0 < strength <= 1:
            raise HandforgeError(f"--strength must be in (0, 1], got {strength}")
        individuals, others = self._to_device(individuals), self._to_device(others)
        k, size, last = batch_size(individuals), self.size, self.schedule.T - 1
        noise = torch.randn(k, 3, size, size, generator=generator)
        if getattr(self.cond, "spatial", False) or "keypoints" in self.condition_fields:
            images = self.denoise(noise.repeat_interleave(count, dim=0), others, last, generator)
        else:
            base = self.denoise(noise, individuals, last, generator).repeat_interleave(count, dim=0)
            start = max(0, round(strength * last))
            fresh = torch.randn(base.shape, generator=generator).to(self.device)
            x = self.schedule.q_sample(base, torch.full((base.shape[0],), start), fresh)
            steps = max(1, round(self.config.sampling_steps * strength))
            images = self.denoise(x, others, start, generator, steps=steps)
        return images.reshape(k, count, 3, size, size)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self):
        if self.ema is None:
            return {}
        return {f"ema.{k}": t.detach().contiguous() for k, t in self.ema.state_dict().items()}

    def load_state_dict(self, state):
        part = {k.removeprefix("ema."): t for k, t in state.items() if k.startswith("ema.")}
        if self.ema is not None and part:
            self.ema.load_state_dict(part)

    def export_modules(self):
        modules = {"denoiser": self.accelerator.unwrap_model(self.net)}
        if self.ema is not None:
            modules["denoiser_ema"] = self.ema
        return modules
