"""The input events the deciders record are built from their typed models (:mod:`kflow.model.events`)
and carry exactly the data they carried as hand-made dicts: the same keys, values and (schema) order,
for instances, limits, schedules and migrations alike; ``evolve`` applies the model it is handed
as it applies the one it builds from the event."""

from __future__ import annotations

from typing import Any

from kflow.engine import InMemoryDefinitions, compile_spec, decide, evolve
from kflow.engine.activity import Limits
from kflow.engine.core import INPUT_EVENTS
from kflow.engine.limits import LimitsView, key_of, parse_limits
from kflow.engine.schedules import ScheduleSpec, run_id
from kflow.engine.schedules import key_of as schedule_key
from kflow.model.commands import StartWorkflow, command
from kflow.model.events import SignalReceived, event, from_data, to_data
from kflow.model.messages import Event, RejectCode, Status
from kflow.model.versions import version_code
from kflow.testing.harness import EngineHarness, ManualClock
from tests.unit.engine.test_migration import V1, V2

NOW = 1_700_000_000_000

WAIT_WF = {"name": "waiter", "version": 1, "steps": [{"id": "w", "wait": {"signal": "go"}, "output": "g"}]}
TASK_WF = {"name": "orders", "version": 1, "steps": [
    {"id": "charge", "task": "charge", "retry": {"initial": "1s", "max_attempts": 2, "jitter": 0}, "output": "c"}]}
CHILD_WF = {"name": "parent", "version": 1, "steps": [
    {"id": "sub", "child": {"workflow": "waiter", "input": "input"}, "output": "k"}]}
UPDATE_WF = {"name": "asks", "version": 1, "steps": [
    {"id": "ask", "wait": {"update": "approve", "reply": "{'ok': true}"}, "output": "d"}]}


def harness(*docs: dict[str, Any]) -> EngineHarness:
    h = EngineHarness(ManualClock(NOW))
    for doc in docs:
        h.deploy(doc)
    return h


def recorded(h: EngineHarness, iid: str, *types: str) -> list[tuple[str, list[tuple[str, Any]]]]:
    """The events of ``iid`` of the given types, each as its type and data items, in recorded order."""
    return [(e.type, list(e.data.items())) for e in h.history[iid] if e.type in types]


def assert_schema_order(h: EngineHarness) -> None:
    """Every recorded event's data is exactly its model's fields, in schema order."""
    for iid, history in h.history.items():
        for e in history:
            assert list(to_data(from_data(e.type, e.data)).items()) == list(e.data.items()), (iid, e)


# -- instances ---------------------------------------------------------------------------------------
def test_start_suspend_signal_resume_and_a_rejection_carry_the_same_data_as_before() -> None:
    h = harness(WAIT_WF)
    h.start("waiter", "i1", {"n": 1})
    h.send("SuspendWorkflow", "i1", reason="")
    h.signal("i1", "go", 7, command_id="c-1")
    h.send("ResumeWorkflow", "i1", reason="ops")
    h.signal("i1", "go", 8, command_id="c-2")
    assert h.status("i1") == Status.COMPLETED and h.result("i1") == {"g": 7}
    assert recorded(h, "i1", *INPUT_EVENTS, "CommandRejected") == [
        ("WorkflowStarted", [("workflow", "waiter"), ("version", 1), ("input", {"n": 1}), ("parent_id", None),
                             ("parent_ref", None)]),
        ("WorkflowSuspended", [("reason", "")]),
        ("SignalReceived", [("name", "go"), ("data", 7), ("signal_id", "c-1")]),
        ("WorkflowResumed", [("reason", "ops")]),
        ("CommandRejected", [("command_type", "SignalWorkflow"), ("code", "INVALID_STATE"),
                             ("reason", "expected a RUNNING instance, but 'i1' is COMPLETED")]),
    ]
    [rejected] = [e for e in h.history["i1"] if e.type == "CommandRejected"]
    assert rejected.data["code"] is RejectCode.INVALID_STATE  # a RejectCode, as reject() was given
    assert h.reprocess() == h.states
    assert_schema_order(h)


def test_activity_results_timers_retries_and_terminate_carry_the_same_data_as_before() -> None:
    h = harness(TASK_WF)
    h.auto_run_tasks = False
    h.start("orders", "o1")
    first = h.pending_tasks.popleft()
    h.send("FailActivity", "o1", activity_id=first.activity_id, attempt=1, error_type="", message="",
           retryable=True)
    [tid] = h.states["o1"]["timers"]
    h.advance(1)  # the backoff: attempt 2
    second = h.pending_tasks.popleft()
    h.send("FailActivity", "o1", activity_id=second.activity_id, attempt=2, error_type="CardDeclined",
           message="no", retryable=False)
    assert h.status("o1") == Status.FAILED
    h.send("RetryWorkflow", "o1", from_step=None, input_patch={"card": "tok_2"}, force=False, reason="again", by="ops")
    third = h.pending_tasks.popleft()
    h.send("CompleteActivity", "o1", activity_id=third.activity_id, attempt=third.attempt, result={"ok": True})
    assert h.status("o1") == Status.COMPLETED and h.result("o1") == {"card": "tok_2", "c": {"ok": True}}
    aid = first.activity_id
    assert recorded(h, "o1", "ActivityFailed", "TimerFired", "WorkflowRetried", "ActivityCompleted") == [
        ("ActivityFailed", [("activity_id", aid), ("attempt", 1), ("error_type", "ActivityError"), ("message", ""),
                            ("retryable", True)]),
        ("TimerFired", [("timer_id", tid)]),
        ("ActivityFailed", [("activity_id", aid), ("attempt", 2), ("error_type", "CardDeclined"), ("message", "no"),
                            ("retryable", False)]),
        ("WorkflowRetried", [("from_step", "charge"), ("input_patch", {"card": "tok_2"}), ("reason", "again"),
                             ("by", "ops"), ("attempt", 1)]),
        ("ActivityCompleted", [("activity_id", third.activity_id), ("attempt", third.attempt),
                               ("result", {"ok": True})]),
    ]
    h.start("orders", "o2")
    h.send("TerminateWorkflow", "o2", reason="stop")
    assert recorded(h, "o2", "WorkflowTerminated") == [("WorkflowTerminated", [("reason", "stop")])]
    assert h.reprocess() == h.states
    assert_schema_order(h)


def test_a_too_large_result_is_recorded_as_the_same_activity_failure_as_before() -> None:
    h = harness(TASK_WF)
    h.auto_run_tasks = False
    h.defs.limits = Limits(max_payload_bytes=10)  # type: ignore[attr-defined]
    h.start("orders", "o1")
    task = h.pending_tasks.popleft()
    h.send("CompleteActivity", "o1", activity_id=task.activity_id, attempt=1, result="x" * 20)
    assert recorded(h, "o1", "ActivityFailed") == [
        ("ActivityFailed", [("activity_id", task.activity_id), ("attempt", 1), ("error_type", "LimitExceeded"),
                            ("message", "expected a result of at most 10 bytes, but got 22 bytes"),
                            ("retryable", False)])]


def test_child_results_cancel_and_updates_carry_the_same_data_as_before() -> None:
    h = harness(WAIT_WF, CHILD_WF, UPDATE_WF)
    h.start("parent", "p1", 5)
    [child] = h.states["p1"]["children"]
    h.send("TerminateWorkflow", child, reason="stop")
    assert recorded(h, "p1", "ChildFailed") == [
        ("ChildFailed", [("child_id", child), ("error_type", "Terminated"), ("message", "stop")])]
    h.start("parent", "p2", 6)
    [child2] = h.states["p2"]["children"]
    h.signal(child2, "go", "ok")
    assert recorded(h, "p2", "ChildCompleted") == [("ChildCompleted", [("child_id", child2), ("result", {"g": "ok"})])]
    h.start("waiter", "w1")
    h.send("CancelWorkflow", "w1", reason="")
    assert recorded(h, "w1", "WorkflowCancelled") == [("WorkflowCancelled", [("reason", "")])]
    h.start("asks", "a1")
    assert h.update("a1", "approve", {"amount": 3}, update_id="u-1") == {"result": {"ok": True}}
    assert recorded(h, "a1", "UpdateAccepted") == [
        ("UpdateAccepted", [("update_id", "u-1"), ("name", "approve"), ("data", {"amount": 3})])]
    assert h.reprocess() == h.states
    assert_schema_order(h)


# -- limits, schedules, migrations ----------------------------------------------------------------------
def test_a_queued_start_its_permit_and_a_priority_change_carry_the_same_data_as_before() -> None:
    h = harness(WAIT_WF)
    h.defs.quotas = LimitsView(parse_limits({"limits": [  # type: ignore[attr-defined]
        {"name": "one", "workflow": "waiter", "max_running": 1}]}))
    key = key_of("one")
    h.start("waiter", "i0")
    h.start("waiter", "i1", {"n": 1})
    h.send("SetPriority", "i1", priority=2, reason="")
    h.signal("i0", "go")
    assert h.status("i1") == Status.RUNNING
    started = [("workflow", "waiter"), ("version", 1), ("input", {"n": 1}), ("parent_id", None), ("parent_ref", None)]
    assert recorded(h, "i1", *INPUT_EVENTS) == [
        ("WorkflowQueued", [*started, ("limits", [key]), ("priority", None)]),
        ("PriorityChanged", [("priority", 2), ("reason", "")]),
        ("PermitGranted", [("limit", key), ("ref", "start")]),
        ("WorkflowStarted", started),  # the admission records it, from its model too
    ]
    assert recorded(h, key, "PermitIssued", "PermitQueued", "PermitReleased") == [
        ("PermitIssued", [("holder", "i0"), ("ref", "start"), ("priority", 3)]),
        ("PermitQueued", [("holder", "i1"), ("ref", "start"), ("priority", 3)]),
        ("PermitQueued", [("holder", "i1"), ("ref", "start"), ("priority", 2)]),
        ("PermitReleased", [("holder", "i0"), ("ref", "start")]),
        ("PermitIssued", [("holder", "i1"), ("ref", "start"), ("priority", 2)]),
    ]
    assert_schema_order(h)


def test_a_refused_start_and_a_denied_permit_carry_the_same_data_as_before() -> None:
    h = harness(WAIT_WF)
    h.defs.quotas = LimitsView(parse_limits({"limits": [  # type: ignore[attr-defined]
        {"name": "one", "workflow": "waiter", "max_running": 1, "policy": "reject"}]}))
    key = key_of("one")
    h.start("waiter", "i0")
    h.start("waiter", "i1")
    assert h.status("i1") == Status.FAILED
    reason = "limit 'one' is full (1 of 1 in use)"
    assert recorded(h, "i1", "PermitRefused") == [
        ("PermitRefused", [("limit", key), ("ref", "start"), ("reason", reason)])]
    assert recorded(h, key, "PermitDenied") == [
        ("PermitDenied", [("holder", "i1"), ("ref", "start"), ("reason", reason)])]
    assert_schema_order(h)


def test_schedule_events_carry_the_same_data_as_before() -> None:
    h = harness(WAIT_WF)
    spec = ScheduleSpec.build("s", "waiter", every="1h")
    key = schedule_key("s")
    h.send("CreateSchedule", key, spec=spec.to_dict(), replace=False)
    h.send("PauseSchedule", key, note="maintenance")
    h.send("UnpauseSchedule", key, note="")
    h.send("TriggerSchedule", key, overlap=None)
    rid = run_id("s", NOW)
    h.signal(rid, "go")
    h.send("DeleteSchedule", key, reason="done")
    assert recorded(h, key, "ScheduleCreated", "SchedulePaused", "ScheduleUnpaused", "ScheduleFired",
                    "ScheduleRunClosed", "ScheduleDeleted") == [
        ("ScheduleCreated", [("spec", spec.to_dict()), ("replaced", False)]),
        ("SchedulePaused", [("note", "maintenance")]),
        ("ScheduleUnpaused", [("note", "")]),
        ("ScheduleFired", [("trigger", "manual"), ("outcome", {"started": [rid]})]),
        ("ScheduleRunClosed", [("run_id", rid), ("status", "COMPLETED")]),
        ("ScheduleDeleted", [("reason", "done")]),
    ]
    assert_schema_order(h)


def migrate(h: EngineHarness, iid: str, vars: dict[str, str]) -> None:
    h.send("MigrateWorkflow", iid, plan_id="p1", from_range="^1", to_version=version_code("2.0.0"),
           step_map={"approve": "approval"}, vars=vars, transform=None, reason="r", by="ops")


def test_migration_events_carry_the_same_data_as_before() -> None:
    h = harness(V1, V2)
    h.activity("prepare", lambda _: {"n": 1})
    h.activity("ship", lambda x: "shipped")
    h.auto_run_tasks = False
    h.start("order", "a", version="1.2.0")  # type: ignore[arg-type]
    h.start("order", "b", version="1.2.0")  # type: ignore[arg-type]
    migrate(h, "a", {"total": "prep.n * 10"})
    migrate(h, "b", {"total": "prep.nope * 10"})
    h.auto_run_tasks = True
    h.drain()  # prepare completes: a migrates at its safe point, b's transform fails there
    v1, v2 = version_code("1.2.0"), version_code("2.0.0")
    deferred = ("MigrationDeferred", [
        ("plan_id", "p1"), ("from_range", "^1"), ("to_version", v2), ("step_map", {"approve": "approval"}),
        ("vars", {"total": "prep.n * 10"}), ("transform", None), ("reason", "r"), ("by", "ops"),
        ("waiting_on", "activity 'prepare-2' is in flight")])
    assert recorded(h, "a", "MigrationDeferred", "WorkflowMigrated") == [
        deferred,
        ("WorkflowMigrated", [("from_version", v1), ("to_version", v2), ("plan_id", "p1"),
                              ("step_map", {"approve": "approval"}), ("vars", {"prep": {"n": 1}, "total": 10}),
                              ("reason", "r"), ("by", "ops")]),
    ]
    [rejected] = recorded(h, "b", "CommandRejected")
    assert rejected[1][:2] == [("command_type", "MigrateWorkflow"), ("code", "INVALID_INPUT")]
    assert rejected[1][2][0] == "reason" and rejected[1][2][1].startswith("plan 'p1' (deferred): variable")
    h.start("order", "c", version="1.2.0")  # type: ignore[arg-type]
    migrate(h, "c", {})  # at a safe point already: migrated at once
    assert recorded(h, "c", "WorkflowMigrated") == [
        ("WorkflowMigrated", [("from_version", v1), ("to_version", v2), ("plan_id", "p1"),
                              ("step_map", {"approve": "approval"}), ("vars", {"prep": {"n": 1}}),
                              ("reason", "r"), ("by", "ops")])]
    assert h.reprocess() == h.states
    assert_schema_order(h)


# -- evolve with the model handed in ------------------------------------------------------------------
def test_evolve_applies_a_model_it_is_handed_as_the_one_it_builds_from_the_event() -> None:
    d = InMemoryDefinitions()
    d.add(compile_spec(WAIT_WF))
    dec = decide(None, command(StartWorkflow(workflow="waiter", input={"n": 1}), "i1"), NOW, d)
    assert dec.state is not None
    model = SignalReceived(name="go", data=7, signal_id="c-1")
    ev: Event = event(model, "i1", seq=dec.state["seq"] + 1, ts=NOW + 1)
    built_state, built = evolve(dec.state, ev, d)
    handed_state, handed = evolve(dec.state, ev, d, model=model)
    assert handed_state == built_state and handed_state["result"] == {"g": 7}
    assert [(e.type, e.seq, e.data) for e in handed.events] == [(e.type, e.seq, e.data) for e in built.events]
