"""`digits serve --workers N`: several processes on one port, metrics per worker that add up to what
was sent, signals forwarded to every worker, exit 0 after a drain, and no silent half-fleet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.client import to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.server.config import ServerConfig
from service.server.workers import worker_config
from tests.harness import SHIPPED_MODEL, fixture_digits, free_port, wait_until


class Fleet:
    """`digits serve --workers 2` in a subprocess, its JSON log lines collected as they come."""

    def __init__(self, *flags: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        while self.metrics_port + 1 == self.port:
            self.metrics_port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--model", str(SHIPPED_MODEL), "--workers", "2",
             "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--threads", "1",
             "--log-format", "json", *flags], stderr=subprocess.PIPE, text=True)
        self.records: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.records.append(json.loads(line))
            except ValueError:
                self.records.append({"message": line.rstrip()})

    def fleet_line(self) -> dict[str, Any] | None:
        return next((r for r in self.records if r.get("message") == "serving" and "workers" in r), None)

    def wait_serving(self) -> dict[str, Any]:
        wait_until(lambda: self.fleet_line() is not None or self.proc.poll() is not None, timeout=120,
                   what="both workers to serve")
        line = self.fleet_line()
        assert line is not None, self.records
        return line

    def scrape(self, worker: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port + worker}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._reader.join(10)


@pytest.fixture()
def fleet() -> Iterator[Fleet]:
    running = Fleet()
    try:
        yield running
    finally:
        running.stop()


def _ok_requests(sample: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sample.get(("digits_requests_total", (("code", "OK"), ("rpc", "Recognize"))), 0.0)


def test_two_workers_share_the_port_and_their_metrics_add_up(fleet: Fleet) -> None:
    line = fleet.wait_serving()
    assert line["workers"] == 2 and len(set(line["pids"])) == 2
    assert line["metrics_ports"] == [fleet.metrics_port, fleet.metrics_port + 1]
    images, _ = fixture_digits()
    request = digits_pb2.RecognizeRequest(images=[to_image(images[0]), to_image(images[1])])
    sent = 0
    # One channel is one connection and SO_REUSEPORT balances connections: use many.
    for _ in range(12):
        with grpc.insecure_channel(f"127.0.0.1:{fleet.port}",
                                   options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = digits_pb2_grpc.DigitRecognizerStub(channel)
            for _ in range(5):
                assert len(stub.Recognize(request, timeout=30).predictions) == 2
                sent += 1
    per_worker = [_ok_requests(fleet.scrape(i)) for i in (0, 1)]
    assert sum(per_worker) == sent == 60
    images_total = sum(fleet.scrape(i).get(("digits_images_received_total", (("rpc", "Recognize"),)), 0.0)
                       for i in (0, 1))
    assert images_total == 2 * sent
    for worker in (0, 1):  # each worker is a whole server, serving the model
        info = [(labels, v) for (name, labels), v in fleet.scrape(worker).items() if name == "digits_model_info"]
        assert len(info) == 1 and ("name", "lenet5") in info[0][0] and info[0][1] == 1.0


def test_sighup_reloads_every_worker_and_sigterm_drains_to_exit_0(fleet: Fleet) -> None:
    fleet.wait_serving()
    os.kill(fleet.proc.pid, signal.SIGHUP)
    reloaded = ("digits_model_reloads_total", (("result", "success"),))
    wait_until(lambda: all(fleet.scrape(i).get(reloaded) == 1.0 for i in (0, 1)), timeout=60,
               what="both workers to reload")
    assert fleet.stop() == 0, '\n'.join(map(str, fleet.records))
    stopped = [r for r in fleet.records if r.get("message") == "stopped"]
    assert any(r.get("clean") is True for r in stopped)  # the parent, after both workers drained
    assert sum(1 for r in stopped if "drain_seconds" in r) == 2  # each worker's own drain


def test_a_worker_that_dies_takes_the_fleet_down_with_exit_1(fleet: Fleet) -> None:
    line = fleet.wait_serving()
    os.kill(line["pids"][1], signal.SIGKILL)
    assert fleet.proc.wait(60) == 1
    assert any(r.get("message", "").startswith("worker exited unexpectedly") for r in fleet.records)


def test_a_fleet_that_cannot_start_says_why() -> None:
    failing = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--model", "/nonexistent.onnx", "--workers", "2",
         "--port", "0", "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    assert failing.returncode == 1
    assert "model file not found" in failing.stderr


def test_each_worker_gets_its_own_metrics_port() -> None:
    cfg = ServerConfig(port=50051, metrics_port=9100, workers=3)
    assert [worker_config(cfg, i, 40000).metrics_port for i in range(3)] == [9100, 9101, 9102]
    assert {worker_config(cfg, i, 40000).port for i in range(3)} == {40000}
    assert worker_config(cfg.replace(metrics_port=0), 2, 1).metrics_port == 0
    # --threads 0: the CPUs are shared out, not given to every worker
    assert [worker_config(cfg, 0, 1, cpus=c).threads for c in (16, 2)] == [4, 1]
    assert worker_config(cfg.replace(threads=3), 0, 1, cpus=16).threads == 3
    with pytest.raises(ValueError, match="beyond 65535"):
        worker_config(cfg.replace(metrics_port=65535), 1, 1)
