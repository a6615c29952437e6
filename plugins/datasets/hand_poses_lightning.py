"""A Lightning ``LightningDataModule`` over a prepared mocap folder, for users who train with
Lightning rather than ``handforge run`` (the optional extra: ``pip install 'handforge[lightning]'``).
handforge never imports this module; importing it without Lightning says what to install.

    from handforge.plugins.datasets.hand_poses_lightning import HandPosesDataModule
    data = HandPosesDataModule("prepared", batch_size=8192, standardize=True, return_dict=True)
    lightning.Trainer(max_epochs=10).fit(model, datamodule=data)

Batches are what ``HandPoses.batch`` returns (the (B, 90) tensor, or the seed's dict with
``return_dict``): one gather from the memory maps per batch, the train split shuffled anew each
epoch (Lightning sets the sampler's epoch), val and test in file order.
"""
from __future__ import annotations

import pathlib

from handforge.errors import DataError
from handforge.pose_standardization import read_statistics

from .hand_poses import HandPoses, HandPosesConfig, READABLE_SPLITS, batch_loader, read_sources, read_split

try:
    import lightning
except ImportError as exc:  # the extra is optional: say which one
    raise ImportError("handforge.plugins.datasets.hand_poses_lightning needs Lightning: "
                      "pip install 'handforge[lightning]'") from exc

SPLITS_OF_STAGE = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), None: READABLE_SPLITS}


class HandPosesDataModule(lightning.LightningDataModule):
    """``prepare_data`` checks the folder, ``setup(stage)`` opens the stage's splits (standardized
    with the train statistics ``prepare mocap`` wrote), ``*_dataloader`` give batches of ``batch_size``."""

    def __init__(self, root, batch_size: int = 8192, standardize: bool = True, return_dict: bool = False,
                 seed: int = 0, drop_last: bool = False, num_workers: int = 0, eval_batch_size: int | None = None):
        super().__init__()
        self.config = HandPosesConfig(root=str(root), standardize=standardize, return_dict=return_dict)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.seed, self.drop_last, self.num_workers = seed, drop_last, num_workers
        self.splits: dict[str, HandPoses] = {}

    def prepare_data(self) -> None:
        # Lightning calls this once (rank 0). Nothing to download: check that prepare wrote the folder.
        root = pathlib.Path(self.config.root)
        if not (root / "dataset_metadata.json").is_file():
            raise DataError(f"{root}: not a prepared mocap folder (no dataset_metadata.json); write it with "
                            f"`handforge prepare mocap MOCAP_ROOT --out {root}`")
        read_sources(root)
        for split in READABLE_SPLITS:
            read_split(root, split)
        if self.config.standardize:
            read_statistics(root)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS_OF_STAGE.get(stage, READABLE_SPLITS):
            if split not in self.splits:
                self.splits[split] = HandPoses(self.config, split)

    def _loader(self, split: str, batch_size: int, train: bool):
        if split not in self.splits:
            raise DataError(f"HandPosesDataModule: the {split} split is not open; call setup() first")
        return batch_loader(self.splits[split], batch_size, shuffle=train, seed=self.seed,
                            drop_last=self.drop_last and train, num_workers=self.num_workers,
                            persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader("train", self.batch_size, train=True)

    def val_dataloader(self):
        return self._loader("val", self.eval_batch_size, train=False)

    def test_dataloader(self):
        return self._loader("test", self.eval_batch_size, train=False)
