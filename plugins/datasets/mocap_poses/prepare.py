"""``handforge prepare mocap ROOT --out DIR``: hand poses of a tree of mocap sequences, split by
sequence, sampled to per-priority targets, written as the memory-mappable arrays ``hand_poses`` reads.

A sequence's dataset is the first folder under ROOT (AMASS: CMU, KIT, ...; Motion-X subsets;
GRAB, arctic). Each dataset has a priority (the seed's table below; unknown ones are low), each
priority a share of ``--total`` frames, spread evenly over that priority's sequences (an even
stride through each, so no one file floods a split). Splits are by sequence, never by frame.
"""
from __future__ import annotations

import io
import json
import pathlib
import shutil
import tempfile

import numpy as np

from handforge.errors import DataError, HandforgeError

from .common import read_sequence

SHARES = {"high": 0.60, "medium": 0.25, "low": 0.15}
PRIORITY = {
    **dict.fromkeys(["SignAvatars", "signlanguage", "DanceDB", "EyesJapan", "EyesJapanDataset",
                     "MotionXmusic", "MotionXperform", "music", "perform", "conductmusic",
                     "entertainment", "singing", "GRAB", "MOYO", "TCDHands", "TCD_handMocap", "ham",
                     "arctic", "Bedlam", "HUMAN4D", "idea400", "humman"], "high"),
    **dict.fromkeys(["magic", "speech", "talkshow", "tvshow", "interview", "videoconference",
                     "online_class", "livevlog", "kungfu", "fitness", "movie", "olympic", "mscoco"],
                    "medium"),
}
SPLIT_NAMES = ("train", "val", "test")
SUFFIXES = (".npz", ".npy")


def priority_of(dataset: str) -> str:
    if dataset.startswith("SignAvatars"):
        return "high"
    return PRIORITY.get(dataset, "low")


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


def prepare_mocap(root, out, split=(0.8, 0.1, 0.1), seed=0, total=1_500_000, on_error="stop") -> dict:
    root, out = pathlib.Path(root), pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise HandforgeError(f"--out {out}: folder exists and is not empty; choose another folder")
    sequences, unreadable = [], {}
    for path in scan(root):
        try:
            seq = read_sequence(path)
        except DataError as exc:
            if on_error != "skip":
                raise
            reason = str(exc).split(": ", 1)[-1][:80]
            unreadable[reason] = unreadable.get(reason, 0) + 1
            continue
        rel = path.relative_to(root)
        dataset = rel.parts[0] if len(rel.parts) > 1 else seq.source
        sequences.append((dataset, str(rel), seq))
    if not sequences:
        raise DataError(f"prepare mocap: no readable sequence under {root}")
    datasets = sorted({d for d, _, _ in sequences})
    conventions = {}
    for d, rel, seq in sequences:
        if conventions.setdefault(d, seq.flat_hand_mean) != seq.flat_hand_mean:
            raise DataError(f"{root / rel}: flat_hand_mean={seq.flat_hand_mean}, other files of {d} differ")
    rng = np.random.default_rng(seed)
    # Sequence-level split: a sequence's frames all go to one split.
    order = rng.permutation(len(sequences))
    bounds = np.floor(np.cumsum(split)[:2] * len(sequences) + 0.5).astype(int)
    split_of = np.empty(len(sequences), dtype=np.int64)
    for k, chunk in enumerate(np.split(order, bounds)):
        split_of[chunk] = k
    present = {p: [i for i, (d, _, _) in enumerate(sequences) if priority_of(d) == p] for p in SHARES}
    chosen = {}  # sequence index -> frame indices kept
    for p, members in present.items():
        if not members:
            continue
        quota = int(round(total * SHARES[p] / sum(SHARES[q] for q in SHARES if present[q])))
        # Even over the priority's datasets, then even over each dataset's sequences.
        by_dataset = {}
        for i in members:
            by_dataset.setdefault(sequences[i][0], []).append(i)
        for group in by_dataset.values():
            per_seq = max(1, quota // len(by_dataset) // len(group))
            for i in group:
                n = len(sequences[i][2])
                take = min(n, per_seq)
                chosen[i] = np.unique(np.linspace(0, n - 1, take).round().astype(np.int64))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    counts = {s: {"frames": 0, "sequences": 0, "per_dataset": {}} for s in SPLIT_NAMES}
    try:
        for k, name in enumerate(SPLIT_NAMES):
            rows = [i for i in range(len(sequences)) if split_of[i] == k and i in chosen]
            rows.sort(key=lambda i: sequences[i][1])
            left = [sequences[i][2].left[chosen[i]] for i in rows]
            right = [sequences[i][2].right[chosen[i]] for i in rows]
            source = [np.full(len(chosen[i]), datasets.index(sequences[i][0]), np.int16) for i in rows]
            frame = [chosen[i].astype(np.int32) for i in rows]
            (tmp / name).mkdir()
            for key, parts, width in (("left", left, 45), ("right", right, 45), ("source", source, 0),
                                      ("frame", frame, 0)):
                dtype = {"left": np.float32, "right": np.float32, "source": np.int16, "frame": np.int32}[key]
                empty = np.zeros((0, width) if width else (0,), dtype)
                np.save(tmp / name / f"{key}.npy", np.concatenate(parts) if parts else empty)
            counts[name]["sequences"] = len(rows)
            counts[name]["frames"] = int(sum(len(chosen[i]) for i in rows))
            for i in rows:
                d = sequences[i][0]
                counts[name]["per_dataset"][d] = counts[name]["per_dataset"].get(d, 0) + len(chosen[i])
        kept = {p: int(sum(len(chosen[i]) for i in m)) for p, m in present.items()}
        all_kept = sum(kept.values()) or 1
        meta = {"sources": datasets, "priority": {d: priority_of(d) for d in datasets},
                "flat_hand_mean": conventions, "seed": seed, "split": list(split), "total_target": total,
                "target_shares": SHARES, "achieved_shares": {p: kept[p] / all_kept for p in kept},
                "splits": counts, "unreadable": unreadable,
                "warnings": [f"no {p}-priority dataset on disk" for p, m in present.items() if not m]}
        (tmp / "dataset_metadata.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def configure(parser) -> None:
    parser.add_argument("root", help="folder of mocap sequences, one sub-folder per dataset")
    parser.add_argument("--out", required=True, help="new folder for the prepared arrays")
    parser.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test sequence fractions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--total", type=int, default=1_500_000, help="target number of frames")
    parser.add_argument("--skip-unreadable", dest="skip", action="store_true",
                        help="count unreadable files in the metadata instead of stopping")


def command(args) -> int:
    meta = prepare_mocap(args.root, args.out, parse_split(args.split), args.seed, args.total,
                         "skip" if args.skip else "stop")
    frames = {s: c["frames"] for s, c in meta["splits"].items()}
    print(f"prepared {args.out}: {frames} frames from {len(meta['sources'])} datasets")
    return 0
