"""Failure semantics of spec workflows: retries, timeouts, catch routes, sagas, terminate, limits."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kflow.engine.activity import Limits, retry_delay_ms
from kflow.model.spec import RetrySpec
from kflow.testing.harness import EngineHarness


def wf(name: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "version": 1, "steps": steps, **extra}


def harness(*docs: dict[str, Any]) -> EngineHarness:
    h = EngineHarness()
    for d in docs:
        h.deploy(d)
    return h


def flaky(failures: int, result: Any = "ok", error: type[Exception] = RuntimeError) -> Any:
    calls = {"n": 0}

    def fn(_: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise error(f"failure {calls['n']}")
        return result
    fn.calls = calls  # type: ignore[attr-defined]
    return fn


class CardDeclined(Exception):
    pass


def events_of(h: EngineHarness, iid: str, type_: str) -> list[dict[str, Any]]:
    return [e.data for e in h.history[iid] if e.type == type_]


def assert_replays(h: EngineHarness) -> None:
    assert h.reprocess() == h.states


RETRY = {"initial": "1s", "backoff": 2.0, "max_interval": "3s", "max_attempts": 5}


# -- retries ----------------------------------------------------------------------------------
def test_retry_with_backoff_timers_then_success() -> None:
    h = harness(wf("w", [{"id": "charge", "task": "pay", "retry": RETRY, "output": "r"}]))
    fn = flaky(3)
    h.activity("pay", fn)
    h.start("w", "i1")
    dues = []
    for _ in range(3):
        st = h.states["i1"]
        assert st["status"] == "RUNNING"
        (timer,) = st["timers"].values()
        assert timer["purpose"] == "retry"
        dues.append(timer["due"] - h.clock.ms)
        h.advance(dues[-1] / 1000)
    assert dues == [1000, 2000, 3000]  # 1s, 2s, then capped at max_interval 3s
    assert h.status("i1") == "COMPLETED" and h.result("i1") == {"r": "ok"}
    scheduled = events_of(h, "i1", "ActivityScheduled")
    assert [s["attempt"] for s in scheduled] == [1, 2, 3, 4]
    assert len({s["activity_id"] for s in scheduled}) == 1
    assert fn.calls["n"] == 4
    assert_replays(h)


def test_no_policy_means_one_attempt() -> None:
    h = harness(wf("w", [{"id": "a", "task": "x"}]))
    h.activity("x", flaky(1))
    h.start("w", "i1")
    assert h.status("i1") == "FAILED" and h.states["i1"]["error"]["type"] == "RuntimeError"


def test_workflow_default_retry_applies() -> None:
    h = harness(wf("w", [{"id": "a", "task": "x", "output": "r"}], retry={"initial": "1s", "max_attempts": 2}))
    h.activity("x", flaky(1))
    h.start("w", "i1")
    h.advance(1)
    assert h.status("i1") == "COMPLETED"


def test_non_retryable_error_type_fails_at_once() -> None:
    h = harness(wf("w", [{"id": "a", "task": "x", "retry": {**RETRY, "non_retryable": ["CardDeclined"]}}]))
    h.activity("x", flaky(5, error=CardDeclined))
    h.start("w", "i1")
    assert h.status("i1") == "FAILED" and h.states["i1"]["error"]["type"] == "CardDeclined"
    assert not h.states["i1"]["timers"]


def test_retryable_false_is_not_retried() -> None:
    h = harness(wf("w", [{"id": "a", "task": "x", "retry": RETRY}]))
    h.auto_run_tasks = False
    h.start("w", "i1")
    task = h.pending_tasks.popleft()
    h.send("FailActivity", "i1", activity_id=task.activity_id, attempt=1, error_type="Bad", message="no",
           retryable=False)
    assert h.status("i1") == "FAILED"


def test_max_attempts_exhausted_fails() -> None:
    h = harness(wf("w", [{"id": "a", "task": "x", "retry": {"initial": "1s", "max_attempts": 3}}]))
    fn = flaky(10)
    h.activity("x", fn)
    h.start("w", "i1")
    h.advance(1)
    h.advance(2)
    assert h.status("i1") == "FAILED" and fn.calls["n"] == 3
    assert "failure 3" in h.states["i1"]["error"]["message"]
    assert_replays(h)


def test_unlimited_attempts() -> None:
    h = harness(wf("w", [{"id": "a", "task": "x", "output": "r",
                          "retry": {"initial": "1s", "backoff": 1.0, "max_attempts": 0}}]))
    h.activity("x", flaky(20))
    h.start("w", "i1")
    for _ in range(20):
        h.advance(1)
    assert h.status("i1") == "COMPLETED"


def test_jitter_is_deterministic_and_bounded() -> None:
    p = RetrySpec(initial="10s", backoff=2.0, jitter=0.5)
    a = [retry_delay_ms(p, "i1", "a-1", n) for n in range(1, 6)]
    assert a == [retry_delay_ms(p, "i1", "a-1", n) for n in range(1, 6)]
    assert a != [retry_delay_ms(p, "i2", "a-1", n) for n in range(1, 6)]
    for n, d in enumerate(a, start=1):
        base = 10_000 * 2 ** (n - 1)
        assert base * 0.5 <= d <= base * 1.5
    h = harness(wf("w", [{"id": "a", "task": "x", "retry": {"initial": "10s", "jitter": 0.5}}]))
    h.activity("x", flaky(1))
    h.start("w", "i1")
    (timer,) = h.states["i1"]["timers"].values()
    aid = events_of(h, "i1", "ActivityScheduled")[0]["activity_id"]
    assert timer["due"] - h.clock.ms == retry_delay_ms(RetrySpec(initial="10s", jitter=0.5), "i1", aid, 1)
    assert_replays(h)


# -- timeouts ---------------------------------------------------------------------------------
def manual(doc: dict[str, Any]) -> EngineHarness:
    h = harness(doc)
    h.auto_run_tasks = False
    return h


def test_start_to_close_from_schedule_then_retry_and_late_result_is_stale() -> None:
    h = manual(wf("w", [{"id": "a", "task": "x", "output": "r", "timeout": {"start_to_close": "30s"},
                         "retry": {"initial": "1s", "max_attempts": 2}}]))
    h.start("w", "i1")
    t1 = h.pending_tasks.popleft()
    h.advance(30)
    assert events_of(h, "i1", "ActivityTimedOut") == [{"activity_id": t1.activity_id, "attempt": 1,
                                                       "kind": "start_to_close"}]
    # during the backoff, the timed-out attempt's result is stale
    h.send("CompleteActivity", "i1", activity_id=t1.activity_id, attempt=1, result="late")
    assert events_of(h, "i1", "CommandRejected")[-1]["code"] == "STALE"
    h.advance(1)
    t2 = h.pending_tasks.popleft()
    assert (t2.activity_id, t2.attempt) == (t1.activity_id, 2)
    h.send("CompleteActivity", "i1", activity_id=t1.activity_id, attempt=1, result="late")
    assert events_of(h, "i1", "CommandRejected")[-1]["code"] == "STALE"
    h.send("CompleteActivity", "i1", activity_id=t2.activity_id, attempt=2, result="fine")
    assert h.status("i1") == "COMPLETED" and h.result("i1") == {"r": "fine"}
    assert_replays(h)


def test_start_to_close_runs_from_the_start_report() -> None:
    h = manual(wf("w", [{"id": "a", "task": "x", "timeout": {"start_to_close": "30s"}}]))
    h.start("w", "i1")
    t = h.pending_tasks.popleft()
    h.advance(20)
    h.send("StartActivity", "i1", activity_id=t.activity_id, attempt=1)
    h.send("StartActivity", "i1", activity_id=t.activity_id, attempt=1)  # redelivered: ignored
    assert h.events("i1").count("ActivityStarted") == 1
    h.advance(20)
    assert h.status("i1") == "RUNNING"
    h.advance(10)
    assert h.status("i1") == "FAILED"
    err = h.states["i1"]["error"]
    assert err["type"] == "ActivityTimeout" and "start_to_close" in err["message"]
    assert_replays(h)


def test_schedule_to_close_spans_attempts_and_is_final() -> None:
    h = harness(wf("w", [{"id": "a", "task": "x", "timeout": {"schedule_to_close": "5s"},
                          "retry": {"initial": "2s", "backoff": 1.0, "max_attempts": 0}}]))
    h.activity("x", flaky(100))
    h.start("w", "i1")
    h.advance(2)
    h.advance(2)
    assert h.status("i1") == "RUNNING"
    h.advance(1)
    assert h.status("i1") == "FAILED"
    err = h.states["i1"]["error"]
    assert err["type"] == "ActivityTimeout" and "schedule_to_close" in err["message"]
    assert not h.states["i1"]["timers"]
    assert_replays(h)


def test_heartbeat_timeout_and_reset() -> None:
    h = manual(wf("w", [{"id": "a", "task": "x", "timeout": {"heartbeat": "10s"}}]))
    h.start("w", "i1")
    t = h.pending_tasks.popleft()
    hb = {"activity_id": t.activity_id, "attempt": 1, "details": None}
    h.advance(3)
    h.send("HeartbeatActivity", "i1", **hb)  # recorded: the silence counts from here
    h.advance(0.5)
    h.send("HeartbeatActivity", "i1", **hb)  # within a tenth of the timeout of the last one: not recorded
    assert h.events("i1").count("HeartbeatRecorded") == 1
    h.advance(2.5)
    h.send("HeartbeatActivity", "i1", **hb)  # recorded; the timer re-arms from it when it fires
    assert h.events("i1").count("HeartbeatRecorded") == 2
    h.advance(9)
    assert h.status("i1") == "RUNNING"  # 15 s after start, only 9 s after the last heartbeat
    h.advance(1)
    assert h.status("i1") == "FAILED"
    err = h.states["i1"]["error"]
    assert err["type"] == "ActivityTimeout" and "heartbeat" in err["message"]
    assert_replays(h)


def test_heartbeats_without_heartbeat_timeout_record_nothing() -> None:
    h = manual(wf("w", [{"id": "a", "task": "x"}]))
    h.start("w", "i1")
    t = h.pending_tasks.popleft()
    n = len(h.history["i1"])
    h.advance(60)
    h.send("HeartbeatActivity", "i1", activity_id=t.activity_id, attempt=1, details=None)
    assert len(h.history["i1"]) == n


def test_workflow_execution_timeout() -> None:
    h = manual(wf("w", [{"id": "a", "task": "x"}], timeout={"execution": "1h"}))
    h.start("w", "i1")
    h.advance(3600)
    assert h.status("i1") == "FAILED" and h.states["i1"]["error"]["type"] == "WorkflowTimeout"
    assert_replays(h)


# -- catch ------------------------------------------------------------------------------------
def test_catch_routes_error_to_goto_with_output() -> None:
    h = harness(wf("w", [
        {"id": "charge", "task": "pay", "output": "charge",
         "catch": [{"errors": ["CardDeclined", "ActivityTimeout"], "goto": "notify", "output": "error"}]},
        {"id": "done", "succeed": "'paid'"},
        {"id": "notify", "task": "notify", "input": "error"},
    ]))
    h.activity("pay", flaky(1, error=CardDeclined))
    seen = []
    h.activity("notify", lambda e: seen.append(e))
    h.start("w", "i1")
    assert h.status("i1") == "COMPLETED"
    assert seen[0]["type"] == "CardDeclined" and "failure 1" in seen[0]["message"]
    assert h.result("i1")["error"] == seen[0]
    assert_replays(h)


def test_catch_not_matching_fails_workflow() -> None:
    h = harness(wf("w", [
        {"id": "a", "task": "x", "catch": [{"errors": ["Other"], "goto": "b"}]},
        {"id": "b", "succeed": None},
    ]))
    h.activity("x", flaky(1))
    h.start("w", "i1")
    assert h.status("i1") == "FAILED"


def test_catch_wait_timeout_and_catch_all() -> None:
    h = harness(wf("w", [
        {"id": "w1", "wait": {"signal": "go", "timeout": "1m"}, "catch": [{"goto": "late", "output": "e"}]},
        {"id": "ok", "succeed": "'on time'"},
        {"id": "late", "succeed": "e.type"},
    ]))
    h.start("w", "i1")
    h.advance(60)
    assert h.status("i1") == "COMPLETED" and h.result("i1") == "Timeout"
    assert_replays(h)


def test_catch_on_parallel_cancels_siblings() -> None:
    h = harness(wf("w", [
        {"id": "fan", "parallel": [
            {"steps": [{"id": "slow", "sleep": "1h"}]},
            {"steps": [{"id": "bad", "task": "x"}]},
        ], "catch": [{"errors": ["*"], "goto": "recover", "output": "err"}]},
        {"id": "unreached", "fail": {"error": "No"}},
        {"id": "recover", "succeed": "err.type"},
    ]))
    h.activity("x", flaky(1))
    h.start("w", "i1")
    assert h.status("i1") == "COMPLETED" and h.result("i1") == "RuntimeError"
    assert_replays(h)


def test_catch_on_child_failure() -> None:
    child = wf("kid", [{"id": "no", "fail": {"error": "OutOfStock"}}])
    h = harness(child, wf("p", [
        {"id": "c", "child": {"workflow": "kid"}, "catch": [{"errors": ["OutOfStock"], "goto": "alt"}]},
        {"id": "x", "fail": {"error": "No"}},
        {"id": "alt", "succeed": "'alt'"},
    ]))
    h.start("p", "p1")
    assert h.status("p1") == "COMPLETED" and h.result("p1") == "alt"


def test_catch_validation() -> None:
    from kflow.model.errors import DefinitionError
    with pytest.raises(DefinitionError, match="goto target 'nowhere'"):
        harness(wf("w", [{"id": "a", "task": "x", "catch": [{"goto": "nowhere"}]}]))
    with pytest.raises(DefinitionError, match="only allowed on a task step"):
        harness(wf("w", [{"id": "a", "sleep": "1s", "retry": {"initial": "1s"}}]))


# -- sagas ------------------------------------------------------------------------------------
SAGA = wf("trip", [
    {"id": "flight", "task": "book_flight", "output": "flight",
     "compensate": {"task": "cancel_flight", "input": "flight"}},
    {"id": "hotel", "task": "book_hotel", "output": "hotel",
     "compensate": {"task": "cancel_hotel", "input": "hotel"}},
    {"id": "car", "task": "book_car", "output": "car", "compensate": {"task": "cancel_car", "input": "car"}},
])


def saga_harness(car_fails: bool = True) -> tuple[EngineHarness, list[Any]]:
    h = harness(SAGA)
    undone: list[Any] = []
    h.activity("book_flight", lambda _: "F1")
    h.activity("book_hotel", lambda _: "H1")
    h.activity("book_car", flaky(1 if car_fails else 0, result="C1"))
    h.activity("cancel_flight", lambda x: undone.append(("flight", x)))
    h.activity("cancel_hotel", lambda x: undone.append(("hotel", x)))
    h.activity("cancel_car", lambda x: undone.append(("car", x)))
    return h, undone


def test_saga_compensates_in_reverse_order_then_fails() -> None:
    h, undone = saga_harness()
    h.start("trip", "i1")
    assert undone == [("hotel", "H1"), ("flight", "F1")]
    st = h.states["i1"]
    assert st["status"] == "FAILED" and st["compensation"] == "completed"
    assert st["error"]["type"] == "RuntimeError"
    evs = h.events("i1")
    assert evs[-1] == "WorkflowFailed"
    comp = [d["activity_id"] for d in events_of(h, "i1", "ActivityScheduled") if d["activity_id"].startswith("compensate:")]
    assert [c.split("-")[0] for c in comp] == ["compensate:hotel", "compensate:flight"]
    assert_replays(h)


def test_saga_success_runs_no_compensation() -> None:
    h, undone = saga_harness(car_fails=False)
    h.start("trip", "i1")
    assert h.status("i1") == "COMPLETED" and undone == []


def test_failed_compensation_is_recorded_and_the_rest_still_run() -> None:
    h, undone = saga_harness()
    h.activity("cancel_hotel", flaky(1))
    h.start("trip", "i1")
    st = h.states["i1"]
    assert st["status"] == "FAILED" and st["compensation"] == "failed"
    assert undone == [("flight", "F1")]
    assert st["compensation_errors"][0]["step"] == "hotel"


def test_cancel_mid_saga_compensates_completed_steps() -> None:
    h, undone = saga_harness()
    h.auto_run_tasks = False
    h.start("trip", "i1")
    h.run_task(h.pending_tasks.popleft())  # flight
    h.drain()
    h.run_task(h.pending_tasks.popleft())  # hotel
    h.drain()
    car = h.pending_tasks.popleft()
    h.send("CancelWorkflow", "i1", reason="changed plans")
    assert h.status("i1") == "CANCELLING"
    h.send("CancelWorkflow", "i1", reason="again")
    assert events_of(h, "i1", "CommandRejected")[-1]["code"] == "INVALID_STATE"
    h.send("CompleteActivity", "i1", activity_id=car.activity_id, attempt=1, result="C1")  # too late
    assert events_of(h, "i1", "CommandRejected")[-1]["code"] == "STALE"  # an abandoned attempt
    while h.pending_tasks:
        h.run_task(h.pending_tasks.popleft())
        h.drain()
    st = h.states["i1"]
    assert undone == [("hotel", "H1"), ("flight", "F1")]
    assert st["status"] == "CANCELLED" and st["compensation"] == "completed"
    assert st["error"] == {"type": "Cancelled", "message": "changed plans"}
    assert h.events("i1")[-1] == "WorkflowCancelled"
    assert_replays(h)


def test_compensation_retries_with_its_own_policy() -> None:
    doc = wf("s", [
        {"id": "a", "task": "do", "output": "a",
         "compensate": {"task": "undo", "input": "a", "retry": {"initial": "1s", "max_attempts": 3}}},
        {"id": "b", "fail": {"error": "Nope"}},
    ])
    h = harness(doc)
    h.activity("do", lambda _: 1)
    undo = flaky(2)
    h.activity("undo", undo)
    h.start("s", "i1")
    assert h.status("i1") == "COMPENSATING"
    h.advance(1)
    h.advance(2)
    st = h.states["i1"]
    assert st["status"] == "FAILED" and st["compensation"] == "completed" and undo.calls["n"] == 3
    assert st["error"]["type"] == "Nope"
    assert_replays(h)


# -- terminate --------------------------------------------------------------------------------
def test_terminate_skips_compensation_and_is_idempotent() -> None:
    h, undone = saga_harness()
    h.auto_run_tasks = False
    h.start("trip", "i1")
    h.run_task(h.pending_tasks.popleft())
    h.drain()
    h.send("TerminateWorkflow", "i1", reason="ops")
    st = h.states["i1"]
    assert st["status"] == "TERMINATED" and st["error"] == {"type": "Terminated", "message": "ops"}
    assert not st["activities"] and not st["timers"]
    h.send("TerminateWorkflow", "i1", reason="ops")
    h.send("CancelWorkflow", "i1", reason="x")
    assert [d["code"] for d in events_of(h, "i1", "CommandRejected")] == ["INVALID_STATE", "INVALID_STATE"]
    while h.pending_tasks:
        h.run_task(h.pending_tasks.popleft())
        h.drain()
    assert undone == []
    assert_replays(h)


def test_terminate_notifies_parent_and_children() -> None:
    h = harness(wf("kid", [{"id": "w", "wait": {"signal": "go"}}]),
                wf("p", [{"id": "c", "child": {"workflow": "kid", "id": "'k1'"}}]))
    h.start("p", "p1")
    h.send("TerminateWorkflow", "p1", reason="stop")
    assert h.status("p1") == "TERMINATED" and h.status("k1") == "TERMINATED"


# -- limits -----------------------------------------------------------------------------------
def test_pending_activity_limit_fails_with_limit_exceeded() -> None:
    h = manual(wf("w", [{"id": "each", "foreach": "input", "steps": [{"id": "t", "task": "x"}]}]))
    h.defs.limits = Limits(max_pending_activities=3)  # type: ignore[attr-defined]
    h.start("w", "i1", input=[1, 2, 3, 4, 5])
    st = h.states["i1"]
    assert st["status"] == "FAILED" and st["error"]["type"] == "LimitExceeded"
    assert_replays(h)


def test_oversized_activity_input_and_result_and_signal() -> None:
    h = manual(wf("w", [{"id": "a", "task": "x", "input": "input", "output": "r"},
                        {"id": "w", "wait": {"signal": "s"}}]))
    h.defs.limits = Limits(max_payload_bytes=100)  # type: ignore[attr-defined]
    h.start("w", "big", input="x" * 200)
    assert h.status("big") == "FAILED" and h.states["big"]["error"]["type"] == "LimitExceeded"
    h.start("w", "i1", input="small")
    t = h.pending_tasks.popleft()
    h.send("CompleteActivity", "i1", activity_id=t.activity_id, attempt=1, result="y" * 200)
    assert h.status("i1") == "FAILED" and h.states["i1"]["error"]["type"] == "LimitExceeded"
    h.start("w", "i2", input="small")
    t = h.pending_tasks.popleft()
    h.send("CompleteActivity", "i2", activity_id=t.activity_id, attempt=1, result="ok")
    h.signal("i2", "s", "z" * 200)
    assert events_of(h, "i2", "CommandRejected")[-1]["code"] == "LIMIT_EXCEEDED"
    assert h.status("i2") == "RUNNING"
    h.signal("i2", "s", "fine")
    assert h.status("i2") == "COMPLETED"
    assert_replays(h)


# -- property: random interleavings of failures, timers, cancel and terminate replay exactly ---------

PROP_WF = wf("prop", [
    {"id": "a", "task": "x", "output": "a", "compensate": {"task": "undo", "input": "a"},
     "retry": {"initial": "1s", "max_attempts": 3, "jitter": 0.3}, "timeout": {"start_to_close": "5s", "heartbeat": "2s"}},
    {"id": "b", "task": "x", "output": "b", "compensate": {"task": "undo", "input": "b"},
     "catch": [{"errors": ["ActivityTimeout"], "goto": "c", "output": "err"}]},
    {"id": "c", "wait": {"signal": "go", "timeout": "10s"}, "catch": [{"goto": "d"}]},
    {"id": "d", "task": "x"},
], timeout={"execution": "1m"})

ACTIONS = st.lists(st.tuples(st.sampled_from(["ok", "fail", "nofail", "start", "beat", "tick", "signal", "cancel",
                                              "terminate", "stale"]), st.integers(0, 3)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ACTIONS)
def test_random_failure_interleavings_replay_and_close_cleanly(actions: list[tuple[str, int]]) -> None:
    h = manual(PROP_WF)
    h.start("prop", "i1")
    for kind, n in actions:
        tasks = list(h.pending_tasks)
        t = tasks[n % len(tasks)] if tasks else None
        base = {"activity_id": t.activity_id, "attempt": t.attempt} if t else None
        if kind in ("ok", "fail", "nofail", "stale") and t is not None:
            h.pending_tasks.remove(t)
            if kind == "ok":
                h.send("CompleteActivity", "i1", **base, result=n)
            elif kind == "stale":
                h.send("CompleteActivity", "i1", activity_id=t.activity_id, attempt=t.attempt + 1, result=n)
            else:
                h.send("FailActivity", "i1", **base, error_type="E", message="m", retryable=kind == "fail")
        elif kind == "start" and base:
            h.send("StartActivity", "i1", **base)
        elif kind == "beat" and base:
            h.send("HeartbeatActivity", "i1", **base, details=None)
        elif kind == "tick":
            h.advance(n + 0.5)
        elif kind == "signal":
            h.signal("i1", "go", n)
        elif kind == "cancel":
            h.send("CancelWorkflow", "i1", reason="r")
        elif kind == "terminate":
            h.send("TerminateWorkflow", "i1", reason="r")
    assert h.reprocess() == h.states
    s = h.states["i1"]
    if s["status"] in ("COMPLETED", "FAILED", "CANCELLED", "TERMINATED"):
        assert not s["activities"] and not s["timers"] and not s["threads"]
    for timer in s["timers"].values():
        if "activity" in timer:
            assert timer["activity"] in s["activities"]
    assert [e.seq for e in h.history["i1"]] == list(range(1, len(h.history["i1"]) + 1))
