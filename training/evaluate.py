"""Measure an exported ONNX model on labelled IDX digits, exactly as the server would run it.

Needs only onnxruntime and numpy (no torch): the input normalization comes from the model's own
metadata and goes through the server's `service.recognition.preprocess.normalize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.recognition.model_metadata import PROBABILITIES_OUTPUT, ModelMetadata
from service.recognition.preprocess import normalize
from training.data import load_split


class ModelError(ValueError):
    """The model file is missing or cannot be loaded."""


@dataclass(frozen=True)
class ClassReport:
    """Precision, recall and F1 of one class; support is its number of true digits."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class EvaluationReport:
    """Figures for one model on one split."""

    model_name: str
    model_version: str
    data: str
    split: str
    accuracy: float
    count: int
    per_class: tuple[ClassReport, ...]
    confusion_matrix: np.ndarray
    """Counts, rows = true class, columns = predicted class."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the `digits evaluate --json` output)."""
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "data": self.data,
            "split": self.split,
            "accuracy": self.accuracy,
            "count": self.count,
            "errors": self.count - int(np.trace(self.confusion_matrix)),
            "per_class": [vars(c) for c in self.per_class],
            "confusion_matrix": self.confusion_matrix.tolist(),
        }


def load_model(path: str | Path) -> tuple[ort.InferenceSession, ModelMetadata]:
    """An onnxruntime session for `path` and its validated metadata (`MetadataError` if incomplete)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"{path}: cannot load the model: {exc}") from None
    return session, ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)


def predict(
    session: ort.InferenceSession, metadata: ModelMetadata, pixels: np.ndarray, batch_size: int = 1000
) -> np.ndarray:
    """Predicted class index for each uint8 image [N, H, W] (ink bright, MNIST convention)."""
    if pixels.shape[1:] != (metadata.height, metadata.width):
        raise ModelError(
            f"images are {pixels.shape[1]}x{pixels.shape[2]}, the model expects {metadata.height}x{metadata.width}"
        )
    if metadata.ink_polarity == "dark_on_light":
        pixels = 255 - pixels  # IDX digits are light on dark
    predictions = np.empty(pixels.shape[0], dtype=np.int64)
    buffer = np.empty((batch_size, 1, metadata.height, metadata.width), dtype=np.float32)
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size]
        inputs = normalize(chunk, metadata.normalization, out=buffer[: chunk.shape[0]])
        (probabilities,) = session.run([PROBABILITIES_OUTPUT], {metadata.input_name: inputs})
        predictions[start : start + chunk.shape[0]] = probabilities.argmax(axis=1)
    return predictions


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """[classes, classes] counts, rows = true class, columns = predicted class."""
    flat = labels.astype(np.int64) * classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=classes * classes).reshape(classes, classes)


def class_reports(matrix: np.ndarray, labels: tuple[str, ...]) -> tuple[ClassReport, ...]:
    """Per-class precision/recall/F1 from a confusion matrix (0 where undefined)."""
    true_pos = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    reports = []
    for i, label in enumerate(labels):
        precision = true_pos[i] / predicted[i] if predicted[i] else 0.0
        recall = true_pos[i] / support[i] if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        reports.append(ClassReport(label, float(precision), float(recall), float(f1), int(support[i])))
    return tuple(reports)


def evaluate(
    model_path: str | Path, data_dir: str | Path, split: str = "test", batch_size: int = 1000
) -> EvaluationReport:
    """Accuracy, per-class figures and confusion matrix of the ONNX model on `split` of `data_dir`."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    session, metadata = load_model(model_path)
    digits = load_split(data_dir, split)
    predictions = predict(session, metadata, digits.images, batch_size)
    matrix = confusion_matrix(digits.labels, predictions, len(metadata.labels))
    return EvaluationReport(
        model_name=metadata.name,
        model_version=metadata.version,
        data=digits.source,
        split=split,
        accuracy=float(np.trace(matrix) / max(1, len(digits))),
        count=len(digits),
        per_class=class_reports(matrix, metadata.labels),
        confusion_matrix=matrix,
    )


def format_report(report: EvaluationReport) -> str:
    """Human-readable summary: accuracy, per-class table and confusion matrix."""
    errors = report.count - int(np.trace(report.confusion_matrix))
    lines = [
        f"model {report.model_name} {report.model_version} on {report.split} split: {report.data}",
        f"accuracy {report.accuracy:.4f} ({report.count - errors}/{report.count} correct, {errors} errors)",
        "",
        "class  precision  recall      f1  support",
    ]
    for c in report.per_class:
        lines.append(f"{c.label:>5}  {c.precision:9.4f}  {c.recall:6.4f}  {c.f1:6.4f}  {c.support:7d}")
    labels = [c.label for c in report.per_class]
    width = max(5, len(str(int(report.confusion_matrix.max()))) + 1)
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    lines.append("true\\pred" + "".join(f"{label:>{width}}" for label in labels))
    for label, row in zip(labels, report.confusion_matrix, strict=True):
        lines.append(f"{label:>9}" + "".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines)
