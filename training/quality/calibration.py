"""Temperature scaling (Guo et al. 2017) and the expected calibration error.

The served probabilities are ``softmax(logits / T)``; T is fitted on held-out logits by minimising the
negative log-likelihood, which is convex in 1/T, so a bracketing search finds the optimum exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
BETA_RANGE = (0.02, 50.0)  # 1/T searched in here: T from 0.02 to 50


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, float64."""
    scaled = np.asarray(logits, np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    scaled = np.asarray(logits, np.float64) / temperature
    top = scaled.max(axis=1)
    log_norm = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
    return float((log_norm - scaled[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iterations: int = 200) -> float:
    """The temperature minimising the NLL of `labels` (golden-section search on 1/T)."""
    labels = np.asarray(labels, np.int64)
    low, high = BETA_RANGE
    ratio = (np.sqrt(5) - 1) / 2
    a, b = low + (1 - ratio) * (high - low), low + ratio * (high - low)
    fa, fb = nll(logits, labels, 1 / a), nll(logits, labels, 1 / b)
    for _ in range(iterations):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = low + (1 - ratio) * (high - low)
            fa = nll(logits, labels, 1 / a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(logits, labels, 1 / b)
    return float(1 / ((low + high) / 2))


@dataclass(frozen=True)
class Reliability:
    """Equal-width confidence bins: edges, and per bin the count, accuracy and mean confidence."""

    edges: np.ndarray
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of |accuracy - confidence| weighted by count."""
        total = self.counts.sum()
        if not total:
            return float("nan")
        return float(np.nansum(self.counts * np.abs(self.accuracy - self.confidence)) / total)


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Bin the top probability of every row (bins (lo, hi], the first also takes 0) against correctness."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(which, weights=correct, minlength=bins) / counts
        mean_conf = np.bincount(which, weights=confidence, minlength=bins) / counts
    return Reliability(edges=edges, counts=counts, accuracy=accuracy, confidence=mean_conf)


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over `bins` equal-width bins of the top probability."""
    return reliability(probabilities, labels, bins).ece
