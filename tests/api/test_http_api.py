"""HTTP/REST: the Open Inference Protocol REST routes driven by the real `tritonclient.http`, `/v1/recognize`
with image files, the page, JSON errors, the body-size limit and the metrics, on a real server."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service.client import DigitsClient
from service.recognition.preprocess import normalize
from service.server.app import StartupError
from tests.harness import ServerThread, fixture_digits, free_port, multipart, render, request, wait_until

MAX_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(http_port=free_port(), metrics_port=free_port(), max_message_bytes=MAX_BYTES,
                      max_images_per_request=64) as running:
        yield running


@pytest.fixture(scope="module")
def url(server: ServerThread) -> str:
    return f"127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    images, labels = fixture_digits()
    return images[:32], labels[:32]


@pytest.fixture(scope="module")
def recognized(server: ServerThread, digits) -> np.ndarray:
    with DigitsClient(server.target) as own:
        reply = own.recognize(list(digits[0]))
    return np.array([p.probabilities for p in reply.predictions], dtype=np.float32)


def json_error(status: int, body: bytes, expected_status: int, *fragments: str) -> None:
    assert status == expected_status, body
    error = json.loads(body)["error"]
    for fragment in fragments:
        assert fragment in error, error


def scrape(server: ServerThread) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = request(f"127.0.0.1:{server.server.metrics_port}", "GET", "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def normalized(server: ServerThread, images: np.ndarray) -> np.ndarray:
    return normalize(images, server.recognizer.model.metadata.normalization)


def test_health_and_metadata_with_tritonclient(server, client, url) -> None:
    version = server.recognizer.model.version
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lenet5") and client.is_model_ready("lenet5", version)
    assert client.get_server_metadata()["name"] == "digits"
    meta = client.get_model_metadata("lenet5")
    assert meta == client.get_model_metadata("lenet5", version)
    assert meta["name"] == "lenet5" and meta["versions"] == [version] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "accepted"]
    assert all(o["shape"] == [-1, 10] and o["datatype"] == "FP32" for o in meta["outputs"][:2])
    assert meta["outputs"][2] == {"name": "accepted", "datatype": "BOOL", "shape": [-1]}
    status, _, body = request(url, "GET", "/v2/health/live")
    assert (status, body) == (200, b"")  # the specification: the status is the answer, the body empty


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_agrees_with_recognize(server, client, digits, recognized, binary: bool) -> None:
    images = digits[0][:8]  # as JSON numbers, 32 digits would exceed this server's 256 KiB body limit
    tensor = triton.InferInput("image", [len(images), 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(normalized(server, images), binary_data=binary)
    result = client.infer("lenet5", [tensor], request_id="r1",
                          outputs=[triton.InferRequestedOutput(name, binary_data=binary)
                                   for name in ("probabilities", "logits")])
    np.testing.assert_allclose(result.as_numpy("probabilities"), recognized[:8], atol=1e-5)
    assert result.as_numpy("logits").shape == (len(images), 10)
    response = result.get_response()
    assert response["id"] == "r1" and response["model_name"] == "lenet5"
    assert [o["name"] for o in response["outputs"]] == ["probabilities", "logits"]


def test_uint8_pixels_and_default_outputs(client, digits, recognized) -> None:
    images, labels = digits
    tensor = triton.InferInput("image", [len(images), 1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(images[:, None])
    result = client.infer("lenet5", [tensor])  # no outputs named: all of them
    np.testing.assert_allclose(result.as_numpy("probabilities"), recognized, atol=1e-5)
    accuracy = float((result.as_numpy("probabilities").argmax(axis=1) == labels).mean())
    assert accuracy >= 0.95, f"accuracy {accuracy:.3f} on {len(labels)} real digits"


def test_plain_json_infer_nested_data(server, url, digits, recognized) -> None:
    """What a curl user sends: one JSON document, nested data, no tritonclient."""
    doc = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 1, 28, 28],
                       "data": digits[0][:2, None].tolist()}], "outputs": [{"name": "probabilities"}]}
    status, headers, body = request(url, "POST", "/v2/models/lenet5/infer", json.dumps(doc).encode(),
                                    {"Content-Type": "application/json"})
    assert status == 200 and headers["content-type"].startswith("application/json")
    reply = json.loads(body)
    assert reply["model_name"] == "lenet5" and [o["name"] for o in reply["outputs"]] == ["probabilities"]
    out = reply["outputs"][0]
    assert out["shape"] == [2, 10] and out["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 10), recognized[:2], atol=1e-5)


def test_infer_errors_with_tritonclient(server, client, digits) -> None:
    one = normalized(server, digits[0][:1])

    def infer(model: str, array: np.ndarray, datatype: str = "FP32", **kwargs) -> InferenceServerException:
        tensor = triton.InferInput("image", list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=False)
        with pytest.raises(InferenceServerException) as caught:
            client.infer(model, [tensor], **kwargs)
        return caught.value

    error = infer("lenet5", one.reshape(1, 784))
    assert error.status() == "400" and "shape [1, 784]; expected [-1, 1, 28, 28]" in error.message()
    error = infer("mnist", one)
    assert error.status() == "404" and "unknown model 'mnist'" in error.message()
    error = infer("lenet5", one, model_version="7")
    assert error.status() == "404" and "no version '7'" in error.message()
    error = infer("lenet5", np.full((1, 1, 28, 28), 300, dtype=np.int32), "INT32")
    assert error.status() == "400" and "datatype 'INT32'" in error.message()
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("mnist")
    assert caught.value.status() == "404"
    assert not client.is_model_ready("lenet5", "7")


BINARY_HEADER = (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], '
                 b'"parameters": {"binary_data_size": 3136}}]}')


@pytest.mark.parametrize(("body", "headers", "fragment"), [
    (b"{not json", {}, "not valid JSON"),
    (b"[1, 2]", {}, "must be a JSON object"),
    (b'{"inputs": 3}', {}, "'inputs' must be a list"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [1, 2]}]}', {},
     "has 2 values; shape [1, 1, 28, 28] needs 784"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [["a"]]}]}', {},
     "data must be numbers, not strings"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [[1], 2]}]}', {},
     "must be a (nested) list of numbers"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28], '
     b'"data": ' + json.dumps([True] * 784).encode() + b"}]}", {}, "data must be numbers, not booleans"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 1, 28, 28], "data": [1]}]}', {},
     "has batch dimension -1: a request says how many images it sends"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28], '
     b'"data": ' + json.dumps([0] * 784).encode() + b'}], "outputs": [{"name": "probabilities", '
     b'"parameters": {"binary_data": "no"}}]}', {}, "parameter 'binary_data' must be true or false, got 'no'"),
    (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28], '
     b'"data": ' + json.dumps([999] * 784).encode() + b"}]}", {}, "values must be integers 0..255"),
    (b'{"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "data": []}]}', {}, "needs 'datatype'"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28]}]}', {}, "has no 'data'"),
    (b'{"inputs": []}' + b"\0" * 8, {"Inference-Header-Content-Length": "99"}, "must be an integer 0..22"),
    (BINARY_HEADER + b"\0" * 100, {"Inference-Header-Content-Length": str(len(BINARY_HEADER))},
     "declares binary_data_size 3136; the body carries 100 bytes"),
])
def test_bad_infer_bodies_get_400_naming_the_problem(url, body: bytes, headers, fragment: str) -> None:
    status, _, reply = request(url, "POST", "/v2/models/lenet5/infer", body, headers)
    json_error(status, reply, 400, fragment)


def test_recognize_raw_body_and_multipart(url, server, digits) -> None:
    images, labels = digits
    version = server.recognizer.model.version
    correct = 0
    for index, (image, label) in enumerate(zip(images[:10], labels[:10], strict=True)):
        png = render(image, 140, (200, 180), (30, 20), "PNG")
        if index % 2:
            body, kind = multipart("image", f"digit-{index}.png", png)
        else:
            body, kind = png, "image/png"
        status, headers, reply = request(url, "POST", "/v1/recognize", body, {"Content-Type": kind})
        assert status == 200 and headers["content-type"].startswith("application/json"), reply
        answer = json.loads(reply)
        assert set(answer) == {"digit", "confidence", "probabilities", "accepted", "rejection", "model"}
        assert answer["accepted"] is (answer["rejection"] is None)
        assert answer["model"] == {"name": "lenet5", "version": version}
        assert len(answer["probabilities"]) == 10 and abs(sum(answer["probabilities"]) - 1) < 1e-4
        assert answer["confidence"] == max(answer["probabilities"])
        assert answer["digit"] == int(np.argmax(answer["probabilities"]))
        correct += answer["digit"] == label
    assert correct >= 9, f"{correct}/10 rendered digits recognised"
    jpeg = render(images[0], 100, (120, 120), (10, 10), "JPEG")
    status, _, reply = request(url, "POST", "/v1/recognize", jpeg, {"Content-Type": "application/octet-stream"})
    assert status == 200 and json.loads(reply)["digit"] == labels[0]


def test_bad_recognize_requests_get_4xx_json_naming_the_problem(url) -> None:
    png = render(fixture_digits()[0][0], 56, (64, 64), (4, 4))
    cases = [
        ((b"", "image/png"), 400, "the body is empty"),
        ((b"hello", "text/plain"), 415, "Content-Type 'text/plain' is not an image"),
        ((b"definitely not a png", "image/png"), 400, "cannot decode image"),
        (multipart("comment", None, b"hi", "text/plain"), 400, "has no file field"),
        (multipart("image", "empty.png", b""), 400, "field 'image' is empty"),
        ((b"--x\r\ngarbage", "multipart/form-data; boundary=zzz"), 400, "multipart"),
    ]
    for (body, kind), expected, fragment in cases:
        status, _, reply = request(url, "POST", "/v1/recognize", body, {"Content-Type": kind})
        json_error(status, reply, expected, fragment)
    json_error(*request(url, "GET", "/nowhere")[::2], 404, "no route GET /nowhere")
    status, headers, reply = request(url, "GET", "/v1/recognize")
    json_error(status, reply, 405, "GET is not allowed on /v1/recognize")
    assert headers["allow"] == "POST"
    # The server keeps serving.
    status, _, reply = request(url, "POST", "/v1/recognize", png, {"Content-Type": "image/png"})
    assert status == 200


def test_oversized_bodies_are_refused_before_being_read_whole(url) -> None:
    big = b"\x89PNG" + b"\0" * MAX_BYTES
    for path in ("/v1/recognize", "/v2/models/lenet5/infer"):
        status, _, reply = request(url, "POST", path, big, {"Content-Type": "image/png"})
        json_error(status, reply, 413, f"request body of {len(big)} bytes exceeds the limit of {MAX_BYTES} bytes")

    # Without a Content-Length (chunked), the limit applies while reading: raw body and multipart.
    def chunks(payload: bytes) -> Iterator[bytes]:
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start:start + 64 * 1024]

    status, _, reply = request(url, "POST", "/v1/recognize", chunks(big), {"Content-Type": "image/png"})
    json_error(status, reply, 413, f"exceeds the limit of {MAX_BYTES} bytes")
    body, kind = multipart("image", "big.png", big)
    status, _, reply = request(url, "POST", "/v1/recognize", chunks(body), {"Content-Type": kind})
    json_error(status, reply, 413, f"exceeds the limit of {MAX_BYTES} bytes")


def test_the_page_is_self_contained(url) -> None:
    status, headers, body = request(url, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert '<canvas id="pad"' in page and 'id="clear"' in page and "/v1/recognize" in page
    assert "http://" not in page and "https://" not in page  # no CDN: everything comes from this process


def test_http_requests_are_counted_in_the_metrics(server, url, client, digits) -> None:
    before = scrape(server)
    png = render(digits[0][0], 56, (64, 64), (4, 4))
    assert request(url, "POST", "/v1/recognize", png, {"Content-Type": "image/png"})[0] == 200
    assert request(url, "POST", "/v1/recognize", b"nope", {"Content-Type": "image/png"})[0] == 400
    tensor = triton.InferInput("image", [5, 1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(digits[0][:5, None])
    client.infer("lenet5", [tensor])
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("digits_requests_total", rpc="POST /v1/recognize", code="OK") == 1
    assert delta("digits_requests_total", rpc="POST /v1/recognize", code="INVALID_ARGUMENT") == 1
    assert delta("digits_images_received_total", rpc="POST /v1/recognize") == 2
    assert delta("digits_requests_total", rpc="POST /v2/models/{model}/infer", code="OK") == 1
    assert delta("digits_images_received_total", rpc="POST /v2/models/{model}/infer") == 5
    assert delta("digits_batch_size_sum") == 6  # same batcher as gRPC


def test_shutdown_finishes_http_requests_in_flight_then_refuses(digits) -> None:
    """A request waiting in the batcher when stop() begins is answered; then the port is closed."""
    port = free_port()
    # A long batch delay keeps the request queued while the server is told to stop.
    running = ServerThread(http_port=port, max_batch_delay_ms=500, max_batch_size=64).start()
    url = f"127.0.0.1:{port}"
    png = render(digits[0][0], 56, (64, 64), (4, 4))
    with ThreadPoolExecutor(1) as pool:
        try:
            assert request(url, "GET", "/v2/health/ready")[0] == 200
            pending = pool.submit(request, url, "POST", "/v1/recognize", png, {"Content-Type": "image/png"})
            registry = running.server.metrics.registry
            wait_until(lambda: registry.get_sample_value("digits_queue_depth") == 1, what="the request to queue")
        finally:
            running.stop(grace=10)
        status, _, body = pending.result(timeout=30)
    assert status == 200 and json.loads(body)["digit"] == digits[1][0]
    assert not running.server.ready
    with pytest.raises(ConnectionRefusedError):
        request(url, "GET", "/v2/health/live")


def test_http_port_in_use_is_a_clear_startup_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
            ServerThread(http_port=port).start()
