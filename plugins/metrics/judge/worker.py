"""The hand judge's worker: MediaPipe Hands on image files, driven through a pipe.

This file runs in the judge's own environment (``python -I worker.py``), never inside handforge:
it imports only the standard library, mediapipe, numpy and pillow. handforge computes every
statistic; this only detects.

Protocol (one JSON object per line, UTF-8):

- on start the worker writes ``{"ready": true, "protocol": 1, "mediapipe": "<version>"}``;
- each line handforge writes on stdin is a request ``{"images": [path, ...]}`` or
  ``{"folder": path}`` (its .png/.jpg/.jpeg files, recursively, sorted), with
  ``"min_confidence"`` (default 0.5);
- for each image, in order, the worker writes ``{"path", "width", "height", "detected",
  "handedness", "score", "keypoints"}``: ``keypoints`` the 21 landmarks as [x, y] normalized to the image (0..1, MediaPipe
  order), ``handedness`` "Left" / "Right" as MediaPipe labels it (it assumes a mirrored, selfie
  image) and ``score`` that label's score, all null when no hand is found; or ``{"path",
  "error"}`` when the file cannot be read; then ``{"done": <count>}``;
- end of input ends the worker. A broken request or a failing detector: a message on stderr and
  exit code 3.
"""
import json
import os
import pathlib
import sys

PROTOCOL = 1
SUFFIXES = {".png", ".jpg", ".jpeg"}


def _listing(request: dict) -> list:
    if "images" in request:
        return [str(p) for p in request["images"]]
    folder = pathlib.Path(request["folder"])
    return [str(p) for p in sorted(folder.rglob("*")) if p.suffix.lower() in SUFFIXES and p.is_file()]


def _detect(hands, path: str) -> dict:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
        return {"path": path, "error": f"{type(exc).__name__}: {exc}"}
    result = hands.process(rgb)
    size = {"width": int(rgb.shape[1]), "height": int(rgb.shape[0])}
    if not result.multi_hand_landmarks:
        return {"path": path, **size, "detected": False, "handedness": None, "score": None, "keypoints": None}
    landmarks = result.multi_hand_landmarks[0].landmark
    label = result.multi_handedness[0].classification[0] if result.multi_handedness else None
    return {"path": path, **size, "detected": True,
            "handedness": label.label if label is not None else None,
            "score": round(float(label.score), 5) if label is not None else None,
            "keypoints": [[round(float(p.x), 6), round(float(p.y), 6)] for p in landmarks]}


def main() -> int:
    # The protocol owns the original stdout; anything the native code prints goes to stderr.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(value: dict) -> None:
        out.write(json.dumps(value) + "\n")
        out.flush()

    import mediapipe as mp

    send({"ready": True, "protocol": PROTOCOL, "mediapipe": getattr(mp, "__version__", "unknown")})
    detectors = {}  # one Hands per confidence threshold, reused across requests
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            confidence = float(request.get("min_confidence", 0.5))
            paths = _listing(request)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"hand judge worker: bad request {line.strip()[:200]!r}: {exc}", file=sys.stderr)
            return 3
        if confidence not in detectors:
            detectors[confidence] = mp.solutions.hands.Hands(
                static_image_mode=True, max_num_hands=1, model_complexity=1,
                min_detection_confidence=confidence)
        for path in paths:
            send(_detect(detectors[confidence], path))
        send({"done": len(paths)})
    for hands in detectors.values():
        hands.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
