"""Local plugin for bench/loop_overhead.py: a small supervised task, its datasets, a step clock.

Named in the benchmark's recipe as ``plugins = ["bench/_overhead_plugin.py"]``. It registers

- task ``bench_classifier``: a small CNN (``SmallCNN``) classifying ``label`` with Adam and
  cross-entropy; its ``train_step`` is the plain accelerate step;
- dataset ``bench_cached``: the ``image`` and ``label`` of the first ``length`` samples of
  another registered dataset (``procedural_hands``), rendered once per process and then served
  from memory, so that both loops time the training loop rather than the renderer;
- dataset ``bench_random_images``: random images + labels held in memory (used when the
  built-in ``procedural_hands`` is not available);
- an ``on_step_end`` hook that appends ``time.perf_counter()`` (and the loss tensor) to
  ``CLOCK`` once per step, so the benchmark times exactly the steps it wants from inside a run,
  and then calls ``PARTNER(step)`` when the benchmark has set one (its paired design runs the
  bare loop from there).

The benchmark's bare PyTorch loop uses the same ``SmallCNN`` and ``make_optimizer`` from here.
"""
import time

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from handforge import hookimpl
from handforge.task import Task


class StepClock:
    """Per-step timestamps: ``begin`` when a step starts (its batch in hand), ``tick`` when it
    has ended (with its loss). The task and ``on_step_end`` record them in a run; the bare loop
    records its own."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.starts, self.stamps, self.losses = [], [], []

    def begin(self):
        self.starts.append(time.perf_counter())

    def tick(self, loss):
        self.stamps.append(time.perf_counter())
        self.losses.append(loss)


CLOCK = StepClock()
PARTNER = None  # set by bench/loop_overhead.py for its paired design


class SmallCNN(nn.Module):
    """Four 3x3 stride-2 convs (w, 2w, 4w, 4w channels) with ReLU, global mean pool, linear head."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        chans = (3, width, 2 * width, 4 * width, 4 * width)
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def make_optimizer(net, lr: float):
    return torch.optim.Adam(net.parameters(), lr=lr)


@attrs.define
class ClassifierConfig:
    width: int = 32
    lr: float = 1e-3


class BenchClassifier(Task):
    """Small CNN classifying `label` (Adam, cross-entropy): the loop-overhead benchmark's task."""

    def __init__(self, config):
        self.config = config

    def setup(self, run):
        self.run = run
        self.net = SmallCNN(len(run.class_names), self.config.width)
        self.opt = make_optimizer(self.net, self.config.lr)
        self.net, self.opt = run.accelerator.prepare(self.net, self.opt)

    def train_step(self, batch, step):
        CLOCK.begin()
        accelerator = self.run.accelerator
        with accelerator.accumulate(self.net):
            logits = self.net(batch["image"])
            loss = F.cross_entropy(logits, batch["label"])
            accelerator.backward(loss)
            self.opt.step()
            self.opt.zero_grad()
        return {"loss": loss.detach()}

    def export_modules(self):
        return {"net": self.run.accelerator.unwrap_model(self.net)}


@attrs.define
class RandomImagesConfig:
    size: int = 32
    length: int = 4096
    classes: int = 10


class InMemory(torch.utils.data.Dataset):
    """Batches straight from in-memory ``image``/``label`` tensors."""

    def __init__(self, images, labels, class_names):
        self.images, self.labels, self.class_names = images, labels, list(class_names)
        self.image_size = images.shape[-1]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}

    def __getitems__(self, indices):  # a whole batch in one call (handforge.data contract)
        index = torch.as_tensor(indices)
        return {"image": self.images[index], "label": self.labels[index]}


@attrs.define
class CachedConfig:
    source: str = "procedural_hands"
    size: int = 32
    length: int = 2048


_CACHE = {}


def build_cached(config, split="train"):
    """The image and label of the first `length` samples of another dataset, rendered once, held in memory."""
    key = (config.source, config.size, config.length, split)
    if key not in _CACHE:
        from handforge.plugin_manager import get_host

        entry = get_host().registry("dataset").get(config.source)
        source = entry.factory(entry.config_cls(size=config.size), split=split)
        images, labels = [], []
        for start in range(0, config.length, 256):
            indices = list(range(start, min(start + 256, config.length)))
            if hasattr(source, "__getitems__"):
                batch = source.__getitems__(indices)
            else:
                batch = torch.utils.data.default_collate([source[i] for i in indices])
            images.append(batch["image"].contiguous())
            labels.append(batch["label"])
        _CACHE[key] = (torch.cat(images), torch.cat(labels), list(source.class_names))
    return InMemory(*_CACHE[key])


class RandomImages(InMemory):
    """Random images in [-1, 1] with random labels, generated once and held in memory."""

    def __init__(self, config, split="train"):
        g = torch.Generator().manual_seed(1234)
        images = torch.rand(config.length, 3, config.size, config.size, generator=g) * 2 - 1
        labels = torch.randint(0, config.classes, (config.length,), generator=g)
        super().__init__(images, labels, [f"class{i}" for i in range(config.classes)])


@hookimpl
def register_tasks(register):
    register("bench_classifier", BenchClassifier, config=ClassifierConfig, needs=("image", "label"))


@hookimpl
def register_datasets(register):
    register("bench_random_images", RandomImages, config=RandomImagesConfig, provides=("image", "label"))
    register("bench_cached", build_cached, config=CachedConfig, provides=("image", "label"))


@hookimpl
def on_step_end(run, step, logs):
    CLOCK.tick(logs["loss"])
    if PARTNER is not None:
        PARTNER(step)
