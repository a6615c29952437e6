"""Run by tests/test_metrics_plugin.py under `accelerate launch` with two processes: a tiny GAN
run with metrics, then the real features once more; each rank writes what it saw to ROOT."""
import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_metrics_plugin import metrics_host, tiny_gan_raw  # noqa: E402


def _two_process_evaluation(root: str, judge: str):
    """Runs in each of two processes: a tiny GAN run, then its metrics once more, written per rank."""
    from handforge import hookimpl
    from handforge.loop import Trainer
    from handforge.plugins.metrics.extractors import ExtractorOptions, build_extractor
    from handforge.plugins.metrics.inputs import run_inputs
    from handforge.recipe import resolve

    torch.set_num_threads(1)
    os.environ["HANDFORGE_CACHE"] = str(pathlib.Path(root) / "cache")
    host = metrics_host()
    seen = {}

    class Observer:
        @hookimpl
        def on_eval_end(self, run, step, metrics):
            seen[step] = metrics

    host.pm.register(Observer())
    raw = tiny_gan_raw(pathlib.Path(root), judge, steps=2, num=45)  # 45: shares of 22 and 23
    raw["train"]["batch_size"] = 4
    run = Trainer(resolve(raw, host=host), host).run()
    extractor = build_extractor("hand_features", ExtractorOptions(classifier=judge))
    real = run_inputs(run, 45, seed=0, batch_size=32).features("real", extractor)
    out = {"rank": run.accelerator.process_index, "world": run.accelerator.num_processes, "metrics": seen,
           "real": real.tolist()}
    (pathlib.Path(root) / f"rank{out['rank']}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    _two_process_evaluation(sys.argv[1], sys.argv[2])
