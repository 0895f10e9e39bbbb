"""Fit the Reader's `Scoring` weights to whole readings: an averaged structured perceptron.

Each training case is a number composed from digits the classifier never trained on (`numbers.compose`),
segmented and classified once. For each case in turn the Reader's choice is made with the current
weights; when its text is wrong, the best path whose every digit covers its true digit's box (IoU at
least MATCH_IOU) and is read as that digit is found with the same weights, and the weights move
towards that path's features and away from the chosen path's (Collins 2002). The answer is the
average of the weights over all steps, which generalises better than the last ones. Cases with no
right path (a digit no candidate reads right) teach nothing and are left alone.

``python -m service.perf.reading.fit_scoring --data-dir FOLD_DIGITS --model FOLD_MODEL ...`` prints the fitted
weights (to put into `Scoring`'s defaults) and the exact-match counts, on the fitting numbers and on
other numbers of the same digits, with the legacy weights, the current defaults and the fitted ones.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service import idx
from service.perf.reading.numbers import KINDS, MAX_PIXELS, Number, box_iou, compose, onnx_classifier
from service.recognition.decode import decode
from service.recognition.preprocess import mnist_recipe
from service.recognition.reading import segment
from service.recognition.reading.reader import Classify
from service.recognition.reading.scoring import LEGACY, Scoring, Steps, best_path, steps

MATCH_IOU = 0.6  # a candidate over this much of a true digit's box (intersection over union) is that digit


@dataclass(frozen=True)
class Case:
    """One composed number as the Reader sees it: its graph's steps, and which steps are right."""

    kind: str
    text: str
    nodes: int
    graph: Steps
    digits: np.ndarray  # per step, the digit it reads (-1 for a drop)
    covers: tuple[frozenset[int], ...]  # per step, the positions of true digits it reads right where they are


async def case_of(number: Number, classify: Classify) -> Case | None:
    """Segment and classify one number once (None when it has no candidates)."""
    found = segment.segment(decode(number.png, MAX_PIXELS))
    if not found.candidates:
        return None
    logits, probabilities = await classify(np.stack([mnist_recipe(c.crop) for c in found.candidates]))
    graph = steps(found, logits, probabilities)
    read = probabilities.argmax(axis=1)
    digits = np.where(graph.candidates >= 0, read[np.maximum(graph.candidates, 0)], -1)
    covers = tuple(
        frozenset() if index < 0 else frozenset(
            q for q, box in enumerate(number.boxes)
            if int(number.text[q]) == int(read[index]) and box_iou(box, found.candidates[index].box) >= MATCH_IOU)
        for index in graph.candidates.tolist())
    return Case(number.kind, number.text, found.nodes, graph, digits, covers)


async def cases_of(sources: Sequence[tuple[np.ndarray, np.ndarray, Classify]], per_kind: int, seed: int,
                   lengths: tuple[int, int] = (2, 7), progress: str = "") -> list[Case]:
    """`per_kind` numbers of every kind from each source's digits, read by its classifier. With
    `progress`, a line on stderr as each source and kind is done (the CLI's fits take minutes)."""
    cases: list[Case] = []
    for source, (images, labels, classify) in enumerate(sources):
        for kind_index, kind in enumerate(KINDS):
            if progress:
                print(f"{progress}: source {source + 1}/{len(sources)}, {kind}, {len(cases)} numbers so far",
                      file=sys.stderr, flush=True)
            rng = np.random.default_rng([seed, source, kind_index])
            for _ in range(per_kind):
                case = await case_of(compose(images, labels, kind, rng, lengths=lengths), classify)
                if case is not None:
                    cases.append(case)
    return cases


def text_of(case: Case, path: list[int]) -> str:
    """What a path reads."""
    return "".join(str(int(case.digits[i])) for i in path if case.digits[i] >= 0)


def right_path(case: Case, weights: np.ndarray) -> list[int]:
    """The best path (under `weights`) whose digits are the true digits, each over its true box, in
    order, drops allowed; [] when there is none."""
    scores = case.graph.rows @ weights
    length = len(case.text)
    best: dict[tuple[int, int], tuple[float, int, int]] = {(0, 0): (0.0, -1, -1)}  # -> (score, step, prev q)
    for i in np.argsort(case.graph.ends, kind="stable").tolist():
        start, end = int(case.graph.starts[i]), int(case.graph.ends[i])
        for q in range(length + 1):
            here = best.get((start, q))
            if here is None:
                continue
            if case.digits[i] >= 0 and q not in case.covers[i]:
                continue  # a digit, but not the q-th true digit read right where it is
            reached = q if case.digits[i] < 0 else q + 1
            total = here[0] + float(scores[i])
            if total > best.get((end, reached), (-math.inf, -1, -1))[0]:
                best[end, reached] = (total, i, q)
    state = (case.nodes - 1, length)
    if state not in best:
        return []
    path = []
    while state != (0, 0):
        _, i, q = best[state]
        path.append(i)
        state = (int(case.graph.starts[i]), q)
    return path[::-1]


def fit(cases: Sequence[Case], start: Scoring = LEGACY, epochs: int = 8, rate: float = 0.5,
        seed: int = 0) -> Scoring:
    """The averaged structured perceptron over `cases` (in a shuffled order per epoch), from `start`."""
    weights = start.vector()
    total = np.zeros_like(weights)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for j in rng.permutation(len(cases)).tolist():
            case = cases[j]
            chosen = best_path(case.nodes, case.graph, case.graph.rows @ weights)
            if text_of(case, chosen) != case.text:
                right = right_path(case, weights)
                if right:
                    rows = case.graph.rows
                    weights = weights + rate * (rows[right].sum(axis=0) - rows[chosen].sum(axis=0))
            total += weights
    return Scoring.from_vector(total / max(1, epochs * len(cases)))


def exact(cases: Sequence[Case], scoring: Scoring) -> dict[str, tuple[int, int]]:
    """Per kind, (numbers read exactly, numbers)."""
    weights = scoring.vector()
    counts = {kind: [0, 0] for kind in KINDS}
    for case in cases:
        counts[case.kind][0] += text_of(case, best_path(case.nodes, case.graph, case.graph.rows @ weights)) == case.text
        counts[case.kind][1] += 1
    return {kind: (right, total) for kind, (right, total) in counts.items() if total}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.perf.reading.fit_scoring``: fit Scoring on validation digits and check it on others."""
    parser = argparse.ArgumentParser(prog="python -m service.perf.reading.fit_scoring",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, action="append",
                        help="IDX folder of digits the model given in its place never trained on (repeatable)")
    parser.add_argument("--model", type=Path, required=True, action="append", help="ONNX model, one per --data-dir")
    parser.add_argument("--per-kind", type=int, default=200, help="numbers of each kind per folder to fit on")
    parser.add_argument("--check-per-kind", type=int, default=80,
                        help="other numbers of each kind per folder to check on")
    parser.add_argument("--seed", type=int, default=300, help="seed of the fitting numbers")
    parser.add_argument("--check-seed", type=int, default=201, help="seed of the checking numbers")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rate", type=float, default=0.5)
    args = parser.parse_args(argv)
    if len(args.model) != len(args.data_dir):
        parser.error("give one --model per --data-dir")
    sources = []
    for folder, model in zip(args.data_dir, args.model, strict=True):
        images, labels = idx.load_digits(folder)
        if labels is None:
            parser.error(f"{folder} has no labels")
        sources.append((images, labels, onnx_classifier(model)))
    fitting = asyncio.run(cases_of(sources, args.per_kind, args.seed, progress="fitting numbers"))
    checking = asyncio.run(cases_of(sources, args.check_per_kind, args.check_seed, progress="checking numbers"))
    fitted = fit(fitting, epochs=args.epochs, rate=args.rate)
    print(fitted)
    for name, scoring in (("legacy", LEGACY), ("defaults", Scoring()), ("fitted", fitted)):
        print(f"{name}: fitting {exact(fitting, scoring)}  checking {exact(checking, scoring)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
