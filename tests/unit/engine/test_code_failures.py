"""Code workflows' failure model through the pure engine: retries, timeouts, cancellation, sagas,
continue-as-new, the history limit, class-style workflows and conditions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import kflow
from kflow.engine import NondeterminismError
from kflow.engine.activity import DEFAULT_LIMITS, Limits
from kflow.model.errors import ActivityError
from kflow.testing.harness import EngineHarness
from tests.unit.engine.test_code_replayer import CACHE_SIZE, harness


@pytest.fixture(autouse=True, params=["cached", "replayed"])
def cache_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs with live machines cached and with every input replayed from history."""
    CACHE_SIZE[0] = 10_000 if request.param == "cached" else 0
    yield request.param
    CACHE_SIZE[0] = 10_000


def events(h: EngineHarness, iid: str, type_: str) -> list[dict[str, Any]]:
    return [e.data for e in h.history[iid] if e.type == type_]


def replays(h: EngineHarness) -> None:
    assert h.reprocess() == h.states


class Flaky:
    """An activity that fails its first ``n`` calls with ``error``."""

    def __init__(self, n: int, error: type[Exception] = RuntimeError) -> None:
        self.n, self.error, self.calls = n, error, 0

    def __call__(self, x: Any) -> Any:
        self.calls += 1
        if self.calls <= self.n:
            raise self.error(f"failure {self.calls}")
        return {"ok": x, "calls": self.calls}


class CardDeclined(Exception):
    pass


# -- retries and timeouts ------------------------------------------------------------------------
@kflow.workflow(name="cf.retry", version=1)
async def retrying(ctx, input):
    return await ctx.activity("flaky", input, retry={"initial": "1s", "backoff": 2.0, "max_attempts": 4})


def test_retry_policy_on_ctx_activity_uses_durable_backoff_timers() -> None:
    flaky = Flaky(2)
    h = harness(retrying, flaky=flaky)
    h.start("cf.retry", "i1", 7)
    assert h.status("i1") == "RUNNING" and flaky.calls == 1
    h.advance(1)  # first backoff: 1s
    assert flaky.calls == 2 and h.status("i1") == "RUNNING"
    h.advance(1.5)  # second backoff is 2s: not yet
    assert flaky.calls == 2
    h.advance(0.5)
    assert h.status("i1") == "COMPLETED" and h.result("i1") == {"ok": 7, "calls": 3}
    assert [e["attempt"] for e in events(h, "i1", "ActivityScheduled")] == [1, 2, 3]
    assert [e["attempt"] for e in events(h, "i1", "ActivityFailed")] == [1, 2]
    replays(h)


@kflow.workflow(name="cf.giveup", version=1)
async def giving_up(ctx, input):
    try:
        await ctx.activity("charge", input, retry={"initial": 1, "max_attempts": 5, "non_retryable": ["CardDeclined"]})
    except ActivityError as e:
        return {"type": e.type, "attempt": e.attempt, "activity": e.activity, "message": e.message}


def test_non_retryable_error_type_fails_at_once_with_activity_error_fields() -> None:
    charge = Flaky(10, CardDeclined)
    h = harness(giving_up, charge=charge)
    h.start("cf.giveup", "i1", 1)
    assert charge.calls == 1
    assert h.result("i1") == {"type": "CardDeclined", "attempt": 1, "activity": "charge",
                              "message": "activity 'charge' failed: failure 1"}
    replays(h)


@kflow.workflow(name="cf.default_retry", version=1, retry={"initial": 1, "max_attempts": 3})
async def default_retry(ctx, input):
    return await ctx.activity("flaky", input)


def test_workflow_default_retry_policy_applies_to_its_activities() -> None:
    flaky = Flaky(2)
    h = harness(default_retry, flaky=flaky)
    h.start("cf.default_retry", "i1", 1)
    h.advance(1)
    h.advance(2)
    assert h.status("i1") == "COMPLETED" and flaky.calls == 3


@kflow.workflow(name="cf.timeout", version=1)
async def timing_out(ctx, input):
    try:
        return await ctx.activity("slow", input, start_to_close=30, retry={"initial": 1, "max_attempts": 2})
    except ActivityError as e:
        return {"type": e.type, "attempt": e.attempt}


def test_start_to_close_timeout_retries_then_raises_activity_timeout_and_cancels_attempts() -> None:
    h = harness(timing_out)
    h.auto_run_tasks = False
    h.start("cf.timeout", "i1")
    t1 = h.pending_tasks.popleft()
    assert t1.report_start  # its start_to_close counts from the worker's start report
    h.send("StartActivity", "i1", activity_id=t1.activity_id, attempt=1)
    assert events(h, "i1", "ActivityStarted") == [{"activity_id": t1.activity_id, "attempt": 1}]
    h.advance(30)
    assert events(h, "i1", "ActivityTimedOut")[0]["kind"] == "start_to_close"
    assert [(t.activity_id, t.attempt) for t in h.cancelled_tasks] == [(t1.activity_id, 1)]
    h.advance(1)
    t2 = h.pending_tasks.popleft()
    assert t2.attempt == 2
    h.advance(30)
    assert h.status("i1") == "COMPLETED" and h.result("i1") == {"type": "ActivityTimeout", "attempt": 2}
    assert [t.attempt for t in h.cancelled_tasks] == [1, 2]
    replays(h)


@kflow.workflow(name="cf.hb", version=1)
async def heartbeating(ctx, input):
    return await ctx.activity("long", input, heartbeat=10)


def test_heartbeat_timeout_for_a_silent_worker_fails_the_workflow() -> None:
    h = harness(heartbeating)
    h.auto_run_tasks = False
    h.start("cf.hb", "i1")
    t = h.pending_tasks.popleft()
    h.advance(6)
    h.send("HeartbeatActivity", "i1", activity_id=t.activity_id, attempt=1, details=None)
    h.advance(9)  # the recorded heartbeat re-armed the timer: still alive
    assert h.status("i1") == "RUNNING"
    h.advance(2)
    assert h.status("i1") == "FAILED" and h.states["i1"]["error"]["type"] == "ActivityTimeout"
    replays(h)


@kflow.workflow(name="cf.exec", version=1, execution_timeout="1m")
async def slow_workflow(ctx, input):
    await ctx.sleep(3600)


def test_workflow_execution_timeout() -> None:
    h = harness(slow_workflow)
    h.start("cf.exec", "i1")
    h.advance(60)
    assert h.status("i1") == "FAILED" and h.states["i1"]["error"]["type"] == "WorkflowTimeout"
    replays(h)


# -- cancellation and sagas ----------------------------------------------------------------------
@kflow.workflow(name="cf.saga", version=1)
async def saga(ctx, input):
    async with ctx.saga() as s:
        await ctx.activity("step", "a")
        s.add_compensation("undo", "a")
        await ctx.activity("step", "b")
        s.add_compensation("undo", "b")
        await ctx.activity("step", input)  # "boom" fails, "wait" waits for a signal first
        if input == "wait":
            await ctx.wait_signal("go")
    return "done"


def test_saga_compensates_in_reverse_order_and_the_failure_stands() -> None:
    undone: list[str] = []

    def step(x: str) -> str:
        if x == "boom":
            raise CardDeclined("third step failed")
        return x

    h = harness(saga, step=step, undo=lambda x: undone.append(x))
    h.start("cf.saga", "i1", "boom")
    assert undone == ["b", "a"]
    assert h.status("i1") == "FAILED" and h.states["i1"]["error"]["type"] == "CardDeclined"
    assert h.states["i1"]["compensation"] == "completed"
    replays(h)


def test_cancel_mid_saga_compensates_what_completed_and_ends_cancelled() -> None:
    undone: list[str] = []
    h = harness(saga, step=lambda x: x, undo=lambda x: undone.append(x))
    h.start("cf.saga", "i1", "wait")
    assert h.status("i1") == "RUNNING"
    h.send("CancelWorkflow", "i1", reason="customer changed mind")
    assert undone == ["b", "a"]
    assert h.status("i1") == "CANCELLED"
    assert h.states["i1"]["error"] == {"type": "Cancelled", "message": "customer changed mind"}
    assert "CancelRequested" in h.events("i1") and h.events("i1")[-1] == "WorkflowCancelled"
    replays(h)


@kflow.workflow(name="cf.cancel_activity", version=1)
async def cancel_running_activity(ctx, input):
    try:
        await ctx.activity("long", input)
    finally:
        await ctx.activity("cleanup", input)


def test_cancel_sends_cancel_tasks_for_running_attempts_and_runs_finally() -> None:
    h = harness(cancel_running_activity)
    h.auto_run_tasks = False
    h.start("cf.cancel_activity", "i1", 5)
    long_task = h.pending_tasks.popleft()
    assert not long_task.report_start  # no timeout counts from its start: no report needed
    h.send("CancelWorkflow", "i1", reason="stop")
    assert [(t.activity_id, t.kind) for t in h.cancelled_tasks] == [(long_task.activity_id, "cancel")]
    cleanup = h.pending_tasks.popleft()
    assert cleanup.name == "cleanup" and h.status("i1") == "CANCELLING"
    # the cancelled attempt's late result is ignored, never applied
    h.send("CompleteActivity", "i1", activity_id=long_task.activity_id, attempt=1, result="late")
    assert events(h, "i1", "CommandRejected")[-1]["code"] == "STALE"  # an abandoned attempt
    h.send("CompleteActivity", "i1", activity_id=cleanup.activity_id, attempt=1, result=None)
    assert h.status("i1") == "CANCELLED"
    # cancel is idempotent: a second one changes nothing but a rejection
    h.send("CancelWorkflow", "i1", reason="again")
    assert h.status("i1") == "CANCELLED"
    replays(h)


def test_terminate_stops_at_once_without_cleanup() -> None:
    h = harness(cancel_running_activity)
    h.auto_run_tasks = False
    h.start("cf.cancel_activity", "i1", 5)
    h.pending_tasks.popleft()
    h.send("TerminateWorkflow", "i1", reason="ops")
    assert h.status("i1") == "TERMINATED" and not h.pending_tasks
    assert len(h.cancelled_tasks) == 1


# -- continue-as-new and the history limit -------------------------------------------------------
@kflow.workflow(name="cf.counter", version=1)
async def counter(ctx, input):
    n = input["n"]
    for _ in range(3):
        n = await ctx.activity("inc", n)
    if n < input["until"]:
        ctx.continue_as_new({"n": n, "until": input["until"]})
    return {"n": n, "run": ctx.run_number}


def test_continue_as_new_starts_fresh_runs_under_the_same_id() -> None:
    h = harness(counter, inc=lambda x: x + 1)
    h.start("cf.counter", "i1", {"n": 0, "until": 9})
    st = h.states["i1"]
    assert h.status("i1") == "COMPLETED" and h.result("i1") == {"n": 9, "run": 3}
    assert [e["run"] for e in events(h, "i1", "WorkflowContinuedAsNew")] == [2, 3]
    assert [r["continued_with"] for r in st["runs"]] == [{"n": 3, "until": 9}, {"n": 6, "until": 9}]
    assert st["input"] == {"n": 6, "until": 9} and "command_count" not in st  # a closed run keeps no journal
    replays(h)


@kflow.workflow(name="cf.forever", version=1)
async def forever(ctx, input):
    while True:
        await ctx.activity("inc", 1)



def test_history_limit_fails_a_run_that_never_continues_as_new() -> None:
    h = harness(forever, inc=lambda x: x)
    h.defs.limits = Limits(max_history_events=40)  # type: ignore[attr-defined]
    try:
        h.start("cf.forever", "i1")
        st = h.states["i1"]
        assert st["status"] == "FAILED" and st["error"]["type"] == "HistoryLimitExceeded"
        assert "continue_as_new" in st["error"]["message"]
        assert st["seq"] <= 45
    finally:
        h.defs.limits = DEFAULT_LIMITS  # type: ignore[attr-defined]


@kflow.workflow(name="cf.loop", version=1)
async def tight_loop(ctx, input):
    ctx.continue_as_new(input)


def test_continue_as_new_without_awaiting_is_stopped() -> None:
    h = harness(tight_loop)
    h.start("cf.loop", "i1", 1)
    assert h.status("i1") == "FAILED" and h.states["i1"]["error"]["type"] == "ContinueAsNewLoop"


# -- class-style workflows, signal handlers, conditions -------------------------------------------
@kflow.workflow(name="cf.approval", version=1)
class Approval:
    def __init__(self) -> None:
        self.votes: list[str] = []

    @kflow.workflow.signal
    def vote(self, who: str) -> None:
        self.votes.append(who)

    @kflow.workflow.query(name="count")
    def count_votes(self) -> int:
        return len(self.votes)

    async def run(self, ctx, input):
        try:
            await ctx.wait_condition(lambda: len(self.votes) >= input["needed"], timeout=60)
        except kflow.WorkflowError as e:
            return {"timed_out": e.type, "votes": self.votes}
        return {"approved_by": self.votes}


def test_class_workflow_signal_handlers_queries_and_wait_condition() -> None:
    h = harness(Approval)
    h.start("cf.approval", "i1", {"needed": 2})
    h.signal("i1", "vote", "ann")
    assert h.status("i1") == "RUNNING"
    assert kflow.query_state(Approval, h.states["i1"], "count") == 1
    h.signal("i1", "vote", "bob")
    assert h.result("i1") == {"approved_by": ["ann", "bob"]}
    replays(h)


def test_wait_condition_timeout() -> None:
    h = harness(Approval)
    h.start("cf.approval", "i2", {"needed": 3})
    h.signal("i2", "vote", "ann")
    h.advance(60)
    assert h.result("i2") == {"timed_out": "Timeout", "votes": ["ann"]}
    replays(h)


@kflow.workflow(name="cf.search", version=1)
async def searchable(ctx, input):
    ctx.upsert_search_attributes({"customer": input, "stage": "started"})
    await ctx.sleep(1)
    ctx.upsert_search_attributes({"stage": None})
    return "ok"


def test_upsert_search_attributes_lands_in_state() -> None:
    h = harness(searchable)
    h.start("cf.search", "i1", "acme")
    assert h.states["i1"]["search"] == {"customer": "acme", "stage": "started"}
    h.advance(1)
    assert h.states["i1"]["search"] == {"customer": "acme"}


# -- replay from recorded events (what `kflow replay` does) ---------------------------------------
@kflow.workflow(name="cf.mixed", version=1)
async def mixed(ctx, input):
    a = await ctx.activity("flaky", input, retry={"initial": 1, "max_attempts": 3}, start_to_close=30)
    await ctx.sleep(5)
    try:
        await ctx.activity("slow", a, start_to_close=10)
    except ActivityError as e:
        a = {"timed_out": e.type}
    return a


def test_replay_from_events_skips_engine_timers_and_retried_attempts() -> None:
    from kflow.testing import replay

    h = harness(mixed, flaky=Flaky(1))
    h.auto_run_tasks = True
    h.activities.pop("slow", None)
    h.start("cf.mixed", "i1", 3)
    h.advance(1)  # retry backoff
    h.auto_run_tasks = False
    h.advance(5)  # the sleep; "slow" is scheduled and never answered
    h.advance(10)  # its start_to_close timeout
    assert h.status("i1") == "COMPLETED" and h.result("i1") == {"timed_out": "ActivityTimeout"}
    purposes = [e.data["purpose"] for e in h.history["i1"] if e.type == "TimerStarted"]
    assert purposes == ["activity_timeout", "retry", "activity_timeout", "sleep", "activity_timeout"]
    assert replay(mixed, h.history["i1"]) == {"timed_out": "ActivityTimeout"}

    @kflow.workflow(name="cf.mixed", version=2)
    async def changed(ctx, input):
        await ctx.activity("flaky", input)
        await ctx.activity("other", None)  # history has the sleep's timer here

    with pytest.raises(NondeterminismError, match="timer"):
        replay(changed, h.history["i1"])


def test_replay_from_events_of_continued_runs_checks_the_last_run() -> None:
    from kflow.testing import replay

    h = harness(counter, inc=lambda x: x + 1)
    h.start("cf.counter", "i1", {"n": 0, "until": 6})
    assert replay(counter, h.history["i1"]) == {"n": 6, "run": 2}


def test_a_redelivered_signal_is_rejected_not_applied_twice() -> None:
    h = harness(Approval)
    h.start("cf.approval", "i3", {"needed": 2})
    h.signal("i3", "vote", "ann", command_id="trigger:telemetry:0:17")
    h.signal("i3", "vote", "ann", command_id="trigger:telemetry:0:17")  # the same message again
    assert h.status("i3") == "RUNNING"
    assert events(h, "i3", "CommandRejected")[-1]["code"] == "DUPLICATE"
    h.signal("i3", "vote", "bob", command_id="trigger:telemetry:0:18")
    assert h.result("i3") == {"approved_by": ["ann", "bob"]}
    replays(h)
