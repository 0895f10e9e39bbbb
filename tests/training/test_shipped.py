"""The committed model: its card matches the file, its metadata is servable and carries calibration and
rejection, it is accurate on real digits it never saw and rejects generated non-digits.

The fixture's t10k-* digits come from the test part of the shipped run (`training.data.cv_split`), which
no model of that run trained on and nothing (epoch, temperature, thresholds) was chosen with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from service.recognition.model_metadata import ModelMetadata
from service.recognition.preprocess import normalize
from service.recognition.rejection import decide
from tests.harness import fixture_digits
from training.evaluate import evaluate
from training.synth.clientstyle import EVAL_RENDER_SEED, client_style
from training.synth.negatives import NEGATIVES_EVAL_SEED, eval_counts, generate


def _metadata(shipped_model: Path) -> ModelMetadata:
    return ModelMetadata.from_props({p.key: p.value for p in onnx.load(str(shipped_model)).metadata_props})


def _decide(shipped_model: Path, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted digit, rejection reason) per image, as the server computes them."""
    session = ort.InferenceSession(str(shipped_model), providers=["CPUExecutionProvider"])
    metadata = _metadata(shipped_model)
    logits, probabilities = session.run(None, {"image": normalize(pixels, metadata.normalization)})
    return probabilities.argmax(axis=1), decide(metadata.rejection, logits, probabilities)


def test_card_matches_model(shipped_model: Path) -> None:
    card = json.loads(shipped_model.with_suffix(".json").read_text())
    assert card["sha256"] == hashlib.sha256(shipped_model.read_bytes()).hexdigest()
    assert card["size_bytes"] == shipped_model.stat().st_size < 1_000_000
    assert card["reproduce"].startswith("digits train ")
    assert card["parity"]["max_abs_diff_probabilities"] <= 1e-5
    props = {p.key: p.value for p in onnx.load(str(shipped_model)).metadata_props}
    assert card["metadata"] == props
    metadata = ModelMetadata.from_props(props)
    assert metadata.name == "lenet5" and metadata.version == card["version"]
    assert float(metadata.extra["test_accuracy"]) >= 0.985
    assert not list(shipped_model.parent.glob("*.onnx.data"))


def test_metadata_carries_calibration_rejection_and_relative_paths(shipped_model: Path) -> None:
    metadata = _metadata(shipped_model)
    assert metadata.calibration is not None and 0.2 < metadata.calibration.temperature < 5
    assert metadata.rejection is not None
    assert {metadata.rejection.not_a_digit.score, metadata.rejection.uncertain.score} <= {
        "max_probability", "logsumexp", "max_logit"}
    assert "chosen_on" in metadata.rejection.extra and "budgets" in metadata.rejection.extra
    for key in ("training_data", "command"):
        assert "/work/" not in metadata.extra[key] and " /" not in metadata.extra[key], metadata.extra[key]


def test_the_graph_applies_the_temperature(shipped_model: Path) -> None:
    images, _ = fixture_digits()
    session = ort.InferenceSession(str(shipped_model), providers=["CPUExecutionProvider"])
    metadata = _metadata(shipped_model)
    assert metadata.calibration is not None
    logits, probabilities = session.run(None, {"image": normalize(images[:32], metadata.normalization)})
    scaled = logits / metadata.calibration.temperature
    expected = np.exp(scaled - scaled.max(1, keepdims=True))
    np.testing.assert_allclose(probabilities, expected / expected.sum(1, keepdims=True), atol=1e-6)


def test_shipped_model_on_unseen_fixture_digits(shipped_model: Path, mnist_small_dir: Path) -> None:
    report = evaluate(shipped_model, mnist_small_dir, "test")
    assert report.count == 300
    assert report.accuracy >= 0.98
    assert min(c.recall for c in report.per_class) >= 0.9
    assert report.rejection["rejected"]["value"] <= 0.02  # at least 98 % of the digits accepted


def test_fixture_digits_as_clients_send_them_are_accepted(shipped_model: Path) -> None:
    images, labels = fixture_digits()
    predicted, reasons = _decide(shipped_model, client_style(images, EVAL_RENDER_SEED))
    assert np.mean(reasons == "") >= 0.98
    assert np.mean(predicted == labels) >= 0.98


def test_generated_non_digits_are_mostly_rejected(shipped_model: Path) -> None:
    # Kinds and fonts training never drew (training.synth.negatives.EVAL_KINDS), made from unseen digits.
    made = generate(eval_counts(40), NEGATIVES_EVAL_SEED, fixture_digits()[0])
    _, reasons = _decide(shipped_model, made.images)
    assert np.mean(reasons != "") >= 0.9
    for kind in set(made.kinds):
        assert np.mean(reasons[made.kinds == kind] != "") >= 0.75, kind
