"""Is the ink drawn in strokes? A test on the recipe's 28x28 pixels that the model's scores cannot make.

A handwritten digit is pen strokes: in the MNIST recipe's 20x20 box a stroke is 2-5 pixels wide and its
core is the strongest ink. Two kinds of picture that the model can read as a confident 1 or 8 are not
made of strokes, and this test rejects them as ``not_a_digit``:
- a filled shape (the silhouette of a dress, a shirt, a bag): much of its ink lies 3 or more pixels
  from the paper (`filled`, the share of ink pixels whose whole 5x5 neighbourhood is ink);
- a picture with grey inside it (a photo, a shaded object): ink surrounded by ink that is nonetheless
  fainter than half the strongest ink (`grey_inside`, the share of such pixels among the ink pixels
  whose whole 3x3 neighbourhood is ink).

Ink is any pixel at least INK_LEVEL of the image's strongest one, so that the faint fill of a
photographed object counts as its ink. The two thresholds are chosen by training on real digits only
(as a share of them to give up) and travel in the model's metadata (`Rejection.strokes`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

INK_LEVEL = 0.1  # of the image's strongest ink
GREY_BELOW = 0.5  # of the image's strongest ink: fainter ink inside a shape is grey
FILLED = "filled_above"
GREY_INSIDE = "grey_inside_above"
KEYS = (FILLED, GREY_INSIDE)


def features(pixels: np.ndarray, paper: float = 0.0) -> np.ndarray:
    """[n, 2] float64: per image `filled` and `grey_inside` (columns in KEYS order, each a share in
    0..1) of a stack [n, H, W] of MNIST-convention pixels, ink bright: uint8 0..255, float32 0..1, or
    the model's normalized input with `paper` the value of blank paper in it (only the order of values
    and their distance above the paper matter). Images without ink, and images wider than 32 pixels,
    give 0.

    Each row of a mask is packed into one 32-bit word, so that the erosions are a few integer
    operations per row: a batch of 256 costs a few times what one image does.
    """
    n, height, width = pixels.shape
    if not n or width > 32:
        return np.zeros((n, len(KEYS)))
    above = pixels.reshape(n, -1).max(axis=1).astype(np.float32) - np.float32(paper)  # the strongest ink
    ink_from = above * np.float32(INK_LEVEL) + np.float32(paper)
    grey_below = above * np.float32(GREY_BELOW) + np.float32(paper)
    if pixels.dtype == np.uint8:  # p >= t and p < t, for whole p, are p >= ceil(t) and p < ceil(t)
        ink_from, grey_below = (np.ceil(t).astype(np.uint8) for t in (ink_from, grey_below))
    masks = np.zeros((2, n, height, 32), dtype=bool)  # rows padded to 32 columns, then packed
    # Compared into contiguous masks, then copied in: comparing straight into the padded rows is slower.
    masks[0, :, :, :width] = pixels >= ink_from[:, None, None]
    masks[1, :, :, :width] = pixels < grey_below[:, None, None]
    ink, grey = np.packbits(masks.reshape(2, n, -1), axis=2, bitorder="little").view("<u4")
    ink[above <= 0] = 0
    core3 = _core(ink)  # rows 1..H-2: a pixel on the image's edge is never a core (outside is paper)
    core5 = _core(core3)  # the 3x3 core of the 3x3 core: pixels whose 5x5 neighbourhood is ink
    grey_core = grey[:, 1:-1] & core3
    ink_count, core_count = _count(ink), _count(core3)
    return np.stack((_count(core5) / np.maximum(ink_count, 1), _count(grey_core) / np.maximum(core_count, 1)),
                    axis=1)


def _core(rows: np.ndarray) -> np.ndarray:
    """Of packed masks [n, H] (bits beyond the image's width clear), the pixels whose whole 3x3
    neighbourhood is set, as [n, H-2] for rows 1..H-2: a binary erosion, outside the image paper."""
    across = rows & (rows << np.uint32(1))
    across &= rows >> np.uint32(1)
    core = across[:, :-2] & across[:, 1:-1]
    core &= across[:, 2:]
    return core


def _count(rows: np.ndarray) -> np.ndarray:
    """Set pixels per image of packed masks [n, H]."""
    return np.bitwise_count(rows).sum(axis=1, dtype=np.int64)


def unlike_strokes(measured: np.ndarray, thresholds: Mapping[str, float]) -> np.ndarray:
    """Per row of `features` output [n, 2]: a filled shape or a picture with grey inside (bool [n]),
    by `thresholds` ({FILLED: share, GREY_INSIDE: share}; a missing key is not tested)."""
    result = np.zeros(len(measured), dtype=bool)
    for column, key in enumerate(KEYS):
        if key in thresholds:
            result |= measured[:, column] > thresholds[key]
    return result


def choose(measured: np.ndarray, budget: float) -> dict[str, float]:
    """Thresholds that reject about `budget` (a share, e.g. 0.002) of real digits, from their
    `features` [n, 2]: each feature gets half of it, cut at its (1 - budget/2) quantile."""
    return {key: float(np.quantile(measured[:, column], 1.0 - budget / 2)) for column, key in enumerate(KEYS)}
