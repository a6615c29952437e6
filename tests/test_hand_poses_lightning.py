"""The Lightning datamodule over a prepared folder (runs where the `lightning` extra is installed)."""
import numpy as np
import pytest
import torch
from test_mocap_poses import SOURCES, load, write_labelled

from handforge.errors import DataError

lightning = pytest.importorskip("lightning")
from handforge.plugins.datasets.hand_poses_lightning import HandPosesDataModule  # noqa: E402


class Recorder(lightning.LightningModule):
    """A one-layer model that keeps every batch Lightning hands it."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(90, 1)
        self.train_batches, self.val_batches = [], []

    def training_step(self, batch, batch_idx):
        self.train_batches.append(batch.clone())
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch.clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def standardized(root, split):
    train = load(root, "train")
    raw = np.concatenate([train["left"], train["right"]], 1).astype(np.float64)
    mean, std = raw.mean(0).astype(np.float32), raw.std(0).astype(np.float32)
    a = load(root, split)
    return (np.concatenate([a["left"], a["right"]], 1) - mean) / std


def test_trainer_fit_sees_standardized_batches(tmp_path):
    write_labelled(tmp_path, {"train": 50, "val": 20, "test": 7})
    model = Recorder()
    trainer = lightning.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=HandPosesDataModule(tmp_path, batch_size=16, standardize=True))
    train = standardized(tmp_path, "train")
    assert [tuple(b.shape) for b in model.train_batches] == [(16, 90)] * 3
    rows = [int(np.flatnonzero((train == row).all(1))[0]) for row in torch.cat(model.train_batches).numpy()]
    assert len(set(rows)) == 48 and rows != sorted(rows)  # distinct train poses, shuffled
    # The sanity check's two val batches: the val split in order, standardized with train statistics.
    np.testing.assert_array_equal(torch.cat(model.val_batches).numpy(), standardized(tmp_path, "val"))


def test_test_split_as_the_seed_dict(tmp_path):
    write_labelled(tmp_path, {"train": 30, "val": 5, "test": 7})
    data = HandPosesDataModule(tmp_path, batch_size=4, standardize=True, return_dict=True)
    data.prepare_data()
    data.setup("test")
    batches = list(data.test_dataloader())
    assert [len(b["dataset_name"]) for b in batches] == [4, 3]
    a = load(tmp_path, "test")
    assert sum((b["dataset_name"] for b in batches), []) == [SOURCES[s] for s in a["source"]]
    np.testing.assert_array_equal(torch.cat([b["x90"] for b in batches]).numpy(), standardized(tmp_path, "test"))
    train = load(tmp_path, "train")
    mean = np.concatenate([train["left"], train["right"]], 1).astype(np.float64).mean(0).astype(np.float32)
    np.testing.assert_array_equal(batches[0]["mean"].numpy(), mean)


def test_prepare_data_names_a_folder_prepare_did_not_write(tmp_path):
    with pytest.raises(DataError, match="not a prepared mocap folder.*handforge prepare mocap"):
        HandPosesDataModule(tmp_path / "nowhere").prepare_data()
    write_labelled(tmp_path, {"train": 10, "val": 5, "test": 3}, standardized=False)
    with pytest.raises(DataError, match=r"standardization\.json: missing.*standardize = false"):
        HandPosesDataModule(tmp_path, standardize=True).prepare_data()
    HandPosesDataModule(tmp_path, standardize=False).prepare_data()
