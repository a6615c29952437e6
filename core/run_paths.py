"""Paths inside a run directory: every writer of a run asks :func:`run_path`, so a run writes only
inside ``<output_dir>/<name>``.

A symbolic link inside the run directory that leads out of it (``weights -> /elsewhere``) would
send the exported weights, checkpoints or logs there; :func:`run_path` refuses to write through
one. Links that stay inside the run directory, and a run directory (or ``output_dir``) that is
itself a link, are fine: containment is judged on the resolved paths.
"""
from __future__ import annotations

import os
import pathlib

from .errors import HandforgeError

# What the loop writes at the top of every run directory; checked on every process before the
# first write, so that all processes stop together rather than one while the others wait.
RUN_ENTRIES = ("recipe.toml", "plugins.lock", "metrics.jsonl", "tensorboard", "samples", "weights", "checkpoints")


def _inside(path: pathlib.Path, root: pathlib.Path) -> bool:
    return path == root or root in path.parents


def run_path(run_dir, *parts) -> pathlib.Path:
    """``run_dir / parts``, after checking that writing there stays inside ``run_dir``: no part is a
    symbolic link that resolves outside it, and no part but the last is a file. Raises a
    :class:`HandforgeError` naming the link and where it points."""
    run_dir = pathlib.Path(run_dir)
    root = run_dir.resolve()
    current = run_dir
    names = pathlib.PurePath(*parts).parts if parts else ()
    for depth, name in enumerate(names):
        current = current / name
        if current.is_symlink():
            target = current.resolve()
            if not _inside(target, root):
                raise HandforgeError(f"{current} is a symbolic link to {os.readlink(current)} ({target}), "
                                     f"outside the run directory {run_dir}; handforge writes a run only "
                                     f"inside its directory: remove the link")
        if depth < len(names) - 1 and current.exists() and not current.is_dir():
            raise HandforgeError(f"{current} is a file, not a folder; handforge writes its "
                                 f"{pathlib.PurePath(*names[depth + 1:])} there (move the file away)")
    return current


def run_folder(run_dir, *parts) -> pathlib.Path:
    """:func:`run_path`, created as a folder (with its parents) if missing."""
    folder = run_path(run_dir, *parts)
    if folder.exists() and not folder.is_dir():
        raise HandforgeError(f"{folder} is a file, not a folder (move the file away)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_run_dir(output_dir, name: str) -> pathlib.Path:
    """The run directory ``output_dir / name``, checked before a run writes anything: neither
    ``output_dir`` nor a parent of it nor the run directory is a file, and none of the entries the
    loop writes (:data:`RUN_ENTRIES`) is a link out of the run directory."""
    output_dir = pathlib.Path(output_dir)
    for folder in [*reversed(output_dir.parents), output_dir]:
        if folder.exists() and not folder.is_dir():
            where = f"{output_dir} is a file" if folder == output_dir else f"{output_dir}: its parent {folder} is a file"
            raise HandforgeError(f"output_dir: {where}, not a folder (the run directory is <output_dir>/<name>)")
    run_dir = output_dir / name
    if run_dir.exists() and not run_dir.is_dir():
        raise HandforgeError(f"name: {run_dir} is a file, not a folder (the run directory is <output_dir>/<name>)")
    for entry in RUN_ENTRIES:
        run_path(run_dir, entry)
    return run_dir
