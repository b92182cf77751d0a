"""Every matplotlib figure in one place (needs the ``[plot]`` extra: matplotlib).

Each function takes plain data (lists, dicts), writes one PNG and returns its path; matplotlib
is imported inside the functions, with the non-interactive Agg backend, so importing this
module costs nothing and works on machines without a display.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)  # a reader never sees half a PNG
    _pyplot().close(fig)
    return path


# --- training (train.py) --------------------------------------------------------------------


def plot_training_curves(metrics: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Loss and accuracy per epoch (train, and validation when the run has it)."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [m["epoch"] for m in metrics]
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], label="train", marker=".")
    ax_acc.plot(epochs, [100 * m["train_accuracy"] for m in metrics], label="train", marker=".")
    if any("val_loss" in m for m in metrics):
        val = [m for m in metrics if "val_loss" in m]
        ax_loss.plot(
            [m["epoch"] for m in val], [m["val_loss"] for m in val], label="validation", marker="."
        )
        ax_acc.plot(
            [m["epoch"] for m in val],
            [100 * m["val_accuracy"] for m in val],
            label="validation",
            marker=".",
        )
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]],
    classes: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "Confusion matrix",
) -> Path:
    """Counts of (true class, predicted class), with the counts written in the cells."""
    plt = _pyplot()
    k = len(classes)
    size = max(4.0, min(0.45 * k + 2, 24.0))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = range(k)
    ax.set_xticks(ticks, labels=classes, rotation=90 if k > 10 else 0)
    ax.set_yticks(ticks, labels=classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if k <= 20:
        peak = max((max(row) for row in matrix), default=0)
        for i in range(k):
            for j in range(k):
                value = matrix[i][j]
                if value:
                    color = "white" if value > peak / 2 else "black"
                    ax.text(j, i, str(value), ha="center", va="center", color=color, fontsize=8)
    return _save(fig, path)
