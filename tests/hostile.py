"""Hostile but legitimate traffic, shared by tests/server/test_hostile.py and `make soak`
(tests/soak.py): a `digits serve` subprocess whose memory, CPU, threads and log can be measured, and
the requests that used to cost the server far more than they should."""

from __future__ import annotations

import gc
import io
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from service.client import to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.gen.inference import grpc_predict_v2_pb2 as v2
from service.perf.benchprocs import process_tree_cpu_s
from tests.harness import SHIPPED_MODEL, fixture_digits, free_port, request, wait_serving

MiB = 1024 * 1024
DIGITS, LABELS = fixture_digits()


class Served:
    """`digits serve` in a subprocess, its log in a file, its memory and CPU readable from /proc."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = tmp / "server.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--model", str(SHIPPED_MODEL), "--port", str(self.port),
             "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port), "--threads", "1",
             "--summary-interval-s", "0", *flags], stdout=self._log, stderr=subprocess.STDOUT)
        wait_serving(self.target)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def status(self, key: str) -> int:
        """A /proc/PID/status value: VmRSS and VmHWM in bytes, Threads as a count."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                value = int(line.split()[1])
                return value * 1024 if line.endswith("kB") else value
        raise KeyError(key)

    def reset_peak(self) -> int:
        """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); returns that RSS."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        return self.status("VmRSS")

    def cpu_s(self) -> float:
        value = process_tree_cpu_s(self.proc.pid)
        assert value is not None
        return value

    def log_bytes(self) -> int:
        self._log.flush()
        return self.log_path.stat().st_size

    def log_text(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self._log.close()


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", optimize=True)
    return out.getvalue()


def page_bomb(ink: bool = True) -> bytes:
    """A 5000 x 5000 page (25M pixels, the default --max-image-pixels) as a PNG of about 35 KB."""
    page = np.full((5000, 5000), 255, np.uint8)
    if ink:
        page[2000:2600, 2400:2520] = 0  # a "1"
    return png(page)


def recognize(target: str, images: list[digits_pb2.Image], timeout: float = 60) -> digits_pb2.RecognizeResponse:
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * MiB)]) as channel:
        return digits_pb2_grpc.DigitRecognizerStub(channel).Recognize(
            digits_pb2.RecognizeRequest(images=images), timeout=timeout)


def status_of(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def small_call_delays(target: str, during: Callable[[], object], calls: int = 30) -> list[float]:
    """Latencies of small sequential Recognize calls made while `during()` runs in another thread."""
    worker = threading.Thread(target=during)
    delays: list[float] = []
    with grpc.insecure_channel(target) as channel:
        stub = digits_pb2_grpc.DigitRecognizerStub(channel)
        one = digits_pb2.RecognizeRequest(images=[to_image(DIGITS[0])])
        stub.Recognize(one, timeout=30)  # warm channel
        # What is timed is the server: late in a full test run this process holds millions of objects,
        # and one of its own full garbage collections (seen: 280 ms) would count as the server's stall.
        collecting = gc.isenabled()
        gc.disable()
        try:
            worker.start()
            while worker.is_alive() and len(delays) < calls:
                started = time.perf_counter()
                stub.Recognize(one, timeout=30)
                delays.append(time.perf_counter() - started)
        finally:
            if collecting:
                gc.enable()
        worker.join(120)
    return delays


HOSTILE = ["small PNG declaring 25M pixels", "raw 4000x4000", "JSON with 1e6 keys", "16 MB typed FP32 tensor"]


def hostile_call(served: Served, kind: str) -> Callable[[], object]:
    """The request, built and serialised beforehand: the test process must not spend its own GIL
    building it while it times the small calls."""
    if kind == "JSON with 1e6 keys":
        doc = ("{" + ",".join(f'"k{i}": 0' for i in range(1_000_000)) + "}").encode()
        return lambda: request(served.http, "POST", "/v2/models/lenet5/infer", doc,
                               {"Content-Type": "application/json"})
    if kind == "16 MB typed FP32 tensor":
        tensor = v2.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1, 1, 28, 28])
        tensor.contents.fp32_contents.extend(np.zeros(4_000_000, np.float32).tolist())
        method, body = "/inference.GRPCInferenceService/ModelInfer", \
            v2.ModelInferRequest(model_name="lenet5", inputs=[tensor]).SerializeToString()
    else:
        if kind == "raw 4000x4000":
            raw = np.full((4000, 4000), 255, np.uint8)
            raw[1000:3000, 1900:2100] = 0
            image = to_image(raw)
        else:
            image = digits_pb2.Image(encoded=page_bomb())
        method, body = "/digits.v1.DigitRecognizer/Recognize", \
            digits_pb2.RecognizeRequest(images=[image]).SerializeToString()

    def send() -> None:
        with grpc.insecure_channel(served.target, options=[("grpc.max_send_message_length", 64 * MiB)]) as ch:
            status_of(lambda: ch.unary_unary(method)(body, timeout=60))
    return send


