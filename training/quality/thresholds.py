"""Choosing the rejection rule on validation data, and measuring a rule with the server's own `decide`.

The rule has two thresholds (`service.recognition.model_metadata.Rejection`), checked in this order:
- `not_a_digit`: the score that best separates real digits from generated non-digits on validation
  (highest AUROC of the three REJECTION_SCORES), cut where it rejects `not_a_digit_budget` of the real
  validation digits;
- `uncertain`: the calibrated top probability, cut so that both reasons together reject at most
  `total_budget` of the real validation digits;
- the strokes test's thresholds (`service.recognition.strokes`), on the real digits' pixels alone,
  cut where it rejects STROKES_BUDGET of them (when the outputs carry their `shapes`).
With several groups of real digits (the originals, and the same digits as clients send them), every
budget holds in every group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.recognition import strokes
from service.recognition.model_metadata import REJECTION_SCORES, Rejection, Threshold
from service.recognition.rejection import NOT_A_DIGIT, UNCERTAIN, decide, scores
from training.quality.calibration import softmax
from training.quality.metrics import auroc, proportion

TOTAL_BUDGET = 0.007
"""Real validation digits the rule's scores may reject, both reasons together: 0.7 %, leaving headroom
under the 1 % goal for the strokes test and for client images that differ from the validation renders."""
STROKES_BUDGET = 0.002
"""Real validation digits the strokes test (`service.recognition.strokes`) may reject on top: 0.2 %,
so that the whole rule stays at 0.9 % of them at most."""
NOT_A_DIGIT_BUDGET = 0.004
UNCERTAIN_SCORE = "max_probability"


@dataclass(frozen=True)
class Outputs:
    """A model's raw logits on a set of images, the served (calibrated) probabilities, and what is known."""

    logits: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray | None = None
    """Digit labels (None for non-digits)."""
    kinds: np.ndarray | None = None
    """Per row, the kind of non-digit (for per-kind figures)."""
    shapes: np.ndarray | None = None
    """`service.recognition.strokes.features` of the rows' pixels, for the rule's strokes test."""

    @classmethod
    def of(cls, logits: np.ndarray, temperature: float, labels: np.ndarray | None = None,
           kinds: np.ndarray | None = None, shapes: np.ndarray | None = None) -> Outputs:
        """Outputs as the exported graph serves them: probabilities = softmax(logits / temperature)."""
        return cls(np.asarray(logits, np.float32), softmax(logits, temperature).astype(np.float32), labels, kinds,
                   shapes)

    def decide(self, rule: Rejection | None) -> np.ndarray:
        """The server's verdict (`service.recognition.rejection.decide`) on every row."""
        return decide(rule, self.logits, self.probabilities, shapes=self.shapes)

    def score(self, name: str) -> np.ndarray:
        """One of the rejection scores per row."""
        return scores(name, self.logits, self.probabilities)


def _rate(rule: Rejection, outputs: Outputs) -> float:
    return float(np.mean(outputs.decide(rule) != "")) if len(outputs.logits) else 0.0


def _largest_below(values: np.ndarray, budget: float) -> float:
    """The largest threshold t with mean(values < t) <= budget."""
    ordered = np.sort(values)
    allowed = int(np.floor(budget * ordered.size + 1e-9))
    return float(ordered[min(allowed, ordered.size - 1)])


def choose_rule(digits: Sequence[Outputs], negatives: Outputs, total_budget: float = TOTAL_BUDGET,
                not_a_digit_budget: float = NOT_A_DIGIT_BUDGET, describe: Mapping[str, Any] | None = None) -> Rejection:
    """The rejection rule for these validation outputs (see the module docstring); `describe` goes to `extra`."""
    separation = {name: auroc(np.concatenate([d.score(name) for d in digits]), negatives.score(name))
                  for name in REJECTION_SCORES}
    best = max(REJECTION_SCORES, key=lambda name: separation[name])
    below = min(_largest_below(d.score(best), not_a_digit_budget) for d in digits)
    not_a_digit = Threshold(best, below)
    # The largest uncertain threshold that keeps every group within the total budget (rates only grow with it).
    candidates = np.unique(np.concatenate([d.score(UNCERTAIN_SCORE) for d in digits]))
    low, high = 0, candidates.size - 1
    chosen = 0.0
    while low <= high:
        middle = (low + high) // 2
        rule = Rejection(not_a_digit, Threshold(UNCERTAIN_SCORE, float(candidates[middle])))
        if max(_rate(rule, d) for d in digits) <= total_budget:
            chosen, low = float(candidates[middle]), middle + 1
        else:
            high = middle - 1
    extra = {
        "chosen_on": dict(describe or {}),
        "budgets": {"total": total_budget, "not_a_digit": not_a_digit_budget},
        "validation_auroc": {name: round(value, 6) for name, value in separation.items()},
    }
    shapes = [d.shapes for d in digits if d.shapes is not None]
    limits = strokes.choose(np.concatenate(shapes), STROKES_BUDGET) if shapes else {}
    if limits:
        extra["budgets"]["strokes"] = STROKES_BUDGET
    return Rejection(not_a_digit=not_a_digit, uncertain=Threshold(UNCERTAIN_SCORE, chosen), strokes=limits,
                     extra=extra)


def measure_digits(rule: Rejection | None, outputs: Outputs) -> dict[str, Any]:
    """Accuracy, rejection by reason and accuracy on the accepted digits, with Wilson intervals."""
    assert outputs.labels is not None
    labels = np.asarray(outputs.labels)
    predicted = outputs.probabilities.argmax(axis=1)
    correct = predicted == labels
    reasons = outputs.decide(rule)
    accepted = reasons == ""
    return {
        "count": int(labels.size),
        "accuracy": proportion(int(correct.sum()), int(labels.size)),
        "rejected": proportion(int((~accepted).sum()), int(labels.size)),
        "rejected_by_reason": {reason: proportion(int((reasons == reason).sum()), int(labels.size))
                               for reason in (NOT_A_DIGIT, UNCERTAIN)},
        "accuracy_on_accepted": proportion(int((correct & accepted).sum()), int(accepted.sum())),
        "errors_rejected": proportion(int((~correct & ~accepted).sum()), int((~correct).sum())),
    }


def measure_negatives(rule: Rejection | None, outputs: Outputs, digits: Outputs | None = None) -> dict[str, Any]:
    """Share of non-digits rejected (any reason, and as not_a_digit), per kind; AUROC against `digits`."""
    reasons = outputs.decide(rule)
    kinds = outputs.kinds if outputs.kinds is not None else np.full(len(reasons), "all", dtype=object)
    figures: dict[str, Any] = {
        "count": len(reasons),
        "rejected": proportion(int((reasons != "").sum()), len(reasons)),
        "rejected_as_not_a_digit": proportion(int((reasons == NOT_A_DIGIT).sum()), len(reasons)),
        "by_kind": {str(kind): proportion(int((reasons[kinds == kind] != "").sum()), int((kinds == kind).sum()))
                    for kind in sorted(set(kinds.tolist()))},
    }
    if digits is not None:
        figures["auroc"] = {name: auroc(digits.score(name), outputs.score(name)) for name in REJECTION_SCORES}
    return figures
