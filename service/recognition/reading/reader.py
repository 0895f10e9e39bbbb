"""Read one line of handwritten digits: the text, a confidence for it, and every digit with its box.

`Reader.read` segments the image (`service.recognition.reading.segment`), sends every candidate crop
through the MNIST recipe and the classifier in ONE call (in the server that is
`Recognizer.recognize_pixels`, so the crops of one number batch with each other and with other
traffic in the DynamicBatcher), and chooses by dynamic programming the path through the
segmentation graph (digits, and components dropped as noise) with the highest score:

    sum over its digits of      log p(digit | crop) + digit + logit * top logit - shape(crop, digit)
    minus, per cut used,        the ink it crossed, and more in a component too narrow for two digits
    minus, per dropped piece,   what dropping that much ink costs.

Every term is on the scale of a log-probability (`Scoring`), and the main one is the model's own:
a model trained to give pairs of digits and non-digits low confidence plugs in without a change
here and makes wrong pieces lose on their own.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from service.recognition import rejection, strokes
from service.recognition.decode import RawImage, decode, raw_pixels
from service.recognition.model_metadata import Rejection
from service.recognition.preprocess import mnist_recipe
from service.recognition.reading.segment import Box, Candidate, Segmentation, segment

T = TypeVar("T")

# pixels [k, 28, 28] uint8, MNIST convention -> (logits [k, 10], probabilities [k, 10])
Classify = Callable[[np.ndarray], Awaitable[tuple[np.ndarray, np.ndarray]]]

FLOOR = 1e-6  # least probability a crop is given: a log of 0 would make every choice equal


@dataclass(frozen=True)
class Scoring:
    """The weights of the segmentation search. A path's score is the sum of its digits'
    log-probabilities and of these terms, in the same units (penalties are subtracted).

    The defaults were chosen for model 2.0.0 by a coordinate search (`python -m service.perf.numbers
    --tune`) on numbers composed from the 7,000 digits it was trained on, never from the 1,000 test
    digits the figures in docs/reading.md are measured on, and held up when tuned again out of fold.
    `digit` and `logit` depend on the model's logit scale: refit them with a new model whose scale
    moves (2.1.0 kept them: same recipe but its symbols, temperature 0.49 against 0.50).
    """

    # Per digit read, plus `logit` times its top logit. Softmax confidence says which digit a crop is
    # most like, not whether it is one: two touching digits or half a digit often get a confident
    # softmax from smaller logits than a clean digit does (the energy view of out-of-distribution input).
    digit: float = 0.0
    logit: float = 1.0
    cut: float = 1.6875  # per stroke width a used cut crossed
    cut_base: float = 1.3  # per cut used
    # Per line height the cut component is narrower than `split_width`: one digit is seldom wider
    # than a line height, two touching digits seldom narrower.
    cut_narrow: float = 7.5
    split_width: float = 1.4
    drop: float = 10.0  # per line height of a component dropped as noise
    drop_base: float = 1.0  # per component dropped
    short: float = 32.0  # per line height a digit is shorter than `short_below`
    short_below: float = 0.8  # of the line height
    narrow: float = 11.0  # per line height a digit other than 1 is narrower than `narrow_below`
    narrow_below: float = 0.3  # of the line height
    wide: float = 6.7  # per line height a digit is wider than ASPECT[digit] + wide_margin
    wide_margin: float = 0.06  # of the line height: slant and a writer's wide hand


# MNIST digits' median width over height per class (measured on the shipped model's training digits):
# a crop much wider than its digit usually is holds two digits.
ASPECT = (0.9, 0.45, 0.95, 0.8, 0.8, 1.0, 0.7, 0.8, 0.8, 0.7)


@dataclass(frozen=True)
class ReadDigit:
    """One digit of a reading."""

    digit: int
    confidence: float  # the model's probability of `digit` for this crop
    box: Box  # in the pixels of the image as sent
    logits: np.ndarray  # [10]: what the rejection rule reads, with the probabilities
    probabilities: np.ndarray  # [10]
    rejection: str  # "" when accepted, else the rejection rule's reason


@dataclass(frozen=True)
class Reading:
    """What one image of a line of digits reads as."""

    text: str
    # The product of the digits' confidences: the model's probability that every digit is right,
    # given the chosen segmentation (1 digit: that digit's confidence; no digit: 0).
    confidence: float
    digits: tuple[ReadDigit, ...]
    rejection: str  # "" when every digit is accepted; "no_ink"; else the first rejected digit's reason
    candidates: int  # crops classified to read it (at most segment.MAX_CANDIDATES)

    @property
    def accepted(self) -> bool:
        """True only when there are digits and every one of them is accepted."""
        return bool(self.digits) and not self.rejection


class Reader:
    """Reads lines of digits with `classify` (see `Classify`).

    The CPU work of a reading (decoding, segmenting, the recipe: tens of milliseconds for a long line)
    runs on a worker thread, so that a server's event loop keeps serving meanwhile: on `executor` when
    given (a server gives one thread for all its readings: that work is Python that holds the GIL, and
    several threads doing it at once only fight over it), else on asyncio's default threads. All crops of one
    image go to `classify` in one call, or in calls of at most `max_per_call` crops made at once (a
    server whose per-request image limit is below segment.MAX_CANDIDATES), which batch together.
    """

    def __init__(self, classify: Classify, scoring: Scoring | None = None, max_per_call: int | None = None,
                 executor: Executor | None = None) -> None:
        self._classify = classify
        self._scoring = scoring or Scoring()
        self._max_per_call = max_per_call
        self._executor = executor

    async def _off_loop(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    async def read_payload(self, payload: bytes | RawImage, max_pixels: int = 25_000_000,
                           rule: Rejection | None = None) -> Reading:
        """Read an encoded image file or raw pixels of any size and polarity, as Recognize takes one
        digit. Raises preprocess.ImageError / ImageTooLarge for undecodable or oversized input."""
        return await self.read(await self._off_loop(gray_of, payload, max_pixels), rule)

    async def read(self, gray: np.ndarray, rule: Rejection | None = None) -> Reading:
        """Read a [H, W] uint8 grayscale image; `rule` is the model's rejection rule (None: accept all)."""
        found, pixels = await self._off_loop(_prepare, gray)
        if not found.candidates:
            return Reading("", 0.0, (), rejection.NO_INK, 0)
        logits, probabilities = await self._classify_all(pixels)
        chosen = choose(found, logits, probabilities, self._scoring)
        if not chosen:  # ink, but every piece of it was cheaper to drop than to read as a digit
            return Reading("", 0.0, (), rejection.NOT_A_DIGIT, len(found.candidates))
        shapes = strokes.features(pixels[chosen]) if rejection.tests_strokes(rule) else None
        reasons = rejection.decide(rule, logits[chosen], probabilities[chosen], shapes=shapes)
        digits = tuple(
            ReadDigit(int(probabilities[i].argmax()), float(probabilities[i].max()), found.candidates[i].box,
                      logits[i], probabilities[i], str(reason))
            for i, reason in zip(chosen, reasons, strict=True))
        first_rejected = next((d.rejection for d in digits if d.rejection), rejection.ACCEPTED)
        return Reading("".join(str(d.digit) for d in digits), math.prod(d.confidence for d in digits), digits,
                       first_rejected, len(found.candidates))

    async def _classify_all(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = self._max_per_call or len(pixels)
        if len(pixels) <= size:
            return await self._classify(pixels)
        parts = await asyncio.gather(*(self._classify(pixels[i:i + size]) for i in range(0, len(pixels), size)))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def gray_of(payload: bytes | RawImage, max_pixels: int) -> np.ndarray:
    """A payload as 8-bit grayscale, limits checked as for Recognize (ImageError / ImageTooLarge)."""
    if isinstance(payload, RawImage):
        pixels = raw_pixels(payload, max_pixels)
        return pixels if pixels.dtype == np.uint8 else np.rint(pixels * 255).astype(np.uint8)
    return decode(payload, max_pixels)


def _prepare(gray: np.ndarray) -> tuple[Segmentation, np.ndarray]:
    """The segmentation, and every candidate through the MNIST recipe ([k, 28, 28] uint8)."""
    found = segment(gray)
    return found, np.stack([mnist_recipe(c.crop) for c in found.candidates]) if found.candidates else np.empty(0)


def shape_penalty(candidate: Candidate, digit: int, scoring: Scoring) -> float:
    """How implausible this crop's size is for `digit` in this line (0: plausible)."""
    penalty = scoring.short * max(0.0, scoring.short_below - candidate.height)
    penalty += scoring.wide * max(0.0, candidate.width - ASPECT[digit] - scoring.wide_margin)
    if digit != 1:
        penalty += scoring.narrow * max(0.0, scoring.narrow_below - candidate.width)
    return penalty


def choose(found: Segmentation, logits: np.ndarray, probabilities: np.ndarray, scoring: Scoring) -> list[int]:
    """The candidates (indices) on the best-scoring path through the segmentation graph, in order.

    best[j] is the best score of a reading of everything before node j. A step from node i to a later
    node is a candidate digit or a dropped component; starting it at a cut costs that cut.
    """
    digits = probabilities.argmax(axis=1)
    steps: list[list[tuple[int, float, int | None]]] = [[] for _ in range(found.nodes)]  # by end node
    for i, (candidate, digit) in enumerate(zip(found.candidates, digits, strict=True)):
        score = (math.log(max(FLOOR, float(probabilities[i, digit]))) + scoring.digit
                 + scoring.logit * float(logits[i, digit]) - shape_penalty(candidate, int(digit), scoring))
        steps[candidate.end].append((candidate.start, score, i))
    for start, end, height in found.drops:
        steps[end].append((start, -scoring.drop_base - scoring.drop * height, None))

    def starting(node: int) -> float:
        width = found.cut_widths[node]
        if not width:  # the line's or a component's start: no cut
            return 0.0
        return (scoring.cut * found.cut_strokes[node] + scoring.cut_base
                + scoring.cut_narrow * max(0.0, scoring.split_width - width))

    best = [-math.inf] * found.nodes
    back: list[tuple[int, int | None]] = [(0, None)] * found.nodes  # (previous node, candidate; None: a drop)
    best[0] = 0.0
    for end in range(1, found.nodes):
        for start, score, index in steps[end]:
            total = best[start] - starting(start) + score
            if total > best[end]:
                best[end], back[end] = total, (start, index)
    chosen = []
    node = found.nodes - 1
    while node > 0:
        node, index = back[node]
        if index is not None:
            chosen.append(index)
    return chosen[::-1]
