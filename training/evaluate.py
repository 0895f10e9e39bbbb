"""Measure an exported ONNX model on labelled IDX digits, exactly as the server would run it.

Needs only onnxruntime, numpy and Pillow (no torch): the input normalization comes from the model's own
metadata and goes through the server's `service.recognition.preprocess.normalize`; the rejection rule
is the model's own, applied by the server's `service.recognition.rejection.decide`.

Besides accuracy (with its Wilson 95 % interval), per-class figures and the confusion matrix: the
expected calibration error of the served probabilities, the share of digits rejected by reason and
the accuracy on the accepted ones; optionally, how many non-digits the rule rejects (generated ones
of the kinds training never draws, and Fashion-MNIST) with the AUROC of every score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.recognition import strokes
from service.recognition.model_metadata import LOGITS_OUTPUT, PROBABILITIES_OUTPUT, ModelMetadata
from service.recognition.preprocess import normalize
from training.data import load_split
from training.quality.calibration import ECE_BINS, Reliability, reliability
from training.quality.metrics import wilson
from training.quality.thresholds import Outputs, measure_digits, measure_negatives


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
    view: str = "mnist"
    """"mnist": the IDX arrays as they are; "client_style": each digit sent as a client would, first."""
    calibration: Reliability | None = None
    """Reliability bins of the served probabilities (their ECE is the headline)."""
    rejection: dict[str, Any] = field(default_factory=dict)
    """`quality.thresholds.measure_digits` under the model's rule (empty rule: everything accepted)."""
    has_rule: bool = False
    temperature: float | None = None
    negatives: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per non-digit set: `quality.thresholds.measure_negatives` (rejected shares, per kind, AUROC)."""
    outputs: dict[str, Outputs] = field(default_factory=dict, repr=False)
    """Raw outputs by set ("digits", then each negative set), for curves."""

    @property
    def accuracy_wilson95(self) -> tuple[float, float]:
        """Wilson 95 % interval of the accuracy."""
        return wilson(int(np.trace(self.confusion_matrix)), self.count)

    @property
    def ece(self) -> float:
        """Expected calibration error (15 equal-width bins) of the served probabilities."""
        return self.calibration.ece if self.calibration is not None else float("nan")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the `digits evaluate --json` output)."""
        bins = self.calibration
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "data": self.data,
            "split": self.split,
            "view": self.view,
            "accuracy": self.accuracy,
            "accuracy_wilson95": list(self.accuracy_wilson95),
            "count": self.count,
            "errors": self.count - int(np.trace(self.confusion_matrix)),
            "ece": self.ece,
            "ece_bins": ECE_BINS,
            "temperature": self.temperature,
            "rejection_rule": self.has_rule,
            "rejected": self.rejection.get("rejected"),
            "rejected_by_reason": self.rejection.get("rejected_by_reason"),
            "accuracy_on_accepted": self.rejection.get("accuracy_on_accepted"),
            "errors_rejected": self.rejection.get("errors_rejected"),
            "negatives": self.negatives,
            "per_class": [vars(c) for c in self.per_class],
            "confusion_matrix": self.confusion_matrix.tolist(),
            "reliability": None if bins is None else {
                "edges": bins.edges.tolist(), "counts": bins.counts.astype(int).tolist(),
                "accuracy": [None if v != v else v for v in bins.accuracy.tolist()],
                "confidence": [None if v != v else v for v in bins.confidence.tolist()]},
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


def run_model(session: ort.InferenceSession, metadata: ModelMetadata, pixels: np.ndarray,
              batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) [N, classes] for uint8 images [N, H, W] (ink bright, MNIST convention)."""
    if pixels.shape[1:] != (metadata.height, metadata.width):
        raise ModelError(
            f"images are {pixels.shape[1]}x{pixels.shape[2]}, the model expects {metadata.height}x{metadata.width}"
        )
    if metadata.ink_polarity == "dark_on_light":
        pixels = 255 - pixels  # IDX digits are light on dark
    classes = len(metadata.labels)
    logits = np.empty((pixels.shape[0], classes), dtype=np.float32)
    probabilities = np.empty((pixels.shape[0], classes), dtype=np.float32)
    buffer = np.empty((batch_size, 1, metadata.height, metadata.width), dtype=np.float32)
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size]
        inputs = normalize(chunk, metadata.normalization, out=buffer[: chunk.shape[0]])
        out = session.run([LOGITS_OUTPUT, PROBABILITIES_OUTPUT], {metadata.input_name: inputs})
        logits[start : start + chunk.shape[0]], probabilities[start : start + chunk.shape[0]] = out
    return logits, probabilities


def predict(
    session: ort.InferenceSession, metadata: ModelMetadata, pixels: np.ndarray, batch_size: int = 1000
) -> np.ndarray:
    """Predicted class index for each uint8 image [N, H, W] (ink bright, MNIST convention)."""
    return run_model(session, metadata, pixels, batch_size)[1].argmax(axis=1)


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
    model_path: str | Path,
    data_dir: str | Path,
    split: str = "test",
    batch_size: int = 1000,
    client_style: bool = False,
    synthetic_negatives: int = 0,
    fashion_mnist: str | Path | None = None,
) -> EvaluationReport:
    """Accuracy, calibration, rejection, per-class figures and confusion matrix of the ONNX model on
    `split` of `data_dir` (as clients send them with `client_style`).

    `synthetic_negatives` > 0 also measures that many generated non-digits of each kind training never
    draws (`training.synth.negatives.EVAL_KINDS`); `fashion_mnist` a directory with Fashion-MNIST's
    t10k-* files, both as the raw arrays and as clients would send the pictures.
    """
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    session, metadata = load_model(model_path)
    digits = load_split(data_dir, split)
    images = digits.images
    if client_style:
        from training.synth.clientstyle import EVAL_RENDER_SEED
        from training.synth.clientstyle import client_style as render

        images = render(images, EVAL_RENDER_SEED)
    logits, probabilities = run_model(session, metadata, images, batch_size)
    labels = digits.labels.astype(np.int64)
    matrix = confusion_matrix(labels, probabilities.argmax(axis=1), len(metadata.labels))
    rule = metadata.rejection
    outputs = {"digits": Outputs(logits, probabilities, labels, shapes=strokes.features(images))}
    negatives: dict[str, dict[str, Any]] = {}
    for name, (pixels, kinds) in _negative_sets(digits.images, synthetic_negatives, fashion_mnist).items():
        neg_logits, neg_probabilities = run_model(session, metadata, pixels, batch_size)
        outputs[name] = Outputs(neg_logits, neg_probabilities, kinds=kinds, shapes=strokes.features(pixels))
        negatives[name] = measure_negatives(rule, outputs[name], outputs["digits"])
    return EvaluationReport(
        model_name=metadata.name,
        model_version=metadata.version,
        data=digits.source,
        split=split,
        accuracy=float(np.trace(matrix) / max(1, len(digits))),
        count=len(digits),
        per_class=class_reports(matrix, metadata.labels),
        confusion_matrix=matrix,
        view="client_style" if client_style else "mnist",
        calibration=reliability(probabilities, labels) if len(labels) else None,
        rejection=measure_digits(rule, outputs["digits"]) if len(labels) else {},
        has_rule=rule is not None,
        temperature=metadata.calibration.temperature if metadata.calibration is not None else None,
        negatives=negatives,
        outputs=outputs,
    )


def _negative_sets(digits: np.ndarray, synthetic: int, fashion: str | Path | None) -> dict[str, tuple[np.ndarray,
                                                                                                     np.ndarray]]:
    """Non-digit sets by name: (uint8 [N, 28, 28] as the model receives them, kind per image)."""
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if synthetic > 0:
        from training.synth.negatives import NEGATIVES_EVAL_SEED, eval_counts, generate

        made = generate(eval_counts(synthetic), NEGATIVES_EVAL_SEED, digits)
        sets["synthetic_eval_kinds"] = (made.images, made.kinds)
    if fashion is not None:
        from training.synth.clientstyle import EVAL_RENDER_SEED, client_style

        clothes = load_split(fashion, "test").images
        kinds = np.full(len(clothes), "fashion_mnist", dtype=object)
        sets["fashion_mnist_raw"] = (clothes, kinds)
        sets["fashion_mnist_client_style"] = (client_style(clothes, EVAL_RENDER_SEED), kinds)
    return sets


def format_report(report: EvaluationReport) -> str:
    """Human-readable summary: accuracy, calibration, rejection, per-class table and confusion matrix."""
    errors = report.count - int(np.trace(report.confusion_matrix))
    low, high = report.accuracy_wilson95
    view = " (each digit sent as a client would)" if report.view == "client_style" else ""
    lines = [
        f"model {report.model_name} {report.model_version} on {report.split} split{view}: {report.data}",
        f"accuracy {report.accuracy:.4f} ({report.count - errors}/{report.count} correct, {errors} errors); "
        f"Wilson 95% interval {low:.4f}-{high:.4f}",
        f"ECE ({ECE_BINS} bins) {report.ece:.4f} of the served probabilities "
        + (f"(temperature {report.temperature:.4f} in the graph)" if report.temperature else "(uncalibrated)"),
    ]
    if report.has_rule and report.rejection:
        rejected, by_reason = report.rejection["rejected"], report.rejection["rejected_by_reason"]
        accepted = report.rejection["accuracy_on_accepted"]
        lines.append(f"rejected {rejected['value']:.4f} ({rejected['successes']}: " + ", ".join(
            f"{reason} {figure['successes']}" for reason, figure in by_reason.items())
            + f"); accuracy on the accepted {accepted['value']:.4f} ({accepted['successes']}/{accepted['count']})")
    else:
        lines.append("no rejection rule in the model: every digit accepted")
    for name, figures in report.negatives.items():
        auroc = figures.get("auroc", {})
        lines.append(f"{name}: {figures['rejected']['value']:.4f} of {figures['count']} rejected "
                     f"({figures['rejected_as_not_a_digit']['value']:.4f} as not_a_digit); AUROC "
                     + ", ".join(f"{score} {value:.4f}" for score, value in auroc.items()))
        if len(figures["by_kind"]) > 1:
            lines.append("  " + ", ".join(f"{kind} {f['value']:.3f}" for kind, f in figures["by_kind"].items()))
    lines += ["", "class  precision  recall      f1  support"]
    for c in report.per_class:
        lines.append(f"{c.label:>5}  {c.precision:9.4f}  {c.recall:6.4f}  {c.f1:6.4f}  {c.support:7d}")
    labels = [c.label for c in report.per_class]
    width = max(5, len(str(int(report.confusion_matrix.max()))) + 1)
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    lines.append("true\\pred" + "".join(f"{label:>{width}}" for label in labels))
    for label, row in zip(labels, report.confusion_matrix, strict=True):
        lines.append(f"{label:>9}" + "".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines)


def coverage_curves(report: EvaluationReport, metadata: ModelMetadata) -> dict[str, tuple[np.ndarray, np.ndarray,
                                                                                        tuple[float, float] | None]]:
    """Coverage-vs-accuracy curves for `plots.plot_coverage`: the real digits alone, ordered by the top
    probability, then the digits mixed with each non-digit set, ordered by the rule's not_a_digit score;
    each with the operating point of the model's rule (None without a rule)."""
    from training.quality.metrics import coverage_curve

    rule = metadata.rejection
    digits = report.outputs["digits"]
    assert digits.labels is not None
    correct = digits.probabilities.argmax(axis=1) == digits.labels

    def point(outputs: Outputs, right: np.ndarray) -> tuple[float, float] | None:
        if rule is None:
            return None
        accepted = outputs.decide(rule) == ""
        return float(accepted.mean()), float(right[accepted].mean()) if accepted.any() else 0.0

    curves = {f"{report.count} real digits": (*coverage_curve(digits.score("max_probability"), correct),
                                              point(digits, correct))}
    score = rule.not_a_digit.score if rule is not None else "max_probability"
    for name, negatives in report.outputs.items():
        if name == "digits":
            continue
        assert digits.shapes is not None and negatives.shapes is not None
        mixed = Outputs(np.concatenate([digits.logits, negatives.logits]),
                        np.concatenate([digits.probabilities, negatives.probabilities]),
                        shapes=np.concatenate([digits.shapes, negatives.shapes]))
        right = np.concatenate([correct, np.zeros(len(negatives.logits), bool)])
        curves[f"digits + {len(negatives.logits)} {name} (by {score})"] = (*coverage_curve(mixed.score(score), right),
                                                                           point(mixed, right))
    return curves
