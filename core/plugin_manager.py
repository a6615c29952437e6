"""The plugin manager: built-in plugins, entry points of group "handforge", local plugin files.

Each plugin is loaded in isolation: one that fails (on import, on registration, or by
implementing a hook that does not exist) is recorded with its distribution, version and error,
and the others keep working. ``HANDFORGE_STRICT_PLUGINS=1`` makes such failures fatal;
``HANDFORGE_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points (tests use it).
"""
import importlib
import importlib.metadata
import importlib.util
import os
import pathlib
import sys
import traceback

import attrs
import pluggy

from . import __version__, hookspecs
from .errors import PluginError
from .registry import KIND_HOOKS, Registry, did_you_mean, make_register

ENTRY_POINT_GROUP = "handforge"
BUILTIN_PACKAGE = "handforge.plugins"  # lists its modules in BUILTIN_MODULES


# What a plugin's own code may raise besides Exception and still only fail that plugin: sys.exit()
# (SystemExit) or any other BaseException. A Ctrl-C (KeyboardInterrupt) and a closing generator
# (GeneratorExit) are not the plugin's failure and go on up.
NOT_PLUGIN_FAILURES = (KeyboardInterrupt, GeneratorExit)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit: the plugin called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@attrs.define
class PluginInfo:
    """What ``handforge plugins`` reports about one plugin."""

    name: str
    source: str  # "builtin", "entrypoint" or "local"
    dist: str | None = None
    version: str | None = None
    hooks: list = attrs.field(factory=list)
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.dist} {self.version})" if self.dist else self.name


class PluginHost:
    """One pluggy PluginManager plus the registries its plugins filled."""

    def __init__(self):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.registries = {kind: Registry(kind) for kind in KIND_HOOKS}
        self._known_hooks = {n for n in dir(hookspecs) if n.startswith(("register_", "on_"))}

    @property
    def failures(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    # -- loading -----------------------------------------------------------------------------

    def load_builtins(self) -> None:
        package = importlib.import_module(BUILTIN_PACKAGE)
        for module_name in package.BUILTIN_MODULES:
            module = importlib.import_module(module_name)
            # A broken built-in is a bug in handforge itself: fail loudly.
            info = PluginInfo(module_name, "builtin", "handforge", __version__)
            self._add(module, info, fatal=True)

    def load_entrypoints(self) -> None:
        if _env_flag("HANDFORGE_DISABLE_PLUGIN_AUTOLOAD"):
            return
        strict = _env_flag("HANDFORGE_STRICT_PLUGINS")
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, "entrypoint", dist.name if dist else None, dist.version if dist else None)
            try:
                module = ep.load()
            except NOT_PLUGIN_FAILURES:
                raise
            except BaseException as exc:  # noqa: BLE001 - any import error (sys.exit too) must not break the others
                self._record_failure(info, f"import failed: {_describe(exc)}", strict)
                continue
            self._add(module, info, fatal=strict)

    def load_file(self, path, base_dir=None) -> PluginInfo:
        """Load a local plugin file named in a recipe's ``plugins = [...]``. Failures are fatal."""
        file = pathlib.Path(path)
        if not file.is_absolute() and base_dir is not None:
            file = pathlib.Path(base_dir) / file
        file = file.resolve()
        for known in self.plugins:
            if known.source == "local" and known.name == str(file):
                return known
        if not file.is_file():
            raise PluginError(f"plugin file {path} not found (looked at {file})")
        module_name = f"handforge_local_plugin_{abs(hash(str(file))):x}"
        spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(spec)
        try:
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except NOT_PLUGIN_FAILURES:
            sys.modules.pop(module_name, None)
            raise
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in the file too
            sys.modules.pop(module_name, None)
            detail = (_describe(exc) if isinstance(exc, SystemExit)
                      else traceback.format_exception_only(type(exc), exc)[-1].strip())
            raise PluginError(f"plugin file {file} failed to import: {detail}") from exc
        info = PluginInfo(str(file), "local")
        self._add(module, info, fatal=True)
        return info

    # -- internals ---------------------------------------------------------------------------

    def _record_failure(self, info: PluginInfo, error: str, fatal: bool) -> None:
        info.error = error
        if fatal:
            raise PluginError(f"plugin {info.label} failed: {error}")
        self.plugins.append(info)
        for registry in self.registries.values():
            registry.failed_plugins.append(f"{info.label}: {error}")

    def _add(self, module, info: PluginInfo, fatal: bool) -> None:
        """Register one plugin, check its hook names, and let it fill the registries."""
        try:
            self.pm.register(module, name=info.name)
        except NOT_PLUGIN_FAILURES:
            raise
        except BaseException as exc:  # noqa: BLE001 - pluggy.PluginValidationError: a hook with wrong arguments
            self._record_failure(info, f"invalid hook: {exc if isinstance(exc, Exception) else _describe(exc)}", fatal)
            return
        callers = self.pm.get_hookcallers(module) or []
        info.hooks = sorted(c.name for c in callers if any(i.plugin is module for i in c.get_hookimpls()))
        unknown = [name for name in info.hooks if name not in self._known_hooks]
        if unknown:
            self.pm.unregister(module)
            hint = "; ".join(f"'{n}' is not a handforge hook{did_you_mean(n, self._known_hooks)}" for n in unknown)
            self._record_failure(info, hint, fatal)
            return
        # Fill the registries with this plugin's components only, so each entry knows its plugin.
        added = []
        try:
            for kind, hook_name in KIND_HOOKS.items():
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    if impl.plugin is module:
                        registry = self.registries[kind]
                        before = set(registry.names())
                        impl.function(register=make_register(registry, info.name, info.dist, info.version))
                        added += [(registry, n) for n in set(registry.names()) - before]
        except NOT_PLUGIN_FAILURES:
            raise
        except BaseException as exc:  # noqa: BLE001 - a registration error (duplicate name, bad config class, sys.exit, ...)
            for registry, name in added:
                registry.remove(name)
            self.pm.unregister(module)
            detail = _describe(exc) if not isinstance(exc, Exception) else str(exc)
            self._record_failure(info, f"registration failed: {detail}", fatal)
            return
        self.pm.check_pending()
        self.plugins.append(info)


_HOST: PluginHost | None = None


def get_host(reload: bool = False) -> PluginHost:
    """The process-wide plugin host: built-ins, then entry points (local files are added per recipe)."""
    global _HOST
    if _HOST is None or reload:
        host = PluginHost()
        host.load_builtins()
        host.load_entrypoints()
        _HOST = host
    return _HOST
