"""PNG figures: training curves, confusion matrix with reliability diagram, coverage-vs-accuracy curves
(matplotlib, headless Agg backend).

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


def plot_run_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """Training loss and accuracy per epoch of several models (a cross-validated run: folds and final;
    there is no validation curve: no model is selected by epoch)."""
    plt = _pyplot()
    path = Path(path)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.92, wspace=0.22)
    for name, history in histories.items():
        epochs = [int(r["epoch"]) for r in history]
        width = 2.0 if name == "final" else 0.8
        ax_loss.plot(epochs, [r["train_loss"] for r in history], label=name, linewidth=width)
        ax_acc.plot(epochs, [100 * r["train_acc"] for r in history], label=name, linewidth=width)
    ax_loss.set(xlabel="epoch", ylabel="training loss (augmented batches)", title="Loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="training accuracy (%, augmented batches)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
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
    fig, ax = plt.subplots(figsize=(7, 6), constrained_layout=True)
    _confusion_panel(ax, fig, matrix, labels, title, shrink=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _confusion_panel(ax: Any, fig: Any, matrix: np.ndarray, labels: Sequence[str], title: str,
                     shrink: float = 0.8) -> None:
    size = len(labels)
    # Log colour scale: otherwise the diagonal swamps the few errors that matter.
    shown = ax.imshow(np.log1p(matrix), cmap="Blues")
    fig.colorbar(shown, ax=ax, label="log(1 + count)", shrink=shrink)
    ax.set(xticks=range(size), yticks=range(size), xticklabels=labels, yticklabels=labels, xlabel="predicted",
           ylabel="true", title=title)
    threshold = np.log1p(matrix.max()) / 2
    for i in range(size):
        for j in range(size):
            if matrix[i, j]:
                colour = "white" if np.log1p(matrix[i, j]) > threshold else "black"
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=colour, fontsize=8)


def plot_evaluation(matrix: np.ndarray, labels: Sequence[str], bins: Any, path: str | Path,
                    title: str = "Confusion matrix") -> Path:
    """The confusion matrix and, next to it, the reliability diagram of the served probabilities.

    `bins` is a `training.quality.calibration.Reliability` (None: the confusion matrix alone).
    """
    if bins is None:
        return plot_confusion_matrix(matrix, labels, path, title)
    plt = _pyplot()
    path = Path(path)
    fig, (ax_cm, ax_rel) = plt.subplots(1, 2, figsize=(13, 5.6), constrained_layout=True)
    _confusion_panel(ax_cm, fig, matrix, labels, title)
    centres = (bins.edges[:-1] + bins.edges[1:]) / 2
    width = bins.edges[1] - bins.edges[0]
    filled = bins.counts > 0
    ax_rel.bar(centres[filled], bins.accuracy[filled], width=width * 0.9, color="tab:blue", alpha=0.75,
               label="accuracy in bin")
    ax_rel.plot(centres[filled], bins.confidence[filled], "_", color="tab:red", markersize=14, markeredgewidth=2.5,
                label="mean confidence in bin")
    ax_rel.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for x, count in zip(centres[filled], bins.counts[filled], strict=True):
        ax_rel.text(x, 0.02, str(int(count)), ha="center", fontsize=7, rotation=90)
    ax_rel.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence (top served probability)", ylabel="accuracy",
               title=f"Reliability ({len(centres)} bins; digits per bin at the bottom): ECE {bins.ece:.4f}")
    ax_rel.legend(loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_coverage(curves: Mapping[str, tuple[np.ndarray, np.ndarray, tuple[float, float] | None]],
                  path: str | Path, title: str) -> Path:
    """Coverage-vs-accuracy curves: per set, (coverage, accuracy, the rule's operating point or None).

    The first set (the real digits alone) gets the left panel, on its own scale; the others (digits
    mixed with non-digits, which are never right) the right one.
    """
    plt = _pyplot()
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    items = list(curves.items())
    for ax, group in ((axes[0], items[:1]), (axes[1], items[1:])):
        for name, (coverage, accuracy, point) in group:
            (line,) = ax.plot(coverage, accuracy, label=name)
            if point is not None:
                ax.plot(*point, "o", color=line.get_color())
        low = min((float(np.min(a)) for _, (_, a, _) in group), default=0.0)
        ax.set(xlabel="coverage (share of inputs accepted, most confident first)", xlim=(0, 1.01),
               ylim=(max(0.0, low - (1 - low) * 0.1), 1 + (1 - low) * 0.02))
        ax.grid(True, alpha=0.3)
        if group:
            ax.legend(loc="lower left", fontsize=8)
    axes[0].set(ylabel="accuracy of the accepted digits", title="real digits")
    axes[1].set(ylabel="accuracy of the accepted (a non-digit is never right)", title="digits mixed with non-digits")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
