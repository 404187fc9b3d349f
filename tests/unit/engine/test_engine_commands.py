"""``decide`` called directly: command validation, rejections, DLQ verdicts, cancellation, versions."""

from __future__ import annotations

import copy
from typing import Any, Optional

import pytest

from kflow.engine import Decision, DeterminismError, InMemoryDefinitions, compile_spec, decide, fold
from kflow.model.messages import Command, Event, JSONDict, RejectCode
from kflow.testing.harness import EngineHarness

NOW = 1_700_000_000_000

TASK_WF = {"name": "orders", "version": 1, "steps": [
    {"id": "charge", "task": "charge", "output": "r"},
    {"id": "nap", "sleep": "1h"},
]}
WAIT_WF = {"name": "waiter", "version": 1, "steps": [
    {"id": "w", "wait": {"signal": "go", "timeout": "1h"}, "output": "g"},
]}
PARENT_WF = {"name": "parent", "version": 1, "steps": [
    {"id": "fan", "parallel": [
        {"steps": [{"id": "c1", "child": {"workflow": "waiter", "id": "'kid-1'"}}]},
        {"steps": [{"id": "c2", "child": {"workflow": "waiter", "id": "'kid-2'"}}]},
    ]},
]}


def defs(*docs: dict[str, Any]) -> InMemoryDefinitions:
    d = InMemoryDefinitions()
    for doc in docs or (TASK_WF, WAIT_WF, PARENT_WF):
        d.add(compile_spec(doc))
    return d


def cmd(type_: str, iid: str = "i1", **data: Any) -> Command:
    return Command(type=type_, instance_id=iid, data=data)


def start(iid: str = "i1", workflow: str = "orders", **extra: Any) -> Command:
    data = {"workflow": workflow, "version": None, "input": {"n": 1}, "parent_id": None, "parent_ref": None,
            "id_reuse": None}
    data.update(extra)
    return Command("StartWorkflow", iid, data)


def started(d: InMemoryDefinitions, iid: str = "i1", workflow: str = "orders") -> Decision:
    dec = decide(None, start(iid, workflow), NOW, d)
    assert dec.state is not None and dec.events
    return dec


def closed_state(d: InMemoryDefinitions) -> JSONDict:
    st = started(d, workflow="waiter").state
    dec = decide(st, cmd("CancelWorkflow", reason="stop"), NOW + 1, d)
    assert dec.state is not None and dec.state["status"] == "CANCELLED"
    return dec.state


def assert_rejected(dec: Decision, before: JSONDict, command_type: str, code: str) -> None:
    assert dec.dlq_reason is None
    [ev] = dec.events
    assert ev.type == "CommandRejected"
    assert ev.data["command_type"] == command_type
    assert ev.data["code"] == code
    assert "expected" in ev.data["reason"] and "but" in ev.data["reason"]
    assert ev.seq == before["seq"] + 1
    assert dec.state is not None and dec.state["seq"] == ev.seq
    assert {k: v for k, v in dec.state.items() if k not in ("seq", "updated_ms")} == \
        {k: v for k, v in before.items() if k not in ("seq", "updated_ms")}
    assert dec.tasks == [] and dec.commands == [] and dec.timers_set == [] and dec.timers_cancel == []


# -- StartWorkflow -------------------------------------------------------------------------------
@pytest.mark.parametrize(("workflow", "version"), [("ghost", None), ("orders", 9)])
def test_start_of_unknown_workflow_goes_to_the_dlq(workflow: str, version: Optional[int]) -> None:
    dec = decide(None, start(workflow=workflow, version=version), NOW, defs())
    assert dec.dlq_reason is not None and workflow in dec.dlq_reason
    assert dec.events == [] and dec.state is None


def test_start_emits_workflow_started_then_consequences() -> None:
    dec = started(defs())
    assert [e.type for e in dec.events] == ["WorkflowStarted", "ActivityScheduled"]
    assert dec.events[0].data == {"workflow": "orders", "version": 1, "input": {"n": 1}, "parent_id": None,
                                  "parent_ref": None}
    assert [t.name for t in dec.tasks] == ["charge"]
    assert dec.state is not None and dec.state["status"] == "RUNNING"


def test_duplicate_start_is_rejected_by_default() -> None:
    d = defs()
    st = started(d).state
    assert st is not None
    dec = decide(st, start(), NOW + 1, d)
    assert_rejected(dec, st, "StartWorkflow", RejectCode.DUPLICATE)


def test_duplicate_start_with_return_existing_changes_nothing() -> None:
    d = defs()
    st = started(d).state
    dec = decide(st, start(id_reuse="return_existing"), NOW + 1, d)
    assert dec.events == [] and dec.dlq_reason is None and dec.tasks == []
    assert dec.state == st


def test_allow_if_closed_rejects_while_running() -> None:
    d = defs()
    st = started(d).state
    assert st is not None
    assert_rejected(decide(st, start(id_reuse="allow_if_closed"), NOW + 1, d), st, "StartWorkflow",
                    RejectCode.DUPLICATE)


def test_allow_if_closed_starts_a_new_run_with_seq_continuing() -> None:
    d = defs()
    first = started(d, workflow="waiter")
    assert first.state is not None
    cancelled = decide(first.state, cmd("CancelWorkflow", reason="x"), NOW + 1, d)
    assert cancelled.state is not None
    history = [*first.events, *cancelled.events]
    last_seq = cancelled.state["seq"]
    dec = decide(cancelled.state, start(workflow="orders", id_reuse="allow_if_closed", input={"n": 2}), NOW + 2, d)
    assert dec.events[0].type == "WorkflowStarted" and dec.events[0].seq == last_seq + 1
    assert dec.state is not None
    assert dec.state["status"] == "RUNNING" and dec.state["workflow"] == "orders"
    assert dec.state["input"] == {"n": 2} and dec.state["error"] is None
    history += dec.events
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    assert fold(history, d) == dec.state


# -- missing and closed instances ----------------------------------------------------------------
ADDRESSED = [
    cmd("SignalWorkflow", name="go", data=1),
    cmd("CancelWorkflow", reason="r"),
    cmd("CompleteActivity", activity_id="charge-2", attempt=1, result=1),
    cmd("FailActivity", activity_id="charge-2", attempt=1, error_type="E", message="m", retryable=True),
    cmd("CompleteChild", child_id="c", result=1),
    cmd("FailChild", child_id="c", error_type="E", message="m"),
]


@pytest.mark.parametrize("command", ADDRESSED, ids=lambda c: c.type)
def test_command_for_missing_instance_goes_to_the_dlq(command: Command) -> None:
    dec = decide(None, command, NOW, defs())
    assert dec.dlq_reason is not None and "i1" in dec.dlq_reason
    assert dec.events == [] and dec.state is None


@pytest.mark.parametrize("command", ADDRESSED, ids=lambda c: c.type)
def test_command_for_closed_instance_is_rejected_invalid_state(command: Command) -> None:
    d = defs()
    st = closed_state(d)
    dec = decide(st, command, NOW + 5, d)
    assert_rejected(dec, st, command.type, RejectCode.INVALID_STATE)
    assert "CANCELLED" in dec.events[0].data["reason"]


def test_unknown_command_type_goes_to_the_dlq() -> None:
    d = defs()
    st = started(d).state
    dec = decide(st, cmd("RebootWorkflow"), NOW, d)
    assert dec.dlq_reason is not None and "RebootWorkflow" in dec.dlq_reason
    assert dec.events == []


# -- activity results ----------------------------------------------------------------------------
def _with_pending_activity(d: InMemoryDefinitions) -> tuple[JSONDict, str]:
    dec = started(d)
    assert dec.state is not None
    [task] = dec.tasks
    return dec.state, task.activity_id


def test_activity_completion_is_accepted_once_then_duplicate() -> None:
    d = defs()
    st, aid = _with_pending_activity(d)
    first = decide(st, cmd("CompleteActivity", activity_id=aid, attempt=1, result="ok"), NOW + 1, d)
    assert [e.type for e in first.events] == ["ActivityCompleted", "TimerStarted"]
    assert first.state is not None and first.state["vars"] == {"r": "ok"}
    for again in (cmd("CompleteActivity", activity_id=aid, attempt=1, result="ok"),
                  cmd("FailActivity", activity_id=aid, attempt=1, error_type="E", message="m", retryable=False)):
        assert_rejected(decide(first.state, again, NOW + 2, d), first.state, again.type, RejectCode.DUPLICATE)


def test_result_for_unknown_activity_is_duplicate() -> None:
    d = defs()
    st, _ = _with_pending_activity(d)
    c = cmd("CompleteActivity", activity_id="nope-1", attempt=1, result=None)
    assert_rejected(decide(st, c, NOW + 1, d), st, "CompleteActivity", RejectCode.DUPLICATE)


@pytest.mark.parametrize(("type_", "fields"), [
    ("CompleteActivity", {"result": 1}),
    ("FailActivity", {"error_type": "E", "message": "m", "retryable": True}),
])
def test_result_for_wrong_attempt_is_stale(type_: str, fields: dict[str, Any]) -> None:
    d = defs()
    st, aid = _with_pending_activity(d)
    c = cmd(type_, activity_id=aid, attempt=2, **fields)
    assert_rejected(decide(st, c, NOW + 1, d), st, type_, RejectCode.STALE)


def test_activity_failure_fails_the_workflow_and_cancels_nothing_else() -> None:
    d = defs()
    st, aid = _with_pending_activity(d)
    dec = decide(st, cmd("FailActivity", activity_id=aid, attempt=1, error_type="Boom", message="m", retryable=False),
                 NOW + 1, d)
    assert [e.type for e in dec.events] == ["ActivityFailed", "WorkflowFailed"]
    assert dec.state is not None and dec.state["status"] == "FAILED" and dec.state["error"]["type"] == "Boom"


def test_heartbeat_records_nothing() -> None:
    d = defs()
    st, aid = _with_pending_activity(d)
    dec = decide(st, cmd("HeartbeatActivity", activity_id=aid, attempt=1, details=None), NOW + 1, d)
    assert dec.events == [] and dec.dlq_reason is None and dec.state == st


# -- timers --------------------------------------------------------------------------------------
def test_fire_timer_for_unknown_timer_has_no_events() -> None:
    d = defs()
    st = started(d, workflow="waiter").state
    for state in (st, None, closed_state(d)):
        dec = decide(state, cmd("FireTimer", timer_id="t999"), NOW + 1, d)
        assert dec.events == [] and dec.dlq_reason is None and dec.state == state


def test_fire_timer_for_known_timer_fires_it() -> None:
    d = defs()
    dec0 = started(d, workflow="waiter")
    [(tid, due)] = dec0.timers_set
    assert due == NOW + 3_600_000
    dec = decide(dec0.state, cmd("FireTimer", timer_id=tid), due, d)
    assert [e.type for e in dec.events] == ["TimerFired", "WorkflowFailed"]
    assert dec.events[1].data["error_type"] == "Timeout"
    # the fired timer leaves the state, so it is listed for removal from the due-date index
    assert dec.timers_set == [] and dec.timers_cancel == [(tid, due)]
    assert dec.state is not None and dec.state["timers"] == {}


# -- cancellation --------------------------------------------------------------------------------
def test_cancel_closes_the_instance_and_cancels_its_timers() -> None:
    d = defs()
    dec0 = started(d, workflow="waiter")
    [(tid, due)] = dec0.timers_set
    dec = decide(dec0.state, cmd("CancelWorkflow", reason="user asked"), NOW + 1, d)
    assert [e.type for e in dec.events] == ["WorkflowCancelled"]
    assert dec.events[0].data == {"reason": "user asked"}
    assert dec.state is not None and dec.state["status"] == "CANCELLED"
    assert dec.state["error"] == {"type": "Cancelled", "message": "user asked"}
    assert dec.state["timers"] == {} and dec.state["threads"] == {}
    assert dec.timers_cancel == [(tid, due)]
    assert dec.commands == []


def test_cancel_sends_cancel_to_children_and_children_notify_the_parent() -> None:
    h = EngineHarness()
    h.defs = defs()
    h.start("parent", "p1")
    assert h.states["kid-1"]["parent_id"] == "p1" and h.states["kid-2"]["parent_id"] == "p1"
    dec = decide(h.states["p1"], cmd("CancelWorkflow", "p1", reason="stop"), h.clock.ms, h.defs)
    assert sorted((c.type, c.instance_id) for c in dec.commands) == [("CancelWorkflow", "kid-1"),
                                                                     ("CancelWorkflow", "kid-2")]
    assert len({c.command_id for c in dec.commands}) == 2
    h.send("CancelWorkflow", "p1", reason="stop")
    assert {h.status(i) for i in ("p1", "kid-1", "kid-2")} == {"CANCELLED"}
    # the children's FailChild reaches a parent that is already closed: a rejection, not a crash
    assert h.events("p1")[-2:] == ["CommandRejected", "CommandRejected"]
    assert h.dlq == []
    assert h.reprocess() == h.states


def test_cancelled_child_fails_its_parent() -> None:
    h = EngineHarness()
    h.defs = defs()
    h.start("parent", "p1")
    dec = decide(h.states["kid-2"], cmd("CancelWorkflow", "kid-2", reason="kill"), h.clock.ms, h.defs)
    assert [(c.type, c.instance_id) for c in dec.commands] == [("FailChild", "p1")]
    assert dec.commands[0].data == {"child_id": "kid-2", "error_type": "Cancelled", "message": "kill"}
    h.send("CancelWorkflow", "kid-2", reason="kill")
    assert h.status("p1") == "FAILED"
    assert h.states["p1"]["error"]["type"] == "Cancelled"
    # the failed parent cancels its remaining child
    assert h.status("kid-1") == "CANCELLED"
    assert h.reprocess() == h.states


def test_child_result_for_unknown_child_is_duplicate() -> None:
    h = EngineHarness()
    h.defs = defs()
    h.start("parent", "p1")
    st = h.states["p1"]
    for c in (cmd("CompleteChild", "p1", child_id="stranger", result=1),
              cmd("FailChild", "p1", child_id="stranger", error_type="E", message="m")):
        assert_rejected(decide(st, c, h.clock.ms, h.defs), st, c.type, RejectCode.DUPLICATE)


# -- purity --------------------------------------------------------------------------------------
def _busy_state(d: InMemoryDefinitions) -> tuple[JSONDict, str, str]:
    """A RUNNING instance with a pending activity, a timer and a buffered signal."""
    doc = {"name": "busy", "version": 1, "steps": [
        {"id": "fan", "parallel": [
            {"steps": [{"id": "t", "task": "work"}]},
            {"steps": [{"id": "s", "sleep": "5s"}]},
            {"steps": [{"id": "w", "wait": {"signal": "go", "timeout": "1m"}}]},
        ]},
        {"id": "late", "wait": {"signal": "later"}},
    ]}
    d.add(compile_spec(doc))
    dec = decide(None, start("b1", "busy"), NOW, d)
    st = dec.state
    assert st is not None
    dec2 = decide(st, cmd("SignalWorkflow", "b1", name="later", data={"deep": [1, {"x": 2}]}), NOW + 1, d)
    assert dec2.state is not None and dec2.state["signals"] == {"later": [{"deep": [1, {"x": 2}]}]}
    [task] = dec.tasks
    timer = next(t for t, v in dec2.state["timers"].items() if v["purpose"] == "sleep")
    return dec2.state, task.activity_id, timer


def test_decide_never_mutates_its_input_state() -> None:
    d = defs()
    st, aid, timer = _busy_state(d)
    commands = [
        cmd("CompleteActivity", "b1", activity_id=aid, attempt=1, result={"a": [1]}),
        cmd("FailActivity", "b1", activity_id=aid, attempt=1, error_type="E", message="m", retryable=True),
        cmd("CompleteActivity", "b1", activity_id=aid, attempt=3, result=None),
        cmd("FireTimer", "b1", timer_id=timer),
        cmd("SignalWorkflow", "b1", name="go", data={"v": 1}),
        cmd("SignalWorkflow", "b1", name="later", data=2),
        cmd("CancelWorkflow", "b1", reason="r"),
        start("b1", "busy"),
        start("b1", "busy", id_reuse="return_existing"),
        cmd("CompleteChild", "b1", child_id="x", result=1),
        cmd("HeartbeatActivity", "b1", activity_id=aid, attempt=1, details=None),
        cmd("Nonsense", "b1"),
    ]
    for c in commands:
        before = copy.deepcopy(st)
        dec = decide(st, c, NOW + 10, d)
        assert st == before, c.type
        if dec.events and dec.state is not None:
            # and the new state shares nothing mutable that a later decide could change under us
            after = copy.deepcopy(dec.state)
            decide(dec.state, cmd("SignalWorkflow", "b1", name="later", data=3), NOW + 11, d)
            assert dec.state == after, c.type


# -- versioning ----------------------------------------------------------------------------------
def test_running_instances_keep_their_version_new_starts_get_the_latest() -> None:
    v1 = {"name": "flow", "version": 1, "steps": [{"id": "w", "wait": {"signal": "go"}}, {"id": "r", "succeed": "'v1'"}]}
    v2 = {"name": "flow", "version": 2, "steps": [{"id": "w", "wait": {"signal": "go"}}, {"id": "r", "succeed": "'v2'"}]}
    h = EngineHarness()
    h.deploy(v1)
    h.start("flow", "old")
    assert h.states["old"]["version"] == 1
    h.deploy(v2)
    h.start("flow", "new")
    h.start("flow", "pinned", version=1)
    assert h.states["new"]["version"] == 2 and h.states["pinned"]["version"] == 1
    for iid in ("old", "new", "pinned"):
        h.signal(iid, "go")
    assert (h.result("old"), h.result("new"), h.result("pinned")) == ("v1", "v2", "v1")
    assert h.reprocess() == h.states


def test_deploying_an_older_version_later_does_not_change_latest() -> None:
    d = InMemoryDefinitions()
    d.add(compile_spec({"name": "f", "version": 3, "steps": [{"id": "a", "succeed": "3"}]}))
    d.add(compile_spec({"name": "f", "version": 2, "steps": [{"id": "a", "succeed": "2"}]}))
    dec = decide(None, start("x", "f"), NOW, d)
    assert dec.state is not None and dec.state["version"] == 3 and dec.state["result"] == 3


# -- sequence numbers ----------------------------------------------------------------------------
def test_every_event_seq_is_gap_free_from_one() -> None:
    h = EngineHarness()
    h.defs = defs()
    h.activity("charge", lambda _: "paid")
    h.start("orders", "o1")
    h.send("CompleteActivity", "o1", activity_id="nope", attempt=1, result=None)  # rejected
    h.signal("o1", "unused", 1)  # buffered
    h.start("orders", "o1")  # duplicate
    h.advance(3600)
    h.signal("o1", "late", 2)  # closed
    h.start("parent", "p1")
    h.signal("kid-1", "go", "a")
    h.send("CancelWorkflow", "p1", reason="done")
    assert h.status("o1") == "COMPLETED" and h.status("p1") == "CANCELLED"
    assert h.events("o1").count("CommandRejected") == 3
    for iid, events in h.history.items():
        assert [e.seq for e in events] == list(range(1, len(events) + 1)), iid
        assert h.states[iid]["seq"] == len(events)
        assert all(e.instance_id == iid for e in events)
    assert h.reprocess() == h.states


def test_duplicate_child_start_tells_the_waiting_parent_unless_it_already_owns_the_child() -> None:
    d = defs()
    owner = decide(None, start("kid", "waiter", parent_id="p1", parent_ref="kid"), NOW, d).state
    assert owner is not None
    other = decide(owner, start("kid", "waiter", parent_id="p2", parent_ref="kid"), NOW + 1, d)
    assert [e.type for e in other.events] == ["CommandRejected"]
    assert other.events[0].data["code"] == RejectCode.DUPLICATE
    [note] = other.commands
    assert (note.type, note.instance_id) == ("FailChild", "p2")
    assert note.data["child_id"] == "kid" and note.data["error_type"] == "WorkflowAlreadyStarted"
    assert note.command_id
    # the same start delivered again by its own parent must not fail that parent
    again = decide(owner, start("kid", "waiter", parent_id="p1", parent_ref="kid"), NOW + 1, d)
    assert [e.type for e in again.events] == ["CommandRejected"] and again.commands == []
    # a plain duplicate start from a client notifies nobody
    plain = decide(owner, start("kid", "waiter"), NOW + 1, d)
    assert plain.commands == []


# -- replay ------------------------------------------------------------------------------------
def _recorded_history() -> tuple[InMemoryDefinitions, list[Event]]:
    d = defs()
    first = started(d)
    assert first.state is not None
    [task] = first.tasks
    second = decide(first.state, cmd("CompleteActivity", activity_id=task.activity_id, attempt=1, result="ok"),
                    NOW + 1, d)
    history = [*first.events, *second.events]
    assert fold(history, d) == second.state
    return d, history


@pytest.mark.parametrize("tamper", ["data", "type", "drop", "extra", "orphan"])
def test_fold_detects_a_history_the_engine_would_not_produce(tamper: str) -> None:
    d, history = _recorded_history()
    i = next(i for i, e in enumerate(history) if e.type == "ActivityScheduled")
    ev = history[i]
    if tamper == "data":
        history[i] = Event(ev.type, ev.instance_id, ev.seq, ev.ts, {**ev.data, "queue": "elsewhere"})
    elif tamper == "type":
        history[i] = Event("TimerStarted", ev.instance_id, ev.seq, ev.ts, ev.data)
    elif tamper == "drop":
        history = history[:1]
    elif tamper == "extra":
        history.insert(i + 1, Event("ActivityScheduled", ev.instance_id, ev.seq + 1, ev.ts, ev.data))
    else:
        history.append(Event("TimerStarted", ev.instance_id, len(history) + 1, ev.ts, {"timer_id": "t9", "due_ms": 1}))
    with pytest.raises(DeterminismError) as info:
        fold(history, d)
    assert info.value.instance_id == "i1"
