"""``handforge judge DIR``: how often an independent hand detector (MediaPipe Hands) finds a hand
in each image of a folder, and how well its 21 landmarks agree with the folder's keypoint labels.

    handforge judge data/hands                      # labels from data/hands/labels.json if present
    handforge judge DIR --keypoints labels.json --json --min-confidence 0.5 --out report.json
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time

from handforge.errors import DataError, HandforgeError

CHUNK = 64  # images per request: the progress bar moves, one worker serves them all


def configure_judge(p) -> None:
    p.add_argument("folder", help="images (.png .jpg ..., searched recursively)")
    p.add_argument("--keypoints", help="labels.json mapping file names to 21 normalized keypoints (default: "
                                       "FOLDER/labels.json when it exists, as `handforge prepare` writes it)")
    p.add_argument("--min-confidence", dest="min_confidence", type=float, default=0.5,
                   help="MediaPipe's min_detection_confidence (default 0.5)")
    p.add_argument("--visible-only", dest="visible_only", action="store_true",
                   help="compare only joints labelled visible (default: all 21, exact in rendered hands)")
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true",
                   help="pass over unreadable image files (counted) instead of stopping")
    p.add_argument("--out", help="also write the report with every image's detection to this JSON file")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    from handforge.plugins.metrics.sources import IMAGE_SUFFIXES

    if not folder.exists():
        raise HandforgeError(f"judge: {folder}: no such folder")
    if not folder.is_dir():
        raise HandforgeError(f"judge: {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise HandforgeError(f"judge: {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
    return files


def _detect_all(detector, files, quiet: bool) -> list[dict]:
    from tqdm import tqdm

    results = []
    with tqdm(total=len(files), unit="img", desc="judging", disable=quiet or None, file=sys.stderr) as bar:
        for start in range(0, len(files), CHUNK):
            chunk = detector.detect(files[start:start + CHUNK])
            results.extend(chunk)
            bar.update(len(chunk))
    return results


def judge_folder(folder, keypoints=None, min_confidence: float = 0.5, visible_only: bool = False,
                 skip_bad: bool = False, quiet: bool = False, python=None) -> dict:
    """The report of ``handforge judge`` as a dict (``per_image`` holds every image's detection)."""
    from .detector import HandDetector
    from .stats import label_for, read_labels, summarize

    if not 0.0 <= min_confidence <= 1.0:
        raise HandforgeError(f"--min-confidence must be between 0 and 1, got {min_confidence}")
    folder = pathlib.Path(folder)
    files = image_files(folder)
    labels_file = pathlib.Path(keypoints) if keypoints else folder / "labels.json"
    if keypoints and not labels_file.is_file():
        raise HandforgeError(f"--keypoints {keypoints}: no such file")
    labels = read_labels(labels_file) if labels_file.is_file() else {}
    started = time.perf_counter()
    with HandDetector(min_confidence, python=python) as detector:
        results = _detect_all(detector, files, quiet)
        version = detector.mediapipe_version
        python = str(detector.python)
    seconds = time.perf_counter() - started
    if len(results) != len(files):
        raise HandforgeError(f"hand judge: the worker answered for {len(results)} of {len(files)} images")
    bad = [(f, r) for f, r in zip(files, results) if "error" in r]
    if bad and not skip_bad:
        file, result = bad[0]
        more = f" ({len(bad) - 1} more unreadable)" if len(bad) > 1 else ""
        raise DataError(f"{file}: cannot read the image ({result['error']}){more}; fix or remove it, or pass "
                        f"over unreadable files (--skip-bad)")
    kept = [(f, r) for f, r in zip(files, results) if "error" not in r]
    if not kept:
        raise DataError(f"judge: {folder}: none of its {len(files)} image files could be read")
    relative = [f.relative_to(folder) for f, _ in kept]
    report = summarize([r for _, r in kept], [label_for(labels, rel) for rel in relative], visible_only)
    report.update({
        "folder": str(folder), "labels": str(labels_file) if labels else None, "unreadable": len(bad),
        "min_confidence": min_confidence, "visible_only": visible_only,
        "detector": {"name": "MediaPipe Hands", "mediapipe": version, "python": python},
        "seconds": round(seconds, 3), "images_per_second": round(len(files) / seconds, 2) if seconds > 0 else None,
    })
    report["per_image"] = {rel.as_posix(): {k: v for k, v in r.items() if k != "path"}
                           for rel, (_, r) in zip(relative, kept)}
    return report


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def print_report(report: dict) -> None:
    labels = f", labels {report['labels']}" if report["labels"] else ", no labels"
    unreadable = f", {report['unreadable']} unreadable skipped" if report["unreadable"] else ""
    print(f"judged {report['images']} images in {report['folder']}{labels}{unreadable}: MediaPipe Hands "
          f"{report['detector']['mediapipe']}, min confidence {report['min_confidence']}, "
          f"{report['seconds']:.1f} s ({report['images_per_second']} images/s)")
    print(f"  detected                {report['detected']} / {report['images']}  ({100 * report['detection_rate']:.1f}%)")
    if "labelled_and_detected" in report:
        joints = "visible joints" if report["visible_only"] else "all 21 joints"
        print(f"  PCK@0.1 (bbox)          {_number(report['pck@0.1'])}   over {report['labelled_and_detected']} "
              f"detected images of {report['labelled']} labelled, {joints}")
        print(f"  PCK@0.2 (bbox)          {_number(report['pck@0.2'])}")
        print(f"  mean error (bbox side)  {_number(report['mean_error'])}")
    if "handedness_agreement" in report:
        print(f"  handedness agrees       {_number(report['handedness_agreement'])}")
    if report.get("per_class"):
        width = max(len(name) for name in report["per_class"])
        print("per class: detected / images, PCK@0.2")
        for name, entry in report["per_class"].items():
            print(f"  {name:<{width}}  {entry['detected']:>4} / {entry['images']:<4} {100 * entry['detection_rate']:5.1f}%"
                  f"  {_number(entry.get('pck@0.2'))}")


def plain_json(value):
    """NaN (nothing to measure) as null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_json(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def cmd_judge(args) -> int:
    from handforge.fileio import atomic_write_bytes

    report = plain_json(judge_folder(args.folder, args.keypoints, args.min_confidence, args.visible_only,
                                     args.skip_bad, quiet=args.json))
    if args.out:
        atomic_write_bytes(args.out, (json.dumps(report, indent=1) + "\n").encode())
    summary = {k: v for k, v in report.items() if k != "per_image"}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_report(summary)
        if args.out:
            print(f"report with every image's detection: {args.out}")
    return 0
