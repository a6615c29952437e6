"""The baselines of bench/gan_step.py: our modules run the way PyTorch-StudioGAN runs them on CPU.

Nothing in plugins/ is changed: the modules of a built ``gan`` task are converted after setup.

``force_nchw(*modules)``
    Undoes our channels_last: every 4-D parameter and buffer goes back to
    ``torch.contiguous_format``, and a forward pre-hook on every submodule makes its 4-D tensor
    arguments contiguous. The hooks are needed because the backbones' forwards and the task's
    ``train_step`` convert activations and the real images to channels_last themselves; a hook
    is a no-op (``contiguous()`` returns the tensor) once a tensor is NCHW, so after the first
    layer the only copies left are those channels_last producers. ``layout_census`` checks it.

``StudioGanLoop(task)``
    One iteration as StudioGAN's ``train_discriminator`` / ``train_generator`` do it, on the
    task's (NCHW-converted) modules, conditioners and loss, without Accelerate:

    - D step: G's parameters frozen (StudioGAN's ``toggle_grad``), fakes generated without a
      graph into G; D on real and on fake; D loss; backward; Adam step.
    - G step: D frozen, new noise and the fakes generated again (a second G forward, as in our
      task's default iteration; ``reuse_fakes`` saves it); D on them; G loss; backward; Adam step.
    - EMA generator updated parameter by parameter (StudioGAN's ``Ema.update``), buffers copied.

    One departure keeps the math comparable with our task, at the same cost: the fakes take the
    real batch's labels (StudioGAN draws random labels). Noise is drawn in our task's order (the
    D step's, then the G step's), so the first iteration's losses match ours to float tolerance.
"""
import torch
import torch.nn as nn

from handforge.plugins.tasks.gan import split_output


def _contiguous_args(module, args):
    return tuple(a.contiguous() if torch.is_tensor(a) and a.dim() == 4 else a for a in args)


def force_nchw(*modules: nn.Module) -> None:
    for module in modules:
        if module is None:
            continue
        module.to(memory_format=torch.contiguous_format)
        for sub in module.modules():
            sub.register_forward_pre_hook(_contiguous_args)


class layout_census:
    """Counts the memory formats of every Conv2d output under the given modules while active:
    ``counts == {"channels_last": a, "contiguous": b, "other": c}``."""

    def __init__(self, *modules: nn.Module):
        self.convs = [m for module in modules for m in module.modules() if isinstance(m, nn.Conv2d)]
        self.counts = {"channels_last": 0, "contiguous": 0, "other": 0}

    def _hook(self, module, args, out):
        if out.is_contiguous():
            self.counts["contiguous"] += 1
        elif out.is_contiguous(memory_format=torch.channels_last):
            self.counts["channels_last"] += 1
        else:
            self.counts["other"] += 1

    def __enter__(self):
        self.handles = [conv.register_forward_hook(self._hook) for conv in self.convs]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


class StudioGanLoop:
    """``step(batch, iteration) -> logs`` on ``task``'s modules, StudioGAN's way (see the module doc)."""

    def __init__(self, task):
        modules = task.export_modules()
        self.G, self.D, self.ema = modules["generator"], modules["discriminator"], modules.get("generator_ema")
        self.g_cond, self.d_cond, self.loss, self.z_dim = task.g_cond, task.d_cond, task.loss, task.z_dim
        cfg = self.config = task.config
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.g_lr, betas=cfg.betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.d_lr, betas=cfg.betas)

    def __call__(self, batch, iteration):
        G, D, loss = self.G, self.D, self.loss
        real = batch["image"]
        g_cond, d_cond = self.g_cond.condition(batch), self.d_cond.condition(batch)

        G.requires_grad_(False)
        z = torch.randn(real.shape[0], self.z_dim)
        fake = G(z, g_cond)
        real_logits, real_aux = split_output(D(real, d_cond))
        fake_logits, _ = split_output(D(fake, d_cond))
        d_loss = loss.d_loss(real_logits, fake_logits)
        d_total = d_loss if real_aux is None else d_loss + self.d_cond.d_aux_loss(real_aux, d_cond)
        self.opt_d.zero_grad()
        d_total.backward()
        self.opt_d.step()

        G.requires_grad_(True)
        D.requires_grad_(False)
        fake_logits_g, fake_aux = split_output(D(G(torch.randn(real.shape[0], self.z_dim), g_cond), d_cond))
        g_loss = loss.g_loss(fake_logits_g)
        g_total = g_loss if fake_aux is None else g_loss + self.d_cond.g_aux_loss(fake_aux, d_cond)
        self.opt_g.zero_grad()
        g_total.backward()
        self.opt_g.step()
        D.requires_grad_(True)

        if self.ema is not None:
            self._update_ema(iteration)
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(),
                "d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean()}

    @torch.no_grad()
    def _update_ema(self, iteration):
        t = iteration - self.config.ema_start  # our task's decay schedule, so both EMAs hold the same weights
        decay = min(self.config.ema_decay, (1 + t) / (10 + t)) if t >= 0 else 0.0
        for p_ema, p in zip(self.ema.parameters(), self.G.parameters()):
            p_ema.copy_(p.lerp(p_ema, decay))
        for b_ema, b in zip(self.ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)
