"""Spec workflows end to end: client -> commands -> engine -> tasks -> worker -> results -> state."""

from __future__ import annotations

import uuid

import orjson
import pytest
from confluent_kafka import Consumer, Producer

from kflow.model.errors import WorkflowFailedError
from kflow.model.messages import Command
from kflow.schemas.codec import decode_event, encode_command
from kflow.testing import assert_eventually
from tests.integration.flows import chain


def uid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def test_every_step_type(stack):
    c = stack.client
    c.deploy({"name": "inv", "version": 1, "steps": [
        {"id": "up", "task": "t.upper", "queue": "other", "input": "input.sku", "output": "code"}]})
    c.deploy({"name": "all", "version": 1, "steps": [
        {"id": "prep", "set": {"total": "input.qty * 2"}},
        {"id": "reserve", "task": "t.reserve", "input": "{'sku': input.sku, 'qty': input.qty}", "output": "r"},
        {"id": "route", "choice": [{"when": "r.ok && input.qty > 0", "goto": "fan"}], "otherwise": "reject"},
        {"id": "fan", "parallel": [
            {"steps": [{"id": "b1", "task": "t.inc", "input": "total", "output": "x"}]},
            {"steps": [{"id": "b2", "task": "t.upper", "queue": "other", "input": "input.sku", "output": "y"}]}],
         "output": "fanned"},
        {"id": "approve", "wait": {"signal": "approval", "timeout": "1h"}, "output": "decision"},
        {"id": "nap", "sleep": "300ms"},
        {"id": "each", "foreach": "input.items", "as": "it", "concurrency": 2,
         "steps": [{"id": "pick", "task": "t.inc", "input": "it", "output": "p"}], "output": "picks"},
        {"id": "sub", "child": {"workflow": "inv", "input": "input"}, "output": "subr"},
        {"id": "done", "succeed": "{'r': r, 'fanned': fanned, 'decision': decision, 'picks': picks, 'sub': subr, 'total': total}"},
        {"id": "reject", "fail": {"error": "OutOfStock", "message": "'no stock for ' + input.sku"}},
    ]})
    ok = c.start("all", {"sku": "ab", "qty": 3, "items": [10, 20, 30, 40, 50]}, id=uid("all"))
    assert_eventually(lambda: (c.status(ok.id) or {}).get("status") == "RUNNING", timeout=30)
    c.signal(ok.id, "approval", {"by": "ann"})
    assert ok.result(timeout=60) == {
        "r": {"ok": True, "sku": "ab"}, "fanned": [7, "AB"], "decision": {"by": "ann"},
        "picks": [11, 21, 31, 41, 51], "sub": {"code": "AB"}, "total": 6}
    bad = c.start("all", {"sku": "zz", "qty": 50, "items": []}, id=uid("all"))
    with pytest.raises(WorkflowFailedError) as ei:
        bad.result(timeout=60)
    assert ei.value.error_type == "OutOfStock" and "no stock for zz" in ei.value.message


def test_end_of_list_returns_all_outputs_and_variables(stack):
    c = stack.client
    c.deploy({"name": "eol", "version": 1, "steps": [
        {"id": "s", "set": {"a": "input + 1"}},
        {"id": "t", "task": "t.inc", "input": "a", "output": "b"}]})
    assert c.start("eol", 1, id=uid("eol")).result(timeout=60) == {"a": 2, "b": 3}


def test_signal_before_and_after_the_wait(stack):
    c = stack.client
    c.deploy({"name": "sig", "version": 1, "steps": [
        {"id": "first", "task": "t.inc", "input": "input", "output": "x"},
        {"id": "w1", "wait": {"signal": "go"}, "output": "g1"},
        {"id": "w2", "wait": {"signal": "go"}, "output": "g2"}]})
    early = uid("sig")
    h = c.start("sig", 1, id=early)
    c.signal(early, "go", "early-1")  # arrives before w1 is reached: buffered
    assert_eventually(lambda: (c.status(early) or {}).get("seq", 0) >= 4, timeout=30)
    c.signal(early, "go", "late-2")   # arrives while w2 waits
    assert h.result(timeout=60) == {"x": 2, "g1": "early-1", "g2": "late-2"}


def test_wait_timeout_fails_with_timeout(stack):
    c = stack.client
    c.deploy({"name": "wt", "version": 1, "steps": [{"id": "w", "wait": {"signal": "never", "timeout": "200ms"}}]})
    with pytest.raises(WorkflowFailedError) as ei:
        c.start("wt", None, id=uid("wt")).result(timeout=60)
    assert ei.value.error_type == "Timeout"


def test_sleep_then_complete(stack):
    c = stack.client
    c.deploy({"name": "nap", "version": 1, "steps": [{"id": "z", "sleep": "500ms"}, {"id": "d", "succeed": "'awake'"}]})
    h = c.start("nap", None, id=uid("nap"))
    st = assert_eventually(lambda: c.status(h.id), timeout=30)
    assert h.result(timeout=60) == "awake"
    final = c.status(h.id)
    assert final["closed_ms"] - st["started_ms"] >= 500  # engine-side durations, not test timing


def test_foreach_concurrency_and_order(stack):
    c = stack.client
    c.deploy({"name": "fe", "version": 1, "steps": [
        {"id": "each", "foreach": "input", "as": "n", "concurrency": 3,
         "steps": [{"id": "one", "task": "t.inc", "input": "n", "output": "o"}], "output": "all"}]})
    h = c.start("fe", list(range(12)), id=uid("fe"))
    assert h.result(timeout=60) == {"all": list(range(1, 13))}
    # the engine never had more than 3 activities of the loop pending at once
    events = read_events(stack, h.id, until_type="WorkflowCompleted")
    pending = peak = 0
    for ev in events:
        if ev.type == "ActivityScheduled":
            pending += 1
            peak = max(peak, pending)
        elif ev.type == "ActivityCompleted":
            pending -= 1
    assert peak == 3


def test_versioning_pins_running_instances(stack):
    c = stack.client
    c.deploy({"name": "ver", "version": 1, "steps": [{"id": "w", "wait": {"signal": "go"}}, {"id": "d", "succeed": "'v1'"}]})
    old = c.start("ver", None, id=uid("ver"))
    assert_eventually(lambda: (c.status(old.id) or {}).get("status") == "RUNNING", timeout=30)
    c.deploy({"name": "ver", "version": 2, "steps": [{"id": "w", "wait": {"signal": "go"}}, {"id": "d", "succeed": "'v2'"}]})
    new = c.start("ver", None, id=uid("ver"))
    assert_eventually(lambda: (c.status(new.id) or {}).get("version") == 2, timeout=30)
    c.signal(old.id, "go")
    c.signal(new.id, "go")
    assert old.result(timeout=60) == "v1"
    assert new.result(timeout=60) == "v2"
    assert c.status(old.id)["version"] == 1


def test_cancel(stack):
    c = stack.client
    c.deploy({"name": "cx", "version": 1, "steps": [{"id": "w", "wait": {"signal": "never"}}]})
    h = c.start("cx", None, id=uid("cx"))
    assert_eventually(lambda: (c.status(h.id) or {}).get("status") == "RUNNING", timeout=30)
    c.cancel(h.id, "no longer needed")
    with pytest.raises(WorkflowFailedError) as ei:
        h.result(timeout=60)
    assert ei.value.status == "CANCELLED"


def test_non_retryable_activity_fails_workflow(stack):
    c = stack.client
    c.deploy({"name": "dec", "version": 1, "steps": [{"id": "pay", "task": "t.declined", "input": "input"}]})
    with pytest.raises(WorkflowFailedError) as ei:
        c.start("dec", 5, id=uid("dec")).result(timeout=60)
    assert ei.value.error_type == "CardDeclined"


def test_bad_input_goes_to_dlq_and_partition_keeps_flowing(stack):
    c = stack.client
    c.deploy(chain("ch", 2))
    p = Producer({"bootstrap.servers": stack.bootstrap, "partitioner": "murmur2_random"})
    names = stack.client.config.names
    victim = uid("dlq")
    # garbage bytes, a JSON command for an unknown workflow, a signal for a missing instance
    p.produce(names.commands, b"\x00garbage", victim.encode())
    p.produce(names.commands, orjson.dumps({"type": "StartWorkflow", "instance_id": victim, "workflow": "nope"}),
              victim.encode(), headers=[("content-type", b"application/json")])
    p.produce(names.commands, encode_command(Command("SignalWorkflow", victim, {"name": "x", "data": None})), victim.encode())
    # then a valid JSON start on the same key, so on the same partition
    p.produce(names.commands, orjson.dumps({"type": "StartWorkflow", "instance_id": victim, "workflow": "ch", "input": 1}),
              victim.encode(), headers=[("content-type", b"application/json")])
    p.flush(10)
    assert c.result(victim, timeout=60) == 3
    dlq = read_topic(stack, names.dlq, key=victim, n=3)
    reasons = sorted(dict(m.headers())["kflow.reason"].decode() for m in dlq)
    assert any("unknown workflow 'nope'" in r for r in reasons)
    assert any("unknown instance" in r for r in reasons)
    assert any("magic" in r.lower() or "json" in r.lower() or "decode" in r.lower() for r in reasons), reasons
    for m in dlq:
        h = dict(m.headers())
        assert h["kflow.original.topic"].decode() == names.commands
        assert int(h["kflow.original.offset"]) >= 0


def test_duplicate_start_is_rejected_not_restarted(stack):
    c = stack.client
    c.deploy(chain("dup", 1))
    iid = uid("dup")
    assert c.start("dup", 1, id=iid).result(timeout=60) == 2
    c.start("dup", 100, id=iid)
    events = read_events(stack, iid, until_type="CommandRejected")
    assert [e.type for e in events].count("WorkflowStarted") == 1
    rej = [e for e in events if e.type == "CommandRejected"][0]
    assert rej.data["code"] == "DUPLICATE"
    assert c.result(iid, timeout=10) == 2


# -- helpers ---------------------------------------------------------------------------------
def read_topic(stack, topic: str, key: str, n: int, timeout: float = 30):
    cons = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": uuid.uuid4().hex,
                     "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                     "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    cons.subscribe([topic])
    out = []
    try:
        def got_all():
            for m in cons.consume(500, 0.2):
                if not m.error() and m.key() == key.encode():
                    out.append(m)
            return len(out) >= n
        assert_eventually(got_all, timeout=timeout, msg=f"{n} records for {key} on {topic}")
    finally:
        cons.close()
    return out


def read_events(stack, iid: str, until_type: str):
    events = []

    def done():
        events.clear()
        events.extend(decode_event(m.value()) for m in read_topic(stack, stack.client.config.names.events, iid, 1))
        return any(e.type == until_type for e in events)
    assert_eventually(done, timeout=30)
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate in event seqs: {seqs}"
    return events


def test_terminate_stops_at_once_and_is_idempotent(stack):
    c = stack.client
    c.deploy({"name": "term", "version": 1, "steps": [{"id": "w", "wait": {"signal": "never"}}]})
    h = c.start("term", None, id=uid("term"))
    assert_eventually(lambda: (c.status(h.id) or {}).get("status") == "RUNNING", timeout=30)
    c.terminate(h.id, "runaway")
    c.terminate(h.id, "again")  # idempotent: recorded as a rejection, state unchanged
    with pytest.raises(WorkflowFailedError) as ei:
        h.result(timeout=60)
    assert ei.value.status == "TERMINATED"
    events = read_events(stack, h.id, until_type="CommandRejected")
    assert [e.type for e in events].count("WorkflowTerminated") == 1
