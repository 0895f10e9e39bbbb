"""`digits bench`: measure, in one run on one machine, how fast the server is and what bounds it.

1. the ceiling: in-process onnxruntime on the same model and thread count, images/s at batch 1..256;
2. a bare grpc.aio unary round trip (a trivial servicer in its own process) - what any server pays;
3. `digits serve` (a subprocess, as users run it) with dynamic batching off and on, at the load
   points of `LOAD_POINTS`, for raw pixels and PNG files, with the server's CPU time per image read
   from /proc (utime + stime of the server and its worker processes);
4. 1 vs 2 worker processes, and the int8 model against fp32;
5. the Open Inference Protocol with FP32 tensors against the floor (`peers.floor`: a grpc.aio servicer
   that parses ModelInfer and answers a canned reply) and, with `--peer mlserver`, MLServer serving the
   same model: all driven by the same client, `tritonclient.grpc.aio` (`peers.tritonload`), and again by
   Triton's perf_analyzer (`peers.analyzer`);
6. reading whole numbers: 5-digit PNGs through `Read` at concurrency 16.

The client of 3-4 and 6 is the `digits loadtest` engine, in this process. Client and server share the machine's
cores, so absolute figures say as much about the machine as about the server: the targets are
ratios within one run, taken back to back (see `run_bench`). The processes live in `benchprocs`;
`benchreport` turns the results into docs/benchmarks.md and the plot.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.client import bearer_metadata, read_token
from service.gen.digits.v1 import digits_pb2
from service.perf.benchprocs import ECHO_METHOD, EchoServer, ServerProcess
from service.perf.loadsource import ImageSet, PreparedRequest, load_images, prepare_requests
from service.perf.loadstats import LoadStats, Summary, percentile
from service.perf.loadtest import LoadGenerator, LoadSpec
from service.perf.machine import describe_machine
from service.perf.peers.analyzer import AnalyzerError, AnalyzerResult, find_analyzer, run_analyzer, write_input_data
from service.perf.peers.floor import FloorProcess
from service.perf.peers.mlserver import MLServerProcess, PeerUnavailable
from service.perf.peers.tritonload import TritonLoad, run_triton_load
from service.perf.reading.numbers import compose
from service.recognition.model import default_threads, load_model
from service.recognition.preprocess import normalize

LOAD_POINTS = ((1, 1), (16, 1), (64, 1), (4, 64))  # (concurrency, images per request)
CEILING_BATCHES = (1, 8, 64, 256)
ENCODINGS = ("raw", "png")
# Open Inference Protocol points: (concurrency, images per request, client connections).
V2_POINTS = ((16, 1, 1), (64, 1, 1), (64, 1, 8), (4, 64, 1))
ANALYZER_POINTS = ((16, 1), (64, 1), (4, 64))
OURS, FLOOR, MLSERVER = "ours", "floor", "MLServer"
PEERS = ("mlserver",)
READ = "/digits.v1.DigitRecognizer/Read"
READ_DIGITS = 5
READ_CONCURRENCY = 16


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
    peers: tuple[str, ...] = ()  # "mlserver"
    mlserver: Path | None = None  # the mlserver executable (default: runs/mlserver-venv, then PATH)

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
class V2Point:
    """One Open Inference Protocol load point against one server, with one client engine."""

    engine: str  # "tritonclient" or "perf_analyzer"
    server: str  # OURS, FLOOR, MLSERVER
    concurrency: int
    batch: int
    clients: int
    images_per_s: float
    p50_s: float
    p99_s: float
    errors: int = 0
    server_cpu_per_image_us: float | None = None


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
    v2: list[V2Point] = field(default_factory=list)
    not_measured: dict[str, str] = field(default_factory=dict)  # server or engine -> why
    read: Point | None = None  # 5-digit PNGs through Read at concurrency 16 (images = readings)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def find_v2(self, engine: str, server: str, concurrency: int, batch: int, clients: int = 1) -> V2Point | None:
        return next((p for p in self.v2 if (p.engine, p.server, p.concurrency, p.batch, p.clients)
                     == (engine, server, concurrency, batch, clients)), None)

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
class Tally:
    """One load point against one server, summed over the rounds (the device bench sums its rounds so too)."""

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
                 tally: Tally, cpu: Any = None, method: str | None = None, parse: Any = None,
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


def v2_tensors(digits: np.ndarray, normalization: Any, batch: int, count: int = 16) -> list[np.ndarray]:
    """FP32 inputs [batch, 1, H, W] in the model's input space, from the bench's digits, in turn."""
    need = batch * count
    inputs = normalize(np.resize(digits, (need, *digits.shape[1:])), normalization)
    return [np.ascontiguousarray(inputs[i * batch:(i + 1) * batch]) for i in range(count)]


def read_requests(images: ImageSet, count: int = 32, seed: int = 0) -> list[PreparedRequest]:
    """Serialized ReadRequests of one 5-digit number each (PNG, composed from the labelled digits:
    spaced, tight and touching in turn); each request's label is int("1" + its true text)."""
    pairs = [(a, int(label)) for a, label in zip(images.images, images.labels, strict=True)
             if isinstance(a, np.ndarray) and a.shape == (28, 28) and label >= 0]
    if not pairs:
        return []
    digits, labels = np.stack([a for a, _ in pairs]), np.array([label for _, label in pairs])
    rng = np.random.default_rng(seed)
    prepared = []
    for i in range(count):
        number = compose(digits, labels, ("spaced", "tight", "touching")[i % 3], rng, length=READ_DIGITS)
        request = digits_pb2.ReadRequest(images=[digits_pb2.Image(encoded=number.png)])
        prepared.append(PreparedRequest(request.SerializeToString(), np.array([int("1" + number.text)]), 1))
    return prepared


def parse_read(data: bytes) -> list[int]:
    """Each reading of a serialized ReadResponse as int("1" + text) (-2 for no digits), to compare
    with `read_requests`' labels."""
    return [int("1" + r.text) if r.text.isdigit() else -2 for r in digits_pb2.ReadResponse.FromString(data).readings]


def _v2_point(engine: str, server: str, point: tuple[int, int, int], tally: Tally) -> V2Point:
    summary = tally.stats.summary(tally.seconds)
    cpu = None if tally.server_cpu_s is None or not summary.images else tally.server_cpu_s / summary.images * 1e6
    return V2Point(engine, server, *point, summary.images_per_s, summary.latency_s["p50"],
                   summary.latency_s["p99"], summary.error_count, cpu)


def _analyzer_point(server: str, point: tuple[int, int], runs: list[AnalyzerResult]) -> V2Point:
    return V2Point("perf_analyzer", server, point[0], point[1], 1,
                   float(np.mean([r.images_per_s for r in runs])), float(np.mean([r.p50_us for r in runs])) / 1e6,
                   float(np.mean([r.p99_us for r in runs])) / 1e6)


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
    tallies: dict[tuple[str, str, int, int], Tally] = {}
    echo_tally = Tally()
    normalization = load_model(opts.model, "cpu", 1, warmup_batch=1).metadata.normalization
    tensors = {b: v2_tensors(digits, normalization, b) for b in sorted({b for _, b, _ in V2_POINTS})}
    v2_tallies: dict[tuple[str, tuple[int, int, int]], Tally] = {}
    analyzer_runs: dict[tuple[str, tuple[int, int]], list[AnalyzerResult]] = {}
    reading = read_requests(images)
    if not reading:
        results.not_measured["Read"] = "the bench's images have no labelled 28x28 digits to compose numbers from"
    read_tally = Tally()
    with contextlib.ExitStack() as stack:
        echo = stack.enter_context(EchoServer())
        servers = {name: stack.enter_context(ServerProcess(model, count, [*extra, *auth_flags]))
                   for name, model, extra, count, _ in plan}
        points = {name: pts for name, *_, pts in plan}
        v2_servers: dict[str, Any] = {OURS: servers["batching on"], FLOOR: stack.enter_context(FloorProcess())}
        if "mlserver" in opts.peers:
            try:
                v2_servers[MLSERVER] = stack.enter_context(MLServerProcess(opts.model, threads=threads,
                                                                           executable=opts.mlserver))
            except PeerUnavailable as exc:
                results.not_measured[MLSERVER] = str(exc)
        else:
            results.not_measured[MLSERVER] = "not asked for (digits bench --peer mlserver)"
        if opts.token_file is not None:  # the floor and MLServer take no token: ours would pay for it alone
            results.not_measured["Open Inference Protocol"] = "not measured with --token-file"
            v2_servers = {}
        try:
            analyzer = find_analyzer()
            analyzer_data = write_input_data(v2_tensors(digits, normalization, 1, 64),
                                             Path(stack.enter_context(tempfile.TemporaryDirectory())) / "data.json")
        except AnalyzerError as exc:
            analyzer = None
            results.not_measured["perf_analyzer"] = str(exc)
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
                        tally = tallies.setdefault((name, encoding, concurrency, batch), Tally())
                        summary = measure_once(servers[name].target, requests[encoding, batch], concurrency,
                                               opts, tally, servers[name].cpu_s, metadata=metadata)
                        log(f"  {name:14s} {encoding:3s} c{concurrency:<3d} x{batch:<3d} "
                            f"{summary.images_per_s:10,.0f} img/s  p50 {summary.latency_s['p50'] * 1e3:7.2f} ms  "
                            f"p99 {summary.latency_s['p99'] * 1e3:7.2f} ms  errors {summary.error_count}")
            _measure_v2(opts, round_, v2_servers, tensors, v2_tallies, log)
            if analyzer is not None and v2_servers and (round_ == 0 or opts.quick):
                _measure_analyzer(opts, round_, analyzer, analyzer_data, v2_servers, analyzer_runs, results, log)
            if reading:
                summary = measure_once(servers["batching on"].target, reading, READ_CONCURRENCY, opts, read_tally,
                                       servers["batching on"].cpu_s, method=READ, parse=parse_read, metadata=metadata)
                log(f"  read           png c{READ_CONCURRENCY:<3d} {READ_DIGITS} digits {summary.images_per_s:7,.0f} "
                    f"readings/s  p50 {summary.latency_s['p50'] * 1e3:7.2f} ms  errors {summary.error_count}")
    results.v2 = [_v2_point("tritonclient", server, point, tally) for (server, point), tally in v2_tallies.items()]
    results.v2 += [_analyzer_point(server, point, runs) for (server, point), runs in analyzer_runs.items()]
    if reading:
        results.read = read_tally.point("batching on", "png", READ_CONCURRENCY, 1)
    results.echo = echo_tally.stats.summary(echo_tally.seconds)
    results.points = [tally.point(*key) for key, tally in sorted(
        tallies.items(), key=lambda kv: ([n for n, *_ in plan].index(kv[0][0]),
                                         LOAD_POINTS.index(kv[0][2:]), ENCODINGS.index(kv[0][1])))]
    for label, path in (("fp32", opts.model), ("int8", opts.int8_model)):
        if path is not None and path.is_file() and (value := accuracy(path, images)) is not None:
            results.accuracy[label] = value
    results.seconds = time.perf_counter() - started
    return results


def _measure_v2(opts: BenchOptions, round_: int, servers: dict[str, Any], tensors: dict[int, list[np.ndarray]],
                tallies: dict[tuple[str, tuple[int, int, int]], Tally],
                log: Any) -> None:
    """Every V2_POINT against every v2 server back to back (alternating order), tritonclient.grpc.aio."""
    names = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
    for point in V2_POINTS:
        concurrency, batch, clients = point
        for name in names:
            server = servers[name]
            tally = tallies.setdefault((name, point), Tally())
            spec = TritonLoad(server.target, "lenet5", concurrency, opts.warmup_s, clients=clients)
            run_triton_load(spec, tensors[batch])  # warm-up, unmeasured
            spec = TritonLoad(server.target, "lenet5", concurrency, opts.measure_s / opts.rounds, clients=clients)
            stats = LoadStats()
            cpu_before, client_before = server.cpu_s(), time.process_time()
            summary = run_triton_load(spec, tensors[batch], stats)
            client_cpu, cpu_after = time.process_time() - client_before, server.cpu_s()
            cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
            tally.add(stats, summary.duration_s, cpu, client_cpu)
            log(f"  v2 {name:11s} FP32 c{concurrency:<3d} x{batch:<3d} {clients} conn {summary.images_per_s:10,.0f} "
                f"img/s  p50 {summary.latency_s['p50'] * 1e3:7.2f} ms  p99 {summary.latency_s['p99'] * 1e3:7.2f} ms  "
                f"errors {summary.error_count}")


def _measure_analyzer(opts: BenchOptions, round_: int, analyzer: Any, data: Path, servers: dict[str, Any],
                      runs: dict[tuple[str, tuple[int, int]], list[AnalyzerResult]], results: BenchResults,
                      log: Any) -> None:
    """perf_analyzer at ANALYZER_POINTS (only c16 x1 with --quick) against every v2 server."""
    names = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
    for point in ANALYZER_POINTS[:1] if opts.quick else ANALYZER_POINTS:
        for name in names:
            if f"perf_analyzer on {name}" in results.not_measured:
                continue
            try:
                result = run_analyzer(analyzer, servers[name].target, "lenet5", point[1], point[0], data,
                                      interval_ms=500 if opts.quick else 2000, trials=3)
            except AnalyzerError as exc:
                results.not_measured[f"perf_analyzer on {name}"] = str(exc)
                continue
            runs.setdefault((name, point), []).append(result)
            log(f"  perf_analyzer {name:8s} c{point[0]:<3d} x{point[1]:<3d} {result.images_per_s:10,.0f} img/s  "
                f"p50 {result.p50_us / 1e3:7.2f} ms  p99 {result.p99_us / 1e3:7.2f} ms")
