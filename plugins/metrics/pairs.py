"""(target, generated) image pairs for the paired metrics from ``handforge evaluate``'s sources.

- two image folders, ``--real`` the targets and ``--fake`` the generations: files are matched by
  their path below the folder (``seq01/0004.png`` with ``seq01/0004.png``). Every fake must have
  its target; targets without a fake are not compared, and their number is said. ``--num`` picks
  a seeded subset of the fakes. The targets' keypoints (for the hand metrics) come from the real
  folder's ``labels.json``, as for pose fidelity, where it has them;
- a run directory as ``--fake`` and no ``--real``: the run's val split, each sample's ``image``
  against what the task generates from the rest of the sample.
"""
from __future__ import annotations

import sys
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from handforge.errors import DataError, HandforgeError

from .sources import FolderSource, RunSource, fetch_samples, uint8_images

MAX_LISTED = 5


def _pixels(path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from None


def folder_pairs(real: FolderSource, fake: FolderSource, batch_size: int,
                 metric: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(targets, fakes, targets' keypoints or None) batches of uint8 (B, 3, H, W), matched by name."""
    # Every target is a candidate, whatever subset --num chose on the real side.
    targets = FolderSource(real.root, num=None)
    by_name = {f.relative_to(targets.root).as_posix(): i for i, f in enumerate(targets.files)}
    names = [f.relative_to(fake.root).as_posix() for f in fake.files]
    missing = [name for name in names if name not in by_name]
    if missing:
        listed = ", ".join(missing[:MAX_LISTED]) + (f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else "")
        raise HandforgeError(f"metric '{metric}' compares each --fake image with the --real image of the same name, "
                             f"and {len(missing)} of {len(names)} fakes have none in {targets.root}: {listed}")
    unmatched = len(by_name) - len(set(names))
    if unmatched:
        print(f"--real {targets.root}: {unmatched} of {len(by_name)} images have no --fake of the same name "
              f"(not compared)", file=sys.stderr)
    for start in range(0, len(names), batch_size):
        chunk = names[start:start + batch_size]
        index = [by_name[name] for name in chunk]
        reals, fakes = [], []
        for name, i in zip(chunk, index):
            target, generated = _pixels(targets.files[i]), _pixels(fake.root / name)
            if target.shape != generated.shape:
                raise HandforgeError(f"{fake.root / name}: {generated.shape[1]}x{generated.shape[0]} pixels, but its "
                                     f"target {targets.files[i]} is {target.shape[1]}x{target.shape[0]}")
            reals.append(target)
            fakes.append(generated)
        to_tensor = lambda arrays: torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        keypoints = None if targets.keypoints is None else targets.keypoints[torch.tensor(index)]
        yield to_tensor(reals), to_tensor(fakes), keypoints


def run_pairs(source: RunSource, batch_size: int, metric: str):
    """(targets, generations, keypoints) batches from a run's val split (the first ``source.num``)."""
    dataset, device = source.run.dataset, source.run.device
    num = min(source.num, len(dataset))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(source.seed)
        for start in range(0, num, batch_size):
            samples = fetch_samples(dataset, list(range(start, min(start + batch_size, num))))
            keypoints = samples.get("keypoints")
            conditions = {k: v.to(device) for k, v in samples.items() if k != "image"}
            try:
                with torch.no_grad():
                    generated = source.run.task.generate(conditions)
            except NotImplementedError as exc:
                raise HandforgeError(f"{source.description}: {exc}; only a task that generates images can be a source") from None
            yield uint8_images(samples["image"]), uint8_images(generated), keypoints
