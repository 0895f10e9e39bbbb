"""Wiring: model + recognizer + gRPC services + health + reflection + metrics + signals.

Start-up order: load and warm the model, start the batcher, bind the ports, then report SERVING.
Shutdown (SIGTERM/SIGINT): health turns NOT_SERVING, the gRPC server stops taking new calls and
gives in-flight ones `grace_period_s` to finish, then the batcher drains and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from service import grpc_api
from service.config import ServerConfig
from service.gen.digits.v1 import digits_pb2
from service.logs import fields
from service.metrics import Metrics
from service.model import ModelLoadError, available_cpus, load_model
from service.recognizer import Recognizer

log = logging.getLogger(__name__)

DIGITS_SERVICE = digits_pb2.DESCRIPTOR.services_by_name["DigitRecognizer"].full_name


class StartupError(RuntimeError):
    """The server cannot start (bad model, port in use, ...); the message says why."""


class DigitsServer:
    """One server process: call `start()`, then `stop()` (or `run_until_signalled()`)."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None,
                 available_providers: list[str] | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self._available = available_providers
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._metrics_http: Any = None
        self.recognizer: Recognizer | None = None
        self.port = 0
        self.metrics_port = 0
        self._service_names: list[str] = [DIGITS_SERVICE]

    async def start(self) -> None:
        """Load the model, bind ports and report SERVING; raises StartupError on failure."""
        cfg = self.config
        try:
            model = await asyncio.to_thread(load_model, cfg.model, cfg.device, cfg.threads, cfg.max_batch_size,
                                            self._available)
        except ModelLoadError as exc:
            raise StartupError(str(exc)) from exc
        self.recognizer = Recognizer(model, cfg, self.metrics)
        self.recognizer.start()
        server = grpc.aio.server(options=self._grpc_options())
        grpc_api.add_to_server(grpc_api.DigitRecognizerServicer(self.recognizer, self.metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], server)
        address = f"{cfg.host}:{cfg.port}"
        try:
            self.port = self._bind(server, address)
        except RuntimeError as exc:
            await self.recognizer.close()
            raise StartupError(f"cannot listen on {address}: {exc} (is the port already in use?)") from exc
        await server.start()
        self._grpc = server
        if cfg.metrics_port:
            try:
                self._metrics_http, _ = start_http_server(cfg.metrics_port, addr=cfg.host,
                                                          registry=self.metrics.registry)
            except OSError as exc:
                await self.stop(grace=0)
                raise StartupError(f"cannot serve metrics on {cfg.host}:{cfg.metrics_port}: {exc}") from exc
            self.metrics_port = self._metrics_http.server_port
        for name in ("", *self._service_names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra=fields(
            model=str(model.path), name=model.name, version=model.version, sha256=model.sha256,
            providers=list(model.providers), threads=cfg.threads or available_cpus(),
            max_batch_size=cfg.max_batch_size, max_batch_delay_ms=cfg.max_batch_delay_ms,
            max_queue=cfg.max_queue, grpc=f"{cfg.host}:{self.port}", tls=cfg.tls_cert is not None,
            metrics_port=self.metrics_port or None, load_seconds=round(model.load_seconds, 3)))

    def _grpc_options(self) -> list[tuple[str, Any]]:
        cfg = self.config
        return [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
            # gRPC turns SO_REUSEPORT on by default, which would let a second server silently share
            # a port that is "in use"; only --workers N wants that.
            ("grpc.so_reuseport", 1 if cfg.workers > 1 else 0),
        ]

    def _bind(self, server: grpc.aio.Server, address: str) -> int:
        cfg = self.config
        if cfg.tls_cert is None or cfg.tls_key is None:
            return server.add_insecure_port(address)
        try:
            chain = cfg.tls_cert.read_bytes()
            key = cfg.tls_key.read_bytes()
            client_ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None
        except OSError as exc:
            raise StartupError(f"cannot read TLS files: {exc}") from exc
        credentials = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None)
        return server.add_secure_port(address, credentials)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, refuse new calls, let in-flight ones finish within `grace`."""
        grace = self.config.grace_period_s if grace is None else grace
        started = time.monotonic()
        await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self.recognizer is not None:
            await self.recognizer.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        log.info("stopped", extra=fields(drain_seconds=round(time.monotonic() - started, 3)))

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads the model."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload()))
        await stop.wait()
        log.info("shutdown signal received; draining", extra=fields(grace_seconds=self.config.grace_period_s))
        await self.stop()

    async def _reload(self) -> None:
        if self.recognizer is None:
            return
        with contextlib.suppress(ModelLoadError):  # logged by the recognizer; the old model keeps serving
            await self.recognizer.reload()


async def serve(config: ServerConfig) -> int:
    """Run a server until signalled; returns the exit code (0 after a clean drain)."""
    server = DigitsServer(config)
    try:
        await server.start()
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    await server.run_until_signalled()
    return 0
