"""Draw the sample grids the README shows: python docs/make_grids.py [--out docs]

One row per class of each procedural_hands class set, default options otherwise, at 96 px; and
one row per individual of the palm view (procedural_palms.png), at 128 px as recipes/palm_wgangp.toml
draws them (at 256 px there).
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


def first_per_identity(dataset, identities: int, per_identity: int) -> list:
    """The first `per_identity` indices of individuals 0 .. identities - 1, grouped by individual."""
    found = {i: [] for i in range(identities)}
    start = 0
    while any(len(v) < per_identity for v in found.values()):
        for offset, identity in enumerate(dataset.sample_params(range(start, start + 256))["identity"].tolist()):
            if identity in found and len(found[identity]) < per_identity:
                found[identity].append(start + offset)
        start += 256
    return [i for k in sorted(found) for i in found[k]]


def palm_grid(out: pathlib.Path, rows: int = 6, per_identity: int = 8) -> pathlib.Path:
    config = ProceduralHandsConfig(size=128, view="palm", hand_size=[0.7, 0.8], view_jitter=10.0, roll_jitter=10.0,
                                   length=100_000)
    dataset = ProceduralHands(config)
    batch = dataset.__getitems__(first_per_identity(dataset, rows, per_identity))
    captions = [f"identity {int(i)}" for i in batch["identity"]]
    return save_grid(out / "procedural_palms.png", batch["image"], captions=captions, nrow=per_identity)


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
    print(f"wrote {palm_grid(pathlib.Path(args.out))}")


if __name__ == "__main__":
    main()
