"""`digits bench`: measure, in one run on one machine, how fast the server is and what bounds it.

1. the ceiling: in-process onnxruntime on the same model and thread count, images/s at batch 1..256;
2. a bare grpc.aio unary round trip (a trivial servicer in its own process) - what any server pays;
3. `digits serve` (a subprocess, as users run it) with dynamic batching off and on, at the load
   points of `LOAD_POINTS`, for raw pixels and PNG files, with the server's CPU time per image read
   from /proc (utime + stime of the server and its worker processes);
4. 1 vs 2 worker processes, and the int8 model against fp32.

The client is the `digits loadtest` engine, in this process. Client and server share the machine's
cores, so absolute figures say as much about the machine as about the server: the targets are
ratios within one run. `benchreport` turns the results into docs/benchmarks.md and the plot.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from service.loadsource import ImageSet, PreparedRequest, load_images, prepare_requests
from service.loadstats import Summary, percentile
from service.loadtest import LoadGenerator, LoadSpec
from service.model import available_cpus, load_model
from service.preprocess import normalize

LOAD_POINTS = ((1, 1), (16, 1), (64, 1), (4, 64))  # (concurrency, images per request)
CEILING_BATCHES = (1, 8, 64, 256)
ENCODINGS = ("raw", "png")
ECHO_METHOD = "/bench.Echo/Echo"
ECHO_REPLY = bytes(64)  # about the size of a one-image RecognizeResponse


@dataclass(frozen=True)
class BenchOptions:
    """What to measure and for how long."""

    model: Path
    int8_model: Path | None = None
    images: Path | None = None  # IDX or image folder; None: synthetic
    threads: int = 0  # 0: the CPUs available to this process, as the server does
    quick: bool = False
    workers: tuple[int, ...] = (1, 2)

    @property
    def measure_s(self) -> float:
        return 0.3 if self.quick else 4.0

    @property
    def warmup_s(self) -> float:
        return 0.1 if self.quick else 1.0


@dataclass
class Point:
    """One measured load point against one server."""

    server: str  # "batching off", "batching on", "2 workers", "int8", ...
    encoding: str
    concurrency: int
    batch: int
    summary: Summary
    server_cpu_s: float | None
    client_cpu_s: float

    @property
    def server_cpu_per_image_us(self) -> float | None:
        if self.server_cpu_s is None or not self.summary.images:
            return None
        return self.server_cpu_s / self.summary.images * 1e6

    @property
    def client_cpu_per_request_us(self) -> float:
        return self.client_cpu_s / max(1, self.summary.requests) * 1e6


@dataclass
class BenchResults:
    """Everything one `digits bench` run measured."""

    options: BenchOptions
    threads: int
    images: str
    machine: dict[str, str]
    ceiling: dict[int, float] = field(default_factory=dict)  # batch -> images/s
    single_run_s: float = 0.0  # median session.run at batch 1
    echo: Summary | None = None
    points: list[Point] = field(default_factory=list)
    int8_ceiling: dict[int, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)  # model label -> accuracy on the bench digits
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def find(self, server: str, encoding: str, concurrency: int, batch: int) -> Point | None:
        return next((p for p in self.points if (p.server, p.encoding, p.concurrency, p.batch)
                     == (server, encoding, concurrency, batch)), None)


# --- measuring ---------------------------------------------------------------------------------------


def measure_ceiling(model_path: Path, threads: int, digits: np.ndarray, seconds: float,
                    batches: Sequence[int] = CEILING_BATCHES) -> tuple[dict[int, float], float]:
    """In-process images/s per batch size, and the median latency of one single-image run."""
    model = load_model(model_path, "cpu", threads, warmup_batch=max(batches))
    inputs = normalize(np.resize(digits, (max(batches), *digits.shape[1:])), model.metadata.normalization)
    rates: dict[int, float] = {}
    single: list[float] = []
    for batch in batches:
        chunk = np.ascontiguousarray(inputs[:batch])
        runs, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or runs < 3:
            began = time.perf_counter()
            model.run(chunk)
            if batch == 1:
                single.append(time.perf_counter() - began)
            runs += 1
        rates[batch] = runs * batch / elapsed
    del model
    gc.collect()  # let the session and its thread pool go before the servers are measured
    return rates, percentile(single, 50) if single else float("nan")


def process_tree_cpu_s(pid: int) -> float | None:
    """utime + stime of `pid` and all its descendants (live ones), in seconds; None off Linux."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        stats: dict[int, tuple[int, float]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # exited meanwhile
            rest = text[text.rindex(")") + 2:].split()
            stats[int(entry)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / tick)
    except (OSError, ValueError, AttributeError):
        return None
    if pid not in stats:
        return None
    total, frontier = 0.0, [pid]
    while frontier:
        current = frontier.pop()
        total += stats[current][1]
        frontier += [p for p, (parent, _) in stats.items() if parent == current]
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`digits serve` in a subprocess on a free 127.0.0.1 port; a context manager."""

    def __init__(self, model: Path, threads: int, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (lives as long as the server)
        self._args = [sys.executable, "-m", "service.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
                      "--port", str(self.port), "--metrics-port", "0", "--threads", str(threads),
                      "--log-level", "warning", *extra]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(self._args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 120
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}: {self._tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"server not SERVING after 120 s: {self._tail()}")
                time.sleep(0.05)

    def cpu_s(self) -> float | None:
        return None if self.process is None else process_tree_cpu_s(self.process.pid)

    def _tail(self) -> str:
        self._log.seek(0)
        return self._log.read()[-2000:]

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


class EchoServer:
    """The trivial grpc.aio servicer (bytes in, 64 bytes out) in its own process: the bare round trip."""

    def __enter__(self) -> EchoServer:
        self.process = subprocess.Popen([sys.executable, "-m", "service.bench", "echo"], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.isdigit():
            self.__exit__()
            raise RuntimeError(f"echo server did not start (said {line!r})")
        self.target = f"127.0.0.1:{line}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return ECHO_REPLY


async def _serve_echo() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def load_point(target: str, requests: Sequence[PreparedRequest], concurrency: int, opts: BenchOptions,
               cpu: Any = None, method: str | None = None, parse: Any = None) -> tuple[Summary, float | None, float]:
    """Warm up, then measure one closed-loop load point: (summary, server CPU s, client CPU s)."""
    extra: dict[str, Any] = {}
    if method is not None:
        extra = {"method": method, "parse": parse}
    # 8 connections where there is the concurrency for them: SO_REUSEPORT spreads connections, so with
    # --workers 2 that leaves a 1-in-128 chance, not 1-in-8, that one worker gets them all.
    connections = min(concurrency, 8)
    warm = LoadSpec(target=target, concurrency=concurrency, duration_s=opts.warmup_s, connections=connections)
    asyncio.run(LoadGenerator(warm, requests, **extra).run())
    spec = LoadSpec(target=target, concurrency=concurrency, duration_s=opts.measure_s, connections=connections)
    cpu_before = cpu() if cpu else None
    client_before = time.process_time()
    summary = asyncio.run(LoadGenerator(spec, requests, **extra).run())
    client_cpu = time.process_time() - client_before
    cpu_after = cpu() if cpu else None
    server_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return summary, server_cpu, client_cpu


def measure_server(results: BenchResults, name: str, model: Path, extra: Sequence[str],
                   points: Sequence[tuple[str, int, int]], requests: dict[tuple[str, int], list[PreparedRequest]],
                   log: Any, threads: int | None = None) -> None:
    """Start one server configuration and measure `points` (encoding, concurrency, batch) against it."""
    opts = results.options
    with ServerProcess(model, threads or results.threads, extra) as server:
        for encoding, concurrency, batch in points:
            summary, server_cpu, client_cpu = load_point(server.target, requests[encoding, batch], concurrency,
                                                         opts, server.cpu_s)
            point = Point(name, encoding, concurrency, batch, summary, server_cpu, client_cpu)
            results.points.append(point)
            log(f"  {name:14s} {encoding:3s} c{concurrency:<3d} x{batch:<3d} {summary.images_per_s:10,.0f} img/s  "
                f"p50 {summary.latency_s['p50'] * 1e3:7.2f} ms  p99 {summary.latency_s['p99'] * 1e3:7.2f} ms  "
                f"errors {summary.error_count}")


def accuracy(model_path: Path, images: ImageSet) -> float | None:
    """In-process accuracy of a model on the labelled 2-D digits of `images` (None without labels)."""
    arrays = [(a, label) for a, label in zip(images.images, images.labels, strict=True)
              if isinstance(a, np.ndarray) and label >= 0 and a.shape == (28, 28)]
    if not arrays:
        return None
    model = load_model(model_path, "cpu", 1, warmup_batch=1)
    pixels = np.stack([a for a, _ in arrays])
    _, probabilities = model.run(normalize(pixels, model.metadata.normalization))
    return float((probabilities.argmax(axis=1) == np.array([label for _, label in arrays])).mean())


def run_bench(opts: BenchOptions, log: Any = print) -> BenchResults:
    """Measure everything; returns the results (`benchreport.write_report` renders them)."""
    from service.benchreport import describe_machine

    started = time.perf_counter()
    threads = opts.threads or available_cpus()
    images = load_images(opts.images, synthetic=512)
    results = BenchResults(opts, threads, images.description, describe_machine())
    digits = np.stack([a for a in images.images if isinstance(a, np.ndarray) and a.shape == (28, 28)] or
                      [np.zeros((28, 28), np.uint8)])
    seconds = 0.2 if opts.quick else 1.0
    log(f"ceiling: in-process onnxruntime, {threads} threads")
    results.ceiling, results.single_run_s = measure_ceiling(opts.model, threads, digits, seconds)
    requests = {(enc, batch): prepare_requests(images, batch, enc, max_requests=64)
                for enc in ENCODINGS for batch in sorted({b for _, b in LOAD_POINTS})}
    log("bare grpc.aio round trip (trivial servicer)")
    # The same one-image request bytes as the server gets; the echo's reply is checked for 0 images.
    probe = PreparedRequest(requests["raw", 1][0].data, np.empty(0, dtype=np.int64), 0)
    with EchoServer() as echo:
        results.echo, _, _ = load_point(echo.target, [probe], 1, opts, method=ECHO_METHOD, parse=lambda _: [])
    # raw and PNG back to back at each load point: their CPU ratio is then measured under the same load.
    every = [(enc, c, b) for c, b in LOAD_POINTS for enc in ENCODINGS]
    log("server: dynamic batching off, then on")
    measure_server(results, "batching off", opts.model, ["--max-batch-size", "1"], every, requests, log)
    measure_server(results, "batching on", opts.model, [], every, requests, log)
    scaling = [("raw", 64, 1), ("raw", 4, 64)]
    for workers in opts.workers:
        if workers > 1:
            log(f"server: {workers} workers")
            # The CPUs are shared out between the workers, as `--threads 0` does.
            measure_server(results, f"{workers} workers", opts.model, ["--workers", str(workers)], scaling,
                           requests, log, threads=max(1, threads // workers))
    if (fp32 := accuracy(opts.model, images)) is not None:
        results.accuracy["fp32"] = fp32
    if opts.int8_model is not None and opts.int8_model.is_file():
        log(f"int8 model {opts.int8_model}")
        results.int8_ceiling, _ = measure_ceiling(opts.int8_model, threads, digits, seconds, (1, 64, 256))
        measure_server(results, "int8", opts.int8_model, [], [("raw", 4, 64), ("raw", 64, 1)], requests, log)
        if (int8 := accuracy(opts.int8_model, images)) is not None:
            results.accuracy["int8"] = int8
    elif opts.int8_model is not None:
        results.notes.append(f"int8 model {opts.int8_model} not found: int8 not measured "
                             "(make it with `digits export --quantize int8`)")
    results.seconds = time.perf_counter() - started
    return results


def main(argv: Sequence[str]) -> int:
    """`python -m service.bench echo`: the trivial servicer used for the bare round trip."""
    if list(argv) != ["echo"]:
        print("usage: python -m service.bench echo", file=sys.stderr)
        return 2
    asyncio.run(_serve_echo())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
