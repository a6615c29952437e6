"""Pose-transfer data and metrics throughput: the tar-shard reader against a plain tarfile + pickle
loop of the seed project's kind, and the batched SSIM against scikit-image's, in one run.

    python bench/pose_transfer_data.py [--frames 600] [--size 256] [--clips 6] [--clip-frames 10]
                                       [--ssim-images 64] [--threads 1] [--ssim-threads 1 2] [--reps 3]
                                       [--only reading|ssim] [--json]

Reading: a temporary folder receives a SynthSL-layout shard set (``--frames`` frames of ``--size``
px PNG in ``training.tar`` with keypoint pickles and the depth/segmentation/normal members, plus the
reference tars) and a Bosphorus-layout one (``--clips`` clip shards ``.tar.gz`` of ``--clip-frames``
1920x1080 JPEG frames). Each is read to (3, size, size) float images with their keypoints:

- seed loop: what the seed's loader does: ``tarfile.open``, every member read into memory, members
  grouped by key, ``PIL`` decode (+ crop) and resize, ``pickle.loads`` of the keypoints (no
  restriction: the peer here is the unsafe way), the references decoded up front;
- ours (index): the ``synthsl`` / ``bosphorus`` dataset, map-style: the index scan, then every
  sample by offset, in a shuffled order;
- ours (stream): ``dataset.stream()`` front to back through the shuffle buffer.

Frames/s counts decoded target frames (each with its reference and both keypoint sets), best of
``--reps`` runs (the machine may be shared: the best is the least disturbed).

SSIM: ``--ssim-images`` pairs of ``--size`` px images, ours in one batched call on each of
``--ssim-threads`` torch thread counts, scikit-image's ``structural_similarity`` (same settings: Gaussian 11 / 1.5, no
sample covariance, per channel) in a loop on one thread. Goal: ours >= 5x. Best of 3 repetitions.
(Ours runs each op on one thread and shares its cache-sized chunks out over the thread count as
Python threads, see ``paired_math``.)
"""
from __future__ import annotations

import argparse
import io
import json
import pathlib
import pickle
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def textured(size: int, seed: int, width: int | None = None) -> np.ndarray:
    """A smooth image with some texture: compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    width = width or size
    yy, xx = np.mgrid[0:size, 0:width] / max(size, width)
    base = np.sin(xx * rng.uniform(4, 12) + rng.uniform(0, 6)) + np.cos(yy * rng.uniform(4, 12))
    image = (base[..., None] * rng.uniform(30, 60, 3) + 128 + rng.normal(0, 6, (size, width, 3)))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_synthsl(root: pathlib.Path, frames: int, size: int) -> None:
    import tar_fixtures as fx

    right = fx.SYNTHSL_HANDS[21:]
    root.mkdir(parents=True)
    sequences = max(1, frames // 50)
    members = []
    images = [encode(textured(size, i), "PNG") for i in range(8)]  # a few distinct frames, reused
    small = encode(np.zeros((size, size, 3), np.uint8), "PNG")
    for f in range(frames):
        key = f"seq{f % sequences:03d}.{f:06d}"
        kps = pickle.dumps(fx.keypoints(fx.N_SYNTHSL, right, (0.3 + 0.001 * (f % 100), 0.4)))
        members += [(f"{key}.rgb.png", images[f % 8]), (f"{key}.keypoints.pkl", kps),
                    (f"{key}.depth.png", small), (f"{key}.segm.png", small), (f"{key}.normal.png", small)]
    fx.write_tar(root / "training.tar", members)
    fx.write_tar(root / "test.tar", members[:5])
    fx.write_tar(root / "base_imgs_tar.tar", [(f"seq{s:03d}.png", images[s % 8]) for s in range(sequences)])
    fx.write_tar(root / "base_kps_tar.tar", [(f"seq{s:03d}.pkl", pickle.dumps(fx.keypoints(fx.N_SYNTHSL, right, (0.5, 0.5))))
                                             for s in range(sequences)])


def write_bosphorus(root: pathlib.Path, clips: int, clip_frames: int) -> None:
    import tar_fixtures as fx

    right = fx.BOSPHORUS_HANDS[21:]
    frames = [encode(textured(1080, i, 1920), "JPEG") for i in range(4)]
    names = [f"0001.1.{c:03d}" for c in range(clips)]
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    for c, clip in enumerate(names):
        members = []
        for f in range(clip_frames):
            members += [(f"{f:04d}.rgb.jpg", frames[(c + f) % 4]),
                        (f"{f:04d}.keypoints.pkl", pickle.dumps(fx.keypoints(fx.N_BOSPHORUS, right, (0.45, 0.5)))),
                        (f"{f:04d}.depth.pkl", pickle.dumps(np.zeros((270, 480), np.uint8)))]
        fx.write_tar(root / "train" / f"{clip}.tar.gz", members, compress=True)
    fx.write_tar(root / "test" / f"{names[0]}.tar.gz", members[:3], compress=True)
    fx.write_tar(root / "base_images.tar.gz", [(f"{clip}.png", frames[0]) for clip in names], compress=True)
    fx.write_tar(root / "base_kps.tar.gz", [(f"{clip}.pickle", pickle.dumps(fx.keypoints(fx.N_BOSPHORUS, right, (0.5, 0.5))))
                                            for clip in names], compress=True)


# -- the seed's kind of loop ------------------------------------------------------------------------


def seed_image(data: bytes, size: int, crop=None) -> torch.Tensor:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if crop is not None:
        image = image.crop(crop)
    image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1


def seed_read_all(path: pathlib.Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def seed_loop(shards: list[pathlib.Path], references: tuple, size: int, key_parts: int, crop=None) -> int:
    """Frames decoded by a plain tarfile + pickle loop (the seed's ``DS_SynthSL`` / ``DS_Bosphorus``)."""
    bases = {name.rsplit(".", 1)[0]: seed_image(data, size, crop) for name, data in seed_read_all(references[0])}
    base_kps = {name.rsplit(".", 1)[0]: pickle.loads(data) for name, data in seed_read_all(references[1])}
    count = 0
    for shard in shards:
        groups: dict = {}
        for name, data in seed_read_all(shard):
            parts = name.split(".")
            groups.setdefault(".".join(parts[:key_parts]), {})[".".join(parts[key_parts:])] = data
        for key, members in groups.items():
            image = next(v for k, v in members.items() if k.startswith("rgb."))
            target = seed_image(image, size, crop)
            keypoints = pickle.loads(members["keypoints.pkl"])
            sequence = key.split(".")[0] if key_parts == 2 else shard.name.removesuffix(".tar.gz")
            assert target.shape[0] == 3 and keypoints.shape[0] and sequence in bases and sequence in base_kps
            count += 1
    return count


def timed(fn, reps: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def reading_rows(root: pathlib.Path, args) -> list[dict]:
    from handforge.plugins.datasets.tar_shards.dataset import BosphorusPairs, SynthSLPairs, TarPairsConfig
    from handforge.plugins.datasets.tar_shards.layouts import LAYOUTS

    rows = []
    for layout, cls in (("synthsl", SynthSLPairs), ("bosphorus", BosphorusPairs)):
        folder = root / layout
        spec = LAYOUTS[layout]
        shards = spec.shards(folder, "train")
        references = (folder / spec.reference_images, folder / spec.reference_keypoints)
        seed_s, frames = timed(lambda: seed_loop(shards, references, args.size, spec.key_parts, spec.crop), args.reps)

        def indexed():
            data = cls(TarPairsConfig(root=str(folder), size=args.size))
            order = np.random.default_rng(0).permutation(len(data))
            return sum(1 for i in order if data[int(i)]["image"].shape[0] == 3)

        def streamed():
            data = cls(TarPairsConfig(root=str(folder), size=args.size))
            return sum(1 for sample in data.stream() if sample["image"].shape[0] == 3)

        index_s, index_frames = timed(indexed, args.reps)
        stream_s, stream_frames = timed(streamed, args.reps)
        assert frames == index_frames == stream_frames, (frames, index_frames, stream_frames)
        megabytes = sum(s.stat().st_size for s in shards) / 1e6
        rows.append({"layout": layout, "frames": frames, "shard_mb": round(megabytes, 1),
                     "seed_fps": frames / seed_s, "index_fps": frames / index_s, "stream_fps": frames / stream_s})
    return rows


def ssim_row(args, threads: int) -> dict:
    from skimage.metrics import structural_similarity

    from handforge.plugins.metrics.paired_math import ssim

    a = np.stack([textured(args.size, i) for i in range(args.ssim_images)])
    rng = np.random.default_rng(1)
    b = np.clip(a.astype(int) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
    peer_count = min(args.ssim_images, 16)

    def peer():
        return [structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      channel_axis=-1, data_range=255) for x, y in zip(a[:peer_count], b[:peer_count])]

    ta, tb = (torch.from_numpy(z).permute(0, 3, 1, 2).contiguous() for z in (a, b))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ssim(ta[:2], tb[:2])  # warm-up (oneDNN primitive creation)
        ours_s, ours = timed(lambda: ssim(ta, tb), reps=3)
    finally:
        torch.set_num_threads(previous)
    peer_s, theirs = timed(peer, reps=3)
    difference = float(np.abs(ours[:peer_count].numpy() - np.array(theirs)).max())
    return {"images": args.ssim_images, "size": args.size, "threads": threads,
            "ours_img_s": args.ssim_images / ours_s, "skimage_img_s": peer_count / peer_s,
            "max_abs_difference": difference}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--clip-frames", dest="clip_frames", type=int, default=10)
    parser.add_argument("--ssim-images", dest="ssim_images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the reading runs")
    parser.add_argument("--ssim-threads", dest="ssim_threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads of our SSIM, one row each (skimage: always 1)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each reading run; the best is kept")
    parser.add_argument("--only", choices=("reading", "ssim"), help="run one of the two benchmarks")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, ssim_rows = [], []
    if args.only != "ssim":
        with tempfile.TemporaryDirectory() as tmp:
            root = pathlib.Path(tmp)
            write_synthsl(root / "synthsl", args.frames, args.size)
            write_bosphorus(root / "bosphorus", args.clips, args.clip_frames)
            rows = reading_rows(root, args)
    if args.only != "reading":
        ssim_rows = [ssim_row(args, threads) for threads in args.ssim_threads]
    if args.json:
        print(json.dumps({"reading": rows, "ssim": ssim_rows}, indent=2))
        return
    if rows:
        print(f"reading ({args.size} px outputs, {args.threads} torch thread(s)):")
        print("| layout | frames | shards MB | seed loop frames/s | ours (index) frames/s | ours (stream) frames/s "
              "| index / seed | stream / seed |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layout']} | {r['frames']} | {r['shard_mb']} | {r['seed_fps']:.1f} | {r['index_fps']:.1f} | "
                  f"{r['stream_fps']:.1f} | {r['index_fps'] / r['seed_fps']:.2f} | {r['stream_fps'] / r['seed_fps']:.2f} |")
    if not ssim_rows:
        return
    print(f"\nSSIM ({args.ssim_images} pairs of {args.size} px; skimage on 1 thread, 16 pairs):")
    print("| our threads | ours img/s | skimage img/s | ours / skimage | max abs difference |")
    print("|---|---|---|---|---|")
    for s in ssim_rows:
        print(f"| {s['threads']} | {s['ours_img_s']:.1f} | {s['skimage_img_s']:.1f} | "
              f"{s['ours_img_s'] / s['skimage_img_s']:.2f} | {s['max_abs_difference']:.1e} |")


if __name__ == "__main__":
    main()
