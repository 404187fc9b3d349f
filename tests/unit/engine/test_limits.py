"""Quotas and activity limits through the pure engine with a manual clock: grants, priority-then-FIFO
admission, reject, release on every way work ends, token buckets, burst, priority changes, and
limit files that do not validate."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kflow.engine.limits import ADMISSION, PERMITS, LimitSpecError, LimitsView, key_of, limit_view, parse_limits
from kflow.testing.harness import EngineHarness, ManualClock

WAIT = {"name": "job", "version": 1, "steps": [{"id": "w", "wait": {"signal": "done"}}]}
CALL = {"name": "call", "version": 1, "steps": [{"id": "erp", "task": "erp.post", "input": "input"}]}
RETRY = {"name": "flaky", "version": 1,
         "steps": [{"id": "a", "task": "flaky", "retry": {"max_attempts": 3, "initial": "1s", "jitter": 0}}]}


def harness(limits: list[dict[str, Any]], *docs: dict[str, Any]) -> EngineHarness:
    h = EngineHarness(ManualClock())
    for doc in docs or (WAIT, CALL):
        h.deploy(doc)
    h.defs.quotas = LimitsView(parse_limits({"limits": limits}))  # type: ignore[attr-defined]
    return h


def counter(h: EngineHarness, key: str) -> dict[str, Any]:
    return limit_view(h.states[key])


def statuses(h: EngineHarness, ids: list[str]) -> list[str]:
    return [h.status(i) for i in ids]


def instances(h: EngineHarness) -> dict[str, Any]:
    return {k: v for k, v in h.states.items() if not k.startswith("limit:")}


def check_replay(h: EngineHarness) -> None:
    """Folding every instance's history reproduces its state (admission is deterministic)."""
    from kflow.engine import fold
    for iid, st in instances(h).items():
        assert fold(h.history[iid], h.defs) == st, iid


# -- quotas on starts -----------------------------------------------------------------------------
def test_quota_of_two_runs_two_and_queues_the_rest_admitting_fifo_as_runs_close() -> None:
    h = harness([{"name": "per-tenant", "tenant": "*", "max_running": 2}])
    ids = [f"i{n}" for n in range(6)]
    for i in ids:
        h.start("job", i)
    assert statuses(h, ids) == ["RUNNING"] * 2 + ["QUEUED"] * 4
    key = key_of("per-tenant", "default")
    assert counter(h, key)["in_use"] == 2 and counter(h, key)["queued"] == 4
    assert h.events("i2") == ["WorkflowQueued"]
    h.signal("i1", "done")
    assert h.status("i1") == "COMPLETED"
    assert statuses(h, ids[2:]) == ["RUNNING", "QUEUED", "QUEUED", "QUEUED"]
    assert h.events("i2") == ["WorkflowQueued", "PermitGranted", "WorkflowStarted"]
    for i in ids:
        if h.status(i) == "RUNNING":
            h.signal(i, "done")
    for i in ids:  # each close admits exactly one more
        if h.status(i) == "RUNNING":
            h.signal(i, "done")
    assert statuses(h, ids) == ["COMPLETED"] * 6
    assert counter(h, key)["in_use"] == 0 and counter(h, key)["queued"] == 0
    assert all(ADMISSION not in st for st in instances(h).values())
    check_replay(h)


def test_never_more_than_the_quota_run_at_once() -> None:
    h = harness([{"name": "q", "workflow": "job", "max_running": 3}])
    ids = [f"i{n}" for n in range(20)]
    for i in ids:
        h.start("job", i)
    seen_max = 0
    while any(h.status(i) != "COMPLETED" for i in ids):
        running = [i for i in ids if h.status(i) == "RUNNING"]
        seen_max = max(seen_max, len(running))
        h.signal(running[0], "done")
    assert seen_max == 3


def test_admission_is_priority_then_fifo() -> None:
    h = harness([{"name": "q", "workflow": "job", "max_running": 1}])
    h.start("job", "first")
    for i, level in (("low1", 4), ("norm1", 3), ("crit1", 1), ("norm2", 3), ("crit2", 1)):
        h.send("StartWorkflow", i, workflow="job", version=None, input=None, priority=level)
    order = []
    current = "first"
    for _ in range(5):
        h.signal(current, "done")
        current = next(i for i, st in instances(h).items() if st["status"] == "RUNNING")
        order.append(current)
    assert order == ["crit1", "crit2", "norm1", "norm2", "low1"]


def test_reject_policy_fails_the_excess_start_at_once_and_tells_the_parent() -> None:
    h = harness([{"name": "q", "workflow": "job", "max_running": 1, "policy": "reject"}])
    h.start("job", "a")
    h.start("job", "b")
    assert h.status("a") == "RUNNING"
    assert h.status("b") == "FAILED"
    assert h.states["b"]["error"]["type"] == "QuotaExceeded"
    assert "1 of 1 in use" in h.states["b"]["error"]["message"]
    assert counter(h, key_of("q"))["refused"] == 1
    h.signal("a", "done")
    h.start("job", "c")  # the slot is free again
    assert h.status("c") == "RUNNING"


def test_tenant_and_workflow_quotas_both_apply_and_count_per_tenant() -> None:
    h = harness([{"name": "tenants", "tenant": "*", "max_running": 1},
                 {"name": "jobs", "workflow": "job", "max_running": 5}])
    for i, tenant in (("a1", "acme"), ("a2", "acme"), ("b1", "beta")):
        h.send("StartWorkflow", i, workflow="job", version=None, input=None, tenant=tenant)
    assert statuses(h, ["a1", "a2", "b1"]) == ["RUNNING", "QUEUED", "RUNNING"]
    assert counter(h, key_of("tenants", "acme"))["in_use"] == 1
    assert counter(h, key_of("tenants", "beta"))["in_use"] == 1
    # permits are asked in key order: a2 holds its 'jobs' permit while it waits for its tenant's
    assert counter(h, key_of("jobs"))["in_use"] == 3
    h.signal("a1", "done")
    assert h.status("a2") == "RUNNING"
    assert counter(h, key_of("jobs"))["in_use"] == 2


def test_cancel_or_terminate_a_queued_start_withdraws_its_request() -> None:
    h = harness([{"name": "q", "workflow": "job", "max_running": 1}])
    for i in ("a", "b", "c"):
        h.start("job", i)
    h.send("CancelWorkflow", "b", reason="not needed")
    h.send("TerminateWorkflow", "c", reason="gone")
    assert statuses(h, ["b", "c"]) == ["CANCELLED", "TERMINATED"]
    assert counter(h, key_of("q"))["queued"] == 0
    h.signal("a", "done")
    assert counter(h, key_of("q"))["in_use"] == 0


def test_a_limit_removed_while_starts_wait_admits_them_on_the_next_release() -> None:
    h = harness([{"name": "q", "workflow": "job", "max_running": 1}])
    for i in ("a", "b", "c"):
        h.start("job", i)
    h.defs.quotas = LimitsView(parse_limits({"limits": [{"name": "q", "workflow": "job", "max_running": 5}]}))  # type: ignore[attr-defined]
    h.signal("a", "done")
    assert statuses(h, ["b", "c"]) == ["RUNNING", "RUNNING"]


# -- activity limits ------------------------------------------------------------------------------
def test_activity_limit_holds_tasks_and_dispatches_as_attempts_end() -> None:
    h = harness([{"name": "erp", "activity": "erp.post", "max_in_flight": 2}])
    h.auto_run_tasks = False
    for n in range(5):
        h.start("call", f"c{n}", {"plant": "p1"})
    assert len(h.pending_tasks) == 2
    assert counter(h, key_of("erp"))["queued"] == 3
    held = [i for i in ("c2", "c3", "c4")]
    assert all(h.states[i][PERMITS] for i in held)
    assert all(act.get("waiting_permit") for i in held for act in h.states[i]["activities"].values())
    while h.pending_tasks:
        assert len(h.pending_tasks) <= 2
        h.activity("erp.post", lambda x: "ok")
        h.run_task(h.pending_tasks.popleft())
        h.drain()
    assert statuses(h, [f"c{n}" for n in range(5)]) == ["COMPLETED"] * 5
    assert counter(h, key_of("erp"))["in_use"] == 0 and counter(h, key_of("erp"))["granted"] == 5
    check_replay(h)


def test_activity_limit_per_key_counts_each_plant_on_its_own() -> None:
    h = harness([{"name": "erp", "activity": "erp.post", "max_in_flight": 1, "per": "plant"}])
    h.auto_run_tasks = False
    for n, plant in enumerate(["p1", "p1", "p2", "p2", "p3"]):
        h.start("call", f"c{n}", {"plant": plant})
    assert sorted(t.instance_id for t in h.pending_tasks) == ["c0", "c2", "c4"]
    assert counter(h, key_of("erp", "p1"))["queued"] == 1


def test_a_failed_attempt_frees_its_permit_during_backoff_and_asks_again_for_the_retry() -> None:
    h = harness([{"name": "f", "activity": "flaky", "max_in_flight": 1}], RETRY, WAIT)
    h.auto_run_tasks = False
    h.start("flaky", "x")
    h.start("flaky", "y")
    assert [t.instance_id for t in h.pending_tasks] == ["x"]
    h.activity("flaky", lambda _: (_ for _ in ()).throw(RuntimeError("boom")))
    h.run_task(h.pending_tasks.popleft())
    h.drain()
    assert [t.instance_id for t in h.pending_tasks] == ["y"]  # x backs off without its permit
    h.clock.advance(5)
    h.advance(0)
    assert counter(h, key_of("f"))["queued"] == 1  # x's retry waits for y's attempt
    h.activity("flaky", lambda _: "ok")
    h.run_task(h.pending_tasks.popleft())
    h.drain()
    assert [(t.instance_id, t.attempt) for t in h.pending_tasks] == [("x", 2)]


def test_a_held_task_arms_its_start_to_close_timer_only_when_dispatched() -> None:
    timed = {"name": "timed", "version": 1,
             "steps": [{"id": "a", "task": "slow", "timeout": {"start_to_close": "10s"}}]}
    h = harness([{"name": "s", "activity": "slow", "max_in_flight": 1}], timed)
    h.auto_run_tasks = False
    h.start("timed", "a")
    h.start("timed", "b")
    assert any(t["purpose"] == "activity_timeout" for t in h.states["a"]["timers"].values())
    assert not h.states["b"]["timers"]
    h.activity("slow", lambda _: 1)
    h.run_task(h.pending_tasks.popleft())
    h.drain()
    assert any(t["purpose"] == "activity_timeout" for t in h.states["b"]["timers"].values())


def test_closing_an_instance_releases_its_held_and_queued_permits() -> None:
    h = harness([{"name": "erp", "activity": "erp.post", "max_in_flight": 1}])
    h.auto_run_tasks = False
    h.start("call", "a", {})
    h.start("call", "b", {})
    h.send("TerminateWorkflow", "b", reason="x")  # queued request withdrawn
    h.send("TerminateWorkflow", "a", reason="x")  # held permit freed
    c = counter(h, key_of("erp"))
    assert (c["in_use"], c["queued"]) == (0, 0)


# -- rates ----------------------------------------------------------------------------------------
def test_token_bucket_grants_a_burst_then_one_per_refill_with_a_durable_timer() -> None:
    h = harness([{"name": "r", "activity": "erp.post", "rate": "2/s", "burst_size": 2}])
    h.auto_run_tasks = False
    for n in range(5):
        h.start("call", f"c{n}", {})
    assert len(h.pending_tasks) == 2
    timers = h.states[key_of("r")]["timers"]
    assert [t["due"] - h.clock.ms for t in timers.values()] == [500]
    h.advance(0.5)
    assert len(h.pending_tasks) == 3
    h.advance(0.5)
    h.advance(0.5)
    assert len(h.pending_tasks) == 5
    assert not h.states[key_of("r")]["timers"]


def test_starts_per_second_queue_the_excess_and_admit_on_refill() -> None:
    h = harness([{"name": "sps", "tenant": "*", "starts_per_second": 1}])
    for n in range(3):
        h.start("job", f"s{n}")
    assert statuses(h, ["s0", "s1", "s2"]) == ["RUNNING", "QUEUED", "QUEUED"]
    h.advance(1)
    assert statuses(h, ["s0", "s1", "s2"]) == ["RUNNING", "RUNNING", "QUEUED"]
    h.advance(1)
    assert h.status("s2") == "RUNNING"
    h.signal("s0", "done")  # a rate holds nothing: the close releases nothing and nothing breaks
    assert counter(h, key_of("sps", "default"))["in_use"] == 0


# -- burst ----------------------------------------------------------------------------------------
def test_burst_admits_beyond_the_limit_for_its_duration_then_queues() -> None:
    h = harness([{"name": "b", "workflow": "job", "max_running": 2, "policy": "burst(2, 1m)"}])
    for n in range(3):
        h.start("job", f"a{n}")
    assert statuses(h, ["a0", "a1", "a2"]) == ["RUNNING"] * 3  # bursting since now
    h.clock.advance(61)
    h.start("job", "late")
    assert h.status("late") == "QUEUED"  # the burst lasted its minute
    h.signal("a0", "done")
    h.signal("a1", "done")  # back to the limit: the burst is over, late is admitted within it
    assert h.status("late") == "RUNNING"
    h.start("job", "next")
    assert h.status("next") == "RUNNING"  # a new burst may begin
    for n in range(3):
        h.start("job", f"z{n}")
    assert [h.status(f"z{n}") for n in range(3)] == ["RUNNING", "QUEUED", "QUEUED"]  # at most 2 x 2


# -- priority changes -------------------------------------------------------------------------------
def test_set_priority_records_the_change_and_moves_a_queued_start_ahead() -> None:
    h = harness([{"name": "q", "workflow": "job", "max_running": 1}])
    for i in ("a", "b", "c"):
        h.start("job", i)
    h.send("SetPriority", "c", priority=1, reason="urgent")
    assert h.events("c")[-1] == "PriorityChanged"
    assert h.states["c"]["priority"] == 1
    h.signal("a", "done")
    assert statuses(h, ["b", "c"]) == ["QUEUED", "RUNNING"]
    check_replay(h)


def test_set_priority_rejects_unknown_levels_and_closed_instances() -> None:
    h = harness([], WAIT)
    h.start("job", "a")
    h.send("SetPriority", "a", priority=9, reason="")
    assert h.history["a"][-1].data["code"] == "INVALID_INPUT"
    assert "1 (critical) to 5 (background)" in h.history["a"][-1].data["reason"]
    h.signal("a", "done")
    h.send("SetPriority", "a", priority=2, reason="")
    assert h.history["a"][-1].data["code"] == "INVALID_STATE"


def test_a_retry_after_a_priority_change_is_dispatched_at_the_new_level() -> None:
    h = harness([], RETRY)
    h.auto_run_tasks = False
    h.start("flaky", "x")
    h.activity("flaky", lambda _: (_ for _ in ()).throw(RuntimeError("boom")))
    h.run_task(h.pending_tasks.popleft())
    h.drain()
    h.send("SetPriority", "x", priority=5, reason="")
    h.advance(5)
    assert [(t.attempt, t.priority) for t in h.pending_tasks] == [(2, 5)]


def test_no_limits_declared_changes_nothing() -> None:
    h = harness([])
    h.start("job", "a")
    assert h.events("a") == ["WorkflowStarted"]
    assert not any(k.startswith("limit:") for k in h.states)


# -- bad limit files --------------------------------------------------------------------------------
@pytest.mark.parametrize("doc, fragment", [
    ({"limits": [{"name": "x", "activity": "a", "max_in_flight": -1}]}, "non-negative"),
    ({"limits": [{"name": "x", "activity": "a", "max_in_flight": 2.5}]}, "whole number"),
    ({"limits": [{"name": "x", "activity": "a"}]}, "expected max_in_flight or rate"),
    ({"limits": [{"name": "x", "activity": "a", "workflow": "w", "max_in_flight": 1}]}, "exactly one of"),
    ({"limits": [{"name": "x", "tenant": "*", "max_running": 1, "policy": "drop"}]}, "expected queue, reject or burst"),
    ({"limits": [{"name": "x", "tenant": "*", "max_running": 1, "policy": "burst(0.5, 1m)"}]}, "above 1"),
    ({"limits": [{"name": "x", "activity": "a", "rate": "10 per second"}]}, "10/s"),
    ({"limits": [{"name": "x", "activity": "a", "max_in_flight": 1, "policy": "reject"}]}, "reject is for starts"),
    ({"limits": [{"name": "x", "tenant": "*", "max_running": 1}, {"name": "x", "tenant": "*", "max_running": 2}]},
     "declared twice"),
    ({"limits": [{"name": "x", "tenant": "*", "max_runing": 1}]}, "unknown field(s) max_runing"),
    ({"limitz": []}, "unknown top-level key"),
    ({"limits": {"name": "x"}}, "expected a list"),
])
def test_bad_limit_files_are_one_clear_error(doc: Any, fragment: str) -> None:
    with pytest.raises(LimitSpecError) as e:
        parse_limits(doc, "limits.yaml")
    assert fragment in str(e.value)
    assert str(e.value).startswith("invalid limits in limits.yaml: ")


def test_every_problem_of_a_file_is_reported_at_once() -> None:
    doc = yaml.safe_load("""
limits:
  - {name: a, activity: erp.post, max_in_flight: -5}
  - {name: b, tenant: "*", max_running: 0}
""")
    with pytest.raises(LimitSpecError) as e:
        parse_limits(doc)
    assert len(e.value.problems) == 2


def test_a_valid_file_parses_every_form() -> None:
    specs = parse_limits(yaml.safe_load("""
limits:
  - {name: erp, activity: erp.post, per: plant, max_in_flight: 5, rate: 10/s}
  - {name: tenants, tenant: "*", max_running: 100, policy: reject}
  - {name: orders, workflow: order, per: tenant, max_running: 50, policy: {burst: {factor: 1.5, max_duration: 5m}}}
  - {name: starts, tenant: acme, starts_per_second: 600/m}
"""))
    by = {s.name: s for s in specs}
    assert (by["erp"].max_concurrent, by["erp"].rate, by["erp"].per) == (5, 10.0, "plant")
    assert (by["orders"].policy, by["orders"].burst_factor, by["orders"].burst_ms) == ("burst", 1.5, 300_000)
    assert by["starts"].rate == 10.0 and by["starts"].capacity == 10.0


# -- code workflows ---------------------------------------------------------------------------------
def test_code_workflows_are_queued_admitted_and_limited_and_replay_identically() -> None:
    import kflow
    import kflow.authoring

    @kflow.workflow(name="lim.code", version=1)
    async def calls(ctx, input):
        a = await ctx.activity("erp.post", input)
        b = await ctx.activity("erp.post", a + 1)
        return b

    h = EngineHarness(ManualClock())
    h.defs.add(kflow.authoring.definition_of(calls))
    h.defs.quotas = LimitsView(parse_limits({"limits": [  # type: ignore[attr-defined]
        {"name": "runs", "workflow": "lim.code", "max_running": 2},
        {"name": "erp", "activity": "erp.post", "max_in_flight": 1}]}))
    h.auto_run_tasks = False
    for n in range(4):
        h.start("lim.code", f"k{n}", n * 10)
    assert [h.status(f"k{n}") for n in range(4)] == ["RUNNING", "RUNNING", "QUEUED", "QUEUED"]
    assert len(h.pending_tasks) == 1
    h.activity("erp.post", lambda x: x + 1)
    peak = 0
    while h.pending_tasks:
        peak = max(peak, len(h.pending_tasks))
        h.run_task(h.pending_tasks.popleft())
        h.replay_cache.clear()  # every step rebuilt from the journal, as after a restart
        h.drain()
    assert peak == 1
    assert [h.result(f"k{n}") for n in range(4)] == [n * 10 + 3 for n in range(4)]
    assert counter(h, key_of("runs"))["in_use"] == 0 and counter(h, key_of("erp"))["in_use"] == 0


def test_ctx_set_priority_changes_the_level_of_the_work_that_follows_and_replays() -> None:
    import kflow
    import kflow.authoring

    @kflow.workflow(name="lim.reprioritise", version=1)
    async def reprioritise(ctx, input):
        a = await ctx.activity("erp.post", input)
        ctx.set_priority("background", reason="the rest can wait")
        return await ctx.activity("erp.post", a + 1)

    h = EngineHarness(ManualClock())
    h.defs.add(kflow.authoring.definition_of(reprioritise))
    h.auto_run_tasks = False
    h.start("lim.reprioritise", "r", 1)
    h.activity("erp.post", lambda x: x + 1)
    first = h.pending_tasks.popleft()
    assert first.priority in (None, 3)
    h.run_task(first)
    h.drain()
    assert "PriorityChanged" in h.events("r") and h.states["r"]["priority"] == 5
    second = h.pending_tasks.popleft()
    assert second.priority == 5  # dispatched after the change: the new level
    h.replay_cache.clear()  # the next step rebuilt from the journal: set_priority is not sent again
    h.run_task(second)
    h.drain()
    assert h.result("r") == 4  # (1 + 1) + 1 + 1
    assert h.events("r").count("PriorityChanged") == 1
    check_replay(h)
    with pytest.raises(ValueError, match="unknown priority|expected"):
        kflow.model.messages.priority_level("urgent")


# -- signals to a queued start ------------------------------------------------------------------
def test_a_queued_start_keeps_its_signals_and_gets_them_once_admitted() -> None:
    h = harness([{"name": "q", "workflow": "job", "max_running": 1}])
    h.start("job", "a")
    h.start("job", "b")
    assert statuses(h, ["a", "b"]) == ["RUNNING", "QUEUED"]
    h.signal("b", "done", {"n": 1})  # b waits for a permit: the signal is recorded, not refused
    assert h.status("b") == "QUEUED"
    assert [e.type for e in h.history["b"]][-1] == "SignalReceived"
    h.signal("a", "done")  # a closes: b is admitted, and its wait finds the signal it got while queued
    assert statuses(h, ["a", "b"]) == ["COMPLETED", "COMPLETED"]
    types = [e.type for e in h.history["b"]]
    assert types.index("SignalReceived") < types.index("WorkflowStarted")
    assert "queued_signals" not in h.states["b"]
    check_replay(h)


def test_the_signals_of_a_queued_start_that_is_cancelled_are_dropped() -> None:
    h = harness([{"name": "q", "workflow": "job", "max_running": 1}])
    h.start("job", "a")
    h.start("job", "b")
    h.signal("b", "done")
    h.send("CancelWorkflow", "b", reason="not needed")
    assert h.status("b") == "CANCELLED"
    assert "queued_signals" not in h.states["b"]
    h.signal("a", "done")
    assert counter(h, key_of("q"))["in_use"] == 0
    check_replay(h)
