"""Activity heartbeat timeouts, late results and timeout messages in the pure engine (manual clock).

The heartbeat timeout is the longest silence allowed: an attempt times out exactly when no
heartbeat arrived for the whole timeout (to within a tenth of it, however the heartbeats are
spread), with a bounded number of ``HeartbeatRecorded`` events. A result for a superseded or
abandoned attempt is ``STALE``; a redelivery of a recorded (activity id, attempt) is ``DUPLICATE``.
"""

from __future__ import annotations

from typing import Any

import pytest

import kflow
from kflow.engine.activity import HEARTBEAT_RESOLUTION
from kflow.model.messages import Task
from kflow.testing.harness import EngineHarness

HB = 10  # seconds: the heartbeat timeout of the workflows below


def spec(steps: list[dict[str, Any]], name: str = "w") -> dict[str, Any]:
    return {"name": name, "version": 1, "steps": steps}


def manual(*docs: dict[str, Any]) -> EngineHarness:
    h = EngineHarness()
    for d in docs:
        h.deploy(d)
    h.auto_run_tasks = False
    return h


def heartbeating(retry: dict[str, Any] | None = None) -> tuple[EngineHarness, Task]:
    step: dict[str, Any] = {"id": "a", "task": "x", "timeout": {"heartbeat": f"{HB}s"}}
    if retry is not None:
        step["retry"] = retry
    h = manual(spec([step]))
    h.start("w", "i1")
    return h, h.pending_tasks.popleft()


def beat(h: EngineHarness, t: Task) -> None:
    h.send("HeartbeatActivity", "i1", activity_id=t.activity_id, attempt=t.attempt, details=None)


def at(h: EngineHarness, seconds: float) -> None:
    """Move the manual clock to ``seconds`` (whole ms) after the start, firing what became due."""
    delta_ms = h.states["i1"]["started_ms"] + round(seconds * 1000) - h.clock.ms
    assert delta_ms >= 0
    h.advance((delta_ms + 0.5) / 1000)  # the clock truncates to whole ms


def of(h: EngineHarness, type_: str) -> list[Any]:
    return [e for e in h.history["i1"] if e.type == type_]


def codes(h: EngineHarness) -> list[str]:
    return [e.data["code"] for e in of(h, "CommandRejected")]


# -- the heartbeat timeout is the longest silence ------------------------------------------------
@pytest.mark.parametrize("last", [0.3, 0.45, 0.9])
def test_a_heartbeat_resets_the_timeout_whenever_it_arrives(last: float) -> None:
    h, t = heartbeating()
    at(h, last * HB)
    beat(h, t)
    at(h, HB)  # the first deadline passes: the timer re-arms from the heartbeat
    assert h.status("i1") == "RUNNING" and not of(h, "ActivityTimedOut")
    at(h, (last + 1) * HB - 0.001)
    assert h.status("i1") == "RUNNING"
    at(h, (last + 1) * HB)
    assert h.status("i1") == "FAILED" and h.states["i1"]["error"]["type"] == "ActivityTimeout"
    [timed_out] = of(h, "ActivityTimedOut")
    [recorded] = of(h, "HeartbeatRecorded")
    assert timed_out.ts - recorded.ts == HB * 1000  # silent for exactly the whole timeout
    assert h.reprocess() == h.states


def test_many_heartbeats_keep_the_attempt_alive_and_the_history_small() -> None:
    h, t = heartbeating()
    for i in range(1, 301):  # every 0.1 s for 30 s: three timeouts' worth
        at(h, i * 0.1)
        beat(h, t)
    assert h.status("i1") == "RUNNING"
    recorded = of(h, "HeartbeatRecorded")
    assert len(recorded) <= 30 * HEARTBEAT_RESOLUTION / HB + 1  # at most HEARTBEAT_RESOLUTION per timeout
    assert len(h.history["i1"]) < 60
    assert h.reprocess() == h.states
    # the last heartbeat (t=30 s) was recorded: the attempt times out exactly HB after it
    assert recorded[-1].ts == h.states["i1"]["started_ms"] + 30_000
    at(h, 30 + HB - 0.001)
    assert h.status("i1") == "RUNNING"
    at(h, 30 + HB)
    assert h.status("i1") == "FAILED"
    assert h.reprocess() == h.states


def test_heartbeats_closer_than_the_resolution_keep_the_timeout_within_it() -> None:
    h, t = heartbeating()
    at(h, 5)
    beat(h, t)
    at(h, 5.5)  # within a tenth of the timeout of the recorded one: not history
    beat(h, t)
    assert len(of(h, "HeartbeatRecorded")) == 1
    at(h, 15 - HB / HEARTBEAT_RESOLUTION)
    assert h.status("i1") == "RUNNING"
    at(h, 15)
    assert h.status("i1") == "FAILED"
    assert h.reprocess() == h.states


def test_a_retried_attempt_counts_heartbeats_afresh() -> None:
    h, t = heartbeating(retry={"initial": "1s", "max_attempts": 2})
    at(h, 4)
    beat(h, t)
    at(h, 14)  # attempt 1 silent since 4 s: times out, attempt 2 follows the 1 s backoff
    assert [e.data["attempt"] for e in of(h, "ActivityTimedOut")] == [1]
    at(h, 15)
    t2 = h.pending_tasks.popleft()
    assert t2.attempt == 2
    h.send("StartActivity", "i1", activity_id=t2.activity_id, attempt=2)
    at(h, 15 + HB - 0.001)  # attempt 1's heartbeat does not carry over
    assert h.status("i1") == "RUNNING"
    at(h, 15 + HB)
    assert h.status("i1") == "FAILED"
    assert h.reprocess() == h.states


@kflow.workflow(name="hb.code", version=1)
async def code_heartbeating(ctx, input):
    return await ctx.activity("long", input, heartbeat=HB)


def test_code_workflow_heartbeat_timeout_counts_from_the_last_heartbeat() -> None:
    h = manual()
    h.defs.add(kflow.authoring.definition_of(code_heartbeating))
    h.start("hb.code", "i1")
    t = h.pending_tasks.popleft()
    at(h, 2)  # before half the timeout
    beat(h, t)
    at(h, 2 + HB - 0.001)
    assert h.status("i1") == "RUNNING"
    at(h, 2 + HB)
    assert h.status("i1") == "FAILED"
    assert h.states["i1"]["error"]["type"] == "ActivityTimeout"
    assert f"heartbeat timeout of {HB}s elapsed" in h.states["i1"]["error"]["message"]
    assert h.reprocess() == h.states


# -- late results: STALE vs DUPLICATE ------------------------------------------------------------
def test_a_result_after_the_activity_gave_up_is_stale() -> None:
    h, t = heartbeating()
    at(h, HB)
    assert h.status("i1") == "FAILED"
    # the instance is closed: every result is INVALID_STATE; keep it open with a catch instead
    h = manual(spec([{"id": "a", "task": "x", "timeout": {"heartbeat": f"{HB}s"},
                      "catch": [{"errors": ["ActivityTimeout"], "goto": "w"}]},
                     {"id": "w", "wait": {"signal": "go"}}]))
    h.start("w", "i1")
    t = h.pending_tasks.popleft()
    at(h, HB)
    assert of(h, "ActivityTimedOut") and h.status("i1") == "RUNNING"
    h.send("CompleteActivity", "i1", activity_id=t.activity_id, attempt=1, result="late")
    assert codes(h) == ["STALE"]
    assert "given up" in of(h, "CommandRejected")[-1].data["reason"]
    assert h.reprocess() == h.states


def test_a_redelivered_result_is_duplicate_and_a_superseded_attempt_is_stale() -> None:
    h = manual(spec([{"id": "a", "task": "x", "retry": {"initial": "1s", "max_attempts": 3}},
                     {"id": "w", "wait": {"signal": "go"}}]))
    h.start("w", "i1")
    t1 = h.pending_tasks.popleft()
    fail = {"activity_id": t1.activity_id, "error_type": "E", "message": "m", "retryable": True}
    h.send("FailActivity", "i1", attempt=1, **fail)
    h.send("FailActivity", "i1", attempt=1, **fail)  # redelivered during the backoff
    assert codes(h) == ["DUPLICATE"]
    at(h, 1)
    t2 = h.pending_tasks.popleft()
    h.send("CompleteActivity", "i1", activity_id=t2.activity_id, attempt=2, result="ok")
    h.send("CompleteActivity", "i1", activity_id=t2.activity_id, attempt=2, result="ok")  # redelivered
    h.send("CompleteActivity", "i1", activity_id=t1.activity_id, attempt=1, result="late")  # superseded
    assert codes(h) == ["DUPLICATE", "DUPLICATE", "STALE"]
    assert h.reprocess() == h.states


def test_a_result_for_an_abandoned_branch_is_stale() -> None:
    h = manual(spec([{"id": "p", "parallel": [
        {"steps": [{"id": "slow", "task": "x"}]},
        {"steps": [{"id": "bad", "task": "y"}]}],
        "catch": [{"goto": "w"}]},
        {"id": "w", "wait": {"signal": "go"}}]))
    h.start("w", "i1")
    slow, bad = sorted(h.pending_tasks, key=lambda t: t.name)
    h.send("FailActivity", "i1", activity_id=bad.activity_id, attempt=1, error_type="Boom", message="no",
           retryable=False)
    assert [c.activity_id for c in h.cancelled_tasks] == [slow.activity_id]
    assert h.status("i1") == "RUNNING"
    h.send("CompleteActivity", "i1", activity_id=slow.activity_id, attempt=1, result="late")
    assert codes(h) == ["STALE"]
    assert h.reprocess() == h.states


def test_ended_activities_are_remembered_within_a_bounded_window() -> None:
    h = manual(spec([{"id": "each", "foreach": "input", "as": "i", "concurrency": 200,
                      "steps": [{"id": "t", "task": "x", "timeout": {"heartbeat": "1s"},
                                 "catch": [{"goto": "ok"}]}, {"id": "ok", "set": {"x": "i"}}]},
                     {"id": "w", "wait": {"signal": "go"}}]))
    h.start("w", "i1", list(range(200)))
    at(h, 1)  # every attempt times out and is given up
    order = [e.data["activity_id"] for e in of(h, "ActivityTimedOut")]
    assert len(order) == 200
    assert list(h.states["i1"]["ended"]) == order[-128:]
    h.send("CompleteActivity", "i1", activity_id=order[0], attempt=1, result="late")
    assert codes(h) == ["DUPLICATE"]  # forgotten: too old to tell
    h.send("CompleteActivity", "i1", activity_id=order[-1], attempt=1, result="late")
    assert codes(h) == ["DUPLICATE", "STALE"]
    assert h.reprocess() == h.states


# -- timeout messages carry units ----------------------------------------------------------------
@kflow.workflow(name="hb.stc", version=1)
async def code_start_to_close(ctx, input):
    return await ctx.activity("slow", input, start_to_close=1)


def test_code_workflow_timeout_message_has_a_unit() -> None:
    h = manual()
    h.defs.add(kflow.authoring.definition_of(code_start_to_close))
    h.start("hb.stc", "i1")
    at(h, 1)
    assert h.status("i1") == "FAILED"
    assert "start_to_close timeout of 1s elapsed (attempt 1)" in h.states["i1"]["error"]["message"]


@pytest.mark.parametrize(("written", "shown"), [(1.5, "1.5s"), (30, "30s"), ("2m", "2m")])
def test_spec_timeout_messages_have_units(written: Any, shown: str) -> None:
    h = manual(spec([{"id": "a", "task": "x", "timeout": {"start_to_close": written}}]),
               spec([{"id": "w", "wait": {"signal": "go", "timeout": written}}], name="v"),
               {**spec([{"id": "w", "wait": {"signal": "go"}}], name="e"), "timeout": {"execution": written}})
    for name, iid in (("w", "i1"), ("v", "i2"), ("e", "i3")):
        h.start(name, iid)
    h.advance(120)
    messages = [h.states[i]["error"]["message"] for i in ("i1", "i2", "i3")]
    assert f"start_to_close timeout of {shown} elapsed (attempt 1)" in messages[0]
    assert messages[1].endswith(f"arrived within {shown}")
    assert messages[2] == f"the workflow did not finish within {shown}"
