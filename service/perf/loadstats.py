"""The load generator's bookkeeping: what each request did, and the figures a run reports.

Percentiles use the nearest-rank definition (the p-th percentile is the smallest recorded value with at
least p% of the values at or below it), so every reported latency is one that a request really had;
p100 is the maximum. Latency figures cover successful requests only (failures are often instant and
would flatter them); failures are counted by gRPC status code.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float] | np.ndarray, p: float) -> float:
    """Nearest-rank percentile of `values` (any order); NaN when there are none. 0 < p <= 100."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * data.size))  # 1-based
    return float(np.partition(data, rank - 1)[rank - 1])


@dataclass(frozen=True)
class Summary:
    """The figures of one run (or one progress interval)."""

    requests: int  # answered, successfully or not
    ok: int
    errors: dict[str, int]  # gRPC status code name -> count
    images: int  # images in successful requests
    duration_s: float
    latency_s: dict[str, float]  # p50, p90, p99, max, mean of successful requests
    checked: int = 0  # predictions compared with a known label
    correct: int = 0
    stopped_by: str = ""  # "duration", "requests" or "interrupted"

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.checked if self.checked else None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able figures (`digits loadtest --json`); latencies in milliseconds."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "error_count": self.error_count,
            "images": self.images,
            "duration_s": round(self.duration_s, 4),
            "requests_per_s": round(self.requests_per_s, 2),
            "images_per_s": round(self.images_per_s, 2),
            # JSON has no NaN: a run without a successful request has no latency figures.
            "latency_ms": {k: None if math.isnan(v) else _ms(v) for k, v in self.latency_s.items()},
            "accuracy": None if self.accuracy is None else round(self.accuracy, 5),
            "checked": self.checked,
            "stopped_by": self.stopped_by,
        }

    def format_text(self) -> str:
        """The human-readable report printed at the end of `digits loadtest`."""
        lat = self.latency_s
        lines = [
            f"requests   {self.requests} answered in {self.duration_s:.2f} s ({self.ok} ok, "
            f"{self.error_count} failed){f'; stopped by {self.stopped_by}' if self.stopped_by else ''}",
            f"throughput {self.requests_per_s:,.1f} requests/s, {self.images_per_s:,.1f} images/s",
            "latency    " + "  ".join(f"{k} {_ms(v):.3f} ms" for k, v in lat.items() if k != "mean"),
        ]
        if self.errors:
            lines.append("errors     " + ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())))
        if self.accuracy is not None:
            lines.append(f"accuracy   {self.accuracy:.2%} ({self.correct}/{self.checked} predictions match "
                         "their labels)")
        return "\n".join(lines)

    def progress_line(self, elapsed_s: float) -> str:
        """One short live line for an interval's figures."""
        lat = self.latency_s
        return (f"{elapsed_s:6.1f} s  {self.requests_per_s:9,.1f} req/s  {self.images_per_s:10,.1f} img/s  "
                f"p50 {_ms(lat['p50']):7.2f} ms  p99 {_ms(lat['p99']):7.2f} ms  errors {self.error_count}")


@dataclass
class LoadStats:
    """Accumulates request outcomes; cheap to record into from the event loop."""

    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    images: int = 0
    checked: int = 0
    correct: int = 0
    # Where the last progress interval started (indices into `latencies`, counters).
    _mark: tuple[int, int, int] = (0, 0, 0)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def requests(self) -> int:
        return self.ok + sum(self.errors.values())

    def record_ok(self, latency_s: float, images: int, checked: int = 0, correct: int = 0) -> None:
        self.latencies.append(latency_s)
        self.images += images
        self.checked += checked
        self.correct += correct

    def record_error(self, code: str) -> None:
        self.errors[code] += 1

    def summary(self, duration_s: float, stopped_by: str = "") -> Summary:
        """The whole run's figures."""
        return Summary(self.requests, self.ok, dict(self.errors), self.images, duration_s,
                       latency_summary(self.latencies), self.checked, self.correct, stopped_by)

    def interval(self, duration_s: float) -> Summary:
        """Figures since the previous call (for the live progress line); starts a new interval."""
        start, images, errors = self._mark
        window = self.latencies[start:]
        total_errors = sum(self.errors.values())
        self._mark = (len(self.latencies), self.images, total_errors)
        return Summary(len(window) + total_errors - errors, len(window), {"ALL": total_errors - errors}
                       if total_errors - errors else {}, self.images - images, duration_s,
                       latency_summary(window))


def latency_summary(latencies: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, max and mean (seconds) of `latencies`; NaN for an empty list."""
    data = np.asarray(latencies, dtype=np.float64)
    figures = {f"p{p:g}": percentile(data, p) for p in PERCENTILES}
    figures["max"] = float(data.max()) if data.size else math.nan
    figures["mean"] = float(data.mean()) if data.size else math.nan
    return figures


def _ms(seconds: float) -> float:
    return math.nan if math.isnan(seconds) else round(seconds * 1000.0, 4)
