"""Migrations of code workflows, and migrations deferred while work is in flight, on the pure engine.

A code instance moves to another registered version of its code only when that code replays its
journal exactly (a ``ctx.patched()`` branch); otherwise the command is rejected with the first
divergence and the instance runs on. A ``MigrateWorkflow`` that meets an activity in flight is
recorded (``MigrationDeferred``) and applied, or rejected, in the decision that records the
activity's result, before anything else is dispatched. Every case is checked against the fold.
"""

from __future__ import annotations

from typing import Any

import pytest

from kflow._migration import MigrationPlanError, check_plan, load_plan
from kflow.engine import CodeDefinition, compile_spec
from kflow.engine.migration import what_if
from kflow.model.messages import RejectCode
from kflow.testing.harness import EngineHarness


# -- code workflows ------------------------------------------------------------------------------
async def v1(ctx, input):
    a = await ctx.activity("reserve", input)
    await ctx.sleep(10)
    return await ctx.activity("charge", a)


async def v2_patched(ctx, input):
    a = await ctx.activity("reserve", input)
    await ctx.sleep(10)
    if ctx.patched("audit"):
        a = await ctx.activity("audit", a)
    return await ctx.activity("charge", a)


async def v3_renamed(ctx, input):
    a = await ctx.activity("reserve_stock", input)
    await ctx.sleep(10)
    return await ctx.activity("charge", a)


def code_harness() -> EngineHarness:
    h = EngineHarness()
    for version, fn in ((1, v1), (2, v2_patched), (3, v3_renamed)):
        h.defs.add(CodeDefinition(name="cm", version=version, fn=fn))
    for name in ("reserve", "reserve_stock", "charge", "audit"):
        h.activity(name, lambda x, name=name: f"{x}>{name}")
    return h


def migrate(h: EngineHarness, iid: str, to: int, frm: str = "1", **plan: Any) -> None:
    h.send("MigrateWorkflow", iid, plan_id="p1", from_range=frm, to_version=to, step_map=plan.get("step_map") or {},
           vars=plan.get("vars") or {}, transform=plan.get("transform"), reason="", by="ops")


def last(h: EngineHarness, iid: str, type_: str) -> dict[str, Any]:
    found = [e.data for e in h.history[iid] if e.type == type_]
    assert found, h.events(iid)
    return found[-1]


def scheduled(h: EngineHarness, iid: str) -> list[str]:
    return [e.data["name"] for e in h.history[iid] if e.type == "ActivityScheduled"]


def test_a_code_instance_moves_to_a_version_that_replays_its_history_and_runs_the_new_code() -> None:
    h = code_harness()
    h.start("cm", "i1", "o", version=1)  # reserve done, sleeping
    migrate(h, "i1", 2)
    ev = h.history["i1"][-1]
    assert ev.type == "WorkflowMigrated"
    assert (ev.data["from_version"], ev.data["to_version"], ev.data["plan_id"]) == (1, 2, "p1")
    assert h.states["i1"]["version"] == 2
    h.advance(10)  # the sleep ends on the new code: the patched branch is taken from here on
    assert h.result("i1") == "o>reserve>audit>charge"
    assert scheduled(h, "i1") == ["reserve", "audit", "charge"]
    assert h.reprocess() == h.states


def test_the_new_code_is_used_after_a_restart_too() -> None:
    h = code_harness()
    h.start("cm", "i1", "o", version=1)
    migrate(h, "i1", 2)
    h.replay_cache.clear()  # no live machine: the next input rebuilds the instance by replay, on version 2
    h.advance(10)
    assert h.result("i1") == "o>reserve>audit>charge"
    assert h.reprocess() == h.states


def test_a_version_that_does_not_replay_the_history_is_rejected_with_the_divergence() -> None:
    h = code_harness()
    h.start("cm", "i1", "o", version=1)
    before = dict(h.states["i1"])
    migrate(h, "i1", 3)
    data = last(h, "i1", "CommandRejected")
    assert data["code"] == RejectCode.INVALID_STATE
    assert ("diverges at command #0: the history has activity 'reserve', the new code issues activity "
            "'reserve_stock'") in data["reason"]
    assert "stays on 1" in data["reason"]
    assert {k: v for k, v in h.states["i1"].items() if k not in ("seq", "updated_ms")} == \
        {k: v for k, v in before.items() if k not in ("seq", "updated_ms")}
    h.advance(10)
    assert h.result("i1") == "o>reserve>charge" and h.states["i1"]["version"] == 1
    assert h.reprocess() == h.states


def test_a_code_plan_with_a_step_map_or_variables_is_rejected() -> None:
    h = code_harness()
    h.start("cm", "i1", "o", version=1)
    migrate(h, "i1", 2, vars={"x": "1"})
    data = last(h, "i1", "CommandRejected")
    assert data["code"] == RejectCode.INVALID_INPUT and "no step_map, vars or Python transform" in data["reason"]
    migrate(h, "i1", 9)
    assert "cm@9 to be registered as a code workflow" in last(h, "i1", "CommandRejected")["reason"]
    assert h.states["i1"]["version"] == 1 and "WorkflowMigrated" not in h.events("i1")
    with pytest.raises(MigrationPlanError, match="a code workflow moves by replay"):
        check_plan(load_plan({"id": "p", "workflow": "cm", "from": "1", "to": 2, "step_map": {"a": "b"}}),
                   {1: None, 2: None})
    assert check_plan(load_plan({"id": "p", "workflow": "cm", "from": "1", "to": 2}), {1: None, 2: None}) == []


def test_a_deferred_code_migration_is_applied_when_the_activity_completes() -> None:
    h = code_harness()
    h.auto_run_tasks = False
    h.start("cm", "i1", "o", version=1)  # reserve in flight
    migrate(h, "i1", 2)
    assert h.events("i1")[-1] == "MigrationDeferred"
    assert h.states["i1"]["pending_migration"]["to_version"] == 2 and h.states["i1"]["version"] == 1
    h.auto_run_tasks = True
    h.drain()
    assert h.events("i1")[-3:] == ["ActivityCompleted", "WorkflowMigrated", "TimerStarted"]
    assert h.states["i1"]["version"] == 2 and "pending_migration" not in h.states["i1"]
    h.advance(10)
    assert h.result("i1") == "o>reserve>audit>charge"
    assert h.reprocess() == h.states


def test_a_deferred_code_migration_that_no_longer_replays_is_rejected_at_the_safe_point() -> None:
    h = code_harness()
    h.auto_run_tasks = False
    h.start("cm", "i1", "o", version=1)
    migrate(h, "i1", 3)
    assert h.events("i1")[-1] == "MigrationDeferred"
    h.auto_run_tasks = True
    h.drain()
    assert h.events("i1")[-3:] == ["ActivityCompleted", "CommandRejected", "TimerStarted"]
    data = last(h, "i1", "CommandRejected")
    assert data["command_type"] == "MigrateWorkflow" and "plan 'p1' (deferred)" in data["reason"]
    assert "diverges at command #0" in data["reason"]
    assert h.states["i1"]["version"] == 1 and "pending_migration" not in h.states["i1"]
    h.advance(10)
    assert h.result("i1") == "o>reserve>charge"
    assert h.reprocess() == h.states


def test_what_if_of_a_code_history_reports_compatible_or_the_first_divergence() -> None:
    h = code_harness()
    h.start("cm", "i1", "o", version=1)
    events = h.history["i1"]
    assert what_if(events, h.defs, 2).compatible
    report = what_if(events, h.defs, 3)
    assert not report.compatible and report.divergence is not None
    assert report.divergence.text() == ("command #0: the history has activity 'reserve', but the target issues "
                                        "activity 'reserve_stock'")
    h.advance(10)
    assert what_if(h.history["i1"], h.defs, 2).problems == ["the instance is closed (WorkflowCompleted)"]


# -- spec workflows: deferral --------------------------------------------------------------------
A = {"name": "pipe", "version": 1, "steps": [
    {"id": "fetch", "task": "fetch", "output": "f"},
    {"id": "store", "task": "store_v1"},
]}
B = {"name": "pipe", "version": 2, "steps": [
    {"id": "fetch", "task": "fetch", "output": "f"},
    {"id": "store", "task": "store_v2", "input": "size"},
]}
#: v3 has no step 'store': an instance between fetch and store has no place in it without a step_map.
C = {"name": "pipe", "version": 3, "steps": [
    {"id": "fetch", "task": "fetch", "output": "f"},
    {"id": "save", "task": "store_v2"},
]}


def spec_harness() -> EngineHarness:
    h = EngineHarness()
    for doc in (A, B, C):
        h.defs.add(compile_spec(doc))
    h.activity("fetch", lambda x: {"n": 4})
    h.activity("store_v1", lambda x: "v1")
    h.activity("store_v2", lambda x: f"v2:{x}")
    h.auto_run_tasks = False
    h.start("pipe", "p", {"items": [1, 2]}, version=1)
    return h


def run_one(h: EngineHarness) -> None:
    h.run_task(h.pending_tasks.popleft())
    h.drain()


def test_the_migration_goes_between_the_result_and_the_next_dispatch() -> None:
    h = spec_harness()
    migrate(h, "p", 2, vars={"size": "f.n * 2"})
    assert h.events("p")[-1] == "MigrationDeferred"
    run_one(h)  # fetch completes
    assert h.events("p")[-3:] == ["ActivityCompleted", "WorkflowMigrated", "ActivityScheduled"]
    assert scheduled(h, "p") == ["fetch", "store_v2"]  # nothing was dispatched on version 1 after fetch
    assert last(h, "p", "WorkflowMigrated")["vars"] == {"f": {"n": 4}, "size": 8}
    run_one(h)
    assert h.status("p") == "COMPLETED" and h.states["p"]["version"] == 2
    assert h.reprocess() == h.states


@pytest.mark.parametrize(("plan", "reason"), [
    ({}, "positions without a mapping to 3: store (add them to step_map)"),
    ({"step_map": {"store": "save"}, "vars": {"size": "f.missing + 1"}}, "variable transform failed"),
])
def test_a_deferred_migration_that_no_longer_fits_is_rejected_at_the_safe_point(plan: Any, reason: str) -> None:
    h = spec_harness()
    migrate(h, "p", 3, **plan)
    assert h.events("p")[-1] == "MigrationDeferred"
    run_one(h)
    assert h.events("p")[-3:] == ["ActivityCompleted", "CommandRejected", "ActivityScheduled"]
    data = last(h, "p", "CommandRejected")
    assert data["code"] == RejectCode.INVALID_INPUT and reason in data["reason"]
    assert scheduled(h, "p") == ["fetch", "store_v1"] and h.states["p"]["version"] == 1
    assert "pending_migration" not in h.states["p"]
    run_one(h)
    assert h.result("p")["f"] == {"n": 4} and h.states["p"]["version"] == 1
    assert h.reprocess() == h.states


def test_a_second_migration_replaces_the_pending_one() -> None:
    h = spec_harness()
    migrate(h, "p", 3, step_map={"store": "save"})
    migrate(h, "p", 2, vars={"size": "1"})
    assert h.events("p")[-2:] == ["MigrationDeferred", "MigrationDeferred"]
    assert h.states["p"]["pending_migration"]["to_version"] == 2
    run_one(h)
    assert last(h, "p", "WorkflowMigrated")["to_version"] == 2 and h.states["p"]["version"] == 2
    assert h.reprocess() == h.states


@pytest.mark.parametrize("how", ["CancelWorkflow", "TerminateWorkflow"])
def test_cancel_or_terminate_drops_the_pending_migration(how: str) -> None:
    h = spec_harness()
    migrate(h, "p", 2)
    h.send(how, "p", reason="stop")
    assert "pending_migration" not in h.states["p"]
    assert "WorkflowMigrated" not in h.events("p")
    assert h.reprocess() == h.states


def test_a_failed_activity_that_closes_the_instance_drops_the_pending_migration() -> None:
    h = spec_harness()
    migrate(h, "p", 2)
    task = h.pending_tasks.popleft()
    h.send("FailActivity", "p", activity_id=task.activity_id, attempt=task.attempt, error_type="Boom",
           message="no", retryable=False)
    assert h.status("p") == "FAILED" and "pending_migration" not in h.states["p"]
    assert "WorkflowMigrated" not in h.events("p") and h.reprocess() == h.states
