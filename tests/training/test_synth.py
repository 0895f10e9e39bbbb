"""Generated non-digits and client-style digits: reproducible, shaped like model input, disjoint halves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.harness import fixture_digits
from training.synth import glyphs
from training.synth import negatives as negatives_module
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
    train, select, measure = glyphs.training_fonts(), glyphs.selection_fonts(), glyphs.eval_fonts()
    assert train.fonts and select.fonts and measure.fonts
    if glyphs.BUILTIN not in train.fonts:  # the fonts are installed: the three sets use different fonts
        assert not set(train.fonts) & set(measure.fonts)
        assert not set(select.fonts) & (set(train.fonts) | set(measure.fonts))
    assert all(coverage for coverage in train.coverage.values())
    # The selection kind of held-out symbols draws the DejaVu training faces only, whatever else trains.
    assert all(Path(font).name.startswith("DejaVu") for font in glyphs.held_symbol_fonts().fonts
               if font != glyphs.BUILTIN)


def test_client_style_digits_go_through_the_server_recipe(digits: np.ndarray) -> None:
    sent = client_style(digits[:50], seed=3)
    assert sent.shape == (50, 28, 28) and sent.dtype == np.uint8
    np.testing.assert_array_equal(sent[10:20], client_style(digits[10:20], seed=3, indices=np.arange(10, 20)))
    assert not np.array_equal(sent, client_style(digits[:50], seed=4))
    # The recipe fits the ink into 20x20 and stretches it to full contrast, as MNIST itself does.
    rows = np.flatnonzero(sent[0].max(axis=1) > 0)
    assert sent.max() == 255 and rows[-1] - rows[0] <= 21


def test_neighbour_renders_keep_the_middle_digit_readable(digits: np.ndarray) -> None:
    import onnxruntime as ort

    from service.recognition.model_metadata import ModelMetadata
    from service.recognition.preprocess import mnist_recipe, normalize
    from tests.harness import SHIPPED_MODEL
    from training.synth.neighbours import neighbour_renders

    images, labels = fixture_digits("train")
    images, labels = images[:120], labels[:120]
    renders = neighbour_renders(images, 0, np.arange(120))
    assert renders.shape == images.shape and renders.dtype == np.uint8
    # Reproducible per digit index, whatever else is in the batch.
    np.testing.assert_array_equal(renders[40:50], neighbour_renders(images, 0, np.arange(120))[40:50])
    assert not np.array_equal(renders, neighbour_renders(images, 1, np.arange(120)))
    # Each holds a sliver of another digit: never just the digit through the recipe.
    alone = np.stack([mnist_recipe(d) for d in images])
    assert np.mean([not np.array_equal(r, a) for r, a in zip(renders, alone, strict=True)]) > 0.95
    # ... and is still the middle digit: the shipped model, never trained on these, mostly reads it so.
    session = ort.InferenceSession(str(SHIPPED_MODEL), providers=["CPUExecutionProvider"])
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    logits = session.run(None, {metadata.input_name: normalize(renders, metadata.normalization)})[0]
    assert np.mean(logits.argmax(axis=1) == labels) > 0.8


def test_broad_symbols_keep_away_from_digits_and_from_what_is_measured() -> None:
    broad, held = set(glyphs.BROAD_SYMBOLS), set(glyphs.BROAD_HELD_OUT)
    assert len(broad) > 900 and len(held) > 150 and not broad & held
    assert not (broad | held) & set(glyphs.EVAL_SYMBOLS)
    from training.synth.broad_symbols import HAND_LEFT_OUT

    assert not (broad | held) & set(HAND_LEFT_OUT)
    # Marked forms of the look-alike letters and rings are zeros, fives, sevens...: none is trained on.
    assert not (broad | held) & set("ŽŞĞØŤıÖ○∅⊙◐ӧ")


def test_training_kinds_never_draw_what_is_held_out_or_measured() -> None:
    render = negatives_module.render_text

    def drawn(kind: str, count: int) -> set[str]:
        """The characters that `count` images of `kind` print."""
        texts: list[str] = []

        def recording(text: str, *args: Any, **kwargs: Any) -> Any:
            texts.append(text)
            return render(text, *args, **kwargs)

        negatives_module.render_text = recording
        try:
            for i in range(count):
                make_one(kind, 11, i)
        finally:
            negatives_module.render_text = render
        return set("".join(texts))

    trained, held = drawn("symbols", 150), drawn("held_symbols", 60)
    assert trained <= set(glyphs.TRAIN_SYMBOLS + glyphs.BROAD_SYMBOLS) and trained & set(glyphs.BROAD_SYMBOLS)
    assert held <= set(glyphs.BROAD_HELD_OUT) and len(held) > 20
    font_letters, font_symbols = drawn("held_font_letters", 60), drawn("held_font_symbols", 60)
    assert font_letters <= set(glyphs.LETTERS) and len(font_letters) > 20
    assert font_symbols <= set(glyphs.BROAD_HELD_OUT) and len(font_symbols) > 10


def test_symbols_report_names_the_measuring_symbols_exactly() -> None:
    # tests/symbols_report.py breaks the measuring symbols down by character: its images must be the very
    # images `digits evaluate --negatives` measures, and each must be named by the symbol drawn.
    from tests.symbols_report import drawn_symbols
    from training.synth.negatives import NEGATIVES_EVAL_SEED, generate

    images, characters = drawn_symbols(24)
    assert np.array_equal(images, generate({"other_symbols": 24}, NEGATIVES_EVAL_SEED).images)
    assert set(characters) <= set(glyphs.EVAL_SYMBOLS) and len(set(characters)) > 5


def test_broad_symbols_are_what_their_rules_choose() -> None:
    # glyphs.BROAD_SYMBOLS and BROAD_HELD_OUT are committed as text so that a model's training set can be read;
    # they must stay what `python -m training.synth.broad_symbols` chooses from the sample's training digits.
    import os
    from pathlib import Path

    from training.data import prepare_splits
    from training.synth.broad_symbols import choose, split

    data = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist-sample"
    if not data.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI runs with ../shared beside the clone, but {data} is missing")
        pytest.skip(f"needs the 8,000-digit sample at {data}")
    chosen, _ = choose(prepare_splits(data).train.images)
    assert split(chosen) == (glyphs.BROAD_SYMBOLS, glyphs.BROAD_HELD_OUT)
