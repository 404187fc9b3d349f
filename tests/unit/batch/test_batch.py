"""The pure parts of batch operations: the query, the rate limit, command ids, outcomes, the resume cursor."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kflow.batch import OPERATIONS, Outcome, RateLimiter, WhereError, command_id, parse_rate, parse_where
from kflow.batch.log import CHUNK, BatchLog
from kflow.batch.plan import applied_earlier, batch_reason, match_event, pending, select
from kflow.batch.runner import build_command, check_operation, runner_alive
from kflow.cli import app
from kflow.model.messages import Event
from kflow.testing.harness import ManualClock

# -- the query ---------------------------------------------------------------------------------

def test_where_parses_every_field_and_round_trips():
    w = parse_where("status=running,FAILED AND workflow=order and version=2 AND tenant=acme "
                    "AND started_after=2024-05-01T00:00:00Z AND closed_before=1714521600000 AND id_prefix=ord- "
                    "AND search.customer='ACME Corp' AND search.stage=\"it's late\"")
    assert w.status == ("RUNNING", "FAILED") and w.workflow == "order" and w.version == 2 and w.tenant == "acme"
    assert w.started_after == 1714521600000 == w.closed_before and w.id_prefix == "ord-"
    assert w.search == (("customer", "ACME Corp"), ("stage", "it's late"))
    assert parse_where(w.text()) == w
    assert w.api_params() == {"status": "RUNNING,FAILED", "workflow": "order", "version": 2, "tenant": "acme",
                              "started_after": 1714521600000, "closed_before": 1714521600000, "id_prefix": "ord-",
                              "search": ["customer:ACME Corp", "stage:it's late"]}


@pytest.mark.parametrize("query,message", [
    ("", "the query is empty"),
    ("   ", "the query is empty"),
    ("status=RUNNING AND", "after the last AND"),
    ("AND status=RUNNING", "expected NAME=VALUE at position 1"),
    ("status=RUNNING workflow=x", "expected AND between terms at position 16"),
    ("workfow=x", "unknown field 'workfow': expected one of status, workflow"),
    ("status=NOPE", "unknown status 'NOPE'"),
    ("status=RUNNING AND status=FAILED", "status is given twice"),
    ("version=0", "version must be a whole number from 1, but got '0'"),
    ("started_after=yesterday", "started_after must be epoch milliseconds or an ISO 8601 time"),
    ("search.=x", "search attribute name, but the name is empty"),
    ("workflow=''", "workflow has no value"),
    ("workflow='unclosed", "expected NAME=VALUE"),
])
def test_bad_queries_are_one_precise_error(query, message):
    with pytest.raises(WhereError, match=message.replace("(", r"\(")):
        parse_where(query)


def test_where_matches_state_records_as_the_store_does():
    st = {"instance_id": "ord-1", "status": "RUNNING", "workflow": "order", "version": 2, "started_ms": 2000,
          "closed_ms": None, "search_attributes": {"customer": "acme", "n": 5.0}}
    assert parse_where("workflow=order AND status=RUNNING,FAILED AND search.n=5 AND id_prefix=ord").matches(st)
    assert not parse_where("workflow=order AND search.customer=globex").matches(st)
    assert not parse_where("search.missing=x").matches(st)
    assert not parse_where("closed_after=1").matches(st)  # still open: no close time to compare
    assert parse_where("started_after=2000 AND started_before=2001").matches(st)
    assert not parse_where("started_before=2000").matches(st)


def test_rates():
    assert parse_rate("50") == 50 and parse_rate("50/s") == 50 and parse_rate("600/m") == 10
    assert parse_rate(" 2.5 / sec ") == 2.5
    for bad in ("", "0/s", "fast", "-1/s", "5/h"):
        with pytest.raises(WhereError, match="expected a rate like 50/s"):
            parse_rate(bad)


# -- the rate limit ----------------------------------------------------------------------------

def test_rate_limiter_spaces_sends_on_a_manual_clock():
    clock = ManualClock()
    limiter = RateLimiter(4.0, clock, burst=1)
    assert limiter.delay() == 0.0  # the first send goes at once
    assert limiter.delay() == pytest.approx(0.25)
    clock.advance(0.1)
    assert limiter.delay() == pytest.approx(0.15)
    clock.advance(0.15)
    assert limiter.delay() == 0.0
    waited: list[float] = []

    def sleep(s: float) -> None:
        waited.append(s)
        clock.advance(s)

    start = clock.now_ms()
    for _ in range(8):
        limiter.acquire(sleep)
    assert clock.now_ms() - start == 2000  # 8 sends at 4/s take 2 s
    assert all(w == pytest.approx(0.25) for w in waited)


def test_rate_limiter_bursts_up_to_its_bucket_and_no_further():
    clock = ManualClock()
    limiter = RateLimiter(10.0, clock)  # bucket of one second's worth
    limiter.delay()
    clock.advance(60)  # an idle minute saves up 10 sends, not 600
    assert [limiter.delay() for _ in range(10)] == [0.0] * 10
    assert limiter.delay() > 0
    with pytest.raises(WhereError, match="above 0"):
        RateLimiter(0, clock)


# -- ids, commands, outcomes -------------------------------------------------------------------

def test_command_ids_are_deterministic_per_batch_and_instance():
    assert command_id("b-1", "order-7") == command_id("b-1", "order-7") == "b-1:order-7"
    assert command_id("b-1", "order-7") != command_id("b-2", "order-7") != command_id("b-1", "order-8")
    header = {"id": "b-1", "operation": "signal", "args": {"name": "go", "data": {"x": 1}}, "by": "ann"}
    a, b = build_command(header, "order-7"), build_command(header, "order-7")
    assert a == b and a.type == "SignalWorkflow" and a.command_id == "b-1:order-7"
    assert a.data == {"name": "go", "data": {"x": 1}}
    cancel = build_command({**header, "operation": "cancel", "args": {"reason": "recall"}}, "o")
    assert cancel.type == "CancelWorkflow" and cancel.data == {"reason": "batch b-1: recall"}
    retry = build_command({**header, "operation": "retry", "args": {"from_step": "pay", "force": True}}, "o")
    assert retry.data == {"from_step": "pay", "input_patch": None, "force": True, "reason": "batch b-1", "by": "ann"}


def test_operations_are_checked_before_anything_is_selected():
    with pytest.raises(WhereError, match="a migrate batch needs its migration plan"):
        check_operation("migrate", {})
    with pytest.raises(WhereError, match="unknown operation 'pause'"):
        check_operation("pause", {})
    with pytest.raises(WhereError, match="needs the signal name"):
        check_operation("signal", {})
    with pytest.raises(WhereError, match="input_patch must be a JSON object"):
        check_operation("retry", {"input_patch": [1]})
    check_operation("signal", {"name": "go"})


def _ev(type_: str, iid: str = "i1", **data) -> Event:
    return Event(type_, iid, 3, 0, data)


def test_events_are_matched_to_the_batch_command():
    sig, cancel = OPERATIONS["signal"], OPERATIONS["cancel"]
    assert match_event(sig, "b-1", _ev("SignalReceived", name="go", signal_id="b-1:i1")) == Outcome("applied")
    assert match_event(sig, "b-1", _ev("SignalReceived", name="go", signal_id="other")) is None
    dup = _ev("CommandRejected", command_type="SignalWorkflow", code="DUPLICATE",
              reason="signal command 'b-1:i1' was already applied (a redelivery)")
    assert match_event(sig, "b-1", dup) == Outcome("applied", earlier=True)
    closed = _ev("CommandRejected", command_type="SignalWorkflow", code="INVALID_STATE",
                 reason="expected a RUNNING instance, but 'i1' is COMPLETED")
    assert match_event(sig, "b-1", closed) == Outcome("rejected", "INVALID_STATE",
                                                      "expected a RUNNING instance, but 'i1' is COMPLETED")
    assert match_event(cancel, "b-1", closed) is None  # another command type's rejection
    assert match_event(cancel, "b-1", _ev("WorkflowCancelled", reason="batch b-1: recall")) == Outcome("applied")
    assert match_event(cancel, "b-1", _ev("CancelRequested", reason="batch b-1")) == Outcome("applied")
    assert match_event(cancel, "b-1", _ev("WorkflowCancelled", reason="batch b-12")) is None
    assert match_event(cancel, "b-1", _ev("WorkflowCancelled", reason="by hand")) is None
    assert match_event(cancel, "b-1", _ev("ActivityScheduled")) is None
    history = [_ev("WorkflowStarted"), _ev("WorkflowCancelled", reason=batch_reason("b-1", "x"))]
    assert applied_earlier(cancel, "b-1", history) and not applied_earlier(cancel, "b-2", history)


def test_outcomes_round_trip_as_json():
    for o in (Outcome("applied"), Outcome("applied", earlier=True), Outcome("rejected", "INVALID_STATE", "why"),
              Outcome("unanswered", reason="no answer")):
        assert Outcome.from_json(o.to_json()) == o


# -- resuming ----------------------------------------------------------------------------------

def test_resume_cursor_skips_final_outcomes_and_retries_the_rest():
    ids = [f"i{n}" for n in range(6)]
    outcomes = {"i0": Outcome("applied"), "i1": Outcome("rejected", "INVALID_STATE", "closed"),
                "i3": Outcome("unanswered"), "i4": Outcome("dead-lettered", reason="x")}
    assert list(pending(ids, outcomes)) == [2, 3, 5]
    assert list(pending(ids, {})) == list(range(6))
    assert list(pending(ids, {i: Outcome("applied") for i in ids})) == []


def test_batch_record_reassembles_chunks_and_counts():
    ids = [f"i{n}" for n in range(CHUNK + 3)]
    table = {"b-1": {"id": "b-1", "total": len(ids), "chunks": 2},
             "b-1/ids/0": {"ids": ids[:CHUNK]}, "b-1/ids/1": {"ids": ids[CHUNK:]},
             "b-1/out/1": {ids[-1]: {"result": "applied"}, ids[-2]: {"result": "rejected", "code": "X"}},
             "b-1/cancel": {"by": "ann"}}
    rec = BatchLog.record_of(table, "b-1")
    assert rec.ids == ids and rec.cancel == {"by": "ann"}
    assert rec.counts() == {"applied": 1, "rejected": 1, "dead-lettered": 0, "unanswered": 0, "pending": CHUNK + 1}
    assert list(pending(rec.ids, rec.outcomes))[-1] == CHUNK  # i500: the only one of chunk 1 without an outcome


def test_a_missing_chunk_is_an_error_not_a_smaller_batch():
    from kflow.model.errors import KflowError

    with pytest.raises(KflowError, match="expected 3 instance ids, but found 2"):
        BatchLog.record_of({"b-1": {"id": "b-1", "total": 3, "chunks": 1}, "b-1/ids/0": {"ids": ["a", "b"]}}, "b-1")


# -- selecting ---------------------------------------------------------------------------------

def test_selection_reads_every_page_once_and_refuses_too_many():
    pages = {None: (["a", "b"], "c1"), "c1": (["b", "c"], "c2"), "c2": (["d"], None)}
    asked: list[object] = []

    def page(cursor):
        asked.append(cursor)
        return pages[cursor]

    assert select(page, 10) == ["a", "b", "c", "d"]
    assert asked == [None, "c1", "c2"]
    with pytest.raises(WhereError, match="more than 3 instances"):
        select(page, 3)


def test_runner_liveness():
    header = {"status": "RUNNING", "runner": "this-host:999999999", "updated_ms": 0}
    assert not runner_alive(header, 10, host="this-host")  # no such pid here
    import os

    assert runner_alive({**header, "runner": f"this-host:{os.getpid()}"}, 10, host="this-host")
    assert runner_alive({**header, "runner": "other:1", "updated_ms": 1000}, 5000, host="this-host")
    assert not runner_alive({**header, "runner": "other:1", "updated_ms": 1000}, 60_000, host="this-host")
    assert not runner_alive({**header, "status": "INTERRUPTED"}, 10, host="this-host")


# -- the command line: bad input applies nothing -------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["signal", "--where", "workfow=x", "--name", "go"], "unknown field 'workfow'"),
    (["cancel", "--where", "status=RUNNING", "--rate", "fast"], "expected a rate like 50/s"),
    (["signal", "--where", "status=RUNNING", "--name", "go", "--data", "{nope"], "--data is not valid JSON"),
    (["migrate", "--where", "workfow=x", "--plan", __file__], "migration plan"),
])
def test_cli_bad_input_is_one_error_before_any_connection(args, message):
    _one_error(args, message)


def test_cli_report_format_is_a_choice():
    res = CliRunner().invoke(app, ["batch", "report", "b-1", "--format", "xml", "--bootstrap", "127.0.0.1:1"],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 2, res.output  # refused before the command runs
    assert "Invalid value for '--format'" in res.output and "'xml' is not one of" in res.output


def _one_error(args, message):
    res = CliRunner().invoke(app, ["batch", *args, "--bootstrap", "127.0.0.1:1"] if args[0] != "migrate"
                             else ["batch", *args])
    assert res.exit_code == 1, res.output
    assert f"error: {message}" in res.output
