"""`digits bench --device DEVICE`: the accelerator path, measured in one short run.

Written for a lent GPU machine, where device time is short, so it does only what the GPU question needs:

1. what this onnxruntime offers (`get_available_providers()`) and, where `nvidia-smi` answers, which GPU;
2. where every node of the graph runs: onnxruntime's profiler names each node's execution provider, and
   a second session with `session.disable_cpu_ep_fallback` must load, so nothing falls back to the CPU
   silently;
3. the in-process ceiling at batch 1, 64, 256 and 1024 on DEVICE and on the CPU, side by side;
4. `digits serve --device DEVICE` and `digits serve --device cpu` at c64 x1 and c16 x64, both at once,
   measured back to back in alternating order: the Open Inference Protocol with FP32 tensors
   (`tritonclient.grpc.aio`) and our own `Recognize` with raw pixels; each server's provider is read
   from its `digits_model_info` metric.

With `--device cpu` it runs the same plan on the CPU alone (that is how the tests cover it). When
onnxruntime offers no provider for DEVICE, the report says so with the exact provider list, and nothing
is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.perf.bench import Tally, v2_tensors
from service.perf.benchprocs import ServerProcess, free_port
from service.perf.loadsource import load_images, prepare_requests
from service.perf.loadstats import LoadStats, Summary, percentile
from service.perf.loadtest import LoadGenerator, LoadSpec
from service.perf.machine import describe_machine
from service.perf.peers.tritonload import TritonLoad, run_triton_load
from service.recognition.model import CPU, ModelLoadError, choose_providers, default_threads, load_model
from service.recognition.preprocess import normalize

BATCHES = (1, 64, 256, 1024)
SERVER_POINTS = ((64, 1), (16, 64))  # (concurrency, images per request)
ENGINES = ("tritonclient FP32", "Recognize raw")
PROVIDER = {"cpu": CPU, "cuda": "CUDAExecutionProvider"}


@dataclass
class DeviceReport:
    """Everything one `digits bench --device` run found; `to_markdown` renders it."""

    device: str
    model: str
    onnxruntime: str  # version and where it was imported from (several may be installed side by side)
    available: list[str]
    gpu: str
    machine: dict[str, str]
    threads: int
    placement: dict[str, str] = field(default_factory=dict)  # node -> provider, from the profiler
    strict_load: str = ""  # "loads", or the error of a session that may not fall back to the CPU
    ceiling: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)  # device -> batch -> figures
    server_provider: dict[str, str] = field(default_factory=dict)  # device -> digits_model_info's provider
    points: list[dict[str, Any]] = field(default_factory=list)
    not_measured: str = ""
    seconds: float = 0.0

    @property
    def off_device(self) -> dict[str, str]:
        """The nodes that did not run on DEVICE's provider."""
        return {node: provider for node, provider in self.placement.items() if provider != PROVIDER[self.device]}


def gpu_name() -> str:
    """What `nvidia-smi` says the GPU is (name, driver, memory), or why there is no answer."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi on PATH"
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"


def node_placement(model_path: Path, device: str, batch: np.ndarray) -> dict[str, str]:
    """Node name -> the provider that ran it in one profiled run of `batch`."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "placement")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model_path), options,
                                       providers=choose_providers(device, ort.get_available_providers()))
        session.run(None, {session.get_inputs()[0].name: batch})
        events = json.loads(Path(session.end_profiling()).read_text())
    return {event["name"].removesuffix("_kernel_time"): event["args"]["provider"] for event in events
            if event.get("cat") == "Node" and "provider" in event.get("args", {})}


def strict_load(model_path: Path, device: str) -> str:
    """"loads" when a session that may not put any node on the CPU provider can be made, else its error."""
    if device == "cpu":
        return "loads (the CPU is the device)"
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(model_path), options,
                             providers=choose_providers(device, ort.get_available_providers()))
    except Exception as exc:  # onnxruntime's own exception types are private
        return f"refused: {str(exc).splitlines()[0]}"
    return "loads"


def ceiling(model_path: Path, device: str, threads: int, inputs: np.ndarray, seconds: float,
            batches: Sequence[int] = BATCHES) -> dict[int, dict[str, float]]:
    """In-process `session.run` from NumPy to NumPy (host copies included, as the server pays them):
    images/s and the median time of one run, per batch size."""
    model = load_model(model_path, device, threads, warmup_batch=max(batches))
    figures: dict[int, dict[str, float]] = {}
    for batch in batches:
        chunk = np.ascontiguousarray(inputs[:batch])
        for _ in range(5):  # the first runs of a new shape pick kernels
            model.run(chunk)
        times: list[float] = []
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or len(times) < 5:
            began = time.perf_counter()
            model.run(chunk)
            times.append(time.perf_counter() - began)
        figures[batch] = {"images_per_s": len(times) * batch / elapsed, "p50_ms": percentile(times, 50) * 1e3}
    return figures


def served_provider(metrics_port: int) -> str:
    """The `provider` label of the server's `digits_model_info` metric."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith("digits_model_info{") and 'provider="' in line:
            return line.split('provider="', 1)[1].split('"', 1)[0]
    return "not reported"


def _point(device: str, engine: str, concurrency: int, batch: int, tally: Tally) -> dict[str, Any]:
    summary = tally.stats.summary(tally.seconds)
    cpu_s = tally.server_cpu_s
    return {"server": f"--device {device}", "engine": engine, "concurrency": concurrency, "batch": batch,
            "images_per_s": summary.images_per_s, "p50_ms": summary.latency_s["p50"] * 1e3,
            "p99_ms": summary.latency_s["p99"] * 1e3, "errors": summary.error_count,
            "server_cpu_us_per_image": None if cpu_s is None or not summary.images else cpu_s / summary.images * 1e6}


def _load(server: ServerProcess, engine: str, concurrency: int, batch: int, tensors: Any, requests: Any,
          warmup_s: float, seconds: float, tally: Tally) -> Summary:
    """One closed-loop point against `server`, added to `tally` with the server's CPU seconds over it."""
    before, client_before = server.cpu_s(), time.process_time()
    if engine == ENGINES[0]:
        stats = LoadStats()
        summary = run_triton_load(TritonLoad(server.target, "lenet5", concurrency, seconds, warmup_s,
                                             clients=min(concurrency, 8)), tensors[batch], stats)
    else:
        spec = LoadSpec(target=server.target, concurrency=concurrency, duration_s=seconds, warmup_s=warmup_s,
                        connections=min(concurrency, 8))
        generator = LoadGenerator(spec, requests[batch])
        summary = asyncio.run(generator.run())
        stats = generator.stats
    after = server.cpu_s()
    tally.add(stats, summary.duration_s, None if before is None or after is None else after - before,
              time.process_time() - client_before)
    return summary


def run_device_bench(model_path: Path, device: str, images: Path | None, threads: int = 0, quick: bool = False,
                     log: Callable[[str], None] = print) -> DeviceReport:
    """Measure the `device` path (see the module docstring)."""
    started = time.perf_counter()
    threads = threads or default_threads()
    report = DeviceReport(device, str(model_path), f"{ort.__version__} ({Path(ort.__file__).parent})",
                          list(ort.get_available_providers()), gpu_name(), describe_machine(), threads)
    log(f"onnxruntime {ort.__version__} offers {report.available}; GPU: {report.gpu}")
    try:
        # Offered is not enough: the provider's libraries (CUDA, cuDNN) must load too, or load_model says so.
        normalization = load_model(model_path, device, threads, warmup_batch=1).metadata.normalization
    except ModelLoadError as exc:
        report.not_measured = str(exc)
        return report
    source = load_images(images, synthetic=512)
    digits = np.stack([a for a in source.images if isinstance(a, np.ndarray) and a.shape == (28, 28)] or
                      [np.zeros((28, 28), np.uint8)])
    inputs = normalize(np.resize(digits, (max(BATCHES), *digits.shape[1:])), normalization)
    report.placement = node_placement(model_path, device, np.ascontiguousarray(inputs[:64]))
    report.strict_load = strict_load(model_path, device)
    log(f"nodes off {PROVIDER[device]}: {report.off_device or 'none'}; strict session: {report.strict_load}")
    devices = list(dict.fromkeys([device, "cpu"]))
    seconds, warmup_s, rounds = (0.2, 0.1, 1) if quick else (1.0, 0.5, 2)
    for name in devices:
        report.ceiling[name] = ceiling(model_path, name, threads, inputs, seconds)
        log(f"ceiling {name}: " + ", ".join(f"x{b} {f['images_per_s']:,.0f} img/s" for b, f in
                                            report.ceiling[name].items()))
    tensors = {b: v2_tensors(digits, normalization, b) for _, b in SERVER_POINTS}
    requests = {b: prepare_requests(source, b, "raw", max_requests=64) for _, b in SERVER_POINTS}
    tallies: dict[tuple[str, str, int, int], Tally] = {}  # (device, engine, c, b) -> the rounds together
    with contextlib.ExitStack() as stack:
        servers = {}
        for name in devices:
            metrics_port = free_port()
            servers[name] = stack.enter_context(ServerProcess(model_path, threads, [
                "--device", name, "--metrics-port", str(metrics_port)]))
            report.server_provider[name] = served_provider(metrics_port)
        log(f"servers' providers: {report.server_provider}")
        for round_ in range(rounds):
            for concurrency, batch in SERVER_POINTS:
                for engine in ENGINES:
                    for name in devices if round_ % 2 == 0 else devices[::-1]:
                        tally = tallies.setdefault((name, engine, concurrency, batch), Tally())
                        summary = _load(servers[name], engine, concurrency, batch, tensors, requests, warmup_s,
                                        0.3 if quick else 3.0, tally)
                        log(f"  --device {name:4s} {engine:17s} c{concurrency:<3d} x{batch:<3d} "
                            f"{summary.images_per_s:10,.0f} img/s  p99 {summary.latency_s['p99'] * 1e3:7.2f} ms  "
                            f"errors {summary.error_count}")
    report.points = [_point(*key, tally) for key, tally in tallies.items()]
    report.seconds = time.perf_counter() - started
    return report


def to_markdown(report: DeviceReport) -> str:
    """The report as a Markdown section for docs/benchmarks.md."""
    lines = [f"#### `digits bench --device {report.device}`", "",
             f"- GPU (nvidia-smi): {report.gpu}",
             f"- onnxruntime {report.onnxruntime}: `get_available_providers()` is `{report.available}`",
             f"- machine: {report.machine.get('cpu')}, {report.machine.get('cores')}; {report.machine.get('versions')}",
             f"- onnxruntime threads (CPU provider): {report.threads}"]
    if report.not_measured:
        return "\n".join([*lines, "", f"**Not measured:** {report.not_measured}", ""])
    off = report.off_device
    lines += [f"- nodes: {len(report.placement)}, all on {PROVIDER[report.device]}" if not off else
              f"- nodes NOT on {PROVIDER[report.device]}: {off}",
              "- a session that may not fall back to the CPU (`session.disable_cpu_ep_fallback`): "
              f"{report.strict_load}",
              f"- provider each server reports (`digits_model_info`): {report.server_provider}",
              "", "In-process `session.run`, NumPy in and out (host copies included):", "",
              "| batch | " + " | ".join(f"{d} img/s | {d} p50 ms" for d in report.ceiling) + " |",
              "| --- | " + " | ".join("---: | ---:" for _ in report.ceiling) + " |"]
    for batch in BATCHES:
        cells = [f"{report.ceiling[d][batch]['images_per_s']:,.0f} | {report.ceiling[d][batch]['p50_ms']:.3f}"
                 for d in report.ceiling]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    lines += ["", "Servers side by side (the rounds together; they alternate the order):", "",
              "| server | client | c | images/request | images/s | p50 ms | p99 ms | errors | server CPU µs/image |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in report.points:
        cpu = "" if p["server_cpu_us_per_image"] is None else f"{p['server_cpu_us_per_image']:.0f}"
        lines.append(f"| {p['server']} | {p['engine']} | {p['concurrency']} | {p['batch']} | {p['images_per_s']:,.0f} "
                     f"| {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['errors']} | {cpu} |")
    lines += ["", f"Run time {report.seconds:.0f} s.", ""]
    return "\n".join(lines)


def write_device_report(report: DeviceReport, out: Path) -> None:
    """`out` (Markdown) and the same figures as JSON beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown(report))
    out.with_suffix(".json").write_text(json.dumps(asdict(report), indent=1, default=str))
