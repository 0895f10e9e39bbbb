"""Digits with a sliver of a neighbour's ink, the way the Reader's crops of touching digits show them.

Where two written digits touch or overlap, no cut gives each its own ink: the crop of one digit keeps
a sliver of its neighbour's stroke, and loses a little of its own edge to the neighbour's crop
(`service.recognition.reading.segment`). Training on such crops (the label stays the middle digit's)
teaches the model to read a digit through that sliver. Each render puts a real training digit next to
another one (right, left or both sides), overlapping by 0 to 4 pixels of 28, cuts straight down
somewhere in the overlap, and brings the middle piece through the server's own MNIST recipe.

Every render has its own random stream, ``default_rng([NEIGHBOUR_SEED + variant, index])``, and its
neighbours come from the same training digits, so a run repeats exactly.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from service.recognition.preprocess import mnist_recipe

NEIGHBOUR_SEED = 3000
MAX_OVERLAP = 4  # pixels of a 28-pixel digit: about a pen width


def _ink_columns(image: np.ndarray) -> tuple[int, int]:
    columns = np.flatnonzero(image.max(axis=0) > 64)
    return int(columns[0]), int(columns[-1])


def _scaled(digit: np.ndarray, scale: float) -> np.ndarray:
    side = max(8, round(28 * scale))
    return np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR))


def with_neighbours(digit: np.ndarray, neighbours: list[np.ndarray], sides: list[int],
                    rng: np.random.Generator) -> np.ndarray:
    """uint8 [28, 28] (MNIST convention): `digit` with each neighbour touching it on its side (+1 right,
    -1 left), cut straight down in the overlap and brought through the MNIST recipe."""
    canvas = np.zeros((56, 112), np.uint8)
    top, left = 14, 42
    canvas[top:top + 28, left:left + 28] = digit
    first, last = _ink_columns(digit)
    keep_from, keep_to = 0, canvas.shape[1]
    for neighbour, side in zip(neighbours, sides, strict=True):
        glyph = _scaled(neighbour, float(rng.uniform(0.85, 1.15)))
        n_first, n_last = _ink_columns(glyph)
        overlap = int(rng.integers(0, MAX_OVERLAP + 1))
        y = top + (28 - glyph.shape[0]) // 2 + int(rng.integers(-3, 4))
        if side > 0:  # its first ink column lands `overlap` pixels inside the digit's last one
            x = left + last - overlap + 1 - n_first
            cut = int(rng.integers(left + last - overlap, left + last + 2))  # the crop ends before `cut`
            keep_to = min(keep_to, max(cut, left + first + 4))
        else:
            x = left + first + overlap - 1 - n_last
            cut = int(rng.integers(left + first - 1, left + first + overlap + 1))
            keep_from = max(keep_from, min(cut, left + last - 4))
        y, x = max(0, min(y, canvas.shape[0] - glyph.shape[0])), max(0, min(x, canvas.shape[1] - glyph.shape[1]))
        region = canvas[y:y + glyph.shape[0], x:x + glyph.shape[1]]
        np.maximum(region, glyph, out=region)
    piece = canvas.copy()
    piece[:, :keep_from] = 0
    piece[:, keep_to:] = 0
    return mnist_recipe(piece)


def neighbour_renders(images: np.ndarray, variant: int, indices: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28]: every digit of `images` with neighbours drawn from `images` (a third of them
    on both sides), reproducibly per digit index."""
    out = np.empty_like(images)
    for row, number in enumerate(indices):
        rng = np.random.default_rng([NEIGHBOUR_SEED + variant, int(number)])
        both = rng.random() < 1 / 3
        sides = [1, -1] if both else [int(rng.choice([1, -1]))]
        picks = rng.integers(0, len(images), len(sides))
        out[row] = with_neighbours(images[row], [images[p] for p in picks], sides, rng)
    return out
