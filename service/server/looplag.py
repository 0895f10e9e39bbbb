"""How late the event loop runs: a ticker that asks to wake every 10 ms and records how much later it
actually woke, as the `digits_event_loop_lag_seconds` histogram.

Every gRPC and HTTP call of a process shares its one event loop; a request that hogs it (a big decode,
a huge JSON body parsed inline) delays every other call by as long. This makes such stalls visible in
the metrics, and is what the hostile-input tests and `make soak` measure.
"""

from __future__ import annotations

import asyncio
import contextlib

from service.telemetry.metrics import Metrics

TICK_S = 0.01


class LoopLagMonitor:
    """Observes the loop's lag every TICK_S while running; `worst` is the largest lag seen."""

    def __init__(self, metrics: Metrics, tick_s: float = TICK_S) -> None:
        self._metrics = metrics
        self._tick = tick_s
        self._task: asyncio.Task[None] | None = None
        self.worst = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self._tick
            await asyncio.sleep(self._tick)
            lag = max(0.0, loop.time() - asked)
            self.worst = max(self.worst, lag)
            self._metrics.loop_lag_seconds.observe(lag)
