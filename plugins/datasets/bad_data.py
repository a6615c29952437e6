"""Bad data in datasets that read the user's files: one clear error, or skipped and counted.

Every file-backed dataset takes ``on_error = "raise" | "skip"``. With ``"raise"`` (the default) the
first problem stops with a :class:`~handforge.errors.DataError` naming the file (and the entry in
it). With ``"skip"`` the sample is left out and counted by kind; nothing disappears silently:

- problems found while indexing (annotations, boxes, landmarks, missing files) are summarised on
  stderr once the index is built;
- an image that exists but cannot be decoded is found only when it is read: the sample is replaced
  by the next readable one, counted, and the counts of each process are printed when it exits.
"""
from __future__ import annotations

import atexit
import json
import pathlib
import sys
from collections import Counter
from typing import Callable, Literal

import torch
from PIL import Image, UnidentifiedImageError

from handforge.data import check_index, non_finite, require_finite
from handforge.errors import DataError

OnError = Literal["raise", "skip"]
ON_ERROR_HELP = ("bad files or entries: raise (stop with an error naming the file) or skip (leave the "
                 "sample out; counted and summarised)")


def read_rgb(path) -> Image.Image:
    """The whole image at ``path`` decoded as RGB; a missing, truncated or foreign file is a
    :class:`DataError` naming it (the decode is forced here, not left to the first pixel access)."""
    return read_rgb_reduced(path, lambda width, height: 1)[0]


def read_rgb_reduced(path: str, reduction_for: Callable[[int, int], int]) -> tuple[Image.Image, float]:
    """The image at ``path`` as RGB, and the factor it was shrunk by while decoding (1.0: full size).

    ``reduction_for(width, height)`` gets the stored size (from the header, before any pixel is
    decoded) and says how much smaller the caller can take it; a JPEG is then decoded at 1/2, 1/4 or
    1/8 scale by libjpeg's DCT scaling (Image.draft), much faster than decoding it whole. Other
    formats decode whole. Errors: as :func:`read_rgb`."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            reduction = reduction_for(width, height)
            factor = 1.0
            if reduction > 1:
                # draft picks the largest reduction that keeps the image at least the requested size:
                # asking for width // reduction gives exactly `reduction` (never more).
                chosen = image.draft("RGB", (max(1, width // reduction), max(1, height // reduction)))
                if chosen is not None:  # None: not a JPEG
                    # The scaled width, width / factor, is exact; image.size rounds it up to whole pixels.
                    factor = width / chosen[1][2]
            image.load()
            return image.convert("RGB"), factor
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode the image ({type(exc).__name__}: {exc})") from None


NON_FINITE = "non-finite keypoints"  # the kind a NaN or infinite keypoint or pose is counted under


def check_finite(values, where, axes: tuple = (), bad: "BadData | None" = None) -> bool:
    """:func:`handforge.data.non_finite` under a dataset's policy: True when every number is finite; else a
    :class:`DataError` ``where: ...`` (no ``bad``, or ``on_error = "raise"``), or the problem counted
    under :data:`NON_FINITE` and False (``on_error = "skip"``)."""
    if bad is None:
        require_finite(values, where, axes)
        return True
    problem = non_finite(values, axes)
    if problem is None:
        return True
    bad.problem(where, problem, NON_FINITE)
    return False


def read_json(path, hint: str = ""):
    """The JSON document at ``path``; an unreadable or truncated file is a :class:`DataError` naming
    it (and ``hint``, e.g. what the file should hold). Always raised, whatever ``on_error`` says: a
    file that does not parse has no entries to skip or count."""
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}){'; ' + hint if hint else ''}") from None


class BadData:
    """The ``on_error`` policy of one dataset split, and the count of what it skipped."""

    def __init__(self, name: str, on_error: OnError = "raise"):
        if on_error not in ("raise", "skip"):
            raise DataError(f"{name}: on_error must be \"raise\" or \"skip\", got {on_error!r}")
        self.name, self.on_error = name, on_error
        self.counts: Counter = Counter()
        self.first: str | None = None
        self._registered = False
        self._unreadable: set[int] = set()

    @property
    def skipping(self) -> bool:
        return self.on_error == "skip"

    def problem(self, where, message: str, kind: str) -> None:
        """Raise ``where: message`` (policy raise), or count it under ``kind`` (policy skip)."""
        text = f"{where}: {message}"
        if not self.skipping:
            raise DataError(text + " (on_error = \"skip\" leaves such samples out, counted)")
        self.counts[kind] += 1
        self.first = self.first or text

    def summary(self, total: int | None = None) -> str | None:
        """One line: how many samples were skipped, by kind, with the first problem; None if none."""
        skipped = sum(self.counts.values())
        if not skipped:
            return None
        of = f" of {total}" if total is not None else ""
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.counts.most_common())
        noun = "sample" if skipped == 1 and total is None else "samples"
        return f"{self.name}: skipped {skipped}{of} {noun} ({kinds}); first: {self.first}"

    def print_summary(self, total: int | None = None) -> None:
        line = self.summary(total)
        if line:
            print(line, file=sys.stderr)

    def at_exit(self) -> None:
        """Print the counts when this process exits (for problems found while reading samples)."""
        if not self._registered:
            self._registered = True
            atexit.register(self.print_summary)

    def read_or_skip(self, index: int, length: int, read):
        """``read(i)`` for the first readable sample from ``index`` on (wrapping); with policy raise,
        just ``read(index)``. Unreadable samples are counted; if none is readable, a DataError."""
        if not self.skipping:
            return read(index)
        for step in range(length):
            i = (index + step) % length
            if i in self._unreadable:
                continue
            try:
                return read(i)
            except DataError as exc:
                self._unreadable.add(i)  # each bad sample counts once, however often it is drawn
                self.counts["unreadable image"] += 1
                self.first = self.first or str(exc)
                self.at_exit()
        raise DataError(f"{self.name}: no sample could be read ({self.first})")


class FileSamples(torch.utils.data.Dataset):
    """Base of datasets that read one file per sample: indexing goes through the ``on_error`` policy.

    A subclass sets ``name`` (the registered name, for messages), ``noun`` (what a sample is) and
    ``self.bad`` (a :class:`BadData`), and implements ``__len__`` and ``_read(i)`` (one sample, a
    :class:`DataError` naming the file when it cannot be read)."""

    name, noun = "dataset", "samples"
    bad: BadData

    def _read(self, i: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        i = check_index(self.name, i, len(self), self.noun)
        return self.bad.read_or_skip(i, len(self), self._read)

    def __getitems__(self, indices) -> list[dict]:
        return [self[i] for i in indices]
