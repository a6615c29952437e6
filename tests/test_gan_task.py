"""The gan task's extensions: penalties, auxiliary heads, spatial augmentation, augmentation state,
truncation and standing statistics (the basic step, EMA and sampling: test_gan_components.py)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from handforge.errors import HandforgeError
from handforge.plugins.conditioners.base import Conditioner
from handforge.plugins.losses.adversarial import (Hinge, Logistic, NonSaturating, NonSaturatingConfig, WganGp,
                                                  WganGpConfig)
from handforge.plugins.tasks.gan import GanConfig
from handforge.plugins.tasks.sampling import truncate
from test_gan_components import changed, component, make_run, snapshot, unchanged
from conftest import debug_launch_in_fresh_python


pytestmark = pytest.mark.usefixtures("one_thread")


def loss_component(name, cls, config=None):
    return component("loss", name, cls, config)


def networks(task):
    modules = task.export_modules()
    return modules["generator"], modules["discriminator"]


# -- losses and penalties inside the task -----------------------------------------------------------

LOSSES = {
    "hinge": (Hinge, None),
    "nonsaturating_r1": (NonSaturating, NonSaturatingConfig(r1_gamma=1.0, r1_interval=1)),
    "logistic": (Logistic, None),
    "wgan_gp": (WganGp, WganGpConfig(drift=0.001)),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_one_step_with_each_loss_updates_both_networks(name):
    torch.manual_seed(0)
    cls, config = LOSSES[name]
    task, run, batches = make_run(loss=loss_component(name, cls, config))
    G, D = networks(task)
    g0, d0 = snapshot(G), snapshot(D)
    logs = task.train_step(next(batches), step=0)
    expected = {"d_loss", "g_loss", "d_real", "d_fake"} | ({"d_penalty"} if name != "hinge" else set())
    assert set(logs) == expected
    assert all(t.ndim == 0 and torch.isfinite(t) and not t.requires_grad for t in logs.values())
    assert changed(g0, G) and changed(d0, D)
    if name != "hinge":
        assert logs["d_penalty"] > 0


def test_lazy_r1_is_logged_on_due_steps_only():
    task, run, batches = make_run(loss=loss_component("logistic", Logistic))
    assert [("d_penalty" in task.train_step(next(batches), step)) for step in (0, 1, 15, 16)] == [
        True, False, False, True]


class SpyLoss:
    """No adversarial gradient at all (zero terms); the penalty is a plain R1 and records its arguments."""

    def __init__(self, config=None, **_):
        self.calls, self.off = [], False

    def d_loss(self, real_logits, fake_logits):
        return 0 * (real_logits.sum() + fake_logits.sum())

    def g_loss(self, fake_logits):
        return 0 * fake_logits.sum()

    def d_penalty(self, D, real, fake, cond, step):
        self.calls.append(dict(real=real.clone(), fake=fake, cond=cond, step=step))
        if self.off:
            return None
        return NonSaturating(NonSaturatingConfig(r1_gamma=10.0, r1_interval=1)).d_penalty(D, real, fake, cond, step)


class Flip(nn.Module):
    def __init__(self, config=None, **_):
        super().__init__()

    def forward(self, images):
        return images.flip(3)


def test_penalty_gets_what_d_saw_and_alone_moves_d():
    torch.manual_seed(0)
    task, run, batches = make_run(loss=loss_component("spy", SpyLoss), augment=Flip,
                                  gan_config=GanConfig(d_steps=2, sample_count=4))
    G, D = networks(task)
    first = next(batches)
    d0 = snapshot(D)
    logs = task.train_step(first, step=3)
    calls = task.loss.calls
    assert [c["step"] for c in calls] == [6, 7]  # iteration * d_steps + i
    torch.testing.assert_close(calls[0]["real"], first["image"].flip(3))  # augmented, as D saw them
    torch.testing.assert_close(calls[0]["cond"], first["label"])
    assert not calls[0]["fake"].requires_grad and calls[0]["fake"].shape == first["image"].shape
    assert logs["d_penalty"] > 0 and logs["d_loss"] == 0
    assert changed(d0, D)  # only the penalty had a gradient

    task.loss.off = True
    d1, g1 = snapshot(D), snapshot(G)
    assert "d_penalty" not in task.train_step(next(batches), step=4)
    assert unchanged(d1, D) and unchanged(g1, G)  # zero gradients: Adam does not move


# -- auxiliary heads --------------------------------------------------------------------------------


class AuxHead(nn.Module):
    def __init__(self, num_features, n_classes):
        super().__init__()
        self.linear, self.classify = nn.Linear(num_features, 1), nn.Linear(num_features, n_classes)

    def forward(self, h, cond):
        return self.linear(h).squeeze(1), self.classify(h)


class AuxClassifier(Conditioner):
    """ACGAN-like test conditioner: D's head also classifies; cross-entropy on both sides."""

    name, roles, fields = "test_aux", ("discriminator",), ("label",)
    calls = []

    def head(self, num_features, *, spectral_norm=False):
        return AuxHead(num_features, self.n_classes)

    def d_aux_loss(self, aux, cond):
        self.calls.append(("d", aux.shape, cond.clone(), aux.requires_grad))
        return F.cross_entropy(aux, cond)

    def g_aux_loss(self, aux, cond):
        self.calls.append(("g", aux.shape, cond.clone(), aux.requires_grad))
        return F.cross_entropy(aux, cond)


def test_aux_losses_reach_d_and_g():
    torch.manual_seed(0)
    AuxClassifier.calls = []
    task, run, batches = make_run(loss=loss_component("spy", SpyLoss),
                                  d_conditioner=component("conditioner", "test_aux", AuxClassifier))
    task.loss.off = True  # no adversarial or penalty gradient: whatever moves, the aux losses moved
    G, D = networks(task)
    g0, head0 = snapshot(G), snapshot(D.head.classify)
    batch = next(batches)
    logs = task.train_step(batch, step=0)
    assert {"d_aux", "g_aux"} <= set(logs) and logs["d_aux"] > 0 and logs["g_aux"] > 0
    assert [c[0] for c in AuxClassifier.calls] == ["d", "g"]
    for kind, shape, cond, requires_grad in AuxClassifier.calls:
        assert shape == (8, 3) and requires_grad
        torch.testing.assert_close(cond, batch["label"])
    assert changed(head0, D.head.classify)  # D's aux head learnt from d_aux
    assert changed(g0, G)  # G learnt from g_aux, through D's aux head


def test_aux_losses_leave_the_adversarial_head_alone():
    # The adversarial head's weights have zero gradient (zero loss); the aux head's are non-zero.
    AuxClassifier.calls = []
    task, run, batches = make_run(loss=loss_component("spy", SpyLoss),
                                  d_conditioner=component("conditioner", "test_aux", AuxClassifier))
    task.loss.off = True
    G, D = networks(task)
    linear0 = snapshot(D.head.linear)
    task.train_step(next(batches), step=0)
    assert unchanged(linear0, D.head.linear)


# -- augmentation: maps, observe/log, state ---------------------------------------------------------


class LabelMaps(Conditioner):
    """A spatial test conditioner: the label as a (N, 1, H, W) map whose left half is label + 1, right half 0."""

    name, roles, fields, spatial, input_channels = "test_maps", ("discriminator",), ("label",), True, 1
    seen = []

    def condition(self, batch):
        labels, size = batch["label"], batch["image"].shape[-1]
        maps = torch.zeros(len(labels), 1, size, size)
        maps[..., : size // 2] = labels.float().view(-1, 1, 1, 1) + 1
        return maps

    def merge_input(self, x, cond):
        self.seen.append(cond.clone())
        return torch.cat([x, cond], 1)


class FlipBoth(nn.Module):
    """Flips images and maps together; counts ADA-like statistics into a buffer."""

    def __init__(self, config=None, **_):
        super().__init__()
        self.register_buffer("p", torch.zeros(()))
        self.calls, self.observed = [], []

    def forward(self, images, maps=None):
        self.calls.append(maps)
        return images.flip(3) if maps is None else (images.flip(3), maps.flip(3))

    def observe(self, real_logits):
        self.observed.append(real_logits)
        self.p += real_logits.sign().mean()

    def log(self):
        return {"aug_p": self.p}


def test_spatial_conditioner_maps_are_augmented_with_the_images():
    LabelMaps.seen = []
    task, run, batches = make_run(augment=FlipBoth,
                                  d_conditioner=component("conditioner", "test_maps", LabelMaps))
    batch = next(batches)
    task.train_step(batch, step=0)
    maps = LabelMaps(role="discriminator", n_classes=3).condition(batch)
    assert len(task.augment.calls) == 3 and all(m is not None for m in task.augment.calls)
    torch.testing.assert_close(task.augment.calls[0], maps)
    assert len(LabelMaps.seen) == 3  # real, fake (D step), fake (G step): all flipped maps
    for seen in LabelMaps.seen:
        torch.testing.assert_close(seen, maps.flip(3))
        assert (seen[..., :8] == 0).all()  # the bright half moved to the right


def test_augment_without_map_support_is_refused_for_spatial_conditioners():
    with pytest.raises(HandforgeError, match="test_aug.*test_maps.*maps"):
        make_run(augment=Flip, d_conditioner=component("conditioner", "test_maps", LabelMaps))


def test_augment_observes_real_logits_logs_and_round_trips_its_state(tmp_path):
    torch.manual_seed(0)
    task, run, batches = make_run(augment=FlipBoth, gan_config=GanConfig(d_steps=2, sample_count=4))
    logs = task.train_step(next(batches), step=0)
    observed = task.augment.observed
    assert len(observed) == 2 and all(o.shape == (8,) and not o.requires_grad for o in observed)
    p = sum(o.sign().mean() for o in observed)
    assert p != 0 and logs["aug_p"].item() == pytest.approx(p.item())
    assert logs["aug_p"].ndim == 0 and logs["aug_p"].device == task.device

    state = task.state_dict()
    torch.testing.assert_close(state["augment.p"], p)
    save_file(state, str(tmp_path / "task_state.safetensors"))  # as the checkpoint writes it
    other, _, _ = make_run(augment=FlipBoth, gan_config=GanConfig(d_steps=2, sample_count=4))
    assert other.augment.p == 0
    other.load_state_dict(load_file(str(tmp_path / "task_state.safetensors")))
    torch.testing.assert_close(other.augment.p, p)


# -- truncation -------------------------------------------------------------------------------------


def test_truncate_keeps_entries_within_and_redraws_the_rest():
    z = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    out = truncate(z, 1.0, torch.Generator().manual_seed(1))
    inside = z.abs() <= 1.0
    assert out.abs().max() <= 1.0 and torch.equal(out[inside], z[inside]) and not torch.equal(out, z)
    torch.testing.assert_close(truncate(z, 1.0, torch.Generator().manual_seed(1)), out)
    # The result is a truncated normal: E[|z| | |z| <= t] = (phi(0) - phi(t)) / (Phi(t) - 1/2).
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    expected = (phi(0) - phi(1.0)) / (0.5 * math.erf(1 / math.sqrt(2)))
    assert out.abs().mean().item() == pytest.approx(expected, abs=0.01)


def test_truncation_bounds_the_noise_of_sample_and_generate():
    task, run, batches = make_run(gan_config=GanConfig(truncation=0.5, sample_count=6))
    seen = []
    task.ema.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    batch = next(batches)
    first = task.sample(batch)["image"]
    torch.testing.assert_close(task.sample(batch)["image"], first)  # deterministic for the fixed noise
    task.generate(batch)
    assert len(seen) == 3 and all(z.abs().max() <= 0.5 for z in seen)
    inside = task.fixed_z[:6].abs() <= 0.5
    torch.testing.assert_close(seen[0][inside], task.fixed_z[:6][inside])
    with pytest.raises(ValueError, match="truncation"):
        GanConfig(truncation=0.001)


# -- standing statistics ----------------------------------------------------------------------------


def test_standing_stats_recompute_the_sampling_copy_only():
    torch.manual_seed(0)
    task, run, batches = make_run(conditional=False, gan_config=GanConfig(standing_stats=3, sample_count=5))
    for step in range(2):
        task.train_step(next(batches), step)
    G, ema = task.export_modules()["generator"], task.ema
    g_mean, ema_mean = G.norms[0].running_mean.clone(), ema.norms[0].running_mean.clone()
    used = []
    ema.register_forward_pre_hook(lambda module, args: used.append(
        (module, module.training, module.norms[0].running_mean.clone())))
    images = task.sample(next(batches))["image"]

    assert [training for _, training, _ in used] == [True, True, True, False]  # 3 standing batches, then eval
    copy, _, standing_mean = used[-1]
    assert copy is not ema
    torch.testing.assert_close(ema.norms[0].running_mean, ema_mean)  # untouched
    torch.testing.assert_close(G.norms[0].running_mean, g_mean)
    assert not torch.allclose(standing_mean, ema_mean)
    # Independent reference: the first BatchNorm sees linear(z); its cumulative running mean is the
    # average of the per-batch channel means over the three standing batches (same seeded noise).
    rng = torch.Generator().manual_seed(run.recipe.seed + 1)
    with torch.no_grad():
        means = [ema.linear(torch.randn(5, ema.z_dim, generator=rng)).view(5, -1, 4, 4).mean(dim=(0, 2, 3))
                 for _ in range(3)]
    torch.testing.assert_close(standing_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(task.sample(next(batches))["image"], images)  # deterministic


def test_standing_stats_off_uses_the_ema_itself():
    task, run, batches = make_run(conditional=False, gan_config=GanConfig(sample_count=5))
    used = []
    task.ema.register_forward_pre_hook(lambda module, args: used.append(module))
    task.sample(next(batches))
    assert used == [task.ema]


# -- two processes ----------------------------------------------------------------------------------


def _two_process_step():
    torch.set_num_threads(1)
    for name, cls in (("wgan_gp", WganGp), ("logistic", Logistic)):
        task, run, batches = make_run(loss=loss_component(name, cls), augment=FlipBoth)
        acc = task.accelerator
        assert acc.num_processes == 2 and isinstance(task.D, nn.parallel.DistributedDataParallel)
        for _ in range(acc.process_index):  # each process its own data and noise
            next(batches)
        torch.manual_seed(acc.process_index)
        G, D = networks(task)
        d0 = snapshot(D)
        logs = task.train_step(next(batches), step=0)
        assert "d_penalty" in logs and all(torch.isfinite(t) for t in logs.values())
        assert changed(d0, D)
        for module in (G, D):  # gradients were averaged: both processes hold the same weights
            flat = torch.cat([p.detach().flatten() for p in module.parameters()])
            gathered = acc.gather(flat[None])
            torch.testing.assert_close(gathered[0], gathered[1])
        # The augmentation observed both processes' logits: its state is the same everywhere.
        assert task.augment.observed[0].shape == (16,)
        p = acc.gather(task.augment.p[None])
        torch.testing.assert_close(p[0], p[1])


@pytest.mark.slow
def test_penalties_under_ddp_in_two_processes():
    debug_launch_in_fresh_python("test_gan_task", "_two_process_step")
