"""Operators read the logs: a JSON object per line with --log-format json (readable text by default),
a start-up line with the settings, one line per failed request with its status and reason, periodic
and shutdown summaries that add up, and never a byte of image data."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from service.client import DigitsClient, to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.telemetry.logs import TextFormatter
from tests.harness import SHIPPED_MODEL, ServerThread, fixture_digits, free_port, wait_until

DIGITS = fixture_digits()[0]
# Distinctive bytes no log line may ever contain, in any spelling.
CANARY = b"LOG-CANARY-5f3c9a17"
GARBAGE = b"\x00\x01\x02\xfe" + CANARY * 4 + bytes(range(256))


def corrupt_png() -> bytes:
    """A real PNG of a digit whose compressed pixel data is overwritten with the canary."""
    out = io.BytesIO()
    Image.fromarray(np.tile(DIGITS[0], (4, 4))).save(out, format="PNG")
    data = bytearray(out.getvalue())
    start = data.index(b"IDAT") + 20
    data[start:start + len(CANARY) * 2] = CANARY * 2
    return bytes(data)


LEAKS = [CANARY.decode(), CANARY.hex(), base64.b64encode(GARBAGE).decode(), base64.b64encode(corrupt_png()).decode(),
         r"\x00\x01\x02", "00 01 02 fe"]


class ServeProcess:
    """`digits serve` in a subprocess; its stderr lines are collected as they arrive."""

    def __init__(self, *args: str) -> None:
        # Only the flags decide: DIGITS_* variables of the calling environment would change the settings.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITS_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", *args],
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.lines)]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self._reader.join(10)
        return code


@pytest.fixture(scope="module")
def json_run() -> Iterator[tuple[list[str], dict[str, int]]]:
    """A JSON-logging server that gets 3 good calls (6 images), 4 failing calls and a stream with
    one bad image out of 3, logs summaries every 0.2 s and is stopped with SIGTERM."""
    port, metrics_port = free_port(), free_port()
    server = ServeProcess("--model", str(SHIPPED_MODEL), "--port", str(port), "--metrics-port", str(metrics_port),
                          "--log-format", "json", "--summary-interval-s", "0.2", "--max-images-per-request", "8")
    try:
        wait_until(lambda: any('"serving"' in line for line in server.lines) or server.proc.poll() is not None,
                   timeout=60, what="server start-up")
        assert server.proc.poll() is None, "".join(server.lines)
        with DigitsClient(f"127.0.0.1:{port}", timeout=30) as client:
            for count in (1, 2, 3):
                assert len(client.recognize(list(DIGITS[:count])).predictions) == count
            for bad in ([GARBAGE], [DIGITS[0], corrupt_png()], [], [DIGITS[0]] * 9):
                with pytest.raises(grpc.RpcError):
                    client.recognize(bad)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = [digits_pb2.StreamRequest(id="a", image=to_image(DIGITS[1])),
                      digits_pb2.StreamRequest(id="canary", image=digits_pb2.Image(encoded=GARBAGE)),
                      digits_pb2.StreamRequest(id="b", image=to_image(DIGITS[2]))]
            replies = list(digits_pb2_grpc.DigitRecognizerStub(channel).RecognizeStream(iter(stream), timeout=30))
            assert len(replies) == 3
        # Images are counted once a request's size is accepted: the 9-image call over the limit of 8 is not.
        sent = {"requests": 3 + 4 + 3, "ok": 3 + 2, "images": 6 + 1 + 2 + 0 + 3, "inferred": 6 + 2}

        def summarised() -> int:
            return sum(r["requests"] for r in server.records() if r["message"] == "summary")
        wait_until(lambda: summarised() == sent["requests"], timeout=10, what="periodic summaries to add up")
        assert server.stop() == 0
    finally:
        server.proc.kill()
    yield server.lines, sent


def test_every_line_is_one_json_object(json_run) -> None:
    lines, _ = json_run
    assert lines
    for line in lines:
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        assert record["time"].endswith("Z") and record["level"] in ("info", "warning", "error")


def test_startup_line_summarises_model_and_settings(json_run) -> None:
    lines, _ = json_run
    [serving] = [r for r in map(json.loads, lines) if r["message"] == "serving"]
    assert serving["model"] == str(SHIPPED_MODEL)
    assert serving["name"] and serving["version"] and len(serving["sha256"]) == 64
    assert serving["providers"][-1] == "CPUExecutionProvider"
    assert serving["threads"] >= 1
    assert (serving["max_batch_size"], serving["max_batch_delay_ms"], serving["max_queue"]) == (64, 2.0, 2048)
    assert serving["grpc"].startswith("127.0.0.1:") and serving["metrics_port"] > 0
    assert serving["summary_interval_s"] == 0.2
    assert serving["rejection"] == "none (every image with ink is accepted)" or serving["rejection"].startswith(
        "not_a_digit if ")


def test_one_line_per_failed_request_with_status_and_reason(json_run) -> None:
    lines, _ = json_run
    failed = [r for r in map(json.loads, lines) if r["message"] == "request failed"]
    assert [(r["rpc"], r["code"]) for r in failed] == [("Recognize", "INVALID_ARGUMENT")] * 4 + [
        ("RecognizeStream", "INVALID_ARGUMENT")]
    reasons = [r["reason"] for r in failed]
    assert f"image 0: cannot decode image ({len(GARBAGE)} bytes)" in reasons[0]
    assert reasons[1].startswith("image 1: cannot decode PNG image")
    assert "no images" in reasons[2] and "limit is 8" in reasons[3] and "cannot decode" in reasons[4]
    assert all(r["level"] == "warning" and r["peer"] for r in failed)


def test_no_line_contains_image_data(json_run) -> None:
    lines, _ = json_run
    text = "".join(lines)
    for leak in LEAKS:
        assert leak not in text, f"image bytes in the log: {leak!r}"


def test_periodic_summaries_add_up_and_shutdown_summary_is_exact(json_run) -> None:
    lines, sent = json_run
    records = list(map(json.loads, lines))
    periodic = [r for r in records if r["message"] == "summary"]
    assert len(periodic) >= 1 and all(r["interval_s"] > 0 for r in periodic)
    assert sum(r["requests"] for r in periodic) == sent["requests"]
    assert sum(r["images"] for r in periodic) == sent["images"]
    [final] = [r for r in records if r["message"] == "shutdown summary"]
    assert (final["requests"], final["ok"], final["errors"]) == (sent["requests"], sent["ok"], {"INVALID_ARGUMENT": 5})
    assert final["images"] == sent["images"] and final["error_ratio"] == 0.5
    assert final["batches"] >= 1 and final["mean_batch_size"] == round(sent["inferred"] / final["batches"], 2)
    assert final["uptime_s"] > 0
    messages = [r["message"] for r in records]
    assert messages.index("shutdown summary") < messages.index("stopped") == len(messages) - 1


def test_text_format_is_readable_key_value_lines() -> None:
    """The default format: `time LEVEL logger: message key=value ...`, no JSON objects."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("service")
    previous = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        with ServerThread() as server, DigitsClient(server.target) as client:
            client.recognize([DIGITS[0]])
            with pytest.raises(grpc.RpcError):
                client.recognize([GARBAGE])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    lines = out.getvalue().splitlines()
    assert not any(line.lstrip().startswith("{") for line in lines)
    serving = next(line for line in lines if "service.server.app: serving " in line)
    assert " INFO " in serving and "max_batch_size=64" in serving and 'providers=["' in serving
    failed = next(line for line in lines if "request failed" in line)
    assert " WARNING " in failed and "code=INVALID_ARGUMENT" in failed
    assert f'reason="image 0: cannot decode image ({len(GARBAGE)} bytes)' in failed
    final = next(line for line in lines if "shutdown summary" in line)
    assert "requests=2 ok=1 " in final and 'errors={"INVALID_ARGUMENT": 1}' in final
    for leak in LEAKS:
        assert leak not in out.getvalue()
