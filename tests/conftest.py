"""Shared fixtures. Entry-point autoload is off by default so plugins installed in the
environment cannot change what the tests see; tests of entry points turn it back on."""
import os
import pathlib
import sys

import pytest

os.environ.setdefault("HANDFORGE_DISABLE_PLUGIN_AUTOLOAD", "1")
REPO = pathlib.Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture
def host():
    """A fresh plugin host with the built-in plugins only."""
    from handforge.plugin_manager import PluginHost

    h = PluginHost()
    h.load_builtins()
    return h


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is as fast as two, and stays fast on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli_exit(capsys, *args):
    """``handforge ARGS`` in this process: (exit code, stdout, stderr)."""
    from handforge.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run `python -m handforge.cli`-equivalent in a subprocess; returns CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([PYTHON, str(REPO / "run.py"), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(script, *args, env=None, timeout=600):
    """``accelerate launch`` of ``script args`` as two CPU processes (gloo DDP, one thread each, a
    free port); returns the CompletedProcess."""
    import subprocess

    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(script), *map(str, args)]
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)


def debug_launch_in_fresh_python(module: str, function: str, timeout=600):
    """``accelerate.debug_launcher(module.function, num_processes=2)`` from a new interpreter.

    debug_launcher forks; a fork of this pytest process, whose OpenMP thread pool earlier tests
    have used, can hang in the children's first parallel region. A fresh interpreter has not
    started that pool, so its forks are safe."""
    import subprocess

    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import accelerate, {module}; "
            f"accelerate.debug_launcher({module}.{function}, num_processes=2)")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
