"""Summary log lines: what the server did, every `--summary-interval-s` and once at shutdown.

The numbers are read back from the server's own Prometheus metrics, so the log and `/metrics` can
never disagree. A periodic line covers its interval (requests, errors by code, images, batches, mean
batch size, rejections); the shutdown line covers the server's whole life.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from service.telemetry.logs import fields
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


def _samples(metric: MetricWrapperBase, suffix: str = "") -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of `metric` whose name ends with `suffix`."""
    return [(s.labels, s.value) for family in metric.collect() for s in family.samples
            if s.name.endswith(suffix)]


def _minus(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in now.items()}


@dataclass(frozen=True)
class Totals:
    """Cumulative counts at one moment."""

    requests: dict[str, float]  # by gRPC status code, every RPC together
    images: float
    batches: float
    batched_images: float
    rejected: dict[str, float]  # requests refused before inference, by reason
    not_accepted: dict[str, float]  # predictions not accepted, by rejection reason

    @classmethod
    def read(cls, metrics: Metrics) -> Totals:
        """The current values of the server's counters."""
        requests: dict[str, float] = {}
        for labels, value in _samples(metrics.requests, "_total"):
            requests[labels["code"]] = requests.get(labels["code"], 0.0) + value
        return cls(
            requests=requests,
            images=sum(value for _, value in _samples(metrics.images, "_total")),
            batches=sum(value for _, value in _samples(metrics.batch_size, "_count")),
            batched_images=sum(value for _, value in _samples(metrics.batch_size, "_sum")),
            rejected={labels["reason"]: value for labels, value in _samples(metrics.rejected, "_total")},
            not_accepted={labels["reason"]: value
                          for labels, value in _samples(metrics.rejected_predictions, "_total")},
        )

    def since(self, earlier: Totals) -> Totals:
        """What happened between `earlier` and this moment."""
        return Totals(
            requests=_minus(self.requests, earlier.requests),
            images=self.images - earlier.images,
            batches=self.batches - earlier.batches,
            batched_images=self.batched_images - earlier.batched_images,
            rejected=_minus(self.rejected, earlier.rejected),
            not_accepted=_minus(self.not_accepted, earlier.not_accepted),
        )

    def as_fields(self) -> dict[str, Any]:
        """Log fields: integer counts, non-zero breakdowns only, mean batch size."""
        total = sum(self.requests.values())
        errors = {code: int(n) for code, n in sorted(self.requests.items()) if code != "OK" and n}
        return {
            "requests": int(total),
            "ok": int(self.requests.get("OK", 0.0)),
            "errors": errors,
            "error_ratio": round(sum(errors.values()) / total, 4) if total else 0.0,
            "images": int(self.images),
            "batches": int(self.batches),
            "mean_batch_size": round(self.batched_images / self.batches, 2) if self.batches else 0.0,
            "rejected": {reason: int(n) for reason, n in sorted(self.rejected.items()) if n},
            "not_accepted": {reason: int(n) for reason, n in sorted(self.not_accepted.items()) if n},
        }


class SummaryLogger:
    """Logs a summary every `interval_s` seconds (0: never) while running, and one at `stop()`."""

    def __init__(self, metrics: Metrics, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._interval = interval_s
        self._clock = clock
        self._started = clock()
        # The registry may already hold counts (a server restarted in-process): report from here on.
        self._baseline = Totals.read(metrics)
        self._last = self._baseline
        self._last_at = self._started
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the periodic lines on the running event loop (no-op when the interval is 0)."""
        if self._interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="summary")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.log_interval()
            except Exception:  # a summary must never take the server down
                log.exception("cannot write the summary line")

    def log_interval(self) -> dict[str, Any]:
        """Log (and return) the fields of what happened since the previous summary."""
        now, at = Totals.read(self._metrics), self._clock()
        values = now.since(self._last).as_fields()
        elapsed = at - self._last_at
        values["interval_s"] = round(elapsed, 3)
        values["requests_per_s"] = round(values["requests"] / elapsed, 3) if elapsed > 0 else 0.0
        values["uptime_s"] = round(at - self._started, 3)
        self._last, self._last_at = now, at
        log.info("summary", extra=fields(**values))
        return values

    async def stop(self) -> dict[str, Any]:
        """Stop the periodic lines; log (and return) the summary of the server's whole life."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        values = Totals.read(self._metrics).since(self._baseline).as_fields()
        values["uptime_s"] = round(self._clock() - self._started, 3)
        log.info("shutdown summary", extra=fields(**values))
        return values
