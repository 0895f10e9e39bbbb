"""`digits loadtest`: its statistics on known inputs, its error counting against real servers that
fail, accuracy under load with real digits, and the command end to end (bounded, JSON, image folders)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.perf.loadsource import load_images, prepare_requests, prepare_v2_requests, synthetic_images
from service.perf.loadstats import LoadStats, latency_summary, percentile
from service.perf.loadtest import PROTOCOLS, LoadSpec, run_load
from tests.harness import FIXTURE_DIR, ServerThread, free_port

# --- statistics on known inputs --------------------------------------------------------------------


def test_nearest_rank_percentiles_of_1_to_100_in_any_order() -> None:
    values = list(np.random.default_rng(3).permutation(np.arange(1, 101)).astype(float))
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile(values, 0.5) == 1  # the smallest value covers the first 1%
    assert percentile([7.0], 50) == percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0  # a recorded value, never an interpolated 2.5
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=60), st.floats(0.1, 100))
def test_percentile_is_a_recorded_value_with_p_percent_at_or_below_it(values: list[float], p: float) -> None:
    found = percentile(values, p)
    assert found in values
    data = np.array(values)
    assert (data <= found).mean() * 100 >= p - 1e-9
    assert (data < found).mean() * 100 < p  # and it is the smallest such value


def test_summary_figures_of_a_known_run() -> None:
    stats = LoadStats()
    for ms in range(1, 201):  # 1..200 ms, two images each, 150 of 200 predictions right
        stats.record_ok(ms / 1000, images=2, checked=2, correct=2 if ms <= 50 else 1)
    for code in ["UNAVAILABLE"] * 3 + ["DEADLINE_EXCEEDED"]:
        stats.record_error(code)
    summary = stats.summary(duration_s=4.0, stopped_by="requests")
    assert (summary.requests, summary.ok, summary.images, summary.error_count) == (204, 200, 400, 4)
    assert summary.errors == {"UNAVAILABLE": 3, "DEADLINE_EXCEEDED": 1}
    assert (summary.requests_per_s, summary.images_per_s) == (50.0, 100.0)
    assert summary.latency_s["p50"] == pytest.approx(0.100)
    assert summary.latency_s["p90"] == pytest.approx(0.180)
    assert summary.latency_s["p99"] == pytest.approx(0.198)
    assert summary.latency_s["max"] == pytest.approx(0.200)
    assert summary.latency_s["mean"] == pytest.approx(0.1005)
    assert summary.accuracy == pytest.approx(250 / 400)
    as_json = summary.to_json()
    assert as_json["latency_ms"] == {"p50": 100.0, "p90": 180.0, "p99": 198.0, "max": 200.0, "mean": 100.5}
    assert as_json["errors"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 3} and as_json["stopped_by"] == "requests"
    text = summary.format_text()
    assert "p99 198.000 ms" in text and "UNAVAILABLE 3" in text and "62.50%" in text


def test_a_run_without_successes_has_no_latency_and_valid_json() -> None:
    stats = LoadStats()
    stats.record_error("UNAVAILABLE")
    figures = stats.summary(1.0).to_json()
    assert figures["latency_ms"]["p50"] is None and figures["accuracy"] is None
    json.dumps(figures, allow_nan=False)
    assert all(math.isnan(v) for v in latency_summary([]).values())


def test_progress_intervals_cover_only_their_own_requests() -> None:
    stats = LoadStats()
    for _ in range(10):
        stats.record_ok(0.001, 1)
    first = stats.interval(1.0)
    stats.record_ok(0.005, 1)
    stats.record_error("INTERNAL")
    second = stats.interval(0.5)
    assert (first.ok, first.requests) == (10, 10)
    assert (second.ok, second.requests, second.error_count, second.requests_per_s) == (1, 2, 1, 2.0)
    assert second.latency_s["p50"] == 0.005
    assert "errors 1" in second.progress_line(1.5)


# --- against real servers --------------------------------------------------------------------------


class FlakyServicer(digits_pb2_grpc.DigitRecognizerServicer):
    """Answers calls 1, 3, 5, ... and fails every second call with UNAVAILABLE: an exact error mix."""

    def __init__(self) -> None:
        self.calls = 0

    async def Recognize(self, request: digits_pb2.RecognizeRequest,
                        context: grpc.aio.ServicerContext) -> digits_pb2.RecognizeResponse:
        self.calls += 1
        if self.calls % 2 == 0:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "every second call fails")
        return digits_pb2.RecognizeResponse(
            predictions=[digits_pb2.Prediction(digit=7, confidence=1.0) for _ in request.images])


@pytest.fixture()
def flaky_server() -> Iterator[tuple[str, FlakyServicer]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servicer = FlakyServicer()

    async def start() -> grpc.aio.Server:
        server = grpc.aio.server()
        digits_pb2_grpc.add_DigitRecognizerServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        return server

    port = free_port()
    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_errors_are_counted_exactly_by_status_code(flaky_server) -> None:
    target, servicer = flaky_server
    requests = prepare_requests(synthetic_images(8), batch=1, encoding="raw")
    summary = run_load(LoadSpec(target=target, concurrency=1, requests=40, duration_s=30), requests)
    assert servicer.calls == 40
    assert (summary.requests, summary.ok, summary.errors) == (40, 20, {"UNAVAILABLE": 20})
    assert summary.stopped_by == "requests"
    assert summary.latency_s["max"] < 30


def test_requests_refused_by_the_digits_server_are_counted_with_its_code() -> None:
    with ServerThread(max_images_per_request=4) as server:
        requests = prepare_requests(synthetic_images(16), batch=8, encoding="raw")
        summary = run_load(LoadSpec(target=server.target, concurrency=3, requests=12, duration_s=30), requests)
    assert (summary.requests, summary.ok, summary.errors) == (12, 0, {"INVALID_ARGUMENT": 12})


def test_accuracy_under_load_with_real_digits_raw_and_png() -> None:
    images = load_images(FIXTURE_DIR)
    assert images.labelled and len(images.images) >= 300
    with ServerThread() as server:
        for encoding in ("raw", "png"):
            requests = prepare_requests(images, batch=5, encoding=encoding)
            summary = run_load(LoadSpec(target=server.target, concurrency=8, requests=60, duration_s=60), requests)
            assert summary.ok == 60 and summary.error_count == 0
            assert summary.checked == summary.images == 300
            assert summary.accuracy is not None and summary.accuracy >= 0.95, (encoding, summary.accuracy)


def test_open_inference_protocol_load_checks_accuracy_too() -> None:
    images = load_images(FIXTURE_DIR)
    method, parse = PROTOCOLS["v2"]
    with ServerThread() as server:
        requests = prepare_v2_requests(images, batch=10)
        summary = run_load(LoadSpec(target=server.target, concurrency=4, requests=30, duration_s=60), requests,
                           method=method, parse=parse)
    assert (summary.ok, summary.error_count, summary.checked) == (30, 0, 300)
    assert summary.accuracy is not None and summary.accuracy >= 0.95


def test_open_loop_sends_the_requested_number_at_the_requested_rate() -> None:
    with ServerThread() as server:
        requests = prepare_requests(synthetic_images(4), batch=1, encoding="raw")
        started = time.perf_counter()
        summary = run_load(LoadSpec(target=server.target, concurrency=4, rate=200, requests=40, duration_s=30),
                           requests)
        elapsed = time.perf_counter() - started
    assert (summary.ok, summary.stopped_by) == (40, "requests")
    assert elapsed >= 0.1  # 40 Poisson arrivals at 200/s take about 0.2 s, not an instant burst


# --- the command -----------------------------------------------------------------------------------


def _loadtest(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "loadtest", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_command_prints_json_for_an_image_folder_with_labels(tmp_path: Path) -> None:
    digits = load_images(FIXTURE_DIR)
    for index in range(6):  # labels from the file name (7_x.png) and from the folder (7/x.png)
        pixels = digits.images[index]
        assert isinstance(pixels, np.ndarray)
        ink_on_paper = Image.fromarray(255 - pixels).resize((56, 56))
        label = int(digits.labels[index])
        path = tmp_path / (f"{label}_{index}.png" if index % 2 else f"{label}/{index}.png")
        path.parent.mkdir(exist_ok=True)
        out = io.BytesIO()
        ink_on_paper.save(out, format="PNG")
        path.write_bytes(out.getvalue())
    with ServerThread() as server:
        done = _loadtest("--server", server.target, "--images", str(tmp_path), "--encoding", "png",
                         "--requests", "12", "--concurrency", "2", "--warmup", "0", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["requests"], report["ok"], report["error_count"], report["checked"]) == (12, 12, 0, 12)
    assert report["accuracy"] >= 0.8 and report["latency_ms"]["p99"] > 0
    assert "6 image files" in report["source"]


def test_command_speaks_the_open_inference_protocol_and_checks_accuracy() -> None:
    with ServerThread() as server:
        done = _loadtest("--server", server.target, "--protocol", "v2", "--images", str(FIXTURE_DIR),
                         "--requests", "40", "--batch", "4", "--concurrency", "2", "--warmup", "0", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["requests"], report["ok"], report["error_count"]) == (40, 40, 0)
    assert report["checked"] == 160 and report["accuracy"] >= 0.95
    counted = server.server.metrics.registry.get_sample_value(
        "digits_requests_total", {"rpc": "ModelInfer", "code": "OK"})
    assert counted == 40  # they really went through ModelInfer


def test_command_is_bounded_in_time_and_reports_progress() -> None:
    with ServerThread() as server:
        started = time.perf_counter()
        done = _loadtest("--server", server.target, "--duration", "1", "--warmup", "0.2", "--concurrency", "4")
        elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert elapsed < 30
    assert "stopped by duration" in done.stdout and "requests/s" in done.stdout and "p99" in done.stdout
    assert "req/s" in done.stderr  # the live progress line


def test_command_against_nothing_fails_clearly_within_its_timeout() -> None:
    started = time.perf_counter()
    done = _loadtest("--server", f"127.0.0.1:{free_port()}", "--timeout", "1", "--duration", "1")
    assert done.returncode == 1 and "cannot connect" in done.stderr
    assert time.perf_counter() - started < 30


def test_command_refuses_bad_arguments() -> None:
    done = _loadtest("--server", "127.0.0.1:1", "--concurrency", "0")
    assert done.returncode == 2 and "concurrency must be >= 1" in done.stderr
    done = _loadtest("--server", "127.0.0.1:1", "--images", "/nonexistent/folder")
    assert done.returncode == 2 and "no such file or folder" in done.stderr
