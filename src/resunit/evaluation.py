"""Evaluating a classifier on a dataset: accuracy, loss, per-class accuracy, confusion matrix.

Used by training (validation and test), the CLI's ``eval`` and ``export --int8``, the lesion
study and the degradation experiment; also for models that are not PyTorch networks, such as
an ONNX Runtime session wrapped as a module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resunit.data import ImageDataset, normalize
from resunit.errors import ConfigError
from resunit.models import dtype_and_device
from resunit.validation import require_int


def prepare_batch(
    images: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    input_size: int | None = None,
    channels_last: bool = False,
) -> Tensor:
    """uint8 batch → normalised float model input, resized to ``input_size`` if given."""
    x = normalize(images, mean, std)
    if input_size and tuple(x.shape[-2:]) != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    batch_size: int = 500,
    *,
    input_size: int | None = None,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    bf16: bool = False,
    predictions: bool = False,
) -> dict[str, Any]:
    """Accuracy, mean loss, per-class accuracy and confusion matrix (rows: true class), and
    with ``predictions=True`` the class picked for each image, in ``dataset``'s order.

    A class with no images in ``dataset`` has per-class accuracy None (unknown, not 0%).

    ``model`` is any module mapping a batch to one logit per class of ``dataset``, including
    parameter-free ones such as :class:`resunit.deploy.OnnxRuntimeModel`. Batches go to
    ``device``, by default the model's (CPU when it has no parameters or buffers). Its
    train/eval mode is restored afterwards, even when evaluation fails.
    """
    batch_size = require_int("batch size", batch_size, 1)
    device = torch.device(device) if device else dtype_and_device(model)[1]
    was_training = model.training
    model.eval()
    try:
        confusion, loss_sum, picks = _confusion_and_loss(
            model, dataset, batch_size, input_size, device, channels_last, bf16
        )
    finally:
        model.train(was_training)
    total = int(confusion.sum())
    per_class_total = confusion.sum(1)
    # None for a class with no images here: its accuracy is unknown, not 0%.
    per_class = [
        int(right) / int(count) if count else None
        for right, count in zip(confusion.diag(), per_class_total, strict=True)
    ]
    result = {
        "accuracy": float(confusion.diag().sum()) / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "count": total,
        "classes": list(dataset.classes),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
    }
    if predictions:
        result["predictions"] = torch.cat(picks).tolist() if picks else []
    return result


def _confusion_and_loss(
    model: nn.Module,
    dataset: ImageDataset,
    batch_size: int,
    input_size: int | None,
    device: torch.device,
    channels_last: bool,
    bf16: bool,
) -> tuple[Tensor, float, list[Tensor]]:
    k = dataset.num_classes
    confusion = torch.zeros(k, k, dtype=torch.int64)
    loss_sum = 0.0
    picks = []
    for x, labels in _batches(dataset, batch_size, input_size, device, channels_last):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = _checked_logits(model(x), dataset)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        predicted = logits.argmax(1).cpu()
        picks.append(predicted)
        confusion += torch.bincount(labels.cpu() * k + predicted, minlength=k * k).view(k, k)
    return confusion, loss_sum, picks


def _batches(
    dataset: ImageDataset,
    batch_size: int,
    input_size: int | None,
    device: torch.device,
    channels_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(normalised images, labels) of ``dataset`` in order, ``batch_size`` at a time."""
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start : start + batch_size].to(device)
        labels = dataset.labels[start : start + batch_size].to(device)
        yield prepare_batch(images, dataset.mean, dataset.std, input_size, channels_last), labels


def top1_agreement(predictions: Sequence[int], reference: Sequence[int]) -> float:
    """The fraction of images on which two models predict the same class: how often a
    quantized or exported model decides as its original.

    ``predictions`` and ``reference`` are each model's :func:`evaluate` ``(...,
    predictions=True)["predictions"]`` on the same dataset. The agreement bounds the accuracy
    difference of the two (it can be no larger than ``1 − agreement``) and, unlike it, still
    says something when both are 100% right.
    """
    if len(predictions) != len(reference):
        raise ValueError(
            f"predictions for {len(predictions)} and {len(reference)} images: "
            "compare the two models on the same dataset"
        )
    same = sum(int(a) == int(b) for a, b in zip(predictions, reference, strict=True))
    return same / max(len(predictions), 1)


def _checked_logits(logits: Tensor, dataset: ImageDataset) -> Tensor:
    # Checked before the loss or argmax, whose own errors (or silent results) name neither
    # side's number of classes.
    k = dataset.num_classes
    if logits.ndim != 2 or logits.shape[1] != k:
        raise ConfigError(
            f"the model gives {_outputs_text(logits)} per image but {dataset.name} has {k} "
            "classes: evaluate a model built for this dataset's classes"
        )
    return logits


def _outputs_text(logits: Tensor) -> str:
    if logits.ndim == 2:
        return f"{logits.shape[1]} outputs"
    return f"an output of shape {tuple(logits.shape[1:])}"


__all__ = ["evaluate", "prepare_batch", "top1_agreement"]
