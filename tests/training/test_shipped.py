"""The committed model: its card matches the file, its metadata is servable, it is accurate on
real digits it never saw (the fixture's t10k-* digits come from the shipped run's held-out test part)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx

from service.recognition.model_metadata import ModelMetadata
from training.evaluate import evaluate


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


def test_shipped_model_on_unseen_fixture_digits(shipped_model: Path, mnist_small_dir: Path) -> None:
    report = evaluate(shipped_model, mnist_small_dir, "test")
    assert report.count == 300
    assert report.accuracy >= 0.97
    assert min(c.recall for c in report.per_class) >= 0.9
