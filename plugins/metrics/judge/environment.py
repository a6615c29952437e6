"""The hand judge's own Python environment: MediaPipe Hands cannot share handforge's.

MediaPipe 0.10.21 is the last release whose wheel carries the hand models (later ones fetch
``.task`` files at run time), and it needs numpy<2 while handforge runs on numpy 2. So the judge
runs in a separate virtual environment that handforge builds once, on first use, under the
user's cache folder, and never touches the network again:

- ``$HANDFORGE_JUDGE_PYTHON``: the Python of an existing environment with mediapipe, numpy<2
  and pillow; used as it is, nothing is installed;
- otherwise ``<cache>/judge-env-mediapipe-0.10.21`` (``$HANDFORGE_CACHE``, default
  ``~/.cache/handforge``), made by ``sys.executable -m venv`` and that environment's pip.

It is built in a temporary folder beside its final place and renamed into place only after the
install finished and a marker file recorded what was installed, so a killed install never
leaves a folder that looks usable. A lock file keeps two processes from building it at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from handforge.errors import HandforgeError
from handforge.weights import cache_dir

MEDIAPIPE_VERSION = "0.10.21"
ENV_NAME = f"judge-env-mediapipe-{MEDIAPIPE_VERSION}"
MARKER = "handforge-judge-env.json"
PYTHON_VARIABLE = "HANDFORGE_JUDGE_PYTHON"
# mediapipe itself goes in with --no-deps: of its declared dependencies the Hands solution imports
# only those below; jax, jaxlib, sentencepiece and sounddevice (another ~500 MB) it never uses.
# Pinned where a version can change what the detector sees (the models, image decoding, numpy);
# the rest resolve for the user's Python within mediapipe's own bounds.
MEDIAPIPE = [f"mediapipe=={MEDIAPIPE_VERSION}"]
DEPENDENCIES = ["numpy==1.26.4", "opencv-contrib-python==4.11.0.86", "protobuf>=4.25.3,<5", "pillow>=10",
                "absl-py", "attrs>=19.1.0", "flatbuffers>=2.0", "matplotlib"]
# Measured on Linux x86-64, Python 3.11 (the wheels pip fetches and the folder it leaves).
DOWNLOAD_MB, DISK_MB = 140, 460


def env_dir() -> pathlib.Path:
    return cache_dir() / ENV_NAME


def env_python(folder: pathlib.Path) -> pathlib.Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def requested() -> dict:
    """What a complete environment holds; the marker must say the same."""
    return {"mediapipe": MEDIAPIPE, "dependencies": DEPENDENCIES}


def read_marker(folder: pathlib.Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete(folder: pathlib.Path) -> bool:
    marker = read_marker(folder)
    return (marker is not None and marker.get("requested") == requested()
            and env_python(folder).exists())


def judge_python(progress=None) -> pathlib.Path:
    """The Python that runs the judge's worker, building its environment first if need be."""
    given = os.environ.get(PYTHON_VARIABLE, "")
    if given:
        path = pathlib.Path(given).expanduser()
        if not path.is_file():
            raise HandforgeError(f"{PYTHON_VARIABLE}={given}: no such file (give the python of an environment "
                                 f"with mediapipe=={MEDIAPIPE_VERSION}, numpy<2 and pillow, or unset it)")
        return path
    folder = env_dir()
    if not is_complete(folder):
        with _locked(folder.parent / f".{ENV_NAME}.lock"):
            if not is_complete(folder):  # another process may have built it while we waited
                _remove_partial_builds(folder.parent)
                build_env(folder, progress=progress)
    return env_python(folder)


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock; the rename below still keeps builds whole
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_partial_builds(parent: pathlib.Path) -> None:
    """Staging folders of builds that were killed (under the lock, no build is running)."""
    if os.name == "nt":
        return  # no lock there: another process may be building in one
    for stale in parent.glob(f".{ENV_NAME}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def _say(progress, text: str) -> None:
    (progress or (lambda t: print(t, file=sys.stderr, flush=True)))(text)


def create_venv(folder: pathlib.Path) -> None:
    """``python -m venv`` with pip (a separate function so tests can stand in for it)."""
    # Errors name the environment's final place (the staging folder beside it is removed).
    _run([sys.executable, "-m", "venv", str(folder)], "creating the virtual environment", folder.parent / ENV_NAME)


def _run(command: list[str], what: str, folder: pathlib.Path) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    except OSError as exc:
        raise _install_error(f"{what} ({exc})", "", folder) from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()
                 and "is ignored: it is neither a file nor a directory" not in line]
        shown = " ".join(command[2:] if command[1:2] == ["-m"] else command)
        raise _install_error(f"{what}: `{shown}` exited with code {done.returncode}", lines[-8:], folder)


def _install_error(what: str, output, folder: pathlib.Path) -> HandforgeError:
    versions = ("" if sys.version_info < (3, 13) else
                f" (mediapipe {MEDIAPIPE_VERSION} has wheels for Python 3.9-3.12 only; this is "
                f"{sys.version_info.major}.{sys.version_info.minor})")
    said = "".join(f"\n    {line}" for line in output)
    return HandforgeError(
        f"could not build the hand judge's environment in {folder}: {what}{versions}. If pip could not reach "
        f"the package registry, connect (or configure pip's index) and run the command again: the environment "
        f"is built once, then used offline. Or point {PYTHON_VARIABLE}=/path/to/python at an existing "
        f"environment with mediapipe=={MEDIAPIPE_VERSION}, numpy<2 and pillow." + (f" pip said:{said}" if said else ""))


def build_env(folder: pathlib.Path, progress=None) -> None:
    """Install the judge's environment into ``folder``, atomically (see the module docstring)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _say(progress, f"creating the hand judge's environment (one time, ~{DOWNLOAD_MB} MB download, "
                   f"~{DISK_MB} MB on disk) in {folder} ...")
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{ENV_NAME}.", suffix=".partial", dir=folder.parent))
    try:
        create_venv(staging)
        python = str(env_python(staging))
        pip = [python, "-m", "pip", "install", "--quiet"]
        _run(pip + DEPENDENCIES, "installing mediapipe's dependencies", folder)
        _run(pip + ["--no-deps"] + MEDIAPIPE, "installing mediapipe", folder)
        _run([python, "-I", "-c", "import mediapipe.python.solutions.hands"], "checking the install", folder)
        frozen = subprocess.run([python, "-m", "pip", "freeze", "--all"], capture_output=True, text=True)
        marker = {"requested": requested(), "installed": frozen.stdout.split(),
                  "python": sys.version.split()[0], "built_by": sys.executable}
        (staging / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        if folder.exists():  # an incomplete or outdated environment: ours replaces it
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename happened
    _say(progress, f"the hand judge's environment is ready: {folder}")
