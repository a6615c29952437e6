"""Classifier-free guidance (Ho & Salimans 2022) and the denoiser as the samplers see it."""
import torch

from handforge.errors import HandforgeError
from handforge.threads import batch_on_threads

from .schedules import eps_from_x0, to_x0_eps


def guide(conditional, unconditional, scale: float):
    """uncond + scale (cond - uncond): scale 1 is the conditional prediction, 0 the unconditional."""
    return unconditional + scale * (conditional - unconditional)


def check_guidance(scale: float, conditional: bool, conditioner_name: str):
    if scale != 1.0 and not conditional:
        raise HandforgeError(
            f"task.guidance_scale = {scale}: classifier-free guidance needs a conditional model, but "
            f"conditioner '{conditioner_name}' is unconditional (set task.guidance_scale = 1, or train with "
            f"a label or pose conditioner)")


def predictor(net, schedule, objective, cond, *, conditioner=None, guidance_scale=1.0, clip=True):
    """``predict(x, t) -> (x0, eps)`` for the samplers: the network's output under ``objective``,
    guided with ``conditioner.drop`` as the null condition when ``guidance_scale`` != 1."""
    null = None
    if guidance_scale != 1.0:
        def null_of(n, device):
            return conditioner.drop(cond, torch.ones(n, dtype=torch.bool, device=device))

    def predict(x, t):
        nonlocal null
        # rows are independent in eval mode: on CPU, a slice of them per thread (handforge.threads)
        output = batch_on_threads(net, x, t, cond).float()
        if guidance_scale != 1.0:
            if null is None:
                null = null_of(x.shape[0], x.device)
            output = guide(output, batch_on_threads(net, x, t, null).float(), guidance_scale)
        a, s = schedule.coefficients(t, x)
        x0, eps = to_x0_eps(objective, x, output, a, s)
        if clip:
            # Clamped x0, and the noise that goes with it (as denoising-diffusion-pytorch does).
            x0 = x0.clamp(-1, 1)
            eps = eps_from_x0(x, x0, a, s)
        return x0, eps

    return predict
