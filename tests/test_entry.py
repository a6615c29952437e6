"""The process entry: it re-executes the command once under glibc's tuned allocator, and only then."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from handforge import entry

BASE = {"PATH": "/usr/bin", "HOME": "/home/u"}


def test_linux_glibc_gets_the_tuned_settings_and_the_marker():
    environ = entry.tuned_environment(BASE, libc="glibc", system="Linux")
    assert environ == {**BASE, **entry.TUNED, entry.MARKER: "1"}
    assert int(environ["MALLOC_MMAP_THRESHOLD_"]) >= 1 << 30  # above any tensor of a CPU run


@pytest.mark.parametrize("libc, system", [("", "Darwin"), ("", "Windows"), ("", "Linux")])  # "" on Linux: musl
def test_other_platforms_run_as_they_are(libc, system):
    assert entry.tuned_environment(BASE, libc=libc, system=system) is None


@pytest.mark.parametrize("extra", [
    {"HANDFORGE_MALLOC_TUNING": "0"},  # the user's opt-out
    {"HANDFORGE_MALLOC_TUNED": "1"},  # already re-executed: never a loop
    {"MALLOC_MMAP_THRESHOLD_": "1000000"},  # the user's own allocator settings win
    {"MALLOC_TRIM_THRESHOLD_": "1000000"},
    {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
    {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},  # another allocator
])
def test_settings_of_the_user_are_left_alone(extra):
    assert entry.tuned_environment({**BASE, **extra}, libc="glibc", system="Linux") is None


@pytest.mark.skipif(entry.tuned_environment({}) is None, reason="needs Linux with glibc")
def test_the_command_is_re_executed_once_with_its_arguments_and_pid(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        from handforge import entry
        print(json.dumps({"pid": os.getpid(), "stage": "before"}), flush=True)
        entry.reexec_tuned()
        print(json.dumps({"pid": os.getpid(), "stage": "after", "argv": sys.argv[1:],
                          "env": {k: os.environ.get(k) for k in list(entry.TUNED) + [entry.MARKER]}}))
    """))
    env = {k: v for k, v in os.environ.items() if k not in (*entry.USER_SETTINGS, entry.MARKER, entry.OPT_OUT)}
    out = subprocess.run([sys.executable, str(script), "recipe.toml", "--set", "a=1"], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["stage"] for line in lines] == ["before", "before", "after"]  # one exec, then the work
    assert len({line["pid"] for line in lines}) == 1  # exec keeps the process: launchers see the same one
    assert lines[-1]["argv"] == ["recipe.toml", "--set", "a=1"]
    assert lines[-1]["env"] == {**entry.TUNED, entry.MARKER: "1"}

    opted_out = subprocess.run([sys.executable, str(script)], env={**env, entry.OPT_OUT: "0"},
                               capture_output=True, text=True, timeout=120, check=True).stdout
    assert [json.loads(line)["stage"] for line in opted_out.splitlines()] == ["before", "after"]
