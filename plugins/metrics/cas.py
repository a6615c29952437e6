"""Classification Accuracy Score (Ravuri & Vinyals 2019): train a classifier on generated images
only, test it on real ones. A generator whose images carry the features that tell its classes
apart scores near a classifier trained on real data; one that ignores its labels scores near
chance (1 / number of classes).

The classifier is the judge (:mod:`.judge_classifier`), trained from scratch for each score with
a fixed seed. Reported: ``cas_top1`` (accuracy over the real test images) and ``cas_class_mean``
(the mean of per-class accuracies, which a skewed test set cannot inflate).
"""
from __future__ import annotations

import torch

from handforge.errors import HandforgeError

from .judge_classifier import JudgeClassifier, accuracy
from .sources import Batch


def align_labels(test: Batch, test_names: list[str], train_names: list[str], where: str = "real") -> torch.Tensor:
    """The test labels as indices into ``train_names``, matched by class name."""
    if list(test_names) == list(train_names):
        return test.labels
    index = {name: i for i, name in enumerate(train_names)}
    missing = sorted({test_names[i] for i in test.labels.unique().tolist()} - set(index))
    if missing:
        raise HandforgeError(f"CAS: the {where} images have classes the generated ones lack: "
                             f"{', '.join(missing)} (generated classes: {', '.join(train_names)})")
    mapping = torch.tensor([index.get(name, -1) for name in test_names], dtype=torch.int64)
    return mapping[test.labels]


def classification_accuracy_score(train: Batch, test: Batch, class_names, *, size: int = 32, epochs: int = 10,
                                  width: int = 32, seed: int = 0, device="cpu") -> dict[str, float]:
    """Train a judge on ``train`` (generated images, labels into ``class_names``), score it on
    ``test`` (real images, labels into the same ``class_names``)."""
    judge = JudgeClassifier.fit(train.images, train.labels, class_names=class_names, size=size, epochs=epochs,
                                width=width, seed=seed, device=device)
    scores = accuracy(judge, test.images, test.labels)
    return {"cas_top1": scores["top1"], "cas_class_mean": scores["class_mean"]}
