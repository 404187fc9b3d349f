"""Fuzz: garbage and wrong commands on a live instance's key land in the DLQ or as
CommandRejected events — each accounted for — and the instance, on the same partition, completes."""

from __future__ import annotations

import uuid

import orjson
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kflow.model.messages import Command
from kflow.schemas.codec import decode_event, encode_command
from kflow.testing import assert_eventually
from tests.integration.test_engine_e2e import read_topic

JSON = [("content-type", b"application/json")]

# (kind, expected outcome); payloads are built per instance id below
FUZZ = st.one_of(
    st.tuples(st.just("bytes"), st.binary(min_size=0, max_size=64)),
    st.tuples(st.just("truncated"), st.integers(min_value=1, max_value=30)),
    st.tuples(st.just("wrong_type"), st.sampled_from([123, None, ["x"], {"a": 1}])),
    st.tuples(st.just("unknown_workflow"), st.text(min_size=1, max_size=10)),
    st.tuples(st.just("late_result"), st.integers(min_value=1, max_value=5)),
    st.tuples(st.just("oversized_signal"), st.just(300_000)),
)
DLQ_KINDS = {"bytes", "truncated", "wrong_type"}


def fuzz_message(kind: str, arg, iid: str) -> tuple[bytes, list | None]:
    if kind == "bytes":
        return b"\x00" + arg, None  # never the Avro magic
    if kind == "truncated":
        full = encode_command(Command("SignalWorkflow", iid, {"name": "x", "data": {"pad": "y" * 40}}))
        return full[: max(1, len(full) - arg)], None
    if kind == "wrong_type":
        return orjson.dumps({"type": "SignalWorkflow", "instance_id": iid, "name": arg}), JSON
    if kind == "unknown_workflow":  # a start for an id that exists: rejected as a duplicate
        return orjson.dumps({"type": "StartWorkflow", "instance_id": iid, "workflow": f"nope-{arg}"}), JSON
    if kind == "late_result":
        return encode_command(Command("CompleteActivity", iid, {"activity_id": f"ghost-{arg}", "attempt": arg,
                                                                "result": 1})), None
    if kind == "oversized_signal":
        return encode_command(Command("SignalWorkflow", iid, {"name": "big", "data": "z" * arg})), None
    raise AssertionError(kind)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(FUZZ, min_size=3, max_size=12))
def test_fuzzed_commands_are_accounted_for_and_valid_traffic_completes(stack, batch):
    c = stack.client
    c.deploy({"name": "fz", "version": 1, "steps": [
        {"id": "w", "wait": {"signal": "go"}, "output": "g"},
        {"id": "t", "task": "t.inc", "input": "g", "output": "r"},
        {"id": "done", "succeed": "r"}]})
    iid = f"fz-{uuid.uuid4().hex[:8]}"
    c.start("fz", None, id=iid)
    assert_eventually(lambda: (c.status(iid) or {}).get("status") == "RUNNING", timeout=30)
    p = Producer({"bootstrap.servers": stack.bootstrap, "partitioner": "murmur2_random"})
    for kind, arg in batch:
        value, headers = fuzz_message(kind, arg, iid)
        p.produce(c.config.names.commands, value, iid.encode(), headers=headers)
    p.flush(10)
    c.signal(iid, "go", 41)
    assert c.result(iid, timeout=60) == 42

    n_dlq = sum(1 for kind, _ in batch if kind in DLQ_KINDS)
    n_rejected = len(batch) - n_dlq
    if n_dlq:
        dlq = read_topic(stack, c.config.names.dlq, key=iid, n=n_dlq)
        assert len(dlq) == n_dlq
        assert all(dict(m.headers())["kflow.reason"] for m in dlq)
    events = assert_eventually(lambda: _events_until_done(stack, iid), timeout=30)
    rejected = [e for e in events if e.type == "CommandRejected"]
    assert len(rejected) == n_rejected, [e.data for e in rejected]
    codes = sorted(e.data["code"] for e in rejected)
    expected_codes = sorted({"unknown_workflow": "DUPLICATE", "late_result": "DUPLICATE",
                             "oversized_signal": "LIMIT_EXCEEDED"}[k] for k, _ in batch if k not in DLQ_KINDS)
    assert codes == expected_codes


def _events_until_done(stack, iid):
    evs = [decode_event(m.value()) for m in read_topic(stack, stack.client.config.names.events, key=iid, n=1)]
    return evs if any(e.type == "WorkflowCompleted" for e in evs) else None
