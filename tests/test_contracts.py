"""The contracts of handforge.contracts, as the registry and Component.build enforce them: a class
that lacks a method of its kind is refused when it is registered, naming the plugin and the
component; what only the built object can show is refused when it is built."""
import textwrap

import attrs
import pytest
import torch

from handforge import contracts
from handforge.errors import ContractError, PluginError, RegistryError
from handforge.plugin_manager import PluginHost, PluginInfo
from handforge.recipe import resolve_component
from handforge.registry import Registry, make_register
from handforge.task import Task


def register_in(kind, plugin="my_plugin"):
    return make_register(Registry(kind), plugin, "my-dist", "1.0")


class HalfLoss:
    """Has g_loss but no d_loss."""

    def __init__(self, config=None):
        pass

    def g_loss(self, fake_logits):
        return -fake_logits.mean()


def test_a_loss_class_without_d_loss_is_refused_naming_plugin_and_component():
    with pytest.raises(RegistryError) as error:
        register_in("loss")("half", HalfLoss)
    message = str(error.value)
    assert message.startswith("plugin my_plugin: loss 'half': HalfLoss lacks d_loss")
    assert "d_loss, g_loss" in message


def test_a_local_plugin_file_with_a_broken_class_fails_to_load(tmp_path):
    file = tmp_path / "broken_plugin.py"
    file.write_text(textwrap.dedent("""
        from handforge import hookimpl

        class NoDLoss:
            def g_loss(self, fake_logits):
                return -fake_logits.mean()

        @hookimpl
        def register_losses(register):
            register("no_d_loss", NoDLoss)
    """))
    host = PluginHost()
    with pytest.raises(PluginError) as error:
        host.load_file(file)
    message = str(error.value)
    assert str(file) in message and "loss 'no_d_loss'" in message and "lacks d_loss" in message
    assert "no_d_loss" not in host.registry("loss")


def test_an_entry_point_with_a_broken_class_is_reported_and_the_rest_loads(tmp_path, monkeypatch):
    from test_plugin_manager import make_distribution

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HANDFORGE_DISABLE_PLUGIN_AUTOLOAD", "0")
    monkeypatch.delenv("HANDFORGE_STRICT_PLUGINS", raising=False)
    make_distribution(tmp_path, "hf-contract", "0.2.0", "hf_contract", """
        import torch
        from handforge import hookimpl

        class Unwritten(torch.nn.Module):
            pass  # no forward: nn.Module's placeholder does not count

        @hookimpl
        def register_augmentations(register):
            register("unwritten", Unwritten)
    """)
    host = PluginHost()
    host.load_builtins()
    host.load_entrypoints()
    failed = {p.name: p for p in host.failures}
    assert "hf_contract" in failed and failed["hf_contract"].dist == "hf-contract"
    assert "augmentation 'unwritten': Unwritten lacks __call__" in failed["hf_contract"].error
    assert "diffaug" in host.registry("augmentation")


@pytest.mark.parametrize("kind, factory, missing", [
    ("dataset", type("NoLen", (torch.utils.data.Dataset,), {"__getitem__": lambda self, i: {}}), "__len__"),
    ("dataset", type("NoItems", (torch.utils.data.Dataset,), {"__len__": lambda self: 0}), "__getitem__"),
    ("metric", type("NoEvaluate", (), {"measure": lambda self, inputs: {}}), "evaluate"),
    ("task", type("NoStep", (Task,), {"setup": lambda self, run: None}), "train_step"),
    ("conditioner", type("NoCondition", (), {}), "condition"),
    ("augmentation", type("NotCallable", (), {}), "__call__"),
])
def test_each_kind_refuses_a_class_without_its_methods(kind, factory, missing):
    with pytest.raises(RegistryError, match=rf"plugin my_plugin: {kind} 'x': {factory.__name__} lacks .*{missing}"):
        register_in(kind)("x", factory)


def test_a_conditioner_that_declares_its_side_needs_only_that_sides_members():
    class GeneratorOnly:
        roles = ("generator",)
        fields = ()

        def condition(self, batch):
            return None

        def norm(self, num_features, **_):
            return torch.nn.BatchNorm2d(num_features)

        def latent(self, cond):
            return None

    register_in("conditioner")("g_only", GeneratorOnly)  # no head, merge_input: not needed
    del GeneratorOnly.roles  # both sides, then
    with pytest.raises(RegistryError, match="lacks merge_input, head"):
        register_in("conditioner")("g_only", GeneratorOnly)


def test_a_backbone_class_must_be_a_module():
    class NotAModule:
        def forward(self, x):
            return x

    with pytest.raises(RegistryError, match="NotAModule is not a torch.nn.Module subclass"):
        register_in("backbone")("plain", NotAModule)


def test_an_unknown_signature_is_refused():
    with pytest.raises(RegistryError, match="signature 'pixels' is not one of the augmentation contracts: "
                                            "'images', 'batch'"):
        register_in("augmentation")("a", torch.nn.Identity, signature="pixels")


def test_every_builtin_and_the_example_plugin_meet_their_contracts(host):
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "examples" / "handforge-example-plugin"))
    try:
        import handforge_example_plugin as example
    finally:
        sys.path.pop(0)
    host._add(example, PluginInfo("example", "entrypoint"), fatal=True)  # as its entry point would
    checked = 0
    for kind, registry in host.registries.items():
        for entry in registry:
            assert contracts.check_registration(kind, entry.factory, entry.info) is None, entry.name
            checked += isinstance(entry.factory, type)
    assert checked >= 30  # most built-ins are classes, checked when registered
    assert {"random_grayscale", "color_moments"} <= {e.name for r in host.registries.values() for e in r}


# -- what only the built object can show --------------------------------------------------------


@attrs.define
class Options:
    labels: bool = True


class Unlabelled(torch.utils.data.Dataset):
    """Provides label but has no class_names: only the instance can tell."""

    def __init__(self, config, split="train"):
        pass

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return {"image": torch.zeros(3, 4, 4), "label": torch.tensor(0)}


def built(kind, name, factory, config=None, **info):
    host = PluginHost()
    make_register(host.registry(kind), "my_plugin", None, None)(name, factory, config=config, **info)
    return resolve_component({"name": name}, kind, f"model.{name}", host=host)


def test_a_function_factory_is_checked_when_built():
    component = built("loss", "half", lambda config, **_: HalfLoss())  # registration cannot see inside
    with pytest.raises(ContractError) as error:
        component.build()
    assert str(error.value) == ("model.half: loss 'half' (plugin my_plugin) built a HalfLoss without d_loss; "
                                "see docs/plugins.md for what a loss has")


def test_a_labelled_dataset_without_class_names_is_refused_when_built():
    def provides(config):
        return ("image", "label") if config.labels else ("image",)

    component = built("dataset", "unlabelled", Unlabelled, config=Options, provides=provides)
    with pytest.raises(ContractError, match="built a Unlabelled without class_names"):
        component.build(split="train")
    component.config = Options(labels=False)  # without labels, no class names are needed
    assert len(component.build(split="train")) == 1


def test_a_generator_without_z_dim_is_refused_for_that_role_only():
    component = built("backbone", "net", lambda config, **_: torch.nn.Linear(2, 2))
    with pytest.raises(ContractError, match="built a Linear for role 'generator' without z_dim"):
        component.build(role="generator", image_size=8)
    assert isinstance(component.build(role="discriminator", image_size=8), torch.nn.Linear)
    not_a_module = built("backbone", "fn", lambda config, **_: (lambda x: x))
    with pytest.raises(ContractError, match="built a function, not a torch.nn.Module"):
        not_a_module.build(role="classifier")


def test_a_conditioner_is_checked_for_the_side_it_is_built_for():
    class LabelOnly:
        fields = ("label",)
        input_channels = 0

        def __init__(self, config, **_):
            pass

        def condition(self, batch):
            return batch["label"]

        def merge_input(self, x, cond):
            return x

        def head(self, num_features, **_):
            return torch.nn.Linear(num_features, 1)

    component = built("conditioner", "d_only", LabelOnly, roles=("discriminator",))
    assert isinstance(component.build(role="discriminator", n_classes=2), LabelOnly)
    with pytest.raises(ContractError, match="for role 'generator' without norm, latent, latent_dim"):
        component.build(role="generator", n_classes=2)


def test_the_protocols_are_runtime_checkable(host):
    entry = host.registry("loss").get("hinge")
    assert isinstance(entry.factory(None), contracts.AdversarialLoss)
    assert not isinstance(HalfLoss(), contracts.AdversarialLoss)
