"""Rejection through every protocol, on a real server: a blank image is `no_ink` wherever it is sent and
never reaches the model, a digit sent with it is answered as if alone, the server's flags override the
model's thresholds, and a model exported before rejection existed still serves, accepting everything,
with a warning at start-up."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from PIL import Image

from service.client import DigitsClient
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from tests.harness import (
    ServerThread,
    build_model,
    fixture_digits,
    free_port,
    multipart,
    render,
    request,
    shipped_metadata,
    wait_serving,
)


def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def blank_pages() -> list[bytes]:
    rng = np.random.default_rng(11)
    speck = np.full((240, 320), 255, np.uint8)
    speck[60:62, 200:203] = 20
    return [encoded(np.full((120, 90), 255, np.uint8)), encoded(np.zeros((40, 40), np.uint8), "BMP"),
            encoded(np.full((64, 64), 140, np.uint8), "JPEG"), encoded(speck),
            encoded(np.clip(240 + rng.normal(0, 6, (100, 150)), 0, 255).astype(np.uint8))]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(http_port=free_port(), metrics_port=free_port(), max_batch_delay_ms=1.0) as running:
        yield running


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return fixture_digits()


def test_blank_images_are_no_ink_over_digits_grpc_unary_and_stream(server) -> None:
    pages = blank_pages()
    with grpc.insecure_channel(server.target) as channel:
        stub = digits_pb2_grpc.DigitRecognizerStub(channel)
        reply = stub.Recognize(digits_pb2.RecognizeRequest(images=[digits_pb2.Image(encoded=p) for p in pages]),
                               timeout=30)
        stream = list(stub.RecognizeStream(iter([digits_pb2.StreamRequest(id=str(i), image=digits_pb2.Image(
            encoded=p)) for i, p in enumerate(pages)]), timeout=30))
    for prediction in [*reply.predictions, *(r.prediction for r in stream)]:
        assert not prediction.accepted and prediction.rejection == digits_pb2.REJECTION_NO_INK
        assert list(prediction.probabilities) == pytest.approx([0.1] * 10)  # never run: no opinion
    assert sorted(r.id for r in stream) == [str(i) for i in range(len(pages))]


def test_a_blank_image_never_reaches_the_model_and_its_neighbours_are_unaffected(server, digits) -> None:
    images, labels = digits
    registry = server.server.metrics.registry
    before = registry.get_sample_value("digits_batch_size_sum") or 0.0
    rejected_before = registry.get_sample_value("digits_rejected_predictions_total", {"reason": "no_ink"})
    blank = blank_pages()[0]
    mixed = [blank, render(images[0], 60, (90, 90), (10, 20)), blank, render(images[1], 40, (64, 64), (5, 5)),
             blank]
    with DigitsClient(server.target) as client:
        together = client.recognize(mixed).predictions
        alone = client.recognize([mixed[1], mixed[3]]).predictions
    assert [p.rejection for p in together] == ["no_ink", None, "no_ink", None, "no_ink"]
    assert [p.digit for p in (together[1], together[3])] == labels[:2].tolist()
    for a, b in zip((together[1], together[3]), alone, strict=True):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
    # Only the four digits (two in each request) went through session.run.
    assert (registry.get_sample_value("digits_batch_size_sum") or 0.0) - before == 4
    assert registry.get_sample_value("digits_rejected_predictions_total", {"reason": "no_ink"}) \
        - rejected_before == 3


def test_blank_images_are_no_ink_over_rest(server) -> None:
    url = f"127.0.0.1:{server.server.http_port}"
    for index, page in enumerate(blank_pages()):
        body, kind = multipart("image", "blank.png", page) if index % 2 else (page, "image/png")
        status, _, reply = request(url, "POST", "/v1/recognize", body, {"Content-Type": kind})
        assert status == 200, reply
        answer = json.loads(reply)
        assert answer["accepted"] is False and answer["rejection"] == "no_ink"


def test_the_v2_accepted_output_over_grpc_and_rest(server, digits) -> None:
    images, _ = digits
    batch = np.zeros((3, 1, 28, 28), np.uint8)  # blank, digit, blank: raw MNIST-style pixels
    batch[1, 0] = images[0]
    grpc_client = triton_grpc.InferenceServerClient(server.target)
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    try:
        for client, triton in ((grpc_client, triton_grpc), (http_client, triton_http)):
            tensor = triton.InferInput("image", list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch)
            result = client.infer("lenet5", [tensor], outputs=[triton.InferRequestedOutput("accepted"),
                                                               triton.InferRequestedOutput("probabilities")])
            assert result.as_numpy("accepted").tolist() == [False, True, False]
            assert result.as_numpy("probabilities")[1].argmax() == fixture_digits()[1][0]
            default = client.infer("lenet5", [tensor])  # the model's own outputs only, as before
            assert default.as_numpy("accepted") is None and default.as_numpy("logits") is not None
    finally:
        grpc_client.close()
        http_client.close()
    url = f"127.0.0.1:{server.server.http_port}"
    body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [3, 1, 28, 28],
                                   "data": batch.reshape(-1).tolist()}], "outputs": [{"name": "accepted"}]})
    status, _, reply = request(url, "POST", "/v2/models/lenet5/infer", body.encode(),
                               {"Content-Type": "application/json"})
    assert status == 200, reply
    [out] = json.loads(reply)["outputs"]
    assert out == {"name": "accepted", "datatype": "BOOL", "shape": [3], "data": [False, True, False]}


def test_the_predict_cli_shows_the_verdict(server, digits, tmp_path: Path) -> None:
    images, labels = digits
    files = []
    for name, data in (("seven.png", render(images[0], 80, (120, 100), (20, 10))), ("blank.png", blank_pages()[0])):
        (tmp_path / name).write_bytes(data)
        files.append(str(tmp_path / name))
    cli = [sys.executable, "-m", "service.cli", "predict", "--server", server.target, *files]
    text = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert [line.split("\t")[0] for line in text] == files
    assert text[0].split("\t")[1] == str(labels[0]) and text[0].split("\t")[3] == "accepted"
    assert text[1].split("\t")[3] == "no_ink"
    rows = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=60,
                                     check=True).stdout)
    assert [(r["accepted"], r["rejection"]) for r in rows] == [(True, None), (False, "no_ink")]


def test_flags_override_the_models_thresholds(digits) -> None:
    images, _ = digits
    # No model's confidence reaches 1.01: every inked image becomes `uncertain`; blanks stay `no_ink`.
    with ServerThread(reject_uncertain_below=1.01) as running, DigitsClient(running.target) as client:
        predictions = client.recognize([images[0], blank_pages()[0]]).predictions
    assert [p.rejection for p in predictions] == ["uncertain", "no_ink"]


def test_a_model_without_rejection_metadata_serves_and_accepts_with_a_warning(
        digits, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images, _ = digits
    props = shipped_metadata()
    props.pop("rejection", None)
    props.pop("calibration", None)
    old = build_model(tmp_path / "old.onnx", metadata=props)
    with caplog.at_level(logging.WARNING, logger="service.server.app"), \
            ServerThread(model=old) as running, DigitsClient(running.target) as client:
        predictions = client.recognize([*images[:8], blank_pages()[0]]).predictions
    assert all(p.accepted for p in predictions[:8])
    assert predictions[8].rejection == "no_ink"  # the no-ink test needs no metadata
    assert any("carries no rejection thresholds" in r.getMessage() for r in caplog.records)


def test_a_real_serve_process_warns_about_an_old_model_in_its_log(tmp_path: Path) -> None:
    props = shipped_metadata()
    props.pop("rejection", None)
    old = build_model(tmp_path / "old.onnx", metadata=props)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(old), "--port",
                                str(port), "--metrics-port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}")
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "carries no rejection thresholds" in stderr


def test_through_the_server_real_digits_pass_and_generated_non_digits_do_not(server, digits) -> None:
    """The shipped model's rule at default settings, on files as clients send them: the fixture's 300 real
    test digits are accepted, generated non-digits of kinds training never draws (other fonts, other
    symbols, words, doodles, photo-like noise, digit strings; not Fashion-MNIST) are rejected, blanks are
    no_ink. docs/training.md has the full-size figures (tests/rejection_report.py)."""
    from tests.rejection_report import blanks, non_digits, pictures, reasons
    from training.synth.clientstyle import EVAL_RENDER_SEED
    from training.synth.negatives import EVAL_KINDS

    images, _ = digits
    with DigitsClient(server.target, timeout=60) as client:
        real = reasons(client, list(pictures(images, EVAL_RENDER_SEED)))
        foreign = reasons(client, list(non_digits(list(EVAL_KINDS), 20, images)))
        blank = reasons(client, list(blanks(30)))
    assert real["accepted"] >= 0.98 * sum(real.values()), real
    assert foreign["accepted"] <= 0.15 * sum(foreign.values()), foreign
    assert blank == {"no_ink": 30}
