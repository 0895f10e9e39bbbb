"""`digits export --quantize int8`: static int8 quantization of an exported model.

onnxruntime's `quantize_static` in the QDQ format, weights per channel (int8, symmetric), activations
uint8 with ranges calibrated on real training digits run through the model's own normalization. The
Softmax stays float, so the served probabilities still sum to 1, and the model keeps float32 input
and outputs: the server loads it like the float model (`digits serve --model models/lenet5-int8.onnx`).
The float model's metadata_props are copied over; the version gets an ``-int8`` suffix and a
``quantization`` key says how it was made.

Needs onnxruntime and onnx only (no torch); `run_export_quantized` also exports the checkpoint first.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from service.recognition.model_metadata import PROBABILITIES_OUTPUT, ModelMetadata
from service.recognition.preprocess import normalize

CALIBRATION_DIGITS = 1000
CALIBRATION_BATCH = 50
INT8_SUFFIX = "-int8"
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Relu", "MaxPool", "Reshape"]  # everything but the Softmax


class QuantizeError(RuntimeError):
    """The model cannot be quantized, or the quantized model is not servable."""


class DigitCalibration(CalibrationDataReader):
    """Feeds real digits, normalized exactly as the server does, to the calibrator in batches."""

    def __init__(self, pixels: np.ndarray, metadata: ModelMetadata, batch: int = CALIBRATION_BATCH) -> None:
        inputs = normalize(pixels, metadata.normalization)
        self._batches = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
        self._name = metadata.input_name
        self._iter: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self._name: batch}

    def rewind(self) -> None:
        self._iter = iter(self._batches)


@dataclass(frozen=True)
class QuantizeResult:
    """The written int8 model and how closely it follows the float one."""

    path: Path
    metadata: ModelMetadata
    agreement: float  # share of check digits where int8 and float predict the same class
    max_probability_diff: float
    check_digits: int


def read_metadata(path: Path) -> ModelMetadata:
    """The serving metadata of an ONNX file."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)


def predict(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Probabilities [N, classes] of a model on uint8 digits, normalized per its metadata."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    inputs = {metadata.input_name: normalize(pixels, metadata.normalization)}
    return np.asarray(session.run([PROBABILITIES_OUTPUT], inputs)[0])


def quantize_model(fp32: Path, out: Path, calibration: np.ndarray, description: str, command: str = "",
                   check: np.ndarray | None = None, source: dict[str, str] | None = None) -> QuantizeResult:
    """Quantize `fp32` to `out` with `calibration` (uint8 digits [N, 28, 28], ink bright).

    `description` says where the calibration digits come from and `source` what was quantized (both
    recorded in the metadata; `source` defaults to the float file's sha256); `check` digits (default:
    the calibration ones) measure agreement with the float model.
    """
    metadata = read_metadata(fp32)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "int8.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_static logs "consider pre-processing" advice to root
        try:
            quantize_static(
                str(fp32), str(staged), DigitCalibration(calibration, metadata),
                quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=QUANTIZED_OPS, extra_options={"WeightSymmetric": True})
        except Exception as exc:  # onnxruntime.quantization raises plain exceptions of many kinds
            raise QuantizeError(f"cannot quantize {fp32}: {type(exc).__name__}: {exc}") from exc
        finally:
            root.setLevel(level)
        proto = onnx.load(str(staged))
    quantization = {"method": "onnxruntime quantize_static", "format": "QDQ", "weights": "int8 per-channel symmetric",
                    "activations": "uint8 asymmetric, MinMax calibration", "float_ops": ["Softmax"],
                    "calibration": description, **(source or {"float_model_sha256": _sha256(fp32)})}
    props = metadata.to_props()
    props.update({"model_version": metadata.version + INT8_SUFFIX, "quantization": json.dumps(quantization),
                  **({"command": command} if command else {})})
    del proto.metadata_props[:]
    for key, value in sorted(props.items()):
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out), save_as_external_data=False)
    _check_servable(out)
    digits = calibration if check is None else check
    float_probs, int8_probs = predict(fp32, digits), predict(out, digits)
    agreement = float((float_probs.argmax(axis=1) == int8_probs.argmax(axis=1)).mean())
    return QuantizeResult(out, read_metadata(out), agreement, float(np.abs(float_probs - int8_probs).max()),
                          len(digits))


def _check_servable(path: Path) -> None:
    """Load it exactly as `digits serve` does (signature, metadata, warm-up); refuse it otherwise."""
    from service.recognition.model import ModelLoadError, load_model

    try:
        load_model(path, "cpu", threads=1)
    except ModelLoadError as exc:
        path.unlink(missing_ok=True)
        raise QuantizeError(f"the quantized model is not servable: {exc}") from exc


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def calibration_digits(checkpoint: dict[str, Any], data_dir: str | None) -> tuple[np.ndarray, str]:
    """Real training digits for calibration: the run's own training split (never its validation or
    test digits) when its data is reachable, else the validation digits stored in the checkpoint."""
    from training.data import DataError, prepare_splits

    config = checkpoint["config"]
    source = data_dir or config.get("data_dir")
    if source:
        try:
            splits = prepare_splits(source, config["val_size"], config["test_size"], config["split_seed"])
            picks = np.random.default_rng(0).permutation(len(splits.train))[:CALIBRATION_DIGITS]
            return (splits.train.images[np.sort(picks)],
                    f"{len(picks)} training digits of {source} (the run's train split, default_rng(0) draw)")
        except (DataError, OSError, KeyError):
            pass
    pixels = checkpoint["parity_images"].numpy()
    return pixels, f"{len(pixels)} validation digits stored in the checkpoint"


def run_export_quantized(args: argparse.Namespace, command: str) -> int:
    """`digits export --quantize int8`: export the checkpoint to float ONNX, quantize it to --out."""
    from training.data import display_path
    from training.evaluate import evaluate
    from training.export import export_checkpoint
    from training.train import load_checkpoint

    out = Path(args.out)
    if out == Path("models/lenet5.onnx"):  # never overwrite the float model by default
        out = Path("models/lenet5-int8.onnx")
    checkpoint = load_checkpoint(args.checkpoint)
    pixels, description = calibration_digits(checkpoint, args.data_dir)
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = export_checkpoint(args.checkpoint, Path(scratch) / "float.onnx", version=args.version,
                                 command=command)
        try:
            result = quantize_model(fp32.path, out, pixels, description, command=command,
                                    check=checkpoint["parity_images"].numpy(),
                                    source={"checkpoint": str(args.checkpoint),
                                            "checkpoint_sha256": _sha256(Path(args.checkpoint))})
        except QuantizeError as exc:
            print(f"digits export: error: {exc}", file=sys.stderr)
            return 1
        heldout = Path(checkpoint["config"].get("out_dir", "")) / "heldout"
        figures = {}
        if (heldout / "t10k-images-idx3-ubyte.gz").is_file() or (heldout / "t10k-images-idx3-ubyte").is_file():
            figures = {name: evaluate(path, heldout, "test").accuracy
                       for name, path in (("float", fp32.path), ("int8", out))}
    card = out.with_suffix(".json")
    card.write_text(json.dumps({
        "model": out.name, "sha256": _sha256(out), "size_bytes": out.stat().st_size,
        "name": result.metadata.name, "version": result.metadata.version,
        "accuracy": {"heldout": display_path(heldout) if figures else None,
                     **{k: round(v, 4) for k, v in figures.items()}},
        "agreement_with_float": {"digits": result.check_digits, "same_class": result.agreement,
                                 "max_abs_diff_probabilities": result.max_probability_diff},
        "reproduce": command, "metadata": result.metadata.to_props()}, indent=2) + "\n")
    accuracy = (f"; held-out accuracy float {figures['float']:.2%}, int8 {figures['int8']:.2%}"
                if figures else "")
    print(f"wrote {out} and {card}: int8 predicts the float model's class on {result.agreement:.2%} of "
          f"{result.check_digits} validation digits{accuracy}")
    return 0
