"""Test plugin: kills the process hard right after the checkpoint of a chosen step is saved."""
import os

from handforge import hookimpl


@hookimpl
def on_checkpoint_saved(run, step, path):
    if step == int(os.environ.get("HANDFORGE_TEST_KILL_AT", "0")):
        os._exit(17)
