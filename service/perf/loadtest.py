"""`digits loadtest`: an asyncio gRPC load generator for the Recognize API.

Closed loop (default): `--concurrency` workers each send a request, wait for the answer, send the next.
Open loop (`--rate R`): requests arrive as a Poisson process of R requests/s whatever the server does;
at most `--concurrency` are outstanding, and a request's latency is measured from its *scheduled*
arrival, so time spent waiting for a free slot counts (no coordinated omission).

Every run is bounded in time (`--duration`, also the cap for `--requests`) and every request has a
deadline (`--timeout`); traffic goes only to `--server`. Requests are serialized before the run and
spread over `--connections` HTTP/2 connections (several, so that `digits serve --workers N`, which
shares the port through SO_REUSEPORT and so balances connections, not calls, gets them all busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import grpc
import numpy as np

from service.gen.digits.v1 import digits_pb2
from service.gen.inference import grpc_predict_v2_pb2 as v2
from service.perf.loadsource import PreparedRequest
from service.perf.loadstats import LoadStats, Summary

RECOGNIZE = "/digits.v1.DigitRecognizer/Recognize"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
DEFAULT_DURATION_S = 10.0
REQUESTS_CAP_S = 300.0  # the time bound of a --requests run without --duration

Parse = Callable[[bytes], Sequence[int]]  # serialized reply -> predicted digit per image


def parse_recognize(data: bytes) -> list[int]:
    """Predicted digits of a serialized RecognizeResponse."""
    return [p.digit for p in digits_pb2.RecognizeResponse.FromString(data).predictions]


def parse_model_infer(data: bytes) -> list[int]:
    """Predicted digits of a serialized ModelInferResponse (its probabilities output, raw or typed)."""
    reply = v2.ModelInferResponse.FromString(data)
    for index, output in enumerate(reply.outputs):
        if output.name == "probabilities":
            if index < len(reply.raw_output_contents):
                probabilities = np.frombuffer(reply.raw_output_contents[index], dtype="<f4")
            else:
                probabilities = np.asarray(output.contents.fp32_contents, dtype=np.float32)
            classes = int(output.shape[-1]) if output.shape else 10
            return probabilities.reshape(-1, classes).argmax(axis=1).tolist()
    return []


PROTOCOLS: dict[str, tuple[str, Parse]] = {"digits": (RECOGNIZE, parse_recognize),
                                           "v2": (MODEL_INFER, parse_model_infer)}


@dataclass(frozen=True)
class LoadSpec:
    """What to send, how hard and for how long."""

    target: str
    concurrency: int = 8
    duration_s: float | None = DEFAULT_DURATION_S
    requests: int | None = None
    rate: float | None = None  # open loop: mean arrivals per second
    warmup_s: float = 0.0
    timeout_s: float = 10.0
    connections: int = 0  # 0: min(concurrency, 4)
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.concurrency < 1:
            problems.append("concurrency must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            problems.append("duration must be > 0")
        if self.requests is not None and self.requests < 1:
            problems.append("requests must be >= 1")
        if self.rate is not None and self.rate <= 0:
            problems.append("rate must be > 0")
        if self.warmup_s < 0 or self.timeout_s <= 0 or self.connections < 0:
            problems.append("warmup must be >= 0, timeout > 0, connections >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def time_limit_s(self) -> float:
        """How long the measured part may last: --duration, or the cap of a --requests run."""
        if self.duration_s is not None:
            return self.duration_s
        return REQUESTS_CAP_S if self.requests is not None else DEFAULT_DURATION_S


class LoadGenerator:
    """Runs one load spec against one server; `await run()` returns the Summary."""

    def __init__(self, spec: LoadSpec, requests: Sequence[PreparedRequest], *, method: str = RECOGNIZE,
                 parse: Parse = parse_recognize, credentials: grpc.ChannelCredentials | None = None,
                 channel_options: Sequence[tuple[str, Any]] = (), progress: TextIO | None = None,
                 progress_interval_s: float = 1.0, metadata: Sequence[tuple[str, str]] = ()) -> None:
        if not requests:
            raise ValueError("no requests to send")
        self.spec = spec
        self._requests = list(requests)
        self._method = method
        self._parse = parse
        self._credentials = credentials
        self._options = list(channel_options)
        self._metadata = tuple(metadata) or None  # e.g. the bearer token (service.client.bearer_metadata)
        self._progress = progress
        self._progress_interval = progress_interval_s
        self.stats = LoadStats()
        self._next = 0
        self._issued = 0
        self._measure_from = 0.0
        self._stop_at = 0.0
        self._last_done = 0.0
        self._stopped_by = ""
        self._last_report = 0.0  # when the progress interval now being counted began (0: not yet)

    async def run(self) -> Summary:
        spec = self.spec
        count = spec.connections or min(spec.concurrency, 4)
        # A local subchannel pool per channel: otherwise channels to one target share one connection.
        options = [*self._options, ("grpc.use_local_subchannel_pool", 1),
                   ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        channels = [grpc.aio.secure_channel(spec.target, self._credentials, options=options)
                    if self._credentials else grpc.aio.insecure_channel(spec.target, options=options)
                    for _ in range(count)]
        calls = [ch.unary_unary(self._method, request_serializer=None, response_deserializer=None)
                 for ch in channels]
        try:
            try:
                async with asyncio.timeout(self.spec.timeout_s):
                    await asyncio.gather(*(ch.channel_ready() for ch in channels))
            except TimeoutError:
                raise ConnectionError(f"cannot connect to {spec.target} within {spec.timeout_s:g} s") from None
            started = time.perf_counter()
            self._measure_from = started + spec.warmup_s
            self._stop_at = self._measure_from + spec.time_limit_s
            reporter = asyncio.create_task(self._report_progress()) if self._progress else None
            try:
                if spec.rate is None:
                    await asyncio.gather(*(self._closed_worker(calls[i % count]) for i in range(spec.concurrency)))
                else:
                    await self._open_loop(calls)
            finally:
                if reporter is not None:
                    reporter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reporter
                    # The last, partial interval: a run shorter than one interval still shows a line.
                    self._write_progress(final=True)
        finally:
            await asyncio.gather(*(ch.close() for ch in channels))
        if not self._stopped_by:
            self._stopped_by = "duration"
        end = max(self._last_done, min(self._stop_at, time.perf_counter()))
        return self.stats.summary(max(1e-9, end - self._measure_from), self._stopped_by)

    def _take(self) -> PreparedRequest | None:
        """The next request to send, or None when the run is over."""
        now = time.perf_counter()
        if now >= self._stop_at:
            self._stopped_by = self._stopped_by or "duration"
            return None
        if self.spec.requests is not None and now >= self._measure_from:
            if self._issued >= self.spec.requests:
                self._stopped_by = self._stopped_by or "requests"
                return None
            self._issued += 1
        request = self._requests[self._next]
        self._next = (self._next + 1) % len(self._requests)
        return request

    async def _send(self, call: Any, request: PreparedRequest, scheduled: float) -> None:
        try:
            reply = await call(request.data, timeout=self.spec.timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if scheduled >= self._measure_from:
                self.stats.record_error(exc.code().name)
            return
        done = time.perf_counter()
        if scheduled < self._measure_from:
            return  # warm-up
        self._last_done = max(self._last_done, done)
        digits = self._parse(reply)
        if len(digits) != request.images:
            self.stats.record_error("BAD_REPLY")
            return
        known = request.labels >= 0
        checked = int(known.sum())
        correct = int((np.asarray(digits)[known] == request.labels[known]).sum()) if checked else 0
        self.stats.record_ok(done - scheduled, request.images, checked, correct)

    async def _closed_worker(self, call: Any) -> None:
        while (request := self._take()) is not None:
            await self._send(call, request, time.perf_counter())

    async def _open_loop(self, calls: Sequence[Any]) -> None:
        assert self.spec.rate is not None
        rng = np.random.default_rng(self.spec.seed)
        slots = asyncio.Semaphore(self.spec.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        scheduled = time.perf_counter()
        index = 0

        async def one(call: Any, request: PreparedRequest, at: float) -> None:
            async with slots:
                await self._send(call, request, at)

        while True:
            scheduled += float(rng.exponential(1.0 / self.spec.rate))
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = self._take()
            if request is None:
                break
            task = asyncio.create_task(one(calls[index % len(calls)], request, scheduled))
            index += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def _report_progress(self) -> None:
        out = self._progress
        assert out is not None
        tty = out.isatty()
        while (left := self._measure_from - time.perf_counter()) > 0:
            if tty:
                out.write(f"\rwarming up, {left:.1f} s left   ")
                out.flush()
            await asyncio.sleep(min(self._progress_interval, left))
        self._last_report = time.perf_counter()
        self.stats.interval(0.0)  # start the first interval here
        while True:
            await asyncio.sleep(self._progress_interval)
            self._write_progress()

    def _write_progress(self, final: bool = False) -> None:
        """One progress line for the interval since the last one (a live line on a terminal)."""
        out = self._progress
        if out is None or not self._last_report:
            return
        now = time.perf_counter()
        line = self.stats.interval(now - self._last_report).progress_line(now - self._measure_from)
        tty = out.isatty()
        out.write(("\r" + line if tty else line) + ("\n" if final or not tty else ""))
        out.flush()
        self._last_report = now


def run_load(spec: LoadSpec, requests: Sequence[PreparedRequest], **kwargs: Any) -> Summary:
    """Blocking wrapper: run the load on a fresh event loop."""
    return asyncio.run(LoadGenerator(spec, requests, **kwargs).run())
