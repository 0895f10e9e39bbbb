"""Choose the broad set of training symbols (glyphs.BROAD_SYMBOLS) from whole Unicode blocks:

    python -m training.synth.broad_symbols [--data-dir ../shared/data/mnist-sample]
    # prints the set and what was left out, and why

Outlier exposure works better the more kinds of outlier it sees (Hendrycks et al. 2019), and a hundred
hand-picked symbols are few. This takes every character of the blocks below that the training fonts
can draw, and leaves out, by rules fixed before any measuring:
- the measuring symbols (glyphs.EVAL_SYMBOLS), characters whose Unicode name contains one of theirs
  ("LEFTWARDS DOUBLE ARROW WITH STROKE" for ⇐) and characters that look like one of them: rendered in
  DejaVu Sans through the digits' recipe, a cosine similarity to any measuring symbol over EVAL_SIMILAR;
- digit look-alikes: characters the hand-made lists already leave out (glyphs' docstring) and Latin
  letters built on one of them (Ž, Ş, Ğ, Ø), and those more like a printed digit (0-9 in the same
  DejaVu Sans, regular and bold), or more like the nearest real training digit (the training part of
  `training.data.prepare_splits`, never its test digits), than LOOKALIKE_QUANTILE of the hand-picked
  letters and symbols are: the hand-picked set is the measure of "unlike any digit";
- rings and round things, by name (ZERO_NAMES);
- characters whose drawing is a lone bar (negatives.stick_like) or nearly no ink.

What is left is split, by groups (a Latin letter with all its marked forms is one group; any other
character is its own), into the training set (BROAD_SYMBOLS) and a fifth held out (BROAD_HELD_OUT):
symbols in the training fonts that no model trains on, for choosing between recipes without touching
the measuring kinds. No measuring image is drawn here; the measuring symbols are only rendered, in a
training font, to be kept away from.
"""

from __future__ import annotations

import functools
import unicodedata

import numpy as np

from training.synth.clientstyle import page_to_pixels
from training.synth.glyphs import EVAL_SYMBOLS, GREEK, LETTERS, TRAIN_SYMBOLS, render_text

BLOCKS = ((0x00A1, 0x00BF), (0x0100, 0x024F), (0x0370, 0x03FF), (0x0400, 0x04FF), (0x0531, 0x058F),
          (0x05D0, 0x05EA), (0x2010, 0x205E), (0x20A0, 0x20CF), (0x2100, 0x214F), (0x2190, 0x21FF),
          (0x2200, 0x22FF), (0x2300, 0x23FF), (0x25A0, 0x25FF), (0x2600, 0x26FF), (0x2700, 0x27BF))
"""Latin-1 signs, Latin Extended-A/B, Greek, Cyrillic, Armenian, Hebrew, punctuation, currency,
letterlike symbols, arrows, mathematical operators, technical signs, geometric shapes, miscellaneous
symbols, dingbats."""
HAND_LEFT_OUT = "OoDQ°Ilijј|/!t↑↓⊥ZzSs$§GbTB&gqξ∃φ⊕⊗0123456789" + "ЧчҶҷҸҹӴӵӋӌƄƅℓℤℨ"
"""The digit look-alikes glyphs' docstring lists (with the Cyrillic ј beside j), left out of every set; then
fours (Cyrillic che), sixes (tone six), a script l and Z's that the printed-digit test below lets through."""
ZERO_NAMES = ("CIRCLE", "FISHEYE", "EMPTY SET", "OMICRON", "LETTER O ", "BULLET", "ZERO", "ROUND")
"""Words of the names of rings and round things (○ ∅ ⊙ ◐ ӧ): zeros, as glyphs' docstring says of O o °,
which the similarity tests let through when the ring is thin."""
EVAL_SIMILAR = 0.8
HELD_OUT_SHARE = 0.2
SPLIT_SEED = 2026
LOOKALIKE_QUANTILE = 0.95
REFERENCE_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")


def _pixels(ch: str, font: str) -> np.ndarray:
    """`ch` in `font` through the recipe, as a unit vector of its mean-removed 28x28 pixels."""
    return _unit_rows(page_to_pixels(render_text(ch, font, 64), np.random.default_rng(0))[None])[0]


@functools.cache
def _font_paths() -> dict[str, str]:
    from training.synth.glyphs import _font_files

    return {p.name: str(p) for p in _font_files() if p.name in REFERENCE_FONTS}


def _unit_rows(pixels: np.ndarray) -> np.ndarray:
    """[N, 28, 28] pixels as unit vectors of their mean-removed values, one row each."""
    rows = pixels.reshape(len(pixels), -1).astype(np.float64)
    rows -= rows.mean(axis=1, keepdims=True)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


def _similarity_to(chars: str, reference: str | np.ndarray) -> np.ndarray:
    """For each of `chars`, its highest cosine similarity to any of `reference`, font by font: characters
    (drawn in the same font) or real digits [N, 28, 28] (the same in every font)."""
    best = np.full(len(chars), -1.0)
    for font in _font_paths().values():
        ref = np.stack([_pixels(c, font) for c in reference]) if isinstance(reference, str) else _unit_rows(reference)
        mine = np.stack([_pixels(c, font) for c in chars])
        best = np.maximum(best, (mine @ ref.T).max(axis=1))
    return best


def _base_letter(name: str) -> str:
    """The letter a Latin letter's Unicode name is built on ("LATIN CAPITAL LETTER Z WITH CARON" -> "Z",
    "LATIN SMALL LETTER DOTLESS I" -> "i"), or "" for anything else."""
    words = name.split()
    if len(words) < 4 or words[0] != "LATIN" or words[2] != "LETTER":
        return ""
    letter = next((w for w in words[3:] if len(w) == 1), "")
    return letter.lower() if words[1] == "SMALL" else letter


def choose(digits: np.ndarray) -> tuple[str, dict[str, str]]:
    """The broad set, and each left-out candidate with its reason; `digits` are real training digits."""
    from training.synth.glyphs import _drawable
    from training.synth.negatives import stick_like

    fonts = list(_font_paths().values())
    if not fonts:
        raise RuntimeError(f"no DejaVu Sans among the fonts ({', '.join(REFERENCE_FONTS)}): install fonts-dejavu-core")
    candidates = "".join(chr(c) for start, end in BLOCKS for c in range(start, end + 1)
                         if unicodedata.category(chr(c))[0] in "LSP")
    drawable = set(_drawable(fonts[0], candidates))
    left_out: dict[str, str] = {}
    eval_names = [unicodedata.name(c, "") for c in EVAL_SYMBOLS]
    kept = []
    for ch in candidates:
        name = unicodedata.name(ch, "")
        if ch not in drawable:
            continue
        base = _base_letter(name)
        if ch in HAND_LEFT_OUT or (base and base in HAND_LEFT_OUT):
            left_out[ch] = "hand-listed digit look-alike, or that letter with a mark"
        elif any(word in name + " " for word in ZERO_NAMES):
            left_out[ch] = "a ring or round: a zero"
        elif ch in EVAL_SYMBOLS or any(n and n in name for n in eval_names):
            left_out[ch] = "a measuring symbol, or named after one"
        elif stick_like(page_to_pixels(render_text(ch, fonts[0], 64), np.random.default_rng(0))):
            left_out[ch] = "a lone bar or no ink"
        else:
            kept.append(ch)
    pool = "".join(kept)
    near_eval = _similarity_to(pool, EVAL_SYMBOLS)
    printed, real = _similarity_to(pool, "0123456789"), _similarity_to(pool, digits)
    curated = "".join(dict.fromkeys(LETTERS + GREEK + TRAIN_SYMBOLS))
    printed_limit = float(np.quantile(_similarity_to(curated, "0123456789"), LOOKALIKE_QUANTILE))
    real_limit = float(np.quantile(_similarity_to(curated, digits), LOOKALIKE_QUANTILE))
    chosen = []
    for ch, eval_sim, printed_sim, real_sim in zip(pool, near_eval, printed, real, strict=True):
        if eval_sim > EVAL_SIMILAR:
            left_out[ch] = f"looks like a measuring symbol ({eval_sim:.2f})"
        elif printed_sim > printed_limit:
            left_out[ch] = f"looks like a printed digit ({printed_sim:.2f} > {printed_limit:.2f})"
        elif real_sim > real_limit:
            left_out[ch] = f"looks like a real digit ({real_sim:.2f} > {real_limit:.2f})"
        else:
            chosen.append(ch)
    return "".join(chosen), left_out


def _group(ch: str) -> str:
    """What `split` keeps together: a Latin letter's base letter (Ā ā Ă -> A), else the character itself."""
    return _base_letter(unicodedata.name(ch, "")).upper() or ch


def split(chosen: str) -> tuple[str, str]:
    """(training part, held-out part) of `chosen`, groups kept whole (see the module docstring)."""
    keys = sorted({_group(ch) for ch in chosen})
    order = np.random.default_rng(SPLIT_SEED).permutation(len(keys))
    held = {keys[i] for i in order[:round(HELD_OUT_SHARE * len(keys))]}
    return "".join(ch for ch in chosen if _group(ch) not in held), "".join(ch for ch in chosen if _group(ch) in held)


def main() -> None:
    """Print the chosen set, then what was left out, grouped by reason."""
    import argparse

    from training.data import prepare_splits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist-sample",
                        help="IDX digits (only the training part is used)")
    args = parser.parse_args()
    chosen, left_out = choose(prepare_splits(args.data_dir).train.images)
    train, held = split(chosen)
    print(f"{len(train)} chosen for training (BROAD_SYMBOLS):\n{train}\n")
    print(f"{len(held)} held out for choosing recipes (BROAD_HELD_OUT):\n{held}\n")
    reasons: dict[str, list[str]] = {}
    for ch, why in left_out.items():
        reasons.setdefault(why.split(" (")[0], []).append(ch)
    for why, chars in reasons.items():
        print(f"{len(chars)} left out, {why}: {''.join(chars)}")


if __name__ == "__main__":
    main()
