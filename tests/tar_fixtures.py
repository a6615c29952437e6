"""Tar shards in the SynthSL and Bosphorus layouts, written by the tests (no real data needed):
frames are flat colours with one bright square where the right wrist is, so a test can tell which
frame and which keypoints a sample came from."""
from __future__ import annotations

import gzip
import io
import pickle
import tarfile

import numpy as np
from PIL import Image

from handforge.plugins.datasets.tar_shards.layouts import BOSPHORUS_HANDS, SYNTHSL_HANDS

N_SYNTHSL, N_BOSPHORUS = 96, 96


def png(width: int, height: int, value: int) -> bytes:
    array = np.full((height, width, 3), value, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def keypoints(n: int, right_hand: list, wrist_xy) -> np.ndarray:
    """(n, 2) normalised points: the right hand's 21 around ``wrist_xy``, the rest at 0 (not found)."""
    points = np.zeros((n, 2), np.float64)
    for joint, index in enumerate(right_hand):
        points[index] = (wrist_xy[0] + 0.01 * joint, wrist_xy[1] + 0.005 * joint)
    return points


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path, members: list[tuple[str, bytes]], compress: bool = False) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            add(tar, name, data)
    raw = buffer.getvalue()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def synthsl(root, sequences=("seqA", "seqB"), frames=3, size=32) -> dict:
    """``training.tar`` / ``test.tar`` and the two reference tars; returns {key: (value, wrist_xy)}."""
    root.mkdir(parents=True, exist_ok=True)
    right = SYNTHSL_HANDS[21:]
    truth, members = {}, []
    for s, seq in enumerate(sequences):
        for f in range(frames):
            value, wrist = 40 * s + 10 * f + 20, (0.2 + 0.1 * f, 0.3 + 0.05 * s)
            key = f"{seq}.{f:05d}"
            members += [(f"{key}.rgb.png", png(size, size, value)),
                        (f"{key}.keypoints.pkl", pickle.dumps(keypoints(N_SYNTHSL, right, wrist))),
                        (f"{key}.depth.png", png(size, size, 1)),
                        (f"{key}.segm.png", png(size, size, 2)),
                        (f"{key}.normal.png", png(size, size, 3))]
            truth[key] = (value, wrist)
    write_tar(root / "training.tar", members)
    write_tar(root / "test.tar", members[:5])
    write_tar(root / "base_imgs_tar.tar", [(f"{seq}.png", png(size, size, 200 + s)) for s, seq in enumerate(sequences)])
    write_tar(root / "base_kps_tar.tar", [(f"{seq}.pkl", pickle.dumps(keypoints(N_SYNTHSL, right, (0.5, 0.5))))
                                          for seq in sequences])
    return truth


def bosphorus(root, clips=("0001.1.001", "0001.1.002", "0002.3.004"), frames=2) -> dict:
    """``train/`` and ``test/`` clip shards (1920x1080 frames) and the reference archives."""
    right = BOSPHORUS_HANDS[21:]
    truth = {}
    for split in ("train", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for c, clip in enumerate(clips):
        members = []
        for f in range(frames):
            value, wrist = 30 * c + 10 * f + 20, (0.4 + 0.05 * f, 0.5)
            members += [(f"{f:04d}.rgb.png", png(1920, 1080, value)),
                        (f"{f:04d}.keypoints.pkl", pickle.dumps(keypoints(N_BOSPHORUS, right, wrist))),
                        (f"{f:04d}.depth.pkl", pickle.dumps(np.zeros((4, 4), np.uint8)))]
            truth[(clip, f)] = (value, wrist)
        write_tar(root / "train" / f"{clip}.tar.gz", members, compress=True)
    write_tar(root / "test" / f"{clips[0]}.tar.gz", members, compress=True)
    write_tar(root / "base_images.tar.gz", [(f"{clip}.png", png(1920, 1080, 250)) for clip in clips], compress=True)
    write_tar(root / "base_kps.tar.gz", [(f"{clip}.pickle", pickle.dumps(keypoints(N_BOSPHORUS, right, (0.5, 0.5))))
                                         for clip in clips], compress=True)
    return truth
