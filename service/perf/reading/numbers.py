"""Whole numbers made from real digits, as clients send them, and how well the Reader reads them.

`compose` lays real 28x28 MNIST digits (bright ink on black) side by side into one client-style image
(black ink on white, PNG), each digit at its own scale, the line slanted and its baseline uneven, in
one of three kinds:

- ``spaced``: clear gaps between the digits' boxes (a quarter to three quarters of the line height);
- ``tight``: a few pixels (1-4) between the digits' ink, row by row, so boxes may overlap where
  digits lean into each other, but no two digits' ink connects;
- ``touching``: as tight, but at least one pair of neighbours has strokes that touch or overlap.

The kind is checked on the image itself, not assumed from the placement: the ink is labelled into
8-connected components at the Reader's ink threshold, and a number is ``touching`` exactly when one
component holds ink of two digits (spaced and tight numbers hold none). Each number comes with its
true text and every digit's true box (its ink's bounding box in the image).

`measure` composes numbers from digits a model never trained on, reads them with `Reader` and an
in-process onnxruntime classifier, and reports exact-match accuracy per kind (Wilson 95% intervals)
and digit-level accuracy. Run it as ``python -m service.perf.reading.numbers`` (see docs/reading.md).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from service import idx
from service.recognition.decode import decode
from service.recognition.model import load_model
from service.recognition.preprocess import mnist_recipe, normalize
from service.recognition.reading import segment
from service.recognition.reading.reader import Classify, Reader, Reading
from service.recognition.reading.scoring import Scoring

KINDS = ("spaced", "tight", "touching")
INK_LEVEL = 0.2 * 255  # the Reader's ink threshold (preprocess.INK_THRESHOLD of the peak)
EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, as the segmenter labels ink
MAX_PIXELS = 25_000_000  # the decode limit for composed numbers (the server's default --max-image-pixels)


@dataclass(frozen=True)
class Number:
    """One composed number: the image as a client sends it, and the truth."""

    png: bytes
    text: str
    boxes: tuple[tuple[int, int, int, int], ...]  # per digit (x, y, width, height) of its ink
    kind: str
    glyphs: tuple[np.ndarray, ...] = ()  # per digit its ink alone as drawn (uint8, bright on black)


def _render(digit: np.ndarray, height: int, slant: float) -> np.ndarray:
    """A 28x28 digit cropped to its ink, scaled to `height` pixels and sheared by `slant` (x per y),
    as float ink 0..255. Stray dots of the scan (pieces under 5% of the largest) are left out: they are
    no part of the digit, and would stretch its true box."""
    pieces, count = ndimage.label(digit > 0, structure=EIGHT)
    areas = np.bincount(pieces.ravel(), minlength=count + 1)
    areas[0] = 0
    digit = np.where(areas[pieces] >= 0.05 * areas.max(), digit, 0).astype(np.uint8)
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    crop = Image.fromarray(digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    width = max(1, round(crop.width * height / crop.height))
    crop = crop.resize((width, height), Image.Resampling.BILINEAR)
    extra = math.ceil(abs(slant) * height)
    # Italic shear about the bottom row, x_in = x_out - slant * (height - 1 - y), shifted right by
    # `extra` when the digit leans left so that no ink leaves the image.
    shift = -slant * (height - 1) - (extra if slant < 0 else 0)
    sheared = crop.transform((width + extra, height), Image.Transform.AFFINE, (1, slant, shift, 0, 1, 0),
                             resample=Image.Resampling.BILINEAR)
    return np.asarray(sheared, dtype=np.float32)


def _edges(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the leftmost and rightmost column with any ink (inf / -inf for empty rows)."""
    inked = ink > 0
    cols = np.arange(ink.shape[1])
    left = np.where(inked, cols, np.inf).min(axis=1)
    right = np.where(inked, cols, -np.inf).max(axis=1)
    return left, right


def _place(glyphs: Sequence[np.ndarray], tops: Sequence[int], gaps: Sequence[float],
           kerned: Sequence[bool]) -> list[int]:
    """Left x of every glyph: after the previous one with `gaps[i]` pixels between boxes (spaced) or,
    when `kerned`, between the two digits' ink in the rows they share (negative: overlapping)."""
    lefts = [0]
    for i in range(1, len(glyphs)):
        prev, cur = glyphs[i - 1], glyphs[i]
        if not kerned[i - 1]:
            lefts.append(lefts[-1] + prev.shape[1] + round(gaps[i - 1]))
            continue
        # Align the two glyphs' rows on the canvas, then push `cur` as close as its ink allows.
        top = min(tops[i - 1], tops[i])
        bottom = max(tops[i - 1] + prev.shape[0], tops[i] + cur.shape[0])
        _, prev_right = _edges(np.pad(prev, ((tops[i - 1] - top, bottom - tops[i - 1] - prev.shape[0]), (0, 0))))
        cur_left, _ = _edges(np.pad(cur, ((tops[i] - top, bottom - tops[i] - cur.shape[0]), (0, 0))))
        shared = np.isfinite(prev_right) & np.isfinite(cur_left)
        if shared.any():
            # Smallest shift with cur's ink `gap` pixels right of prev's ink in every shared row.
            shift = float(np.max(prev_right[shared] + lefts[-1] - cur_left[shared])) + 1 + gaps[i - 1]
        else:
            shift = lefts[-1] + prev.shape[1] + gaps[i - 1]
        lefts.append(round(shift))
    return lefts


def compose(images: np.ndarray, labels: np.ndarray, kind: str, rng: np.random.Generator,
            length: int | None = None, lengths: tuple[int, int] = (2, 7)) -> Number:
    """One number of `kind` made of digits drawn from `images` [N, 28, 28] / `labels` [N].

    `length` digits, or a length drawn uniformly from `lengths` (inclusive). Retries with new
    placements until the image is verifiably of `kind` (see the module docstring).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n = length if length is not None else int(rng.integers(lengths[0], lengths[1] + 1))
    picks = rng.integers(0, len(images), size=n)
    for _ in range(50):
        number = _attempt(images[picks], labels[picks], kind, rng)
        if number is not None:
            return number
        picks = rng.integers(0, len(images), size=n)  # some digits cannot touch their neighbours as drawn
    raise RuntimeError(f"could not compose a {kind} number of {n} digits")


def _attempt(digits: np.ndarray, labels: np.ndarray, kind: str, rng: np.random.Generator) -> Number | None:
    n = len(digits)
    line = int(rng.integers(28, 81))  # the line's digit height in pixels
    slant = float(rng.uniform(-0.25, 0.25))
    glyphs = [_render(d, max(8, round(line * rng.uniform(0.85, 1.15))), slant + float(rng.uniform(-0.05, 0.05)))
              for d in digits]
    # Uneven baseline: bottoms wander by up to a tenth of the line height.
    bottoms = [line + round(float(rng.uniform(-0.1, 0.1)) * line) for _ in glyphs]
    tops = [b - g.shape[0] + line for b, g in zip(bottoms, glyphs, strict=True)]  # all >= 0 after +line
    pairs = n - 1
    if kind == "spaced":
        gaps = list(rng.uniform(0.25, 0.75, pairs) * line)
        kerned = [False] * pairs
    else:
        gaps = list(rng.integers(1, 5, pairs).astype(float))
        kerned = [True] * pairs
        if kind == "touching":
            if pairs == 0:
                return None
            forced = rng.random(pairs) < 0.35
            forced[int(rng.integers(pairs))] = True
            # Touch (no gap between the ink in some row) or overlap by up to an eighth of the line height,
            # about a pen width: strokes that run into each other, not digits written over each other.
            gaps = [-float(rng.uniform(0, line / 8)) - 1 if f else g for f, g in zip(forced, gaps, strict=True)]
    lefts = _place(glyphs, tops, gaps, kerned)
    margin = round(line * float(rng.uniform(0.2, 0.6)))
    base = min(lefts)
    width = max(left + g.shape[1] for left, g in zip(lefts, glyphs, strict=True)) - base + 2 * margin
    height = max(t + g.shape[0] for t, g in zip(tops, glyphs, strict=True)) + 2 * margin
    canvas = np.zeros((height, width), dtype=np.float32)
    masks = []
    for glyph, left, top in zip(glyphs, lefts, tops, strict=True):
        x, y = left - base + margin, top + margin
        region = canvas[y:y + glyph.shape[0], x:x + glyph.shape[1]]
        np.maximum(region, glyph, out=region)  # overlapping strokes: the darker ink wins, as on paper
        mask = np.zeros(canvas.shape, dtype=bool)
        mask[y:y + glyph.shape[0], x:x + glyph.shape[1]] = glyph > INK_LEVEL
        masks.append(mask)
    if _observed_kind(canvas, masks, kind) != kind:
        return None
    boxes = []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes.append((int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)))
    page = Image.fromarray((255 - np.clip(np.rint(canvas), 0, 255)).astype(np.uint8))
    out = io.BytesIO()
    page.save(out, format="PNG")
    alone = tuple(np.clip(np.rint(g), 0, 255).astype(np.uint8) for g in glyphs)
    return Number(out.getvalue(), "".join(str(int(d)) for d in labels), tuple(boxes), kind, alone)


def _observed_kind(canvas: np.ndarray, masks: Sequence[np.ndarray], wanted: str) -> str:
    """The kind the ink really is: touching when one component holds two digits' ink."""
    components, _ = ndimage.label(canvas > INK_LEVEL, structure=EIGHT)
    owners = [set(np.unique(components[m & (components > 0)]).tolist()) for m in masks]
    touching = any(owners[i] & owners[j] for i in range(len(owners)) for j in range(i + 1, len(owners)))
    if touching:
        return "touching"
    return wanted if wanted != "touching" else "tight"


def box_iou(truth: tuple[int, int, int, int], box: segment.Box) -> float:
    """Intersection over union of a true digit's box (x, y, width, height) and a candidate's box."""
    x, y, w, h = truth
    width = max(0, min(x + w, box.x + box.width) - max(x, box.x))
    height = max(0, min(y + h, box.y + box.height) - max(y, box.y))
    shared = width * height
    return shared / (w * h + box.width * box.height - shared)


# --- measurement ---


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) for a proportion."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def onnx_classifier(model_path: Path) -> Classify:
    """An in-process classifier for the Reader: the model in onnxruntime on the CPU, one thread,
    normalized with the model's own metadata, as the server's batcher does."""
    model = load_model(model_path, "cpu", 1, warmup_batch=1)

    async def classify(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return model.run(normalize(pixels, model.metadata.normalization))

    return classify


@dataclass(frozen=True)
class KindResult:
    """Accuracy on one kind of number."""

    kind: str
    numbers: int
    exact: int
    digits: int  # true digits
    digits_right: int  # true digits read right in place (position by position, same length only)
    digits_alone: int  # true digits the model reads right when each is cut out perfectly (its ink alone)
    wrong_length: int  # readings with too many or too few digits
    # Wrong readings of numbers with a digit the model misreads even alone (the classifier's errors),
    # and of numbers whose every digit it reads right alone (the segmentation's).
    classifier_errors: int
    segmentation_errors: int
    candidates_max: int
    seconds: float  # reading all of them, in-process
    naive_exact: int = 0  # read as naive connected components: every component whole, one digit each

    @property
    def exact_rate(self) -> float:
        return self.exact / self.numbers if self.numbers else 0.0


def digit_matches(reading: Reading, truth: str) -> int:
    """Digits read right in place; a reading of the wrong length counts none (no alignment guesses)."""
    if len(reading.text) != len(truth):
        return 0
    return sum(a == b for a, b in zip(reading.text, truth, strict=True))


async def measure(images: np.ndarray, labels: np.ndarray, classify: Classify, per_kind: int, seed: int = 0,
                  lengths: tuple[int, int] = (2, 7), kinds: Sequence[str] = KINDS,
                  explain: bool = True, scoring: Scoring | None = None) -> list[KindResult]:
    """Compose `per_kind` numbers of every kind from `images`/`labels` and read them. With `explain`,
    also read each digit alone (to tell the classifier's errors from the segmentation's) and the
    number as naive components (the baseline); without, those counts stay 0."""
    reader = Reader(classify, scoring=scoring)
    results = []
    for kind_index, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, kind_index])
        exact = digits = right = alone = wrong_length = by_classifier = by_segmentation = most = naive = 0
        seconds = 0.0
        for _ in range(per_kind):
            number = compose(images, labels, kind, rng, lengths=lengths)
            gray = decode(number.png, MAX_PIXELS)
            started = time.perf_counter()
            reading = await reader.read(gray)
            seconds += time.perf_counter() - started
            read_alone = number.text
            if explain:
                _, probabilities = await classify(np.stack([mnist_recipe(np.pad(g, 4)) for g in number.glyphs]))
                read_alone = "".join(str(int(d)) for d in probabilities.argmax(axis=1))
                naive += await _naive(gray, classify) == number.text
            exact += reading.text == number.text
            digits += len(number.text)
            right += digit_matches(reading, number.text)
            alone += sum(a == b for a, b in zip(read_alone, number.text, strict=True))
            wrong_length += len(reading.text) != len(number.text)
            if reading.text != number.text:
                by_classifier += read_alone != number.text
                by_segmentation += read_alone == number.text
            most = max(most, reading.candidates)
        results.append(KindResult(kind, per_kind, exact, digits, right, alone, wrong_length, by_classifier,
                                  by_segmentation, most, seconds, naive))
    return results


async def _naive(gray: np.ndarray, classify: Classify) -> str:
    """The baseline: the same components (specks dropped), each read whole as one digit."""
    found = segment.segment(gray)
    whole = [c for c in found.candidates if any((c.start, c.end) == (a, b) for a, b, _ in found.drops)]
    if not whole:
        return ""
    _, probabilities = await classify(np.stack([mnist_recipe(c.crop) for c in whole]))
    return "".join(str(int(d)) for d in probabilities.argmax(axis=1))


def report(results: Sequence[KindResult]) -> str:
    """A Markdown table of the results."""
    lines = ["| kind | numbers | exact match | 95% interval | naive components | digits right | digits right alone "
             "| wrong: classifier | wrong: segmentation | wrong length | most candidates | ms per number |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        low, high = wilson(r.exact, r.numbers)
        share = 100 / max(1, r.digits)
        lines.append(f"| {r.kind} | {r.numbers} | {100 * r.exact_rate:.1f}% | {100 * low:.1f}-{100 * high:.1f}% | "
                     f"{100 * r.naive_exact / max(1, r.numbers):.1f}% | "
                     f"{share * r.digits_right:.1f}% | {share * r.digits_alone:.1f}% | "
                     f"{r.classifier_errors} | {r.segmentation_errors} | {r.wrong_length} | {r.candidates_max} | "
                     f"{1000 * r.seconds / max(1, r.numbers):.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.perf.reading.numbers``: measure the Reader on composed numbers."""
    parser = argparse.ArgumentParser(prog="python -m service.perf.reading.numbers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="IDX folder of digits the model never trained on (t10k-* preferred)")
    parser.add_argument("--model", type=Path, default=Path("models/lenet5.onnx"), help="ONNX model")
    parser.add_argument("--per-kind", type=int, default=400, help="numbers composed of each kind")
    parser.add_argument("--min-length", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = parser.parse_args(argv)
    images, labels = idx.load_digits(args.data_dir)
    if labels is None:
        parser.error(f"{args.data_dir} has no labels")
    classify = onnx_classifier(args.model)
    started = time.perf_counter()
    results = asyncio.run(measure(images, labels, classify, args.per_kind, args.seed,
                                  (args.min_length, args.max_length)))
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"results": [asdict(r) for r in results], "seconds": round(seconds, 1)}))
    else:
        print(report(results))
        print(f"\n{len(images)} digits from {args.data_dir}, lengths {args.min_length}-{args.max_length}, "
              f"seed {args.seed}, {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
