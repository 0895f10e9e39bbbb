"""Is there any ink? The no-ink test that runs on the pixels before the model does.

A blank canvas, white, grey or black paper, faint sensor noise or a speck of dust holds nothing to read,
and the MNIST recipe would blow the little it finds up into a 20x20 blob that the model calls a digit.
So such images are rejected as ``no_ink`` and never run through the model as digits.

An image holds ink when both hold:
- its strongest ink is at least MIN_CONTRAST grey levels from the paper (fainter is paper texture, a
  shadow or noise);
- the largest connected stroke (pixels at least half as dark as the strongest ink, 8-connected) spans
  at least MIN_INK_SIDE pixels, and at least MIN_INK_FRACTION of the image's longer side. A speck, and
  scattered noise, never form such a stroke; the thinnest digit stroke does.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage

MIN_CONTRAST = 48  # of 255
MIN_INK_SIDE = 4  # pixels
MIN_INK_FRACTION = 0.02  # of the image's longer side
# Longest straight run the fast path looks for (images up to 400 pixels on their longer side); larger
# images are labelled.
FAST_RUN_MAX = 8

# 8-connectivity within each image of a stack, never across images.
_STACK_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STACK_STRUCTURE[1] = True


def inked(ink: np.ndarray) -> np.ndarray:
    """For a stack [n, H, W] of ink maps (ink bright, paper at 0; uint8 0..255, int16, or float32 in
    0..1), whether each image holds ink (bool [n])."""
    n, height, width = ink.shape
    if n == 0:
        return np.zeros(0, dtype=bool)
    if n == 1:  # one image (most requests): the same test with Python scalars, a third of the numpy calls
        return np.array([_one_inked(ink[0])])
    if ink.dtype.kind == "f":
        # pixel/255; anything outside 0..1 (an already-normalized tensor's extremes) is paper or full ink.
        # The clipped image's peak is the clipped peak, and against a half peak in (0, 0.5] the unclipped
        # pixels compare as the clipped ones would: no clipped copy of the image is needed.
        peak = np.clip(ink.reshape(n, -1).max(axis=1), 0.0, 1.0).astype(np.float64)
        result = peak * 255 >= MIN_CONTRAST
        half = (peak / 2).astype(ink.dtype)
    else:
        peak = ink.reshape(n, -1).max(axis=1).astype(np.int64)
        result = peak >= MIN_CONTRAST
        half = ((peak + 1) // 2).astype(ink.dtype)  # integer compare: no float copy of a big image
    if not result.any():
        return result
    candidates = np.flatnonzero(result)
    # The strokes' cores: at least half as dark as the image's strongest ink.
    stack = ink if len(candidates) == n else ink[candidates]
    strong = stack >= half[candidates][:, None, None]
    need = max(MIN_INK_SIDE, MIN_INK_FRACTION * max(height, width))
    # The fast, exact answer for nearly every real image: a straight run of `need` strong pixels in a
    # row or a column lies within one stroke, which therefore spans at least `need`. Only images
    # without such a run are labelled.
    run = _straight_run(strong, math.ceil(need))
    if run.all():
        return result
    if run.any():
        unsure = ~run
        result[candidates[unsure]] = _labelled(strong[unsure], need)
        return result
    result[candidates] = _labelled(strong, need)
    return result


def _one_inked(image: np.ndarray) -> bool:
    """`inked` of one [H, W] image, computed exactly as for a stack."""
    if image.dtype.kind == "f":
        peak = min(max(float(image.max()), 0.0), 1.0)
        if not peak * 255 >= MIN_CONTRAST:
            return False
        half = image.dtype.type(peak / 2)
    else:
        peak = int(image.max())
        if not peak >= MIN_CONTRAST:
            return False
        half = image.dtype.type((peak + 1) // 2)
    strong = image >= half
    height, width = image.shape
    need = max(MIN_INK_SIDE, MIN_INK_FRACTION * max(height, width))
    if _straight_run(strong[None], math.ceil(need))[0]:
        return True
    return bool(_labelled(strong[None], need)[0])


def _straight_run(strong: np.ndarray, length: int) -> np.ndarray:
    """Per image of a stack [n, H, W]: holds it `length` consecutive True pixels in a row or a column."""
    if length > FAST_RUN_MAX:
        return np.zeros(len(strong), dtype=bool)
    found = _run_along(strong, length, 2)
    if not found.all():
        rest = np.flatnonzero(~found)
        found[rest] = _run_along(strong[rest], length, 1)
    return found


def _run_along(strong: np.ndarray, length: int, axis: int) -> np.ndarray:
    """`length` consecutive True pixels along rows (axis 2) or columns (axis 1), per image. The
    images are flattened and shifted copies ANDed (contiguous memory, unlike row slices); along rows,
    windows that would wrap into the next row are masked out."""
    n, height, width = strong.shape
    size = strong.shape[axis]
    if size < length:
        return np.zeros(n, dtype=bool)
    flat = strong.reshape(n, height * width)
    step = 1 if axis == 2 else width
    span = height * width - (length - 1) * step
    window = flat[:, 0:span] & flat[:, step:span + step]
    for k in range(2, length):
        window &= flat[:, k * step:span + k * step]
    if axis == 2:
        window &= _row_windows(height, width, length)[:span]
    return window.any(axis=1)


@functools.cache
def _row_windows(height: int, width: int, length: int) -> np.ndarray:
    """Flat positions where a run of `length` along a row stays within the row."""
    return np.tile(np.arange(width) <= width - length, height)


def _labelled(strong: np.ndarray, need: float) -> np.ndarray:
    """Per image of a stack of stroke cores: does its largest 8-connected stroke span `need` pixels."""
    result = np.zeros(len(strong), dtype=bool)
    labels, count = ndimage.label(strong, structure=_STACK_STRUCTURE)
    if count == 0:
        return result
    extent = np.zeros(len(strong), dtype=np.int64)
    for slices in ndimage.find_objects(labels):
        if slices is None:
            continue
        image = slices[0].start
        side = max(slices[1].stop - slices[1].start, slices[2].stop - slices[2].start)
        extent[image] = max(extent[image], side)
    return extent >= need


def has_ink(ink: np.ndarray) -> bool:
    """`inked` for one [H, W] ink map."""
    return bool(inked(ink[None])[0])
