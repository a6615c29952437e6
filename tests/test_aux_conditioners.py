"""Label conditioners acgan, d2dce (ReACGAN) and cadain, against hand-computed and loop references."""
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from handforge.errors import HandforgeError
from handforge.plugin_manager import PluginHost, PluginInfo
from handforge.plugins.backbones.deep_conv import DeepConvConfig, build_deep_conv
from handforge.plugins.conditioners import auxiliary
from handforge.plugins.conditioners.auxiliary import (
    AcganConfig, AuxClassifier, D2dceConfig, DataToDataCE, LatentLabel, d2d_ce)
from handforge.plugins.conditioners.base import BatchNorm
from handforge.recipe import structure


pytestmark = pytest.mark.usefixtures("one_thread")


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(a):
    n = math.sqrt(dot(a, a))
    return [x / n for x in a]


def d2d_ce_reference(embed, proxy, labels, tau, m_p, m_n):
    """Kang et al. 2021, eq. 7, one sample at a time in plain Python (lists of floats)."""
    total = 0.0
    for i, (f_i, y_i) in enumerate(zip(embed, labels)):
        positive = min(dot(f_i, proxy[i]) - m_p, 0.0) / tau
        negatives = [max(dot(f_i, f_j) - m_n, 0.0) / tau
                     for j, (f_j, y_j) in enumerate(zip(embed, labels)) if j != i and y_j != y_i]
        total += -math.log(math.exp(positive) / (math.exp(positive) + sum(math.exp(n) for n in negatives)))
    return total / len(labels)


def d2d(embed, proxy, labels, tau, m_p, m_n):
    return d2d_ce(torch.tensor(embed, dtype=torch.float64), torch.tensor(proxy, dtype=torch.float64),
                  torch.tensor(labels), temperature=tau, margin_positive=m_p, margin_negative=m_n).item()


# -- registration and roles ---------------------------------------------------------------------


def test_registration_through_the_hook():
    host = PluginHost()
    host._add(auxiliary, PluginInfo("auxiliary", "builtin", "handforge", "0"), fatal=True)
    registry = host.registry("conditioner")
    expected = {"acgan": (AuxClassifier, AcganConfig), "d2dce": (DataToDataCE, D2dceConfig),
                "cadain": (LatentLabel, None)}
    for name, (factory, config_cls) in expected.items():
        entry = registry.get(name)
        assert entry.factory is factory and entry.config_cls is config_cls
        assert entry.fields_needed(config_cls() if config_cls else None) == {"label"}
        assert entry.summary


@pytest.mark.parametrize("cls, name, role", [(AuxClassifier, "acgan", "generator"),
                                              (DataToDataCE, "d2dce", "generator"),
                                              (LatentLabel, "cadain", "discriminator")])
def test_conditioner_on_the_wrong_side_raises(cls, name, role):
    with pytest.raises(HandforgeError, match=rf"'{name}'.*{role}"):
        cls(role=role, n_classes=3)


@pytest.mark.parametrize("cls, role", [(AuxClassifier, "discriminator"), (DataToDataCE, "discriminator"),
                                       (LatentLabel, "generator")])
def test_without_classes_raises(cls, role):
    with pytest.raises(HandforgeError, match="class"):
        cls(role=role, n_classes=0)


def attrs_tuple(c):
    return (c.weight, c.temperature, c.margin_positive, c.margin_negative, c.embed_dim)


def test_configs_defaults_and_validation():
    assert attrs_tuple(D2dceConfig()) == (0.5, 0.5, 0.98, 0.02, 512)  # StudioGAN's CIFAR10 ReACGAN
    assert AcganConfig().weight == 1.0
    for bad in ({"temperature": 0.0}, {"weight": -1.0}, {"margin_positive": 1.5}, {"embed_dim": 0}):
        with pytest.raises(ValueError):
            D2dceConfig(**bad)
    problems = []
    assert structure({"temperature": 0.25, "embed_dim": 64}, D2dceConfig, "d", problems).temperature == 0.25
    structure({"temperature": "0.5", "margin": 0.1}, D2dceConfig, "model.d_conditioner", problems)
    assert any("temperature" in p for p in problems) and any("margin" in p for p in problems)


# -- acgan --------------------------------------------------------------------------------------


def test_acgan_head_and_losses_by_hand():
    torch.manual_seed(0)
    cond = AuxClassifier(AcganConfig(weight=0.7), role="discriminator", n_classes=3)
    head = cond.head(4)
    h, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 2, 0])
    logits, class_logits = head(h, y)
    w, b = head.linear.weight[0], head.linear.bias[0]
    wc, bc = head.classifier.weight, head.classifier.bias
    torch.testing.assert_close(logits, torch.stack([h[i] @ w + b for i in range(5)]))
    torch.testing.assert_close(class_logits, torch.stack([wc @ h[i] + bc for i in range(5)]))
    rows, labels = class_logits.tolist(), y.tolist()
    expected = sum(math.log(sum(math.exp(c) for c in row)) - row[k] for row, k in zip(rows, labels)) / 5
    assert cond.d_aux_loss(class_logits, y).item() == pytest.approx(0.7 * expected, rel=1e-5)
    assert cond.g_aux_loss(class_logits, y).item() == pytest.approx(0.7 * expected, rel=1e-5)


def test_acgan_head_with_spectral_norm_trains_the_classifier():
    torch.manual_seed(1)
    cond = AuxClassifier(role="discriminator", n_classes=4)
    head = cond.head(8, spectral_norm=True)
    h, y = torch.randn(16, 8), torch.arange(16) % 4
    loss = cond.d_aux_loss(head(h, y)[1], y)
    loss.backward()
    grads = [p.grad for p in head.classifier.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)


# -- d2dce: the loss ----------------------------------------------------------------------------


def test_d2dce_small_case_by_hand():
    """3 samples, 2 classes, 2-D; tau = 1, m_p = 1, m_n = 0, so every term is active."""
    r = 1 / math.sqrt(2)
    embed = [[1.0, 0.0], [0.0, 1.0], [r, r]]
    labels = [0, 0, 1]
    v = [[1.0, 0.0], [0.0, 1.0]]  # class proxies
    proxy = [v[y] for y in labels]
    # i=0: f.v = 1 -> p = 0; its only negative is sample 2 (f0.f2 = r).
    l0 = -0.0 + math.log(math.exp(0.0) + math.exp(r))
    # i=1: f.v0 = 0 -> p = -1; sample 0 shares its class (masked), sample 2: f1.f2 = r.
    l1 = 1.0 + math.log(math.exp(-1.0) + math.exp(r))
    # i=2: f.v1 = r -> p = r - 1; negatives samples 0 and 1, both at r.
    l2 = (1 - r) + math.log(math.exp(r - 1) + 2 * math.exp(r))
    expected = (l0 + l1 + l2) / 3
    assert d2d(embed, proxy, labels, 1.0, 1.0, 0.0) == pytest.approx(expected, rel=1e-12)
    assert d2d_ce_reference(embed, proxy, labels, 1.0, 1.0, 0.0) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("tau, m_p, m_n", [(0.5, 0.98, 0.02), (0.75, 1.0, 0.0), (0.1, 0.5, 0.3), (2.0, -0.2, 0.9)])
def test_d2dce_matches_the_loop_reference(tau, m_p, m_n):
    rng = random.Random(7)
    for n, classes, dim in [(7, 3, 4), (5, 5, 3), (9, 2, 6)]:
        embed = [unit([rng.gauss(0, 1) for _ in range(dim)]) for _ in range(n)]
        v = [unit([rng.gauss(0, 1) for _ in range(dim)]) for _ in range(classes)]
        labels = [rng.randrange(classes) for _ in range(n)]
        proxy = [v[y] for y in labels]
        expected = d2d_ce_reference(embed, proxy, labels, tau, m_p, m_n)
        assert d2d(embed, proxy, labels, tau, m_p, m_n) == pytest.approx(expected, rel=1e-10)


def test_d2dce_every_label_layout_of_four_matches_reference():
    """Exhaustive over label patterns of 4 samples: masking is right for every class layout."""
    rng = random.Random(11)
    embed = [unit([rng.gauss(0, 1) for _ in range(3)]) for _ in range(4)]
    v = [unit([rng.gauss(0, 1) for _ in range(3)]) for _ in range(3)]
    for labels in itertools.product(range(3), repeat=4):
        proxy = [v[y] for y in labels]
        expected = d2d_ce_reference(embed, proxy, list(labels), 0.3, 0.6, 0.1)
        assert d2d(embed, proxy, list(labels), 0.3, 0.6, 0.1) == pytest.approx(expected, rel=1e-10)


def test_d2dce_at_its_optimum_counts_only_other_class_negatives():
    """Each sample on its proxy, classes orthogonal: L_i = log(1 + |other-class samples|).

    Same-class pairs have similarity 1 > m_n: were they not masked, they would add exp((1 - m_n)/tau).
    """
    labels = [0, 0, 0, 1, 2, 2]
    basis = torch.eye(3, dtype=torch.float64)
    embed = basis[labels]
    loss = d2d_ce(embed, embed, torch.tensor(labels), temperature=0.5, margin_positive=0.98, margin_negative=0.02)
    counts = [sum(y_j != y_i for y_j in labels) for y_i in labels]
    assert loss.item() == pytest.approx(sum(math.log(1 + c) for c in counts) / len(labels), rel=1e-12)


def test_d2dce_gradient_of_sample_term_ignores_same_class_partner():
    """d L / d f_1 has no contribution from sample 0's term: compare against the loop reference."""
    torch.manual_seed(4)
    labels = torch.tensor([0, 0, 1])
    embed = F.normalize(torch.randn(3, 3, dtype=torch.float64), dim=1).requires_grad_(True)
    proxy = F.normalize(torch.randn(3, 3, dtype=torch.float64), dim=1)
    kwargs = dict(temperature=0.5, margin_positive=1.0, margin_negative=-1.0)  # every term active
    d2d_ce(embed, proxy, labels, **kwargs).backward()
    # Sample 1 appears in: its own term and sample 2's negatives, not in sample 0's (same class).
    f, v, tau = embed.detach(), proxy, 0.5
    p1 = ((f[1] @ v[1]) - 1.0) / tau
    n12 = (f[1] @ f[2] + 1.0) / tau
    n21 = (f[2] @ f[1] + 1.0) / tau
    n20 = (f[2] @ f[0] + 1.0) / tau
    p2 = ((f[2] @ v[2]) - 1.0) / tau
    # L1 = -p1 + log(e^p1 + e^n12); L2 = -p2 + log(e^p2 + e^n20 + e^n21)
    s1 = torch.softmax(torch.stack([p1, n12]), 0)
    s2 = torch.softmax(torch.stack([p2, n20, n21]), 0)
    grad_f1 = (-(v[1]) / tau + s1[0] * v[1] / tau + s1[1] * f[2] / tau + s2[2] * f[2] / tau) / 3
    torch.testing.assert_close(embed.grad[1], grad_f1)


def test_d2dce_gradients_finite_in_edge_cases():
    for labels in ([0, 0, 0, 0], [2], [0, 1, 2, 1]):  # no negatives at all, a batch of one, mixed
        torch.manual_seed(5)
        cond = DataToDataCE(D2dceConfig(embed_dim=6), role="discriminator", n_classes=3)
        head = cond.head(8, spectral_norm=True)
        h = torch.randn(len(labels), 8) * 1e3  # large features: the embeddings are normalised anyway
        h[0] = 0.0  # and a zero feature vector
        y = torch.tensor(labels)
        logits, aux = head(h, y)
        loss = cond.d_aux_loss(aux, y) + cond.g_aux_loss(aux, y) + logits.mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
    assert cond.d_aux_loss(aux, y).item() > 0


def test_d2dce_head_outputs_unit_vectors_and_weighted_loss():
    torch.manual_seed(6)
    cond = DataToDataCE(D2dceConfig(weight=0.3, embed_dim=5, temperature=0.25), role="discriminator", n_classes=4)
    head = cond.head(7)
    h, y = torch.randn(6, 7), torch.tensor([0, 1, 1, 3, 2, 0])
    logits, (embed, proxy) = head(h, y)
    torch.testing.assert_close(logits, head.linear(h).squeeze(1))
    torch.testing.assert_close(embed.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(proxy, F.normalize(head.proxy.weight[y], dim=1))
    torch.testing.assert_close(embed, F.normalize(head.embed(h), dim=1))
    expected = d2d_ce_reference(embed.tolist(), proxy.tolist(), y.tolist(), 0.25, 0.98, 0.02)
    assert cond.d_aux_loss((embed, proxy), y).item() == pytest.approx(0.3 * expected, rel=1e-5)


def test_d2dce_training_separates_classes():
    """A few Adam steps on fixed separable features drive the loss toward its optimum."""
    torch.manual_seed(7)
    cond = DataToDataCE(D2dceConfig(weight=1.0, embed_dim=8), role="discriminator", n_classes=3)
    head = cond.head(6)
    y = torch.arange(24) % 3
    h = F.one_hot(y, 6).float() * 3 + torch.randn(24, 6) * 0.1
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    start = cond.d_aux_loss(head(h, y)[1], y).item()
    for _ in range(60):
        loss = cond.d_aux_loss(head(h, y)[1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    optimum = math.log(1 + 16)  # every sample has 16 other-class samples
    assert loss.item() < start and loss.item() == pytest.approx(optimum, abs=0.05)


# -- cadain -------------------------------------------------------------------------------------


def test_cadain_latent_is_a_normalised_one_hot():
    cond = LatentLabel(role="generator", n_classes=5)
    y = torch.tensor([4, 0, 2])
    latent = cond.latent(y)
    assert cond.latent_dim == 5 and latent.shape == (3, 5) and latent.dtype == torch.float32
    torch.testing.assert_close(latent, F.one_hot(y, 5).float() * math.sqrt(5))
    torch.testing.assert_close(latent.square().mean(dim=1), torch.ones(3))  # unit second moment, like z
    assert isinstance(cond.norm(6), BatchNorm) and cond.head(4) is not None


def test_cadain_in_deep_conv_conditions_only_through_the_label():
    torch.manual_seed(8)
    n_classes, z_dim = 4, 16
    cond = LatentLabel(role="generator", n_classes=n_classes)
    G = build_deep_conv(DeepConvConfig(ch=4, z_dim=z_dim), role="generator", image_size=32,
                        n_classes=n_classes, conditioner=cond)
    assert G.linear.in_features == z_dim + n_classes and G.z_dim == z_dim
    G(torch.randn(8, z_dim), torch.arange(8) % n_classes)  # running statistics
    G.eval()
    z = torch.randn(3, z_dim)
    a, b = G(z, torch.tensor([0, 1, 2])), G(z, torch.tensor([3, 1, 2]))
    assert not torch.allclose(a[0], b[0])  # the label changes sample 0 ...
    torch.testing.assert_close(a[1:], b[1:])  # ... and nothing else
    torch.testing.assert_close(G(z, torch.tensor([0, 1, 2])), a)
    # The first layer is an embedding of the label added to a linear map of z.
    y = torch.tensor([3, 1, 2])
    w, bias = G.linear.weight, G.linear.bias
    expected = z @ w[:, :z_dim].T + bias + math.sqrt(n_classes) * w[:, z_dim + y].T
    torch.testing.assert_close(G.linear(torch.cat([z, cond.latent(y)], 1)), expected)
    # The embedding lives in the generator: the label columns receive gradients.
    G.train()
    G(z, y).mean().backward()
    assert G.linear.weight.grad[:, z_dim + 3].abs().sum() > 0 and G.linear.weight.grad[:, z_dim].abs().sum() == 0


# -- heads in the deep_conv discriminator -------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("cls, config", [(AuxClassifier, AcganConfig()), (DataToDataCE, D2dceConfig(embed_dim=16))])
def test_aux_heads_in_deep_conv(cls, config, size):
    torch.manual_seed(9)
    n_classes = 3
    cond = cls(config, role="discriminator", n_classes=n_classes, image_size=size)
    D = build_deep_conv(DeepConvConfig(ch=4), role="discriminator", image_size=size,
                        n_classes=n_classes, conditioner=cond)
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 1])
    out = D(x, y)
    assert isinstance(out, tuple) and len(out) == 2
    logits, aux = out
    assert logits.shape == (4,) and torch.isfinite(logits).all()
    if cls is AuxClassifier:
        assert aux.shape == (4, n_classes)
    else:
        assert [t.shape for t in aux] == [(4, 16), (4, 16)]
    loss = cond.d_aux_loss(aux, y) + cond.g_aux_loss(aux, y)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in D.from_rgb.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert cond.condition({"image": x, "label": y}) is y

