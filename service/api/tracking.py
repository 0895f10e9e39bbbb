"""Request accounting shared by every adapter: status code, latency, in-flight gauge and the
failure log line, counted exactly once per answered request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import grpc

from service.recognition.batcher import DEADLINE_SLACK_S
from service.recognition.recognizer import RecognizeError
from service.telemetry.logs import RateLimitedLog
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# Every message a client gets stays far below gRPC's 8 KiB metadata limit (an oversized status message
# turns the reply into RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"); the parts of
# it that quote the client are cut shorter still where they are built (telemetry.logs.short).
MAX_MESSAGE_CHARS = 1024
FAILURE_LINES_PER_SECOND = 10


def clip(message: str) -> str:
    """A status message as it goes on the wire and into the log: at most MAX_MESSAGE_CHARS."""
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 1] + "…"


async def abort(context: grpc.aio.ServicerContext, code: str, message: str) -> None:
    """End the call with `code`; for a caller that has already gone, just stop (writing a status to a
    cancelled call is what makes grpc log an ExecuteBatchError traceback)."""
    if context.cancelled():
        raise asyncio.CancelledError
    await context.abort(grpc.StatusCode[code], clip(message))


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RequestTracker:
    """Counts one answered request: status code, latency, in-flight gauge, failure log line."""

    def __init__(self, metrics: Metrics, rpc: str) -> None:
        self._metrics = metrics
        self.rpc = rpc
        # The label children, bound once (a labels() lookup costs more than the increment).
        self._codes: dict[str, Any] = {}
        self._seconds: Any = None  # bound at the first answer: an RPC never called exports no series
        # One line per failed request, but at most FAILURE_LINES_PER_SECOND per status code: a flood of
        # bad requests is counted in full by the metrics, and summarised in the log.
        self._failures = RateLimitedLog(log, FAILURE_LINES_PER_SECOND)

    def track(self, peer: str | Callable[[], str] = "", deadline: float | None = None) -> _Tracked:
        """A context manager yielding a dict; the body sets ``outcome["code"]`` (default OK; on
        cancellation CANCELLED, or DEADLINE_EXCEEDED when `deadline`, a time.monotonic() value, has
        passed). `peer` may be a callable (grpc's `context.peer`): it is then asked only when a failure
        is logged. (A class rather than a generator-based context manager: it runs on every request.)"""
        return _Tracked(self, peer, deadline)

    async def answer(self, context: grpc.aio.ServicerContext, deadline: float | None, work: Awaitable[T]) -> T:
        """One unary gRPC call: await `work` (a coroutine of the handler's), counted once; a RecognizeError
        it raises ends the call with that status and message."""
        error: RecognizeError | None = None
        with self.track(context.peer, deadline) as outcome:
            try:
                return await work
            except RecognizeError as exc:
                outcome["code"], outcome["reason"] = exc.code, exc.message
                error = exc
        assert error is not None
        await abort(context, error.code, error.message)
        raise AssertionError("unreachable: abort raises")

    def _answered(self, outcome: dict[str, str], started: float, peer: str | Callable[[], str]) -> None:
        metrics = self._metrics
        metrics.inflight_requests -= 1
        code = outcome["code"]
        counter = self._codes.get(code)
        if counter is None:
            counter = self._codes[code] = metrics.requests.labels(rpc=self.rpc, code=code)
        counter.inc()
        if self._seconds is None:
            self._seconds = metrics.request_seconds.labels(rpc=self.rpc)
        self._seconds.observe(time.perf_counter() - started)
        if code != "OK":
            self._failures.warning((code,), "request failed", rpc=self.rpc, code=code,
                                   reason=clip(outcome.get("reason", "")),
                                   peer=peer if isinstance(peer, str) else peer())


class _Tracked:
    """One request being tracked (RequestTracker.track)."""

    __slots__ = ("_deadline", "_outcome", "_peer", "_started", "_tracker")

    def __init__(self, tracker: RequestTracker, peer: str | Callable[[], str], deadline: float | None) -> None:
        self._tracker = tracker
        self._peer = peer
        self._deadline = deadline
        self._outcome = {"code": "OK"}
        self._started = 0.0

    def __enter__(self) -> dict[str, str]:
        self._started = time.perf_counter()
        self._tracker._metrics.inflight_requests += 1
        return self._outcome

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> Literal[False]:
        outcome = self._outcome
        if isinstance(exc, asyncio.CancelledError):
            expired = self._deadline is not None and time.monotonic() >= self._deadline - DEADLINE_SLACK_S
            outcome["code"] = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
            outcome.setdefault("reason", "deadline expired" if expired else "cancelled by the client")
        elif isinstance(exc, RecognizeError):
            outcome["code"] = exc.code
        elif isinstance(exc, Exception) and outcome["code"] == "OK":
            outcome["code"] = "INTERNAL"
            outcome.setdefault("reason", type(exc).__name__)
        self._tracker._answered(outcome, self._started, self._peer)
        return False  # never swallows the exception
