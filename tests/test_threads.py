"""handforge.threads: pieces of CPU work on Python threads, each op on one torch thread, and a
batch of independent rows cut into one slice per thread."""
import threading

import pytest
import torch

from handforge.plugins.backbones.unet import UnetConfig, build_unet
from handforge.plugins.conditioners.label import ClassBatchNorm
from handforge.plugins.tasks.diffusion.guidance import predictor
from handforge.plugins.tasks.diffusion.schedules import Schedule
from handforge.threads import batch_on_threads, map_single_threaded, split_rows


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_pieces_run_on_python_threads_one_torch_thread_each_in_order(two_threads):
    seen = []
    barrier = threading.Barrier(2, timeout=10)  # passes only if two pieces run at the same time

    def piece(i):
        barrier.wait()
        seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled()))
        return i * i

    with torch.no_grad():
        assert map_single_threaded(piece, [3, 1]) == [9, 1]
    assert len({ident for ident, _, _ in seen}) == 2
    assert all(threads == 1 and not grad for _, threads, grad in seen)
    assert torch.get_num_threads() == 2


def test_thread_count_is_restored_when_a_piece_fails(two_threads):
    def piece(i):
        if i == 1:
            raise ValueError("piece 1")
        return i

    with pytest.raises(ValueError, match="piece 1"):
        map_single_threaded(piece, [0, 1, 2])
    assert torch.get_num_threads() == 2


def test_inference_mode_is_carried_into_the_pieces(two_threads):
    with torch.inference_mode():
        flags = map_single_threaded(lambda _: torch.is_inference_mode_enabled(), [0, 1])
    assert flags == [True, True]


def test_split_rows_cuts_batch_tensors_and_passes_the_rest():
    labels, maps, table = torch.arange(6), torch.randn(6, 2, 4, 4), torch.randn(3, 5)
    cut = split_rows((labels, {"maps": maps, "table": table}, 0.5), slice(2, 5), 6)
    assert torch.equal(cut[0], labels[2:5]) and torch.equal(cut[1]["maps"], maps[2:5])
    assert cut[1]["table"] is table and cut[2] == 0.5


def test_a_unet_batch_on_threads_equals_the_whole_batch(two_threads):
    torch.manual_seed(0)
    cond = ClassBatchNorm(role="denoiser", n_classes=5)
    net = build_unet(UnetConfig(dim=8, dim_mults=[1, 2]), role="denoiser", image_size=32, conditioner=cond).eval()
    for p in net.parameters():  # off their initial values, so every layer changes the output
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(5, 3, 32, 32).contiguous(memory_format=torch.channels_last)  # 5 rows: slices of 3 and 2
    t, labels = torch.tensor([1.0, 200.0, 400.0, 600.0, 999.0]), torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        whole = net(x, t, labels)
        threaded = batch_on_threads(net, x, t, labels)
        torch.set_num_threads(1)
        one, whole_one = batch_on_threads(net, x, t, labels), net(x, t, labels)
    torch.testing.assert_close(threaded, whole, rtol=1e-5, atol=1e-6)
    assert torch.equal(one, whole_one)  # one thread: the call itself
    # the sampler's predictor takes the same path, guidance included
    schedule = Schedule("cosine", 1000)
    torch.set_num_threads(2)
    with torch.no_grad():
        guided = predictor(net, schedule, "pred_v", labels, conditioner=cond, guidance_scale=2.0)(x, t)
        torch.set_num_threads(1)
        expected = predictor(net, schedule, "pred_v", labels, conditioner=cond, guidance_scale=2.0)(x, t)
    for a, b in zip(guided, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_overlapping_calls_restore_the_count_the_first_one_found(two_threads):
    inner_counts = []

    def piece(i):  # a call inside a piece sees one thread and still returns everything
        inner_counts.append(torch.get_num_threads())
        return sum(map_single_threaded(lambda j: j + i, [1, 2]))

    assert map_single_threaded(piece, [10, 20]) == [23, 43]
    assert inner_counts == [1, 1] and torch.get_num_threads() == 2
    results, errors = [], []

    def caller():  # two user threads at once: whichever ends last restores 2
        try:
            results.append(map_single_threaded(lambda j: torch.get_num_threads(), range(4)))
        except Exception as e:  # noqa: BLE001 - re-raised below in the main thread
            errors.append(e)

    callers = [threading.Thread(target=caller) for _ in range(2)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    assert not errors and results == [[1, 1, 1, 1]] * 2
    assert torch.get_num_threads() == 2
