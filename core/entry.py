"""The process entry of ``handforge`` and ``run.py``: tune glibc's allocator, then run the CLI.

Why: on Linux, glibc's malloc serves every block above its mmap threshold (at most 32 MiB, grown
dynamically) with a fresh ``mmap`` and hands it back with ``munmap`` on free, and trims the heap
top back to the OS. A training iteration allocates and frees activations and gradients of tens of
MiB hundreds of times, so on CPU every iteration page-faults its working set in again: for the
64 px BigGAN iteration (bench/gan_step.py) a third of the wall time was the kernel zeroing pages
(3.6 s of system time in a 7.9 s iteration). With the mmap threshold and the trim threshold raised,
freed blocks stay in the heap and are reused: the same iteration takes 5.1 s, and the peak RSS
grows by ~4%. The numbers the network computes do not change.

glibc reads these settings only when a process starts (``mallopt`` at run time is capped at 32 MiB
and does not reach the big blocks), so the entry re-executes the same command once with them set
in the environment. It does nothing when:

- the C library is not glibc (macOS, Windows, musl), or the platform has no ``execv`` semantics;
- the user set any of them already (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
  ``GLIBC_TUNABLES``) or preloads another allocator (``LD_PRELOAD``, e.g. jemalloc/tcmalloc);
- ``HANDFORGE_MALLOC_TUNING=0``;
- it already re-executed (``HANDFORGE_MALLOC_TUNED`` is set: never a loop).

``exec`` keeps the process id, its open files and the rest of its environment, so launchers that
watch their children (``accelerate launch``, torchrun) see the same process.
"""
import os
import platform
import sys

# Big enough that no tensor a CPU run allocates is mmap-ed; the trim threshold the same, so the
# heap top is never handed back between iterations.
TUNED = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}
OPT_OUT = "HANDFORGE_MALLOC_TUNING"
MARKER = "HANDFORGE_MALLOC_TUNED"
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def tuned_environment(environ, libc: str | None = None, system: str | None = None) -> dict | None:
    """The environment to re-execute with, or None when the process should run as it is."""
    libc = platform.libc_ver()[0] if libc is None else libc
    system = platform.system() if system is None else system
    if system != "Linux" or libc != "glibc":
        return None
    if environ.get(OPT_OUT, "") == "0" or MARKER in environ:
        return None
    if any(environ.get(name) for name in USER_SETTINGS):
        return None
    return {**environ, **TUNED, MARKER: "1"}


def command_line() -> list[str] | None:
    """This interpreter's own command line (``python -m handforge``, ``python run.py``, the
    ``handforge`` script), or None where Python cannot say what it was."""
    orig = getattr(sys, "orig_argv", None)
    if not orig or not sys.executable:
        return None
    return [sys.executable, *orig[1:]]


def reexec_tuned() -> None:
    """Replace this process with the same command under the tuned allocator, when that applies."""
    environ = tuned_environment(os.environ)
    argv = command_line()
    if environ is None or argv is None:
        return
    try:
        os.execve(sys.executable, argv, environ)
    except OSError:  # an interpreter that cannot be exec-ed again: run untuned rather than fail
        return


def main() -> None:
    reexec_tuned()
    from .cli import main as cli_main  # after the exec: the CLI's imports run once

    cli_main()
