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

from resunit.outputs import atomic_output


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically, and close it whatever happens.

    Raises :class:`~resunit.errors.ConfigError` when ``path`` cannot be written (a missing
    permission, a file where a folder should be): the commands that draw plots report it
    as one line.
    """
    path = Path(path)
    try:
        # A reader never sees half a PNG, and a failed save leaves no temporary file behind.
        with atomic_output(path, "the plot") as tmp:
            # The temporary name does not end in .png: say which format matplotlib writes.
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        # pyplot keeps every open figure alive; a long run that draws often would leak them.
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


# --- analysis and experiments (analysis.py, experiments.py) -----------------------------------


def plot_residual_ratios(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """‖F(x)‖/‖x‖ and the std of F(x) per unit, stages shaded (He et al. 2015, Fig. 7)."""
    plt = _pyplot()
    fig, (ax_ratio, ax_std) = plt.subplots(1, 2, figsize=(11, 4))
    index = [r["index"] for r in rows]
    ax_ratio.plot(index, [r["residual_ratio"] for r in rows], marker="o", ms=3)
    ax_std.plot(index, [r["residual_std"] for r in rows], marker="o", ms=3, color="C1")
    ax_ratio.set(
        xlabel="unit (forward order)",
        ylabel="‖F(x)‖ / ‖x‖",
        title="Residual ratio: distance from the identity",
    )
    ax_std.set(
        xlabel="unit (forward order)", ylabel="std of F(x)", title="Residual response spread"
    )
    for ax in (ax_ratio, ax_std):
        _shade_stages(ax, rows)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    return _save(fig, path)


def _shade_stages(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    # Alternate background bands mark the stages, so depth trends within a stage stand out.
    stages: dict[str, list[int]] = {}
    for r in rows:
        stages.setdefault(r["stage"], []).append(r["index"])
    for k, (stage, idx) in enumerate(stages.items()):
        if k % 2:
            ax.axvspan(min(idx) - 0.5, max(idx) + 0.5, color="0.92", zorder=0)
        ax.text(
            (min(idx) + max(idx)) / 2,
            0.98,
            stage,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
            color="0.4",
        )


def plot_lesion(result: dict[str, Any], path: str | os.PathLike[str], title: str = "") -> Path:
    """Test accuracy with each unit removed (bars) beside the intact accuracy (line)."""
    plt = _pyplot()
    rows = result["units"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 4))
    index = [r["index"] for r in rows]
    heights = [100 * r["accuracy"] if r["accuracy"] is not None else 0.0 for r in rows]
    colors = ["C0" if r["accuracy"] is not None else "0.8" for r in rows]
    ax.bar(index, heights, color=colors, width=0.8)
    for r in rows:
        if r["accuracy"] is None:  # a plain unit that changes shape cannot be removed
            ax.text(r["index"], 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.axhline(
        100 * result["intact_accuracy"],
        color="C3",
        ls="--",
        label=f"intact {100 * result['intact_accuracy']:.1f}%",
    )
    _shade_stages(ax, rows)
    ax.set(
        xlabel="unit removed (forward order)",
        ylabel="test accuracy (%)",
        ylim=(0, 100),
        title=title or "Lesion study: one unit removed at a time",
    )
    ax.legend(loc="best", framealpha=0.9)
    return _save(fig, path)


def plot_gradient_flow(
    flows: dict[str, Sequence[dict[str, Any]]], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Gradient norm per weight layer at initialisation, one line per network (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, (label, rows) in enumerate(flows.items()):
        ax.plot(
            [r["index"] for r in rows],
            [r["grad_norm"] for r in rows],
            marker=".",
            label=label,
            color=f"C{k}",
        )
    ax.set_yscale("log")
    ax.set(
        xlabel="weight layer (input → output)",
        ylabel="‖∂loss/∂W‖",
        title=title or "Gradient flow at initialisation",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def plot_degradation(
    histories: dict[str, Sequence[dict[str, Any]]], path: str | os.PathLike[str]
) -> Path:
    """Training (thin, dashed) and test (bold) error per epoch: plain nets left, residual
    right, one colour per depth (He et al. 2015, Fig. 6). Keys are model names."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    depths = sorted({int("".join(ch for ch in name if ch.isdigit())) for name in histories})
    for ax, family, title in (
        (axes[0], "plain", "Plain networks"),
        (axes[1], "resnet", "Residual networks"),
    ):
        for name, history in histories.items():
            if not name.startswith(family) or not history:
                continue
            depth = int("".join(ch for ch in name if ch.isdigit()))
            color = f"C{depths.index(depth)}"
            epochs = [h["epoch"] for h in history]
            ax.plot(
                epochs,
                [100 * h["train_error"] for h in history],
                color=color,
                ls="--",
                lw=1,
                label=f"{name} train",
            )
            ax.plot(
                epochs,
                [100 * h["test_error"] for h in history],
                color=color,
                lw=2.2,
                label=f"{name} test",
            )
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("error (%)")
    return _save(fig, path)


__all__ = [
    "plot_confusion_matrix",
    "plot_degradation",
    "plot_gradient_flow",
    "plot_lesion",
    "plot_residual_ratios",
    "plot_training_curves",
]
