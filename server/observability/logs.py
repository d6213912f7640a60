"""Logging setup: plain text or one JSON object per line, each record tagged with the request id
of the call it was logged in."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import datetime, timezone

# Set per call by the telemetry interceptor; grpc.aio runs each call in its own task, so the
# value never leaks between calls.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, request_id, the record's extra fields, and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            entry["request_id"] = record.request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def announce(message: str, log_format: str, **fields: object) -> None:
    """The start-up line, on stdout (where a supervisor or test waits for it) in the log's format,
    so that each stream holds one format: with json, an entry like the log's, `fields` included."""
    if log_format == "json":
        record = logging.makeLogRecord({"name": "onnxserve", "levelname": "INFO", "msg": message, **fields})
        message = JsonFormatter().format(record)
    print(message, flush=True)


def configure_logging(level: str, log_format: str) -> None:
    """Replaces the root logger's handlers with one on stderr in the given format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
