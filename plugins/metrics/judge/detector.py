"""handforge's side of the hand judge: start the worker in its environment and talk to it.

The worker (:mod:`.worker`, run as a script by the judge's Python with ``-I``) reads JSON requests
on stdin and answers one JSON line per image (the protocol is in its docstring). One worker
serves a whole evaluation, so MediaPipe starts once, however many batches are sent.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import tempfile

import numpy as np
from PIL import Image

from handforge.errors import HandforgeError

from .environment import judge_python

WORKER = pathlib.Path(__file__).with_name("worker.py")
PROTOCOL = 1
STDERR_TAIL_LINES = 15


class HandDetector:
    """MediaPipe Hands in its own process: ``detect(paths)`` and ``detect_images(uint8 tensor)``.

    Use as a context manager (or call :meth:`close`): the worker and any temporary PNGs go with it.
    """

    def __init__(self, min_confidence: float = 0.5, python=None, progress=None):
        self.min_confidence = float(min_confidence)
        self.python = pathlib.Path(python) if python else judge_python(progress)
        self._stderr = tempfile.TemporaryFile(mode="w+b")  # a file, not a pipe: a chatty worker never blocks
        env = {**os.environ, "GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "3"}
        try:
            self._process = subprocess.Popen([str(self.python), "-I", str(WORKER)], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=self._stderr, env=env,
                                             text=True, encoding="utf-8", bufsize=1)
        except OSError as exc:
            self._stderr.close()
            raise HandforgeError(f"hand judge: cannot start {self.python}: {exc}") from None
        self._scratch: tempfile.TemporaryDirectory | None = None
        hello = self._read("starting")
        if hello.get("protocol") != PROTOCOL:
            self.close()
            raise HandforgeError(f"hand judge: the worker under {self.python} speaks protocol "
                                 f"{hello.get('protocol')!r}, this handforge {PROTOCOL}")
        self.mediapipe_version = str(hello.get("mediapipe", "unknown"))

    # -- the pipe -------------------------------------------------------------------------------

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode("utf-8", "replace").splitlines()
        lines = [line for line in lines if line.strip()][-STDERR_TAIL_LINES:]
        return "\n".join(f"    {line}" for line in lines) or "    (nothing)"

    def _failed(self, doing: str) -> HandforgeError:
        try:
            code = self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            code = self._process.wait()
        error = HandforgeError(f"hand judge: the worker ({self.python} -I {WORKER.name}) stopped with exit code "
                               f"{code} while {doing}; its stderr ends with:\n{self._stderr_tail()}\n"
                               f"(a broken environment? set HANDFORGE_JUDGE_PYTHON, or delete it to rebuild it)")
        self.close()
        return error

    def _read(self, doing: str) -> dict:
        line = self._process.stdout.readline()
        if not line:
            raise self._failed(doing)
        try:
            value = json.loads(line)
        except ValueError:
            raise self._failed(f"{doing} (it wrote {line.strip()[:120]!r}, not JSON)") from None
        if not isinstance(value, dict):
            raise self._failed(f"{doing} (it wrote {line.strip()[:120]!r})")
        return value

    def _request(self, request: dict, count_hint: int | None = None) -> list[dict]:
        if self._process.poll() is not None:
            raise self._failed("waiting for a request")
        try:
            self._process.stdin.write(json.dumps({**request, "min_confidence": self.min_confidence}) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._failed("reading a request") from None
        results = []
        while True:
            what = f"judging image {len(results) + 1}" + (f" of {count_hint}" if count_hint else "")
            value = self._read(what)
            if "done" in value:
                return results
            results.append(value)

    # -- what callers use ---------------------------------------------------------------------------

    def detect(self, paths) -> list[dict]:
        """One result per image file, in order (the worker's per-image objects)."""
        paths = [str(p) for p in paths]
        return self._request({"images": paths}, len(paths)) if paths else []

    def detect_images(self, images) -> list[dict]:
        """uint8 (N, 3, H, W) images: written as PNGs to a temporary folder, judged, deleted."""
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="handforge-judge-")
        folder = pathlib.Path(self._scratch.name)
        pixels = np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())
        paths = []
        for i, array in enumerate(pixels):
            path = folder / f"{i:06d}.png"
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # lossless; fast beats small
            path.write_bytes(buffer.getvalue())
            paths.append(path)
        try:
            return self.detect(paths)
        finally:
            for path in paths:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        process = getattr(self, "_process", None)
        if process is not None and process.poll() is None:
            try:
                process.stdin.close()
                process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
        if process is not None and process.stdout:
            process.stdout.close()
        if getattr(self, "_scratch", None) is not None:
            self._scratch.cleanup()
            self._scratch = None
        if not self._stderr.closed:
            self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()
