"""The typed core's small pieces: status and rejection enums on the wire, one error tree whose
errors carry fields, the DLQ record every writer builds, and the Clock protocol."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from confluent_kafka import Message

import kflow
from kflow.client import _outcome
from kflow.clock import Clock, SystemClock
from kflow.dlq import DLQ_HEADERS, Original, _record, dlq_record
from kflow.engine import DeterminismError, NondeterminismError, fold
from kflow.model.errors import ActivityError, KflowError, QueryFailedError, WorkflowFailedError
from kflow.model.messages import Event, RejectCode, Status
from kflow.schemas.codec import decode_event, decode_state, encode_event, encode_state
from kflow.streams.lane import state_record
from kflow.testing.harness import EngineHarness, ManualClock
from tests.unit.engine.test_code_replayer import harness

NOW = 1_700_000_000_000


# -- StrEnums -----------------------------------------------------------------------------------------
def test_statuses_and_reject_codes_are_the_strings_they_name() -> None:
    assert Status.RUNNING == "RUNNING" and isinstance(Status.RUNNING, str)
    assert RejectCode.DUPLICATE == "DUPLICATE" and f"{RejectCode.DUPLICATE}" == "DUPLICATE"
    assert {Status.FAILED: 1}["FAILED"] == 1  # hashes as its string too
    assert Status("COMPENSATING") is Status.COMPENSATING


def test_terminal_and_active_are_frozensets_not_members() -> None:
    assert isinstance(Status.TERMINAL, frozenset) and isinstance(Status.ACTIVE, frozenset)
    assert [s.value for s in Status] == ["RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TERMINATED", "BLOCKED",
                                         "COMPENSATING", "CANCELLING", "SUSPENDED", "INCIDENT", "QUEUED"]
    assert Status.TERMINAL == {"COMPLETED", "FAILED", "CANCELLED", "TERMINATED"}
    assert Status.ACTIVE == {"RUNNING", "BLOCKED", "COMPENSATING", "CANCELLING", "SUSPENDED", "INCIDENT", "QUEUED"}
    assert Status.COMPLETED in Status.TERMINAL and "COMPLETED" in Status.TERMINAL
    assert Status.RUNNING not in Status.TERMINAL and "BLOCKED" in Status.ACTIVE


def test_enum_members_serialise_exactly_as_strings() -> None:
    assert orjson.dumps({"status": Status.BLOCKED, "code": RejectCode.STALE}) == b'{"status":"BLOCKED","code":"STALE"}'
    record = {"instance_id": "i1", "workflow": "w", "version": 1, "status": Status.FAILED, "seq": 3,
              "started_ms": NOW, "updated_ms": NOW, "closed_ms": NOW, "result": None, "error_type": "E",
              "error_message": "m", "search_attributes": {"status": Status.FAILED}}
    as_strings = {**record, "status": "FAILED", "search_attributes": {"status": "FAILED"}}
    assert encode_state(record) == encode_state(as_strings)
    decoded = decode_state(encode_state(record))
    assert decoded["status"] == "FAILED" and type(decoded["status"]) is str
    ev = Event("CommandRejected", "i1", 4, NOW, {"command_type": "StartWorkflow", "code": RejectCode.DUPLICATE,
                                                  "reason": "expected a new id, but it exists"})
    plain = Event("CommandRejected", "i1", 4, NOW, {**ev.data, "code": "DUPLICATE"})
    assert encode_event(ev) == encode_event(plain)
    assert decode_event(encode_event(ev)).data["code"] == "DUPLICATE"


# -- one error tree -----------------------------------------------------------------------------------
def test_both_determinism_errors_share_one_base_under_kflow_error() -> None:
    assert issubclass(NondeterminismError, DeterminismError) and issubclass(DeterminismError, KflowError)
    assert kflow.DeterminismError is DeterminismError and kflow.NondeterminismError is NondeterminismError
    code = NondeterminismError("i1", 2, "activity 'a'", "timer")
    assert (code.instance_id, code.event_index, code.seq) == ("i1", 2, None)
    assert (code.expected, code.actual) == ("activity 'a'", "timer")
    assert str(code) == ("instance i1: non-deterministic workflow code at command #2: history has activity 'a', "
                         "but the code now issues timer")


def test_the_engine_raises_determinism_error_with_its_fields() -> None:
    h = EngineHarness()
    h.deploy({"name": "det", "version": 1, "steps": [{"id": "a", "task": "t", "queue": "q", "input": "input"}]})
    h.auto_run_tasks = False
    h.start("det", "i1", 1)
    history = list(h.history["i1"])
    scheduled = next(e for e in history if e.type == "ActivityScheduled")
    tampered = [Event(e.type, e.instance_id, e.seq, e.ts, {**e.data, "name": "other"}) if e is scheduled else e
                for e in history]
    with pytest.raises(KflowError) as info:
        fold(tampered, h.defs)
    err = info.value
    assert isinstance(err, DeterminismError) and not isinstance(err, NondeterminismError)
    assert (err.instance_id, err.seq) == ("i1", scheduled.seq)
    assert err.expected[0] == "ActivityScheduled" and err.expected[1]["name"] == "other"
    assert err.actual[1]["name"] == "t"


def test_query_failed_error_carries_type_and_message() -> None:
    err = QueryFailedError("UnknownQuery", "no query 'nope'", instance_id="i1", query="nope")
    assert isinstance(err, KflowError) and kflow.QueryFailedError is QueryFailedError
    assert (err.type, err.message, err.instance_id, err.query) == ("UnknownQuery", "no query 'nope'", "i1", "nope")
    assert str(err) == "query 'nope' on i1 failed: UnknownQuery: no query 'nope'"


def _failure(h: EngineHarness, iid: str) -> WorkflowFailedError:
    """What a client's ``result()`` raises for the terminal state the engine produced for ``iid``."""
    with pytest.raises(WorkflowFailedError) as info:
        _outcome(iid, state_record(h.states[iid]))
    return info.value


class CardDeclined(Exception):
    pass


def _declined(_: Any) -> Any:
    raise CardDeclined("insufficient funds: it's late")


def test_a_spec_workflow_ended_by_an_activity_failure_names_it_as_the_cause() -> None:
    h = EngineHarness()
    h.deploy({"name": "pay", "version": 1, "steps": [
        {"id": "charge", "task": "charge", "queue": "q", "input": "input",
         "retry": {"max_attempts": 1}}]})
    h.activity("charge", _declined)
    h.start("pay", "i1", 5)
    err = _failure(h, "i1")
    assert (err.status, err.error_type) == ("FAILED", "CardDeclined")
    assert isinstance(err.cause, ActivityError)
    assert (err.cause.type, err.cause.message, err.cause.activity) == (
        "CardDeclined", "insufficient funds: it's late", "charge")


@kflow.workflow(name="errors.charge", version=1)
async def charging(ctx: Any, input: Any) -> Any:
    return await ctx.activity("charge", input, retry={"max_attempts": 1})


def test_a_code_workflow_ended_by_an_activity_failure_names_it_as_the_cause() -> None:
    h = harness(charging, charge=_declined)
    h.start("errors.charge", "i2", 5)
    err = _failure(h, "i2")
    assert isinstance(err.cause, ActivityError)
    assert (err.cause.type, err.cause.message, err.cause.activity) == (
        "CardDeclined", "insufficient funds: it's late", "charge")


def test_failures_not_caused_by_an_activity_have_no_cause() -> None:
    h = EngineHarness()
    h.deploy({"name": "fails", "version": 1,
              "steps": [{"id": "f", "fail": {"error": "Invalid", "message": "'bad input'"}}]})
    h.deploy({"name": "waits", "version": 1, "steps": [{"id": "w", "wait": {"signal": "go"}}]})
    h.start("fails", "i1")
    h.start("waits", "i2")
    h.send("CancelWorkflow", "i2", reason="not needed")
    failed, cancelled = _failure(h, "i1"), _failure(h, "i2")
    assert (failed.error_type, failed.message, failed.cause) == ("Invalid", "bad input", None)
    assert (cancelled.status, cancelled.cause) == ("CANCELLED", None)


# -- the DLQ record -----------------------------------------------------------------------------------
def test_dlq_record_of_a_kafka_record_keeps_it_and_names_where_it_came_from() -> None:
    msg = Message(topic="p.commands", partition=3, offset=41, key=b"i1", value=b"\xc3\x01raw",
                  headers=[("traceparent", b"00-ab"), ("kflow.reason", b"an older reason")])
    value, key, headers = dlq_record(msg, "undecodable: bad magic", NOW)
    assert (value, key) == (b"\xc3\x01raw", b"i1")
    assert headers == [("kflow.reason", b"undecodable: bad magic"), ("kflow.original.topic", b"p.commands"),
                       ("kflow.original.partition", b"3"), ("kflow.original.offset", b"41"),
                       ("kflow.time", str(NOW).encode()), ("traceparent", b"00-ab")]
    assert tuple(k for k, _ in headers[:5]) == DLQ_HEADERS
    listed = _record(Message(topic="p.dlq", partition=0, offset=7, key=key, value=value, headers=headers))
    assert (listed.reason, listed.original_topic, listed.original_partition, listed.original_offset) == (
        "undecodable: bad magic", "p.commands", 3, 41)
    assert listed.time_ms == NOW
    assert listed.headers == [("traceparent", b"00-ab")]  # what a replay sends back


def test_dlq_record_of_a_message_from_outside_kafka_has_no_position() -> None:
    value, key, headers = dlq_record(Original("sensors/a", None, b"{}"), "no trigger matched", NOW)
    assert (value, key) == (b"{}", None)
    assert dict(headers) == {"kflow.reason": b"no trigger matched", "kflow.original.topic": b"sensors/a",
                             "kflow.original.partition": b"-1", "kflow.original.offset": b"-1",
                             "kflow.time": str(NOW).encode()}


# -- the clock ----------------------------------------------------------------------------------------
def test_system_and_manual_clocks_implement_the_clock_protocol() -> None:
    assert isinstance(SystemClock(), Clock) and isinstance(ManualClock(), Clock)
    before = int(time.time() * 1000)
    assert before <= SystemClock().now_ms() <= int(time.time() * 1000)
    manual = ManualClock(NOW)
    manual.advance(1.5)
    assert manual.now_ms() == NOW + 1500
