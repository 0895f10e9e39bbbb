"""The DigitRecognizer API end to end: a real server on 127.0.0.1, a real channel, real digits."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from service.client import DigitsClient, to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.recognition.model_metadata import ModelMetadata
from service.recognition.preprocess import normalize
from tests.harness import SHIPPED_MODEL, ServerThread, fixture_digits, render


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(max_batch_delay_ms=2.0, max_images_per_request=64) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[digits_pb2_grpc.DigitRecognizerStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield digits_pb2_grpc.DigitRecognizerStub(channel)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return fixture_digits()


def reference_probabilities(images: np.ndarray) -> np.ndarray:
    """What onnxruntime says in-process for raw 28x28 digits, normalized per the model's metadata."""
    session = ort.InferenceSession(str(SHIPPED_MODEL), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    return session.run(["probabilities"], {"image": normalize(images, meta.normalization)})[0]


def test_raw_digits_match_in_process_onnxruntime(stub, digits) -> None:
    images, _ = digits
    request = digits_pb2.RecognizeRequest(images=[to_image(img) for img in images[:64]])
    reply = stub.Recognize(request, timeout=30)
    assert len(reply.predictions) == 64
    got = np.array([list(p.probabilities) for p in reply.predictions], dtype=np.float32)
    np.testing.assert_allclose(got, reference_probabilities(images[:64]), atol=1e-5)
    assert [p.digit for p in reply.predictions] == got.argmax(axis=1).tolist()
    assert all(abs(p.confidence - max(p.probabilities)) < 1e-7 for p in reply.predictions)
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-4)
    assert reply.model.name == "lenet5" and reply.model.version


def test_float32_raw_pixels_equal_uint8(stub, digits) -> None:
    images, _ = digits
    as_uint8 = stub.Recognize(digits_pb2.RecognizeRequest(images=[to_image(images[0])]), timeout=30)
    as_float = stub.Recognize(digits_pb2.RecognizeRequest(
        images=[to_image(images[0].astype(np.float32) / 255.0)]), timeout=30)
    np.testing.assert_allclose(as_uint8.predictions[0].probabilities, as_float.predictions[0].probabilities,
                               atol=1e-5)


def test_rendered_client_images_are_recognised(stub, digits) -> None:
    """Black ink on white, various sizes, offsets and formats (PNG, JPEG, RGBA PNG, GIF, BMP, WebP)."""
    images, labels = digits
    rng = np.random.default_rng(7)
    formats = [("PNG", False), ("JPEG", False), ("PNG", True), ("BMP", False), ("GIF", False), ("WEBP", False)]
    payloads = []
    for index, img in enumerate(images):
        size = int(rng.integers(40, 200))
        canvas = (size + int(rng.integers(10, 120)), size + int(rng.integers(10, 120)))
        offset = (int(rng.integers(0, canvas[0] - size + 1)), int(rng.integers(0, canvas[1] - size + 1)))
        fmt, rgba = formats[index % len(formats)]
        payloads.append(render(img, size, canvas, offset, fmt, rgba))
    predicted: list[int] = []
    for start in range(0, len(payloads), 32):
        chunk = payloads[start:start + 32]
        reply = stub.Recognize(digits_pb2.RecognizeRequest(
            images=[digits_pb2.Image(encoded=p) for p in chunk]), timeout=30)
        predicted.extend(p.digit for p in reply.predictions)
    accuracy = float(np.mean(np.array(predicted) == labels))
    assert len(predicted) == len(labels) >= 200
    assert accuracy >= 0.97, f"accuracy on rendered client images {accuracy:.3f}"


def test_concurrent_callers_each_get_their_own_results_in_order(server, digits) -> None:
    """Many callers with distinct digits and request sizes, all at once: every caller's replies are
    exactly the in-process predictions for its own images, in its order."""
    images, _ = digits
    expected = reference_probabilities(images)
    rng = np.random.default_rng(1)
    jobs = []
    for _ in range(120):
        count = int(rng.integers(1, 9))
        jobs.append(rng.choice(len(images), size=count, replace=False))

    def call(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with DigitsClient(server.target) as client:
            reply = client.recognize([images[i] for i in indices])
        return indices, np.array([r.probabilities for r in reply.predictions], dtype=np.float32)

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(call, jobs))
    for indices, got in results:
        np.testing.assert_allclose(got, expected[indices], atol=1e-5)


def test_requests_arriving_together_share_batches(digits) -> None:
    """120 requests of 1..8 images sent at once coalesce into a few full batches (a 200 ms batch delay
    lets them gather however loaded the machine is), and each caller still gets exactly its rows."""
    images, _ = digits
    expected = reference_probabilities(images)
    rng = np.random.default_rng(2)
    jobs = [rng.choice(len(images), size=int(rng.integers(1, 9)), replace=False) for _ in range(120)]
    with ServerThread(max_batch_delay_ms=200, max_batch_size=64) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = digits_pb2_grpc.DigitRecognizerStub(channel)
        futures = [stub.Recognize.future(digits_pb2.RecognizeRequest(images=[to_image(images[i]) for i in job]),
                                         timeout=60) for job in jobs]
        for job, future in zip(jobs, futures, strict=True):
            got = np.array([list(p.probabilities) for p in future.result().predictions], dtype=np.float32)
            np.testing.assert_allclose(got, expected[job], atol=1e-5)
        registry = server.server.metrics.registry
        batches = registry.get_sample_value("digits_batch_size_count") or 0.0
        inferred = registry.get_sample_value("digits_batch_size_sum")
    assert inferred == sum(len(job) for job in jobs)
    assert batches <= len(jobs) / 4, f"{batches:.0f} batches for {len(jobs)} requests sent together"


def test_stream_answers_every_image_by_id(stub, digits) -> None:
    images, _ = digits
    expected = reference_probabilities(images[:40]).argmax(axis=1)

    def messages() -> Iterator[digits_pb2.StreamRequest]:
        for i in range(40):
            yield digits_pb2.StreamRequest(id=f"img-{i}", image=to_image(images[i]))
        yield digits_pb2.StreamRequest(id="broken", image=digits_pb2.Image(encoded=b"not an image"))
        yield digits_pb2.StreamRequest(id="after-broken", image=to_image(images[0]))

    replies = {r.id: r for r in stub.RecognizeStream(messages(), timeout=30)}
    assert len(replies) == 42
    for i in range(40):
        assert replies[f"img-{i}"].prediction.digit == expected[i]
    assert replies["broken"].WhichOneof("result") == "error"
    assert replies["broken"].error.code == "INVALID_ARGUMENT"
    assert "cannot decode" in replies["broken"].error.message
    assert replies["after-broken"].prediction.digit == expected[0]
    assert replies["img-0"].model.name == "lenet5"


def test_health_and_reflection_list_the_service(server) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "digits.v1.DigitRecognizer"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"digits.v1.DigitRecognizer", "grpc.health.v1.Health"} <= names
