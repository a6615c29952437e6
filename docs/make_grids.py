"""Draw the sample grids the README shows: python docs/make_grids.py [--out docs]

One row per class of each procedural_hands class set, default options otherwise, at 96 px.
"""
import argparse
import pathlib

import torch

from handforge.imaging import save_grid
from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig


def first_per_class(dataset, per_class: int) -> list:
    """The first `per_class` indices of every class, grouped by class."""
    found = {c: [] for c in range(len(dataset.class_names))}
    start = 0
    while any(len(v) < per_class for v in found.values()):
        labels = dataset.sample_params(range(start, start + 256))["label"].tolist()
        for offset, label in enumerate(labels):
            if len(found[label]) < per_class:
                found[label].append(start + offset)
        start += 256
    return [i for c in sorted(found) for i in found[c]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent))
    parser.add_argument("--per-class", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for classes, name in (("hagrid", "procedural_hands.png"), ("fingerspelling", "procedural_hands_fingerspelling.png")):
        dataset = ProceduralHands(ProceduralHandsConfig(size=96, classes=classes, length=100_000))
        indices = first_per_class(dataset, args.per_class)
        batch = dataset.__getitems__(indices)
        captions = [dataset.class_names[int(label)] for label in batch["label"]]
        path = save_grid(pathlib.Path(args.out) / name, batch["image"], captions=captions, nrow=args.per_class * 2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
