"""One gan iteration against BigGAN's iteration written out by hand, with and without ``reuse_fakes``.

The reference is the textbook loop (as StudioGAN runs it): noise, fakes without a graph, the hinge
D loss, D's Adam step; then, by default, new noise and a second G forward for the G step. With
``reuse_fakes`` the G step takes the D step's fakes instead. Same seed, same starting weights:
every weight and buffer of both networks must match after the step.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from handforge.plugins.tasks.gan import GanConfig
from gan_support import make_run

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_iteration(G, D, batch, g_cond, d_cond, z_dim, reuse):
    """(g_loss, d_loss) of one hand-written iteration; updates G and D in place."""
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.0, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.0, 0.999))
    n, real = batch["image"].shape[0], batch["image"]
    with torch.set_grad_enabled(reuse):
        fake = G(torch.randn(n, z_dim), g_cond)
    d_loss = F.relu(1 - D(real, d_cond)).mean() + F.relu(1 + D(fake.detach(), d_cond)).mean()
    d_loss.backward()
    opt_d.step()
    D.requires_grad_(False)
    if not reuse:
        fake = G(torch.randn(n, z_dim), g_cond)
    g_loss = -D(fake, d_cond).mean()
    g_loss.backward()
    opt_g.step()
    return g_loss.detach(), d_loss.detach()


@pytest.mark.parametrize("reuse", [False, True])
def test_iteration_matches_the_hand_written_loop(reuse):
    task, run, batches = make_run(gan_config=GanConfig(sample_count=4, ema_decay=0.0, reuse_fakes=reuse))
    modules = task.export_modules()
    G, D = modules["generator"], modules["discriminator"]
    G_ref, D_ref = copy.deepcopy(G), copy.deepcopy(D)
    batch = next(batches)
    g_cond, d_cond = task.g_cond.condition(batch), task.d_cond.condition(batch)

    forwards = []
    G.register_forward_hook(lambda *_: forwards.append(1))
    torch.manual_seed(11)
    logs = task.train_step(batch, step=0)
    torch.manual_seed(11)
    g_loss, d_loss = reference_iteration(G_ref, D_ref, batch, g_cond, d_cond, task.z_dim, reuse)

    assert len(forwards) == (1 if reuse else 2)
    torch.testing.assert_close(logs["d_loss"], d_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["g_loss"], g_loss, rtol=1e-5, atol=1e-6)
    for ours, theirs in ((G, G_ref), (D, D_ref)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_reuse_changes_the_iteration():
    """The option is a different iteration, not a cheaper way to the same numbers."""
    results = []
    for reuse in (False, True):
        task, run, batches = make_run(gan_config=GanConfig(sample_count=4, ema_decay=0.0, reuse_fakes=reuse))
        torch.manual_seed(11)
        task.train_step(next(batches), step=0)
        results.append([p.detach().clone() for p in task.export_modules()["generator"].parameters()])
    assert not all(torch.equal(a, b) for a, b in zip(*results))
