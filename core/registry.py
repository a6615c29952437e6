"""Per-kind registries of components, filled by plugins through the ``register_*`` hooks."""
import difflib
import fnmatch
import re
from typing import Any, Callable

import attrs

from . import contracts
from .errors import RegistryError

# Registry kind -> the hook that fills it (docs/architecture.md, "Registry kinds").
KIND_HOOKS = {
    "backbone": "register_backbones",
    "conditioner": "register_conditioners",
    "augmentation": "register_augmentations",
    "dataset": "register_datasets",
    "metric": "register_metrics",
    "task": "register_tasks",
    "loss": "register_losses",
}
KINDS = tuple(KIND_HOOKS)

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


def _as_fields(value, config) -> frozenset:
    return frozenset(value(config) if callable(value) else value)


@attrs.frozen
class Entry:
    """One registered component."""

    kind: str
    name: str
    factory: Callable
    config_cls: type | None
    plugin: str
    dist: str | None
    version: str | None
    summary: str
    needs: Any = ()
    provides: Any = ()
    info: dict = attrs.field(factory=dict)

    def fields_needed(self, config) -> frozenset:
        return _as_fields(self.needs, config)

    def fields_provided(self, config) -> frozenset:
        return _as_fields(self.provides, config)

    @property
    def origin(self) -> str:
        """'plugin (dist version)' for messages and listings."""
        if self.dist:
            return f"{self.plugin} ({self.dist} {self.version})"
        return self.plugin


def near_matches(word: str, choices) -> list[str]:
    return difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)


def did_you_mean(word: str, choices) -> str:
    close = near_matches(word, choices)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


class Registry:
    """Components of one kind, by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        # Plugins that failed to load: their components cannot be known, so lookups mention them.
        self.failed_plugins: list[str] = []

    def add(self, entry: Entry) -> None:
        previous = self._entries.get(entry.name)
        if previous is not None:
            raise RegistryError(
                f"{self.kind} '{entry.name}' is registered twice: by {previous.origin} and by {entry.origin}"
            )
        self._entries[entry.name] = entry

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            pass
        message = f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}"
        message += f"; available: {', '.join(sorted(self._entries)) or 'none'}"
        if self.failed_plugins:
            message += f". Plugins that failed to load may provide it: {'; '.join(self.failed_plugins)}"
        raise RegistryError(message)

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style wildcard pattern (``*gan*``)."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries[n] for n in sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def make_register(registry: Registry, plugin: str, dist: str | None, version: str | None):
    """The ``register`` callable handed to one plugin's ``register_<kind>s`` hook."""

    def register(name, factory, *, config=None, summary=None, needs=(), provides=(), **info):
        where = f"plugin {plugin}: {registry.kind} {name!r}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise RegistryError(f"{where}: a name is lowercase letters, digits, '_', '-', '.'")
        if not callable(factory):
            raise RegistryError(f"{where}: factory {factory!r} is not callable")
        if config is not None and not attrs.has(config):
            raise RegistryError(f"{where}: config must be an attrs class, got {config!r}")
        broken = contracts.check_registration(registry.kind, factory, info)
        if broken:  # a class that lacks a method of its kind's contract (handforge.contracts)
            raise RegistryError(f"{where}: {broken}")
        if summary is None:
            doc = (getattr(factory, "__doc__", None) or "").strip()
            summary = doc.splitlines()[0] if doc else ""
        registry.add(Entry(registry.kind, name, factory, config, plugin, dist, version, summary,
                           needs, provides, dict(info)))

    return register
