"""One workflow is one trace: client start, engine steps, activity attempts and the workflow run.

The engine and the worker run in this process (the ``stack`` fixture), so one in-memory span
exporter sees every process's spans; the context still travels only through Kafka headers.
"""

from __future__ import annotations

import uuid

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kflow import _tracing
from kflow.testing import assert_eventually


@pytest.fixture(scope="module")
def exporter():
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    _tracing.use_provider(provider)
    try:
        yield exp
    finally:
        _tracing.use_provider(None)


def _spans_of(exporter: InMemorySpanExporter, iid: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.attributes.get("kflow.instance_id") == iid]


def test_one_workflow_is_one_trace_across_client_engine_and_worker(stack, exporter):
    c = stack.client
    c.deploy({"name": "tr.chain", "version": 1, "steps": [
        {"id": "a", "task": "t.inc", "input": "input", "output": "a"},
        {"id": "b", "task": "t.inc", "input": "a", "output": "b"},
        {"id": "done", "succeed": "b"}]})
    iid = f"tr-{uuid.uuid4().hex[:8]}"
    assert c.start("tr.chain", 1, id=iid).result(timeout=60) == 3
    assert_eventually(lambda: any(s.name == "kflow.workflow tr.chain" for s in _spans_of(exporter, iid)),
                      timeout=20, msg="workflow run span")
    spans = _spans_of(exporter, iid)
    names = sorted(s.name for s in spans)
    assert names.count("kflow.start tr.chain") == 1
    assert names.count("kflow.engine StartWorkflow") == 1
    assert names.count("kflow.activity t.inc") == 2
    assert names.count("kflow.engine CompleteActivity") == 2
    assert {s.context.trace_id for s in spans} == {spans[0].context.trace_id}, "every span in one trace"

    by_id = {s.context.span_id: s for s in spans}
    root = next(s for s in spans if s.name == "kflow.start tr.chain")
    assert root.parent is None
    # the causal chain travels through the records' headers: start -> step -> attempt -> step -> ...
    for s in spans:
        if s is root:
            continue
        assert s.parent is not None and s.parent.span_id in by_id, f"{s.name} has a parent outside the trace"
    for attempt in (s for s in spans if s.name == "kflow.activity t.inc"):
        assert by_id[attempt.parent.span_id].name.startswith("kflow.engine ")
    for step in (s for s in spans if s.name == "kflow.engine CompleteActivity"):
        assert by_id[step.parent.span_id].name == "kflow.activity t.inc"
    run = next(s for s in spans if s.name == "kflow.workflow tr.chain")
    assert run.parent.span_id == root.context.span_id
    assert run.attributes["kflow.status"] == "COMPLETED"
    assert run.end_time >= max(s.end_time for s in spans if s.name.startswith("kflow.activity"))


def test_failed_attempt_span_records_the_error(stack, exporter):
    c = stack.client
    c.deploy({"name": "tr.fail", "version": 1, "steps": [{"id": "pay", "task": "t.declined", "input": "input"}]})
    iid = f"trf-{uuid.uuid4().hex[:8]}"
    c.start("tr.fail", 1, id=iid)
    assert_eventually(lambda: any(s.name == "kflow.workflow tr.fail" for s in _spans_of(exporter, iid)),
                      timeout=60, msg="workflow run span")
    spans = _spans_of(exporter, iid)
    attempt = next(s for s in spans if s.name == "kflow.activity t.declined")
    assert not attempt.status.is_ok and attempt.events and attempt.events[0].name == "exception"
    run = next(s for s in spans if s.name == "kflow.workflow tr.fail")
    assert run.attributes["kflow.status"] == "FAILED" and not run.status.is_ok
    assert len({s.context.trace_id for s in spans}) == 1


def test_untraced_processes_forward_the_header_unchanged(exporter):
    """With no tracer configured nothing is recorded: no header is invented, an incoming one is forwarded."""
    saved = _tracing._provider
    _tracing.use_provider(None)
    try:
        before = len(exporter.get_finished_spans())
        assert _tracing.client_start("x", "y") is None
        iid = f"never-{uuid.uuid4().hex}"
        assert _tracing.engine_step("SignalWorkflow", iid, None, None, [], 0) is None
        tp = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        assert _tracing.engine_step("SignalWorkflow", iid, [("traceparent", tp)], None, [], 0) == [("traceparent", tp)]
        # a timer firing later (no header) continues the instance's remembered context
        assert _tracing.engine_step("FireTimer", iid, None, None, [], 0) == [("traceparent", tp)]
        assert len(exporter.get_finished_spans()) == before
    finally:
        _tracing.use_provider(saved)


def test_a_start_from_a_plain_producer_gets_a_trace_rooted_in_the_engine(stack, exporter):
    """A StartWorkflow without a traceparent (kcat, another language) still makes one trace per instance."""
    import json

    from confluent_kafka import Producer

    c = stack.client
    c.deploy({"name": "tr.plain", "version": 1, "steps": [
        {"id": "a", "task": "t.inc", "input": "input", "output": "a"}, {"id": "done", "succeed": "a"}]})
    iid = f"trp-{uuid.uuid4().hex[:8]}"
    doc = {"type": "StartWorkflow", "instance_id": iid, "workflow": "tr.plain", "input": 41}
    p = Producer({"bootstrap.servers": stack.bootstrap, "partitioner": "murmur2_random"})
    p.produce(f"{stack.prefix}commands", json.dumps(doc).encode(), iid.encode(),
              headers=[("content-type", b"application/json")])
    assert p.flush(30) == 0
    assert c.result(iid, timeout=60) == 42
    assert_eventually(lambda: any(s.name == "kflow.workflow tr.plain" for s in _spans_of(exporter, iid)),
                      timeout=20, msg="workflow run span")
    spans = _spans_of(exporter, iid)
    start = next(s for s in spans if s.name == "kflow.engine StartWorkflow")
    assert start.parent is None, "the engine's first step is the root"
    assert {s.name for s in spans} >= {"kflow.activity t.inc", "kflow.engine CompleteActivity"}
    assert len({s.context.trace_id for s in spans}) == 1
