"""Logging set-up: readable text by default, one JSON object per line with --log-format json.

Log calls pass context as ``extra={"fields": {...}}``; both formats print those fields. Nothing here
ever receives image data: adapters log sizes, codes and reasons only.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

# How much of a client-supplied string an error message or a log line may quote.
QUOTE_LIMIT = 64


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return text


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (" " in text or not text) and isinstance(value, str) else text


def configure(log_format: str = "text", level: str = "info") -> None:
    """Send logs to stderr in the chosen format (replaces earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own logger is noisy at info on shutdown; keep it to warnings.
    logging.getLogger("grpc").setLevel(logging.WARNING)
    # aiohttp logs a malformed request (and a client that hung up mid-request) with a traceback whose
    # message quotes the client's bytes: one short line instead, as for every other client error.
    for name in ("aiohttp.server", "aiohttp.access", "aiohttp.web"):
        logging.getLogger(name).addFilter(ClientNoiseFilter())


def fields(**values: Any) -> dict[str, Any]:
    """``log.info("msg", extra=fields(a=1))``: structured context for both formats."""
    return {"fields": values}


def short(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A client-supplied value as an error message or log line may quote it: its repr, cut to `limit`
    characters, saying how long it really was. Keeps messages under gRPC's metadata limit and the
    log from growing with whatever a client sends."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value.encode("utf-8", "replace")) if isinstance(value, str) else \
        len(value) if isinstance(value, bytes | bytearray) else len(text)
    return f"{text[:limit]}… ({size} {'bytes' if isinstance(value, str | bytes | bytearray) else 'characters'})"


def cut(text: str, limit: int = QUOTE_LIMIT) -> str:
    """A client-supplied string quoted as it is (a URL path, say), cut to `limit` characters like `short`."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text.encode('utf-8', 'replace'))} bytes)"


class ClientNoiseFilter(logging.Filter):
    """Turns a library's report of a client's malformed or abandoned request into one short warning line:
    no traceback (that is for our own bugs) and no quoted client bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg, record.args = "client request failed: %s", (short(type(exc).__name__),)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class RateLimitedLog:
    """At most `per_second` lines per second per key; the rest are counted, and the next line that gets
    through (or `flush`) says how many similar ones were left out. Counters elsewhere still count every
    event: this bounds only how fast a flood of bad requests can grow the log."""

    def __init__(self, logger: logging.Logger, per_second: int = 10) -> None:
        self._logger = logger
        self._per_second = per_second
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, ...], tuple[int, int, int]] = {}  # key -> (second, lines, suppressed)

    def warning(self, key: tuple[str, ...], message: str, **values: Any) -> None:
        now = int(time.monotonic())
        with self._lock:
            second, lines, suppressed = self._windows.get(key, (now, 0, 0))
            if second != now:
                second, lines = now, 0
            if lines >= self._per_second:
                self._windows[key] = (second, lines, suppressed + 1)
                return
            self._windows[key] = (second, lines + 1, 0)
        if suppressed:
            values["suppressed_similar"] = suppressed
        self._logger.warning(message, extra=fields(**values))

    def flush(self) -> None:
        """Log one line per key with failures still left out (at shutdown)."""
        with self._lock:
            pending = {key: s for key, (_, _, s) in self._windows.items() if s}
            self._windows.clear()
        for key, suppressed in pending.items():
            self._logger.warning("suppressed %d similar failures", suppressed, extra=fields(key="/".join(key)))
