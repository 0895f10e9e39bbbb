"""Generated non-digits and client-style digits: reproducible, shaped like model input, disjoint halves."""

from __future__ import annotations

import numpy as np
import pytest

from tests.harness import fixture_digits
from training.synth import glyphs
from training.synth.clientstyle import client_style
from training.synth.negatives import (
    EVAL_KINDS,
    TRAIN_KINDS,
    eval_counts,
    generate,
    make_one,
    stick_like,
    training_counts,
)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return fixture_digits("train")[0]


def test_every_kind_makes_model_input_reproducibly(digits: np.ndarray) -> None:
    for kind in [*TRAIN_KINDS, *EVAL_KINDS]:
        first = make_one(kind, seed=5, index=3, digits=digits)
        assert first.shape == (28, 28) and first.dtype == np.uint8, kind
        assert first.max() > 100, f"{kind}: no ink"
        np.testing.assert_array_equal(first, make_one(kind, seed=5, index=3, digits=digits))
        assert not np.array_equal(first, make_one(kind, seed=6, index=3, digits=digits)), kind


def test_generated_sets_follow_the_counts(digits: np.ndarray) -> None:
    counts = training_counts(200)
    assert sum(counts.values()) == 200 and set(counts) == set(TRAIN_KINDS)
    made = generate({"shapes": 4, "letters": 3}, seed=1)
    assert made.images.shape == (7, 28, 28) and list(made.kinds) == ["shapes"] * 4 + ["letters"] * 3
    assert len(made.of_kind("letters")) == 3
    assert set(eval_counts(2)) == set(EVAL_KINDS) and not set(TRAIN_KINDS) & set(EVAL_KINDS)
    with pytest.raises(ValueError, match="made from real digits"):
        make_one("digit_groups", 1, 0, None)


def test_drawings_are_not_lone_bars(digits: np.ndarray) -> None:
    labels = fixture_digits("train")[1]
    assert np.mean([stick_like(d) for d in digits[labels == 1]]) > 0.6  # what a 1 looks like to the check
    assert not any(stick_like(d) for d in digits[labels == 8])
    for kind in ("strokes", "shapes", "scribbles"):
        assert not any(stick_like(make_one(kind, 2, i)) for i in range(40)), kind


def test_training_and_measuring_glyphs_are_disjoint() -> None:
    assert not set(glyphs.TRAIN_SYMBOLS) & set(glyphs.EVAL_SYMBOLS)
    look_alikes = set("OoDQIlij|/!ZzSs$§GbTB&gq°")
    assert not look_alikes & set(glyphs.LETTERS + glyphs.GREEK + glyphs.TRAIN_SYMBOLS + glyphs.EVAL_SYMBOLS)
    train, measure = glyphs.training_fonts(), glyphs.eval_fonts()
    assert train.fonts and measure.fonts
    if glyphs.BUILTIN not in train.fonts:  # DejaVu is installed: the two halves use different fonts
        assert not set(train.fonts) & set(measure.fonts)
    assert all(coverage for coverage in train.coverage.values())


def test_client_style_digits_go_through_the_server_recipe(digits: np.ndarray) -> None:
    sent = client_style(digits[:50], seed=3)
    assert sent.shape == (50, 28, 28) and sent.dtype == np.uint8
    np.testing.assert_array_equal(sent[10:20], client_style(digits[10:20], seed=3, indices=np.arange(10, 20)))
    assert not np.array_equal(sent, client_style(digits[:50], seed=4))
    # The recipe fits the ink into 20x20 and stretches it to full contrast, as MNIST itself does.
    rows = np.flatnonzero(sent[0].max(axis=1) > 0)
    assert sent.max() == 255 and rows[-1] - rows[0] <= 21
