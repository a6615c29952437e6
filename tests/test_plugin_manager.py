"""Plugin loading: built-ins, entry points (through a real dist-info on sys.path), local files."""
import sys
import textwrap

import pytest

from handforge.errors import PluginError, RegistryError
from handforge.plugin_manager import PluginHost

GOOD_PLUGIN = """
from handforge import hookimpl

@hookimpl
def register_losses(register):
    register("test_l2", lambda config, **_: "l2", summary="squared error")
"""
BROKEN_PLUGIN = "raise RuntimeError('boom at import')\n"
MISSPELLED_PLUGIN = """
from handforge import hookimpl

@hookimpl
def register_loss(register):
    register("never", lambda config: None)
"""


EXITING_PLUGIN = "import sys\nsys.exit(0)  # a module written as a script\n"
EXIT_ON_REGISTER_PLUGIN = """
import sys
from handforge import hookimpl

@hookimpl
def register_losses(register):
    sys.exit(3)
"""


def make_distribution(root, dist, version, module, source):
    """Write an importable module plus a dist-info with a 'handforge' entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[handforge]\n{module} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HANDFORGE_DISABLE_PLUGIN_AUTOLOAD", "0")
    yield tmp_path
    for name in ("hf_good", "hf_broken", "hf_misspelled", "hf_exiting", "hf_exit_on_register"):
        sys.modules.pop(name, None)


def loaded(host):
    return {p.name: p for p in host.plugins}


def test_builtins_register_through_hooks(host):
    builtin = [p for p in host.plugins if p.source == "builtin"]
    assert builtin and all(p.dist == "handforge" and not p.error for p in builtin)
    assert all(p.hooks and all(h.startswith("register_") for h in p.hooks) for p in builtin)
    for kind in ("dataset", "backbone", "task", "loss", "conditioner"):
        assert len(host.registry(kind)) > 0, kind


def test_broken_entry_point_is_isolated_and_reported(site):
    make_distribution(site, "hf-good", "1.2.0", "hf_good", GOOD_PLUGIN)
    make_distribution(site, "hf-broken", "0.0.1", "hf_broken", BROKEN_PLUGIN)
    host = PluginHost()
    host.load_entrypoints()
    plugins = loaded(host)
    assert plugins["hf_good"].dist == "hf-good" and plugins["hf_good"].version == "1.2.0"
    assert plugins["hf_good"].hooks == ["register_losses"] and plugins["hf_good"].error is None
    assert host.registry("loss").get("test_l2").dist == "hf-good"
    broken = plugins["hf_broken"]
    assert (broken.dist, broken.version) == ("hf-broken", "0.0.1")
    assert "RuntimeError: boom at import" in broken.error
    with pytest.raises(RegistryError, match=r"hf_broken \(hf-broken 0.0.1\): import failed"):
        host.registry("loss").get("something_it_would_have_provided")


def test_strict_mode_makes_load_failures_fatal(site, monkeypatch):
    make_distribution(site, "hf-broken", "0.0.1", "hf_broken", BROKEN_PLUGIN)
    monkeypatch.setenv("HANDFORGE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="hf_broken .*boom at import"):
        PluginHost().load_entrypoints()


def test_autoload_can_be_disabled(site, monkeypatch):
    make_distribution(site, "hf-good", "1.2.0", "hf_good", GOOD_PLUGIN)
    monkeypatch.setenv("HANDFORGE_DISABLE_PLUGIN_AUTOLOAD", "1")
    host = PluginHost()
    host.load_entrypoints()
    assert host.plugins == [] and "test_l2" not in host.registry("loss")


def test_misspelled_hook_is_an_error(site):
    make_distribution(site, "hf-misspelled", "3.0", "hf_misspelled", MISSPELLED_PLUGIN)
    host = PluginHost()
    host.load_entrypoints()
    error = loaded(host)["hf_misspelled"].error
    assert "'register_loss' is not a handforge hook (did you mean 'register_losses'" in error
    host.pm.check_pending()  # the offender was unregistered: nothing pending is left behind


def test_local_plugin_file(tmp_path):
    path = tmp_path / "my_plugin.py"
    path.write_text(GOOD_PLUGIN)
    host = PluginHost()
    info = host.load_file("my_plugin.py", base_dir=tmp_path)
    assert info.source == "local" and info.name == str(path)
    assert host.registry("loss").get("test_l2").plugin == str(path)
    assert host.load_file(path) is info  # loading twice registers once
    with pytest.raises(PluginError, match="not found"):
        host.load_file(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text(BROKEN_PLUGIN)
    with pytest.raises(PluginError, match="bad.py failed to import: RuntimeError: boom at import"):
        host.load_file(bad)


def test_duplicate_component_from_second_plugin_fails_that_plugin_only(site, tmp_path):
    make_distribution(site, "hf-good", "1.2.0", "hf_good", GOOD_PLUGIN)
    host = PluginHost()
    host.load_entrypoints()
    dup = tmp_path / "dup.py"
    dup.write_text(GOOD_PLUGIN)
    with pytest.raises(PluginError, match=r"registered twice: by hf_good \(hf-good 1.2.0\) and by .*dup.py"):
        host.load_file(dup)
    assert host.registry("loss").get("test_l2").dist == "hf-good"


@pytest.mark.parametrize("module, source, failure", [
    ("hf_exiting", EXITING_PLUGIN, "import failed: SystemExit: the plugin called sys.exit(0)"),
    ("hf_exit_on_register", EXIT_ON_REGISTER_PLUGIN, "registration failed: SystemExit: the plugin called sys.exit(3)"),
])
def test_a_plugin_calling_sys_exit_fails_only_itself(site, monkeypatch, module, source, failure):
    make_distribution(site, "hf-good", "1.2.0", "hf_good", GOOD_PLUGIN)
    make_distribution(site, module.replace("_", "-"), "0.0.2", module, source)
    host = PluginHost()
    host.load_entrypoints()  # no SystemExit escapes
    plugins = loaded(host)
    assert plugins[module].error == failure
    assert host.registry("loss").get("test_l2").dist == "hf-good" and plugins["hf_good"].error is None
    label = rf"{module} \({module.replace('_', '-')} 0\.0\.2\)"
    with pytest.raises(RegistryError, match=label):
        host.registry("loss").get("something_it_would_have_provided")
    monkeypatch.setenv("HANDFORGE_STRICT_PLUGINS", "1")
    sys.modules.pop(module, None)
    with pytest.raises(PluginError, match=rf"plugin {label} failed: .*SystemExit"):
        PluginHost().load_entrypoints()


def test_sys_exit_in_an_entry_point_does_not_end_the_command(site):
    """Through the real entry point, in a fresh interpreter: before, `handforge` exited 0 silently."""
    from conftest import run_cli

    make_distribution(site, "hf-good", "1.2.0", "hf_good", GOOD_PLUGIN)
    make_distribution(site, "hf-exiting", "0.0.2", "hf_exiting", EXITING_PLUGIN)
    env = {"PYTHONPATH": str(site), "HANDFORGE_DISABLE_PLUGIN_AUTOLOAD": "0"}
    listing = run_cli("plugins", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "hf_exiting  [hf-exiting 0.0.2]  FAILED: import failed: SystemExit: the plugin called sys.exit(0)" in listing.stdout
    losses = run_cli("list", "loss", env=env)
    assert losses.returncode == 0 and "test_l2" in losses.stdout, losses.stderr
    strict = run_cli("list", "loss", env={**env, "HANDFORGE_STRICT_PLUGINS": "1"})
    assert strict.returncode == 2 and strict.stdout == ""
    lines = strict.stderr.strip().splitlines()
    assert len(lines) == 1 and "plugin hf_exiting (hf-exiting 0.0.2) failed: import failed: SystemExit" in lines[0]


def test_a_local_plugin_file_calling_sys_exit_is_a_plugin_error(tmp_path):
    exiting = tmp_path / "exiting.py"
    exiting.write_text(EXITING_PLUGIN)
    with pytest.raises(PluginError, match=r"exiting\.py failed to import: SystemExit: the plugin called sys\.exit\(0\)"):
        PluginHost().load_file(exiting)
    registering = tmp_path / "registering.py"
    registering.write_text(EXIT_ON_REGISTER_PLUGIN)
    with pytest.raises(PluginError, match=r"registering\.py failed: registration failed: SystemExit"):
        PluginHost().load_file(registering)
