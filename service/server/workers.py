"""`digits serve --workers N`: N server processes sharing one gRPC port through SO_REUSEPORT.

Python serves one request at a time per process (the GIL), so on a machine with more cores than one
process can keep busy, more processes means more requests per second. The kernel spreads incoming
*connections* over the processes listening on the port; a client with one long-lived HTTP/2
connection therefore talks to one worker, and load balancers or clients with several connections
(`digits loadtest --connections`) use them all.

Each worker is a complete server (its own model session, batcher and metrics); with ``--threads 0``
each gets its share of the CPUs as onnxruntime threads (`service.recognition.model.default_threads`). Metrics are per
worker, on consecutive ports: worker i serves /metrics on ``--metrics-port + i`` (workers 0..N-1), and
the fleet's figure is the sum over those targets (in Prometheus: ``sum without (instance) (...)``).
Per-worker ports keep every metric exact, gauges and the model-info labels included, which the
shared-file multiprocess mode of prometheus-client cannot do for gauges and label sets that change on
reload.

The parent starts worker 0 first (which may pick the port when ``--port 0``), then the others on the
same port; it forwards SIGTERM, SIGINT and SIGHUP to every worker and exits 0 once all of them have
drained and exited 0. A worker that dies on its own takes the fleet down (exit 1) so that the
supervisor (Kubernetes, systemd) restarts it whole, rather than running silently short-handed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from service.recognition.model import default_threads
from service.server.config import ServerConfig
from service.telemetry.logs import fields

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # loading and warming a model; generous for busy machines
KILL_AFTER_S = 10.0  # beyond the grace period, before a worker that will not stop is killed


@dataclass
class _Worker:
    index: int
    process: Any  # multiprocessing.context.SpawnProcess
    conn: multiprocessing.connection.Connection
    port: int = 0
    metrics_port: int = 0
    told_to_stop: bool = False


def worker_config(cfg: ServerConfig, index: int, port: int, cpus: int | None = None) -> ServerConfig:
    """The settings of worker `index`: the shared gRPC port, its own metrics port, and (for ``--threads
    0``) its share of the CPUs as onnxruntime threads, so that N workers do not each start a thread
    per CPU and fight over them."""
    metrics_port = cfg.metrics_port + index if cfg.metrics_port else 0
    if metrics_port > 65535:
        raise ValueError(f"metrics-port {cfg.metrics_port} + {index} (worker {index}) is beyond 65535")
    threads = cfg.threads or default_threads(cfg.workers, cpus)
    return cfg.replace(port=port, metrics_port=metrics_port, threads=threads)


def _worker_main(index: int, cfg: ServerConfig, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter, nothing inherited from the parent)."""
    from service.telemetry import logs

    logs.configure(cfg.log_format, cfg.log_level)
    sys.exit(asyncio.run(_serve_worker(index, cfg, conn)))


async def _serve_worker(index: int, cfg: ServerConfig, conn: multiprocessing.connection.Connection) -> int:
    from service.server.app import DigitsServer, StartupError

    # A signal forwarded by the parent before the server's handlers exist would kill the worker (SIGHUP's
    # default action) or skip the drain: hold them until the handlers are in place.
    held = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    server = DigitsServer(cfg)
    try:
        await server.start()
    except StartupError as exc:
        conn.send(("failed", str(exc)))
        return 1
    serving = asyncio.get_running_loop().create_task(server.run_until_signalled())
    await asyncio.sleep(0)  # run_until_signalled installs its handlers in its first step
    signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    conn.send(("ready", server.port, server.metrics_port))
    log.info("worker ready", extra=fields(worker=index, pid=os.getpid(), grpc_port=server.port,
                                          metrics_port=server.metrics_port or None))
    await serving
    # Drained: a late signal must not turn this clean exit into a kill (the loop's handlers are going).
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    return 0


class _Fleet:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.workers: list[_Worker] = []
        self.stopping = False
        self._ctx = multiprocessing.get_context("spawn")  # grpc and onnxruntime are not fork-safe

    def spawn(self, index: int, port: int) -> _Worker:
        parent_end, child_end = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=_worker_main, name=f"digits-worker-{index}",
                                    args=(index, worker_config(self.cfg, index, port), child_end))
        process.start()
        child_end.close()
        worker = _Worker(index, process, parent_end)
        self.workers.append(worker)
        return worker

    def wait_ready(self, worker: _Worker, deadline: float) -> str | None:
        """None once `worker` reports ready, else why it did not."""
        while not self.stopping:
            ready = multiprocessing.connection.wait([worker.conn, worker.process.sentinel],
                                                    timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            if worker.conn in ready:
                try:
                    message = worker.conn.recv()
                except EOFError:
                    return f"worker {worker.index} exited during start-up (exit code {worker.process.exitcode})"
                if message[0] == "ready":
                    worker.port, worker.metrics_port = message[1], message[2]
                    return None
                return f"worker {worker.index}: {message[1]}"
            if worker.process.sentinel in ready:
                return f"worker {worker.index} exited during start-up (exit code {worker.process.exitcode})"
            if time.monotonic() >= deadline:
                return f"worker {worker.index} not ready after {START_TIMEOUT_S:g} s"
        return "shutdown requested during start-up"

    def signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if signum == signal.SIGTERM:
                if worker.told_to_stop:
                    continue  # once is enough: the drain is under way
                worker.told_to_stop = True
            if worker.process.is_alive() and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signum)

    def on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            log.info("SIGHUP: every worker reloads its model")
            self.signal_all(signal.SIGHUP)
            return
        if not self.stopping:
            log.info("shutdown signal received; draining workers",
                     extra=fields(workers=len(self.workers), grace_seconds=self.cfg.grace_period_s))
        self.stopping = True
        self.signal_all(signal.SIGTERM)

    def stop_and_reap(self) -> bool:
        """Ask every worker to drain, wait for them; True when all exited 0."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.grace_period_s + KILL_AFTER_S
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("worker did not stop in time; killing it", extra=fields(worker=worker.index))
                worker.process.kill()
                worker.process.join(5)
        return all(w.process.exitcode == 0 for w in self.workers)


def run_workers(cfg: ServerConfig) -> int:
    """Run `cfg.workers` server processes on one port until signalled; returns the exit code."""
    fleet = _Fleet(cfg)
    previous = {sig: signal.signal(sig, fleet.on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        return _run(fleet)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(fleet: _Fleet) -> int:
    cfg = fleet.cfg
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        first = fleet.spawn(0, cfg.port)
        problem = fleet.wait_ready(first, deadline)
        if problem is None:
            # Worker 0 holds the port (with SO_REUSEPORT) so the others can join it, even for --port 0.
            rest = [fleet.spawn(i, first.port) for i in range(1, cfg.workers)]
            problem = next((p for w in rest if (p := fleet.wait_ready(w, deadline)) is not None), None)
    except ValueError as exc:
        problem = str(exc)
    if problem is not None:
        if not fleet.stopping:
            log.error("cannot start: %s", problem)
        clean = fleet.stop_and_reap()
        return 0 if fleet.stopping and clean and problem.startswith("shutdown") else 1
    log.info("serving", extra=fields(workers=cfg.workers, grpc=f"{cfg.host}:{first.port}",
                                     pids=[w.process.pid for w in fleet.workers],
                                     metrics_ports=[w.metrics_port for w in fleet.workers] if cfg.metrics_port
                                     else None))
    sentinels = [w.process.sentinel for w in fleet.workers]
    while not fleet.stopping:
        if multiprocessing.connection.wait(sentinels, timeout=1.0):
            if fleet.stopping:
                break
            dead = [w for w in fleet.workers if not w.process.is_alive()]
            log.error("worker exited unexpectedly; stopping the others",
                      extra=fields(workers=[w.index for w in dead], exit_codes=[w.process.exitcode for w in dead]))
            fleet.stop_and_reap()
            return 1
    clean = fleet.stop_and_reap()
    log.info("stopped", extra=fields(workers=cfg.workers, clean=clean,
                                     exit_codes=[w.process.exitcode for w in fleet.workers]))
    return 0 if clean else 1
