"""The ``diffusion`` task's recipe keys (``[task]``). The sampling keys (sampler, sampling_steps,
eta, guidance_scale, clip_denoised) are read at sampling time only, so ``attrs.evolve`` of a trained
run's config picks another sampler without retraining."""
import attrs
from attrs import validators as v

from .samplers import SAMPLERS
from .schedules import OBJECTIVES, SCHEDULES


@attrs.define
class DiffusionConfig:
    lr: float = attrs.field(default=1e-4, validator=v.gt(0.0))
    betas: tuple[float, float] = attrs.field(  # Adam
        default=(0.9, 0.99), converter=tuple, validator=v.deep_iterable(v.and_(v.ge(0.0), v.lt(1.0))))
    num_timesteps: int = attrs.field(default=1000, validator=v.ge(2))
    schedule: str = attrs.field(default="cosine", validator=v.in_(SCHEDULES))
    objective: str = attrs.field(default="pred_v", validator=v.in_(OBJECTIVES))
    min_snr_gamma: float = attrs.field(default=0.0, validator=v.ge(0.0), metadata={
        "help": "min-SNR-gamma loss weighting (Hang et al. 2023, gamma = 5 there); 0 = off (plain MSE)"})
    cond_drop: float = attrs.field(default=0.1, validator=[v.ge(0.0), v.lt(1.0)], metadata={
        "help": "classifier-free guidance: share of training rows whose condition becomes the null one "
                "(ignored by unconditional models)"})
    # EMA denoiser (the seed: 0.995); 0 = none. Decay warms up as min(ema_decay, (1 + t) / (10 + t)).
    ema_decay: float = attrs.field(default=0.995, validator=[v.ge(0.0), v.lt(1.0)])
    ema_start: int = attrs.field(default=0, validator=v.ge(0))
    sample_count: int = attrs.field(default=64, validator=v.ge(1))
    sampler: str = attrs.field(default="ddim", validator=v.in_(SAMPLERS), metadata={
        "help": "sampling only: ddpm (num_timesteps evaluations), ddim or dpm_solver (sampling_steps each)"})
    sampling_steps: int = attrs.field(default=50, validator=v.ge(1))
    eta: float = attrs.field(default=0.0, validator=v.ge(0.0), metadata={
        "help": "sampling only, ddim: 0 = deterministic, 1 = DDPM's variance"})
    guidance_scale: float = attrs.field(default=1.0, validator=v.ge(0.0), metadata={
        "help": "sampling only: classifier-free guidance, uncond + scale (cond - uncond); 1 = off"})
    clip_denoised: bool = True  # clamp x0 predictions to [-1, 1] while sampling
