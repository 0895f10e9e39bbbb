"""The dynamic batcher: coalesce concurrent requests into one `session.run`.

Requests wait in a bounded queue (counted in images). A batch waits at most `max_delay_s` after its
oldest request's arrival for company until `max_batch_size` images are queued (unless the traffic is
sequential, see SEQUENTIAL_AFTER); then every request's pixels are normalized straight into one
preallocated input array and run on a dedicated inference thread, off the event loop (one hand-off
there and one call back per batch), or on the loop itself where that is cheaper (INLINE_MAX_IMAGES).
Each caller gets back views on exactly its own rows of the output, in order. Requests cancelled by
their caller or past their deadline are dropped before inference; when the queue is full, `submit`
refuses at once (QueueFullError) instead of growing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.recognition import strokes
from service.recognition.model import LoadedModel
from service.recognition.preprocess import normalize
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


# Sequential traffic (one request at a time: a client calling in a loop) never brings company, so
# waiting for it only adds `max_delay_s` to every call. After this many batches in a row of a single
# request each, the batcher stops waiting, until a request arrives while another is queued, running or
# in the server's handlers (Metrics.inflight_requests).
SEQUENTIAL_AFTER = 8

# A call cancelled this close to (or after) its deadline was cancelled by that deadline, not by its
# caller hanging up: the client's clock starts first (it sent the timeout), so its own expiry reaches
# the server as a cancellation a little before the server's, by the request's transit time (tens of ms
# on a loaded machine).
DEADLINE_SLACK_S = 0.1


# A batch of at most this many images, for a model on the CPU with one onnxruntime thread (what
# `--threads 0` gives on 2 CPUs), runs on the event loop itself rather than on the inference thread:
# there it would buy no parallelism (the other CPU is the client's or the loop's), but it pays two
# thread hand-offs and, worse, waits for the GIL to come back from a busy loop after session.run (up to
# Python's 5 ms switch interval: 0.6 ms a batch of 6 on average at c16 here). Paired, tritonclient at
# c16 / c64: 1.22x / 1.25x the throughput, a fifth less server CPU per image (docs/benchmarks.md).
# Bigger batches go to the thread: while they run, the loop keeps admitting requests, so that under
# overload the queue fills and the excess is refused at once (tests/server/test_overload.py), and one
# big batch never holds the loop for long (16 LeNet-5 images take ~0.2 ms). So do several threads and GPUs.
INLINE_MAX_IMAGES = 16


class QueueFullError(Exception):
    """The batch queue holds `max_queue` images already."""


class DeadlineExpiredError(Exception):
    """The request's deadline passed while it waited in the queue."""


class BatcherClosedError(Exception):
    """The server is shutting down and accepts no new work."""


@dataclass(frozen=True)
class BatchResult:
    """One request's share of a batch: its rows of each output and the model that produced them."""

    logits: np.ndarray
    probabilities: np.ndarray
    model: LoadedModel
    finite: bool = True  # every value of the whole batch's outputs is finite (checked on the inference thread)
    shapes: np.ndarray | None = None  # strokes.features of its rows, when the rule in force has the strokes test


# A batch's logits, probabilities, strokes features (or None), inference seconds, and all-finite flag.
_Outputs = tuple[np.ndarray, np.ndarray, "np.ndarray | None", float, bool]


@dataclass(eq=False)
class _Pending:
    pixels: np.ndarray  # [n, H, W] MNIST-convention pixels, or [n, 1, H, W] already normalized
    normalized: bool
    future: asyncio.Future[BatchResult]
    deadline: float | None  # time.monotonic() value
    enqueued: float

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0])


class DynamicBatcher:
    """Coalesces requests into batches for the model returned by `current_model` at batch time.

    Driven by callbacks on the event loop, not by a task: a request that joins a forming batch costs a
    future and a queue append, and wakes nothing. Each batch costs one timer (while it waits for
    company), one hand-off to the inference thread and one call back onto the loop.
    """

    def __init__(self, current_model: Callable[[], LoadedModel], max_batch_size: int, max_delay_s: float,
                 max_queue: int, metrics: Metrics,
                 strokes_for: Callable[[LoadedModel], bool] = lambda model: False) -> None:
        self._current_model = current_model
        # Whether a batch of this model needs strokes.features: the rule in force (its owner's) says.
        self._strokes_for = strokes_for
        self._max_batch = max_batch_size
        self._max_delay = max_delay_s
        self._max_queue = max_queue
        self._metrics = metrics
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_images = 0
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None  # the forming batch's deadline for company
        self._scheduled = False  # a _schedule call is due at the end of this turn of the loop
        self._drained: asyncio.Future[None] | None = None  # close() waits on it
        # One thread: batches run one after another, which is what a 2-core box (or one GPU) wants;
        # the next batch fills up while this one runs. It takes (model, batch, images) jobs, None to stop.
        self._jobs: queue.SimpleQueue[tuple[LoadedModel, list[_Pending], int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="inference", daemon=True)
        self._buffer = np.empty((0,), dtype=np.float32)
        self._lone_batches = 0  # consecutive batches of one request (see SEQUENTIAL_AFTER)
        self._running = False  # a batch is on the inference thread
        # Metric children bound once, and the queue depth read when scraped instead of set per request.
        self._queue_wait = metrics.queue_seconds.observe
        self._rejected = {reason: metrics.rejected.labels(reason=reason)
                          for reason in ("queue_full", "deadline", "cancelled")}
        metrics.queue_capacity.set(max_queue)
        metrics.queue_depth.set_function(lambda: self._queued_images)

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        """Start serving batches from the running event loop."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._thread.start()

    async def submit(self, pixels: np.ndarray, *, normalized: bool = False,
                     deadline: float | None = None) -> BatchResult:
        """Queue one request's images and wait for its results.

        Raises QueueFullError at once when the queue cannot take `len(pixels)` more images,
        DeadlineExpiredError if `deadline` passes before its batch runs, BatcherClosedError after close.
        """
        if self._closing:
            raise BatcherClosedError("server is shutting down")
        count = int(pixels.shape[0])
        if self._queued_images + count > self._max_queue:
            self._rejected["queue_full"].inc()
            raise QueueFullError(
                f"server busy: {self._queued_images} images queued, {count} more would exceed the queue "
                f"limit of {self._max_queue} images (--max-queue); retry with backoff"
            )
        self.start()
        assert self._loop is not None
        if self._queue or self._running or self._metrics.inflight_requests > 1:
            # Company: concurrent traffic, worth waiting for. Other requests in the server's handlers
            # count too: a batch that runs on the loop is over too soon for the next caller to find it
            # running, and concurrent callers must not be taken for sequential ones.
            self._lone_batches = 0
        future: asyncio.Future[BatchResult] = self._loop.create_future()
        self._queue.append(_Pending(pixels, normalized, future, deadline, time.monotonic()))
        self._queued_images += count
        if not self._scheduled:
            # Decided at the end of this turn of the loop, so that calls that arrive together (in
            # the same turn) share a batch even when the traffic was sequential until now.
            self._scheduled = True
            self._loop.call_soon(self._schedule)
        return await future

    async def close(self) -> None:
        """Refuse new work, finish everything queued, stop the inference thread."""
        self._closing = True
        if self._loop is not None:
            self._schedule()  # what is queued runs now, without waiting for company
            if self._queue or self._running:
                self._drained = self._loop.create_future()
                await self._drained
        if self._thread.is_alive():
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)

    def _schedule(self) -> None:
        """On the loop: launch the next batch now, or arm the timer that will (a batch waits for
        company until it is full or its oldest request has waited `max_delay_s`; not at all while the
        traffic is sequential or the server is closing). Nothing is launched while a batch runs: the
        next one fills up meanwhile and goes as soon as that one is done."""
        self._scheduled = False
        if self._running or not self._queue:
            return
        if self._queued_images < self._max_batch and self._max_delay > 0 and not self._closing \
                and self._lone_batches < SEQUENTIAL_AFTER:
            wait = self._queue[0].enqueued + self._max_delay - time.monotonic()
            if wait > 0:
                if self._timer is None:
                    assert self._loop is not None
                    self._timer = self._loop.call_later(wait, self._company_timeout)
                return
        self._launch()

    def _company_timeout(self) -> None:
        self._timer = None
        self._schedule()

    def _launch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._take_batch()
        self._lone_batches = self._lone_batches + 1 if len(batch) == 1 else 0
        if not batch:  # every queued request had gone or expired
            self._check_drained()
            return
        started = time.monotonic()
        for item in batch:
            self._queue_wait(started - item.enqueued)
        self._running = True
        model, total = self._current_model(), sum(item.size for item in batch)
        if total <= INLINE_MAX_IMAGES and model.threads == 1 and model.provider == "CPUExecutionProvider":
            # On the loop (see INLINE_MAX_IMAGES); its callers are answered in the loop's next turn.
            assert self._loop is not None
            self._loop.call_soon(self._finish, model, batch, total, self._outcome(model, batch, total))
            return
        self._jobs.put((model, batch, total))

    def _work(self) -> None:
        """The inference thread: run each batch, then hand it back to the loop in one call."""
        loop = self._loop
        assert loop is not None
        while (job := self._jobs.get()) is not None:
            model, batch, total = job
            try:
                loop.call_soon_threadsafe(self._finish, model, batch, total, self._outcome(model, batch, total))
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _finish(self, model: LoadedModel, batch: list[_Pending], total: int,
                outcome: _Outputs | Exception) -> None:
        """On the loop: the next batch goes to the thread first, then this one's callers get their rows."""
        self._running = False
        self._schedule()
        if isinstance(outcome, Exception):
            log.error("inference failed for a batch of %d images", total, exc_info=outcome)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(outcome)
        else:
            logits, probabilities, shapes, seconds, finite = outcome
            self._metrics.inference_seconds.observe(seconds)
            self._metrics.batch_size.observe(total)
            self._metrics.last_inference.set(time.time())
            offset = 0
            for item in batch:
                rows = slice(offset, offset + item.size)
                offset += item.size
                if not item.future.done():
                    item.future.set_result(BatchResult(logits[rows], probabilities[rows], model, finite,
                                                       None if shapes is None else shapes[rows]))
        self._check_drained()

    def _check_drained(self) -> None:
        if self._drained is not None and not self._queue and not self._running and not self._drained.done():
            self._drained.set_result(None)

    def _take_batch(self) -> list[_Pending]:
        """Pop requests up to `max_batch_size` images (an oversized request runs alone, whole)."""
        batch: list[_Pending] = []
        images = 0
        now = time.monotonic()
        while self._queue:
            item = self._queue[0]
            if batch and images + item.size > self._max_batch:
                break
            self._queue.popleft()
            self._queued_images -= item.size
            expired = item.deadline is not None and now >= item.deadline
            if item.future.done():  # the caller went away; don't spend inference on it
                # gRPC cancels a call whose deadline passed before we get here: that is a deadline too.
                expired = item.deadline is not None and now >= item.deadline - DEADLINE_SLACK_S
                self._rejected["deadline" if expired else "cancelled"].inc()
                continue
            if expired:
                self._rejected["deadline"].inc()
                item.future.set_exception(DeadlineExpiredError(
                    f"deadline expired after {now - item.enqueued:.3f} s in the batch queue"))
                continue
            batch.append(item)
            images += item.size
        return batch

    def _outcome(self, model: LoadedModel, batch: list[_Pending],
                 total: int) -> _Outputs | Exception:
        """`_infer`, or the exception it raised: a failing session.run must fail the batch's callers,
        not the loop or the inference thread."""
        try:
            return self._infer(model, batch, total)
        except Exception as exc:
            return exc

    def _infer(self, model: LoadedModel, batch: list[_Pending],
               total: int) -> _Outputs:
        """On the inference thread, or on the loop for a small batch: fill the input array, run the session."""
        started = time.perf_counter()
        shape = (total, *model.metadata.input_shape)
        size = int(np.prod(shape))
        if self._buffer.size < size:
            self._buffer = np.empty(max(size, self._max_batch * size // total), dtype=np.float32)
        inputs = self._buffer[:size].reshape(shape)
        offset = 0
        for item in batch:
            rows = inputs[offset:offset + item.size]
            offset += item.size
            if item.normalized:
                rows[...] = item.pixels
            else:
                normalize(item.pixels, model.metadata.normalization, out=rows)
        logits, probabilities = model.run(inputs)
        finite = bool(np.isfinite(logits).all() and np.isfinite(probabilities).all())
        shapes = None
        if self._strokes_for(model):
            # Once per batch, on the model's input: blank paper is at (0 - mean) / std there.
            norm = model.metadata.normalization
            shapes = strokes.features(inputs[:, 0], paper=-norm.mean / norm.std)
        return logits, probabilities, shapes, time.perf_counter() - started, finite
