"""Test plugin: each process writes a digest of its final parameters to $HANDFORGE_TEST_REPORT_DIR.

Parameters only: DDP keeps them in step, while buffers such as BatchNorm running statistics are
updated by each process's own last forward pass (rank 0's are the ones checkpointed)."""
import hashlib
import json
import os
import pathlib

from handforge import hookimpl


@hookimpl
def on_run_end(run, status):
    digest = hashlib.sha256()
    for name, module in sorted(run.task.export_modules().items()):
        for key, tensor in sorted(module.named_parameters()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    report = {"rank": run.accelerator.process_index, "processes": run.accelerator.num_processes,
              "status": status, "step": run.step, "params": digest.hexdigest()}
    out = pathlib.Path(os.environ["HANDFORGE_TEST_REPORT_DIR"]) / f"rank{report['rank']}.json"
    out.write_text(json.dumps(report))
