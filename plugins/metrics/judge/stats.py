"""What the hand judge's detections say: detection rate, and agreement with our keypoint labels.

Agreement follows MMPose's bbox convention (:mod:`keypoint_math`): a detected landmark is correct
when its distance to the labelled one is below 0.1 or 0.2 of the longer side of the labelled
hand's bounding box; the mean error is in units of that side. Only images where the detector
found a hand and a label exists count. By default every labelled joint counts, hidden ones too:
a rendered hand's labels are exact even where a finger is behind the palm, and the detector
places all 21 landmarks anyway; ``visible_only`` keeps to joints with visibility > 0 (the
convention for photographs, whose hidden joints carry no position).

MediaPipe labels handedness as if the image were mirrored (a selfie camera), so on ordinary
images its "Left" is a right hand; :func:`handedness_of` undoes that.
"""
from __future__ import annotations

import json
import pathlib

import attrs
import numpy as np
import torch

from handforge.errors import DataError
# The PCK math is the keypoints metrics' (one place for MMPose's conventions).
from handforge.keypoint_math import bbox_size_px, keypoint_errors_px, pck

N_KEYPOINTS = 21
THRESHOLDS = (0.1, 0.2)
# MediaPipe's label on an unmirrored image -> the sample contract's handedness (0 left, 1 right).
_HANDEDNESS = {"Left": 1, "Right": 0}


def handedness_of(label) -> int | None:
    return _HANDEDNESS.get(label)


@attrs.frozen
class Label:
    """One image's label: keypoints (21, 3) normalized x, y and visibility (1 where none was given)."""

    keypoints: np.ndarray | None = None
    class_name: str | None = None
    handedness: int | None = None


def _keypoints(value, where: str) -> np.ndarray:
    try:
        points = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: keypoints must be numbers") from None
    if points.ndim == 1 and points.size in (2 * N_KEYPOINTS, 3 * N_KEYPOINTS):
        points = points.reshape(N_KEYPOINTS, -1)
    if points.ndim != 2 or points.shape[0] != N_KEYPOINTS or points.shape[1] not in (2, 3):
        raise DataError(f"{where}: keypoints must be {N_KEYPOINTS} points of [x, y] or [x, y, visibility] "
                        f"(normalized to the image), or their flat list; got shape {points.shape}")
    if not np.isfinite(points).all():
        raise DataError(f"{where}: keypoints must be finite numbers")
    if points.shape[1] == 2:
        points = np.concatenate([points, np.ones((N_KEYPOINTS, 1))], axis=1)
    return points


def parse_label(value, where: str) -> Label:
    """A labels.json entry: a keypoint list, or an object with ``keypoints``, ``class_name``, ``handedness``
    (what ``handforge prepare`` writes)."""
    if isinstance(value, list):
        return Label(_keypoints(value, where))
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a keypoint list or an object with \"keypoints\", got {type(value).__name__}")
    points = value.get("keypoints")
    name = value.get("class_name")
    hand = value.get("handedness")
    return Label(None if points is None else _keypoints(points, f"{where}.keypoints"),
                 str(name) if name is not None else None,
                 hand if isinstance(hand, int) and hand in (0, 1) else None)


def read_labels(path) -> dict[str, Label]:
    """labels.json: file name (or path relative to the judged folder) -> :class:`Label`."""
    path = pathlib.Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the labels ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(entries, dict):
        raise DataError(f"{path}: expected an object mapping image file names to labels")
    return {str(name): parse_label(value, f"{path}: {name!r}") for name, value in entries.items()}


def label_for(labels: dict[str, Label], relative: pathlib.PurePath) -> Label | None:
    return labels.get(relative.as_posix(), labels.get(relative.name))


def keypoint_agreement(found: np.ndarray, target: np.ndarray, sizes: np.ndarray, visible_only: bool = False) -> dict:
    """PCK at 0.1 and 0.2 of the labelled box and the mean box-normalized error.

    ``found`` (M, 21, 2) detected and ``target`` (M, 21, 3) labelled keypoints, normalized;
    ``sizes`` (M, 2) each image's (height, width). NaN where nothing can be measured.
    """
    found_t = torch.as_tensor(np.asarray(found, dtype=np.float64).reshape(-1, N_KEYPOINTS, 2))
    target_t = torch.as_tensor(np.asarray(target, dtype=np.float64).reshape(-1, N_KEYPOINTS, 3))
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    visible = target_t[..., 2] > 0 if visible_only else torch.ones(target_t.shape[:2], dtype=torch.bool)
    errors = torch.zeros(target_t.shape[:2], dtype=torch.float64)
    box = torch.zeros(target_t.shape[0], dtype=torch.float64)
    for size in np.unique(sizes, axis=0):  # keypoint_math measures in pixels of one image size at a time
        rows = torch.as_tensor(np.flatnonzero((sizes == size).all(axis=1)))
        hw = (int(size[0]), int(size[1]))
        errors[rows] = keypoint_errors_px(found_t[rows], target_t[rows], hw)
        box[rows] = bbox_size_px(target_t[rows], visible[rows], hw)
    in_box = visible & (box > 0)[:, None]  # a box of one point normalizes nothing (MMPose leaves it out)
    values = {f"pck@{t}": pck(errors, in_box, t * box) for t in THRESHOLDS}
    normalized = errors / box.clamp_min(1e-12)[:, None]
    values["mean_error"] = normalized[in_box].mean().item() if in_box.any() else float("nan")
    values["measured"] = int(in_box.any(dim=1).sum())
    return values


def summarize(results: list[dict], labels: list[Label | None], visible_only: bool = False) -> dict:
    """The judge's report over readable images: ``results`` are the worker's per-image objects,
    ``labels`` each image's label or None."""
    detected = np.array([bool(r["detected"]) for r in results], dtype=bool)
    n = len(results)
    report = {"images": n, "detected": int(detected.sum()),
              "detection_rate": float(detected.mean()) if n else float("nan")}
    with_points = [i for i, label in enumerate(labels) if label is not None and label.keypoints is not None]
    report["labelled"] = len(with_points)
    if with_points:
        report.update(_agreement([i for i in with_points if detected[i]], results, labels, visible_only))
    hands = [(handedness_of(results[i]["handedness"]), labels[i].handedness) for i in range(n)
             if detected[i] and labels[i] is not None and labels[i].handedness is not None]
    hands = [(found, truth) for found, truth in hands if found is not None]
    if hands:
        report["handedness_agreement"] = float(np.mean([found == truth for found, truth in hands]))
    classes = sorted({label.class_name for label in labels if label is not None and label.class_name})
    if classes:
        report["per_class"] = {}
        for name in classes:
            rows = [i for i, label in enumerate(labels) if label is not None and label.class_name == name]
            entry = {"images": len(rows), "detected": int(detected[rows].sum()),
                     "detection_rate": float(detected[rows].mean())}
            measured = [i for i in rows if detected[i] and labels[i].keypoints is not None]
            if measured:
                entry["pck@0.2"] = _agreement(measured, results, labels, visible_only)["pck@0.2"]
            report["per_class"][name] = entry
    return report


def _agreement(rows: list[int], results, labels, visible_only) -> dict:
    if not rows:
        return {"labelled_and_detected": 0, **{f"pck@{t}": float("nan") for t in THRESHOLDS},
                "mean_error": float("nan")}
    found = np.array([results[i]["keypoints"] for i in rows], dtype=np.float64)
    target = np.stack([labels[i].keypoints for i in rows])
    sizes = np.array([(results[i]["height"], results[i]["width"]) for i in rows])
    values = keypoint_agreement(found, target, sizes, visible_only)
    return {"labelled_and_detected": len(rows), **{k: v for k, v in values.items() if k != "measured"}}
