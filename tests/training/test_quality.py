"""Calibration, statistics and threshold choice (numpy only), checked against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from service.recognition.model_metadata import Rejection, Threshold
from service.recognition.rejection import decide
from training.quality.calibration import ece, fit_temperature, nll, reliability, softmax
from training.quality.metrics import auroc, coverage_curve, mean_sd, wilson
from training.quality.thresholds import Outputs, choose_rule, measure_digits, measure_negatives


def test_wilson_interval_matches_the_formula() -> None:
    low, high = wilson(987, 1000)
    assert low == pytest.approx(0.97789, abs=1e-5) and high == pytest.approx(0.99239, abs=1e-5)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert wilson(0, 0) == (0.0, 1.0)


def test_auroc_counts_ties_half_and_handles_order() -> None:
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5
    assert auroc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 2000), rng.normal(0, 1, 2000)
    brute = np.mean(a[:, None] > b[None, :]) + 0.5 * np.mean(a[:, None] == b[None, :])
    assert auroc(a, b) == pytest.approx(brute, abs=1e-12)


def test_coverage_curve_puts_the_most_confident_first() -> None:
    coverage, accuracy = coverage_curve(np.array([0.9, 0.1, 0.8, 0.2]), np.array([True, False, True, True]), 4)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(accuracy, [1.0, 1.0, 1.0, 0.75])
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2)))


def test_temperature_recovers_the_one_that_made_the_labels() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 4, (20000, 10))
    truth = 2.5  # labels drawn from softmax(logits / 2.5): the model is overconfident by that much
    cumulative = softmax(logits, truth).cumsum(axis=1)
    labels = (rng.random((20000, 1)) > cumulative).sum(axis=1)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(truth, rel=0.05)
    assert nll(logits, labels, fitted) < nll(logits, labels, 1.0)
    assert ece(softmax(logits, fitted), labels) < 0.02 < ece(softmax(logits), labels)


def test_reliability_bins_and_ece_by_hand() -> None:
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])
    bins = reliability(probabilities, labels, bins=10)
    assert bins.counts.sum() == 4 and bins.counts[9] == 2 and bins.counts[5] == 2
    # Bin 0.9-1.0: accuracy 0.5 at confidence 0.95; bin 0.5-0.6: accuracy 1.0 at 0.55.
    assert bins.ece == pytest.approx((2 * 0.45 + 2 * 0.45) / 4)


def _outputs(logits: np.ndarray, labels: np.ndarray | None = None) -> Outputs:
    return Outputs.of(logits, 1.0, labels)


def test_chosen_rule_keeps_the_budget_in_every_group_and_is_what_decide_applies() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, 4000)
    logits = rng.normal(0, 1, (4000, 10))
    boost = np.where(rng.random(4000) < 0.02, rng.uniform(0, 3, 4000), rng.uniform(6, 12, 4000))
    logits[np.arange(4000), labels] += boost  # confident digits, 2 % unsure
    other = logits + rng.normal(0, 0.5, logits.shape)  # the same digits, seen another way
    negatives = rng.normal(0, 0.3, (1000, 10))  # flat outputs: non-digits after outlier exposure
    digits = [_outputs(logits, labels), _outputs(other, labels)]
    rule = choose_rule(digits, _outputs(negatives), total_budget=0.007, not_a_digit_budget=0.004)
    assert isinstance(rule, Rejection) and rule.uncertain.score == "max_probability"
    for group in digits:
        reasons = decide(rule, group.logits, group.probabilities)
        assert np.mean(reasons != "") <= 0.007
        assert np.mean(reasons == "not_a_digit") <= 0.004
    assert rule.extra["budgets"] == {"total": 0.007, "not_a_digit": 0.004}
    assert set(rule.extra["validation_auroc"]) == {"max_probability", "logsumexp", "max_logit"}
    rejected = measure_negatives(rule, _outputs(negatives), digits[0])
    assert rejected["rejected"]["value"] > 0.9 and rejected["auroc"][rule.not_a_digit.score] > 0.95
    round_trip = Rejection.from_json(rule.to_json())
    assert round_trip.not_a_digit == rule.not_a_digit and round_trip.uncertain == rule.uncertain


def test_measure_digits_by_reason_and_accuracy_on_accepted() -> None:
    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]))
    outputs = _outputs(logits, np.array([0, 1, 1, 0]))
    rule = Rejection(not_a_digit=Threshold("max_probability", 0.55), uncertain=Threshold("max_probability", 0.65))
    figures = measure_digits(rule, outputs)
    assert figures["rejected_by_reason"]["not_a_digit"]["successes"] == 1  # the 0.5/0.5 row
    assert figures["rejected_by_reason"]["uncertain"]["successes"] == 1  # the 0.6 row (wrong: errors rejected)
    assert figures["accuracy"]["value"] == 0.75
    assert figures["accuracy_on_accepted"]["value"] == 1.0 and figures["errors_rejected"]["value"] == 1.0
    assert measure_digits(None, outputs)["rejected"]["successes"] == 0
