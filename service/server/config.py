"""The server's settings: one frozen dataclass, filled from flags, `DIGITS_*` variables and defaults.

Precedence: command-line flag > environment variable (``DIGITS_<FIELD>``, e.g. ``DIGITS_MAX_BATCH_SIZE``)
> default. Every field becomes a flag (``--max-batch-size``) with its help text, so `digits serve --help`,
the README table and the Kubernetes ConfigMap all describe the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "DIGITS_"
# The bundled model, in the repository (the server is installed editable: `make serve`, the image sets DIGITS_MODEL).
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "lenet5.onnx"
# A model name is a path segment of the v2 REST routes (/v2/models/{name}/infer) and a label value: no
# slashes, spaces or percent signs. KServe's InferenceService names (DNS-1035 labels) all qualify.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")


def _setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ServerConfig:
    """Everything `digits serve` can be told. Immutable once the server starts."""

    model: Path = _setting(DEFAULT_MODEL, "ONNX model to serve (exported by `digits export`), or a directory "
                                          "holding exactly one .onnx file (KServe's /mnt/models)")
    model_name: str | None = _setting(None, "name to serve the model as (v2 model_name, replies, metrics); "
                                            "default: the name in the model's metadata")
    host: str = _setting("127.0.0.1", "address to bind the gRPC (and HTTP) ports on; 0.0.0.0 in containers")
    port: int = _setting(50051, "gRPC port (DigitRecognizer, Open Inference Protocol, health, reflection); "
                                "0 picks a free one")
    metrics_port: int = _setting(8002, "Prometheus /metrics HTTP port; 0 disables")
    http_port: int = _setting(0, "HTTP/REST port (Open Inference Protocol REST, /v1/recognize, draw-a-digit page); "
                                 "0 disables")
    device: str = _setting("auto", "execution provider: auto (CUDA if onnxruntime offers it, else CPU), cpu, cuda",
                           ("auto", "cpu", "cuda"))
    threads: int = _setting(0, "onnxruntime intra-op threads; 0 = the CPUs available to this process "
                               "(cgroup quota and affinity aware) less one for the event loop, at least 1")
    max_batch_size: int = _setting(64, "most images coalesced into one session.run; 1 turns dynamic batching off")
    max_batch_delay_ms: float = _setting(2.0, "longest a queued image waits for company before its batch runs")
    max_queue: int = _setting(2048, "most images waiting for inference; beyond it requests get "
                                    "RESOURCE_EXHAUSTED at once")
    max_images_per_request: int = _setting(256, "most images in one request (INVALID_ARGUMENT beyond)")
    max_message_bytes: int = _setting(16 * 1024 * 1024, "largest gRPC message accepted (RESOURCE_EXHAUSTED beyond)")
    max_image_pixels: int = _setting(25_000_000, "largest decoded image in pixels (decompression-bomb guard)")
    max_request_pixels: int = _setting(100_000_000, "most decoded pixels all of a request's images may declare "
                                                    "together (RESOURCE_EXHAUSTED beyond, before any decoding)")
    max_concurrent_streams: int = _setting(256, "most concurrent HTTP/2 streams (in-flight RPCs) per connection")
    max_http_connections: int = _setting(256, "most open connections on the HTTP port, and on the metrics port; "
                                              "one more is answered 503 and closed")
    http_idle_timeout_s: float = _setting(10.0, "HTTP and metrics ports: close a connection that has not sent a "
                                                "complete request head this long after opening or after its "
                                                "last answer (slow headers, idle keep-alive)")
    http_body_timeout_s: float = _setting(30.0, "HTTP port: a request body that has not arrived this long after "
                                                "its head gets 408")
    grace_period_s: float = _setting(10.0, "on SIGTERM/SIGINT: how long in-flight requests may take to finish")
    reject_not_a_digit_below: float | None = _setting(
        None, "override the model's not_a_digit threshold: predictions whose not_a_digit score (named in the "
              "model's metadata) is below it are rejected as not_a_digit; unset keeps the model's")
    reject_uncertain_below: float | None = _setting(
        None, "override the model's uncertain threshold: predictions whose uncertain score (named in the "
              "model's metadata, usually the calibrated confidence) is below it are rejected as uncertain; "
              "unset keeps the model's")
    reject_filled_above: float | None = _setting(
        None, "override the strokes test's filled-shape threshold (a share of the ink lying 3 pixels or more "
              "inside it): images above it are rejected as not_a_digit; only for a model whose rule has the "
              "test (2.2.0 on); 1 turns this half of the test off; unset keeps the model's")
    reject_grey_inside_above: float | None = _setting(
        None, "override the strokes test's grey-picture threshold (a share of the ink inside a shape that is "
              "fainter than half the strongest): images above it are rejected as not_a_digit; only for a "
              "model whose rule has the test; 1 turns this half off; unset keeps the model's")
    workers: int = _setting(1, "server processes sharing the port (SO_REUSEPORT); worker i serves /metrics on "
                                  "metrics-port + i")
    watch: bool = _setting(False, "reload the model when its file changes (SIGHUP always reloads)")
    watch_interval_s: float = _setting(1.0, "how often --watch checks the model file, and the token file is checked "
                                               "(size, mtime, inode)")
    tls_cert: Path | None = _setting(None, "PEM certificate chain for TLS on the gRPC and HTTP ports (plaintext "
                                           "is then refused there)")
    tls_key: Path | None = _setting(None, "PEM private key for --tls-cert")
    tls_client_ca: Path | None = _setting(None, "PEM CA bundle: require client certificates signed by it (mutual TLS)")
    metrics_tls: bool = _setting(False, "serve /metrics with --tls-cert (and --tls-client-ca) too; without it the "
                                        "metrics port stays plain HTTP for in-cluster scrapers")
    auth_token_file: Path | None = _setting(None, "file of accepted bearer tokens, one per line: inference and "
                                                  "metadata calls must then send `authorization: Bearer <token>` "
                                                  "(health, readiness and metrics stay open); re-read on SIGHUP "
                                                  "and on change")
    log_format: str = _setting("text", "log format", ("text", "json"))
    log_level: str = _setting("info", "log level", ("debug", "info", "warning", "error"))
    summary_interval_s: float = _setting(60.0, "seconds between summary log lines (requests, errors, batching); "
                                               "0 disables them (a shutdown summary is always logged)")

    def __post_init__(self) -> None:
        problems = []
        if self.max_batch_size < 1:
            problems.append("max-batch-size must be >= 1")
        if self.max_batch_delay_ms < 0:
            problems.append("max-batch-delay-ms must be >= 0")
        if self.max_queue < 1:
            problems.append("max-queue must be >= 1")
        if self.max_images_per_request < 1:
            problems.append("max-images-per-request must be >= 1")
        if self.threads < 0:
            problems.append("threads must be >= 0")
        if self.max_http_connections < 1:
            problems.append("max-http-connections must be >= 1")
        if not (self.http_idle_timeout_s > 0 and self.http_body_timeout_s > 0):
            problems.append("http-idle-timeout-s and http-body-timeout-s must be > 0")
        if self.max_request_pixels < 0:
            problems.append("max-request-pixels must be >= 0 (0: no request budget)")
        if self.workers < 1:
            problems.append("workers must be >= 1")
        if not self.watch_interval_s > 0:
            problems.append("watch-interval-s must be > 0")
        if self.summary_interval_s < 0:
            problems.append("summary-interval-s must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls-cert and tls-key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("tls-client-ca needs tls-cert and tls-key")
        if self.metrics_tls and self.tls_cert is None:
            problems.append("metrics-tls needs tls-cert and tls-key")
        if self.model_name is not None and not MODEL_NAME.fullmatch(self.model_name):
            problems.append(f"model-name {self.model_name!r} must be letters, digits, '_', '.' or '-' (not first), "
                            "at most 253 characters")
        for name in ("port", "metrics_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name.replace('_', '-')} must be 0..65535")
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))

    @property
    def max_batch_delay_s(self) -> float:
        return self.max_batch_delay_ms / 1000.0

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)

    def summary(self) -> dict[str, Any]:
        """The settings as plain JSON-able values (start-up log line, /v2 metadata)."""
        return {f.name: (str(v) if isinstance(v, Path) else v) for f in dataclasses.fields(self)
                for v in [getattr(self, f.name)]}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _converter(type_: Any) -> Any:
    text = str(type_)
    if type_ is bool:
        return _parse_bool
    if type_ is int or text == "int | None":
        return int
    if type_ is float or text == "float | None":
        return float
    if "Path" in text:
        return Path
    return str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field; defaults stay None so that env and defaults can fill in later."""
    hints = get_type_hints(ServerConfig)
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {f.default}]"
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_converter(hints[f.name]), default=None,
                                choices=f.metadata["choices"], help=help_text)


def from_sources(args: argparse.Namespace | None = None,
                 environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Build the config: flags first, then `DIGITS_*` variables, then defaults.

    Raises ValueError naming the variable or setting when a value cannot be used.
    """
    environ = os.environ if environ is None else environ
    hints = get_type_hints(ServerConfig)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        flag_value = getattr(args, f.name, None) if args is not None else None
        if flag_value is not None:
            values[f.name] = flag_value
            continue
        raw = environ.get(env_name(f.name))
        if raw is None or raw == "":
            continue
        try:
            value = _converter(hints[f.name])(raw)
        except ValueError as exc:
            raise ValueError(f"{env_name(f.name)}={raw!r}: {exc}") from exc
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise ValueError(f"{env_name(f.name)}={raw!r}: must be one of {', '.join(choices)}")
        values[f.name] = value
    return ServerConfig(**values)
