"""Draining, proved on a real `digits serve` process: after SIGTERM (or SIGINT) a call made anew is refused
(gRPC UNAVAILABLE, HTTP 503) while calls already held in the batcher are still waiting, and those are then
answered OK; when --grace-period-s runs out first, the held calls are cancelled and the process still exits 0.

Each step waits for an observable state (the queue depth in a scrape, the health status), never a timer:
the batch delay is long (seconds) so that the held calls are certainly still held when the new ones are made.
"""

from __future__ import annotations

import http.client
import json
import queue
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from tests.harness import SHIPPED_MODEL, fixture_digits, free_port, render, scrape, wait_serving, wait_until

DIGITS, LABELS = fixture_digits()


class Serve:
    """`digits serve` with a long batch delay, so that calls wait in the batcher while we act."""

    def __init__(self, *flags: str) -> None:
        self.port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--model", str(SHIPPED_MODEL), "--port", str(self.port),
             "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port), "--threads", "1",
             "--max-batch-delay-ms", "4000", "--log-format", "json", *flags],
            stderr=subprocess.PIPE, text=True)
        wait_serving(self.target)
        self.channel = grpc.insecure_channel(self.target)
        self.stub = digits_pb2_grpc.DigitRecognizerStub(self.channel)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def queued(self) -> float:
        return scrape(self.metrics_port).value("digits_queue_depth")

    def watch_health(self) -> Iterator[health_pb2.HealthCheckResponse]:
        """grpc.health.v1 Watch: pushes every change (a Check made after the signal would be refused)."""
        return health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)

    def finish(self) -> tuple[int, str]:
        self.channel.close()
        _, stderr = self.proc.communicate(timeout=60)
        return self.proc.returncode, stderr


@pytest.fixture()
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def held_http_call(server: Serve, pool: ThreadPoolExecutor) -> Future[tuple[int, dict]]:
    def post() -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
        connection.request("POST", "/v1/recognize", render(DIGITS[1], 60, (90, 90), (10, 10)),
                           {"Content-Type": "image/png"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    return pool.submit(post)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_held_calls_are_answered_after_new_ones_were_refused(sig: signal.Signals,
                                                             pool: ThreadPoolExecutor) -> None:
    server = Serve("--grace-period-s", "20")
    try:
        request = digits_pb2.RecognizeRequest(images=[to_image(DIGITS[0])])
        held = server.stub.Recognize.future(request, timeout=60)
        held_http = held_http_call(server, pool)
        # A kept-alive HTTP connection from before the signal: its next call must be refused, not served.
        kept = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        kept.request("GET", "/v2/health/ready")
        assert kept.getresponse().read() == b""
        wait_until(lambda: server.queued() == 2, timeout=20, what="two calls held in the batcher")
        health = server.watch_health()
        assert next(health).status == health_pb2.HealthCheckResponse.SERVING

        server.proc.send_signal(sig)
        assert next(health).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Recognize(request, timeout=10)
        kept.request("POST", "/v1/recognize", render(DIGITS[2], 60, (90, 90), (10, 10)), {"Content-Type": "image/png"})
        answer = kept.getresponse()
        refused_http = (answer.status, json.loads(answer.read()))
        still_held = not held.done() and not held_http.done()

        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused_http[0] == 503 and refused_http[1]["code"] == "UNAVAILABLE"
        assert still_held, "the held calls finished before the new ones were refused: nothing was drained"
        assert held.result(timeout=30).predictions[0].digit == LABELS[0]
        status, body = held_http.result(timeout=30)
        assert (status, body["digit"]) == (200, LABELS[1])
    finally:
        server.proc.send_signal(signal.SIGTERM)
        code, stderr = server.finish()
    assert code == 0, stderr[-2000:]
    assert '"message": "stopped"' in stderr


def test_when_the_grace_period_runs_out_held_calls_are_cancelled_and_the_process_exits_zero() -> None:
    # The batch delay (4 s) outlasts the grace period (0.5 s): the held call is still queued when it ends.
    server = Serve("--grace-period-s", "0.5")
    try:
        held = server.stub.Recognize.future(digits_pb2.RecognizeRequest(images=[to_image(DIGITS[0])]), timeout=60)
        wait_until(lambda: server.queued() == 1, timeout=20, what="a call held in the batcher")
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as cut:
            held.result(timeout=30)
    finally:
        code, stderr = server.finish()
    # gRPC cancels what is still running when the grace ends; the client sees the call cut off.
    assert cut.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), cut.value
    assert code == 0, stderr[-2000:]
    assert '"message": "stopped"' in stderr


def test_a_stream_open_before_the_signal_is_served_to_its_end_and_a_new_one_is_refused() -> None:
    server = Serve("--grace-period-s", "20")
    try:
        messages: queue.Queue[digits_pb2.StreamRequest | None] = queue.Queue()
        replies = server.stub.RecognizeStream(iter(messages.get, None), timeout=60)
        messages.put(digits_pb2.StreamRequest(id="before", image=to_image(DIGITS[0])))
        assert next(replies).prediction.digit == LABELS[0]
        health = server.watch_health()
        assert next(health).status == health_pb2.HealthCheckResponse.SERVING

        server.proc.send_signal(signal.SIGTERM)
        assert next(health).status == health_pb2.HealthCheckResponse.NOT_SERVING
        late = digits_pb2.StreamRequest(id="late", image=to_image(DIGITS[1]))
        with pytest.raises(grpc.RpcError) as refused:
            list(server.stub.RecognizeStream(iter([late]), timeout=10))
        messages.put(digits_pb2.StreamRequest(id="during", image=to_image(DIGITS[3])))
        during = next(replies)
        assert server.proc.poll() is None, "the server exited while a stream was open"
        messages.put(None)  # the client ends its stream: now the server may go
        assert list(replies) == []
    finally:
        server.proc.send_signal(signal.SIGTERM)
        code, stderr = server.finish()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert during.WhichOneof("result") == "prediction", during
    assert (during.id, during.prediction.digit) == ("during", LABELS[3]), during
    assert code == 0, stderr[-2000:]
    assert '"message": "stopped"' in stderr


def test_a_stream_its_client_cancelled_does_not_hold_up_the_drain() -> None:
    server = Serve("--grace-period-s", "60")
    try:
        messages: queue.Queue[digits_pb2.StreamRequest | None] = queue.Queue()
        replies = server.stub.ReadStream(iter(messages.get, None), timeout=120)
        messages.put(digits_pb2.StreamRequest(id="first", image=to_image(DIGITS[0])))
        first = next(replies)
        replies.cancel()  # the client goes away without ending its stream
        with pytest.raises(grpc.RpcError) as cancelled:
            next(replies)
        server.proc.send_signal(signal.SIGTERM)
        code, stderr = server.finish()
    finally:
        messages.put(None)
        if server.proc.poll() is None:
            server.proc.kill()
    assert (first.id, first.WhichOneof("result"), first.reading.text) == ("first", "reading", str(LABELS[0]))
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED
    assert code == 0, stderr[-2000:]
    stopped = [json.loads(line) for line in stderr.splitlines() if '"message": "stopped"' in line]
    # A stream left counted as open would keep the drain waiting for the whole 60 s grace period.
    assert stopped and stopped[0]["drain_seconds"] < 30, stopped
