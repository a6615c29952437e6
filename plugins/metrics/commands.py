"""The metrics plugin's commands: ``handforge evaluate`` and ``handforge fit-judge``.

    handforge evaluate --real SRC --fake SRC --metrics fid,prdc [--num N] [--json]
    handforge fit-judge SRC --out judge.safetensors [--size 32] [--epochs 15] [--val SRC]

(``handforge weights fetch/list`` is the core's, :mod:`handforge.weights`; the FID Inception is
registered with it in :mod:`.weight_files`.)

A SRC is an image folder, a run directory or ``dataset:NAME[:key=value,...]`` (:mod:`.sources`).
"""
from __future__ import annotations

import json
import pathlib
import time

import attrs

from handforge.errors import HandforgeError

DEFAULT_NUM = 10_000
# evaluate's flags that set a metric option of the same name, for the metrics that have it.
OPTION_FLAGS = ("extractor", "resize", "weights", "classifier", "k", "splits", "size", "epochs", "seed",
                "batch_size", "regressor")


# -- evaluate ----------------------------------------------------------------------------------------


def configure_evaluate(p) -> None:
    p.add_argument("--real", help="real images: an image folder, a run directory or dataset:NAME[:k=v,...]")
    p.add_argument("--fake", help="generated images: an image folder, a run directory or dataset:NAME[:k=v,...]")
    p.add_argument("--metrics", required=True, help="comma-separated metric names, e.g. fid,prdc (see "
                                                    "`handforge list metric`)")
    p.add_argument("--num", type=int, default=DEFAULT_NUM,
                   help=f"images per side, at most (default {DEFAULT_NUM}; a folder gives at most what it holds)")
    p.add_argument("--extractor", help="feature extractor of fid/prdc: inception_fid (default) or hand_features")
    p.add_argument("--resize", choices=["clean", "legacy"], help="inception_fid's resize to 299 px (default clean)")
    p.add_argument("--weights", help="the Inception weight file, if not in the default location")
    p.add_argument("--classifier", help="a judge classifier checkpoint: for is, and for --extractor hand_features")
    p.add_argument("--regressor", help="pose_fidelity: a finished keypoints run directory (the judge of poses)")
    p.add_argument("--k", type=int, help="prdc's nearest neighbours (default 5)")
    p.add_argument("--splits", type=int, help="is: score in this many parts (default 1)")
    p.add_argument("--size", type=int, help="cas: the judge's input size (default 32)")
    p.add_argument("--epochs", type=int, help="cas: the judge's training epochs (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of folder subsets and of a run's noise (default 0)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="images per batch (default 64)")
    p.add_argument("--skip-bad", action="store_true", help="pass over unreadable image files (counted) instead of stopping")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached real statistics")
    p.add_argument("--device", default="cpu", help="where features are computed (default cpu)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def resolve_metric(name: str, args, host):
    """The metric component ``name`` with the options the command line gave it, validated but not
    built (building looks up weight files)."""
    from handforge.recipe import resolve_component

    entry = host.registry("metric").get(name)  # unknown name: an error listing near matches
    fields = {f.name for f in attrs.fields(entry.config_cls)} if entry.config_cls is not None else set()
    table = {"name": name}
    for flag in OPTION_FLAGS:
        value = getattr(args, flag, None)
        if value is not None and flag in fields:
            table[flag] = value
    return resolve_component(table, "metric", f"--metrics {name}", host=host)


def build_metric(name: str, args, host, component=None):
    """The metric ``name`` built with the options the command line gave it."""
    component = component or resolve_metric(name, args, host)
    entry = component.entry
    metric = component.build()
    if not callable(getattr(metric, "measure", None)):
        raise HandforgeError(f"metric '{name}' ({entry.origin}) measures a training run only; "
                             f"it cannot be run on --real/--fake sources")
    return metric


def evaluate(args, host=None) -> dict:
    """Run ``args.metrics`` on the ``--real`` / ``--fake`` sources; the JSON report as a dict."""
    from handforge.plugin_manager import get_host

    from .inputs import SourceInputs

    host = host or get_host()
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    if not names:
        raise HandforgeError("--metrics: name at least one metric (e.g. --metrics fid,prdc)")
    if args.num is not None and args.num < 2:
        raise HandforgeError(f"--num must be at least 2, got {args.num}")
    components = [(name, resolve_metric(name, args, host)) for name in names]  # names and options first
    if not (args.real or args.fake):
        raise HandforgeError("give --real and/or --fake images")
    started = time.perf_counter()
    sources = open_sources(args, host)  # every input problem, before any weight file is looked up
    metrics = [(name, build_metric(name, args, host, component)) for name, component in components]
    inputs = SourceInputs(sources["real"], sources["fake"], batch_size=args.batch_size or 64,
                          cache=not args.no_cache, device=args.device)
    values = {}
    for name, metric in metrics:
        inputs.metric = name
        values.update({k: float(v) for k, v in metric.measure(inputs).items()})
    report = {"metrics": values, "seconds": round(time.perf_counter() - started, 3)}
    for side, source in sources.items():
        if source is not None:
            report[side] = {"source": source.description, "images": len(source), "skipped": source.skipped}
    return report


def open_sources(args, host) -> dict:
    """The ``--real`` and ``--fake`` sources (None where not given), each opened and its images
    checked (:meth:`Source.problems`); the problems of both sides are reported together."""
    from .sources import open_source

    sources, problems = {}, []
    for side in ("real", "fake"):
        text, option = getattr(args, side), f"--{side}"
        sources[side] = None
        if not text:
            continue
        try:
            source = open_source(text, num=args.num, seed=args.seed, skip_bad=args.skip_bad, option=option, host=host)
        except HandforgeError as exc:
            message = str(exc)
            if message.startswith(option):
                problems.append(message)
            else:  # a message that names its file or folder needs only the option before it
                named = message.startswith((text, str(pathlib.Path(text))))
                problems.append(f"{option} {message}" if named else f"{option} {text}: {message}")
            continue
        problems += [f"{option} {problem}" for problem in source.problems()]
        sources[side] = source
    if len(problems) == 1:
        raise HandforgeError(problems[0])
    if problems:
        raise HandforgeError(f"{len(problems)} problems with the input images:\n" + "\n".join(f"  - {p}" for p in problems))
    return sources


def cmd_evaluate(args) -> int:
    report = evaluate(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for side in ("real", "fake"):
        if side in report:
            info = report[side]
            skipped = f", {info['skipped']} unreadable skipped" if info["skipped"] else ""
            print(f"{side}: {info['source']}, {info['images']} images{skipped}")
    width = max(len(name) for name in report["metrics"])
    for name, value in report["metrics"].items():
        print(f"  {name:<{width}}  {value:.6g}")
    print(f"({report['seconds']:.1f} s)")
    return 0


# -- fit-judge ---------------------------------------------------------------------------------------


def configure_fit_judge(p) -> None:
    p.add_argument("source", help="labelled images: a folder with class sub-folders or labels.json, "
                                  "or dataset:NAME[:k=v,...]")
    p.add_argument("--out", required=True, help="the checkpoint to write (.safetensors)")
    p.add_argument("--num", type=int, default=5000, help="training images, at most (default 5000)")
    p.add_argument("--val", help="labelled images to report the accuracy on (e.g. dataset:NAME:split=val)")
    p.add_argument("--val-num", dest="val_num", type=int, default=1000, help="validation images, at most (default 1000)")
    p.add_argument("--size", type=int, default=32, help="input size the images are resized to, px (default 32)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    p.add_argument("--width", type=int, default=32, help="first-stage channels; 2x per stage (default 32)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="default 64")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule (default 2e-3)")
    p.add_argument("--no-flip", action="store_true", help="no left-right flips in training (for classes a mirror changes)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--skip-bad", action="store_true", help="pass over unreadable image files")


def _labelled(text: str, num: int, args, option: str):
    from .sources import open_source

    source = open_source(text, num=num, seed=args.seed, skip_bad=args.skip_bad, option=option)
    if not source.has_labels:
        raise HandforgeError(f"{option} {text}: the judge learns from labelled images, and {source.description} "
                             f"has no labels (use class sub-folders, a `handforge prepare` folder or a labelled dataset)")
    return source, source.read_all(args.batch_size)


def cmd_fit_judge(args) -> int:
    from .cas import align_labels
    from .judge_classifier import JudgeClassifier, accuracy

    for flag in ("num", "size", "epochs", "width", "batch_size"):
        if getattr(args, flag) < 1:
            raise HandforgeError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    source, train = _labelled(args.source, args.num, args, "fit-judge")
    names = source.class_names
    print(f"training a judge on {len(train.images)} images of {len(names)} classes from {source.description}, "
          f"{args.size} px, {args.epochs} epochs")
    started = time.perf_counter()

    def progress(epoch, loss):
        print(f"  epoch {epoch}/{args.epochs}: loss {loss:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)

    judge = JudgeClassifier.fit(train.images, train.labels, class_names=names, size=args.size, epochs=args.epochs,
                                seed=args.seed, width=args.width, batch_size=args.batch_size, lr=args.lr,
                                flip=not args.no_flip, progress=progress)
    judge.save(args.out)
    scores = accuracy(judge, train.images, train.labels)
    print(f"train accuracy {scores['top1']:.4f} (class mean {scores['class_mean']:.4f})")
    if args.val:
        val_source, val = _labelled(args.val, args.val_num, args, "--val")
        labels = align_labels(val, val_source.class_names, names, where="--val")
        scores = accuracy(judge, val.images, labels)
        print(f"val accuracy {scores['top1']:.4f} (class mean {scores['class_mean']:.4f}) on {len(labels)} images "
              f"from {val_source.description}")
    print(f"wrote {args.out}")
    return 0


def add_commands(cli) -> None:
    cli.add_command("evaluate", "measure generated images against real ones (fid, is, prdc, cas)",
                    configure_evaluate, cmd_evaluate)
    cli.add_command("fit-judge", "train the judge classifier that is, hand_features (FHD) and cas use",
                    configure_fit_judge, cmd_fit_judge)
