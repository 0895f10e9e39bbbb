"""The dynamic batcher: coalesce concurrent requests into one `session.run`.

Requests wait in a bounded queue (counted in images). The loop takes the oldest request, waits at
most `max_delay_s` after its arrival for company until `max_batch_size` images are queued (unless the
traffic is sequential, see SEQUENTIAL_AFTER), then
normalizes every request's pixels straight into one preallocated input array and runs it on a
dedicated inference thread, off the event loop. Each caller gets back views on exactly its own rows
of the output, in order. Requests cancelled by their caller or past their deadline are dropped before
inference; when the queue is full, `submit` refuses at once (QueueFullError) instead of growing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.recognition.model import LoadedModel
from service.recognition.preprocess import normalize
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


# Sequential traffic (one request at a time: a client calling in a loop) never brings company, so
# waiting for it only adds `max_delay_s` to every call. After this many batches in a row of a single
# request each, the batcher stops waiting, until a request arrives while another is queued or running.
SEQUENTIAL_AFTER = 8

# A call cancelled this close to (or after) its deadline was cancelled by that deadline, not by its
# caller hanging up: the client's clock starts first (it sent the timeout), so its own expiry reaches
# the server as a cancellation a little before the server's, by the request's transit time (tens of ms
# on a loaded machine).
DEADLINE_SLACK_S = 0.1


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
    """Coalesces requests into batches for the model returned by `current_model` at batch time."""

    def __init__(self, current_model: Callable[[], LoadedModel], max_batch_size: int, max_delay_s: float,
                 max_queue: int, metrics: Metrics) -> None:
        self._current_model = current_model
        self._max_batch = max_batch_size
        self._max_delay = max_delay_s
        self._max_queue = max_queue
        self._metrics = metrics
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        # One thread: batches run one after another, which is what a 2-core box (or one GPU) wants;
        # the next batch fills up while this one runs.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._buffer = np.empty((0,), dtype=np.float32)
        self._lone_batches = 0  # consecutive batches of one request (see SEQUENTIAL_AFTER)
        self._running = False  # a batch is on the inference thread
        metrics.queue_capacity.set(max_queue)

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

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
            self._metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFullError(
                f"server busy: {self._queued_images} images queued, {count} more would exceed the queue "
                f"limit of {self._max_queue} images (--max-queue); retry with backoff"
            )
        if self._queue or self._running:
            self._lone_batches = 0  # company: concurrent traffic, worth waiting for
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(pixels, normalized, future, deadline, time.monotonic()))
        self._queued_images += count
        self._metrics.queue_depth.set(self._queued_images)
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Refuse new work, finish everything queued, stop the loop and the inference thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_company()
            batch = self._take_batch()
            self._lone_batches = self._lone_batches + 1 if len(batch) == 1 else 0
            if batch:
                await self._run(batch)

    async def _wait_for_company(self) -> None:
        """Wait until the batch is full or the oldest request has waited `max_delay_s` (not at all while
        the traffic is sequential)."""
        if self._max_delay <= 0 or self._closing or self._lone_batches >= SEQUENTIAL_AFTER:
            return
        until = self._queue[0].enqueued + self._max_delay
        while self._queued_images < self._max_batch and not self._closing:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

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
                self._metrics.rejected.labels(reason="deadline" if expired else "cancelled").inc()
                continue
            if expired:
                self._metrics.rejected.labels(reason="deadline").inc()
                item.future.set_exception(DeadlineExpiredError(
                    f"deadline expired after {now - item.enqueued:.3f} s in the batch queue"))
                continue
            batch.append(item)
            images += item.size
        self._metrics.queue_depth.set(self._queued_images)
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        model = self._current_model()
        total = sum(item.size for item in batch)
        started = time.monotonic()
        for item in batch:
            self._metrics.queue_seconds.observe(started - item.enqueued)
        loop = asyncio.get_running_loop()
        self._running = True
        try:
            logits, probabilities, seconds = await loop.run_in_executor(
                self._executor, self._infer, model, batch, total)
        except Exception as exc:  # a failing session.run must fail its callers, not the loop
            log.exception("inference failed for a batch of %d images", total)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._running = False
        self._metrics.inference_seconds.observe(seconds)
        self._metrics.batch_size.observe(total)
        self._metrics.last_inference.set(time.time())
        offset = 0
        for item in batch:
            rows = slice(offset, offset + item.size)
            offset += item.size
            if not item.future.done():
                item.future.set_result(BatchResult(logits[rows], probabilities[rows], model))

    def _infer(self, model: LoadedModel, batch: list[_Pending], total: int) -> tuple[np.ndarray, np.ndarray, float]:
        """On the inference thread: fill the input array, run the session."""
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
        return logits, probabilities, time.perf_counter() - started
