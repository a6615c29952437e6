"""The thin GAN path: label conditioners, the deep_conv backbone, the gan task (losses: test_losses.py)."""
import math
import types

import pytest
import torch
import torch.nn as nn

from handforge.errors import HandforgeError
from handforge.plugin_manager import PluginHost, PluginInfo
from handforge.plugins.backbones import deep_conv
from handforge.plugins.backbones.deep_conv import DeepConvConfig, build_deep_conv
from handforge.plugins.conditioners import label
from handforge.plugins.conditioners.label import ClassBatchNorm, NoCondition, Projection
from handforge.plugins.losses import adversarial
from handforge.plugins.tasks import gan
from handforge.plugins.tasks.gan import GanConfig, GanTask

# -- conditioners -------------------------------------------------------------------------------


def test_cbn_at_init_is_plain_batchnorm():
    torch.manual_seed(0)
    cbn, bn = ClassBatchNorm(role="generator", n_classes=5).norm(6), nn.BatchNorm2d(6)
    x, y = torch.randn(8, 6, 4, 4) * 3 + 1, torch.randint(0, 5, (8,))
    torch.testing.assert_close(cbn(x, y), bn(x))
    torch.testing.assert_close(cbn.bn.running_mean, bn.running_mean)


def randomized_cbn(n_classes=5, features=6):
    torch.manual_seed(1)
    cbn = ClassBatchNorm(role="generator", n_classes=n_classes).norm(features)
    nn.init.normal_(cbn.gain.weight, 1.0, 0.5)
    nn.init.normal_(cbn.bias.weight, 0.0, 0.5)
    return cbn


def test_cbn_output_depends_on_label():
    cbn, x = randomized_cbn(), torch.randn(4, 6, 4, 4)
    a, b = cbn(x, torch.tensor([0, 1, 2, 3])), cbn(x, torch.tensor([4, 1, 2, 3]))
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1:], b[1:])
    # Per channel, the output is gain[y] * normalized + bias[y]: check one sample by hand.
    normalized = cbn.bn(x)
    expected = normalized[0] * cbn.gain.weight[4][:, None, None] + cbn.bias.weight[4][:, None, None]
    torch.testing.assert_close(b[0], expected)


def test_cbn_sample_depends_on_its_own_label_only_in_eval():
    cbn = randomized_cbn()
    cbn(torch.randn(16, 6, 4, 4) * 2, torch.randint(0, 5, (16,)))  # populate running statistics
    cbn.eval()
    x = torch.randn(4, 6, 4, 4)
    a, b = cbn(x, torch.tensor([0, 1, 2, 3])), cbn(x, torch.tensor([0, 4, 4, 0]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


def test_projection_head_by_hand():
    torch.manual_seed(2)
    head = Projection(role="discriminator", n_classes=3).head(5)
    h, y = torch.randn(4, 5), torch.tensor([0, 2, 1, 2])
    w, bias, embed = head.linear.weight[0], head.linear.bias[0], head.embed.weight
    expected = torch.stack([h[i] @ w + bias + h[i] @ embed[y[i]] for i in range(4)])
    torch.testing.assert_close(head(h, y), expected)


def test_projection_head_with_spectral_norm_is_finite_and_conditional():
    head = Projection(role="discriminator", n_classes=3).head(5, spectral_norm=True)
    h = torch.randn(2, 5)
    out0, out1 = head(h, torch.tensor([0, 0])), head(h, torch.tensor([1, 1]))
    assert out0.shape == (2,) and torch.isfinite(out0).all() and not torch.allclose(out0, out1)


def test_none_conditioner_reads_nothing():
    for role in ("generator", "discriminator"):
        cond = NoCondition(role=role, n_classes=0)
        assert cond.fields == () and cond.condition({"image": torch.zeros(1)}) is None
    assert NoCondition(role="discriminator").head(4)(torch.randn(3, 4), None).shape == (3,)


@pytest.mark.parametrize("cls, name, role", [(ClassBatchNorm, "cbn", "discriminator"),
                                              (Projection, "projection", "generator")])
def test_conditioner_on_the_wrong_side_raises(cls, name, role):
    with pytest.raises(HandforgeError, match=rf"'{name}'.*{role}"):
        cls(role=role, n_classes=3)


def test_label_conditioner_without_classes_raises():
    with pytest.raises(HandforgeError, match="cbn.*class"):
        ClassBatchNorm(role="generator", n_classes=0)


# -- deep_conv ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("conditional", [False, True])
def test_deep_conv_shapes(size, conditional):
    torch.manual_seed(0)
    n_classes, config = 3, DeepConvConfig(ch=4, z_dim=16)
    g_cond = (ClassBatchNorm if conditional else NoCondition)(role="generator", n_classes=n_classes)
    d_cond = (Projection if conditional else NoCondition)(role="discriminator", n_classes=n_classes)
    G = build_deep_conv(config, role="generator", image_size=size, n_classes=n_classes, conditioner=g_cond)
    D = build_deep_conv(config, role="discriminator", image_size=size, n_classes=n_classes, conditioner=d_cond)
    y = torch.tensor([0, 2]) if conditional else None
    x = G(torch.randn(2, G.z_dim) * 3, y)
    assert G.z_dim == 16 and x.shape == (2, 3, size, size)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
    logits = D(x, y)
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    assert len(G.convs) == len(D.downs) == int(math.log2(size // 4))


def test_deep_conv_widths_and_spectral_norm():
    assert deep_conv.widths(32, 64) == [512, 256, 128, 64]
    assert deep_conv.widths(128, 8) == [64, 64, 64, 32, 16, 8]
    cond = NoCondition(role="discriminator")
    with_sn = build_deep_conv(DeepConvConfig(ch=4), role="discriminator", image_size=32, conditioner=cond)
    without = build_deep_conv(DeepConvConfig(ch=4, spectral_norm=False), role="discriminator",
                              image_size=32, conditioner=cond)
    assert nn.utils.parametrize.is_parametrized(with_sn.downs[0])
    assert not nn.utils.parametrize.is_parametrized(without.downs[0])


@pytest.mark.parametrize("size", [0, 4, 48])
def test_deep_conv_rejects_bad_sizes(size):
    with pytest.raises(HandforgeError, match="power-of-two"):
        build_deep_conv(DeepConvConfig(), role="generator", image_size=size, conditioner=NoCondition(role="generator"))


# -- the gan task -------------------------------------------------------------------------------


from gan_support import TinyHands, changed, component, make_run, snapshot, unchanged  # noqa: E402,F401  (other tests import them from here)


@pytest.mark.parametrize("conditional", [False, True])
def test_gan_train_step_updates_both_networks(conditional):
    torch.manual_seed(0)
    task, run, batches = make_run(conditional)
    G, D = task.export_modules()["generator"], task.export_modules()["discriminator"]
    g0, d0 = snapshot(G), snapshot(D)
    logs = task.train_step(next(batches), step=0)
    assert set(logs) == {"d_loss", "g_loss", "d_real", "d_fake"}
    assert all(t.ndim == 0 and torch.isfinite(t) and not t.requires_grad for t in logs.values())
    assert changed(g0, G) and changed(d0, D)
    assert all(p.requires_grad for p in D.parameters())  # toggled back on after the G step


def test_gan_ema_follows_generator_with_lag():
    torch.manual_seed(0)
    task, run, batches = make_run(gan_config=GanConfig(ema_decay=0.9, sample_count=4))
    G, ema = task.export_modules()["generator"], task.export_modules()["generator_ema"]
    ema0 = snapshot(ema)
    for step in range(3):
        task.train_step(next(batches), step)
    assert changed(ema0, ema)
    assert not all(torch.equal(a, b) for a, b in zip(ema.parameters(), G.parameters()))
    for a, b in zip(ema.buffers(), G.buffers()):
        torch.testing.assert_close(a, b)
    # ema = d * ema + (1 - d) * G, d = min(ema_decay, (1 + t) / (10 + t)): 0.25 at t = 2, 0.9 at t = 100.
    for step, decay in ((2, 0.25), (100, 0.9)):
        before = snapshot(ema)
        task.train_step(next(batches), step)
        for old, new, g in zip(before, ema.parameters(), G.parameters()):
            torch.testing.assert_close(new, decay * old + (1 - decay) * g)
    # Before ema_start the EMA is a copy of G.
    task.config = GanConfig(ema_decay=0.9, ema_start=100)
    task.train_step(next(batches), step=3)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), G.parameters()))


def test_gan_d_steps_take_extra_batches_and_augment_is_applied():
    calls = []

    class CountingFlip(nn.Module):
        def __init__(self, config, *, image_size, **_):
            super().__init__()
            assert image_size == 16

        def forward(self, x):
            calls.append(x.shape)
            return x.flip(3)

    task, run, batches = make_run(gan_config=GanConfig(d_steps=2, sample_count=4), augment=CountingFlip)
    extra, next_batch = [], run.next_batch
    run.next_batch = lambda: extra.append(1) or next_batch()
    task.train_step(next(batches), step=0)
    assert len(calls) == 5  # 2 x (real, fake) for D, then fake for G
    assert len(extra) == 1  # the second D step's real batch


def test_gan_discriminator_updates_under_gradient_accumulation():
    torch.manual_seed(0)
    task, run, batches = make_run(accumulation=2)
    G, D = task.export_modules()["generator"], task.export_modules()["discriminator"]
    g0, d0 = snapshot(G), snapshot(D)
    task.train_step(next(batches), step=0)
    assert unchanged(g0, G) and unchanged(d0, D)  # gradients accumulate, no update yet
    task.train_step(next(batches), step=1)
    assert changed(g0, G) and changed(d0, D)


def test_gan_sample_generate_and_state():
    task, run, batches = make_run(gan_config=GanConfig(sample_count=6))
    batch = next(batches)
    images = task.sample(batch)["image"]
    assert images.shape == (6, 3, 16, 16) and images.abs().max() <= 1
    torch.testing.assert_close(task.sample(batch)["image"], images)  # fixed noise
    assert task.generate(batch).shape == (8, 3, 16, 16)
    assert task.ema.training is False and task.export_modules()["generator"].training is True

    state = task.state_dict()
    assert state and all(k.startswith("ema.") and torch.is_tensor(t) and t.is_contiguous() for k, t in state.items())
    other, _, _ = make_run(gan_config=GanConfig(sample_count=6))
    assert not torch.allclose(other.sample(batch)["image"], images)
    other.load_state_dict(state)
    torch.testing.assert_close(other.sample(batch)["image"], images)


def test_gan_unconditional_sample_uses_all_fixed_noise_and_no_ema():
    task, run, batches = make_run(conditional=False, gan_config=GanConfig(ema_decay=0.0, sample_count=12))
    assert task.sample(next(batches))["image"].shape == (12, 3, 16, 16)
    assert task.state_dict() == {} and set(task.export_modules()) == {"generator", "discriminator"}


def test_gan_config_validates():
    assert GanConfig(betas=[0.5, 0.99]).betas == (0.5, 0.99)
    for bad in (dict(d_steps=0), dict(ema_decay=1.0), dict(betas=(0.0, 1.5)), dict(sample_count=0)):
        with pytest.raises(ValueError):
            GanConfig(**bad)


def test_gan_rejects_non_square_images():
    with pytest.raises(HandforgeError, match="square"):
        GanTask._image_size(types.SimpleNamespace(image_size=(32, 64)))
    assert GanTask._image_size([{"image": torch.zeros(3, 8, 8)}]) == 8


# -- registration -------------------------------------------------------------------------------


def test_modules_register_like_plugins():
    host = PluginHost()
    for module in (deep_conv, label, adversarial, gan):
        host._add(module, PluginInfo(module.__name__, "builtin", "handforge", "0"), fatal=True)
    assert host.registry("backbone").get("deep_conv").config_cls is DeepConvConfig
    assert host.registry("conditioner").names() == ["cbn", "none", "projection"]
    assert host.registry("conditioner").get("cbn").fields_needed(None) == {"label"}
    assert host.registry("loss").names() == ["hinge", "logistic", "lsgan", "nonsaturating", "wgan_gp"]
    task = host.registry("task").get("gan")
    assert task.fields_needed(None) == {"image"}
    assert [s.name for s in task.info["slots"]] == [
        "generator", "discriminator", "g_conditioner", "d_conditioner", "loss", "augment"]
    for registry in host.registries.values():
        assert all(entry.summary for entry in registry)


# -- learning -----------------------------------------------------------------------------------


class ColorClasses(TinyHands):
    """Class k is a noisy image whose channel k is bright and the others dark."""

    def __init__(self, n=512, size=16):
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 3
        self.images = torch.full((n, 3, size, size), -0.8)
        self.images[torch.arange(n), self.labels] = 0.8
        self.images = (self.images + 0.1 * torch.randn(self.images.shape, generator=generator)).clamp(-1, 1)


@pytest.mark.slow
def test_conditional_gan_learns_class_colors():
    torch.manual_seed(0)
    task, run, _ = make_run(gan_config=GanConfig(sample_count=9, ema_decay=0.99), ch=16, dataset=ColorClasses())
    loader = torch.utils.data.DataLoader(run.dataset, batch_size=32, shuffle=True, drop_last=True)
    for step, batch in enumerate(b for _ in range(25) for b in loader):  # 400 steps
        task.train_step(batch, step)
    colors = task.sample({"label": torch.tensor([0, 1, 2] * 3)})["image"].mean(dim=(2, 3)).view(3, 3, 3).mean(0)
    # colors[class, channel]: channel k is brightest in the images of class k (all of 6 seeds tried pass at 300)
    assert colors.argmax(dim=0).tolist() == [0, 1, 2]


def test_tasks_built_without_a_config_get_their_defaults():
    from handforge.plugins.tasks.classifier import ClassifierConfig, ClassifierTask
    from handforge.plugins.tasks.keypoints import KeypointsConfig, KeypointsTask

    for task, config in ((GanTask, GanConfig), (ClassifierTask, ClassifierConfig), (KeypointsTask, KeypointsConfig)):
        assert task().config == config()
        given = config()
        assert task(given).config is given
    assert ClassifierTask().best_step == -1  # its own state survives the shared constructor
