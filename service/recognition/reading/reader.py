"""Read one line of handwritten digits: the text, a confidence for it, and every digit with its box.

`Reader.read` segments the image (`service.recognition.reading.segment`), sends every candidate crop
through the MNIST recipe and the classifier in ONE call (in the server that is
`Recognizer.recognize_pixels`, so the crops of one number batch with each other and with other
traffic in the DynamicBatcher), and chooses by dynamic programming the path through the
segmentation graph (digits, and components dropped as noise) with the highest score
(`service.recognition.reading.scoring`): a weighted sum, over its steps, of the model's log-probability
and logits for each digit's crop, how plausible the crop's shape is for that digit, the ink of the cuts
it starts and ends at, and what dropping a piece of ink costs. The main term is the model's own: a
model trained to give pairs of digits and non-digits low confidence makes wrong pieces lose on their own.
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
from service.recognition.reading.scoring import Scoring, choose
from service.recognition.reading.segment import Box, Segmentation, segment

T = TypeVar("T")

# pixels [k, 28, 28] uint8, MNIST convention -> (logits [k, 10], probabilities [k, 10])
Classify = Callable[[np.ndarray], Awaitable[tuple[np.ndarray, np.ndarray]]]


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
