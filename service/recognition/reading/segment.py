"""Split one line of handwritten digits into candidate digits, for the Reader to choose from.

It over-segments and lets the classifier choose (`service.recognition.reading.reader`); it never decides
alone whether some ink is one digit or two. In order (docs/reading.md has the figures):

1. Ink against the paper's own level; 8-connected components at the image's resolution; the line
   height L (median height of the large components); specks (under SPECK_SIZE * L both ways) dropped.
2. Working scale: the kept ink resized so that L is WORK_HEIGHT pixels; all later work costs what the
   line's length costs, whatever the photo's resolution.
3. Cuts (`cuts`): in a component wide enough for two digits, the least-ink paths from top to bottom
   at a few slants, and drop-fall paths around the strokes; a cut costs the ink it crosses in stroke
   widths (about 1 where two digits touch, 2 or more through a 0).
4. The graph: nodes where a digit may start (each component's start, each cut, in reading order);
   a candidate runs from one node to a later one, through at most MAX_GROUP components, so the
   pieces of one digit (a 4 in two strokes, a 5 with a detached bar) are joined again. Each comes
   with its crop (its own ink only) and its box in the pixels of the image as sent.

Bounds per image: MAX_WORK_PIXELS working pixels, MAX_COMPONENTS components (the largest), MAX_CUTS
cuts (the cheapest) and MAX_CANDIDATES candidate crops (past that, the costliest cuts are given up).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from service.recognition.ink import MIN_CONTRAST
from service.recognition.preprocess import INK_THRESHOLD
from service.recognition.reading.cuts import FAINT_REACH, Cut, candidate_cuts, cross

WORK_HEIGHT = 48  # line height in working pixels: plenty for a 20x20 MNIST crop and for placing cuts
MAX_UPSCALE = 4.0  # tiny digits are enlarged at most this much
MAX_WORK_PIXELS = 2_000_000  # the working image is never larger (a 20,000 x 60 strip is 1.2 million)
SPECK_SIZE = 0.2  # of L: components smaller both ways are specks
MAX_GROUP = 4  # most components in one candidate digit
MAX_DIGIT_WIDTH = 1.8  # of L (a wide 2 or 5, slanted)
MIN_DIGIT_HEIGHT = 0.45  # of L
MAX_INNER_GAP = 0.2  # of L: parts of one digit are never further apart than this
MAX_COMPONENTS = 64  # per image, the largest: 20 digits in up to three pieces each
MAX_CUTS = 64  # per image, the cheapest: 20 touching digits need 19
MAX_CANDIDATES = 384  # per image: the most crops one image sends to the classifier (256 until 2026-12-04)
PAGE_SIDE = 64  # the paper's level is estimated on a copy about this many pixels on its short side
PAD = 2  # background pixels around every crop, so that mnist_recipe sees its polarity on the border

EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Box:
    """A rectangle in the pixels of the image as sent: left, top, width and height."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class Candidate:
    """The ink from node `start` to node `end` of the segmentation graph, taken as one digit."""

    start: int
    end: int
    crop: np.ndarray  # uint8, bright ink on black: this candidate's ink only, with PAD pixels around
    box: Box
    width: float  # of the line height
    height: float  # of the line height


@dataclass(frozen=True)
class Segmentation:
    """The segmentation graph of one line: nodes 0 (the line's start) to nodes - 1 (its end)."""

    nodes: int
    candidates: tuple[Candidate, ...]
    # Per node, what starting a digit there says: the stroke widths its cut crosses, and the width (of L)
    # of the component it cuts (both 0 at a component's start).
    cut_strokes: tuple[float, ...]
    cut_widths: tuple[float, ...]
    # Per component: (its first node, the next component's first node, its height of L): dropping it.
    drops: tuple[tuple[int, int, float], ...]
    line_height: float  # image pixels


NOTHING = Segmentation(1, (), (0.0,), (0.0,), (), 0.0)


def ink_of(gray: np.ndarray) -> tuple[np.ndarray, int]:
    """(ink, peak): int16 ink (0 = background) of a grayscale image of either polarity, and its
    brightest value. The polarity comes from the border, as in `preprocess.mnist_recipe`; the
    background level is the page's own at every pixel, so that a photo lit unevenly (a meter under a
    lamp, a page darker on one side) does not turn its darker paper into ink."""
    border = np.concatenate((gray[0], gray[-1], gray[:, 0], gray[:, -1]))
    dark_ink = int(np.median(border)) > 127
    ink = _page(gray, dark_ink) - gray.astype(np.int16)
    if not dark_ink:
        ink = -ink
    np.clip(ink, 0, None, out=ink)
    return ink, int(ink.max())


def _page(gray: np.ndarray, dark_ink: bool) -> np.ndarray:
    """The paper's level at every pixel (int16): the image with its strokes closed over (a grey
    closing for dark ink, an opening for light ink) by a window of a quarter of its short side,
    many stroke widths for one line of digits; on a small copy, for speed, then smoothed."""
    step = max(1, min(gray.shape) // PAGE_SIDE)
    small = gray[::step, ::step]
    size = max(3, min(small.shape) // 4)
    level = ndimage.grey_closing(small, size=size) if dark_ink else ndimage.grey_opening(small, size=size)
    level = ndimage.uniform_filter(level, size=size)
    if step > 1 or level.shape != gray.shape:
        level = np.asarray(Image.fromarray(level).resize(gray.shape[::-1], Image.Resampling.BILINEAR))
    return level.astype(np.int16)


def segment(gray: np.ndarray) -> Segmentation:
    """Segment a [H, W] uint8 grayscale image holding one line of digits (any polarity and size)."""
    ink, peak = ink_of(gray)
    if peak < MIN_CONTRAST:
        return NOTHING
    labels, count = ndimage.label(ink > peak * INK_THRESHOLD, structure=EIGHT)
    objects = ndimage.find_objects(labels)
    sizes = np.array([(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in objects], dtype=np.int64)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    line = float(np.median(sizes[areas >= 0.1 * areas.max(), 0]))
    kept = np.flatnonzero(sizes.max(axis=1) >= SPECK_SIZE * line)
    if not kept.size:
        return NOTHING
    # The kept components' ink, specks erased, cropped to their union and brought to working scale.
    top, bottom = min(objects[i][0].start for i in kept), max(objects[i][0].stop for i in kept)
    left, right = min(objects[i][1].start for i in kept), max(objects[i][1].stop for i in kept)
    keep = np.zeros(count + 1, dtype=bool)
    keep[0] = True  # faint pixels stay: they shade the digits' edges, as in MNIST
    keep[kept + 1] = True
    region = np.where(keep[labels[top:bottom, left:right]], ink[top:bottom, left:right], 0)
    # Working scale, and never more working pixels than MAX_WORK_PIXELS whatever is drawn.
    scale = min(MAX_UPSCALE, WORK_HEIGHT / line, np.sqrt(MAX_WORK_PIXELS / region.size))
    work, scale_x, scale_y = _to_working(region, peak, scale, _stroke_width(region > peak * INK_THRESHOLD))
    return _segment_working(work, line, (left, top), (scale_x, scale_y), gray.shape)


def _stroke_width(mask: np.ndarray) -> float:
    """About the pen's width, whatever the strokes' direction: a stroke of width t and length l has
    area t * l and 2 * l pixels on its outline."""
    outline = int((mask & ~ndimage.binary_erosion(mask, structure=EIGHT)).sum())
    return 2.0 * float(mask.sum()) / max(1, outline)


def _to_working(region: np.ndarray, peak: int, scale: float, stroke: float) -> tuple[np.ndarray, float, float]:
    """Ink 0..255 at working scale, and the exact scale factors used (x, y)."""
    height, width = region.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray((region * (255.0 / peak)).astype(np.uint8))
    if size != (width, height):
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        image = image.resize(size, resample=resample)
    work = np.asarray(image, dtype=np.float32)
    # A pen thinner than a working pixel is averaged into grey: bring it back to full ink.
    thinning = min(1.0, stroke * scale)
    if thinning < 1.0:
        work = np.minimum(255.0, work / thinning)
    return work, size[0] / width, size[1] / height


@dataclass
class _Component:
    """One component at working scale, and its candidate cuts."""

    box: tuple[slice, slice]
    own: np.ndarray  # bool in `box`: its pixels, faint edges included
    inked: np.ndarray  # bool in `box`: its pixels above the ink threshold
    cuts: list[Cut]  # ordered by their column in the middle row; change them with `keep`
    # side(a, b) for the cuts as they are: the slices and the crops ask for the same ones many times.
    _sides: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def keep(self, cuts: list[Cut]) -> None:
        """Give up every cut but `cuts` (positions renumber, so the sides are found again)."""
        self.cuts = cuts
        self._sides.clear()

    def side(self, a: int, b: int) -> np.ndarray:
        """Its pixels between position a and position b (0: its left side, 1..k: cuts, k+1: its right side)."""
        found = self._sides.get((a, b))
        if found is None:
            columns = np.arange(self.own.shape[1])[None, :]
            found = self.own
            if a > 0:
                found = found & (columns >= self.cuts[a - 1][1][:, None])
            if b <= len(self.cuts):
                found = found & (columns < self.cuts[b - 1][1][:, None])
            self._sides[a, b] = found
        return found


Span = tuple[int, int, int, int]  # top, bottom, left, right (exclusive) in working pixels
Part = tuple[int, int, int]  # (component, from position, to position)


def _segment_working(work: np.ndarray, line: float, origin: tuple[int, int], scale: tuple[float, float],
                     shape: tuple[int, ...]) -> Segmentation:
    """Steps 3-4 on the working-scale ink `work` (float 0..255)."""
    line_w = line * scale[1]
    mask = work > 255 * INK_THRESHOLD
    labels, count = ndimage.label(mask, structure=EIGHT)
    objects = ndimage.find_objects(labels)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    big = [i for i, s in enumerate(objects)
           if max(s[0].stop - s[0].start, s[1].stop - s[1].start) >= SPECK_SIZE * line_w]
    big = sorted(big, key=lambda i: -int(areas[i + 1]))[:MAX_COMPONENTS]
    if not big:
        return NOTHING
    big.sort(key=lambda i: objects[i][1].start + objects[i][1].stop)  # reading order: by centre
    lut = np.zeros(count + 1, dtype=np.int32)
    lut[np.array(big) + 1] = np.arange(1, len(big) + 1)
    labels = lut[labels]
    # Every faint pixel near a component belongs to the nearest one.
    distance, (near_y, near_x) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    owner = np.where((distance <= FAINT_REACH) & (work > 0), labels[near_y, near_x], 0)
    stroke = max(1.0, _stroke_width(labels > 0))
    components = []
    for number, i in enumerate(big, start=1):
        rows, cols = objects[i]
        box = (slice(max(0, rows.start - FAINT_REACH), min(work.shape[0], rows.stop + FAINT_REACH)),
               slice(max(0, cols.start - FAINT_REACH), min(work.shape[1], cols.stop + FAINT_REACH)))
        own = owner[box] == number
        cuts = candidate_cuts(np.where(own, work[box], 0.0) / (255.0 * stroke), line_w, own & mask[box])
        components.append(_Component(box, own, own & mask[box], sorted(cuts, key=lambda c: int(c[1][len(c[1]) // 2]))))
    ranked = sorted((cut[0], n, k) for n, c in enumerate(components) for k, cut in enumerate(c.cuts))
    kept = {(n, k) for _, n, k in ranked[:MAX_CUTS]}  # the cheapest MAX_CUTS of the image
    for n, c in enumerate(components):
        c.keep([cut for k, cut in enumerate(c.cuts) if (n, k) in kept])
    while True:
        slices = [_slices(c, line_w) for c in components]
        found = _enumerate(components, slices, line_w)
        costs = sorted((cut[0] for c in components for cut in c.cuts), reverse=True)
        if len(found) <= MAX_CANDIDATES or not costs:
            break
        # Too many: give up the costliest quarter of the cuts and count again.
        limit = costs[max(0, len(costs) // 4 - 1)] if len(costs) >= 4 else costs[0]
        for c in components:
            c.keep([cut for cut in c.cuts if cut[0] < limit])
    found = found[:MAX_CANDIDATES]  # with no cut left, only too many components can get here
    return _graph(work, components, found, line_w, line, origin, scale, shape)


def _nodes(components: list[_Component]) -> list[int]:
    """The node of each component's start; one more, at the end, for the line's end."""
    starts = [0]
    for c in components:
        starts.append(starts[-1] + 1 + len(c.cuts))
    return starts


def _slices(component: _Component, line: float) -> dict[tuple[int, int], Span]:
    """The span of the ink between every two positions a < b of a component whose cuts do not cross,
    up to MAX_DIGIT_WIDTH wide."""
    top, left = component.box[0].start, component.box[1].start
    last = len(component.cuts) + 1
    found = {}
    for a in range(last):
        for b in range(a + 1, last + 1):
            if a > 0 and b < last and cross(component.cuts[a - 1][1], component.cuts[b - 1][1]):
                continue
            inked = component.side(a, b) & component.inked
            rows, cols = np.flatnonzero(inked.any(axis=1)), np.flatnonzero(inked.any(axis=0))
            if not rows.size:
                continue
            if cols[-1] + 1 - cols[0] > MAX_DIGIT_WIDTH * line:
                break
            found[a, b] = (top + int(rows[0]), top + int(rows[-1]) + 1, left + int(cols[0]), left + int(cols[-1]) + 1)
    return found


def _enumerate(components: list[_Component], slices: list[dict[tuple[int, int], Span]],
               line: float) -> list[tuple[int, int, list[Part], Span]]:
    """Every candidate: (start node, end node, its parts, its span)."""
    starts = _nodes(components)
    found = []

    def offer(start: int, parts: list[Part]) -> bool:
        """Add the candidate made of `parts` if it could be a digit; False once it is too wide."""
        spans = [slices[c][a, b] for c, a, b in parts]
        span = (min(s[0] for s in spans), max(s[1] for s in spans), min(s[2] for s in spans), max(s[3] for s in spans))
        if span[3] - span[2] > MAX_DIGIT_WIDTH * line:
            return False
        if span[1] - span[0] >= MIN_DIGIT_HEIGHT * line and _widest_gap(spans) <= MAX_INNER_GAP * line:
            c, _, b = parts[-1]
            found.append((start, starts[c] + b, list(parts), span))
        return True

    for first, component in enumerate(components):
        last = len(component.cuts) + 1
        for a in range(last):
            start = starts[first] + a
            for b in range(a + 1, last + 1):
                if (a, b) in slices[first]:
                    offer(start, [(first, a, b)])
            if (a, last) not in slices[first]:
                continue
            parts: list[Part] = [(first, a, last)]
            for other in range(first + 1, min(len(components), first + MAX_GROUP)):
                end = len(components[other].cuts) + 1
                fits = [offer(start, [*parts, (other, 0, b)]) for b in range(1, end + 1) if (0, b) in slices[other]]
                if not any(fits) or (0, end) not in slices[other]:
                    break  # wider than a digit from here on
                parts.append((other, 0, end))
    return found


def _widest_gap(spans: list[Span]) -> int:
    """The widest stretch of columns with none of the spans in it, between the first and the last."""
    ordered = sorted(spans, key=lambda s: s[2])
    reach, widest = ordered[0][3], 0
    for span in ordered[1:]:
        widest = max(widest, span[2] - reach)
        reach = max(reach, span[3])
    return widest


def _graph(work: np.ndarray, components: list[_Component], found: list[tuple[int, int, list[Part], Span]],
           line_w: float, line: float, origin: tuple[int, int], scale: tuple[float, float],
           shape: tuple[int, ...]) -> Segmentation:
    """The Segmentation: every candidate's crop and box, and what each node and drop costs."""
    starts = _nodes(components)
    strokes = [0.0] * (starts[-1] + 1)
    widths = [0.0] * (starts[-1] + 1)
    for number, component in enumerate(components):
        for k, (cost, _) in enumerate(component.cuts, start=1):
            strokes[starts[number] + k] = cost
            widths[starts[number] + k] = float(component.inked.any(axis=0).sum()) / line_w
    candidates = []
    pixels: dict[Part, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # parts recur in many candidates
    for start, end, parts, span in found:
        top, bottom = max(0, span[0] - FAINT_REACH), min(work.shape[0], span[1] + FAINT_REACH)
        left, right = max(0, span[2] - FAINT_REACH), min(work.shape[1], span[3] + FAINT_REACH)
        height, width = bottom - top, right - left
        crop = np.zeros((height + 2 * PAD, width + 2 * PAD), dtype=np.uint8)  # PAD background pixels around
        for part in parts:
            if part not in pixels:
                box = components[part[0]].box
                side = components[part[0]].side(part[1], part[2])
                ys, xs = np.nonzero(side)
                pixels[part] = ys + box[0].start, xs + box[1].start, work[box][side].astype(np.uint8)
            ys, xs, values = pixels[part]
            ys, xs = ys - top, xs - left
            # Faint ink of this part beyond its inked span, next to a neighbour's ink, stays out.
            inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
            crop[ys[inside] + PAD, xs[inside] + PAD] = values[inside]
        candidates.append(Candidate(start, end, crop, _box(span, origin, scale, shape),
                                    (span[3] - span[2]) / line_w, (span[1] - span[0]) / line_w))
    drops = tuple((starts[n], starts[n + 1], float(c.inked.any(axis=1).sum()) / line_w)
                  for n, c in enumerate(components))
    return Segmentation(starts[-1] + 1, tuple(candidates), tuple(strokes), tuple(widths), drops, line)


def _box(span: Span, origin: tuple[int, int], scale: tuple[float, float], shape: tuple[int, ...]) -> Box:
    """A working-scale span in the pixels of the image as sent."""
    top, bottom, left, right = span
    x0 = int(np.floor(origin[0] + left / scale[0]))
    y0 = int(np.floor(origin[1] + top / scale[1]))
    x1 = min(shape[1], int(np.ceil(origin[0] + right / scale[0])))
    y1 = min(shape[0], int(np.ceil(origin[1] + bottom / scale[1])))
    return Box(x0, y0, x1 - x0, y1 - y0)
