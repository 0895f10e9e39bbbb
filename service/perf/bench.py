"""`digits bench`: measure, in one run on one machine, how fast the server is and what bounds it.

1. the ceiling: in-process onnxruntime on the same model and thread count, images/s at batch 1..256;
2. a bare grpc.aio unary round trip (a trivial servicer in its own process) - what any server pays;
3. `digits serve` (a subprocess, as users run it) with dynamic batching off and on, at the load
   points of `LOAD_POINTS`, for raw pixels and PNG files, with the server's CPU time per image read
   from /proc (utime + stime of the server and its worker processes);
4. 1 vs 2 worker processes, and the int8 model against fp32.

The client is the `digits loadtest` engine, in this process. Client and server share the machine's
cores, so absolute figures say as much about the machine as about the server: the targets are
ratios within one run, taken back to back (see `run_bench`). The processes live in `benchprocs`;
`benchreport` turns the results into docs/benchmarks.md and the plot.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.client import bearer_metadata, read_token
from service.perf.benchprocs import ECHO_METHOD, EchoServer, ServerProcess
from service.perf.loadsource import ImageSet, PreparedRequest, load_images, prepare_requests
from service.perf.loadstats import LoadStats, Summary, percentile
from service.perf.loadtest import LoadGenerator, LoadSpec
from service.perf.machine import describe_machine
from service.recognition.model import default_threads, load_model
from service.recognition.preprocess import normalize

LOAD_POINTS = ((1, 1), (16, 1), (64, 1), (4, 64))  # (concurrency, images per request)
CEILING_BATCHES = (1, 8, 64, 256)
ENCODINGS = ("raw", "png")


@dataclass(frozen=True)
class BenchOptions:
    """What to measure and for how long."""

    model: Path
    int8_model: Path | None = None
    images: Path | None = None  # IDX or image folder; None: synthetic
    threads: int = 0  # 0: as the server does (service.recognition.model.default_threads)
    quick: bool = False
    workers: tuple[int, ...] = (1, 2)
    # Serve with --auth-token-file and send its first token: the cost of authentication, measured.
    token_file: Path | None = None

    @property
    def rounds(self) -> int:
        return 1 if self.quick else 2

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
    paired_ceiling: list[float] = field(default_factory=list)  # batch 64 images/s, beside the batched point
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


@dataclass
class _Tally:
    """One load point against one server, summed over the rounds."""

    stats: LoadStats = field(default_factory=LoadStats)
    seconds: float = 0.0
    server_cpu_s: float | None = 0.0
    client_cpu_s: float = 0.0

    def add(self, stats: LoadStats, seconds: float, server_cpu_s: float | None, client_cpu_s: float) -> None:
        self.stats.latencies += stats.latencies
        self.stats.errors.update(stats.errors)
        self.stats.images += stats.images
        self.stats.checked += stats.checked
        self.stats.correct += stats.correct
        self.seconds += seconds
        self.server_cpu_s = None if server_cpu_s is None or self.server_cpu_s is None \
            else self.server_cpu_s + server_cpu_s
        self.client_cpu_s += client_cpu_s

    def point(self, server: str, encoding: str, concurrency: int, batch: int) -> Point:
        return Point(server, encoding, concurrency, batch, self.stats.summary(self.seconds), self.server_cpu_s,
                     self.client_cpu_s)


def measure_once(target: str, requests: Sequence[PreparedRequest], concurrency: int, opts: BenchOptions,
                 tally: _Tally, cpu: Any = None, method: str | None = None, parse: Any = None,
                 metadata: Sequence[tuple[str, str]] = ()) -> Summary:
    """Warm up, then measure one closed-loop load point once, adding it to `tally`."""
    extra: dict[str, Any] = {"metadata": metadata}
    if method is not None:
        extra.update(method=method, parse=parse)
    # 8 connections where there is the concurrency for them: SO_REUSEPORT spreads connections, so with
    # --workers 2 that leaves a 1-in-128 chance, not 1-in-8, that one worker gets them all.
    connections = min(concurrency, 8)
    warm = LoadSpec(target=target, concurrency=concurrency, duration_s=opts.warmup_s, connections=connections)
    asyncio.run(LoadGenerator(warm, requests, **extra).run())
    spec = LoadSpec(target=target, concurrency=concurrency, duration_s=opts.measure_s / opts.rounds,
                    connections=connections)
    generator = LoadGenerator(spec, requests, **extra)
    cpu_before, client_before = cpu() if cpu else None, time.process_time()
    summary = asyncio.run(generator.run())
    client_cpu, cpu_after = time.process_time() - client_before, cpu() if cpu else None
    server_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    tally.add(generator.stats, summary.duration_s, server_cpu, client_cpu)
    return summary


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


def server_plan(opts: BenchOptions, threads: int) -> list[tuple[str, Path, list[str], int, list[tuple[str, int, int]]]]:
    """(name, model, extra flags, threads, points) of every server configuration to measure."""
    every = [(enc, c, b) for c, b in LOAD_POINTS for enc in ENCODINGS]
    scaling = [("raw", 64, 1), ("raw", 4, 64)]
    plan = [("batching off", opts.model, ["--max-batch-size", "1"], threads, every),
            ("batching on", opts.model, [], threads, every)]
    # The CPUs are shared out between the workers, as `--threads 0` does.
    plan += [(f"{w} workers", opts.model, ["--workers", str(w)], max(1, threads // w), scaling)
             for w in opts.workers if w > 1]
    if opts.int8_model is not None and opts.int8_model.is_file():
        plan.append(("int8", opts.int8_model, [], threads, scaling))
    return plan


def run_bench(opts: BenchOptions, log: Any = print) -> BenchResults:
    """Measure everything; returns the results (`benchreport.write_report` renders them).

    Every server runs at once, idle but for the one being measured; each round visits every load point
    and measures all servers there back to back (in alternating order), raw then PNG, so that the
    ratios compare figures taken under the same machine load even when other work comes and goes.
    """
    started = time.perf_counter()
    threads = opts.threads or default_threads()
    images = load_images(opts.images, synthetic=512)
    results = BenchResults(opts, threads, images.description, describe_machine())
    digits = np.stack([a for a in images.images if isinstance(a, np.ndarray) and a.shape == (28, 28)] or
                      [np.zeros((28, 28), np.uint8)])
    seconds = 0.2 if opts.quick else 1.0
    log(f"ceiling: in-process onnxruntime, {threads} threads")
    results.ceiling, results.single_run_s = measure_ceiling(opts.model, threads, digits, seconds)
    if opts.int8_model is not None and opts.int8_model.is_file():
        results.int8_ceiling, _ = measure_ceiling(opts.int8_model, threads, digits, seconds, (1, 64, 256))
    elif opts.int8_model is not None:
        results.notes.append(f"int8 model {opts.int8_model} not found: int8 not measured "
                             "(make it with `digits export --quantize int8`)")
    requests = {(enc, batch): prepare_requests(images, batch, enc, max_requests=64)
                for enc in ENCODINGS for batch in sorted({b for _, b in LOAD_POINTS})}
    # The same one-image request bytes as the server gets; the echo's reply is checked for 0 images.
    probe = PreparedRequest(requests["raw", 1][0].data, np.empty(0, dtype=np.int64), 0)
    plan = server_plan(opts, threads)
    auth_flags, metadata = [], bearer_metadata(None)
    if opts.token_file is not None:
        auth_flags, metadata = ["--auth-token-file", str(opts.token_file)], bearer_metadata(read_token(opts.token_file))
        results.notes.append("every server ran with --auth-token-file and every call carried a bearer token")
    tallies: dict[tuple[str, str, int, int], _Tally] = {}
    echo_tally = _Tally()
    with contextlib.ExitStack() as stack:
        echo = stack.enter_context(EchoServer())
        servers = {name: stack.enter_context(ServerProcess(model, count, [*extra, *auth_flags]))
                   for name, model, extra, count, _ in plan}
        points = {name: pts for name, *_, pts in plan}
        for round_ in range(opts.rounds):
            log(f"round {round_ + 1} of {opts.rounds}")
            for concurrency, batch in LOAD_POINTS:
                if (concurrency, batch) == (1, 1):
                    measure_once(echo.target, [probe], 1, opts, echo_tally, method=ECHO_METHOD, parse=lambda _: [])
                if batch == 64:  # the ceiling the batched point is held against, measured right beside it
                    results.paired_ceiling.append(measure_ceiling(opts.model, threads, digits, seconds, (64,))[0][64])
                for encoding in ENCODINGS:
                    names = [n for n in servers if (encoding, concurrency, batch) in points[n]]
                    for name in (names if round_ % 2 == 0 else names[::-1]):
                        tally = tallies.setdefault((name, encoding, concurrency, batch), _Tally())
                        summary = measure_once(servers[name].target, requests[encoding, batch], concurrency,
                                               opts, tally, servers[name].cpu_s, metadata=metadata)
                        log(f"  {name:14s} {encoding:3s} c{concurrency:<3d} x{batch:<3d} "
                            f"{summary.images_per_s:10,.0f} img/s  p50 {summary.latency_s['p50'] * 1e3:7.2f} ms  "
                            f"p99 {summary.latency_s['p99'] * 1e3:7.2f} ms  errors {summary.error_count}")
    results.echo = echo_tally.stats.summary(echo_tally.seconds)
    results.points = [tally.point(*key) for key, tally in sorted(
        tallies.items(), key=lambda kv: ([n for n, *_ in plan].index(kv[0][0]),
                                         LOAD_POINTS.index(kv[0][2:]), ENCODINGS.index(kv[0][1])))]
    for label, path in (("fp32", opts.model), ("int8", opts.int8_model)):
        if path is not None and path.is_file() and (value := accuracy(path, images)) is not None:
            results.accuracy[label] = value
    results.seconds = time.perf_counter() - started
    return results
