"""Recipes: TOML files that name components; validated all at once, each problem with its TOML path.

A recipe has top-level scalars (``name``, ``seed``, ``output_dir``, ``resume``, ``plugins``),
component tables ``{name = "...", ...options}`` (``[task]``, ``[data]``, ``[model.<slot>]``,
``[[eval.metrics]]``) and the ``[train]`` / ``[eval]`` settings. One cattrs converter with
``forbid_extra_keys=True`` and strict scalar types structures everything: ``"64"`` is not an int.
"""
import hashlib
import pathlib
import re
import sys
from typing import Any, Literal

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from .contracts import StreamingDataset, check_built, missing_on_class
from .errors import HandforgeError, RecipeError
from .registry import Entry, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@attrs.define(eq=False)
class Component:
    """A recipe's component table resolved against the registry: ``{name = "...", ...options}``."""

    name: str
    config: Any  # instance of entry.config_cls, or None when the component takes no options
    entry: Entry
    path: str  # TOML path of the table, e.g. "model.generator"

    def build(self, **context):
        """Call the component's factory with its validated config and the caller's context; the
        result must meet its kind's contract (:mod:`handforge.contracts`), or ContractError."""
        built = self.entry.factory(self.config, **context)
        check_built(self.entry, built, context, self.config, self.path)
        return built

    @property
    def fields_needed(self) -> frozenset:
        return self.entry.fields_needed(self.config)


# -- strict structuring ----------------------------------------------------------------------


class TypeMismatch(Exception):
    """A TOML value of the wrong type (cattrs would otherwise coerce "64" into 64)."""


def describe(value) -> str:
    if isinstance(value, str):
        return f'str "{value}"'
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {value!r}"


def _strict(tp):
    def structure(value, _):
        if isinstance(value, bool) and tp is not bool:
            raise TypeMismatch(f"expected {tp.__name__}, got {describe(value)}")
        if tp is float and isinstance(value, int):
            return float(value)
        if isinstance(value, tp):
            return value
        raise TypeMismatch(f"expected {tp.__name__}, got {describe(value)}")

    return structure


def _literal(tp, _):
    choices = tp.__args__

    def structure(value, _):
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise TypeMismatch(f"expected one of {', '.join(repr(c) for c in choices)}, got {describe(value)}")

    return structure


converter = cattrs.Converter(forbid_extra_keys=True)
for _tp in (int, float, str, bool):
    converter.register_structure_hook(_tp, _strict(_tp))
converter.register_structure_hook_factory(lambda t: getattr(t, "__origin__", None) is Literal, _literal)
converter.register_unstructure_hook(pathlib.PurePath, str)


def at_least(minimum):
    """attrs validator: ``value >= minimum``, with a message the recipe loader prefixes with its path."""

    def check(_instance, attribute, value):
        if value < minimum:
            raise ValueError(f"{attribute.name}: must be >= {minimum}, got {value!r}")

    return check


_ATTRS_MESSAGE = re.compile(r"^'(\w+)' (must .*)$", re.S)


def _problems(exc: BaseException, path: str):
    """Flatten a cattrs error tree into 'toml.path: message' lines."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        with_notes, without_notes = exc.group_exceptions()
        for sub, note in with_notes:
            name, index = getattr(note, "name", None), getattr(note, "index", None)
            sub_path = f"{path}.{name}" if name is not None else f"{path}[{index}]"
            yield from _problems(sub, sub_path)
        for sub in without_notes:
            yield from _problems(sub, path)
    elif isinstance(exc, ForbiddenExtraKeysError):
        allowed = [f.name for f in attrs.fields(exc.cl)]
        for key in sorted(exc.extra_fields):
            yield f"{path}.{key}: unknown key{did_you_mean(key, allowed)}"
    elif isinstance(exc, KeyError):
        yield f"{path}: required key missing"
    elif isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _problems(sub, path)
    elif isinstance(exc, ValueError) and _ATTRS_MESSAGE.match(str(exc)):
        field, message = _ATTRS_MESSAGE.match(str(exc)).groups()  # attrs' ge/le/in_: "'size' must be >= 16: 8"
        yield f"{path}.{field}: {message}"
    elif isinstance(exc, ValueError) and ": " in str(exc) and str(exc).split(": ", 1)[0].isidentifier():
        field, message = str(exc).split(": ", 1)  # from at_least(): "steps: must be >= 1, got 0"
        yield f"{path}.{field}: {message}"
    else:
        yield f"{path}: {exc}"


def _validator_problems(value: dict, cls, path: str) -> list:
    """Run each field's validator alone on its well-typed value: when some other field has the
    wrong type, attrs never gets to validate, and the user should still hear of every problem."""
    found = []
    for field in attrs.fields(cls):
        if field.validator is None or field.name not in value:
            continue
        try:
            typed = converter.structure(value[field.name], field.type)
        except Exception:  # noqa: BLE001 - already reported as a type problem
            continue
        try:
            field.validator(None, field, typed)
        except Exception as exc:  # noqa: BLE001
            found.extend(_problems(exc, path))
    return found


def structure(value, cls, path: str, problems: list):
    """Structure ``value`` into ``cls``; on failure append each problem and return None."""
    try:
        return converter.structure(value, cls)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a located problem
        found = list(_problems(exc, path))
        if attrs.has(cls) and isinstance(value, dict):
            found += [p for p in _validator_problems(value, cls, path) if p not in found]
        problems.extend(found)
        return None


# -- schema ----------------------------------------------------------------------------------


@attrs.define
class TrainConfig:
    """How long and how a run trains; the schedules are in steps (0 = only at the end)."""

    steps: int = attrs.field(default=1000, validator=at_least(1))
    batch_size: int = attrs.field(default=64, validator=at_least(1))
    num_workers: int = attrs.field(default=0, validator=at_least(0))
    # "index": a sampler over dataset[i]; "stream": the dataset's stream() (handforge.contracts.StreamingDataset)
    read: Literal["index", "stream"] = "index"
    log_every: int = attrs.field(default=50, validator=at_least(1))
    sample_every: int = attrs.field(default=0, validator=at_least(0))
    checkpoint_every: int = attrs.field(default=0, validator=at_least(0))
    keep_last: int = attrs.field(default=3, validator=at_least(1))
    grad_accum: int = attrs.field(default=1, validator=at_least(1))
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    progress: bool = True
    tensorboard: bool = True


@attrs.define
class EvalConfig:
    """Evaluation schedule; the metrics themselves are the ``[[eval.metrics]]`` component tables."""

    every: int = attrs.field(default=0, validator=at_least(0))
    best_metric: str = ""
    best_mode: Literal["min", "max"] = "min"


TOP_LEVEL = {
    "name": str, "seed": int, "output_dir": str, "resume": bool, "plugins": list[str],
    "task": dict, "data": dict, "model": dict, "train": dict, "eval": dict,
}


@attrs.define(eq=False)
class Recipe:
    """A fully resolved and validated recipe."""

    source: pathlib.Path | None
    name: str
    seed: int
    output_dir: str
    resume: bool
    plugins: list
    task: Component
    data: Component
    model: dict
    train: TrainConfig
    eval: EvalConfig
    metrics: list

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        """The resolved recipe (defaults filled in), loadable again as it is."""
        return {
            "name": self.name, "seed": self.seed, "output_dir": self.output_dir, "resume": self.resume,
            "plugins": list(self.plugins),
            "task": self.task.to_dict(), "data": self.data.to_dict(),
            "model": {slot: c.to_dict() for slot, c in self.model.items()},
            "train": plain(converter.unstructure(self.train)),
            "eval": {**plain(converter.unstructure(self.eval)), "metrics": [m.to_dict() for m in self.metrics]},
        }

    def digest(self) -> str:
        """SHA-256 of the resolved recipe minus run-control keys: identifies what was trained."""
        from .toml_writer import dumps

        content = {k: v for k, v in self.to_dict().items() if k not in ("resume", "output_dir")}
        return hashlib.sha256(dumps(content).encode()).hexdigest()


def plain(value):
    """Unstructured config values as TOML can hold them (tuples become arrays)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _component_to_dict(self) -> dict:
    options = plain(converter.unstructure(self.config)) if self.config is not None else {}
    return {"name": self.name, **options}


Component.to_dict = _component_to_dict


# -- reading, overrides, resolution ------------------------------------------------------------


def read_toml(path) -> dict:
    file = pathlib.Path(path)
    if not file.is_file():
        raise RecipeError(["file not found"], source=path)
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"invalid TOML: {exc}"], source=path) from None
    except UnicodeDecodeError as exc:
        raise RecipeError([f"not UTF-8 text: {exc}"], source=path) from None


def parse_override(text: str):
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is read as TOML, a bare word as a string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError([f"override {text!r}: expected key.path=value"])
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides) -> dict:
    problems = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except RecipeError as exc:
            problems += exc.problems
            continue
        node = raw
        for depth, key in enumerate(keys[:-1]):
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            elif isinstance(node, dict):
                node = node.setdefault(key, {})
            else:
                node = None
            if not isinstance(node, (dict, list)):
                problems.append(f"override {text!r}: {where} is not a table")
                break
        else:
            last = keys[-1]
            if isinstance(node, list):
                if not (last.isdigit() and int(last) < len(node)):
                    problems.append(f"override {text!r}: no item {last} in {'.'.join(keys[:-1])}")
                    continue
                node[int(last)] = value
            else:
                node[last] = value
    if problems:
        raise RecipeError(problems)
    return raw


def run_name_problems(name: str) -> list[str]:
    """Why ``name`` cannot name a run directory: it must be one path component, so that the run
    stays inside ``output_dir`` (``../x`` or ``/tmp/x`` would write elsewhere)."""
    if not isinstance(name, str):
        return []  # already reported as a type problem
    reasons = []
    if not name.strip():
        reasons.append("is empty")
    elif name in (".", ".."):
        reasons.append(f"is {name!r}, which is not a folder of its own")
    elif pathlib.PurePosixPath(name).is_absolute() or pathlib.PureWindowsPath(name).is_absolute():
        reasons.append("is an absolute path")
    elif "/" in name or "\\" in name:
        reasons.append("holds a path separator")
    if "\0" in name:
        reasons.append("holds a NUL character")
    return [f"name: {name!r} {reason}; the run directory is <output_dir>/<name>, so a name is one folder "
            f"name (letters, digits, - _ .), never a path" for reason in reasons]


class _Resolver:
    def __init__(self, host, source):
        self.host, self.source, self.problems = host, source, []

    def component(self, table, kind: str, path: str) -> Component | None:
        if not isinstance(table, dict):
            self.problems.append(f'{path}: expected a table {{name = "..."}}, got {describe(table)}')
            return None
        name = table.get("name")
        if name is None:
            self.problems.append(f"{path}.name: required key missing (which {kind}? see `handforge list {kind}`)")
            return None
        if not isinstance(name, str):
            self.problems.append(f"{path}.name: expected str, got {describe(name)}")
            return None
        try:
            entry = self.host.registry(kind).get(name)
        except HandforgeError as exc:
            self.problems.append(f"{path}.name: {exc}")
            return None
        options = {k: v for k, v in table.items() if k != "name"}
        if entry.config_cls is None:
            self.problems += [f"{path}.{k}: unknown key ({kind} '{name}' takes no options)" for k in options]
            return Component(name, None, entry, path)
        config = structure(options, entry.config_cls, path, self.problems)
        return None if config is None else Component(name, config, entry, path)

    def scalar(self, raw, key, default):
        if key not in raw:
            return default
        value = structure(raw[key], TOP_LEVEL[key], key, self.problems)
        return default if value is None else value

    def section(self, raw, key, cls):
        table = raw.get(key, {})
        if not isinstance(table, dict):
            self.problems.append(f"{key}: expected a table, got {describe(table)}")
            return cls()
        return structure(table, cls, key, self.problems) or cls()


def resolve(raw: dict, source=None, host=None) -> Recipe:
    """Validate a recipe dict against the registries; raise RecipeError listing every problem."""
    from .plugin_manager import get_host

    host = host or get_host()
    source = pathlib.Path(source) if source else None
    r = _Resolver(host, source)
    for key in raw:
        if key not in TOP_LEVEL:
            r.problems.append(f"{key}: unknown key{did_you_mean(key, TOP_LEVEL)}")

    plugins = r.scalar(raw, "plugins", [])
    base_dir = source.parent if source else pathlib.Path.cwd()
    resolved_plugins = []
    for i, plugin_file in enumerate(plugins):
        try:
            resolved_plugins.append(host.load_file(plugin_file, base_dir=base_dir).name)
        except HandforgeError as exc:
            r.problems.append(f"plugins[{i}]: {exc}")

    default_name = source.stem if source else "run"
    name, seed = r.scalar(raw, "name", default_name), r.scalar(raw, "seed", 0)
    r.problems.extend(run_name_problems(name))
    output_dir, resume = r.scalar(raw, "output_dir", "runs"), r.scalar(raw, "resume", False)
    train = r.section(raw, "train", TrainConfig)
    eval_raw = dict(raw.get("eval", {})) if isinstance(raw.get("eval", {}), dict) else raw["eval"]
    metric_tables = eval_raw.pop("metrics", []) if isinstance(eval_raw, dict) else []
    evaluation = r.section({"eval": eval_raw}, "eval", EvalConfig)

    task = r.component(raw.get("task"), "task", "task") if "task" in raw else None
    if "task" not in raw:
        r.problems.append("task: required table missing (which task? see `handforge list task`)")
    data = r.component(raw.get("data"), "dataset", "data") if "data" in raw else None
    if "data" not in raw:
        r.problems.append("data: required table missing (which dataset? see `handforge list dataset`)")

    model = {}
    raw_model = raw.get("model", {})
    if not isinstance(raw_model, dict):
        r.problems.append(f"model: expected a table, got {describe(raw_model)}")
        raw_model = {}
    if task is not None:
        slots = {slot.name: slot for slot in task.entry.info.get("slots", ())}
        for key in raw_model:
            if key not in slots:
                listed = ", ".join(slots) or "none"
                r.problems.append(f"model.{key}: task '{task.name}' has no slot '{key}'"
                                  f"{did_you_mean(key, slots)}; its slots: {listed}")
        for slot in slots.values():
            table = raw_model.get(slot.name)
            if table is None and slot.default is not None:
                table = {"name": slot.default}
            if table is None:
                if not slot.optional:
                    r.problems.append(f"model.{slot.name}: required {slot.kind} slot of task '{task.name}' is missing")
                continue
            component = r.component(table, slot.kind, f"model.{slot.name}")
            if component is not None:
                model[slot.name] = component
                r.problems.extend(role_problems(component, slot, task.name))
        # A task may require slots by its options (a classifier's mode "mixgen" needs generated
        # images): it registers check_slots(config, filled slot names) -> problems.
        check_slots = task.entry.info.get("check_slots")
        if check_slots is not None and task.config is not None:
            filled = {name for name in slots if name in model or name in raw_model}
            r.problems.extend(check_slots(task.config, filled))

    if isinstance(metric_tables, list):
        metrics = [r.component(t, "metric", f"eval.metrics[{i}]") for i, t in enumerate(metric_tables)]
    else:
        r.problems.append(f"eval.metrics: expected an array of tables, got {describe(metric_tables)}")
        metrics = []
    metrics = [m for m in metrics if m is not None]

    if data is not None:
        provided = data.entry.fields_provided(data.config)
        for component in [c for c in [task] if c] + list(model.values()) + metrics:
            missing = sorted(component.fields_needed - provided)
            if missing:
                r.problems.append(
                    f"{component.path}: {component.entry.kind} '{component.name}' needs field "
                    f"{', '.join(repr(f) for f in missing)}; dataset '{data.name}' provides: {', '.join(sorted(provided))}")

    if data is not None and train.read == "stream":
        r.problems.extend(stream_problems(data))

    if r.problems:
        raise RecipeError(r.problems, source=source)
    return Recipe(source, name, seed, output_dir, resume, resolved_plugins, task, data, model, train,
                  evaluation, metrics)


def stream_problems(data: Component) -> list[str]:
    """``train.read = "stream"`` with a dataset class that has no ``stream`` method (a factory
    function's dataset is checked when the run builds it)."""
    factory = data.entry.factory
    if not isinstance(factory, type) or not missing_on_class(factory, [StreamingDataset]):
        return []
    return [f"train.read: \"stream\" needs a dataset with a stream(rank, world, epoch, shuffle) method; dataset "
            f"'{data.name}' ({data.entry.origin}) has none (read = \"index\" reads it by index)"]


def declared_roles(entry) -> tuple | None:
    """The roles a registered component says it serves, or None when it says nothing."""
    roles = entry.info.get("roles", getattr(entry.factory, "roles", None) if isinstance(entry.factory, type) else None)
    if isinstance(roles, (tuple, list, set, frozenset)) and all(isinstance(x, str) for x in roles):
        return tuple(roles)
    return None


def role_problems(component: Component, slot, task_name: str) -> list[str]:
    """A component in a slot whose role it does not serve (a GAN generator as a denoiser)."""
    role = getattr(slot, "role", None)
    roles = declared_roles(component.entry)
    if role is None or roles is None or role in roles:
        return []
    return [f"{component.path}: {component.entry.kind} '{component.name}' serves the {' and '.join(roles)} "
            f"role{'s' if len(roles) > 1 else ''}, not the {role} that task '{task_name}' builds here"]


def resolve_component(table: dict, kind: str, path: str, host=None) -> Component:
    """Validate one component table (``{name = ..., ...options}``) outside a recipe."""
    from .plugin_manager import get_host

    resolver = _Resolver(host or get_host(), None)
    component = resolver.component(table, kind, path)
    if resolver.problems:
        raise RecipeError(resolver.problems)
    return component


def load_recipe(path, overrides=(), host=None) -> Recipe:
    """Read, override and validate a recipe file."""
    raw = read_toml(path)
    try:
        apply_overrides(raw, overrides)
    except RecipeError as exc:
        raise RecipeError(exc.problems, source=path) from None
    return resolve(raw, source=path, host=host)
