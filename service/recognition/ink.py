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

import numpy as np
from scipy import ndimage

MIN_CONTRAST = 48  # of 255
MIN_INK_SIDE = 4  # pixels
MIN_INK_FRACTION = 0.02  # of the image's longer side

# 8-connectivity within each image of a stack, never across images.
_STACK_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STACK_STRUCTURE[1] = True


def inked(ink: np.ndarray) -> np.ndarray:
    """For a stack [n, H, W] of ink maps (ink bright, paper at 0; uint8 0..255, int16, or float32 in
    0..1), whether each image holds ink (bool [n])."""
    n, height, width = ink.shape
    if n == 0:
        return np.zeros(0, dtype=bool)
    if ink.dtype.kind == "f":
        # pixel/255; anything outside 0..1 (an already-normalized tensor's extremes) is paper or full ink.
        ink = np.clip(ink, 0.0, 1.0)
        peak = ink.reshape(n, -1).max(axis=1).astype(np.float64)
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
    strong = ink[candidates] >= half[candidates][:, None, None]
    labels, count = ndimage.label(strong, structure=_STACK_STRUCTURE)
    if count == 0:
        result[:] = False
        return result
    extent = np.zeros(len(candidates), dtype=np.int64)
    for slices in ndimage.find_objects(labels):
        if slices is None:
            continue
        image = slices[0].start
        side = max(slices[1].stop - slices[1].start, slices[2].stop - slices[2].start)
        extent[image] = max(extent[image], side)
    need = max(MIN_INK_SIDE, MIN_INK_FRACTION * max(height, width))
    result[candidates] = extent >= need
    return result


def has_ink(ink: np.ndarray) -> bool:
    """`inked` for one [H, W] ink map."""
    return bool(inked(ink[None])[0])
