"""The hand judge's cost: ``handforge judge`` against MediaPipe called directly in the same environment.

    python bench/judge.py [--count 300] [--size 224] [--repeats 2] [--json]

Renders ``--count`` procedural_hands images (default options, seed 0) with ``handforge prepare``
into a temporary folder, then judges them two ways, each ``--repeats`` times (the table gives
the fastest):

- handforge: :func:`handforge.plugins.metrics.judge.command.judge_folder`: the worker started in the
  judge's environment, images sent through the pipe in requests of 64, statistics on our side;
- direct (the peer): one Python in that environment looping ``Hands.process`` over the files,
  as a standalone script would, with the same Hands options; its process start and the
  mediapipe import are counted, as they are for handforge.

Both must find hands in the same images. The environment is built first if it is missing (not
timed).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import tempfile
import time

DIRECT = """
import json, pathlib, sys
import numpy as np
from PIL import Image
import mediapipe as mp
files = sorted(pathlib.Path(sys.argv[1]).glob("*.png"))
found = []
with mp.solutions.hands.Hands(static_image_mode=True, max_num_hands=1, model_complexity=1,
                              min_detection_confidence=0.5) as hands:
    for path in files:
        found.append(bool(hands.process(np.asarray(Image.open(path).convert("RGB"))).multi_hand_landmarks))
print(json.dumps(found))
"""


def main() -> None:
    from handforge.plugins.metrics.judge.command import judge_folder
    from handforge.plugins.metrics.judge.environment import judge_python
    from handforge.prepare import prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    python = judge_python()
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "hands"
        prepare("procedural_hands", args.count, folder, size=args.size, seed=0)
        timings = {"handforge": [], "direct": []}
        for _ in range(args.repeats):
            started = time.perf_counter()
            report = judge_folder(folder, quiet=True)
            timings["handforge"].append(time.perf_counter() - started)
            ours = [report["per_image"][f"{i:06d}.png"]["detected"] for i in range(args.count)]

            started = time.perf_counter()
            done = subprocess.run([str(python), "-I", "-c", DIRECT, str(folder)], capture_output=True, text=True,
                                  env={**os.environ, "GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "3"}, check=True)
            timings["direct"].append(time.perf_counter() - started)
            direct = json.loads(done.stdout.splitlines()[-1])
        if ours != direct:
            raise SystemExit(f"the two ways disagree on {sum(a != b for a, b in zip(ours, direct))} images")

    best = {way: min(values) for way, values in timings.items()}
    rows = [{"way": way, "images": args.count, "seconds": round(s, 2), "images_per_s": round(args.count / s, 1),
             "vs_direct": round(s / best["direct"], 3)} for way, s in best.items()]
    if args.json:
        print(json.dumps({"size": args.size, "detected": sum(ours), "rows": rows}, indent=2))
        return
    print(f"{args.count} procedural_hands renders, {args.size} px, {sum(ours)} with a hand found by both ways; "
          f"fastest of {args.repeats}")
    print(f"| way | seconds | images/s | time / direct |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['way']} | {row['seconds']} | {row['images_per_s']} | {row['vs_direct']} |")


if __name__ == "__main__":
    main()
