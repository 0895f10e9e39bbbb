"""Small statistics: Wilson score intervals, AUROC, coverage-vs-accuracy curves, mean and sd."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: int, count: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % by default); (0, 1) when `count` is 0."""
    if count <= 0:
        return 0.0, 1.0
    p = successes / count
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, count: int) -> dict[str, Any]:
    """A proportion with its Wilson 95 % interval, JSON-ready."""
    low, high = wilson(successes, count)
    return {"value": successes / count if count else float("nan"), "successes": int(successes), "count": int(count),
            "wilson95": [low, high]}


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half).

    Computed from ranks (the Mann-Whitney U statistic), so it needs no threshold sweep.
    """
    positives, negatives = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    if not positives.size or not negatives.size:
        return float("nan")
    values = np.concatenate([positives, negatives])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based, ties get their average rank
    u = ranks[: positives.size].sum() - positives.size * (positives.size + 1) / 2.0
    return float(u / (positives.size * negatives.size))


def coverage_curve(scores: np.ndarray, correct: np.ndarray, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of the most confident share of inputs, for shares (coverage) from 1/N to 1.

    Inputs are ordered by `scores`, highest first; `correct` is True where the prediction is right
    (a non-digit is never right). Returns `points` (coverage, accuracy) pairs.
    """
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = np.cumsum(np.asarray(correct, np.float64)[order])
    n = hits.size
    if not n:
        return np.zeros(0), np.zeros(0)
    taken = np.unique(np.clip(np.round(np.linspace(1, n, points)).astype(np.int64), 1, n))
    return taken / n, hits[taken - 1] / taken


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0
