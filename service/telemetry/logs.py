"""Logging set-up: readable text by default, one JSON object per line with --log-format json.

Log calls pass context as ``extra={"fields": {...}}``; both formats print those fields. Nothing here
ever receives image data: adapters log sizes, codes and reasons only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


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


def fields(**values: Any) -> dict[str, Any]:
    """``log.info("msg", extra=fields(a=1))``: structured context for both formats."""
    return {"fields": values}
