"""Local activities in the pure engine (spec and code) and the in-process runner of ``kflow.streams.local``.

The engine emits a local attempt as data (a ``Task`` with ``local=True``), records its outcome with
the same events as any activity, retries it through a durable backoff timer, never sends a cancel
for it, and re-emits it when a deferred ``StartActivity`` arrives; folding the history reproduces
the state. The runner resolves functions from ``@kflow.activity`` modules, bounds each run, and
feeds outcomes back, deferring past its per-batch bounds.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest

import kflow
from kflow.model.errors import DefinitionError, NonRetryableError
from kflow.model.messages import Command, Task
from kflow.model.spec import parse_spec
from kflow.streams import local as local_mod
from kflow.streams.local import MAX_RUNS_PER_INSTANCE, LocalActivities, LocalRuns, local_activities, run_local
from kflow.testing.harness import EngineHarness
from kflow.worker import activity

CHAIN = {"name": "lc", "version": 1, "steps": [
    {"id": "a", "task": "inc", "local": True, "input": "input", "output": "a"},
    {"id": "b", "task": "inc", "local": True, "input": "a", "output": "b"},
    {"id": "done", "succeed": "b"}]}


def manual(*docs: dict[str, Any], **fns: Any) -> EngineHarness:
    h = EngineHarness()
    h.auto_run_tasks = False
    for doc in docs:
        h.deploy(doc)
    for name, fn in fns.items():
        h.activity(name, fn)
    return h


def replays(h: EngineHarness) -> None:
    assert h.reprocess() == h.states


# -- authoring -------------------------------------------------------------------------------------
def test_local_is_only_allowed_on_task_steps_and_cannot_heartbeat() -> None:
    with pytest.raises(DefinitionError) as e:
        parse_spec({"name": "w", "steps": [
            {"id": "s", "sleep": "1s", "local": True},
            {"id": "t", "task": "x", "local": True, "timeout": {"heartbeat": "5s"}}]})
    text = str(e.value)
    assert "'local' is only allowed on a task step" in text
    assert "a local task cannot heartbeat" in text
    assert parse_spec(CHAIN).steps[0].local is True


# -- spec workflows in the pure engine ---------------------------------------------------------------
def test_spec_local_task_is_emitted_as_data_and_recorded_like_any_activity() -> None:
    h = manual(CHAIN)
    h.start("lc", "i1", 1)
    [task] = h.pending_tasks
    assert task.local is True and task.kind == "run" and task.report_start is False
    assert (task.name, task.input, task.attempt, task.queue) == ("inc", 1, 1, "default")
    assert h.states["i1"]["activities"][task.activity_id]["local"] is True
    h.send("CompleteActivity", "i1", activity_id=h.pending_tasks.popleft().activity_id, attempt=1, result=2)
    [task2] = h.pending_tasks
    assert task2.local and task2.input == 2
    h.send("CompleteActivity", "i1", activity_id=h.pending_tasks.popleft().activity_id, attempt=1, result=3)
    assert h.status("i1") == "COMPLETED" and h.result("i1") == 3
    assert h.events("i1") == ["WorkflowStarted", "ActivityScheduled", "ActivityCompleted", "ActivityScheduled",
                              "ActivityCompleted", "WorkflowCompleted"]
    replays(h)


def test_local_start_to_close_bounds_the_run_and_arms_no_timer() -> None:
    doc = {"name": "lt", "steps": [{"id": "a", "task": "inc", "local": True, "input": "input",
                                   "timeout": {"start_to_close": "250ms"}}]}
    h = manual(doc)
    h.start("lt", "i1", 1)
    [task] = h.pending_tasks
    assert task.start_to_close_ms == 250
    assert h.states["i1"]["timers"] == {}  # the lane bounds the run; nothing durable to fire


def test_local_retry_goes_through_the_durable_backoff_timer() -> None:
    doc = {"name": "lr", "steps": [{"id": "a", "task": "flaky", "local": True, "input": "input", "output": "a",
                                   "retry": {"initial": "2s", "max_attempts": 3}}]}
    h = manual(doc)
    h.start("lr", "i1", 5)
    first = h.pending_tasks.popleft()
    h.send("FailActivity", "i1", activity_id=first.activity_id, attempt=1, error_type="Boom", message="x",
           retryable=True)
    assert not h.pending_tasks and not h.cancelled_tasks
    [(tid, timer)] = h.states["i1"]["timers"].items()
    assert timer["purpose"] == "retry"
    h.advance(1.9)
    assert not h.pending_tasks
    h.advance(0.2)
    [second] = h.pending_tasks
    assert second.local and second.attempt == 2 and second.activity_id == first.activity_id
    h.send("CompleteActivity", "i1", activity_id=second.activity_id, attempt=2, result=6)
    assert h.status("i1") == "COMPLETED" and h.result("i1") == {"a": 6}
    assert "TimerFired" in h.events("i1")
    replays(h)


def test_deferred_local_attempt_is_emitted_again_on_each_start_report() -> None:
    h = manual(CHAIN)
    h.start("lc", "i1", 1)
    task = h.pending_tasks.popleft()
    for _ in range(2):  # deferred twice: every report re-emits the attempt, never leaves it without a runner
        h.send("StartActivity", "i1", activity_id=task.activity_id, attempt=1)
        [again] = h.pending_tasks
        h.pending_tasks.clear()
        assert again.local and (again.activity_id, again.attempt) == (task.activity_id, 1)
    h.send("CompleteActivity", "i1", activity_id=task.activity_id, attempt=1, result=2)
    assert h.events("i1").count("ActivityStarted") == 2
    replays(h)


def test_cancelling_never_sends_a_cancel_task_for_a_local_attempt() -> None:
    h = manual(CHAIN)
    h.start("lc", "i1", 1)
    h.send("CancelWorkflow", "i1", reason="stop")
    assert h.status("i1") == "CANCELLED"
    assert h.cancelled_tasks == []


# -- code workflows -----------------------------------------------------------------------------------
@kflow.workflow(name="lc.code", version=1)
async def code_chain(ctx, input):
    a = await ctx.local_activity("inc", input, start_to_close=1.5)
    b = await ctx.local_activity("inc", a, retry={"initial": "1s", "max_attempts": 2})
    return a + b


def test_code_local_activity_emits_local_tasks_and_retries_via_timer() -> None:
    h = EngineHarness()
    h.auto_run_tasks = False
    h.defs.add(kflow.authoring.definition_of(code_chain))
    h.start("lc.code", "i1", 1)
    [first] = h.pending_tasks
    assert first.local and first.start_to_close_ms == 1500 and first.input == 1
    h.send("CompleteActivity", "i1", activity_id=h.pending_tasks.popleft().activity_id, attempt=1, result=2)
    second = h.pending_tasks.popleft()
    assert second.local and second.input == 2
    h.send("FailActivity", "i1", activity_id=second.activity_id, attempt=1, error_type="Boom", message="x",
           retryable=True)
    assert not h.pending_tasks
    h.advance(1.0)
    [retry] = h.pending_tasks
    assert retry.local and retry.attempt == 2
    h.send("CompleteActivity", "i1", activity_id=retry.activity_id, attempt=2, result=3)
    assert h.status("i1") == "COMPLETED" and h.result("i1") == 5
    replays(h)


# -- the runner (kflow.streams.local) ----------------------------------------------------------------
@pytest.fixture
def acts() -> Iterator[LocalActivities]:
    mod = types.ModuleType("kflow_test_local_acts")

    @activity("inc", queue="q1")
    def inc(x: int) -> int:
        return x + 1

    @activity("ainc")
    async def ainc(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    @activity("hang")
    def hang(x: Any) -> None:
        threading.Event().wait(2)

    @activity("refuse")
    def refuse(x: Any) -> None:
        raise NonRetryableError("no", type="Refused")

    @activity("odd")
    def odd(x: Any) -> Any:
        return object()  # no JSON form, even through the data converter

    mod.inc, mod.ainc, mod.hang, mod.refuse, mod.odd = inc, ainc, hang, refuse, odd  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    try:
        yield local_activities(mod.__name__)
    finally:
        del sys.modules[mod.__name__]


def task(name: str, input_: Any, queue: str = "default", aid: str = "a-2", iid: str = "i1") -> Task:
    return Task(instance_id=iid, activity_id=aid, attempt=1, name=name, queue=queue, input=input_, workflow="w",
                scheduled_ms=0, local=True)


def test_run_local_outcomes(acts: LocalActivities) -> None:
    assert run_local(acts, task("inc", 1), 1000).result == 2
    assert run_local(acts, task("ainc", 1), 1000).result == 2
    timed = run_local(acts, task("hang", None), 50)
    assert (timed.error_type, timed.retryable) == ("ActivityTimeout", True)
    refused = run_local(acts, task("refuse", None), 1000)
    assert (refused.error_type, refused.message, refused.retryable) == ("Refused", "no", False)
    assert run_local(acts, task("odd", None), 1000).error_type == "InvalidResult"
    unknown = run_local(acts, task("nope", None), 1000)
    assert unknown.error_type == "UnknownActivity" and not unknown.retryable
    assert "start the engine with --activities MODULE" in unknown.message
    cmd = run_local(acts, task("inc", 1), 1000).command(task("inc", 1), 7)
    assert (cmd.type, cmd.data, cmd.ts) == ("CompleteActivity", {"activity_id": "a-2", "attempt": 1, "result": 2}, 7)


def test_an_engine_without_the_module_fails_the_attempt_not_hangs() -> None:
    outcome = run_local(local_activities(""), task("inc", 1), 1000)
    assert outcome.error_type == "UnknownActivity" and not outcome.retryable
    assert "KFLOW_ACTIVITIES is empty" in outcome.message


def test_local_runs_chain_through_decide_and_defer_past_the_per_instance_bound(acts: LocalActivities) -> None:
    decided: list[Command] = []
    deferred: list[Command] = []
    runs = LocalRuns(acts, now=5, budget_ms=60_000, cap_ms=1000)

    def decide(c: Command) -> None:  # every outcome schedules one more local attempt, forever
        decided.append(c)
        runs.submit([task("inc", c.data["result"], aid=f"a-{len(decided)}")], decide, deferred.append)

    runs.submit([task("inc", 0)], decide, deferred.append)
    assert len(decided) == MAX_RUNS_PER_INSTANCE
    assert [c.data["result"] for c in decided[:3]] == [1, 2, 3]
    [d] = deferred
    assert (d.type, d.instance_id, d.data) == ("StartActivity", "i1", {"activity_id": f"a-{MAX_RUNS_PER_INSTANCE}",
                                                                      "attempt": 1})


def test_local_runs_defer_everything_once_the_time_budget_is_spent(acts: LocalActivities) -> None:
    deferred: list[Command] = []
    runs = LocalRuns(acts, now=5, budget_ms=0, cap_ms=1000)
    runs.submit([task("inc", 0, iid="i1"), task("inc", 0, iid="i2")], lambda c: pytest.fail("ran"), deferred.append)
    assert [c.instance_id for c in deferred] == ["i1", "i2"]


def test_loading_a_module_that_does_not_import_is_a_clear_error() -> None:
    with pytest.raises(kflow.KflowError, match="cannot import module 'no_such_module_xyz'"):
        local_mod.LocalActivities.load("no_such_module_xyz")


# -- command line ------------------------------------------------------------------------------------
def test_engine_with_an_activities_module_that_does_not_import_fails_before_any_broker() -> None:
    from typer.testing import CliRunner

    from kflow.cli import app

    result = CliRunner().invoke(app, ["engine", "--activities", "no_such_local_module", "--bootstrap", "127.0.0.1:1"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "cannot import module 'no_such_local_module'" in result.stderr


def test_bench_local_is_the_spec_workload_only() -> None:
    from typer.testing import CliRunner

    from kflow.cli import app

    result = CliRunner().invoke(app, ["bench", "--local", "--style", "code", "--bootstrap", "127.0.0.1:1"])
    assert result.exit_code != 0 and "--local runs the spec chain3" in result.stderr
