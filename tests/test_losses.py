"""Adversarial losses and their penalties, against closed forms and independent gradient computations."""
import math

import pytest
import torch
import torch.nn as nn

from handforge.plugin_manager import PluginHost, PluginInfo
from handforge.plugins.losses import adversarial
from handforge.plugins.losses.adversarial import (Hinge, Logistic, LogisticConfig, NonSaturating, NonSaturatingConfig,
                                                  WganGp, WganGpConfig)

REAL = [2.0, 0.5, -1.0, 0.0]
FAKE = [-2.0, 0.3, 1.5, -0.7]


def softplus(x):
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# -- d_loss / g_loss by hand ----------------------------------------------------------------------


def test_hinge_matches_closed_form():
    loss, real, fake = Hinge(), torch.tensor(REAL), torch.tensor(FAKE)
    expected_d = sum(max(0.0, 1 - r) for r in REAL) / 4 + sum(max(0.0, 1 + f) for f in FAKE) / 4
    assert loss.d_loss(real, fake).item() == pytest.approx(expected_d)  # (0+.5+2+1)/4 + (0+1.3+2.5+.3)/4
    assert loss.g_loss(fake).item() == pytest.approx(-sum(FAKE) / 4)
    assert not hasattr(loss, "d_penalty")


@pytest.mark.parametrize("cls", [NonSaturating, Logistic])
def test_nonsaturating_and_logistic_match_closed_form(cls):
    loss, real, fake = cls(), torch.tensor(REAL), torch.tensor(FAKE)
    expected_d = -sum(math.log(sigmoid(r)) for r in REAL) / 4 - sum(math.log(1 - sigmoid(f)) for f in FAKE) / 4
    expected_g = -sum(math.log(sigmoid(f)) for f in FAKE) / 4
    assert loss.d_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-5)
    assert loss.g_loss(fake).item() == pytest.approx(expected_g, rel=1e-5)
    assert expected_g == pytest.approx(sum(softplus(-f) for f in FAKE) / 4)


def test_wgan_losses_by_hand():
    real, fake = torch.tensor(REAL), torch.tensor(FAKE)
    plain = WganGp()
    # mean(fake) - mean(real) = (-0.9 / 4) - (1.5 / 4)
    assert plain.d_loss(real, fake).item() == pytest.approx(-0.225 - 0.375)
    assert plain.g_loss(fake).item() == pytest.approx(0.225)
    drifting = WganGp(WganGpConfig(drift=0.001))
    # + 0.001 * mean(real^2) = 0.001 * (4 + 0.25 + 1 + 0) / 4
    assert drifting.d_loss(real, fake).item() == pytest.approx(-0.6 + 0.001 * 5.25 / 4)
    assert drifting.g_loss(fake).item() == pytest.approx(0.225)


def test_defaults():
    assert NonSaturating().config == NonSaturatingConfig(r1_gamma=0.0, r1_interval=16)
    assert Logistic().config == LogisticConfig(r1_gamma=10.0, r1_interval=16)
    assert WganGp().config == WganGpConfig(gp_lambda=10.0, drift=0.0)
    for bad in (lambda: NonSaturatingConfig(r1_gamma=-1.0), lambda: NonSaturatingConfig(r1_interval=0),
                lambda: LogisticConfig(r1_interval=0), lambda: WganGpConfig(gp_lambda=-1.0),
                lambda: WganGpConfig(drift=-0.1)):
        with pytest.raises(ValueError):
            bad()


# -- penalties ------------------------------------------------------------------------------------


class Quadratic(nn.Module):
    """D(x, c) = c * sum_j (w_j x_j^2 + v_j x_j): its input gradient is c * (2 w x + v), by hand."""

    def __init__(self, shape, aux=False):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.w = nn.Parameter(torch.randn(shape, generator=generator))
        self.v = nn.Parameter(torch.randn(shape, generator=generator))
        self.aux = aux

    def forward(self, x, cond=None):
        scale = 1.0 if cond is None else cond.view(-1, *([1] * (x.ndim - 1)))
        logits = (scale * (self.w * x.square() + self.v * x)).flatten(1).sum(1)
        return (logits, x.mean(dim=(1, 2, 3))) if self.aux else logits

    def gradient(self, x, cond=None):
        scale = 1.0 if cond is None else cond.view(-1, 1, 1, 1)
        return (scale * (2 * self.w * x + self.v)).detach()


def images(n=5, seed=0):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def tiny_conv_d():
    torch.manual_seed(1)
    return nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)), nn.Tanh(),
                         nn.Conv2d(4, 2, 3, stride=2, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(8, 1))


class ConvD(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_conv_d()

    def forward(self, x, cond=None):
        return self.net(x).squeeze(1)


def per_sample_gradients(D, x, cond=None):
    """Each sample's input gradient from its own backward (a second implementation, no batching)."""
    grads = []
    for i in range(len(x)):
        xi = x[i: i + 1].clone().requires_grad_(True)
        out = D(xi, None if cond is None else cond[i: i + 1])
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        grads.append(xi.grad[0])
    D.zero_grad(set_to_none=True)
    return torch.stack(grads)


def test_r1_equals_gradient_norm_by_hand():
    D, x, cond = Quadratic((3, 4, 4)), images(), torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5])
    loss = NonSaturating(NonSaturatingConfig(r1_gamma=3.0, r1_interval=1))
    expected = 3.0 / 2 * D.gradient(x, cond).square().sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss.d_penalty(D, x, None, cond, step=7), expected)


def test_r1_on_a_conv_discriminator_equals_per_sample_gradients():
    D, x = ConvD(), images(seed=1)
    grads = per_sample_gradients(D, x)
    loss = NonSaturating(NonSaturatingConfig(r1_gamma=2.0, r1_interval=1))
    torch.testing.assert_close(loss.d_penalty(D, x, None, None, step=0), grads.square().sum(dim=(1, 2, 3)).mean())


def test_r1_penalty_gradient_reaches_the_discriminator():
    # d/dw of mean_i ||2 w x_i + v||^2 = mean_i 2 (2 w x_i + v) 2 x_i: the penalty is differentiable in w.
    D, x = Quadratic((3, 4, 4)), images()
    NonSaturating(NonSaturatingConfig(r1_gamma=2.0, r1_interval=1)).d_penalty(D, x, None, None, 0).backward()
    g = 2 * D.w.detach() * x + D.v.detach()
    torch.testing.assert_close(D.w.grad, (4 * g * x).mean(0))
    torch.testing.assert_close(D.v.grad, (2 * g).mean(0))
    assert x.grad is None  # the caller's images are not touched


def test_r1_is_lazy():
    D, x = Quadratic((3, 4, 4)), images()
    every = NonSaturating(NonSaturatingConfig(r1_gamma=1.0, r1_interval=1)).d_penalty(D, x, None, None, 0)
    lazy = NonSaturating(NonSaturatingConfig(r1_gamma=1.0, r1_interval=4))
    assert [lazy.d_penalty(D, x, None, None, s) is None for s in range(9)] == [
        False, True, True, True, False, True, True, True, False]
    torch.testing.assert_close(lazy.d_penalty(D, x, None, None, 8), 4 * every)  # scaled by the interval
    assert all(NonSaturating().d_penalty(D, x, None, None, s) is None for s in range(33))  # gamma 0: off


def test_logistic_has_lazy_r1_on():
    D, x = Quadratic((3, 4, 4)), images()
    loss = Logistic()
    assert loss.d_penalty(D, x, None, None, 3) is None
    expected = 16 * 10.0 / 2 * D.gradient(x).square().sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss.d_penalty(D, x, None, None, 32), expected)
    assert Logistic(LogisticConfig(r1_gamma=0.0)).d_penalty(D, x, None, None, 0) is None


def test_wgan_gp_equals_direct_computation():
    D, real, fake = Quadratic((3, 4, 4)), images(seed=1), images(seed=2)
    cond = torch.tensor([1.0, 0.5, -1.0, 2.0, 1.0])
    torch.manual_seed(42)
    penalty = WganGp(WganGpConfig(gp_lambda=7.0)).d_penalty(D, real, fake, cond, step=0)
    torch.manual_seed(42)
    e = torch.rand(5, 1, 1, 1)
    x_hat = e * real + (1 - e) * fake
    norms = D.gradient(x_hat, cond).flatten(1).norm(dim=1)
    torch.testing.assert_close(penalty, 7.0 * ((norms - 1) ** 2).mean())


def test_wgan_gp_on_a_conv_discriminator_with_aux_output():
    class WithAux(ConvD):
        def forward(self, x, cond=None):
            return super().forward(x), x.mean()

    D, real, fake = WithAux(), images(seed=1), images(seed=2)
    torch.manual_seed(3)
    penalty = WganGp().d_penalty(D, real, fake, None, step=5)
    penalty.backward()
    assert all(p.grad is not None for p in D.parameters() if p.ndim > 1)  # biases of the last layer: no effect on it
    torch.manual_seed(3)
    e = torch.rand(5, 1, 1, 1)
    grads = per_sample_gradients(D, e * real + (1 - e) * fake)
    torch.testing.assert_close(penalty, 10.0 * ((grads.flatten(1).norm(dim=1) - 1) ** 2).mean())
    assert WganGp(WganGpConfig(gp_lambda=0.0)).d_penalty(D, real, fake, None, 0) is None


def test_interpolates_do_not_backpropagate_into_the_images():
    D = Quadratic((3, 4, 4))
    real, fake = images().requires_grad_(True), images(seed=3).requires_grad_(True)
    WganGp().d_penalty(D, real, fake, None, 0).backward()
    assert real.grad is None and fake.grad is None and D.w.grad is not None


# -- registration ---------------------------------------------------------------------------------


def test_losses_register_with_their_configs():
    host = PluginHost()
    host._add(adversarial, PluginInfo(adversarial.__name__, "builtin", "handforge", "0"), fatal=True)
    registry = host.registry("loss")
    assert registry.names() == ["hinge", "logistic", "lsgan", "nonsaturating", "wgan_gp"]
    assert [registry.get(n).config_cls for n in registry.names()] == [
        None, LogisticConfig, None, NonSaturatingConfig, WganGpConfig]
    assert all(entry.summary for entry in registry)
    assert registry.get("logistic").factory(None).config.r1_gamma == 10.0
