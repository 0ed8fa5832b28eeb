"""Log lines: text or JSON (one object per line), each line about a request tagged with its request id and
trace id; lines about a request can have their own, higher, threshold (`moemesh up` keeps them out of its
console by default).

A request's task binds its ids once (`bind_request`, usually through `Telemetry.bind_request`); the binding
lives in that task's context (a ContextVar, as OpenTelemetry keeps its current span), so every line the task
logs carries them and no other task's lines do.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class RequestIds:
    request_id: str
    trace_id: str  # "" when the request is not traced


_REQUEST: contextvars.ContextVar[RequestIds | None] = contextvars.ContextVar("moemesh_request", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def bind_request(request_id: str, trace_id: str = "") -> None:
    _REQUEST.set(RequestIds(request_id, trace_id))


def current_request() -> RequestIds | None:
    return _REQUEST.get()


class RequestFilter(logging.Filter):
    """Sets `record.request_id` / `record.trace_id` ("" outside a request) and drops lines about a request
    below `request_level`."""

    def __init__(self, request_level: int = logging.NOTSET) -> None:
        super().__init__()
        self.request_level = request_level

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _REQUEST.get()
        record.request_id = ids.request_id if ids else ""
        record.trace_id = ids.trace_id if ids else ""
        return ids is None or record.levelno >= self.request_level


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC, ms), level, worker, logger, message, request_id and
    trace_id (when the line is about a request), exception (when one is logged)."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "worker": self.worker,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            line["request_id"] = record.request_id
            line["trace_id"] = record.trace_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(
    worker: str,
    *,
    level: str = "INFO",
    log_format: str = "text",
    request_level: str = "INFO",
    stream: TextIO | None = None,
) -> logging.Handler:
    """Replaces the root logger's handlers with one on `stream` (stderr); returns it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestFilter(logging.getLevelName(request_level.upper())))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
