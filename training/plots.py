"""PNG figures: training curves and confusion matrix (matplotlib, headless Agg backend).

matplotlib is imported inside the functions: it is only needed when a figure is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Loss and accuracy per epoch (train and validation) from the metrics log records."""
    plt = _pyplot()
    path = Path(path)
    epochs = [int(r["epoch"]) for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    # Fixed margins: constrained layout would double the time of every run's last step.
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.92, wspace=0.22)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss", yscale="log")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in history], label="train")
    ax_acc.plot(epochs, [100 * r["val_acc"] for r in history], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    best = max(history, key=lambda r: r["val_acc"])
    ax_acc.axvline(best["epoch"], color="grey", linestyle=":", label=f"best epoch {int(best['epoch'])}")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion_matrix(
    matrix: np.ndarray, labels: Sequence[str], path: str | Path, title: str = "Confusion matrix"
) -> Path:
    """Counts with true class on rows and predicted class on columns; the diagonal is correct."""
    plt = _pyplot()
    path = Path(path)
    size = len(labels)
    fig, ax = plt.subplots(figsize=(7, 6), constrained_layout=True)
    # Log colour scale: otherwise the diagonal swamps the few errors that matter.
    shown = ax.imshow(np.log1p(matrix), cmap="Blues")
    fig.colorbar(shown, ax=ax, label="log(1 + count)")
    ax.set(
        xticks=range(size),
        yticks=range(size),
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    threshold = np.log1p(matrix.max()) / 2
    for i in range(size):
        for j in range(size):
            if matrix[i, j]:
                colour = "white" if np.log1p(matrix[i, j]) > threshold else "black"
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=colour, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
