"""What the GAN tests share: a tiny labelled dataset, component wrappers, a set-up GanTask."""
import types

import accelerate
import torch

from handforge.plugins.backbones.deep_conv import DeepConvConfig, build_deep_conv
from handforge.plugins.conditioners.auxiliary import LatentLabel
from handforge.plugins.conditioners.label import ClassBatchNorm, NoCondition, Projection
from handforge.plugins.losses.adversarial import Hinge, Logistic
from handforge.plugins.tasks.gan import GanConfig, GanTask
from handforge.recipe import Component
from handforge.registry import Entry
from handforge.task import RunContext


class TinyHands(torch.utils.data.Dataset):
    """Random images with labels: enough to drive the task."""

    class_names = ["fist", "palm", "point"]

    def __init__(self, n=64, size=16):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=generator) * 2 - 1
        self.labels = torch.randint(0, 3, (n,), generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def component(kind, name, factory, config=None):
    entry = Entry(kind, name, factory, type(config) if config is not None else None, "test", None, None, "")
    return Component(name, config, entry, f"model.{name}")


def gan_run(components: dict, dataset, gan_config=None, accumulation=1, batch_size=8):
    """A set-up GanTask on CPU over ``dataset`` with the given slot Components; returns
    (task, run, batches), ``batches`` the iterator the task also draws extra batches from."""
    accelerate.state.AcceleratorState._reset_state(True)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    batches = iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False))
    run = RunContext(recipe=types.SimpleNamespace(seed=3), accelerator=accelerator, run_dir=None, dataset=dataset,
                     components=components, next_batch=lambda: next(batches))
    task = GanTask(gan_config or GanConfig(sample_count=6))
    task.setup(run)
    return task, run, batches


def make_run(conditional=True, gan_config=None, augment=None, accumulation=1, ch=4, dataset=None, loss=None,
             g_conditioner=None, d_conditioner=None):
    """A set-up deep_conv GanTask on CPU. ``loss``, ``g_conditioner``, ``d_conditioner``: Components (see
    ``component``) replacing the defaults (hinge; cbn/projection when ``conditional``, else none)."""
    dataset = dataset or TinyHands()
    backbone = DeepConvConfig(ch=ch, z_dim=8)
    components = {
        "generator": component("backbone", "deep_conv", build_deep_conv, backbone),
        "discriminator": component("backbone", "deep_conv", build_deep_conv, backbone),
        "g_conditioner": component("conditioner", "cbn", ClassBatchNorm) if conditional
        else component("conditioner", "none", NoCondition),
        "d_conditioner": component("conditioner", "projection", Projection) if conditional
        else component("conditioner", "none", NoCondition),
        "loss": loss or component("loss", "hinge", Hinge),
    }
    components["g_conditioner"] = g_conditioner or components["g_conditioner"]
    components["d_conditioner"] = d_conditioner or components["d_conditioner"]
    if augment is not None:
        components["augment"] = component("augmentation", "test_aug", augment)
    return gan_run(components, dataset, gan_config, accumulation)


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    """Every weight matrix / kernel moved (a bias can have an exactly zero gradient: hinge, balanced batch)."""
    pairs = [(a, b) for a, b in zip(before, module.parameters()) if b.ndim > 1]
    return bool(pairs) and all(not torch.equal(a, b) for a, b in pairs)


def unchanged(before, module):
    return all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_net(build, config, role: str, size: int = 32, conditioner=None):
    """A backbone's ``role`` network at ``size`` px, with ``conditioner`` (default: none)."""
    conditioner = conditioner or NoCondition(role=role)
    return build(config, role=role, image_size=size, conditioner=conditioner,
                 n_classes=getattr(conditioner, "n_classes", 0))


def pair_components(name: str, build, config, g_conditioner, d_conditioner, loss) -> dict:
    """Slot Components for a GanTask with one backbone for both networks; the conditioners and the
    loss as (name, factory) pairs."""
    return {
        "generator": component("backbone", name, build, config),
        "discriminator": component("backbone", name, build, config),
        "g_conditioner": component("conditioner", *g_conditioner),
        "d_conditioner": component("conditioner", *d_conditioner),
        "loss": component("loss", *loss),
    }


def style_gan_run(name: str, build, config, gan_config=None):
    """A set-up GanTask with a StyleGAN pair wired as the shipped recipes wire it: the label into
    the mapping network (cadain), a projection discriminator, the logistic loss; 32 px TinyHands."""
    components = pair_components(name, build, config, ("cadain", LatentLabel), ("projection", Projection),
                                 ("logistic", Logistic))
    return gan_run(components, TinyHands(n=32, size=32), gan_config or GanConfig(sample_count=4))


def registered_entry(module, kind: str, name: str):
    """The registry entry ``module`` makes for ``name`` when loaded as a built-in plugin."""
    from handforge.plugin_manager import PluginHost, PluginInfo

    host = PluginHost()
    host._add(module, PluginInfo(module.__name__, "builtin", "handforge", "0"), fatal=True)
    return host.registry(kind).get(name)


def rejected_options(config_cls, table: dict) -> list[str]:
    """The key paths the recipe reader reports for an option table it refuses, sorted."""
    from handforge.recipe import structure

    problems = []
    assert structure(table, config_cls, "model.generator", problems) is None
    return sorted(p.split(":")[0] for p in problems)


def check_style_outputs(G, D, size: int, labels=None) -> None:
    """What every StyleGAN pair shows: a linear, channels_last output in training, images in [-1, 1]
    in eval, and one finite logit per image from D."""
    x = G(torch.randn(4, G.z_dim), labels)
    assert x.shape == (4, 3, size, size) and torch.isfinite(x).all() and x.std() > 0
    assert x.is_contiguous(memory_format=torch.channels_last)
    G.eval()
    x = G(torch.randn(4, G.z_dim), labels)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
    logits = D(x, labels)
    assert logits.shape == (4,) and torch.isfinite(logits).all()
