"""``handforge prepare mocap ROOT --out DIR``: hand poses of a tree of mocap sequences, split by
sequence, sampled to per-priority targets, written as the memory-mappable arrays ``hand_poses`` reads
(with the train statistics and each split's standardized rows: ``handforge.pose_standardization``).

A sequence's dataset is the first folder under ROOT (AMASS: CMU, KIT, ...; Motion-X subsets;
GRAB, arctic). The priority table (``priorities.toml``, or ``--table``) gives each dataset a
priority and each priority a share of ``--total`` frames. Each sequence is first filtered
(``--fps``, ``--drop-flat``, ``--drop-static``), then each priority's frames are spread evenly
over its datasets and each dataset's over its sequences, an even stride through each, so no one
file floods a split. Splits are by sequence, never by frame. No randomness but the seeded split
permutation: a rerun with the same inputs writes the same bytes.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys
import tempfile

import attrs
import numpy as np
from tqdm import tqdm

from handforge.errors import DataError, HandforgeError
from handforge.pose_standardization import write_standardization

from .common import read_sequence
from .priorities import load_table
from .sampling import even_stride, fair_split, flat_frames, fps_indices, moving_frames

SPLIT_NAMES = ("train", "val", "test")
SUFFIXES = (".npz", ".npy")
DROP_REASONS = ("fps", "flat_hands", "static")
DEFAULT_STATIC_THRESHOLD = 0.01  # radians: about 0.6 degrees on the most-moved joint axis


@attrs.frozen
class Filters:
    fps: float | None = None                 # at most this many frames per second of a sequence
    drop_flat: bool = False                  # drop frames whose both hands are ~0 (body-only captures)
    static_threshold: float | None = None    # drop frames that moved no more than this (radians)


@attrs.define
class Sequence:
    """One readable sequence after filtering: its frames that can still be sampled."""
    dataset: str
    rel: str
    flat_hand_mean: bool
    frames: np.ndarray   # (M,) indices into the file's frames
    left: np.ndarray     # (M, 45)
    right: np.ndarray    # (M, 45)


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1) > 1e-6:
        raise HandforgeError(f"--split {text!r}: expected three fractions train,val,test summing to 1")
    return parts


def scan(root: pathlib.Path) -> list[pathlib.Path]:
    if not root.is_dir():
        raise HandforgeError(f"prepare mocap: {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise HandforgeError(f"prepare mocap: no .npz / .npy sequence files under {root}")
    return files


def check_filters(filters: Filters) -> None:
    if filters.fps is not None and not filters.fps > 0:
        raise HandforgeError(f"--fps {filters.fps}: expected a positive number of frames per second")
    if filters.static_threshold is not None and not filters.static_threshold >= 0:
        raise HandforgeError(f"--drop-static {filters.static_threshold}: expected a threshold >= 0 radians")


def filter_frames(seq, filters: Filters, path, dropped: dict) -> np.ndarray:
    """The frame indices of ``seq`` that survive the filters; ``dropped`` counts the rest by reason."""
    frames = np.arange(len(seq), dtype=np.int64)
    if filters.fps is not None:
        if seq.frame_rate is None or not seq.frame_rate > 0:
            raise DataError(f"{path}: no frame rate in the file (needed by --fps; AMASS stores it as "
                            "mocap_framerate / mocap_frame_rate, GRAB as framerate)")
        frames = fps_indices(len(seq), seq.frame_rate, filters.fps)
        dropped["fps"] += len(seq) - len(frames)
    hands = np.concatenate([seq.left[frames], seq.right[frames]], axis=1)
    if filters.drop_flat:
        keep = ~flat_frames(hands)
        dropped["flat_hands"] += int((~keep).sum())
        frames, hands = frames[keep], hands[keep]
    if filters.static_threshold is not None:
        keep = moving_frames(hands, filters.static_threshold)
        dropped["static"] += len(frames) - len(keep)
        frames = frames[keep]
    return frames


def read_all(root, files, table, filters, on_error, progress):
    """The readable sequences, filtered; per-dataset frame counts; unreadable files by reason;
    files of excluded datasets."""
    sequences, counts, unreadable, excluded = [], {}, {}, {}
    for path in tqdm(files, unit="file", desc="prepare mocap", disable=None if progress else True,
                     file=sys.stderr):
        rel = path.relative_to(root)
        dataset = rel.parts[0] if len(rel.parts) > 1 else None
        if dataset is not None and table.priority_of(dataset) is None:
            excluded[dataset] = excluded.get(dataset, 0) + 1
            continue
        dropped = dict.fromkeys(DROP_REASONS, 0)
        try:
            seq = read_sequence(path)
            frames = filter_frames(seq, filters, path, dropped)
        except DataError as exc:
            if on_error != "skip":
                raise
            reason = str(exc).split(": ", 1)[-1][:80]
            unreadable[reason] = unreadable.get(reason, 0) + 1
            continue
        dataset = dataset or seq.source
        if table.priority_of(dataset) is None:  # a file directly under ROOT, named by its format
            excluded[dataset] = excluded.get(dataset, 0) + 1
            continue
        c = counts.setdefault(dataset, {"files": 0, "read": 0, "dropped": dict.fromkeys(DROP_REASONS, 0)})
        c["files"] += 1
        c["read"] += len(seq)
        for reason, n in dropped.items():
            c["dropped"][reason] += n
        sequences.append(Sequence(dataset, str(rel), seq.flat_hand_mean, frames,
                                  seq.left[frames], seq.right[frames]))
    return sequences, counts, unreadable, excluded


def allocate(sequences, table, total) -> tuple[dict, dict]:
    """sequence index -> positions (into its filtered frames) to keep; priority -> target frames.
    A priority with no dataset on disk gives its share to the present ones, in proportion."""
    priority = {d: table.priority_of(d) for d in {s.dataset for s in sequences}}
    members = {p: [i for i, s in enumerate(sequences) if priority[s.dataset] == p] for p in table.shares}
    present_share = sum(table.shares[p] for p, m in members.items() if m)
    if present_share <= 0:
        present = sorted(p for p, m in members.items() if m)
        raise HandforgeError(f"{table.path}: every priority with data on disk ({', '.join(present)}) "
                             "has share 0: nothing to sample")
    chosen, targets = {}, {}
    for p, group in members.items():
        targets[p] = int(round(total * table.shares[p] / present_share)) if group else 0
        by_dataset = {}
        for i in group:
            by_dataset.setdefault(sequences[i].dataset, []).append(i)
        names = sorted(by_dataset)
        capacity = [sum(len(sequences[i].frames) for i in by_dataset[d]) for d in names]
        for d, budget in zip(names, fair_split(targets[p], capacity)):
            seqs = by_dataset[d]
            for i, take in zip(seqs, fair_split(int(budget), [len(sequences[i].frames) for i in seqs])):
                chosen[i] = even_stride(len(sequences[i].frames), int(take))
    return chosen, targets


def assign_splits(chosen: dict, count: int, split, seed) -> np.ndarray:
    """A split per sequence (0 train, 1 val, 2 test; -1 for one no frame was sampled from): a seeded
    permutation of the sampled sequences cut at the fractions, so the fractions hold for the
    sequences written, not for the empty ones (body-only captures under --drop-flat)."""
    sampled = np.asarray([i for i in range(count) if len(chosen[i])], dtype=np.int64)
    order = sampled[np.random.default_rng(seed).permutation(len(sampled))]
    bounds = np.floor(np.cumsum(split)[:2] * len(sampled) + 0.5).astype(int)
    split_of = np.full(count, -1, dtype=np.int64)
    for k, chunk in enumerate(np.split(order, bounds)):
        split_of[chunk] = k
    return split_of


def write_split(folder: pathlib.Path, rows, sequences, chosen, datasets) -> None:
    folder.mkdir()
    parts = {"left": [], "right": [], "source": [], "frame": []}
    for i in rows:
        s, keep = sequences[i], chosen[i]
        parts["left"].append(s.left[keep])
        parts["right"].append(s.right[keep])
        parts["source"].append(np.full(len(keep), datasets.index(s.dataset), np.int16))
        parts["frame"].append(s.frames[keep].astype(np.int32))
    for key, dtype, width in (("left", np.float32, 45), ("right", np.float32, 45),
                              ("source", np.int16, 0), ("frame", np.int32, 0)):
        empty = np.zeros((0, width) if width else (0,), dtype)
        np.save(folder / f"{key}.npy", np.concatenate(parts[key]).astype(dtype) if parts[key] else empty)


def prepare_mocap(root, out, split=(0.8, 0.1, 0.1), seed=0, total=None, on_error="stop", *,
                  table=None, filters: Filters = Filters(), progress=False) -> dict:
    """Prepare ROOT into the new folder OUT; returns what ``dataset_metadata.json`` holds.
    ``total`` None takes the table's; ``table`` None the shipped ``priorities.toml``."""
    root, out = pathlib.Path(root), pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HandforgeError(f"--out {out}: exists and is not an empty folder; choose another folder")
    table = load_table(table)
    check_filters(filters)
    total = table.total if total is None else total
    if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
        raise HandforgeError(f"--total {total!r}: expected a positive whole number of frames")
    files = scan(root)
    rels = [f.relative_to(root).parts for f in files]
    path_datasets = {parts[0] for parts in rels if len(parts) > 1}
    if all(len(parts) > 1 for parts in rels):
        table.require_some_present(path_datasets, root)  # every dataset known from its path: fail early
    sequences, counts, unreadable, excluded = read_all(root, files, table, filters, on_error, progress)
    on_disk = sorted(path_datasets | set(counts))
    table.require_some_present(on_disk, root)
    if not sequences:
        raise DataError(f"prepare mocap: no readable sequence under {root}"
                        + (f" (excluded as unlisted: {', '.join(sorted(excluded))})" if excluded else ""))
    datasets = sorted({s.dataset for s in sequences})
    conventions = {}
    for s in sequences:
        if conventions.setdefault(s.dataset, s.flat_hand_mean) != s.flat_hand_mean:
            raise DataError(f"{root / s.rel}: flat_hand_mean={s.flat_hand_mean}, other files of {s.dataset} differ")

    chosen, targets = allocate(sequences, table, total)
    split_of = assign_splits(chosen, len(sequences), split, seed)
    meta = metadata(sequences, chosen, targets, split_of, table, total, seed, split, filters,
                    datasets, conventions, counts, unreadable, excluded, on_disk)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside OUT and renamed into place: OUT appears whole or not at all.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for k, name in enumerate(SPLIT_NAMES):
            rows = sorted(np.flatnonzero(split_of == k).tolist(), key=lambda i: sequences[i].rel)
            write_split(tmp / name, rows, sequences, chosen, datasets)
        if meta["splits"]["train"]["frames"]:  # standardize = true reads these; no train poses, no statistics
            write_standardization(tmp, SPLIT_NAMES)
        (tmp / "dataset_metadata.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def metadata(sequences, chosen, targets, split_of, table, total, seed, split, filters, datasets,
             conventions, counts, unreadable, excluded, on_disk) -> dict:
    priority = {d: table.priority_of(d) for d in datasets}
    splits = {}
    for k, name in enumerate(SPLIT_NAMES):
        rows = np.flatnonzero(split_of == k).tolist()
        per_dataset, per_priority = {}, {}
        for i in rows:
            d, n = sequences[i].dataset, len(chosen[i])
            per_dataset[d] = per_dataset.get(d, 0) + n
            per_priority[priority[d]] = per_priority.get(priority[d], 0) + n
        splits[name] = {"sequences": len(rows), "frames": sum(per_dataset.values()),
                        "per_dataset": per_dataset, "per_priority": per_priority}
    for i, s in enumerate(sequences):
        c = counts[s.dataset]
        c["available"] = c.get("available", 0) + len(s.frames)
        c["kept"] = c.get("kept", 0) + len(chosen[i])
    kept = {p: sum(c["kept"] for d, c in counts.items() if priority[d] == p) for p in table.shares}
    all_kept = sum(kept.values()) or 1
    missing = table.entries_missing(on_disk)
    warnings = [f"no {p}-priority dataset on disk" for p in table.shares
                if not any(priority[d] == p for d in datasets)]
    warnings += missing_warnings(table.path, missing)
    warnings += [f"{p}: {kept[p]} frames kept of a target of {targets[p]} (its datasets hold no more "
                 "after filtering)" for p in table.shares if 0 < targets[p] and kept[p] < targets[p]]
    return {
        "sources": datasets, "priority": priority, "flat_hand_mean": conventions, "seed": seed,
        "split": list(split), "total_target": total, "table": table.path, "unlisted": table.unlisted,
        "target_shares": table.shares, "target_frames": targets, "kept_frames": kept,
        "achieved_shares": {p: kept[p] / all_kept for p in kept},
        "filters": {"fps": filters.fps, "drop_flat": filters.drop_flat,
                    "static_threshold": filters.static_threshold},
        "datasets": counts,
        "dropped": {r: sum(c["dropped"][r] for c in counts.values()) for r in DROP_REASONS},
        "splits": splits, "unreadable": unreadable, "excluded_files": excluded,
        "missing_datasets": missing, "warnings": warnings,
    }


def missing_warnings(table_path, missing: dict) -> list[str]:
    return [f"{table_path}: {p} datasets not under the root: {', '.join(names)}" for p, names in missing.items()]


def configure(parser) -> None:
    parser.add_argument("root", help="folder of mocap sequences, one sub-folder per dataset")
    parser.add_argument("--out", required=True, help="new folder for the prepared arrays")
    parser.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test sequence fractions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--total", type=int, default=None,
                        help="target number of frames (default: the table's total, 1500000 as shipped)")
    parser.add_argument("--table", default=None, metavar="FILE",
                        help="priority table TOML replacing the shipped priorities.toml")
    parser.add_argument("--fps", type=float, default=None,
                        help="keep at most this many frames per second of each sequence (its own rate)")
    parser.add_argument("--drop-flat", action="store_true",
                        help="drop frames whose both hands are flat (all 90 values ~0: body-only captures)")
    parser.add_argument("--drop-static", type=float, nargs="?", const=DEFAULT_STATIC_THRESHOLD, default=None,
                        metavar="RADIANS", help="drop frames where no hand value moved more than RADIANS "
                        f"since the last kept frame (default {DEFAULT_STATIC_THRESHOLD})")
    parser.add_argument("--skip-unreadable", dest="skip", action="store_true",
                        help="count unreadable files in the metadata instead of stopping")


def command(args) -> int:
    filters = Filters(args.fps, args.drop_flat, args.drop_static)
    meta = prepare_mocap(args.root, args.out, parse_split(args.split), args.seed, args.total,
                         "skip" if args.skip else "stop", table=args.table, filters=filters, progress=True)
    frames = {s: c["frames"] for s, c in meta["splits"].items()}
    print(f"prepared {args.out}: {frames} frames from {len(meta['sources'])} datasets")
    # The shipped table names ~60 datasets, most absent from any one tree: one line for those here,
    # the full list in dataset_metadata.json.
    long_lists = set(missing_warnings(meta["table"], meta["missing_datasets"]))
    absent = sum(len(names) for names in meta["missing_datasets"].values())
    if absent:
        print(f"warning: {absent} datasets of {meta['table']} are not under {args.root} "
              "(missing_datasets in dataset_metadata.json)", file=sys.stderr)
    for warning in meta["warnings"]:
        if warning not in long_lists:
            print(f"warning: {warning}", file=sys.stderr)
    return 0
