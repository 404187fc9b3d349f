"""Suspend and resume: a suspended instance holds what arrives and applies it, in order, on resume.

Driven through :class:`~kflow.testing.harness.EngineHarness` with its manual clock: timers come
due by advancing the clock, never by sleeping. Every test ends with the fold property: replaying
the recorded histories from scratch reproduces the live states exactly.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form

import kflow
from kflow.model.messages import RejectCode, Status
from kflow.schemas.codec import MAGIC, decode_command, decode_event
from kflow.testing.harness import EngineHarness

#: Two timers (sleeps in parallel branches) and a signal the workflow waits for after them.
TIMERS_AND_SIGNAL = {"name": "paced", "version": 1, "steps": [
    {"id": "both", "parallel": [
        {"steps": [{"id": "short", "sleep": "10s"}, {"id": "a", "task": "mark", "input": "'short'"}]},
        {"steps": [{"id": "long", "sleep": "20s"}, {"id": "b", "task": "mark", "input": "'long'"}]},
    ]},
    {"id": "go", "wait": {"signal": "go"}, "output": "g"},
    {"id": "after", "task": "mark", "input": "'after ' + g"},
]}

#: One activity, then a follow-up activity on its result.
TWO_STEPS = {"name": "two", "version": 1, "steps": [
    {"id": "first", "task": "first", "output": "r"},
    {"id": "second", "task": "second", "input": "r"},
]}

#: A wait whose timeout comes due while suspended, after its signal arrived.
WAIT_WITH_TIMEOUT = {"name": "approval", "version": 1, "steps": [
    {"id": "w", "wait": {"signal": "approve", "timeout": "30s"}, "output": "d"},
]}


def harness(*docs: dict[str, Any]) -> tuple[EngineHarness, list[Any]]:
    """A harness with the given definitions and a ``mark`` activity that records its inputs."""
    h = EngineHarness()
    for doc in docs:
        h.deploy(doc)
    marks: list[Any] = []
    h.activity("mark", lambda x: marks.append(x) or x)
    return h, marks


def assert_folds(h: EngineHarness) -> None:
    assert h.reprocess() == h.states


def rejection(h: EngineHarness, iid: str) -> dict[str, Any]:
    last = h.history[iid][-1]
    assert last.type == "CommandRejected"
    return last.data


def test_suspended_instance_fires_no_timers_and_delivers_no_signals_until_resumed() -> None:
    h, marks = harness(TIMERS_AND_SIGNAL)
    h.start("paced", "p1")
    h.send("SuspendWorkflow", "p1", reason="maintenance")
    assert h.status("p1") == Status.SUSPENDED
    h.advance(25)  # both sleeps come due
    h.signal("p1", "go", "now")
    assert marks == []
    assert h.states["p1"]["timers"] == {}  # nothing left for the clock to fire
    assert h.pending_tasks == type(h.pending_tasks)()
    assert "ActivityScheduled" not in h.events("p1")
    assert h.events("p1")[-3:] == ["TimerFired", "TimerFired", "SignalReceived"]

    h.send("ResumeWorkflow", "p1", reason="")
    assert marks == ["short", "long", "after now"]  # timers in due order, then the signal's follow-up
    assert h.status("p1") == Status.COMPLETED
    assert_folds(h)


def test_activity_result_while_suspended_is_recorded_and_its_follow_up_waits() -> None:
    h, _ = harness(TWO_STEPS)
    seen: list[Any] = []
    h.activity("first", lambda _: 41)
    h.activity("second", lambda x: seen.append(x) or x + 1)
    h.auto_run_tasks = False
    h.start("two", "t1")
    task = h.pending_tasks.popleft()
    h.send("SuspendWorkflow", "t1", reason="investigate")
    h.run_task(task)  # the running attempt finishes while the instance is suspended
    h.drain()
    assert h.events("t1")[-1] == "ActivityCompleted"
    assert "second" not in [t.name for t in h.pending_tasks]
    assert h.states["t1"]["status"] == Status.SUSPENDED

    h.auto_run_tasks = True
    h.send("ResumeWorkflow", "t1", reason="fixed")
    assert seen == [41]
    assert h.result("t1") == {"r": 41}
    assert_folds(h)


def test_a_redelivered_result_while_suspended_is_a_duplicate() -> None:
    h, _ = harness(TWO_STEPS)
    h.activity("first", lambda _: 1)
    h.activity("second", lambda x: x)
    h.auto_run_tasks = False
    h.start("two", "t1")
    task = h.pending_tasks.popleft()
    h.send("SuspendWorkflow", "t1", reason="")
    h.run_task(task)
    h.run_task(task)  # the worker's report arrives twice
    h.drain()
    assert rejection(h, "t1")["code"] == RejectCode.DUPLICATE
    assert h.events("t1").count("ActivityCompleted") == 1
    assert_folds(h)


def test_a_held_timeout_is_void_when_its_signal_arrived_first() -> None:
    h, _ = harness(WAIT_WITH_TIMEOUT)
    h.start("approval", "a1")
    h.send("SuspendWorkflow", "a1", reason="")
    h.signal("a1", "approve", "yes")
    h.advance(60)  # the wait's timeout comes due after the signal arrived
    h.send("ResumeWorkflow", "a1", reason="")
    assert h.status("a1") == Status.COMPLETED
    assert h.result("a1") == {"d": "yes"}
    assert_folds(h)


@pytest.mark.parametrize("close", ["CancelWorkflow", "TerminateWorkflow"])
def test_suspend_of_a_closed_instance_is_rejected(close: str) -> None:
    h, _ = harness(WAIT_WITH_TIMEOUT)
    h.start("approval", "a1")
    h.send(close, "a1", reason="done")
    closed = h.status("a1")
    h.send("SuspendWorkflow", "a1", reason="too late")
    data = rejection(h, "a1")
    assert data["code"] == RejectCode.INVALID_STATE
    assert "closed" in data["reason"] and closed in data["reason"]
    assert h.status("a1") == closed
    assert_folds(h)


def test_suspend_twice_and_resume_of_a_running_instance_are_rejected() -> None:
    h, _ = harness(WAIT_WITH_TIMEOUT)
    h.start("approval", "a1")
    h.send("ResumeWorkflow", "a1", reason="")
    assert "expected a SUSPENDED instance" in rejection(h, "a1")["reason"]
    h.send("SuspendWorkflow", "a1", reason="first")
    h.send("SuspendWorkflow", "a1", reason="second")
    assert "already is (reason: first)" in rejection(h, "a1")["reason"]
    assert h.status("a1") == Status.SUSPENDED
    assert_folds(h)


def test_terminate_of_a_suspended_instance_drops_what_it_held() -> None:
    h, marks = harness(TIMERS_AND_SIGNAL)
    h.start("paced", "p1")
    h.send("SuspendWorkflow", "p1", reason="")
    h.advance(25)
    h.send("TerminateWorkflow", "p1", reason="abandon")
    assert h.status("p1") == Status.TERMINATED
    assert "suspended" not in h.states["p1"]
    assert marks == []
    assert_folds(h)


def test_a_timer_due_after_resume_fires_on_its_own_time() -> None:
    h, marks = harness(TIMERS_AND_SIGNAL)
    h.start("paced", "p1")
    h.send("SuspendWorkflow", "p1", reason="")
    h.advance(15)  # only the short sleep comes due while suspended
    h.send("ResumeWorkflow", "p1", reason="")
    assert marks == ["short"]
    h.advance(4)
    assert marks == ["short"]
    h.advance(1)
    assert marks == ["short", "long"]
    assert_folds(h)


# -- code workflows ------------------------------------------------------------------------------
@kflow.workflow(name="lifecycle.code", version=1)
async def code_steps(ctx, input):
    first = await ctx.activity("inc", input)
    await ctx.sleep(10)
    go = await ctx.wait_signal("go")
    second = await ctx.activity("inc", first)
    return {"first": first, "go": go, "second": second}


@pytest.mark.parametrize("cached", [True, False], ids=["live-machine", "rebuilt"])
def test_code_workflow_holds_result_and_signal_until_resumed(cached: bool) -> None:
    h = EngineHarness()
    h.defs.add(kflow.authoring.definition_of(code_steps))
    calls: list[int] = []
    h.activity("inc", lambda x: calls.append(x) or x + 1)
    h.auto_run_tasks = False
    h.start("lifecycle.code", "c1", 1)
    task = h.pending_tasks.popleft()
    h.send("SuspendWorkflow", "c1", reason="hold on")
    h.run_task(task)
    h.drain()
    h.signal("c1", "go", "yes")
    assert calls == [1] and not h.pending_tasks
    assert h.states["c1"]["timers"] == {}
    if not cached:
        h.replay_cache.clear()  # an engine restart while suspended

    h.auto_run_tasks = True
    h.send("ResumeWorkflow", "c1", reason="")
    assert h.status("c1") == Status.RUNNING  # the sleep after the held result starts on resume
    h.advance(9)
    assert calls == [1]
    h.advance(1)
    assert h.status("c1") == Status.COMPLETED
    assert h.result("c1") == {"first": 2, "go": "yes", "second": 3}
    assert calls == [1, 2]
    assert_folds(h)


@kflow.workflow(name="lifecycle.nap", version=1)
async def code_nap(ctx, input):
    await ctx.sleep(10)
    return await ctx.activity("inc", input)


def test_code_workflow_timer_due_while_suspended_fires_on_resume() -> None:
    h = EngineHarness()
    h.defs.add(kflow.authoring.definition_of(code_nap))
    calls: list[int] = []
    h.activity("inc", lambda x: calls.append(x) or x + 1)
    h.start("lifecycle.nap", "n1", 5)
    h.send("SuspendWorkflow", "n1", reason="")
    h.advance(15)
    assert calls == [] and h.events("n1")[-1] == "TimerFired"
    h.send("ResumeWorkflow", "n1", reason="")
    assert calls == [5]
    assert h.result("n1") == 6
    assert_folds(h)


# -- retry of a failed spec instance ---------------------------------------------------------------
ORDER = {"name": "order", "version": 1, "steps": [
    {"id": "reserve", "task": "reserve", "input": "input", "output": "r"},
    {"id": "charge", "task": "charge", "input": "r", "output": "c"},
    {"id": "ship", "task": "ship", "input": "c", "output": "s"},
]}


def order_with_broken_charge(definition: dict[str, Any]) -> tuple[EngineHarness, dict[str, list[Any]]]:
    """Instance o1 of ``definition`` (steps reserve, charge, ship) started, its ``charge`` raising on
    every call, every activity call recorded."""
    h = EngineHarness()
    h.deploy(definition)
    calls: dict[str, list[Any]] = {"reserve": [], "charge": [], "ship": []}

    def broken(x: Any) -> Any:
        calls["charge"].append(x)
        raise RuntimeError("card service down")

    h.activity("reserve", lambda x: calls["reserve"].append(x) or {"sku": x})
    h.activity("charge", broken)
    h.activity("ship", lambda x: calls["ship"].append(x) or "shipped")
    h.start("order", "o1", "A1")
    return h, calls


def failing_order() -> tuple[EngineHarness, dict[str, list[Any]]]:
    """An ``order`` instance o1 that FAILED at ``charge``, with every activity call recorded."""
    h, calls = order_with_broken_charge(ORDER)
    assert h.status("o1") == Status.FAILED
    return h, calls


def retry(h: EngineHarness, iid: str, **data: Any) -> None:
    """Send ``RetryWorkflow`` with the fields the client sends by default, overridden by ``data``."""
    h.send("RetryWorkflow", iid, **{"from_step": None, "input_patch": None, "force": False, "reason": "", "by": "",
                                    **data})


def fix_charge(h: EngineHarness, calls: dict[str, list[Any]]) -> None:
    h.activity("charge", lambda x: calls["charge"].append(x) or {"paid": x})


def test_retry_reopens_at_the_failed_step_and_earlier_steps_do_not_run_again() -> None:
    h, calls = failing_order()
    fix_charge(h, calls)
    h.send("RetryWorkflow", "o1", from_step=None, input_patch=None, force=False, reason="card service back",
           by="ops")
    assert h.status("o1") == Status.COMPLETED
    assert calls["reserve"] == ["A1"]
    assert calls["charge"] == [{"sku": "A1"}, {"sku": "A1"}]
    assert h.result("o1")["s"] == "shipped"
    retried = [e.data for e in h.history["o1"] if e.type == "WorkflowRetried"]
    assert retried == [{"from_step": "charge", "input_patch": None, "reason": "card service back", "by": "ops",
                        "attempt": 1}]
    assert_folds(h)


def test_retry_from_a_named_step_with_patched_variables() -> None:
    h, calls = failing_order()
    fix_charge(h, calls)
    h.send("RetryWorkflow", "o1", from_step="charge", input_patch={"r": {"sku": "B2"}}, force=False,
           reason="", by="")
    assert calls["reserve"] == ["A1"]
    assert calls["charge"][-1] == {"sku": "B2"}
    assert h.status("o1") == Status.COMPLETED
    assert_folds(h)


def test_retry_that_fails_again_can_be_retried_again() -> None:
    h, calls = failing_order()
    retry(h, "o1", reason="try once more")
    assert h.status("o1") == Status.FAILED
    fix_charge(h, calls)
    retry(h, "o1")
    assert h.status("o1") == Status.COMPLETED
    assert [e.data["attempt"] for e in h.history["o1"] if e.type == "WorkflowRetried"] == [1, 2]
    assert len(calls["charge"]) == 3 and calls["reserve"] == ["A1"]
    assert_folds(h)


@pytest.mark.parametrize(("data", "expected"), [
    ({"from_step": "nope"}, "expected a top-level step of 'order@1' (reserve, charge, ship), but got 'nope'"),
    ({"input_patch": [1]}, "expected input_patch to be a JSON object, but got list"),
])
def test_retry_with_bad_input_is_rejected_and_changes_nothing(data: dict[str, Any], expected: str) -> None:
    h, calls = failing_order()
    retry(h, "o1", **data)
    assert rejection(h, "o1") == {"command_type": "RetryWorkflow", "code": RejectCode.INVALID_INPUT,
                                  "reason": expected}
    assert h.status("o1") == Status.FAILED
    assert calls["reserve"] == ["A1"]
    assert_folds(h)


def test_retry_of_a_cancelled_instance_needs_force() -> None:
    h, _ = harness(WAIT_WITH_TIMEOUT)
    h.start("approval", "a1")
    h.send("CancelWorkflow", "a1", reason="oops")
    retry(h, "a1")
    assert "is CANCELLED (use force)" in rejection(h, "a1")["reason"]
    retry(h, "a1", force=True, reason="cancelled by mistake")
    assert h.status("a1") == Status.RUNNING
    h.signal("a1", "approve", "late yes")
    assert h.result("a1") == {"d": "late yes"}
    assert_folds(h)


def test_retry_of_a_running_or_completed_instance_is_rejected() -> None:
    h, calls = failing_order()
    fix_charge(h, calls)
    retry(h, "o1")
    retry(h, "o1")
    assert "expected a FAILED instance to retry, but 'o1' is COMPLETED" in rejection(h, "o1")["reason"]
    assert_folds(h)


# -- wire compatibility ----------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "first_new", "record", "decoded"), [
    ("command", "SuspendWorkflow", ("kflow.SignalWorkflow", {"name": "go", "data": "[1]"}),
     ("SignalWorkflow", {"name": "go", "data": [1]})),
    ("event", "WorkflowSuspended", ("kflow.WorkflowCancelled", {"reason": "r"}),
     ("WorkflowCancelled", {"reason": "r"})),
])
def test_records_written_before_the_lifecycle_types_still_decode(
        kind: str, first_new: str, record: tuple[str, dict[str, Any]], decoded: tuple[str, dict[str, Any]]) -> None:
    """The lifecycle types are appended to the body unions; records of the schema before them read."""
    raw = json.loads((Path(kflow.__file__).parent / "schemas" / f"{kind}.avsc").read_text())
    body = next(f for f in raw["fields"] if f["name"] == "body")
    names = [r["name"] for r in body["type"]]
    assert names.index(first_new) > names.index("QueryStatus" if kind == "command" else "WorkflowContinuedAsNew")
    body["type"] = body["type"][:names.index(first_new)]  # the schema as the release before wrote it
    old = fastavro.parse_schema(raw)
    header = MAGIC + bytes.fromhex(fingerprint(to_parsing_canonical_form(old), "CRC-64-AVRO"))
    buf = io.BytesIO()
    common = {"format": 1, "instance_id": "i1", "ts": 5, "body": record}
    extra = {"command_id": "c1"} if kind == "command" else {"seq": 3}
    fastavro.schemaless_writer(buf, old, {**common, **extra})
    value = (decode_command if kind == "command" else decode_event)(header + buf.getvalue())
    assert (value.type, value.instance_id, value.data) == (*decoded[:1], "i1", decoded[1])
