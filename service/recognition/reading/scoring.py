"""How the Reader scores one way of reading a line: a linear score over what each step of the path says.

A path through the segmentation graph is a sequence of steps, each a candidate digit or a component
dropped as noise. Every step gets a row of FEATURES (`steps`), and a path's score is the sum of its
steps' rows times the weights of `Scoring`. The features are the model's own outputs for the crop
(log-probability of its digit, its top two logits), the crop's shape against the line and against its
digit (too short, too narrow, wider than that digit usually is), the cuts it starts and ends at (the
ink they cross, and whether the cut component is too narrow to hold two digits), and for a dropped
component its height. One weight vector, so that the weights can be fitted to whole readings
(`service.perf.reading.fit_scoring`) rather than one at a time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from service.recognition.reading.segment import Segmentation

FLOOR = 1e-6  # least probability a crop is given: a log of 0 would make every choice equal

# MNIST digits' median width over height per class (measured on the shipped model's training digits):
# a crop much wider than its digit usually is holds two digits.
ASPECT = (0.9, 0.45, 0.95, 0.8, 0.8, 1.0, 0.7, 0.8, 0.8, 0.7)
SHORT_BELOW = 0.8  # of the line height: a digit shorter than this is short
NARROW_BELOW = 0.3  # of the line height: a digit other than 1 narrower than this is narrow
WIDE_MARGIN = 0.06  # of the line height, over ASPECT[digit]: slant and a writer's wide hand
SPLIT_WIDTH = 1.4  # of the line height: one digit is seldom wider, two touching digits seldom narrower


@dataclass(frozen=True)
class Scoring:
    """The weights of a path's features (`FEATURES`, in this order), in units of log-probability.

    The shape and cut features are positive where they say "unlikely", so their weights are mostly
    negative. The defaults were fitted by `python -m service.perf.reading.fit_scoring` (an averaged structured
    perceptron) on 3,000 numbers composed from out-of-fold digits, each read by the fold model of model
    2.3.0's cross-validation that never saw them, with segment.MAX_CANDIDATES at 384: no test digit chose
    them (docs/reading.md, "How the scoring weights were chosen"). `LEGACY` holds the hand-made weights
    they replaced. They depend on the model's logit scale: fit them again with a model whose scale moves.
    """

    log_p: float = 5.1503  # log p(digit | crop)
    # Softmax confidence says which digit a crop is most like, not whether it is one: two touching
    # digits or half a digit often get a confident softmax from smaller logits than a clean digit does;
    # a second logit close to the first says the crop is between two digits.
    top_logit: float = 2.9629
    second_logit: float = -2.6372
    short: float = -42.6699  # per line height the crop is shorter than SHORT_BELOW
    wide: float = -3.4852  # per line height it is wider than ASPECT[digit] + WIDE_MARGIN
    wide_squared: float = -3.576  # the same, squared
    narrow: float = -11.3267  # per line height a digit other than 1 is narrower than NARROW_BELOW
    width: float = 0.4597  # of the line height
    height: float = 2.7189
    cut_strokes: float = -3.0448  # per stroke width the cut it starts at crosses
    cut: float = -3.0667  # when it starts at a cut
    cut_narrow: float = -5.2998  # per line height the component it starts in is narrower than SPLIT_WIDTH
    end_cut_strokes: float = -1.3573  # per stroke width the cut it ends at crosses
    end_cut: float = -1.7667  # when it ends at a cut
    drop: float = -8.3495  # per component dropped as noise
    drop_height: float = -17.544  # per line height of the dropped component
    # Per digit read, and times its width: how often a piece of ink that is no digit passes for this
    # one (halves of digits read as 1 and 7 most), and how wide this digit is.
    digit_bias: tuple[float, ...] = (-0.3471, -6.9653, -4.7242, -1.7557, 0.7003, -4.586, -3.8162, -5.8482, -0.183,
                                     0.4921)
    digit_width: tuple[float, ...] = (2.4624, 0.3226, 0.2666, -2.3342, -1.1225, -0.1606, 1.3911, 1.4307, -2.1473,
                                      0.3509)

    def vector(self) -> np.ndarray:
        """The weights in the order of FEATURES."""
        values: list[float] = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values.extend(value if field.name in PER_DIGIT else (value,))
        return np.array(values, dtype=np.float64)

    @classmethod
    def from_vector(cls, vector: np.ndarray) -> Scoring:
        """The Scoring whose `vector()` is `vector`, rounded to 4 decimals."""
        values = [round(float(v), 4) for v in vector]
        weights: dict[str, float | tuple[float, ...]] = {}
        for field in dataclasses.fields(cls):
            if field.name in PER_DIGIT:
                weights[field.name], values = tuple(values[:10]), values[10:]
            else:
                weights[field.name], values = values[0], values[1:]
        return cls(**weights)  # type: ignore[arg-type]


PER_DIGIT = ("digit_bias", "digit_width")  # the fields with one weight per digit read
FEATURES: tuple[str, ...] = tuple(
    name for field in dataclasses.fields(Scoring)
    for name in ([f"{field.name}_{d}" for d in range(10)] if field.name in PER_DIGIT else [field.name]))
_COLUMN = {name: i for i, name in enumerate(FEATURES)}


@dataclass(frozen=True)
class Steps:
    """Every step a path may take: from node `starts[i]` to node `ends[i]`, with features `rows[i]`;
    `candidates[i]` is the candidate's index, or -1 for a component dropped as noise."""

    starts: np.ndarray
    ends: np.ndarray
    candidates: np.ndarray
    rows: np.ndarray  # [steps, len(FEATURES)]


def steps(found: Segmentation, logits: np.ndarray, probabilities: np.ndarray) -> Steps:
    """The steps of a segmentation graph, its candidates read by the model as `logits` / `probabilities`."""
    count = len(found.candidates)
    rows = np.zeros((count + len(found.drops), len(FEATURES)))
    starts = np.array([c.start for c in found.candidates] + [d[0] for d in found.drops], dtype=np.int64)
    ends = np.array([c.end for c in found.candidates] + [d[1] for d in found.drops], dtype=np.int64)
    kinds = np.concatenate([np.arange(count), np.full(len(found.drops), -1)]).astype(np.int64)
    if count:
        column = {name: rows[:count, i] for name, i in _COLUMN.items()}  # views: writing one fills rows
        digits = probabilities.argmax(axis=1)
        width = np.array([c.width for c in found.candidates])
        height = np.array([c.height for c in found.candidates])
        over = np.maximum(0.0, width - np.take(ASPECT, digits) - WIDE_MARGIN)
        top_two = np.sort(logits, axis=1)[:, ::-1]
        column["log_p"][:] = np.log(np.maximum(FLOOR, probabilities[np.arange(count), digits].astype(np.float64)))
        column["top_logit"][:], column["second_logit"][:] = top_two[:, 0], top_two[:, 1]
        column["short"][:] = np.maximum(0.0, SHORT_BELOW - height)
        column["wide"][:], column["wide_squared"][:] = over, over * over
        column["narrow"][:] = np.where(digits != 1, np.maximum(0.0, NARROW_BELOW - width), 0.0)
        column["width"][:], column["height"][:] = width, height
        # A node is a cut when the component it cuts has a width (a component's start has none); the
        # line's end is no cut.
        cut_width = np.array(found.cut_widths)
        cut_strokes = np.array(found.cut_strokes)
        for node, prefix in ((starts[:count], ""), (ends[:count], "end_")):
            is_cut = (cut_width[node] > 0) & (node < found.nodes - 1)
            column[prefix + "cut_strokes"][:] = np.where(is_cut, cut_strokes[node], 0.0)
            column[prefix + "cut"][:] = is_cut
            if not prefix:
                column["cut_narrow"][:] = np.where(is_cut, np.maximum(0.0, SPLIT_WIDTH - cut_width[node]), 0.0)
        rows[np.arange(count), _COLUMN["digit_bias_0"] + digits] = 1.0
        rows[np.arange(count), _COLUMN["digit_width_0"] + digits] = width
    rows[count:, _COLUMN["drop"]] = 1.0
    rows[count:, _COLUMN["drop_height"]] = [drop[2] for drop in found.drops]
    return Steps(starts, ends, kinds, rows)


def best_path(nodes: int, graph: Steps, scores: np.ndarray) -> list[int]:
    """The steps (indices into `graph`) of the highest-scoring path from node 0 to node `nodes` - 1,
    in order; [] when there is none. `scores[i]` is step i's score."""
    best = [-math.inf] * nodes
    back = [-1] * nodes  # the step that reaches each node best
    best[0] = 0.0
    order = np.argsort(graph.ends, kind="stable")
    for i in order.tolist():  # every step ends later than it starts, so by end node is in order
        start, end = int(graph.starts[i]), int(graph.ends[i])
        total = best[start] + float(scores[i])
        if total > best[end]:
            best[end], back[end] = total, i
    if best[nodes - 1] == -math.inf:
        return []
    path = []
    node = nodes - 1
    while node > 0:
        path.append(back[node])
        node = int(graph.starts[back[node]])
    return path[::-1]


def choose(found: Segmentation, logits: np.ndarray, probabilities: np.ndarray, scoring: Scoring) -> list[int]:
    """The candidates (indices) on the best-scoring path through the segmentation graph, in order."""
    graph = steps(found, logits, probabilities)
    path = best_path(found.nodes, graph, graph.rows @ scoring.vector())
    return [int(graph.candidates[i]) for i in path if graph.candidates[i] >= 0]


# The weights before 2026-12-04: hand-made terms, a coordinate search for model 2.0.0 on its training
# digits (docs/reading.md); the starting point of a fit.
LEGACY = Scoring(log_p=1.0, top_logit=1.0, second_logit=0.0, short=-32.0, wide=-6.7, wide_squared=0.0,
                 narrow=-11.0, width=0.0, height=0.0, cut_strokes=-1.6875, cut=-1.3, cut_narrow=-7.5,
                 end_cut_strokes=0.0, end_cut=0.0, drop=-1.0, drop_height=-10.0, digit_bias=(0.0,) * 10,
                 digit_width=(0.0,) * 10)
