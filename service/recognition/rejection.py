"""Whether a prediction is accepted, and if not, why: the model's own rejection rule, applied to a batch.

Three reasons, in the order they are checked:
- ``no_ink``: the image holds no ink (blank, grey or black paper, faint noise, a speck). Decided on the
  pixels before the model runs (`service.recognition.ink`); such an image is never run as a digit.
- ``not_a_digit``: ink unlike any digit (letters, symbols, drawings, photos): the rule's `not_a_digit`
  score is below its threshold, or the pixels are a filled shape or a grey picture rather than strokes
  (`service.recognition.strokes`, for models whose rule carries its thresholds).
- ``uncertain``: a digit, but not clearly which one: the `uncertain` score is below its threshold.

The thresholds come from the model's metadata (chosen by training on its own validation digits) and
may be overridden by the server's flags. A model without a rule accepts every inked image.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from service.recognition import strokes
from service.recognition.model_metadata import Rejection, Threshold

ACCEPTED = ""
NO_INK = "no_ink"
NOT_A_DIGIT = "not_a_digit"
UNCERTAIN = "uncertain"
REASONS = (NO_INK, NOT_A_DIGIT, UNCERTAIN)


@dataclass(frozen=True)
class RejectionOverrides:
    """Server-side overrides of the model's thresholds (None: keep the model's)."""

    not_a_digit_below: float | None = None
    uncertain_below: float | None = None
    filled_above: float | None = None  # the strokes test's thresholds, for a model whose rule has them
    grey_inside_above: float | None = None

    def apply(self, rule: Rejection | None) -> Rejection | None:
        """The rule with these thresholds in place of the model's. For a model that carries no rule,
        the given thresholds apply to the maximum probability (the only score that means the same
        for every model); with neither, every image with ink is accepted."""
        if rule is None:
            if self.not_a_digit_below is None and self.uncertain_below is None:
                return None
            rule = Rejection(not_a_digit=Threshold("max_probability", -math.inf),
                             uncertain=Threshold("max_probability", -math.inf))
        if self.not_a_digit_below is not None:
            rule = dataclasses.replace(
                rule, not_a_digit=dataclasses.replace(rule.not_a_digit, below=self.not_a_digit_below))
        if self.uncertain_below is not None:
            rule = dataclasses.replace(
                rule, uncertain=dataclasses.replace(rule.uncertain, below=self.uncertain_below))
        changed = {key: value for key, value in ((strokes.FILLED, self.filled_above),
                                                 (strokes.GREY_INSIDE, self.grey_inside_above))
                   if value is not None and rule.strokes}
        if changed:
            rule = dataclasses.replace(rule, strokes={**rule.strokes, **changed})
        return rule


def scores(name: str, logits: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """One of `model_metadata.REJECTION_SCORES` per row of a batch."""
    if name == "max_probability":
        return probabilities.max(axis=1)
    if name == "max_logit":
        return logits.max(axis=1)
    if name == "logsumexp":
        top = logits.max(axis=1)
        return top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    raise ValueError(f"unknown rejection score {name!r}")


def tests_strokes(rule: Rejection | None) -> bool:
    """Can the rule's strokes test reject anything? (Its features are shares of at most 1, so a
    threshold of 1 or more, as the flags set to switch it off, never rejects: no need to measure.)"""
    return rule is not None and any(below < 1.0 for below in rule.strokes.values())


def decide(rule: Rejection | None, logits: np.ndarray, probabilities: np.ndarray,
           inked: np.ndarray | None = None, shapes: np.ndarray | None = None) -> np.ndarray:
    """The rejection reason of every row ("" when accepted), as a numpy array of strings.

    `inked` (bool per row) marks the rows whose pixels hold ink; the others are ``no_ink`` whatever
    the model said (their logits are not looked at). `shapes` is `strokes.features` of the rows'
    pixels, for the rule's strokes test (None: not tested).
    """
    reasons = np.full(len(logits), ACCEPTED, dtype=object)
    if rule is not None and len(logits):
        uncertain = scores(rule.uncertain.score, logits, probabilities) < rule.uncertain.below
        reasons[uncertain] = UNCERTAIN
        foreign = scores(rule.not_a_digit.score, logits, probabilities) < rule.not_a_digit.below
        reasons[foreign] = NOT_A_DIGIT
        if rule.strokes and shapes is not None:
            reasons[strokes.unlike_strokes(shapes, rule.strokes)] = NOT_A_DIGIT
    if inked is not None:
        reasons[~inked] = NO_INK
    return reasons
