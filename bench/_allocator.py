"""Which allocator settings a benchmark process runs under, and running one under the other.

handforge's entry (``handforge.entry``) re-executes every command once with glibc's mmap and trim
thresholds raised, so a CPU iteration stops page-faulting its activations in again. A benchmark of
"ours as handforge runs it" must run under the same settings, and a peer "as it ships" under
glibc's defaults; a same-allocator row shows how much of a ratio is the allocator alone.
"""
import json
import os
import subprocess
import sys

from handforge import entry

STATES = ("tuned", "default")


def allocator_state(environ=os.environ) -> str:
    """'tuned' (handforge's settings), 'default' (glibc's own) or 'user' (the user's own settings)."""
    if all(environ.get(k) == v for k, v in entry.TUNED.items()):
        return "tuned"
    if any(environ.get(k) for k in entry.USER_SETTINGS):
        return "user"
    return "default"


def default_environment(environ=os.environ) -> dict:
    """This environment without handforge's settings, and with the re-execution switched off."""
    clean = {k: v for k, v in environ.items() if k not in (*entry.TUNED, entry.MARKER)}
    return {**clean, entry.OPT_OUT: "0"}


def run_under(state: str) -> None:
    """Re-execute this process under ``state`` unless it already runs under it (or the user's own)."""
    current = allocator_state()
    if current == state or current == "user":
        return
    if state == "tuned":
        entry.reexec_tuned()
    else:
        os.execve(sys.executable, entry.command_line(), default_environment())


def child_json(script: str, argv: list[str], state: str) -> dict:
    """Run ``script argv --allocator state --json`` in a child process; its JSON output."""
    env = default_environment()
    if state == "tuned":
        env = {**{k: v for k, v in env.items() if k != entry.OPT_OUT}, **entry.TUNED, entry.MARKER: "1"}
    done = subprocess.run([sys.executable, script, *argv, "--allocator", state, "--json"], env=env,
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} under the {state} allocator failed (exit {done.returncode}); its stderr is above")
    return json.loads(done.stdout)
