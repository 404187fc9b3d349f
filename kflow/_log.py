"""Log records of every kflow process: JSON lines for log collectors, or concise text on a terminal.

The format is ``KFLOW_LOG_FORMAT`` (``json``, ``text``, or ``auto``: text when stderr is a
terminal, JSON otherwise) and the level ``KFLOW_LOG_LEVEL``. A record logged inside a unit of work
carries that work's contextual fields — ``instance_id``, ``workflow``, ``tenant`` and ``trace_id``
— bound with :func:`log_context` (context variables, so activity threads and asyncio tasks each
see their own); a JSON line leaves out the fields that are not bound rather than writing nulls. Values that look like secrets (``password=…``, ``sasl.password``,
bearer tokens) are masked before a record is written.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from kflow._tracing import current_trace_id

__all__ = ["CONTEXT_FIELDS", "ContextFilter", "log_context", "make_formatter", "redact_text"]

#: The contextual fields every record carries (``None`` outside a unit of work).
CONTEXT_FIELDS = ("instance_id", "workflow", "tenant", "trace_id")

_context: ContextVar[Mapping[str, str]] = ContextVar("kflow_log_context", default=MappingProxyType({}))
try:  # the activity a worker runs in this context, if any (the worker is an optional part)
    from kflow._worker.context import _current as _activity
except ImportError:  # pragma: no cover
    _activity = None  # type: ignore[assignment]

_TEXT_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"
_JSON_FIELDS = ["asctime", "levelname", "name", "message"]
_SECRET = re.compile(
    r"(?i)((?:password|passwd|secret|token|api[_-]?key|sasl\.password|client\.secret)[\"']?\s*[:=]\s*[\"']?)"
    r"([^\s\"',;}]+)"
)
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


def redact_text(text: str) -> str:
    """Mask secret-looking values (``password=…``, ``"sasl.password": "…"``, ``Bearer …``) in ``text``."""
    if not text:
        return text
    return _BEARER.sub(r"\1***", _SECRET.sub(r"\1***", text))


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Bind contextual fields (``instance_id``, ``workflow``, ``tenant``, ``trace_id``) for the block."""
    merged = {**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def _activity_fields() -> dict[str, str]:
    """The instance and workflow of the activity running in this context (a worker's activity code logs)."""
    ctx = _activity.get() if _activity is not None else None
    task = getattr(ctx, "task", None)
    return {"instance_id": task.instance_id, "workflow": task.workflow} if task is not None else {}


class ContextFilter(logging.Filter):
    """Adds the bound contextual fields to every record and masks secrets in its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _context.get()
        if not bound:
            bound = _activity_fields()
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, bound.get(name))
        if record.trace_id is None:  # type: ignore[attr-defined]
            record.trace_id = current_trace_id()
        if record.args:
            try:
                record.msg, record.args = record.getMessage(), None
            except (TypeError, ValueError):
                return True
        if isinstance(record.msg, str):
            record.msg = redact_text(record.msg)
        return True


class _TextFormatter(logging.Formatter):
    """The concise terminal format, with ``[instance_id]`` when one is bound."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        iid = getattr(record, "instance_id", None)
        return f"{text} [{iid}]" if iid else text


class _JsonFormatter(JsonFormatter):
    """JSON lines without the contextual fields a record does not have (no ``"tenant": null`` noise)."""

    def process_log_record(self, log_record: dict[str, Any]) -> dict[str, Any]:
        for name in CONTEXT_FIELDS:
            if log_record.get(name) is None:
                log_record.pop(name, None)
        return log_record


def make_formatter(fmt: str, stream: Any = None) -> logging.Formatter:
    """The formatter for ``fmt`` (``json``, ``text`` or ``auto``, which looks at ``stream``)."""
    if fmt == "auto":
        isatty = getattr(stream if stream is not None else sys.stderr, "isatty", None)
        fmt = "text" if isatty is not None and isatty() else "json"
    if fmt == "json":
        return _JsonFormatter(_JSON_FIELDS + list(CONTEXT_FIELDS), rename_fields={"asctime": "time", "levelname": "level",
                                                                               "name": "logger"},
                             timestamp=False)
    if fmt == "text":
        return _TextFormatter(_TEXT_FORMAT, "%H:%M:%S")
    raise ValueError(f"KFLOW_LOG_FORMAT must be json, text or auto, not {fmt!r}")
