"""A small local plugin for core tests: components with options, slots and field needs."""
import attrs
import torch

from handforge import hookimpl
from handforge.task import Slot, Task


@attrs.define
class ToyDataConfig:
    size: int = 8
    length: int = 64
    labels: bool = False


class ToyImages(torch.utils.data.Dataset):
    """Random images, optionally labelled."""

    def __init__(self, config, split="train"):
        self.config, self.split = config, split
        self.class_names = ["a", "b"] if config.labels else []
        self.image_size = config.size

    def __len__(self):
        return self.config.length

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        out = {"image": torch.rand(3, self.config.size, self.config.size, generator=g) * 2 - 1}
        if self.config.labels:
            out["label"] = torch.tensor(i % 2)
        return out


@attrs.define
class NetConfig:
    ch: int = 4
    betas: tuple[float, float] = (0.0, 0.9)


@attrs.define
class ToyTaskConfig:
    lr: float = 1e-2
    noise: float = 0.1  # drawn from the global RNG, so a resume must restore it exactly
    nan_at_step: int = 0


class ToyTask(Task):
    """Fits a linear map of the images to zero (enough to exercise the loop)."""

    def __init__(self, config):
        self.config = config

    def setup(self, run):
        self.run = run
        size = run.dataset.image_size
        self.net = run.components["generator"].build(in_features=3 * size * size)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=self.config.lr)
        self.net, self.opt = run.accelerator.prepare(self.net, self.opt)

    def train_step(self, batch, step):
        with self.run.accelerator.accumulate(self.net):
            x = batch["image"].flatten(1)
            loss = self.net(x + self.config.noise * torch.randn_like(x)).pow(2).mean()
            if step == self.config.nan_at_step:
                loss = loss * float("nan")
            self.run.accelerator.backward(loss)
            self.opt.step()
            self.opt.zero_grad()
        return {"loss": loss.detach()}

    def sample(self, batch):
        return {"image": batch["image"][:4]}

    def state_dict(self):
        return {"counter": torch.tensor([self.run.step])}

    def export_modules(self):
        return {"net": self.run.accelerator.unwrap_model(self.net)}


@hookimpl
def register_datasets(register):
    register("toy_images", ToyImages, config=ToyDataConfig,
             provides=lambda c: ("image", "label") if c.labels else ("image",))
    register("toy_keypoints", ToyImages, config=ToyDataConfig, provides=("image", "keypoints"))


@hookimpl
def register_backbones(register):
    register("toy_linear", lambda config, in_features: torch.nn.Linear(in_features, config.ch), config=NetConfig)


@hookimpl
def register_losses(register):
    register("toy_l1", lambda config, **_: torch.nn.L1Loss())
    register("toy_l2", lambda config, **_: torch.nn.MSELoss())


@hookimpl
def register_conditioners(register):
    register("toy_label", lambda config, **_: None, needs=("label",))


@hookimpl
def register_tasks(register):
    register("toy_task", ToyTask, config=ToyTaskConfig, needs=("image",),
             slots=(Slot("generator", "backbone"), Slot("loss", "loss", default="toy_l1"),
                    Slot("conditioner", "conditioner", optional=True)))
