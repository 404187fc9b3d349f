"""Trace context through Kafka headers, so one workflow instance is one trace across every process.

The W3C ``traceparent`` header travels with the records: the client's ``StartWorkflow`` carries
the span of the start call; the engine opens one span per decided command (``kflow.engine
<Command>``) as a child of the command's ``traceparent`` and puts its own on every task and
command the step produces; a worker opens one span per activity attempt (``kflow.activity
<name>``) as a child of the task's header and puts its own on the result command, which the
engine's next step continues. A command without the header (a timer firing, a signal from a
plain producer) continues the instance's last known context, remembered per instance in a
bounded in-memory table. When the instance closes the engine records a ``kflow.workflow <name>``
span from its start to its end.

Spans are exported with OTLP/HTTP when ``KFLOW_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_ENDPOINT``) is set, or to whatever tracer provider the application
installed; otherwise no span is recorded and headers are forwarded unchanged, at the cost of a
header lookup per record. OpenTelemetry is the ``otel`` extra: without it nothing is recorded,
headers are still forwarded, and only asking for an exporter is an error.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Optional

try:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ModuleNotFoundError as exc:  # the otel extra is not installed: tracing is a no-op
    if not (exc.name or "").startswith("opentelemetry"):
        raise
    trace = None  # type: ignore[assignment]

__all__ = ["TRACEPARENT", "activity_done", "client_start", "configure", "current_trace_id", "engine_step",
           "task_received", "use_provider"]

log = logging.getLogger("kflow.tracing")

#: The W3C trace-context header kflow reads and writes on Kafka records.
TRACEPARENT = "traceparent"
#: Instances whose trace context the engine remembers (least recently used are forgotten).
REMEMBERED_INSTANCES = 20_000
_TERMINAL_EVENTS = frozenset({"WorkflowCompleted", "WorkflowFailed", "WorkflowCancelled", "WorkflowTerminated"})

_PROPAGATOR = TraceContextTextMapPropagator() if trace is not None else None
_provider: Optional[TracerProvider] = None
# instance id -> (root traceparent of the start, traceparent of its last step)
_instances: OrderedDict[str, tuple[Optional[bytes], bytes]] = OrderedDict()
# id of a worker job -> traceparent of its task record
_tasks: dict[int, bytes] = {}


def use_provider(provider: Optional[TracerProvider]) -> None:
    """Record kflow's spans with ``provider`` (``None``: back to the global provider)."""
    global _provider
    _provider = provider


def configure(service_name: str, endpoint: str = "") -> bool:
    """Export spans with OTLP/HTTP to ``endpoint`` (or ``$OTEL_EXPORTER_OTLP_ENDPOINT``); True if enabled."""
    endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if not endpoint:
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("exporting spans needs the otel extra: pip install 'kflow[otel]'",
                                  name=exc.name) from exc

    provider = SdkTracerProvider(resource=Resource.create({"service.name": service_name}))
    url = endpoint.rstrip("/")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
        endpoint=url if url.endswith("/v1/traces") else url + "/v1/traces")))
    use_provider(provider)
    log.info("exporting spans to %s as service %s", url, service_name)
    return True


def _enabled() -> bool:
    if _provider is not None:
        return True
    return trace is not None and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _tracer() -> Tracer:
    provider = _provider if _provider is not None else trace.get_tracer_provider()
    return provider.get_tracer("kflow")


def _header(headers: Optional[Sequence[tuple[str, Any]]]) -> Optional[bytes]:
    for k, v in headers or ():
        if k == TRACEPARENT and v:
            return v if isinstance(v, bytes) else str(v).encode()
    return None


def _context(traceparent: bytes) -> Context:
    return _PROPAGATOR.extract({TRACEPARENT: traceparent.decode("ascii", "replace")})


def _traceparent(span: Span) -> Optional[bytes]:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    value = carrier.get(TRACEPARENT)
    return value.encode() if value else None


def current_trace_id() -> Optional[str]:
    """The hex trace id of the current span, if one is recording (for log records)."""
    if trace is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


# -- client ----------------------------------------------------------------------------------------
def client_start(workflow: str, instance_id: str) -> Optional[list[tuple[str, bytes]]]:
    """Record the client's start of an instance; the headers that carry its context, or None.

    A start inside an application span (when the application traces) continues that trace.
    """
    if not _enabled():
        if trace is None:
            return None
        parent = trace.get_current_span().get_span_context()
        if not parent.is_valid:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return [(TRACEPARENT, carrier[TRACEPARENT].encode())]
    span = _tracer().start_span(f"kflow.start {workflow}", kind=SpanKind.PRODUCER,
                                attributes={"kflow.workflow": workflow, "kflow.instance_id": instance_id})
    try:
        tp = _traceparent(span)
    finally:
        span.end()
    return [(TRACEPARENT, tp)] if tp else None


# -- engine ----------------------------------------------------------------------------------------
def _remember(instance_id: str, root: Optional[bytes], last: bytes) -> None:
    _instances[instance_id] = (root, last)
    _instances.move_to_end(instance_id)
    while len(_instances) > REMEMBERED_INSTANCES:
        _instances.popitem(last=False)


def engine_step(command_type: str, instance_id: str, headers: Optional[Sequence[tuple[str, Any]]],
                state: Optional[dict[str, Any]], events: Iterable[Any], start_ns: int
                ) -> Optional[list[tuple[str, bytes]]]:
    """Record one decided command; the headers for the records it produces, or None if untraced.

    Args:
        command_type: The command's type.
        instance_id: Its instance.
        headers: The command record's headers (None for a timer firing).
        state: The instance's state after the command (for the workflow name and start time).
        events: The events the command produced.
        start_ns: When deciding it began (``time.time_ns()``).
    """
    incoming = _header(headers)
    known = _instances.get(instance_id)
    parent = incoming or (known[1] if known else None)
    starts = command_type == "StartWorkflow"
    if parent is None and not (starts and _enabled()):
        return None
    root = known[0] if known else None
    if starts and incoming is not None:
        root = incoming
    types = {getattr(e, "type", "") for e in events}
    closed = bool(types & _TERMINAL_EVENTS)
    if not _enabled():
        out: Optional[bytes] = parent
    else:
        # an untraced start (a plain producer) makes the engine's step the root of the instance's trace
        workflow = (state or {}).get("workflow", "")
        context = _context(parent) if parent is not None else Context()
        span = _tracer().start_span(f"kflow.engine {command_type}", context=context, kind=SpanKind.CONSUMER,
                                    start_time=start_ns,
                                    attributes={"kflow.instance_id": instance_id, "kflow.workflow": workflow,
                                                "kflow.command": command_type, "kflow.events": sorted(types)})
        out = _traceparent(span) or parent
        span.end()
        if root is None and starts:
            root = out
        if closed and root is not None and state is not None:
            _workflow_span(state, root, types)
    if out is None:
        return None
    if closed:
        _instances.pop(instance_id, None)
    else:
        _remember(instance_id, root, out)
    return [(TRACEPARENT, out)]


def _workflow_span(state: dict[str, Any], root: bytes, types: set[str]) -> None:
    started_ms = state.get("started_ms") or int(time.time() * 1000)
    span = _tracer().start_span(f"kflow.workflow {state.get('workflow', '')}", context=_context(root),
                                kind=SpanKind.INTERNAL, start_time=int(started_ms) * 1_000_000,
                                attributes={"kflow.instance_id": str(state.get("id", "")),
                                            "kflow.workflow": str(state.get("workflow", "")),
                                            "kflow.status": str(state.get("status", ""))})
    if "WorkflowFailed" in types:
        span.set_status(Status(StatusCode.ERROR, str((state.get("error") or {}).get("message", ""))[:200]))
    span.end()


# -- worker ----------------------------------------------------------------------------------------
def task_received(key: int, headers: Optional[Sequence[tuple[str, Any]]]) -> None:
    """Remember the trace context of the task a worker job (``key``) runs."""
    tp = _header(headers)
    if tp is not None:
        _tasks[key] = tp
    elif _tasks:
        _tasks.pop(key, None)  # a job never reported (cancelled at shutdown) may have left its key


def activity_done(key: int, task: Any, duration: float, error: Optional[BaseException]
                  ) -> Optional[list[tuple[str, bytes]]]:
    """Record one activity attempt of job ``key``; the headers for its result command, or None."""
    parent = _tasks.pop(key, None)
    if parent is None:
        return None
    if not _enabled():
        return [(TRACEPARENT, parent)]
    end = time.time_ns()
    span = _tracer().start_span(f"kflow.activity {task.name}", context=_context(parent), kind=SpanKind.CONSUMER,
                                start_time=end - int(duration * 1e9),
                                attributes={"kflow.instance_id": task.instance_id, "kflow.workflow": task.workflow,
                                            "kflow.activity": task.name, "kflow.activity_id": task.activity_id,
                                            "kflow.attempt": task.attempt})
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    tp = _traceparent(span) or parent
    span.end(end_time=end)
    return [(TRACEPARENT, tp)]
