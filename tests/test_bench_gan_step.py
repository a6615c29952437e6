"""bench/gan_step.py's same-run StudioGAN peer (bench/_studiogan_peer.py) and its profile
(bench/_step_profile.py).

The peer tests need a PyTorch-StudioGAN checkout: STUDIOGAN_SRC=PATH (the checkout or its src/);
skipped without one. Nothing of StudioGAN is in this repository.
"""
import os
import sys

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import _step_profile  # noqa: E402
import _studiogan_peer  # noqa: E402
import gan_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
STUDIOGAN_SRC = os.environ.get("STUDIOGAN_SRC")
needs_studiogan = pytest.mark.skipif(not STUDIOGAN_SRC, reason="set STUDIOGAN_SRC to a PyTorch-StudioGAN checkout")


def test_source_dir_refuses_a_folder_that_is_not_a_studiogan_checkout(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PyTorch-StudioGAN checkout"):
        _studiogan_peer.source_dir(str(tmp_path))


def test_stub_modules_stand_in_only_for_the_listed_roots():
    finder = _studiogan_peer._StubFinder(["not_installed_pkg_for_test"])
    assert finder.find_spec("not_installed_pkg_for_test.sub") is not None
    assert finder.find_spec("torch") is None
    module = finder.create_module(finder.find_spec("not_installed_pkg_for_test"))
    assert isinstance(module.Anything, type)  # `from x import Anything` works, and does nothing


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = spectral_norm(nn.Conv2d(3, 8, 3, padding=1))
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 1)

    def forward(self, x):
        x = self.bn(self.conv(x)).relu().contiguous(memory_format=torch.channels_last)
        return self.fc(x.mean((2, 3)))


def test_profile_puts_the_time_of_one_step_into_the_categories():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(4, 3, 16, 16)

    def step():
        opt.zero_grad()
        model(x).mean().backward()
        opt.step()

    result = _step_profile.profile_step(step, [model])
    cats = {c["category"]: c for c in result["categories"]}
    for name in ("conv", "spectral norm", "batchnorm", "linear / embedding", "optimizer step"):
        assert cats[name]["ms"] > 0, name
    assert cats["conv"]["backward_ms"] > 0  # backward ops charged to their forward op's category
    assert cats["spectral norm"]["backward_ms"] > 0
    assert abs(sum(c["share"] for c in result["categories"]) - 1) < 1e-6
    assert result["top_ops"] and "| category |" in _step_profile.markdown(result, "t")


@needs_studiogan
def test_studiogan_models_have_the_expected_counts_and_its_iteration_trains():
    peer = _studiogan_peer.StudioGan(STUDIOGAN_SRC, 4, gan_step.N_CLASSES, gan_step.STUDIOGAN_OVERRIDES)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(peer.G), count(peer.D)) == (gan_step.STUDIOGAN_PARAMS["generator"],
                                             gan_step.STUDIOGAN_PARAMS["discriminator"])
    settings = peer.settings()
    assert (settings["g_cond_mtd"], settings["d_cond_mtd"], settings["adv_loss"]) == ("cBN", "PD", "hinge")
    assert settings["attn_g_loc"] == [3] and settings["attn_d_loc"] == [1]  # 32 px at 64 px
    assert all(m.__file__.startswith(peer.sg.src) for m in (peer.sg.big_resnet, peer.sg.misc))
    before = [p.detach().clone() for p in (*peer.G.parameters(), *peer.D.parameters())]
    batch = gan_step.make_batch(64, 4)
    logs = peer.step(batch, 0)
    assert all(torch.isfinite(v) for v in logs.values())
    after = list((*peer.G.parameters(), *peer.D.parameters()))
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > len(before) // 2  # both nets stepped


def test_allocator_states_and_the_default_environment():
    import _allocator
    from handforge import entry

    assert _allocator.allocator_state({**entry.TUNED, entry.MARKER: "1"}) == "tuned"
    assert _allocator.allocator_state({"PATH": "/usr/bin"}) == "default"
    assert _allocator.allocator_state({"LD_PRELOAD": "libtcmalloc.so"}) == "user"
    clean = _allocator.default_environment({"PATH": "/usr/bin", **entry.TUNED, entry.MARKER: "1"})
    assert clean == {"PATH": "/usr/bin", entry.OPT_OUT: "0"}  # and handforge's entry will not tune it again
    assert entry.tuned_environment(clean, libc="glibc", system="Linux") is None
