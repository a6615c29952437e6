"""Gradient penalties on the discriminator: R1 (Mescheder et al. 2018) and WGAN-GP (Gulrajani et al. 2017).

Both differentiate the discriminator's logits with respect to its *input* image with
``torch.autograd.grad(create_graph=True)``, so the penalty's own gradient reaches the
discriminator's weights when the task backpropagates the total D loss. Only the input's gradient
is asked for: no parameter ``.grad`` is written here, which keeps DistributedDataParallel's
reducer (it hooks the parameters' gradient accumulation) working unchanged under the later
``backward``.

``D(x, cond)`` may return logits (N,) or ``(logits, aux)`` when its conditioner has an auxiliary
head; the penalties use the logits only.
"""
import torch


def logits_of(output) -> torch.Tensor:
    """The adversarial logits of a discriminator's output (drop an auxiliary head's output)."""
    return output[0] if isinstance(output, tuple) else output


def input_gradient(D, x: torch.Tensor, cond) -> torch.Tensor:
    """d(sum of D's logits)/dx for a batch x, kept differentiable (each sample's logit depends on its
    own image only, so summing gives every sample's gradient at once)."""
    x = x.detach().requires_grad_(True)
    logits = logits_of(D(x, cond))
    # In fp32: under fp16 autocast an unscaled input gradient can underflow.
    (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
    return grad


def r1(D, real: torch.Tensor, cond) -> torch.Tensor:
    """E[||grad_x D(x)||^2] over real images (without the gamma / 2 factor)."""
    return input_gradient(D, real, cond).square().flatten(1).sum(1).mean()


def interpolate(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """e * real + (1 - e) * fake with e ~ U(0, 1) per sample, drawn first from the global RNG
    (seeded per process by the run loop)."""
    e = torch.rand((real.shape[0],) + (1,) * (real.ndim - 1), device=real.device, dtype=real.dtype)
    return e * real.detach() + (1 - e) * fake.detach()


def gradient_penalty(D, real: torch.Tensor, fake: torch.Tensor, cond) -> torch.Tensor:
    """E[(||grad D(x_hat)||_2 - 1)^2] at random interpolates x_hat of real and fake (without lambda).

    ``cond`` goes to D unchanged: labels are shared by real and fake, and a spatial conditioner's
    maps are the real images' (fakes take the real batch's conditions).
    """
    grad = input_gradient(D, interpolate(real, fake), cond)
    return (grad.flatten(1).norm(2, dim=1) - 1).square().mean()
