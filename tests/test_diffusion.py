"""The diffusion task: schedules against their closed forms, q_sample by Monte Carlo, the exact
conversions between predictions, min-SNR weights, the samplers (deterministic DDIM, an oracle
denoiser recovers the clean image under every sampler), classifier-free guidance, and the task
(overfitting 8 images, sampler chosen at sampling time, variations, EMA state) with a tiny
denoiser and conditioner defined here."""
import math
import pathlib
import types

import accelerate
import attrs
import numpy as np
import pytest
import torch
import torch.nn as nn

from safetensors.torch import load_file

from conftest import run_cli
from handforge.errors import HandforgeError
from handforge.plugins.tasks.diffusion.config import DiffusionConfig
from handforge.plugins.tasks.diffusion.guidance import guide, predictor
from handforge.plugins.tasks.diffusion.samplers import SAMPLERS, run_sampler, timesteps
from handforge.plugins.tasks.diffusion.schedules import (
    OBJECTIVES, Schedule, eps_from_v, eps_from_x0, min_snr_weight, target, to_x0_eps, v_from, x0_from_eps,
    x0_from_v)
from handforge.plugins.tasks.diffusion.task import DiffusionTask
from handforge.recipe import Component
from handforge.registry import Entry
from handforge.task import RunContext
from handforge.toml_writer import dumps

from diffusion_plugin import LabelCond, NoCond, TinyDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")


# -- schedules -----------------------------------------------------------------------------------

def test_linear_schedule_matches_ddpm_closed_form():
    T = 1000
    betas = np.linspace(1e-4, 0.02, T)
    alpha_bar = np.cumprod(1 - betas)
    s = Schedule("linear", T)
    np.testing.assert_allclose(s.alpha_bar.numpy(), alpha_bar, rtol=1e-12)
    np.testing.assert_allclose(s.snr().numpy(), alpha_bar / (1 - alpha_bar), rtol=1e-10)
    assert s.alpha_bar[-1] == pytest.approx(4.036e-5, rel=1e-3)  # the value DDPM's schedule is known to end at


@pytest.mark.parametrize("name", ["cosine", "sigmoid"])
def test_continuous_schedules_match_closed_forms(name):
    T = 200

    def closed(u):  # alpha_bar(u), u = (t + 1) / T, written out independently of the module
        if name == "cosine":
            f = lambda w: math.cos((w + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            return f(u) / f(0.0)
        sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
        return (sig(3) - sig(6 * u - 3)) / (sig(3) - sig(-3))

    s = Schedule(name, T)
    expected = np.array([closed((t + 1) / T) for t in range(T)])
    unclipped = s.betas.numpy() < 0.999  # the last betas are clipped as in the papers
    np.testing.assert_allclose(s.alpha_bar.numpy()[unclipped], expected[unclipped], rtol=1e-9, atol=1e-12)
    snr = s.snr().numpy()
    assert np.all(np.diff(snr) < 0)  # noise grows with t


def test_fractional_time_interpolates_log_alpha_bar():
    s = Schedule("cosine", 100)
    mid = s.at(torch.tensor([10.5]))
    assert float(mid) == pytest.approx(math.sqrt(float(s.alpha_bar[10] * s.alpha_bar[11])), rel=1e-12)
    assert float(s.at(torch.tensor([-1.0]))) == 1.0


def test_q_sample_mean_and_variance_by_monte_carlo():
    s = Schedule("linear", 1000)
    x0 = torch.tensor([[-0.8, 0.1, 0.6]], dtype=torch.float64)
    t = 300
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    noise = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    xt = s.q_sample(x0.expand(n, 3), torch.full((n,), t), noise)
    ab = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t])
    tol = 4 * math.sqrt((1 - ab) / n)
    np.testing.assert_allclose(xt.mean(0).numpy(), math.sqrt(ab) * x0[0].numpy(), atol=tol)
    np.testing.assert_allclose(xt.var(0).numpy(), np.full(3, 1 - ab), rtol=0.02)


# -- conversions and weights ----------------------------------------------------------------------

def test_conversions_between_eps_x0_and_v_are_exact_inverses():
    s = Schedule("cosine", 1000)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    a, sd = s.coefficients(t, x0)
    xt = a * x0 + sd * eps
    v = v_from(x0, eps, a, sd)
    for got, want in [(x0_from_eps(xt, eps, a, sd), x0), (eps_from_x0(xt, x0, a, sd), eps),
                      (x0_from_v(xt, v, a, sd), x0), (eps_from_v(xt, v, a, sd), eps)]:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for objective in OBJECTIVES:
        x0_back, eps_back = to_x0_eps(objective, xt, target(objective, x0, eps, a, sd), a, sd)
        torch.testing.assert_close(x0_back, x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps_back, eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_weighting_is_min_snr_gamma_times_the_x0_error(objective):
    """Hang et al.'s definition: whatever is predicted, the weighted loss is min(SNR, gamma) times
    the squared error of the implied x0."""
    s, gamma = Schedule("cosine", 1000), 5.0
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 50, 300, 700, 990])
    a, sd = s.coefficients(t, x0)
    xt = a * x0 + sd * eps
    truth = target(objective, x0, eps, a, sd)
    output = truth + 0.1 * torch.randn(truth.shape, generator=gen, dtype=torch.float64)
    weighted = min_snr_weight(objective, s.snr(t), gamma) * (output - truth).pow(2).mean(dim=(1, 2, 3))
    x0_err = (to_x0_eps(objective, xt, output, a, sd)[0] - x0).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted, s.snr(t).clamp(max=gamma) * x0_err, rtol=1e-9, atol=1e-12)


# -- samplers --------------------------------------------------------------------------------------

def oracle(schedule, x0, objective):
    """A denoiser that knows the clean image: it outputs exactly what ``objective`` asks for x_t."""
    def net(x, t, cond):
        a, s = schedule.coefficients(t, x)
        return target(objective, x0, (x - a * x0) / s, a, s)
    return net


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("start", [99, 40])
def test_every_sampler_returns_the_clean_image_for_an_oracle_denoiser(sampler, objective, start):
    schedule = Schedule("cosine", 100)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 8, 8, generator=gen) * 1.6 - 0.8
    x = torch.randn(2, 3, 8, 8, generator=gen)
    predict = predictor(oracle(schedule, x0, objective), schedule, objective, None, clip=False)
    out = run_sampler(sampler, schedule, predict, x, start, steps=10, eta=1.0, generator=gen)
    torch.testing.assert_close(out, x0, atol=2e-4, rtol=0)


def gaussian_samples(sampler, steps, schedule_name="cosine", m=0.3, d=0.2):
    """Samples of a sampler driven by the exact denoiser of data x0 ~ N(m, d^2) per pixel:
    E[eps | x_t] = s (x_t - a m) / (a^2 d^2 + s^2) in closed form."""
    schedule = Schedule(schedule_name, 200)

    def net(x, t, cond):
        a, s = schedule.coefficients(t, x)
        return s * (x - a * m) / (a ** 2 * d ** 2 + s ** 2)

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(20000, 1, 1, 1, generator=gen, dtype=torch.float64)
    predict = predictor(net, schedule, "pred_noise", None, clip=False)
    return run_sampler(sampler, schedule, predict, x, 199, steps=steps, eta=0.0, generator=gen)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 0), ("ddim", 200), ("dpm_solver", 50)])
def test_samplers_with_the_exact_gaussian_denoiser_draw_the_data_distribution(sampler, steps):
    out = gaussian_samples(sampler, steps)
    assert float(out.mean()) == pytest.approx(0.3, abs=0.01)
    assert float(out.std()) == pytest.approx(0.2, rel=0.05)  # discretisation: 200 steps leave 2-4 %


def test_dpm_solver_is_closer_than_ddim_at_equal_network_evaluations():
    errors = {name: abs(float(gaussian_samples(name, 50).std()) - 0.2) for name in ("ddim", "dpm_solver")}
    assert errors["dpm_solver"] < errors["ddim"] / 1.5, errors


def test_timestep_grids():
    assert timesteps(999, 5) == [999, 749, 500, 250, 0]
    assert timesteps(3, 10) == [3, 2, 1, 0]


def test_ddim_eta_0_is_deterministic_and_eta_1_is_not():
    schedule = Schedule("cosine", 100)
    torch.manual_seed(0)
    net = TinyDenoiser()
    nn.init.normal_(net.out.weight, std=0.3)
    predict = predictor(net, schedule, "pred_noise", None)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))

    def run(eta, seed):
        return run_sampler("ddim", schedule, predict, x, 99, steps=10, eta=eta,
                           generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(0.0, 1), run(0.0, 2), rtol=0, atol=0)
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))


def test_guidance_scale_1_is_the_conditional_prediction_and_2_extrapolates():
    schedule = Schedule("cosine", 100)
    torch.manual_seed(0)
    net = TinyDenoiser(n_classes=3)
    nn.init.normal_(net.out.weight, std=0.3)
    cond, conditioner = torch.tensor([0, 2]), LabelCond(role="denoiser", n_classes=3)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([30.0, 70.0])
    a, s = schedule.coefficients(t, x)
    c, u = net(x, t, cond), net(x, t, torch.tensor([3, 3]))
    assert not torch.allclose(c, u)
    torch.testing.assert_close(guide(c, u, 1.0), c)
    for scale, expected in [(1.0, c), (2.0, 2 * c - u)]:
        predict = predictor(net, schedule, "pred_noise", cond, conditioner=conditioner, guidance_scale=scale,
                            clip=False)
        torch.testing.assert_close(predict(x, t)[1], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(predict(x, t)[0], x0_from_eps(x, expected, a, s), rtol=1e-4, atol=1e-4)


# -- the task ----------------------------------------------------------------------------------------

class ColourImages(torch.utils.data.Dataset):
    """8 images of one colour each, with labels."""

    class_names = ["a", "b", "c"]

    def __init__(self, n=8, size=8):
        gen = torch.Generator().manual_seed(0)
        colours = torch.rand(n, 3, 1, 1, generator=gen) * 1.6 - 0.8
        self.images = colours.expand(n, 3, size, size).contiguous()
        self.labels = torch.arange(n) % 3

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def component(kind, name, factory):
    return Component(name, None, Entry(kind, name, factory, None, "test", None, None, ""), f"model.{name}")


def make_task(config, conditioner=LabelCond, dataset=None):
    accelerate.state.AcceleratorState._reset_state(True)
    accelerator = accelerate.Accelerator(cpu=True)
    dataset = dataset or ColourImages()

    def build_denoiser(cfg, *, role, n_classes, conditioner, image_size, channels):
        assert role == "denoiser" and channels == 3 and image_size == 8
        return TinyDenoiser(n_classes if "label" in conditioner.fields else 0, T=config.num_timesteps)

    components = {"denoiser": component("backbone", "tiny", build_denoiser),
                  "conditioner": component("conditioner", conditioner.name, conditioner)}
    run = RunContext(recipe=types.SimpleNamespace(seed=5), accelerator=accelerator, run_dir=None,
                     dataset=dataset, components=components)
    task = DiffusionTask(config)
    task.setup(run)
    return task, dataset


def full_batch(dataset):
    return {"image": dataset.images, "label": dataset.labels}


def test_a_tiny_model_overfits_8_images():
    torch.manual_seed(0)
    config = DiffusionConfig(lr=3e-3, num_timesteps=100, objective="pred_noise", ema_decay=0.9, sample_count=8)
    task, data = make_task(config)
    batch = full_batch(data)
    losses = [float(task.train_step(batch, step)["loss"]) for step in range(600)]
    first, last = np.mean(losses[:20]), np.mean(losses[-50:])
    assert last < first / 10, (first, last)
    images = task.sample(batch)["image"]
    assert images.shape == (8, 3, 8, 8) and torch.isfinite(images).all()


def test_sampler_and_guidance_are_chosen_at_sampling_time_with_evolve():
    torch.manual_seed(0)
    task, data = make_task(DiffusionConfig(num_timesteps=50, sample_count=4, sampling_steps=5))
    calls = []
    task.ema.register_forward_hook(lambda *args: calls.append(1))
    batch = full_batch(data)
    for sampler, guidance, expected in [("ddim", 1.0, 5), ("dpm_solver", 1.0, 5), ("ddpm", 1.0, 50),
                                        ("ddim", 3.0, 10)]:
        calls.clear()
        task.config = attrs.evolve(task.config, sampler=sampler, guidance_scale=guidance)
        out = task.generate(batch, seeds=range(8))
        assert out.shape == (8, 3, 8, 8) and torch.isfinite(out).all()
        assert len(calls) == expected, sampler
    # The same seeds give the same images; other seeds others.
    task.config = attrs.evolve(task.config, sampler="ddim", guidance_scale=1.0)
    torch.testing.assert_close(task.generate(batch, seeds=range(8)), task.generate(batch, seeds=range(8)))


def test_guidance_with_an_unconditional_model_names_the_key():
    with pytest.raises(HandforgeError, match="task.guidance_scale.*'none'"):
        make_task(DiffusionConfig(num_timesteps=20, guidance_scale=2.0), conditioner=NoCond)
    task, data = make_task(DiffusionConfig(num_timesteps=20, sample_count=2), conditioner=NoCond)
    task.config = attrs.evolve(task.config, guidance_scale=4.0)
    with pytest.raises(HandforgeError, match="task.guidance_scale"):
        task.sample(full_batch(data))


def test_variations_by_sdedit_are_seeded_stay_close_to_their_source_and_differ():
    torch.manual_seed(0)
    task, data = make_task(DiffusionConfig(num_timesteps=50, sampling_steps=10, sample_count=2))
    individuals = {"label": torch.tensor([0, 1])}
    others = {"label": torch.tensor([0, 0, 0, 1, 1, 1])}

    def make(strength, seed):
        return task.variations(individuals, others, 3, strength=strength,
                               generator=torch.Generator().manual_seed(seed))

    a, b = make(0.3, 7), make(0.3, 7)
    assert a.shape == (2, 3, 3, 8, 8)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0, 0], a[0, 1])  # variations differ
    assert not torch.allclose(make(0.3, 8), a)
    with pytest.raises(HandforgeError, match="strength"):
        make(0.0, 7)


class PoseCond(NoCond):
    """A pose conditioner stand-in (the denoiser here ignores it): the task must keep each
    individual's noise and take the other poses."""

    name, fields, spatial, conditional = "pose", ("keypoints",), True, True

    def condition(self, batch):
        return batch["keypoints"]

    def drop(self, cond, mask):
        return torch.where(mask[:, None, None], torch.zeros_like(cond), cond)


def test_pose_variations_keep_the_individuals_noise():
    torch.manual_seed(0)
    task, _ = make_task(DiffusionConfig(num_timesteps=30, sampling_steps=5, sample_count=2), conditioner=PoseCond)
    nn.init.normal_(task.ema.out.weight, std=0.3)
    individuals = {"keypoints": torch.rand(2, 21, 3)}
    others = {"keypoints": torch.rand(6, 21, 3)}
    out = task.variations(individuals, others, 3, strength=0.5, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 3, 3, 8, 8)
    # A denoiser blind to the pose: one image per noise, so the variations of one individual coincide.
    torch.testing.assert_close(out[0, 0], out[0, 2])
    assert not torch.allclose(out[0, 0], out[1, 0])


def test_ema_is_saved_and_restored():
    torch.manual_seed(0)
    task, data = make_task(DiffusionConfig(num_timesteps=20, sample_count=2))
    task.train_step(full_batch(data), 0)
    state = task.state_dict()
    assert state and all(k.startswith("ema.") for k in state)
    other, _ = make_task(DiffusionConfig(num_timesteps=20, sample_count=2))
    other.load_state_dict(state)
    for p, q in zip(task.ema.parameters(), other.ema.parameters()):
        torch.testing.assert_close(p, q)
    assert set(task.export_modules()) == {"denoiser", "denoiser_ema"}


# -- through the real loop and CLI ------------------------------------------------------------------

PLUGIN = pathlib.Path(__file__).parent / "diffusion_plugin.py"
KILL = pathlib.Path(__file__).parent / "kill_plugin.py"


def loop_recipe(root, **task):
    return {
        "name": "tiny_diffusion", "seed": 2, "output_dir": str(root / "runs"), "plugins": [str(PLUGIN)],
        "task": {"name": "diffusion", "num_timesteps": 50, "sampling_steps": 4, "sample_count": 4, **task},
        "data": {"name": "procedural_hands", "size": 16},
        "model": {"denoiser": {"name": "test_tiny_denoiser"}, "conditioner": {"name": "test_denoise_label"}},
        "train": {"steps": 6, "batch_size": 4, "log_every": 2, "sample_every": 3, "checkpoint_every": 2,
                  "progress": False},
    }


def test_killed_and_resumed_diffusion_run_is_bit_identical(tmp_path):
    straight, killed = loop_recipe(tmp_path / "a"), loop_recipe(tmp_path / "b")
    killed["plugins"] = killed["plugins"] + [str(KILL)]
    env = {"HANDFORGE_TEST_KILL_AT": "4"}
    a = run_cli("run", write(tmp_path / "a.toml", straight), env=env)
    assert a.returncode == 0, a.stderr
    b = run_cli("run", write(tmp_path / "b.toml", killed), env=env)
    assert b.returncode == 17, b.stderr
    c = run_cli("run", tmp_path / "b.toml", "resume=true", env={"HANDFORGE_TEST_KILL_AT": "0"})
    assert c.returncode == 0, c.stderr
    run_a, run_b = tmp_path / "a/runs/tiny_diffusion", tmp_path / "b/runs/tiny_diffusion"
    assert sorted(p.name for p in (run_a / "samples").iterdir()) == ["step_00000003.png", "step_00000006.png"]
    files = sorted(p.name for p in (run_a / "weights").iterdir())
    assert files == ["denoiser.safetensors", "denoiser_ema.safetensors"]
    for file in files:
        wa, wb = load_file(run_a / "weights" / file), load_file(run_b / "weights" / file)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), file
    # The export path GAN runs use works on the diffusion run (the task's generate with seeds).
    out = tmp_path / "export"
    g = run_cli("generate", run_a, "--per-class", "1", "--out", out, "--batch-size", "4", "--no-progress")
    assert g.returncode == 0, g.stderr
    names = {p.parent.name for p in out.rglob("*.png")}
    assert len(list(out.rglob("*.png"))) == len(names) > 1  # one image in each class folder


def test_cli_refuses_guidance_with_an_unconditional_model(tmp_path):
    raw = loop_recipe(tmp_path, guidance_scale=3.0)
    raw["model"]["conditioner"] = {"name": "test_denoise_none"}
    raw["train"]["steps"] = 1
    result = run_cli("run", write(tmp_path / "r.toml", raw))
    assert result.returncode == 2, result.stderr
    assert "task.guidance_scale" in result.stderr and "Traceback" not in result.stderr


def write(path, raw):
    path.write_text(dumps(raw))
    return path


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_training_step_with_each_objective(objective):
    torch.manual_seed(0)
    task, data = make_task(DiffusionConfig(num_timesteps=50, objective=objective, min_snr_gamma=5.0, sample_count=2))
    before = [p.detach().clone() for p in task.export_modules()["denoiser"].parameters()]
    loss = task.train_step(full_batch(data), 0)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    after = list(task.export_modules()["denoiser"].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
