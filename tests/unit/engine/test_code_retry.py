"""Retry of closed code workflows through the pure engine: the run is reset to an event of its
history (by default just before the input that ended it) and replayed from there.

Driven through :class:`~kflow.testing.harness.EngineHarness` with its manual clock; every test runs
with live machines cached and with every input replayed from the journal, and checks the fold
property (replaying the recorded history from scratch reproduces the live state).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import kflow
from kflow.engine.code_retry import RESET_ATTEMPTS
from kflow.engine.journal import MEMORY
from kflow.model.messages import RejectCode, Status
from kflow.testing.harness import EngineHarness
from tests.unit.engine.test_code_replayer import CACHE_SIZE, harness


@pytest.fixture(autouse=True, params=["cached", "replayed"])
def cache_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    CACHE_SIZE[0] = 10_000 if request.param == "cached" else 0
    yield request.param
    CACHE_SIZE[0] = 10_000


class Service:
    """Two activities: ``first`` always works; ``second`` fails while ``broken``."""

    def __init__(self) -> None:
        self.broken = True
        self.calls: dict[str, int] = {"first": 0, "second": 0}

    def first(self, x: Any) -> Any:
        self.calls["first"] += 1
        return {"n": x, "first": True}

    def second(self, x: Any) -> Any:
        self.calls["second"] += 1
        if self.broken:
            raise RuntimeError("card service down")
        return {"charged": x["n"]}


@kflow.workflow(name="cretry.two", version=1)
async def two_steps(ctx: Any, input: Any) -> Any:
    a = await ctx.activity("first", input)
    stamp = ctx.now().timestamp()  # the time of the input being processed: identical on replay
    b = await ctx.activity("second", a, retry={"initial": 1, "max_attempts": 2})
    return {"a": a, "b": b, "token": str(ctx.uuid4()), "stamp": stamp}


@kflow.workflow(name="cretry.wait", version=1)
async def waits(ctx: Any, input: Any) -> Any:
    a = await ctx.activity("first", input)
    go = await ctx.wait_signal("go")
    return {"a": a, "go": go}


def setup() -> tuple[EngineHarness, Service]:
    svc = Service()
    return harness(two_steps, waits, first=svc.first, second=svc.second), svc


def failed(h: EngineHarness, iid: str) -> None:
    """Start ``cretry.two`` as ``iid`` and let ``second`` exhaust its two attempts."""
    h.start("cretry.two", iid, 7)
    h.advance(1)  # the backoff before attempt 2
    assert h.status(iid) == Status.FAILED


def retry(h: EngineHarness, iid: str, **data: Any) -> None:
    h.send("RetryWorkflow", iid, **{"from_step": None, "input_patch": None, "force": False, "reason": "fixed",
                                    "by": "ops", **data})


def rejection(h: EngineHarness, iid: str) -> dict[str, Any]:
    last = h.history[iid][-1]
    assert last.type == "CommandRejected", h.events(iid)[-3:]
    return last.data


def scheduled(h: EngineHarness, iid: str, name: str) -> list[int]:
    return [e.data["attempt"] for e in h.history[iid] if e.type == "ActivityScheduled" and e.data["name"] == name]


def test_retry_redispatches_the_failed_activity_only_and_completes_like_a_run_that_never_failed() -> None:
    h, svc = setup()
    failed(h, "c1")
    assert svc.calls == {"first": 1, "second": 2}
    assert h.states["c1"][RESET_ATTEMPTS] == {"second-4": 2}  # the journal is kept, and how far attempts went
    assert MEMORY.runs("c1") == [1]
    svc.broken = False
    retry(h, "c1")
    assert h.status("c1") == Status.COMPLETED
    assert svc.calls == {"first": 1, "second": 3}  # first is not run again
    assert scheduled(h, "c1", "first") == [1] and scheduled(h, "c1", "second") == [1, 2, 3]
    retried = [e.data for e in h.history["c1"] if e.type == "WorkflowRetried"]
    started = next(e for e in h.history["c1"] if e.type == "ActivityCompleted")
    assert retried == [{"from_step": f"event:{started.seq}", "input_patch": None, "reason": "fixed", "by": "ops",
                        "attempt": 1}]
    assert h.states["c1"]["retries"] == 1
    assert "WorkflowFailed" in h.events("c1")  # history keeps every old event
    # the same result as an instance whose service never failed (ids are the instance's own)
    h.start("cretry.two", "ref", 7)
    result, reference = h.result("c1"), h.result("ref")
    assert result["a"] == reference["a"] and result["b"] == reference["b"] == {"charged": 7}
    assert result["stamp"] == started.ts / 1000  # the step before the reset saw the original run's time
    assert MEMORY.runs("c1") == []  # a completed run's journal is deleted
    assert h.reprocess() == h.states  # folding the whole history gives the live state


def test_a_late_report_of_an_attempt_before_the_retry_is_stale() -> None:
    h, svc = setup()
    failed(h, "c2")
    h.auto_run_tasks = False
    retry(h, "c2")
    assert h.status("c2") == Status.RUNNING
    h.send("CompleteActivity", "c2", activity_id="second-4", attempt=2, result={"charged": 0})
    assert rejection(h, "c2")["code"] == RejectCode.STALE
    svc.broken = False
    h.auto_run_tasks = True
    h.drain()
    assert h.status("c2") == Status.COMPLETED and h.result("c2")["b"] == {"charged": 7}
    assert h.reprocess() == h.states


def test_a_retry_that_fails_again_can_be_retried_again_with_higher_attempts() -> None:
    h, svc = setup()
    failed(h, "c3")
    retry(h, "c3")
    h.advance(1)
    assert h.status("c3") == Status.FAILED and svc.calls["second"] == 4
    svc.broken = False
    retry(h, "c3")
    assert h.status("c3") == Status.COMPLETED
    assert scheduled(h, "c3", "second") == [1, 2, 3, 4, 5]
    assert [e.data["attempt"] for e in h.history["c3"] if e.type == "WorkflowRetried"] == [1, 2]
    assert svc.calls["first"] == 1
    assert h.reprocess() == h.states


def test_to_event_resets_earlier_and_runs_the_step_after_it_again() -> None:
    h, svc = setup()
    failed(h, "c4")
    start = h.history["c4"][0]
    assert start.type == "WorkflowStarted"
    svc.broken = False
    retry(h, "c4", from_step=f"event:{start.seq}")
    assert h.status("c4") == Status.COMPLETED
    assert svc.calls == {"first": 2, "second": 3}  # first ran again, under a new attempt
    assert scheduled(h, "c4", "first") == [1, 2]
    assert h.result("c4")["b"] == {"charged": 7}
    assert h.reprocess() == h.states


def test_a_reset_point_at_or_after_the_failing_input_is_rejected_and_changes_nothing() -> None:
    h, _ = setup()
    failed(h, "c5")
    before = dict(h.states["c5"])
    last = h.history["c5"][-1].seq
    retry(h, "c5", from_step=f"event:{last}")
    assert rejection(h, "c5")["code"] == RejectCode.INVALID_INPUT
    assert "before the one that ended 'c5'" in rejection(h, "c5")["reason"]
    assert {k: v for k, v in h.states["c5"].items() if k not in ("seq", "updated_ms")} == \
        {k: v for k, v in before.items() if k not in ("seq", "updated_ms")}
    retry(h, "c5", from_step="event:0")
    assert "expected an event of the current run of 'c5'" in rejection(h, "c5")["reason"]
    assert h.reprocess() == h.states


@pytest.mark.parametrize(("data", "expected"), [
    ({"from_step": "charge"}, "expected no step for code workflow instance 'c6'"),
    ({"from_step": "event:x"}, "expected no step for code workflow instance 'c6'"),
    ({"input_patch": {"card": "tok_2"}}, "expected no input_patch for code workflow instance 'c6'"),
])
def test_spec_only_options_are_rejected_for_code(data: dict[str, Any], expected: str) -> None:
    h, _ = setup()
    failed(h, "c6")
    retry(h, "c6", **data)
    assert rejection(h, "c6")["code"] == RejectCode.INVALID_INPUT
    assert expected in rejection(h, "c6")["reason"]
    assert h.status("c6") == Status.FAILED


def test_retry_of_a_running_instance_is_rejected_with_the_reason() -> None:
    h, _ = setup()
    h.start("cretry.wait", "w1", 1)
    retry(h, "w1")
    assert rejection(h, "w1") == {"command_type": "RetryWorkflow", "code": RejectCode.INVALID_STATE,
                                  "reason": "expected a FAILED instance to retry, but 'w1' is RUNNING"}
    assert h.status("w1") == Status.RUNNING


def test_a_cancelled_instance_needs_force_and_resumes_before_its_cancellation() -> None:
    h, svc = setup()
    h.start("cretry.wait", "w2", 3)
    h.send("CancelWorkflow", "w2", reason="by mistake")
    assert h.status("w2") == Status.CANCELLED
    retry(h, "w2")
    assert "(use force)" in rejection(h, "w2")["reason"]
    retry(h, "w2", force=True)
    assert h.status("w2") == Status.RUNNING
    h.signal("w2", "go", "now")
    assert h.status("w2") == Status.COMPLETED and h.result("w2") == {"a": {"n": 3, "first": True}, "go": "now"}
    assert svc.calls["first"] == 1
    assert h.reprocess() == h.states


def test_reusing_the_id_of_a_failed_instance_deletes_its_kept_journal() -> None:
    h, svc = setup()
    failed(h, "c7")
    assert MEMORY.runs("c7") == [1]
    svc.broken = False
    h.send("StartWorkflow", "c7", workflow="cretry.two", version=1, input=8, id_reuse="allow_if_closed")
    assert h.status("c7") == Status.COMPLETED and h.result("c7")["b"] == {"charged": 8}
    assert MEMORY.runs("c7") == []


@kflow.workflow(name="cretry.sleepy", version=1)
async def sleepy(ctx: Any, input: Any) -> Any:
    await ctx.sleep(10)
    return await ctx.activity("second", {"n": input}, retry={"max_attempts": 1})


def test_a_reset_restores_pending_timers_as_they_were() -> None:
    svc = Service()
    h = harness(sleepy, second=svc.second)
    h.start("cretry.sleepy", "s1", 5)
    timer = next(e.data for e in h.history["s1"] if e.type == "TimerStarted")
    h.advance(10)
    assert h.status("s1") == Status.FAILED
    svc.broken = False
    retry(h, "s1", from_step=f"event:{h.history['s1'][0].seq}")  # back to before the sleep ended
    assert h.status("s1") == Status.RUNNING
    assert h.states["s1"]["timers"] == {timer["timer_id"]: {"due": timer["due_ms"], "thread": "code",
                                                            "purpose": "sleep"}}
    assert svc.calls["second"] == 1
    h.advance(0)  # the timer was due already: it fires at once, and the activity after it runs
    assert h.status("s1") == Status.COMPLETED and h.result("s1") == {"charged": 5}
    assert h.reprocess() == h.states


def test_a_terminated_instance_needs_force_and_resumes_where_it_stood() -> None:
    h, svc = setup()
    h.start("cretry.wait", "w3", 4)
    h.send("TerminateWorkflow", "w3", reason="runaway")
    assert h.status("w3") == Status.TERMINATED
    retry(h, "w3")
    assert "(use force)" in rejection(h, "w3")["reason"]
    retry(h, "w3", force=True)
    assert h.status("w3") == Status.RUNNING
    h.signal("w3", "go", 1)
    assert h.status("w3") == Status.COMPLETED and svc.calls["first"] == 1
    assert h.reprocess() == h.states


def test_the_cli_refuses_a_step_and_an_event_together() -> None:
    from typer.testing import CliRunner

    from kflow.cli import app

    out = CliRunner().invoke(app, ["retry", "x1", "--from", "charge", "--to-event", "3"])
    assert out.exit_code != 0
    assert "--from names a spec workflow's step and --to-event a code workflow's event" in out.output
