"""The priority table of ``prepare mocap``: which dataset is which priority, each priority's share
of the frames, the default total. Shipped as ``priorities.toml`` beside this module; ``--table``
replaces it. Every problem in a table is reported at once, each naming the file and the key."""
from __future__ import annotations

import fnmatch
import importlib.resources
import math
import pathlib

import attrs

from handforge.errors import HandforgeError, RecipeError
from handforge.recipe import read_toml

KEYS = ("total", "unlisted", "shares", "datasets")
EXCLUDE = "exclude"
SHARE_TOLERANCE = 1e-6


def default_table_path() -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files(__package__) / "priorities.toml"))


@attrs.frozen
class PriorityTable:
    path: str
    total: int
    shares: dict          # priority -> share of the total, in the file's order
    names: dict           # exact dataset name -> priority
    patterns: dict        # glob pattern -> priority
    unlisted: str         # a priority, or "exclude"

    def priority_of(self, dataset: str) -> str | None:
        """The dataset's priority; None when unlisted datasets are excluded."""
        if dataset in self.names:
            return self.names[dataset]
        found = {p for pattern, p in self.patterns.items() if fnmatch.fnmatchcase(dataset, pattern)}
        if len(found) > 1:
            matched = sorted(f"datasets.{p} '{q}'" for q, p in self.patterns.items()
                             if fnmatch.fnmatchcase(dataset, q))
            raise HandforgeError(f"{self.path}: dataset '{dataset}' matches patterns of two priorities "
                                 f"({', '.join(matched)}); list it by name under one")
        if found:
            return found.pop()
        return None if self.unlisted == EXCLUDE else self.unlisted

    def entries_missing(self, on_disk) -> dict:
        """priority -> the table's names / patterns that match no dataset on disk."""
        missing = {}
        for entry, p in (*self.names.items(), *self.patterns.items()):
            if not any(fnmatch.fnmatchcase(d, entry) for d in on_disk):
                missing.setdefault(p, []).append(entry)
        return {p: sorted(entries) for p, entries in missing.items()}

    def require_some_present(self, on_disk, root) -> None:
        entries = [*self.names, *self.patterns]
        if not any(fnmatch.fnmatchcase(d, e) for d in on_disk for e in entries):
            raise HandforgeError(f"{self.path}: names none of the datasets under {root} "
                                 f"(found: {', '.join(sorted(on_disk))}); the first folder under ROOT "
                                 "is a sequence's dataset")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_table(path=None) -> PriorityTable:
    path = pathlib.Path(path) if path is not None else default_table_path()
    raw = read_toml(path)
    problems = [f"unknown key '{k}' (known: {', '.join(KEYS)})" for k in raw if k not in KEYS]

    shares = raw.get("shares")
    if not isinstance(shares, dict) or not shares:
        problems.append("'shares': expected a table of priority = share, e.g. [shares] high = 0.6")
        shares = {}
    for p, share in shares.items():
        if not _number(share) or not math.isfinite(share):
            problems.append(f"'shares.{p}': expected a number, got {share!r}")
        elif share < 0:
            problems.append(f"'shares.{p}': {share} is negative")
    if shares and all(_number(s) and math.isfinite(s) for s in shares.values()):
        total_share = sum(shares.values())
        if abs(total_share - 1) > SHARE_TOLERANCE:
            problems.append(f"'shares': the shares sum to {total_share:.9g}, not 1")

    total = raw.get("total", 1_500_000)
    if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
        problems.append(f"'total': expected a positive whole number of frames, got {total!r}")

    unlisted = raw.get("unlisted", "low")
    if unlisted != EXCLUDE and unlisted not in shares:
        where = "'unlisted'" if "unlisted" in raw else "'unlisted' (default 'low')"
        problems.append(f"{where}: {unlisted!r} is neither a priority in [shares] "
                        f"({', '.join(shares)}) nor '{EXCLUDE}'")

    datasets = raw.get("datasets", {})
    if not isinstance(datasets, dict):
        problems.append("'datasets': expected a table of priority = [dataset names]")
        datasets = {}
    names, patterns, listed_under = {}, {}, {}
    for p, entries in datasets.items():
        if p not in shares:
            problems.append(f"'datasets.{p}': no share for priority '{p}' in [shares] ({', '.join(shares)})")
            continue
        if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
            problems.append(f"'datasets.{p}': expected a list of dataset names, got {entries!r}")
            continue
        for entry in entries:
            first = listed_under.setdefault(entry, p)
            if first != p:
                problems.append(f"'datasets.{p}': '{entry}' is also listed under 'datasets.{first}'")
            elif any(c in entry for c in "*?["):
                patterns[entry] = p
            else:
                names[entry] = p
    if problems:
        raise RecipeError(problems, source=str(path))
    return PriorityTable(str(path), total, dict(shares), names, patterns, unlisted)
