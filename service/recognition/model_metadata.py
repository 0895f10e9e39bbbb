"""The contract between training and serving: what an ONNX model must carry in its `metadata_props`.

Training writes these keys when it exports (`ModelMetadata.to_props`); the server and `digits evaluate`
read them back (`ModelMetadata.from_props`) and never guess: a model without them is refused.
Every value is a string (ONNX metadata_props are string->string); structured values are JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = "1"

# Keys every servable model must carry.
REQUIRED_KEYS = (
    "digits.schema",
    "model_name",
    "model_version",
    "input_name",
    "input_layout",
    "input_shape",
    "input_dtype",
    "normalization",
    "ink_polarity",
    "labels",
    "output_names",
)

# Optional keys. A model without them still serves: every prediction is then accepted (the server
# warns at start-up), so models exported before rejection existed keep working.
REJECTION_KEY = "rejection"
CALIBRATION_KEY = "calibration"

# Scores a rejection rule may threshold, computed per image from the model's two outputs:
#   max_probability  the largest (calibrated) probability
#   logsumexp        log(sum(exp(logits))), the negative free energy (Liu et al. 2020): low for inputs
#                    unlike the training digits, and for outlier-exposure negatives by construction
#   max_logit        the largest logit
REJECTION_SCORES = ("max_probability", "logsumexp", "max_logit")

INPUT_NAME = "image"
LOGITS_OUTPUT = "logits"
PROBABILITIES_OUTPUT = "probabilities"


class MetadataError(ValueError):
    """The model's metadata is missing, malformed or inconsistent; the message names the key."""


@dataclass(frozen=True)
class Normalization:
    """How pixels become model input: ``x = (pixel * scale - mean) / std``.

    ``pixel`` is the 8-bit intensity with ink bright (MNIST convention), so ``scale`` is 1/255.
    """

    scale: float
    mean: float
    std: float

    def to_json(self) -> str:
        return json.dumps({"scale": self.scale, "mean": self.mean, "std": self.std}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Normalization:
        try:
            raw = json.loads(text)
            norm = cls(scale=float(raw["scale"]), mean=float(raw["mean"]), std=float(raw["std"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise MetadataError(
                f"metadata 'normalization' must be JSON with scale, mean, std: {text!r} ({exc})"
            ) from exc
        if not norm.std > 0 or not norm.scale > 0:
            raise MetadataError(f"metadata 'normalization' needs scale > 0 and std > 0, got {text!r}")
        return norm


@dataclass(frozen=True)
class Threshold:
    """Reject when `score` (one of REJECTION_SCORES) is below `below`."""

    score: str
    below: float

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "below": self.below}


@dataclass(frozen=True)
class Rejection:
    """When a prediction is not accepted, chosen by training on its own validation digits.

    Checked in order: `not_a_digit` (ink unlike any digit), then `uncertain` (a digit, but not
    clearly which). Blank images never reach the model: the no-ink test on the pixels (see
    `service.recognition.ink`) rejects them first, with `no_ink` settings when given here.
    `strokes` holds the thresholds of the strokes test on the pixels (`service.recognition.strokes`:
    filled shapes and grey pictures are ``not_a_digit`` too); empty for models older than 2.2.0.
    `extra` carries how the thresholds were chosen and what they measured (free-form).
    """

    not_a_digit: Threshold
    uncertain: Threshold
    no_ink: Mapping[str, float] = field(default_factory=dict)
    strokes: Mapping[str, float] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        body: dict[str, Any] = dict(self.extra)
        body.update({"not_a_digit": self.not_a_digit.to_dict(), "uncertain": self.uncertain.to_dict()})
        if self.no_ink:
            body["no_ink"] = dict(self.no_ink)
        if self.strokes:
            body["strokes"] = dict(self.strokes)
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Rejection:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError("not a JSON object")
            rules = {name: _threshold(raw[name], name) for name in ("not_a_digit", "uncertain")}
            no_ink = {str(k): float(v) for k, v in dict(raw.get("no_ink", {})).items()}
            strokes = {str(k): float(v) for k, v in dict(raw.get("strokes", {})).items()}
            if any(v != v for v in strokes.values()):
                raise ValueError("strokes: threshold is NaN")
        except (ValueError, TypeError, KeyError) as exc:
            raise MetadataError(
                f"metadata {REJECTION_KEY!r} must be JSON with not_a_digit and uncertain, each "
                f"{{\"score\": one of {list(REJECTION_SCORES)}, \"below\": number}}: {exc}") from exc
        extra = {k: v for k, v in raw.items() if k not in ("not_a_digit", "uncertain", "no_ink", "strokes")}
        return cls(not_a_digit=rules["not_a_digit"], uncertain=rules["uncertain"], no_ink=no_ink, strokes=strokes,
                   extra=extra)


def _threshold(raw: Any, name: str) -> Threshold:
    score, below = str(raw["score"]), float(raw["below"])
    if score not in REJECTION_SCORES:
        raise ValueError(f"{name}: unknown score {score!r}")
    if below != below:  # NaN would accept everything silently
        raise ValueError(f"{name}: threshold is NaN")
    return Threshold(score=score, below=below)


@dataclass(frozen=True)
class Calibration:
    """How the served `probabilities` were calibrated. The exported graph applies it already
    (softmax(logits / temperature)), so the server only reports it."""

    temperature: float
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({**self.extra, "method": "temperature", "temperature": self.temperature}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        try:
            raw = json.loads(text)
            temperature = float(raw["temperature"])
        except (ValueError, TypeError, KeyError) as exc:
            raise MetadataError(f"metadata {CALIBRATION_KEY!r} must be JSON with a temperature: {exc}") from exc
        if not temperature > 0:
            raise MetadataError(f"metadata {CALIBRATION_KEY!r} needs temperature > 0, got {temperature}")
        return cls(temperature=temperature,
                   extra={k: v for k, v in raw.items() if k not in ("method", "temperature")})


@dataclass(frozen=True)
class ModelMetadata:
    """Everything a server needs to know about a model, read from (or written to) the ONNX file."""

    name: str
    version: str
    normalization: Normalization
    labels: tuple[str, ...]
    input_name: str = INPUT_NAME
    input_layout: str = "NCHW"
    input_shape: tuple[int, int, int] = (1, 28, 28)
    input_dtype: str = "float32"
    ink_polarity: str = "light_on_dark"
    output_names: tuple[str, ...] = (LOGITS_OUTPUT, PROBABILITIES_OUTPUT)
    rejection: Rejection | None = None
    calibration: Calibration | None = None
    # Provenance and quality figures: free-form strings (training data, sha256, accuracy, commit, ...).
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return self.input_shape[1]

    @property
    def width(self) -> int:
        return self.input_shape[2]

    def to_props(self) -> dict[str, str]:
        """The `metadata_props` dictionary to store in the ONNX file."""
        props = dict(self.extra)
        props.update(
            {
                "digits.schema": SCHEMA_VERSION,
                "model_name": self.name,
                "model_version": self.version,
                "input_name": self.input_name,
                "input_layout": self.input_layout,
                "input_shape": json.dumps(list(self.input_shape)),
                "input_dtype": self.input_dtype,
                "normalization": self.normalization.to_json(),
                "ink_polarity": self.ink_polarity,
                "labels": json.dumps(list(self.labels)),
                "output_names": json.dumps(list(self.output_names)),
            }
        )
        if self.rejection is not None:
            props[REJECTION_KEY] = self.rejection.to_json()
        if self.calibration is not None:
            props[CALIBRATION_KEY] = self.calibration.to_json()
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> ModelMetadata:
        """Parse and validate `metadata_props`; raises `MetadataError` naming the first problem."""
        missing = [key for key in REQUIRED_KEYS if key not in props]
        if missing:
            raise MetadataError(
                f"model metadata is missing {', '.join(missing)} "
                "(export the model with `digits export`, which writes them)"
            )
        if props["digits.schema"] != SCHEMA_VERSION:
            raise MetadataError(
                f"model metadata schema {props['digits.schema']!r} is not supported (expected {SCHEMA_VERSION!r})"
            )
        shape = _json_list(props, "input_shape")
        if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise MetadataError(f"metadata 'input_shape' must be [channels, height, width], got {shape!r}")
        if shape[0] != 1:
            raise MetadataError(f"metadata 'input_shape' must have 1 (grayscale) channel, got {shape!r}")
        labels = tuple(str(v) for v in _json_list(props, "labels"))
        if not labels:
            raise MetadataError("metadata 'labels' is empty")
        outputs = tuple(str(v) for v in _json_list(props, "output_names"))
        if props["input_layout"] != "NCHW":
            raise MetadataError(f"metadata 'input_layout' must be NCHW, got {props['input_layout']!r}")
        if props["input_dtype"] != "float32":
            raise MetadataError(f"metadata 'input_dtype' must be float32, got {props['input_dtype']!r}")
        if props["ink_polarity"] not in ("light_on_dark", "dark_on_light"):
            raise MetadataError(
                f"metadata 'ink_polarity' must be light_on_dark or dark_on_light, got {props['ink_polarity']!r}"
            )
        if not props["model_name"] or not props["model_version"]:
            raise MetadataError("metadata 'model_name' and 'model_version' must not be empty")
        structured = (*REQUIRED_KEYS, REJECTION_KEY, CALIBRATION_KEY)
        extra = {k: v for k, v in props.items() if k not in structured}
        return cls(
            name=props["model_name"],
            version=props["model_version"],
            normalization=Normalization.from_json(props["normalization"]),
            labels=labels,
            input_name=props["input_name"],
            input_layout=props["input_layout"],
            input_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
            input_dtype=props["input_dtype"],
            ink_polarity=props["ink_polarity"],
            output_names=outputs,
            rejection=Rejection.from_json(props[REJECTION_KEY]) if REJECTION_KEY in props else None,
            calibration=Calibration.from_json(props[CALIBRATION_KEY]) if CALIBRATION_KEY in props else None,
            extra=extra,
        )


def _json_list(props: Mapping[str, str], key: str) -> list[Any]:
    try:
        value = json.loads(props[key])
    except ValueError as exc:
        raise MetadataError(f"metadata {key!r} is not valid JSON: {props[key]!r}") from exc
    if not isinstance(value, list):
        raise MetadataError(f"metadata {key!r} must be a JSON list, got {props[key]!r}")
    return value
