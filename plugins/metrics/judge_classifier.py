"""The judge: a compact CNN handshape classifier that metrics use as their eyes on hands.

ImageNet features (the FID Inception) know little about handshapes, and the FID TorchScript has
no classification layer at all. The judge is small enough to train on a CPU in minutes, and it
serves three metrics:

- ``is``: the Inception Score computed from the judge's logits;
- ``hand_features``: its penultimate features, whose Fréchet distance is the FHD;
- ``cas``: the Classification Accuracy Score (a judge trained on generated images, tested on real ones).

A checkpoint is one safetensors file: the weights plus metadata (``handforge_format``, class
names, input size, architecture options), so loading it never unpickles anything.
:func:`load_classifier` reads any registered checkpoint format: a later classifier task adds its
own with :func:`register_classifier_format`, and its checkpoints then serve the same metrics.
"""
from __future__ import annotations

import json
import pathlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from handforge.errors import HandforgeError
from handforge.fileio import file_hash

FORMAT_KEY = "handforge_format"
JUDGE_FORMAT = "judge_classifier/1"


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class JudgeNet(nn.Module):
    """A VGG-style CNN: a stem, then ``depth`` stages that halve the resolution and double the
    width, global average pooling (the features) and one linear layer (the logits)."""

    def __init__(self, n_classes: int, width: int = 32, depth: int = 3):
        super().__init__()
        layers, channels = [_block(3, width, 1)], width
        for _ in range(depth):
            layers += [_block(channels, channels * 2, 2), _block(channels * 2, channels * 2, 1)]
            channels *= 2
        self.body = nn.Sequential(*layers)
        self.feature_dim = channels
        self.head = nn.Linear(channels, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _as_uint8_batch(images, where: str = "images") -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise HandforgeError(f"{where}: expected uint8 images of shape (N, 3, H, W), "
                             f"got {images.dtype} {tuple(images.shape)}")
    return images


def _augment(x: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """Random translation (up to 1/8 of the side) and scale (0.9-1.1), and left-right flips: one
    batched ``grid_sample``. Flipping keeps a handshape's class (a left hand is a mirrored right
    hand), and the shifts keep the judge from keying on where the hand sits."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator)
    scale = 0.9 + 0.2 * u[:, 0]
    mirror = torch.where(u[:, 1] < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * mirror, scale
    theta[:, :, 2] = (u[:, 2:] - 0.5) * 0.5  # normalized coordinates: 0.25 = 1/8 of the side
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class JudgeClassifier:
    """A trained :class:`JudgeNet` with what it needs to read images: class names and input size.

    Images go in as uint8 (N, 3, H, W) of any size; they are resized (bilinear, antialiased) to
    ``image_size`` and mapped to [-1, 1] as the sample contract's images are.
    """

    def __init__(self, class_names, image_size: int, width: int = 32, depth: int = 3, device="cpu"):
        if len(class_names) < 2:
            raise HandforgeError(f"a judge classifier needs at least 2 classes, got {list(class_names)}")
        self.class_names = [str(c) for c in class_names]
        self.image_size, self.width, self.depth = int(image_size), int(width), int(depth)
        self.device = torch.device(device)
        self.net = JudgeNet(len(self.class_names), width, depth).to(self.device, memory_format=torch.channels_last)
        self.net.eval()

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    def to(self, device) -> "JudgeClassifier":
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    # -- input ---------------------------------------------------------------------------------

    def prepare(self, images) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float (N, 3, S, S) in [-1, 1] on the judge's device, channels_last."""
        x = _as_uint8_batch(images).to(self.device).float().div_(127.5).sub_(1.0)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return x.contiguous(memory_format=torch.channels_last)

    def _batched(self, fn: Callable, images, batch_size: int) -> torch.Tensor:
        images = _as_uint8_batch(images)
        self.net.eval()
        with torch.no_grad():
            outs = [fn(self.prepare(images[i:i + batch_size])).float().cpu()
                    for i in range(0, images.shape[0], batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0, self.feature_dim)

    def features(self, images, batch_size: int = 256) -> torch.Tensor:
        """Penultimate (pooled) features, (N, feature_dim) float32 on the CPU."""
        return self._batched(self.net.features, images, batch_size)

    def logits(self, images, batch_size: int = 256) -> torch.Tensor:
        """Class logits, (N, n_classes) float32 on the CPU."""
        return self._batched(self.net, images, batch_size)

    def predict(self, images, batch_size: int = 256) -> torch.Tensor:
        return self.logits(images, batch_size).argmax(1)

    # -- training ------------------------------------------------------------------------------

    @classmethod
    def fit(cls, images, labels, *, class_names, size: int = 32, epochs: int = 15, seed: int = 0,
            width: int = 32, depth: int = 3, batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 5e-4,
            flip: bool = True, device="cpu", progress: Callable[[int, float], None] | None = None
            ) -> "JudgeClassifier":
        """Train a judge from scratch on uint8 images and int labels (indices into ``class_names``).

        AdamW with a one-cycle schedule, label smoothing 0.1, augmentation (shift, scale, and
        left-right flips when ``flip``). Deterministic for a seed on the CPU. ``progress(epoch,
        mean_loss)`` is called after each epoch.
        """
        images = _as_uint8_batch(images)
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise HandforgeError(f"judge: {images.shape[0]} images but {labels.shape[0]} labels")
        if images.shape[0] < 2:
            raise HandforgeError(f"judge: training needs at least 2 images, got {images.shape[0]}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise HandforgeError(f"judge: labels must lie in [0, {len(class_names) - 1}] "
                                 f"({len(class_names)} classes), got {labels.min().item()}..{labels.max().item()}")
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial weights
            judge = cls(class_names, size, width, depth, device)
        net = judge.net
        batch_size = min(batch_size, images.shape[0])
        steps_per_epoch = images.shape[0] // batch_size  # whole batches: BatchNorm never sees a batch of 1
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                       pct_start=0.2)
        net.train()
        for epoch in range(epochs):
            order = torch.randperm(images.shape[0], generator=generator)
            total = 0.0
            for step in range(steps_per_epoch):
                idx = order[step * batch_size:(step + 1) * batch_size]
                x = _augment(judge.prepare(images[idx]), generator, flip)
                x = x.contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(net(x), labels[idx].to(judge.device), label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item()
            if progress is not None:
                progress(epoch + 1, total / max(1, steps_per_epoch))
        judge._recalibrate_batchnorm(images, batch_size)
        return judge

    @torch.no_grad()
    def _recalibrate_batchnorm(self, images: torch.Tensor, batch_size: int, limit: int = 4096) -> None:
        """Set BatchNorm's running statistics to the exact averages over (up to ``limit``) training
        images under the final weights. The running averages of a short training trail the
        weights, and a judge evaluated with them can score at chance on data it fits perfectly."""
        norms = [m for m in self.net.modules() if isinstance(m, nn.BatchNorm2d)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        self.net.train()
        for start in range(0, min(limit, images.shape[0]), batch_size):
            self.net(self.prepare(images[start:start + batch_size]))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        self.net.eval()

    # -- files ---------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {
            FORMAT_KEY: JUDGE_FORMAT,
            "class_names": json.dumps(self.class_names),
            "image_size": str(self.image_size),
            "architecture": json.dumps({"name": "judge_net", "width": self.width, "depth": self.depth}),
        }

    def save(self, path) -> pathlib.Path:
        """Write the weights and metadata to ``path`` (safetensors), atomically."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tmp = path.with_name(f".tmp-{path.name}")
        save_file(state, str(tmp), metadata=self.metadata())
        tmp.replace(path)
        return path

    @classmethod
    def from_file(cls, path, metadata: dict, device="cpu") -> "JudgeClassifier":
        try:
            names = json.loads(metadata["class_names"])
            size = int(metadata["image_size"])
            arch = json.loads(metadata["architecture"])
            judge = cls(names, size, arch["width"], arch["depth"], device)
            judge.net.load_state_dict(load_file(str(path)))
        except HandforgeError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise HandforgeError(f"{path}: not a valid judge classifier checkpoint: {type(exc).__name__}: {exc}")
        judge.net.to(judge.device, memory_format=torch.channels_last).eval()
        return judge

    @classmethod
    def load(cls, path, device="cpu") -> "JudgeClassifier":
        classifier = load_classifier(path, device)
        if not isinstance(classifier, cls):
            raise HandforgeError(f"{path}: holds a {type(classifier).__name__}, not a judge classifier")
        return classifier


def accuracy(judge, images, labels) -> dict[str, float]:
    """Top-1 accuracy and the mean of per-class accuracies (over the classes present in ``labels``)."""
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    predicted = judge.predict(images)
    correct = (predicted == labels).double()
    present = labels.unique()
    per_class = torch.stack([correct[labels == c].mean() for c in present])
    return {"top1": correct.mean().item(), "class_mean": per_class.mean().item()}


# -- checkpoint formats: the seam for other classifiers ----------------------------------------

# format name (the part of ``handforge_format`` before "/") -> loader(path, metadata, device).
# A loaded classifier offers ``class_names``, ``features(uint8 images)`` and ``logits(uint8 images)``.
CLASSIFIER_FORMATS: dict[str, Callable] = {"judge_classifier": JudgeClassifier.from_file}


def register_classifier_format(name: str, loader: Callable) -> None:
    """Let checkpoints whose metadata says ``handforge_format = "<name>/<version>"`` be loaded by
    ``loader(path, metadata, device)`` wherever a judge is accepted (``is``, ``hand_features``)."""
    previous = CLASSIFIER_FORMATS.get(name)
    if previous is not None and previous is not loader:
        raise HandforgeError(f"classifier format '{name}' is registered twice ({previous!r} and {loader!r})")
    CLASSIFIER_FORMATS[name] = loader


def read_metadata(path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise HandforgeError(f"classifier checkpoint {path} not found "
                             f"(train one with `handforge fit-judge SRC --out {path.name}`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise HandforgeError(f"{path}: not a safetensors file: {exc}")


_LOADED: dict = {}


def load_classifier(path, device="cpu"):
    """The classifier in checkpoint ``path``, by its ``handforge_format`` metadata. Loaded once per
    process for a given file state (path, size, mtime) and device."""
    path = pathlib.Path(path)
    metadata = read_metadata(path)
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(device))
    if memo_key in _LOADED:
        return _LOADED[memo_key]
    fmt = metadata.get(FORMAT_KEY, "")
    loader = CLASSIFIER_FORMATS.get(fmt.split("/")[0])
    if loader is None:
        known = ", ".join(sorted(CLASSIFIER_FORMATS))
        raise HandforgeError(f"{path}: not a classifier checkpoint handforge knows "
                             f"({FORMAT_KEY} = {fmt!r}; known formats: {known})")
    classifier = loader(path, metadata, device)
    _LOADED.clear()  # one classifier at a time is what metrics use; do not pile up models
    _LOADED[memo_key] = classifier
    return classifier


def file_digest(path) -> str:
    """A content hash of a checkpoint, for the cache keys of the features it makes."""
    return file_hash(path, "sha1")

