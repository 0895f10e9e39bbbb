"""Closed-loop load with the client Triton's users have: `tritonclient.grpc.aio`, FP32 tensors.

`concurrency` calls in flight, spread over `clients` InferenceServerClients (one HTTP/2 connection
each); every call asks for the `probabilities` output and its answer is checked for one row per image.
The same engine drives `digits serve`, the floor and MLServer, so their figures compare.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.perf.loadstats import LoadStats, Summary

OUTPUT = "probabilities"


@dataclass(frozen=True)
class TritonLoad:
    """One closed-loop load point."""

    target: str
    model: str
    concurrency: int
    seconds: float
    warmup_s: float = 0.0
    clients: int = 1
    timeout_s: float = 10.0


async def _run(load: TritonLoad, tensors: Sequence[np.ndarray], stats: LoadStats) -> Summary:
    import tritonclient.grpc as triton
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.utils import InferenceServerException

    # A local subchannel pool per client: otherwise clients of one target share one connection.
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", 64 << 20),
               ("grpc.max_receive_message_length", 64 << 20)]
    clients = [triton_aio.InferenceServerClient(load.target, channel_args=options)
               for _ in range(max(1, min(load.clients, load.concurrency)))]
    requests: list[list[Any]] = []
    for tensor in tensors:
        image = triton.InferInput("image", list(tensor.shape), "FP32")
        image.set_data_from_numpy(np.ascontiguousarray(tensor, dtype=np.float32))
        requests.append([image])
    outputs = [triton.InferRequestedOutput(OUTPUT)]
    started = time.perf_counter()
    measure_from = started + load.warmup_s
    stop_at = measure_from + load.seconds
    last_done = [measure_from]

    async def worker(client: Any, first: int) -> None:
        index = first
        while (sent := time.perf_counter()) < stop_at:
            inputs = requests[index % len(requests)]
            index += 1
            images = int(inputs[0].shape()[0])
            try:
                result = await client.infer(load.model, inputs, outputs=outputs, client_timeout=load.timeout_s)
            except InferenceServerException as exc:
                if sent >= measure_from:
                    stats.record_error(str(exc.status() or "ERROR").removeprefix("StatusCode."))
                await asyncio.sleep(0.001)  # a refusing server must not turn this into a busy loop
                continue
            done = time.perf_counter()
            if sent < measure_from:
                continue
            probabilities = result.as_numpy(OUTPUT)
            if probabilities is None or probabilities.shape[:1] != (images,):
                stats.record_error("BAD_REPLY")
                continue
            last_done[0] = max(last_done[0], done)
            stats.record_ok(done - sent, images)

    try:
        await asyncio.gather(*(worker(clients[i % len(clients)], i) for i in range(load.concurrency)))
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    end = max(last_done[0], min(stop_at, time.perf_counter()))
    return stats.summary(max(1e-9, end - measure_from), "duration")


def run_triton_load(load: TritonLoad, tensors: Sequence[np.ndarray], stats: LoadStats | None = None) -> Summary:
    """Run one load point on a fresh event loop; `tensors` are the requests' FP32 inputs [b, 1, H, W],
    sent in turn. What the measured part did is also added to `stats`, when given."""
    if not tensors:
        raise ValueError("no tensors to send")
    return asyncio.run(_run(load, tensors, stats if stats is not None else LoadStats()))
