"""Request accounting shared by every adapter: status code, latency, in-flight gauge and the
failure log line, counted exactly once per answered request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

import grpc

from service.recognition.recognizer import RecognizeError
from service.telemetry.logs import fields
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


# gRPC cancels a handler when its deadline passes; a cancellation this close to (or after) the
# deadline we computed from time_remaining() is that expiry, not the client hanging up.
DEADLINE_SLACK_S = 0.005


class RequestTracker:
    """Counts one answered request: status code, latency, in-flight gauge, failure log line."""

    def __init__(self, metrics: Metrics, rpc: str) -> None:
        self._metrics = metrics
        self._rpc = rpc

    @contextlib.contextmanager
    def track(self, peer: str = "", deadline: float | None = None) -> Iterator[dict[str, str]]:
        """Yields a dict; the body sets ``outcome["code"]`` (default OK; on cancellation CANCELLED, or
        DEADLINE_EXCEEDED when `deadline`, a time.monotonic() value, has passed)."""
        outcome = {"code": "OK"}
        started = time.perf_counter()
        self._metrics.inflight.inc()
        try:
            yield outcome
        except asyncio.CancelledError:
            expired = deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S
            outcome["code"] = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
            outcome.setdefault("reason", "deadline expired" if expired else "cancelled by the client")
            raise
        except RecognizeError as exc:
            outcome["code"] = exc.code
            raise
        except Exception as exc:
            if outcome["code"] == "OK":
                outcome["code"] = "INTERNAL"
                outcome.setdefault("reason", type(exc).__name__)
            raise
        finally:
            self._metrics.inflight.dec()
            self._metrics.requests.labels(rpc=self._rpc, code=outcome["code"]).inc()
            self._metrics.request_seconds.labels(rpc=self._rpc).observe(time.perf_counter() - started)
            if outcome["code"] != "OK":
                log.warning("request failed", extra=fields(rpc=self._rpc, code=outcome["code"],
                                                           reason=outcome.get("reason", ""), peer=peer))
