"""/metrics tells the exact truth: a known mix of requests (good, bad, streamed, refused for a full
queue, expired or cancelled in the queue) goes to a real server, and every counter and histogram count
in a real HTTP scrape, parsed with prometheus_client's own parser, matches it."""

from __future__ import annotations

import collections
import hashlib
import queue
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import grpc
import onnxruntime as ort
import pytest

from service.client import REJECTIONS, to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from tests.harness import SHIPPED_MODEL, Scrape, ServerThread, fixture_digits, free_port, render, scrape, wait_until

# High enough that the real model's replies fall on both sides of it: some are rejected as uncertain.
UNCERTAIN_BELOW = 0.99999
HISTOGRAMS = ("digits_request_duration_seconds", "digits_preprocess_duration_seconds",
              "digits_queue_wait_seconds", "digits_inference_duration_seconds", "digits_batch_size")
UNDECODABLE = digits_pb2.Image(encoded=b"definitely not an image file")


@dataclass
class Sent:
    """What the test sent and what came back: the expectation for every counter."""

    requests: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    images: collections.Counter[str] = field(default_factory=collections.Counter)
    replies: list[digits_pb2.Prediction] = field(default_factory=list)
    model: digits_pb2.ModelRef | None = None


def lockstep(stub: digits_pb2_grpc.DigitRecognizerStub,
             messages: Iterable[digits_pb2.StreamRequest]) -> list[digits_pb2.StreamResponse]:
    """RecognizeStream that sends each message only after the previous one was answered, so every image
    is its own batch and the batch count is known exactly."""
    answered: queue.Queue[None] = queue.Queue()

    def requests() -> Iterator[digits_pb2.StreamRequest]:
        for message in messages:
            yield message
            answered.get(timeout=30)

    replies = []
    for reply in stub.RecognizeStream(requests(), timeout=30):
        replies.append(reply)
        answered.put(None)
    return replies


@pytest.fixture(scope="module")
def traffic() -> Iterator[tuple[Sent, Scrape, ServerThread]]:
    """7 good Recognize calls (1..4 images, raw and PNG), 4 bad ones that fail on different paths,
    and a stream of 4 good images and 1 bad one, all sequential; then one scrape."""
    images, _ = fixture_digits()
    sent = Sent()
    with ServerThread(metrics_port=free_port(), reject_uncertain_below=UNCERTAIN_BELOW,
                      max_images_per_request=8) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = digits_pb2_grpc.DigitRecognizerStub(channel)
        next_digit = 0
        for call, count in enumerate([1, 2, 3, 4, 1, 2, 3]):
            batch = images[next_digit:next_digit + count]
            next_digit += count
            as_png = call % 2 == 1
            request = digits_pb2.RecognizeRequest(images=[
                digits_pb2.Image(encoded=render(img, 56, (80, 70), (10, 7))) if as_png else to_image(img)
                for img in batch])
            reply = stub.Recognize(request, timeout=30)
            sent.replies.extend(reply.predictions)
            sent.model = reply.model
            sent.requests["Recognize", "OK"] += 1
            sent.images["Recognize"] += count
        huge = digits_pb2.Image(raw=digits_pb2.RawPixels(width=100_000, height=100_000,
                                                         dtype=digits_pb2.DTYPE_UINT8))
        no_dtype = digits_pb2.Image(raw=digits_pb2.RawPixels(width=28, height=28, data=bytes(784)))
        for bad, code in [([], grpc.StatusCode.INVALID_ARGUMENT),  # no images
                          ([to_image(images[0]), UNDECODABLE], grpc.StatusCode.INVALID_ARGUMENT),  # decoding
                          ([no_dtype], grpc.StatusCode.INVALID_ARGUMENT),  # protobuf -> payload
                          ([huge], grpc.StatusCode.RESOURCE_EXHAUSTED)]:  # pixel limit
            with pytest.raises(grpc.RpcError) as caught:
                stub.Recognize(digits_pb2.RecognizeRequest(images=bad), timeout=30)
            assert caught.value.code() == code
            sent.requests["Recognize", code.name] += 1
            sent.images["Recognize"] += len(bad)
        stream = [digits_pb2.StreamRequest(id=f"s{i}", image=to_image(images[next_digit + i])) for i in range(4)]
        stream.insert(2, digits_pb2.StreamRequest(id="bad", image=UNDECODABLE))
        replies = lockstep(stub, stream)
        assert [r.id for r in replies] == ["s0", "s1", "bad", "s2", "s3"]
        for reply in replies:
            ok = reply.WhichOneof("result") == "prediction"
            sent.requests["RecognizeStream", "OK" if ok else reply.error.code] += 1
            if ok:
                sent.replies.append(reply.prediction)
        sent.images["RecognizeStream"] += len(stream)
        yield sent, scrape(server.server.metrics_port), server


def test_requests_counted_once_by_rpc_and_status(traffic) -> None:
    sent, metrics, _ = traffic
    exported = {(lab["rpc"], lab["code"]): v for lab, v in metrics.samples["digits_requests_total"] if v}
    assert exported == dict(sent.requests) == {
        ("Recognize", "OK"): 7, ("Recognize", "INVALID_ARGUMENT"): 3, ("Recognize", "RESOURCE_EXHAUSTED"): 1,
        ("RecognizeStream", "OK"): 4, ("RecognizeStream", "INVALID_ARGUMENT"): 1}
    assert metrics.by("digits_images_received_total", "rpc") == dict(sent.images) == {
        "Recognize": 16 + 4, "RecognizeStream": 5}
    for rpc in ("Recognize", "RecognizeStream"):
        answered = sum(n for (r, _), n in sent.requests.items() if r == rpc)
        assert metrics.value("digits_request_duration_seconds_count", rpc=rpc) == answered
    assert metrics.value("digits_inflight_requests") == 0
    assert metrics.value("digits_queue_depth") == 0
    assert metrics.total("digits_rejected_requests_total") == 0


def test_pipeline_histograms_count_every_stage_exactly(traffic) -> None:
    sent, metrics, _ = traffic
    good_requests = 7 + 4  # unary calls and stream messages that were decoded and inferred
    inferred_images = len(sent.replies)
    assert inferred_images == 16 + 4
    assert metrics.value("digits_preprocess_duration_seconds_count") == good_requests
    assert metrics.value("digits_queue_wait_seconds_count") == good_requests
    # Sequential calls: every good request is its own batch, i.e. one session.run each.
    assert metrics.value("digits_inference_duration_seconds_count") == good_requests
    assert metrics.value("digits_batch_size_count") == good_requests
    assert metrics.value("digits_batch_size_sum") == inferred_images
    assert metrics.value("digits_batch_size_bucket", le="4.0") == good_requests  # none had more than 4
    assert metrics.value("digits_batch_size_bucket", le="1.0") == 2 + 4  # two 1-image calls, the stream
    for name in HISTOGRAMS:
        assert_histogram_consistent(metrics, name)


def test_predictions_by_digit_equal_the_replies(traffic) -> None:
    sent, metrics, _ = traffic
    assert len(sent.replies) == 20
    accepted = collections.Counter(str(p.digit) for p in sent.replies if p.accepted)
    assert metrics.by("digits_predictions_total", "digit") == dict(accepted)
    assert {lab["digit"] for lab, _ in metrics.samples["digits_predictions_total"]} == set("0123456789")
    rejected = collections.Counter(REJECTIONS[p.rejection] for p in sent.replies if not p.accepted)
    assert rejected["uncertain"] == sum(p.confidence < UNCERTAIN_BELOW for p in sent.replies) > 0
    assert metrics.by("digits_rejected_predictions_total", "reason") == dict(rejected)
    assert {lab["reason"] for lab, _ in metrics.samples["digits_rejected_predictions_total"]} == {
        "no_ink", "not_a_digit", "uncertain"}


def test_model_info_names_the_served_file(traffic) -> None:
    sent, metrics, server = traffic
    assert sent.model is not None
    provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() \
        else "CPUExecutionProvider"
    assert metrics.samples["digits_model_info"] == [({
        "name": sent.model.name, "version": sent.model.version, "provider": provider,
        "sha256": hashlib.sha256(SHIPPED_MODEL.read_bytes()).hexdigest()}, 1.0)]
    assert 0 < metrics.value("digits_model_load_duration_seconds") < 60
    assert metrics.value("digits_queue_capacity") == server.config.max_queue
    [(build, one)] = metrics.samples["digits_build_info"]
    assert one == 1 and build["version"] and build["onnxruntime"] == ort.__version__


def test_process_metrics_and_naming_conventions(traffic) -> None:
    _, metrics, _ = traffic
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds",
                 "process_open_fds", "python_gc_collections_total", "python_info"):
        assert name in metrics.names, name
    ours = {name: kind for name, kind in metrics.types.items() if not name.startswith(("process_", "python_"))}
    assert ours and all(name.startswith("digits_") and not name.startswith("digits_digits") for name in ours)
    for name, kind in ours.items():
        if kind == "counter":
            assert {s for s in metrics.names if s.startswith(name)} == {name + "_total"}, name
        if kind == "histogram" and name not in ("digits_batch_size", "digits_reading_digits"):  # counts
            assert name.endswith("_seconds"), name
    assert not any(s.endswith("_created") for s in metrics.names)  # no duplicate timestamp series
    for name in HISTOGRAMS[:-1]:  # LeNet-5 runs in microseconds: buckets must resolve below 1 ms
        bounds = [float(lab["le"]) for lab, _ in metrics.samples[name + "_bucket"]]
        assert sum(b < 0.001 for b in set(bounds)) >= 4, name


def assert_histogram_consistent(metrics: Scrape, name: str) -> None:
    """Per series: buckets never decrease and the +Inf bucket equals _count."""
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = collections.defaultdict(list)
    for labels, value in metrics.samples[name + "_bucket"]:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        series[rest].append((float(labels["le"]), value))
    assert series, name
    for rest, buckets in series.items():
        counts = [v for _, v in sorted(buckets)]
        assert counts == sorted(counts), (name, rest)
        assert counts[-1] == metrics.value(name + "_count", **dict(rest)), (name, rest)


def test_full_queue_expired_deadline_and_cancellation_are_counted() -> None:
    """A small queue and a batch delay longer than the test hold requests in the queue: one expires
    there, one is cancelled by its caller, one waits, a 2-image request no longer fits and is refused at
    once, and a last one fills the batch, which then runs. Every step waits for what it needs to see,
    and no batch can run before the last one arrives."""
    digit = to_image(fixture_digits()[0][0])
    request = digits_pb2.RecognizeRequest(images=[digit])
    with ServerThread(metrics_port=free_port(), max_queue=4, max_batch_size=4, max_batch_delay_ms=600_000) \
            as server, grpc.insecure_channel(server.target) as channel:
        stub = digits_pb2_grpc.DigitRecognizerStub(channel)
        recognizer = server.server.recognizer
        assert recognizer is not None
        port = server.server.metrics_port

        expiring = stub.Recognize.future(request, timeout=2.0)
        wait_until(lambda: recognizer.queued_images == 1, what="first request queued")
        with pytest.raises(grpc.RpcError) as caught:
            expiring.result()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        abandoned = stub.Recognize.future(request, timeout=30)
        wait_until(lambda: recognizer.queued_images == 2, what="second request queued")
        abandoned.cancel()
        wait_until(lambda: scrape(port).value("digits_requests_total", rpc="Recognize", code="CANCELLED") == 1,
                   what="the server to see the cancellation")

        waiting = stub.Recognize.future(request, timeout=30)
        wait_until(lambda: recognizer.queued_images == 3, what="third request queued")
        with pytest.raises(grpc.RpcError) as caught:
            stub.Recognize(digits_pb2.RecognizeRequest(images=[digit, digit]), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queue" in caught.value.details()
        last = stub.Recognize(request, timeout=30)  # the 4th queued image: a full batch runs at once
        assert len(last.predictions) == 1 and len(waiting.result().predictions) == 1
        metrics = scrape(port)

    assert metrics.by("digits_requests_total", "code") == {
        "OK": 2, "DEADLINE_EXCEEDED": 1, "CANCELLED": 1, "RESOURCE_EXHAUSTED": 1}
    assert metrics.by("digits_rejected_requests_total", "reason") == {"deadline": 1, "cancelled": 1, "queue_full": 1}
    assert metrics.value("digits_images_received_total", rpc="Recognize") == 6
    assert metrics.value("digits_request_duration_seconds_count", rpc="Recognize") == 5
    assert metrics.value("digits_preprocess_duration_seconds_count") == 5  # all five were decoded
    # Only the two requests that waited their turn reached inference; the others were dropped or refused.
    assert metrics.value("digits_queue_wait_seconds_count") == 2
    assert metrics.value("digits_inference_duration_seconds_count") == 1
    assert metrics.value("digits_batch_size_count") == 1 and metrics.value("digits_batch_size_sum") == 2
    assert metrics.total("digits_predictions_total") == 2
    assert metrics.value("digits_queue_depth") == metrics.value("digits_inflight_requests") == 0
    assert metrics.value("digits_queue_capacity") == 4
