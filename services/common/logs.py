"""Logging with trace ids and call ids on every line.

``LOG_FORMAT=text`` (default) gives one readable line per record;
``LOG_FORMAT=json`` gives JSON lines for log collectors. Both carry the service
name, the current trace and span ids and the call id (set with :func:`call_context`).
Transcript text is never logged at INFO.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime, timezone

from opentelemetry import trace

from services.common.config import env_str

_call_id: contextvars.ContextVar[str] = contextvars.ContextVar("call_id", default="-")


def printable_line(text: str) -> bool:
    """Whether ``text`` has no control characters: free text a client gives that goes into a log line as it is
    (a newline in it could forge the next line)."""
    return not any(c < " " or c == "\x7f" for c in text)


@contextlib.contextmanager
def call_context(call_id: str) -> Iterator[None]:
    """Tag every log line written inside the block with ``call_id``."""
    token = _call_id.set(call_id)
    try:
        yield
    finally:
        _call_id.reset(token)


class _ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.service = self.service
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else "-"
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else "-"
        if not hasattr(record, "call_id"):
            record.call_id = _call_id.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": getattr(record, "service", "-"),
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", "-"),
            "span_id": getattr(record, "span_id", "-"),
            "call_id": getattr(record, "call_id", "-"),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(service)s [trace=%(trace_id)s call=%(call_id)s] %(name)s: %(message)s"


def setup_logging(service: str) -> None:
    """Configure the root logger from ``LOG_LEVEL`` (INFO) and ``LOG_FORMAT`` (text)."""
    handler = logging.StreamHandler(sys.stderr)
    if env_str("LOG_FORMAT", "text").lower() == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_ContextFilter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(env_str("LOG_LEVEL", "INFO").upper())
    for noisy in ("aiohttp.access", "faster_whisper", "httpx"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
