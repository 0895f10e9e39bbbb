"""Triton's own load tool against a server: `perf_analyzer`, as shipped in the tritonclient wheel.

perf_analyzer is a C++ program. Even for CPU-only runs it links `libb64.so.0d` (Debian's libb64-0d)
and `libcudart.so.12` (the nvidia-cuda-runtime-cu12 wheel, found here and put on LD_LIBRARY_PATH);
`find_analyzer` says what is missing instead of failing later. `run_analyzer` measures one
concurrency with real digits (`write_input_data`: perf_analyzer's own JSON input format) and parses
the CSV report it writes (latencies in µs; throughput in images/s, a request of b images counting b).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STABILITY = 1000  # percent


class AnalyzerError(RuntimeError):
    """perf_analyzer cannot run, or failed; the message says why."""


@dataclass(frozen=True)
class AnalyzerResult:
    """One perf_analyzer measurement (its CSV row)."""

    concurrency: int
    images_per_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    server_queue_us: float
    server_compute_us: float  # compute input + infer + output, as the server's statistics report them


@dataclass(frozen=True)
class Analyzer:
    """The perf_analyzer executable and the environment it runs in."""

    path: Path
    env: dict[str, str]


def _cuda_runtime_lib() -> Path | None:
    """The lib folder of the nvidia-cuda-runtime-cu12 wheel, when installed."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(root) / "lib"
        if (lib / "libcudart.so.12").is_file():
            return lib
    return None


def find_analyzer(path: Path | None = None) -> Analyzer:
    """perf_analyzer beside this Python (the tritonclient wheel's) or on PATH, with the environment that
    lets it load; AnalyzerError naming what is missing otherwise."""
    found = path or next((p for p in (Path(sys.executable).parent / "perf_analyzer",
                                      Path(shutil.which("perf_analyzer") or "/nonexistent")) if p.is_file()), None)
    if found is None:
        raise AnalyzerError("perf_analyzer not found (it ships in the tritonclient wheel: pip install "
                            "'tritonclient[grpc]')")
    env = dict(os.environ)
    lib = _cuda_runtime_lib()
    if lib is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p)
    try:
        probe = subprocess.run([str(found), "--help"], env=env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AnalyzerError(f"{found} does not run: {exc}") from exc
    text = probe.stdout + probe.stderr
    if "error while loading shared libraries" in text:
        missing = text.split("error while loading shared libraries:", 1)[1].split(":", 1)[0].strip()
        hint = {"libb64.so.0d": "apt-get install libb64-0d",
                "libcudart.so.12": "pip install nvidia-cuda-runtime-cu12"}.get(missing, "install it")
        raise AnalyzerError(f"perf_analyzer cannot load {missing} ({hint}; `make test` does both)")
    return Analyzer(found, env)


def write_input_data(tensors: Sequence[np.ndarray], path: Path) -> Path:
    """perf_analyzer's JSON input data: one entry per image, `image` FP32 [1, H, W]; a request of b
    images takes b consecutive entries."""
    entries = [{"image": {"content": np.asarray(t, dtype=np.float32).reshape(-1).round(6).tolist(),
                          "shape": list(t.shape[-3:])}} for t in tensors]
    path.write_text(json.dumps({"data": entries}))
    return path


def parse_csv(text: str) -> AnalyzerResult:
    """The last row of perf_analyzer's `-f` CSV report."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise AnalyzerError(f"perf_analyzer wrote no measurement: {text[:200]!r}")
    row = rows[-1]
    try:
        compute = sum(float(row[f"Server Compute {part}"]) for part in ("Input", "Infer", "Output"))
        return AnalyzerResult(int(row["Concurrency"]), float(row["Inferences/Second"]), float(row["p50 latency"]),
                              float(row["p90 latency"]), float(row["p99 latency"]), float(row["Server Queue"]),
                              compute)
    except (KeyError, ValueError) as exc:
        raise AnalyzerError(f"unexpected perf_analyzer report ({exc}): {text[:300]!r}") from exc


def run_analyzer(analyzer: Analyzer, target: str, model: str, batch: int, concurrency: int, data: Path,
                 interval_ms: int = 2000, trials: int = 3, timeout_s: float = 120.0) -> AnalyzerResult:
    """`perf_analyzer -i grpc` at one concurrency: `trials` (at least 3, what its stability check
    compares) windows of `interval_ms` at most; a deviation of up to STABILITY percent between the
    windows is accepted, as a loaded machine rarely settles within perf_analyzer's default 10%."""
    if trials < 3:
        raise ValueError("perf_analyzer compares 3 windows: trials must be >= 3")
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        report = Path(tmp) / "report.csv"
        args = [str(analyzer.path), "-m", model, "-u", target, "-i", "grpc", "-b", str(batch),
                "--concurrency-range", str(concurrency), "-p", str(interval_ms), "-r", str(trials),
                "-s", str(STABILITY), "--input-data", str(data), "-f", str(report)]
        try:
            done = subprocess.run(args, env=analyzer.env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise AnalyzerError(f"perf_analyzer ran over {timeout_s:g} s") from exc
        if done.returncode != 0 or not report.is_file():
            said = " ".join((done.stdout + done.stderr).split())
            raise AnalyzerError(f"perf_analyzer exited {done.returncode}: {said[-300:]}")
        return parse_csv(report.read_text())
