"""Wiring: model + recognizer + gRPC services + health + reflection + metrics + TLS + tokens + signals.

Start-up order: read the token file, load and warm the model, start the batcher, bind the ports, then
report SERVING. Shutdown (SIGTERM/SIGINT): health turns NOT_SERVING, the gRPC server stops taking new
calls and gives in-flight ones `grace_period_s` to finish, then the batcher drains and the process exits 0.
SIGHUP reloads the model and the token file.
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

from service.api import digits_grpc, v2_grpc
from service.api import http as http_api
from service.api.metrics_http import MetricsEndpoint
from service.gen.digits.v1 import digits_pb2
from service.recognition.model import ModelLoadError, load_model
from service.recognition.model_metadata import Rejection
from service.recognition.recognizer import Recognizer
from service.server import auth, tls
from service.server.config import ServerConfig
from service.server.looplag import LoopLagMonitor
from service.server.summary import SummaryLogger
from service.server.watcher import ModelFileWatcher, model_file
from service.telemetry.logs import fields
from service.telemetry.metrics import Metrics

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
        self._digits: digits_grpc.DigitRecognizerServicer | None = None
        self._health = health.aio.HealthServicer()
        self._metrics_http: MetricsEndpoint | None = None
        self._lag = LoopLagMonitor(self.metrics)
        self.recognizer: Recognizer | None = None
        self._summary: SummaryLogger | None = None
        self._watcher: ModelFileWatcher | None = None
        self._tokens: auth.Tokens | None = None  # --auth-token-file
        self._token_watcher: ModelFileWatcher | None = None
        self._reloads: set[asyncio.Task[None]] = set()  # SIGHUP reloads in progress (keep a reference)
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self._http: http_api.HttpApi | None = None
        self._service_names: list[str] = [DIGITS_SERVICE, v2_grpc.SERVICE_NAME]
        self._ready = False  # SERVING: between a finished start() and the beginning of stop()

    async def start(self) -> None:
        """Load the model, bind ports and report SERVING; raises StartupError on failure."""
        cfg = self.config
        try:
            # Before the model: a bad token file or TLS file fails in milliseconds, not after a warm-up.
            self._tokens = auth.Tokens(cfg.auth_token_file, self.metrics) if cfg.auth_token_file else None
            http_tls = tls.server_context(cfg) if cfg.tls_cert is not None else None
            path = model_file(cfg.model)
        except (auth.TokenFileError, tls.TlsFilesError, ValueError) as exc:
            raise StartupError(str(exc)) from exc
        try:
            model = await asyncio.to_thread(load_model, path, cfg.device, cfg.threads, cfg.max_batch_size,
                                            self._available, name=cfg.model_name)
        except ModelLoadError as exc:
            raise StartupError(str(exc)) from exc
        except Exception as exc:  # a graph that loads but fails to run (onnxruntime's own error types)
            raise StartupError(f"cannot load model {path}: {type(exc).__name__}: "
                               f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from exc
        self.recognizer = Recognizer(model, cfg, self.metrics)
        self.recognizer.start()
        interceptors = [auth.BearerTokenInterceptor(self._tokens)] if self._tokens else []
        server = grpc.aio.server(options=self._grpc_options(), interceptors=interceptors)
        self._digits = digits_grpc.DigitRecognizerServicer(self.recognizer, self.metrics)
        digits_grpc.add_to_server(self._digits, server,
                                  self.metrics)
        v2_grpc.add_to_server(v2_grpc.InferenceServicer(self.recognizer, self.metrics, lambda: self.ready), server,
                              self.metrics)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], server, pool=v2_grpc.ReflectionPool())
        address = f"{cfg.host}:{cfg.port}"
        try:
            self.port = self._bind(server, address)
        except StartupError:
            await self.recognizer.close()
            raise
        except RuntimeError as exc:
            await self.recognizer.close()
            raise StartupError(f"cannot listen on {address}: {exc} (is the port already in use?)") from exc
        await server.start()
        self._grpc = server
        if cfg.metrics_port:
            self._metrics_http = MetricsEndpoint(self.metrics.registry, cfg.max_http_connections,
                                                 cfg.http_idle_timeout_s)
            try:
                self.metrics_port = await self._metrics_http.start(
                    cfg.host, cfg.metrics_port, tls.server_context(cfg) if cfg.metrics_tls else None)
            except OSError as exc:
                self._metrics_http = None
                await self.stop(grace=0)
                raise StartupError(f"cannot serve metrics on {cfg.host}:{cfg.metrics_port}: {exc}") from exc
        if cfg.http_port:
            self._http = http_api.HttpApi(self.recognizer, self.metrics, lambda: self.ready,
                                          max_message_bytes=cfg.max_message_bytes,
                                          reuse_port=cfg.workers > 1, max_connections=cfg.max_http_connections,
                                          idle_timeout_s=cfg.http_idle_timeout_s,
                                          body_timeout_s=cfg.http_body_timeout_s,
                                          middlewares=[auth.http_middleware(self._tokens)] if self._tokens else [])
            try:
                self.http_port = await self._http.start(cfg.host, cfg.http_port, ssl_context=http_tls)
            except OSError as exc:
                self._http = None
                await self.stop(grace=0)
                raise StartupError(f"cannot serve HTTP on {cfg.host}:{cfg.http_port}: {exc}") from exc
        self._lag.start()
        for name in ("", *self._service_names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._ready = True
        log.info("serving", extra=fields(
            model=str(model.path), name=model.name, version=model.version, sha256=model.sha256,
            providers=list(model.providers), threads=model.threads,
            max_batch_size=cfg.max_batch_size, max_batch_delay_ms=cfg.max_batch_delay_ms,
            max_queue=cfg.max_queue, grpc=f"{cfg.host}:{self.port}", tls=cfg.tls_cert is not None,
            metrics_port=self.metrics_port or None, load_seconds=round(model.load_seconds, 3),
            http_port=self.http_port or None, mtls=cfg.tls_client_ca is not None,
            metrics_tls=cfg.metrics_tls and bool(self.metrics_port),
            auth_tokens=len(self._tokens) if self._tokens else None,
            rejection=_describe_rule(self.recognizer.rule(model)), summary_interval_s=cfg.summary_interval_s))
        if model.metadata.rejection is None:
            log.warning("model %s %s carries no rejection thresholds: every image with ink is accepted "
                        "(retrain and export it to get not_a_digit and uncertain)", model.name, model.version)
        self._summary = SummaryLogger(self.metrics, cfg.summary_interval_s)
        self._summary.start()
        if cfg.watch:
            self._watcher = ModelFileWatcher(cfg.model, self._reload, cfg.watch_interval_s, resolve=model_file)
            self._watcher.start()
        if self._tokens is not None:
            # Always watched, --watch or not: rotating a token must not need a signal or a restart.
            tokens = self._tokens
            self._token_watcher = ModelFileWatcher(tokens.path, lambda: asyncio.to_thread(tokens.reload),
                                                   cfg.watch_interval_s, what="token file")
            self._token_watcher.start()

    @property
    def ready(self) -> bool:
        """Serving requests: started and not stopping (the v2 readiness APIs report this)."""
        return self._ready

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
        if self.config.tls_cert is None:
            return server.add_insecure_port(address)
        try:
            credentials = tls.grpc_credentials(self.config)
        except tls.TlsFilesError as exc:
            raise StartupError(str(exc)) from exc
        return server.add_secure_port(address, credentials)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, refuse new calls, let in-flight ones finish within `grace`."""
        grace = self.config.grace_period_s if grace is None else grace
        started = time.monotonic()
        self._ready = False
        for watcher in (self._watcher, self._token_watcher):
            if watcher is not None:
                await watcher.stop()
        self._watcher = self._token_watcher = None
        await self._health.enter_graceful_shutdown()
        if self.recognizer is not None:
            # From here every new call is refused (UNAVAILABLE, HTTP 503), also one that reaches a handler
            # in the moment before the gRPC server itself stops taking calls.
            self.recognizer.drain()
            # The calls already admitted and the streams already open finish first, while the gRPC server
            # still takes new calls only to refuse them with UNAVAILABLE: a call that reaches grpc after
            # its own stop() is cancelled instead, which a client cannot tell from a failure of its own.
            await self._requests_answered(started + grace)
        # gRPC and HTTP drain side by side, both before the batcher closes, with what is left of the grace.
        left = max(0.0, started + grace - time.monotonic())
        await asyncio.gather(*[s.stop(left) for s in (self._grpc, self._http) if s is not None])
        self._http = None
        if self.recognizer is not None:
            await self.recognizer.close()
        if self._summary is not None:  # after the drain, so the drained requests are in it
            await self._summary.stop()
            self._summary = None
        await self._lag.stop()
        if self._metrics_http is not None:
            await self._metrics_http.stop()
            self._metrics_http = None
        log.info("stopped", extra=fields(drain_seconds=round(time.monotonic() - started, 3)))

    async def _requests_answered(self, until: float) -> None:
        """Wait until no request is in the handlers and no stream is open, or until `until`
        (time.monotonic())."""
        def busy() -> bool:
            return self.metrics.inflight_requests > 0 or (self._digits is not None and self._digits.open_streams > 0)
        while busy() and time.monotonic() < until:
            await asyncio.sleep(0.01)  # a shutdown-only wait: a counter checked 100 times a second

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads the model and the tokens."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
        await stop.wait()
        log.info("shutdown signal received; draining", extra=fields(grace_seconds=self.config.grace_period_s))
        await self.stop()

    def _reload_in_background(self) -> None:
        log.info("SIGHUP received; reloading the model" + (" and the token file" if self._tokens else ""))
        if self._tokens is not None:
            self._tokens.reload()  # a few lines of text: at once, before the model's seconds
        task = asyncio.get_running_loop().create_task(self._reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload(self) -> None:
        """Reload the model `--model` names now (a directory may hold another file than at start-up)."""
        if self.recognizer is None:
            return
        try:
            path = model_file(self.config.model)
        except ValueError as exc:
            self.metrics.model_reloads.labels(result="failed").inc()
            log.error("model reload refused, still serving %s %s: %s", self.recognizer.model.name,
                      self.recognizer.model.version, exc)
            return
        with contextlib.suppress(ModelLoadError):  # logged by the recognizer; the old model keeps serving
            await self.recognizer.reload(path)


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


def _describe_rule(rule: Rejection | None) -> str:
    """The rejection thresholds in force, for the start-up line."""
    if rule is None:
        return "none (every image with ink is accepted)"
    shapes = "".join(f" or {key.removesuffix('_above')} > {value:g}" for key, value in sorted(rule.strokes.items()))
    return (f"not_a_digit if {rule.not_a_digit.score} < {rule.not_a_digit.below:g}{shapes}, "
            f"uncertain if {rule.uncertain.score} < {rule.uncertain.below:g}")
