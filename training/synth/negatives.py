"""Synthetic non-digits for outlier exposure (Hendrycks et al. 2019) and for measuring rejection.

Every negative is drawn as a client would send it (dark ink on a light page, any size, PNG/JPEG/BMP)
and brought through the server's own recipe (`clientstyle.page_to_pixels`), except `textures`, which
are raw 28x28 arrays (raw 28x28 pixels reach the model as they are).

Three families, never mixed:
- TRAIN_KINDS are trained on (with one seed) and used to choose the thresholds (with another seed);
- EVAL_KINDS are only measured: other fonts and other symbols (`glyphs`), words, doodles, photo-like
  noise and longer strings of digits, none of which training ever draws;
- SELECTION_KINDS choose between training recipes: symbols held out of training (glyphs.BROAD_HELD_OUT)
  in the training fonts, and letters and those symbols in fonts held out of training (Liberation), so
  that the measuring kinds stay untouched by the choice.

Nothing here may look like a single digit (see `glyphs` for the letters left out): strokes come in
twos to fours, shapes avoid rings, and whatever comes out as a lone bar (`stick_like`) is drawn again.
Pieces of digits were tried as a training kind and left out: a half cut across is too often a
whole digit (the top of an 8 is a 0, the bottom of a 3 a 3), and a corner, scaled up by the recipe,
is a thick bar or hook that reads as a 1 or a 7.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from training.synth.clientstyle import digit_page, page_to_pixels
from training.synth.glyphs import (
    GREEK,
    LETTERS,
    FontSet,
    eval_fonts,
    held_symbol_fonts,
    render_text,
    selection_fonts,
    training_fonts,
)

Page = Image.Image
NEGATIVES_TRAIN_SEED = 11
NEGATIVES_VAL_SEED = 12
"""Negatives of the training kinds that choose thresholds: same kinds, other images."""
NEGATIVES_EVAL_SEED = 13
"""Negatives of the measuring kinds (EVAL_KINDS): only ever measured."""
Maker = Callable[[np.random.Generator, np.ndarray | None], "Page | np.ndarray"]


@dataclass(frozen=True)
class Negatives:
    """uint8 [N, 28, 28] images as the model receives them, and the kind of each."""

    images: np.ndarray
    kinds: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def of_kind(self, kind: str) -> np.ndarray:
        """The images of one kind."""
        return self.images[self.kinds == kind]


def _canvas(rng: np.random.Generator) -> tuple[Page, ImageDraw.ImageDraw, int]:
    size = int(rng.integers(64, 257))
    page = Image.new("L", (size, size), 255)
    return page, ImageDraw.Draw(page), size


def _width(rng: np.random.Generator, size: int, low: float = 0.04, high: float = 0.12) -> int:
    return max(2, int(size * rng.uniform(low, high)))


def _bezier(rng: np.random.Generator, size: int, points: int = 24) -> list[tuple[float, float]]:
    control = rng.uniform(0.05, 0.95, size=(4, 2)) * size
    t = np.linspace(0, 1, points)[:, None]
    curve = ((1 - t) ** 3 * control[0] + 3 * (1 - t) ** 2 * t * control[1] + 3 * (1 - t) * t**2 * control[2]
             + t**3 * control[3])
    return [(float(x), float(y)) for x, y in curve]


# --- training kinds --------------------------------------------------------------------------------


def strokes(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """Two to four random pen strokes (cubic Bezier curves)."""
    page, draw, size = _canvas(rng)
    width = _width(rng, size)
    for _ in range(int(rng.integers(2, 5))):
        draw.line(_bezier(rng, size), fill=0, width=width, joint="curve")
    return page


def _polygon(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> list[tuple[float, float]]:
    corners = int(rng.integers(3, 9))
    angles = np.sort(rng.uniform(0, 2 * math.pi, corners))
    radii = radius * (rng.uniform(0.35, 1.0, corners) if rng.random() < 0.5 else np.ones(corners))
    if rng.random() < 0.3:  # a star: every other corner pulled in
        corners = 2 * int(rng.integers(4, 7))
        angles = np.linspace(0, 2 * math.pi, corners, endpoint=False) + rng.uniform(0, math.pi)
        radii = radius * np.where(np.arange(corners) % 2 == 0, 1.0, rng.uniform(0.3, 0.6))
    return [(float(centre[0] + r * math.cos(a)), float(centre[1] + r * math.sin(a))) for a, r in zip(angles, radii,
                                                                                                      strict=True)]


def shapes(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """One to three filled or outlined polygons, stars, rectangles, crosses or discs."""
    page, draw, size = _canvas(rng)
    for _ in range(int(rng.integers(1, 4))):
        centre = rng.uniform(0.25, 0.75, 2) * size
        radius = size * rng.uniform(0.15, 0.4)
        choice = rng.random()
        width = _width(rng, size)
        if choice < 0.45:
            polygon = _polygon(rng, size, centre, radius)
            if rng.random() < 0.6:
                draw.polygon(polygon, fill=0)
            else:
                draw.line([*polygon, polygon[0]], fill=0, width=width, joint="curve")
        elif choice < 0.65:
            box = [*(centre - radius * rng.uniform(0.5, 1, 2)), *(centre + radius * rng.uniform(0.5, 1, 2))]
            draw.rectangle([float(v) for v in box], fill=0)
        elif choice < 0.85:  # + or x: two crossing bars
            angle = rng.uniform(0, math.pi)
            for turn in (0.0, math.pi / 2 + rng.uniform(-0.3, 0.3)):
                dx, dy = radius * math.cos(angle + turn), radius * math.sin(angle + turn)
                draw.line([(centre[0] - dx, centre[1] - dy), (centre[0] + dx, centre[1] + dy)], fill=0, width=width)
        else:  # a filled disc: a blot, not a ring
            draw.ellipse([float(v) for v in (*(centre - radius), *(centre + radius))], fill=0)
    return page


def scribbles(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """A long random walk with momentum: a tangle of pen."""
    page, draw, size = _canvas(rng)
    steps = int(rng.integers(30, 120))
    heading = rng.uniform(0, 2 * math.pi)
    point = rng.uniform(0.3, 0.7, 2) * size
    path = [tuple(point)]
    for _ in range(steps):
        heading += rng.normal(0, 0.7)
        point = np.clip(point + size * 0.06 * np.array([math.cos(heading), math.sin(heading)]), 0.05 * size,
                        0.95 * size)
        path.append(tuple(point))
    draw.line([(float(x), float(y)) for x, y in path], fill=0, width=_width(rng, size, 0.02, 0.07), joint="curve")
    return page


def blobs(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """Smoothed noise cut at a level: scattered ink islands of random size."""
    side = int(rng.integers(12, 40))
    noise = Image.fromarray((rng.random((side, side)) * 255).astype(np.uint8))
    size = int(rng.integers(96, 257))
    smooth = noise.resize((size, size), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(size / side))
    values = np.asarray(smooth, dtype=np.float64)
    cut = np.quantile(values, rng.uniform(0.6, 0.9))
    return Image.fromarray(np.where(values > cut, 0, 255).astype(np.uint8))


@functools.cache
def _pool(drawn: str, characters: str | None) -> str:
    """The characters of `characters` among `drawn`, a font's coverage (all of `drawn` for None or none)."""
    if characters is None:
        return drawn
    wanted = set(characters)
    return "".join(c for c in drawn if c in wanted) or drawn


def _glyph(rng: np.random.Generator, fonts: FontSet, characters: str | None, length: int = 1) -> Page:
    font = fonts.fonts[int(rng.integers(0, len(fonts.fonts)))]
    pool = _pool(fonts.coverage[font], characters)
    text = "".join(pool[int(rng.integers(0, len(pool)))] for _ in range(length))
    size = int(rng.integers(24, 121))
    bold = int(rng.integers(0, max(1, size // 12))) if rng.random() < 0.3 else 0
    return render_text(text, font, size, rotation=float(rng.uniform(-12, 12)), bold=bold)


def letters(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """A printed letter (Latin or Greek) in a training font."""
    return _glyph(rng, training_fonts(), LETTERS + GREEK)


def symbols(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """A printed symbol in a training font (glyphs.TRAIN_SYMBOLS and glyphs.BROAD_SYMBOLS)."""
    from training.synth.glyphs import BROAD_SYMBOLS, TRAIN_SYMBOLS

    return _glyph(rng, training_fonts(), TRAIN_SYMBOLS + BROAD_SYMBOLS)


def _pick(rng: np.random.Generator, digits: np.ndarray | None) -> np.ndarray:
    if digits is None or not len(digits):
        raise ValueError("this kind of negative is made from real digits: pass some")
    return digits[int(rng.integers(0, len(digits)))]


def _digit_row(rng: np.random.Generator, digits: np.ndarray | None, count: int) -> Page:
    parts = []
    for _ in range(count):
        digit = _pick(rng, digits)
        cols = np.flatnonzero(digit.max(0) > 32)
        parts.append(digit[:, cols[0]:cols[-1] + 1] if len(cols) else digit)
        parts.append(np.zeros((28, int(rng.integers(0, 5))), np.uint8))
    row = np.concatenate(parts[:-1], axis=1)
    shift = int(rng.integers(-3, 4))
    row = np.roll(row, shift, axis=0)
    return digit_page(np.pad(row, ((0, 0), (2, 2))), rng) if row.shape[1] <= 28 else _wide_page(row, rng)


def _wide_page(row: np.ndarray, rng: np.random.Generator) -> Page:
    height = int(rng.integers(28, 120))
    width = max(1, round(row.shape[1] * height / 28))
    ink = Image.fromarray(255 - row).resize((width, height), Image.Resampling.BILINEAR)
    page = Image.new("L", (width + height // 2, height + height // 2), 255)
    page.paste(ink, (int(rng.integers(0, height // 2 + 1)), int(rng.integers(0, height // 2 + 1))))
    return page


def digit_groups(rng: np.random.Generator, digits: np.ndarray | None) -> Page:
    """Two or three real digits side by side (a number, not a digit)."""
    return _digit_row(rng, digits, int(rng.integers(2, 4)))


def textures(rng: np.random.Generator, _digits: np.ndarray | None) -> np.ndarray:
    """A raw 28x28 array filling the frame (noise, stripes, checks, gradients): raw input is not recentred."""
    y, x = np.mgrid[0:28, 0:28].astype(np.float64)
    choice = int(rng.integers(0, 4))
    if choice == 0:
        values = rng.random((28, 28))
    elif choice == 1:
        angle, period = rng.uniform(0, math.pi), rng.uniform(3, 10)
        values = 0.5 + 0.5 * np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period)
    elif choice == 2:
        cell = int(rng.integers(2, 8))
        values = ((x // cell + y // cell) % 2).astype(np.float64)
    else:
        angle = rng.uniform(0, 2 * math.pi)
        values = (x * math.cos(angle) + y * math.sin(angle))
        values = (values - values.min()) / max(1e-9, float(np.ptp(values)))
    return (np.clip(values * rng.uniform(0.5, 1.0), 0, 1) * 255).astype(np.uint8)


# --- measuring kinds: never trained on -------------------------------------------------------------


def other_letters(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """A printed letter in a font training never uses."""
    return _glyph(rng, eval_fonts(), LETTERS)


def other_symbols(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """A printed symbol training never sees (glyphs.EVAL_SYMBOLS), in a font training never uses."""
    from training.synth.glyphs import EVAL_SYMBOLS

    return _glyph(rng, eval_fonts(), EVAL_SYMBOLS)


def held_symbols(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """A printed symbol in a training font that no model trains on (glyphs.BROAD_HELD_OUT)."""
    from training.synth.glyphs import BROAD_HELD_OUT

    return _glyph(rng, held_symbol_fonts(), BROAD_HELD_OUT)


def held_font_letters(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """A printed letter in a font held out of training and measuring (glyphs.selection_fonts)."""
    return _glyph(rng, selection_fonts(), LETTERS)


def held_font_symbols(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """A symbol never trained on (glyphs.BROAD_HELD_OUT) in a font held out of training and measuring."""
    from training.synth.glyphs import BROAD_HELD_OUT

    return _glyph(rng, selection_fonts(), BROAD_HELD_OUT)


def words(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """Two to four printed letters, in a font training never uses."""
    return _glyph(rng, eval_fonts(), LETTERS, length=int(rng.integers(2, 5)))


def doodles(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """A small drawing: smiley, house, sun, arrow, grid, zigzag, spiral or flower."""
    page, draw, size = _canvas(rng)
    width = _width(rng, size, 0.03, 0.08)
    c, r = size / 2, size * 0.38
    choice = int(rng.integers(0, 8))
    if choice == 0:  # smiley
        draw.ellipse([c - r, c - r, c + r, c + r], outline=0, width=width)
        for dx in (-r / 2.5, r / 2.5):
            draw.ellipse([c + dx - width, c - r / 3 - width, c + dx + width, c - r / 3 + width], fill=0)
        draw.arc([c - r / 2, c - r / 3, c + r / 2, c + r / 2], 20, 160, fill=0, width=width)
    elif choice == 1:  # house
        draw.rectangle([c - r, c, c + r, c + r], outline=0, width=width)
        draw.line([(c - r, c), (c, c - r), (c + r, c)], fill=0, width=width, joint="curve")
    elif choice == 2:  # sun
        draw.ellipse([c - r / 2, c - r / 2, c + r / 2, c + r / 2], fill=0)
        for k in range(8):
            a = k * math.pi / 4
            draw.line([(c + 0.65 * r * math.cos(a), c + 0.65 * r * math.sin(a)),
                       (c + r * math.cos(a), c + r * math.sin(a))], fill=0, width=width)
    elif choice == 3:  # arrow, any direction but up or down (those are ones)
        a = rng.choice([0.0, math.pi, math.pi / 4, 3 * math.pi / 4, -math.pi / 4, -3 * math.pi / 4])
        tip = (c + r * math.cos(a), c + r * math.sin(a))
        draw.line([(c - r * math.cos(a), c - r * math.sin(a)), tip], fill=0, width=width)
        for side in (2.5, -2.5):
            draw.line([tip, (tip[0] - r / 2 * math.cos(a + side / 5), tip[1] - r / 2 * math.sin(a + side / 5))],
                      fill=0, width=width)
    elif choice == 4:  # grid
        for k in range(int(rng.integers(3, 6))):
            t = c - r + 2 * r * k / 4
            draw.line([(t, c - r), (t, c + r)], fill=0, width=width)
            draw.line([(c - r, t), (c + r, t)], fill=0, width=width)
    elif choice == 5:  # zigzag
        n = int(rng.integers(4, 9))
        draw.line([(c - r + 2 * r * k / n, c - r / 2 if k % 2 else c + r / 2) for k in range(n + 1)], fill=0,
                  width=width, joint="curve")
    elif choice == 6:  # spiral
        turns = np.linspace(0, 3 * 2 * math.pi, 120)
        end = float(turns[-1])
        draw.line([(c + r * a / end * math.cos(a), c + r * a / end * math.sin(a)) for a in turns.tolist()],
                  fill=0, width=width, joint="curve")
    else:  # flower: petals around a centre
        for k in range(5):
            a = k * 2 * math.pi / 5
            px, py = c + r / 2 * math.cos(a), c + r / 2 * math.sin(a)
            draw.ellipse([px - r / 3, py - r / 3, px + r / 3, py + r / 3], outline=0, width=width)
    return page


def photos(rng: np.random.Generator, _digits: np.ndarray | None) -> Page:
    """Photo-like fractal noise (sums of octaves), sometimes inverted: the grey mess of a camera shot."""
    size = int(rng.integers(64, 257))
    total = np.zeros((size, size))
    for octave in range(1, 6):
        side = 2 ** octave + 1
        layer = Image.fromarray((rng.random((side, side)) * 255).astype(np.uint8))
        total += np.asarray(layer.resize((size, size), Image.Resampling.BICUBIC), np.float64) / 2**octave
    total = (total - total.min()) / max(1e-9, float(np.ptp(total))) * 255
    if rng.random() < 0.5:
        total = 255 - total
    return Image.fromarray(total.astype(np.uint8))


def digit_strings(rng: np.random.Generator, digits: np.ndarray | None) -> Page:
    """Four or five real digits in a row: longer numbers than training's groups."""
    return _digit_row(rng, digits, int(rng.integers(4, 6)))


TRAIN_KINDS: dict[str, Maker] = {
    "strokes": strokes,
    "shapes": shapes,
    "scribbles": scribbles,
    "blobs": blobs,
    "letters": letters,
    "symbols": symbols,
    "digit_groups": digit_groups,
    "textures": textures,
}
EVAL_KINDS: dict[str, Maker] = {
    "other_letters": other_letters,
    "other_symbols": other_symbols,
    "words": words,
    "doodles": doodles,
    "photos": photos,
    "digit_strings": digit_strings,
}
SELECTION_KINDS: dict[str, Maker] = {"held_symbols": held_symbols, "held_font_letters": held_font_letters,
                                     "held_font_symbols": held_font_symbols}
"""Kinds for choosing between training recipes: never trained on, and not the measuring kinds."""
# Share of each training kind in a generated set (letters and symbols most: what clients will send).
TRAIN_MIX = {"strokes": 0.1, "shapes": 0.1, "scribbles": 0.08, "blobs": 0.05, "letters": 0.22, "symbols": 0.28,
             "digit_groups": 0.12, "textures": 0.05}
MADE_OF_DIGITS = frozenset({"digit_groups", "digit_strings"})
"""Kinds made of real digits: always from the digits a model trains on (or is measured on), never others."""
# Selection kinds come last, so that adding one leaves every other kind's images as they were.
_KIND_IDS = {name: i for i, name in enumerate([*TRAIN_KINDS, *EVAL_KINDS, *SELECTION_KINDS])}


def stick_like(pixels: np.ndarray) -> bool:
    """Whether the ink is (nearly) one straight bar, which reads as a 1 (or nothing): too little ink, or
    an ink spread along its thinnest axis under 1/16 of that along its longest (a 1 is about 1/20)."""
    ys, xs = np.nonzero(pixels > 64)
    if len(ys) < 12:
        return True
    spread = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(np.float64)))
    return bool(spread[0] < spread[1] / 16)


def make_one(kind: str, seed: int, index: int, digits: np.ndarray | None = None) -> np.ndarray:
    """The `index`-th negative of `kind` for `seed`, as uint8 [28, 28] model input (before normalization).

    Drawings that come out stick-like (see `stick_like`) are drawn again from the same random stream.
    """
    maker = TRAIN_KINDS.get(kind) or EVAL_KINDS.get(kind) or SELECTION_KINDS.get(kind)
    if maker is None:
        raise ValueError(f"unknown kind of negative {kind!r}")
    rng = np.random.default_rng([seed, 100 + _KIND_IDS[kind], index])
    for _ in range(20):
        made = maker(rng, digits)
        pixels = made if isinstance(made, np.ndarray) else page_to_pixels(made, rng)
        if kind == "textures" or not stick_like(pixels):
            break
    return pixels


def generate(counts: Mapping[str, int], seed: int, digits: np.ndarray | None = None) -> Negatives:
    """`counts[kind]` negatives of each kind, reproducibly from `seed`; `digits` feed the digit-made kinds."""
    images: list[np.ndarray] = []
    kinds: list[str] = []
    for kind, count in counts.items():
        images += [make_one(kind, seed, i, digits) for i in range(count)]
        kinds += [kind] * count
    stacked = np.stack(images) if images else np.zeros((0, 28, 28), np.uint8)
    return Negatives(images=stacked, kinds=np.array(kinds, dtype=object))


def training_counts(total: int) -> dict[str, int]:
    """`total` split over TRAIN_KINDS in the proportions of TRAIN_MIX."""
    counts = {kind: int(total * share) for kind, share in TRAIN_MIX.items()}
    counts["letters"] += total - sum(counts.values())
    return counts


def eval_counts(per_kind: int) -> dict[str, int]:
    """`per_kind` of each measuring kind."""
    return dict.fromkeys(EVAL_KINDS, per_kind)
