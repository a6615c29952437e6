"""``handforge`` command line (``run.py`` is the same entry, for ``accelerate launch run.py ...``).

Every error a user can cause prints one message and exits with code 2; ``HANDFORGE_DEBUG=1``
shows the traceback instead.
"""
import argparse
import json
import os
import sys
import time

import attrs

from .errors import HandforgeError
from .plugin_manager import get_host
from .registry import KINDS, did_you_mean
from .weights import configure_weights_parser, weights_command


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser. With ``intermixed = True`` its positionals may follow its flags
    (``prepare DATASET --num 8 size=64``): plain argparse fills a ``nargs="*"`` positional only
    where it starts and rejects the ``key=value`` words after the flags."""

    intermixed = False
    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if not self.intermixed or self._parsing:  # parse_known_intermixed_args calls back in here
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


@attrs.frozen
class Preparer:
    """A plugin's ``handforge prepare NAME ...`` converter (e.g. a public dataset's download -> JSON)."""

    name: str
    help: str
    parser: argparse.ArgumentParser
    plugin: str  # who added it, for collision messages


class CommandLine:
    """What the ``register_commands(cli)`` hook receives: add subcommands to ``handforge``."""

    def __init__(self, subparsers):
        self._subparsers = subparsers
        self.names: list[str] = []
        self.parsers: dict[str, argparse.ArgumentParser] = {}
        self.preparers: dict[str, Preparer] = {}
        self.plugin = "handforge"  # the plugin whose register_commands is running

    def add_command(self, name: str, help: str, configure, handler) -> None:
        """``configure(parser)`` adds arguments; ``handler(args)`` runs the command (returns an exit code or None)."""
        parser = self._subparsers.add_parser(name, help=help, description=help)
        configure(parser)
        parser.set_defaults(handler=handler)
        self.names.append(name)
        self.parsers[name] = parser

    def add_preparer(self, name: str, help: str, configure, handler) -> None:
        """``handforge prepare NAME ARGS...`` runs ``handler(args)`` with ARGS parsed by the parser that
        ``configure(parser)`` filled. A preparer's name takes precedence over a dataset of that name."""
        previous = self.preparers.get(name)
        if previous is not None:
            raise HandforgeError(f"preparer '{name}' is added twice: by {previous.plugin} and by {self.plugin}")
        parser = CommandParser(prog=f"handforge prepare {name}", description=help)
        configure(parser)
        parser.set_defaults(handler=handler)
        self.preparers[name] = Preparer(name, help, parser, self.plugin)

    def parse(self, parser: argparse.ArgumentParser, argv: list[str], datasets=None) -> argparse.Namespace:
        """``argv`` parsed by the preparer it names, else by ``parser`` (the whole command line).
        ``datasets`` (the registered dataset names) lets a mistyped ``prepare NAME`` say what exists,
        instead of argparse asking for the dataset form's --num."""
        if len(argv) >= 2 and argv[0] == "prepare" and argv[1] in self.preparers:
            return self.preparers[argv[1]].parser.parse_args(argv[2:])
        if (len(argv) >= 2 and argv[0] == "prepare" and not argv[1].startswith("-") and datasets is not None
                and argv[1] not in datasets):
            known = sorted(self.preparers) + sorted(datasets)
            raise HandforgeError(f"prepare: '{argv[1]}' is neither a converter nor a dataset"
                                 f"{did_you_mean(argv[1], known)}; converters: {', '.join(sorted(self.preparers)) or 'none'}; "
                                 f"datasets: {', '.join(sorted(datasets))}")
        return parser.parse_args(argv)

    def list_preparers(self) -> None:
        """Name the preparers in ``handforge prepare --help``, under the dataset form's options."""
        prepare = self.parsers.get("prepare")
        if prepare is None or not self.preparers:
            return
        width = max(len(n) for n in self.preparers)
        lines = [f"  {p.name:<{width}}  {p.help}" for p in sorted(self.preparers.values(), key=lambda p: p.name)]
        prepare.formatter_class = argparse.RawDescriptionHelpFormatter  # keep one preparer per line
        prepare.epilog = ("converters (handforge prepare NAME ARGS...; NAME --help shows its arguments):\n"
                          + "\n".join(lines))


def _kind(text: str) -> str:
    kind = text[:-1] if text.endswith("s") and text[:-1] in KINDS else text
    kind = "loss" if text == "losses" else kind
    if kind not in KINDS:
        raise HandforgeError(f"unknown kind '{text}'{did_you_mean(text, KINDS)}; kinds: {', '.join(KINDS)}")
    return kind


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, default=str))


# -- commands -----------------------------------------------------------------------------------


def cmd_run(args) -> int:
    from .loop import train
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    started = time.perf_counter()
    run = train(recipe)
    if run.is_main_process:
        print(f"run finished: {recipe.train.steps} steps in {time.perf_counter() - started:.1f} s -> {run.run_dir}")
    return 0


def cmd_validate(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    slots = ", ".join(f"{slot}={c.name}" for slot, c in recipe.model.items())
    metrics = ", ".join(m.name for m in recipe.metrics) or "none"
    print(f"{args.recipe}: ok — task '{recipe.task.name}' on dataset '{recipe.data.name}'; "
          f"model: {slots or 'no slots'}; metrics: {metrics}; run dir: {recipe.run_dir}")
    return 0


def cmd_plugins(args) -> int:
    host = get_host()
    rows = [attrs.asdict(p) for p in host.plugins]
    if args.json:
        _print_json(rows)
        return 0
    for p in host.plugins:
        version = f"{p.dist} {p.version}" if p.dist else p.source
        status = f"FAILED: {p.error}" if p.error else ", ".join(p.hooks)
        print(f"{p.name}  [{version}]  {status}")
    return 0


def _entry_row(entry) -> dict:
    return {"kind": entry.kind, "name": entry.name, "summary": entry.summary, "plugin": entry.plugin,
            "dist": entry.dist, "version": entry.version}


def cmd_list(args) -> int:
    host = get_host()
    kinds = [_kind(args.kind)] if args.kind else list(KINDS)
    rows = [_entry_row(host.registry(k).get(n)) for k in kinds for n in host.registry(k).names(args.pattern)]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no {' or '.join(kinds)} matches '{args.pattern}'")
        return 0
    width = max(len(r["name"]) for r in rows)
    for kind in kinds:
        listed = [r for r in rows if r["kind"] == kind]
        if listed and len(kinds) > 1:
            print(f"{kind}:")
        for r in listed:
            print(f"  {r['name']:<{width}}  {r['summary']}  [{r['plugin']}]")
    return 0


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def describe_entry(entry) -> dict:
    fields = []
    if entry.config_cls is not None:
        for f in attrs.fields(entry.config_cls):
            default = f.default
            if isinstance(default, attrs.Factory):
                default = default.factory() if not default.takes_self else None
            fields.append({"name": f.name, "type": _type_name(f.type),
                           "default": None if default is attrs.NOTHING else default,
                           "required": default is attrs.NOTHING, "help": f.metadata.get("help", "")})
    info = {k: [attrs.asdict(s) for s in v] if k == "slots" else v for k, v in entry.info.items()}
    return {**_entry_row(entry), "doc": (entry.factory.__doc__ or "").strip(), "options": fields,
            "needs": None if callable(entry.needs) else sorted(entry.needs),
            "provides": None if callable(entry.provides) else sorted(entry.provides), **info}


def cmd_show(args) -> int:
    entry = get_host().registry(_kind(args.kind)).get(args.name)
    described = describe_entry(entry)
    if args.json:
        _print_json(described)
        return 0
    print(f"{entry.kind} '{entry.name}' from {entry.origin}")
    if described["doc"]:
        print("\n" + described["doc"] + "\n")
    for key in ("needs", "provides"):
        value = described[key]
        if value is None:
            print(f"{key}: depends on the options")
        elif value:
            print(f"{key}: {', '.join(value)}")
    for slot in described.get("slots", []):
        fill = f"default '{slot['default']}'" if slot["default"] else ("optional" if slot["optional"] else "required")
        print(f"slot model.{slot['name']}: {slot['kind']} ({fill}) {slot['summary']}")
    if not described["options"]:
        print("options: none")
    for f in described["options"]:
        default = "required" if f["required"] else f"default {json.dumps(f['default'], default=str)}"
        print(f"  {f['name']}: {f['type']} ({default})  {f['help']}")
    return 0


def cmd_inspect(args) -> int:
    import torch

    from .data import check_sample, collate
    from .imaging import save_grid
    from .recipe import apply_overrides, resolve_component

    table = apply_overrides({"name": args.dataset}, args.options)
    component = resolve_component(table, "dataset", "dataset")
    dataset = component.build(split=args.split)
    count = min(args.num, len(dataset))
    samples = [dataset[i] for i in range(count)]
    names = list(getattr(dataset, "class_names", []) or [])
    rows = []
    for i, sample in enumerate(samples):
        check_sample(sample, where=f"dataset '{args.dataset}' sample {i}")
        row = {"index": i, "shapes": {k: list(v.shape) for k, v in sample.items()}}
        for key, value in sample.items():
            if value.ndim == 0:
                row[key] = value.item()
            elif key in ("keypoints", "joints3d", "hand_pose", "hand_pose90"):
                row[key] = [round(x, 4) for x in value.flatten().tolist()]
        if "label" in sample and names:
            row["label_name"] = names[sample["label"].item()]
        rows.append(row)
    if args.grid and samples:
        batch = collate(samples)
        save_grid(args.grid, batch["image"], keypoints=batch.get("keypoints"),
                  captions=[r.get("label_name", str(r["index"])) for r in rows])
    if args.json:
        _print_json({"dataset": args.dataset, "length": len(dataset), "class_names": names, "samples": rows})
        return 0
    print(f"dataset '{args.dataset}' ({component.entry.origin}): {len(dataset)} samples, "
          f"{len(names)} classes" + (f": {', '.join(names)}" if names else ""))
    for row in rows:
        shapes = ", ".join(f"{k}{tuple(v)}" for k, v in row["shapes"].items())
        label = f"  label {row['label']} ({row.get('label_name', '?')})" if "label" in row else ""
        print(f"[{row['index']}]{label}  {shapes}")
        if "keypoints" in row:
            kp = torch.tensor(row["keypoints"]).reshape(-1, 3)
            visible = int(kp[:, 2].sum().item())
            print(f"     keypoints: {visible}/21 visible, wrist ({kp[0, 0]:.3f}, {kp[0, 1]:.3f}), "
                  f"x in [{kp[:, 0].min():.3f}, {kp[:, 0].max():.3f}], y in [{kp[:, 1].min():.3f}, {kp[:, 1].max():.3f}]")
    if args.grid:
        print(f"grid written to {args.grid}")
    return 0


def cmd_prepare(args) -> int:
    from .prepare import prepare

    result = prepare(args.dataset, args.num, args.out, size=args.size, seed=args.seed, split=args.split,
                     batch=args.batch, overwrite=args.overwrite, options=args.options)
    print(result.summary())
    return 0


# -- parser and entry point --------------------------------------------------------------------


def build_parser(host=None) -> tuple[argparse.ArgumentParser, CommandLine]:
    host = host or get_host()
    parser = argparse.ArgumentParser(prog="handforge", description="Synthetic hand data: train, evaluate, generate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    cli = CommandLine(sub)

    def recipe_args(p):
        p.add_argument("recipe", help="a TOML recipe")
        p.add_argument("overrides", nargs="*", help="key.path=value, the value read as TOML (train.steps=200)")

    def json_flag(p):
        p.add_argument("--json", action="store_true", help="machine-readable output")

    def list_args(p):
        p.add_argument("kind", nargs="?", help=f"one of: {', '.join(KINDS)} (all when left out)")
        p.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. '*gan*'")
        json_flag(p)

    def show_args(p):
        p.add_argument("kind")
        p.add_argument("name")
        json_flag(p)

    def inspect_args(p):
        p.intermixed = True  # options may follow the flags, as with prepare
        p.add_argument("dataset", help="a registered dataset name")
        p.add_argument("options", nargs="*", help="dataset options as option=value (size=64)")
        p.add_argument("--num", type=int, default=4, help="how many samples (default 4)")
        p.add_argument("--split", default="train", choices=["train", "val"])
        p.add_argument("--grid", help="write a PNG grid of the samples with keypoints drawn")
        json_flag(p)

    def prepare_args(p):
        p.intermixed = True  # the usage puts key=value options after the flags
        p.add_argument("dataset", help="a registered dataset name (or a converter's, listed below)")
        p.add_argument("options", nargs="*", help="dataset options as option=value, the value read as TOML (length=1000)")
        p.add_argument("--num", type=int, required=True, help="how many samples: indices 0 .. NUM-1")
        p.add_argument("--out", required=True, help="folder to write (must be new or empty unless --overwrite)")
        p.add_argument("--size", type=int, help="shortcut for the dataset option size=S")
        p.add_argument("--seed", type=int, help="shortcut for the dataset option seed=K")
        p.add_argument("--split", default="train", choices=["train", "val"])
        p.add_argument("--batch", type=int, default=64, help="samples fetched per call (default 64)")
        p.add_argument("--overwrite", action="store_true",
                       help="write into a non-empty folder, replacing an earlier prepare's images and labels")

    cli.add_command("run", "train a recipe (resume=true continues its latest checkpoint)", recipe_args, cmd_run)
    cli.add_command("validate", "check a recipe completely without training", recipe_args, cmd_validate)
    cli.add_command("plugins", "list loaded plugins with versions, hooks and load failures", json_flag, cmd_plugins)
    cli.add_command("list", "list registered components of a kind", list_args, cmd_list)
    cli.add_command("show", "show a component's options, types, defaults and docs", show_args, cmd_show)
    cli.add_command("inspect", "load a dataset and print (or draw) its first samples", inspect_args, cmd_inspect)
    cli.add_command("weights", "fetch or list the pretrained weight files plugins registered",
                    configure_weights_parser, weights_command)
    cli.add_command("prepare", "write a dataset's first N samples as PNG files plus labels.json, "
                    "or run a plugin's converter (prepare --help lists them)", prepare_args,
                    cmd_prepare)
    # One plugin at a time, in load order (built-ins first, as the registries fill), so a
    # collision can name the plugins involved.
    labels = {p.name: p.label for p in host.plugins}
    for impl in host.pm.hook.register_commands.get_hookimpls():
        cli.plugin = labels.get(impl.plugin_name, impl.plugin_name)
        impl.function(cli=cli)
    cli.plugin = "handforge"
    cli.list_preparers()
    return parser, cli


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("HANDFORGE_DEBUG", "") not in ("", "0")
    try:
        parser, cli = build_parser()
        # `accelerate launch run.py recipe.toml ...` means `run recipe.toml ...`.
        if argv and not argv[0].startswith("-") and argv[0] not in cli.names:
            argv.insert(0, "run")
        args = cli.parse(parser, argv, datasets=get_host().registry("dataset").names())
        if not getattr(args, "handler", None):
            parser.print_help()
            sys.exit(2)
        code = args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one place errors become messages
        if debug:
            raise
        if isinstance(exc, HandforgeError):
            message = str(exc)
        else:
            message = f"{type(exc).__name__}: {exc} (HANDFORGE_DEBUG=1 shows the traceback)"
        print(f"handforge: error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
