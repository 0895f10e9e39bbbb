"""The int8 model: static quantization calibrated on real digits keeps the serving contract (metadata,
float I/O, probabilities that sum to 1) and the accuracy, and `digits serve` takes it like the float one."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from service.client import to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.recognition.model import load_model
from service.recognition.model_metadata import ModelMetadata
from service.recognition.preprocess import normalize
from tests.harness import ROOT, SHIPPED_MODEL, ServerThread, fixture_digits
from training.quantize import INT8_SUFFIX, predict, quantize_model, read_metadata

SHIPPED_INT8 = ROOT / "models" / "lenet5-int8.onnx"


def _accuracy(model: Path, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, images).argmax(axis=1) == labels).mean())


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    calibration, _ = fixture_digits("train")  # real training digits; the t10k ones stay for measuring
    out = tmp_path_factory.mktemp("int8") / "int8.onnx"
    result = quantize_model(SHIPPED_MODEL, out, calibration, "500 fixture training digits", command="pytest")
    assert result.check_digits == len(calibration) and result.agreement >= 0.97
    return out


def test_quantized_model_keeps_the_contract_and_says_how_it_was_made(quantized: Path) -> None:
    float_meta, int8_meta = read_metadata(SHIPPED_MODEL), read_metadata(quantized)
    assert int8_meta.version == float_meta.version + INT8_SUFFIX
    assert (int8_meta.name, int8_meta.normalization, int8_meta.labels, int8_meta.input_shape) == (
        float_meta.name, float_meta.normalization, float_meta.labels, float_meta.input_shape)
    how = json.loads(int8_meta.extra["quantization"])
    assert how["format"] == "QDQ" and "per-channel" in how["weights"] and "500 fixture" in how["calibration"]
    assert int8_meta.extra["command"] == "pytest"
    ops = {node.op_type for node in onnx.load(str(quantized)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Softmax" in ops


def test_quantized_model_is_servable_with_float_io_and_normalized_probabilities(quantized: Path) -> None:
    model = load_model(quantized, "cpu", threads=1)  # exactly the server's checks and warm-up
    images, _ = fixture_digits()
    logits, probabilities = model.run(normalize(images[:64], model.metadata.normalization))
    assert logits.dtype == probabilities.dtype == np.float32 and probabilities.shape == (64, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_quantized_accuracy_stays_within_a_point_of_float_on_held_out_digits(quantized: Path) -> None:
    images, labels = fixture_digits()
    assert len(labels) >= 300
    float_accuracy = _accuracy(SHIPPED_MODEL, images, labels)
    assert float_accuracy >= 0.95
    assert _accuracy(quantized, images, labels) >= float_accuracy - 0.01


def test_shipped_int8_model_matches_its_card_and_serves_real_digits() -> None:
    assert SHIPPED_INT8.is_file(), "models/lenet5-int8.onnx is shipped (digits export --quantize int8)"
    card = json.loads(SHIPPED_INT8.with_suffix(".json").read_text())
    meta = ModelMetadata.from_props(card["metadata"])
    assert meta.version.endswith(INT8_SUFFIX) and card["accuracy"]["int8"] >= card["accuracy"]["float"] - 0.003
    images, labels = fixture_digits()
    with ServerThread(model=SHIPPED_INT8) as server, grpc.insecure_channel(server.target) as channel:
        stub = digits_pb2_grpc.DigitRecognizerStub(channel)
        reply = stub.Recognize(digits_pb2.RecognizeRequest(images=[to_image(i) for i in images[:100]]), timeout=30)
    assert reply.model.version == meta.version
    assert np.mean([p.digit for p in reply.predictions] == labels[:100]) >= 0.95


def test_export_quantize_int8_end_to_end(short_run, tmp_path: Path) -> None:
    import argparse

    from training.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "m-int8.onnx"
    args = parser.parse_args(["export", "--checkpoint", str(short_run.best_checkpoint), "--quantize", "int8",
                              "--out", str(out), "--version", "0.0.1"])
    assert args.func(args) == 0
    meta = read_metadata(out)
    assert meta.version == "0.0.1-int8" and "--quantize int8" in meta.extra["command"]
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["agreement_with_float"]["same_class"] >= 0.9
    load_model(out, "cpu", threads=1)
