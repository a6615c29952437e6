import attrs
import pytest

from handforge.errors import RegistryError
from handforge.registry import Registry, make_register


@attrs.define
class Cfg:
    ch: int = 8


def factory(config):
    """A test component."""
    return config


def test_duplicate_name_names_both_plugins():
    reg = Registry("backbone")
    make_register(reg, "first_plugin", "dist-a", "1.0")("net", factory, config=Cfg)
    with pytest.raises(RegistryError) as err:
        make_register(reg, "second_plugin", "dist-b", "2.0")("net", factory)
    message = str(err.value)
    assert "first_plugin (dist-a 1.0)" in message and "second_plugin (dist-b 2.0)" in message


def test_unknown_name_lists_near_matches_and_available():
    reg = Registry("dataset")
    register = make_register(reg, "p", None, None)
    for name in ("procedural_hands", "hagrid", "image_folder"):
        register(name, factory)
    with pytest.raises(RegistryError) as err:
        reg.get("procedral_hands")
    message = str(err.value)
    assert "unknown dataset 'procedral_hands' (did you mean 'procedural_hands'?)" in message
    assert "available: hagrid, image_folder, procedural_hands" in message


def test_wildcard_listing_and_entry_metadata():
    reg = Registry("backbone")
    register = make_register(reg, "plug", "dist", "0.3")
    for name in ("stylegan2", "stylegan3", "resnet"):
        register(name, factory, config=Cfg, needs=("image",))
    assert reg.names("stylegan*") == ["stylegan2", "stylegan3"]
    assert reg.names() == ["resnet", "stylegan2", "stylegan3"]
    entry = reg.get("resnet")
    assert (entry.plugin, entry.dist, entry.version, entry.config_cls) == ("plug", "dist", "0.3", Cfg)
    assert entry.summary == "A test component."
    assert entry.fields_needed(Cfg()) == {"image"}


def test_fields_may_depend_on_config():
    reg = Registry("dataset")
    make_register(reg, "p", None, None)("folder", factory, config=Cfg,
                                        provides=lambda c: ("image", "label") if c.ch > 4 else ("image",))
    entry = reg.get("folder")
    assert entry.fields_provided(Cfg(ch=8)) == {"image", "label"}
    assert entry.fields_provided(Cfg(ch=2)) == {"image"}


@pytest.mark.parametrize("name, factory_, config, fragment", [
    ("Bad Name", factory, None, "a name is lowercase"),
    ("ok", 42, None, "not callable"),
    ("ok", factory, dict, "must be an attrs class"),
])
def test_malformed_registration_is_rejected(name, factory_, config, fragment):
    with pytest.raises(RegistryError, match=fragment):
        make_register(Registry("metric"), "plug", None, None)(name, factory_, config=config)
