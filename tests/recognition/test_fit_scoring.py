"""The Reader's scoring weights and their fitting: the defaults' vector round-trips, the right path is
the truth, and the perceptron learns the readings it is shown, with the shipped model on real fixture
digits it never trained on."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.perf.reading.fit_scoring import Case, case_of, exact, fit, right_path, text_of
from service.perf.reading.numbers import compose, onnx_classifier
from service.recognition.reading.reader import Classify
from service.recognition.reading.scoring import FEATURES, LEGACY, Scoring, best_path
from tests.harness import SHIPPED_MODEL, fixture_digits


@pytest.fixture(scope="module")
def touching() -> list[Case]:
    """100 touching numbers of the fixture's t10k digits, segmented and read once."""
    images, labels = fixture_digits("t10k")
    classify: Classify = onnx_classifier(SHIPPED_MODEL)
    rng = np.random.default_rng(7)
    cases = [asyncio.run(case_of(compose(images, labels, "touching", rng), classify)) for _ in range(100)]
    return [c for c in cases if c is not None]


def chosen(case: Case, scoring: Scoring) -> str:
    return text_of(case, best_path(case.nodes, case.graph, case.graph.rows @ scoring.vector()))


def test_weights_are_one_vector_in_the_order_of_the_features() -> None:
    scoring = Scoring(cut=-2.5, digit_bias=tuple(float(d) for d in range(10)))
    vector = scoring.vector()
    assert len(vector) == len(FEATURES)
    assert vector[FEATURES.index("cut")] == -2.5
    assert vector[FEATURES.index("digit_bias_7")] == 7.0
    assert Scoring.from_vector(vector) == scoring


def test_the_right_path_reads_the_truth_with_every_digit_over_its_box(touching: list[Case]) -> None:
    weights = LEGACY.vector()
    found = [(case, right_path(case, weights)) for case in touching]
    with_path = [(case, path) for case, path in found if path]
    assert len(with_path) >= 0.8 * len(touching)  # a digit no crop reads right leaves none
    for case, path in with_path:
        assert text_of(case, path) == case.text
        digits = [i for i in path if case.digits[i] >= 0]
        assert len(digits) == len(case.text)
        assert all(k in case.covers[i] for k, i in enumerate(digits))


def test_fitting_on_readings_already_right_keeps_the_weights(touching: list[Case]) -> None:
    right = [case for case in touching if chosen(case, LEGACY) == case.text]
    assert right
    assert fit(right, start=LEGACY, epochs=2) == LEGACY


def test_the_perceptron_learns_the_readings_it_is_shown(touching: list[Case]) -> None:
    wrong = [case for case in touching if chosen(case, LEGACY) != case.text and right_path(case, LEGACY.vector())]
    assert wrong, "the legacy weights read every fixture number right: pick numbers they miss"
    fitted = fit(touching, start=LEGACY, epochs=8, rate=0.5)
    assert fitted != LEGACY
    before, after = exact(touching, LEGACY)["touching"], exact(touching, fitted)["touching"]
    assert after[0] > before[0], (before, after)


def test_the_shipped_weights_read_touching_numbers_better_than_the_legacy_ones(touching: list[Case]) -> None:
    # Fitted out of fold (never on these fixture digits): more touching numbers read right, on real
    # digits neither set of weights was chosen on.
    assert exact(touching, Scoring())["touching"][0] > exact(touching, LEGACY)["touching"][0]
