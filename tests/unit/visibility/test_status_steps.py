"""Step states of an instance from its history: what ``kflow status`` and the console draw.

Each case runs a spec workflow through the pure engine (``EngineHarness``) and checks the step
states computed from the recorded history against what really happened.
"""

from __future__ import annotations

from typing import Any

from kflow.testing.harness import EngineHarness
from kflow.visibility.graph import history_steps, resolve_steps, step_index, succeed_steps, track_steps

ROUTED = {"name": "routed", "version": 1, "steps": [
    {"id": "a", "task": "work", "output": "x"},
    {"id": "note", "set": {"seen": "x"}},
    {"id": "fan", "parallel": [{"steps": [{"id": "b1", "task": "work"}]},
                               {"steps": [{"id": "b2", "wait": {"signal": "go"}}]}]},
    {"id": "route", "choice": [{"when": "x > 100", "goto": "big"}], "otherwise": "small"},
    {"id": "small", "succeed": "'small'"},
    {"id": "big", "fail": {"error": "TooBig"}},
]}

CHECKOUT = {"name": "checkout", "version": 1, "steps": [
    {"id": "reserve", "task": "work", "output": "r"},
    {"id": "charge", "task": "charge", "timeout": {"schedule_to_close": "30s"}, "output": "paid",
     "catch": [{"errors": ["CardDeclined", "ActivityTimeout"], "goto": "notify", "output": "error"}]},
    {"id": "ok", "succeed": "paid"},
    {"id": "notify", "set": {"why": "error.type"}},
    {"id": "handled", "succeed": "why"},
]}


def run(doc: dict[str, Any], iid: str = "i1", **activities: Any) -> EngineHarness:
    h = EngineHarness()
    h.deploy(doc)
    for name, fn in activities.items():
        h.activity(name, fn)
    h.start(doc["name"], iid, {"n": 1})
    return h


def steps_of(h: EngineHarness, doc: dict[str, Any], iid: str = "i1") -> dict[str, str]:
    steps = history_steps(doc, h.history[iid])
    assert steps is not None
    return steps


def test_a_completed_instance_shows_every_step_it_ran_as_done_and_the_route_not_taken_as_pending():
    h = run(ROUTED, work=lambda _: 7)
    h.signal("i1", "go")
    assert h.status("i1") == "COMPLETED" and h.result("i1") == "small"
    assert steps_of(h, ROUTED) == {s: "done" for s in ("a", "note", "fan", "b1", "b2", "route", "small")}
    # the last state record alone knows nothing of the steps once the instance closed
    final = track_steps({}, "COMPLETED", h.states["i1"])
    assert resolve_steps(final, step_index(ROUTED), "COMPLETED", succeed_steps(ROUTED)) == {}


def test_a_running_instance_shows_where_it_waits():
    h = run(ROUTED, work=lambda _: 7)
    assert steps_of(h, ROUTED) == {"a": "done", "note": "done", "fan": "running", "b1": "done", "b2": "running"}


def test_a_failed_instance_shows_the_failed_step_and_leaves_the_rest_pending():
    def declined(_: Any) -> Any:
        raise RuntimeError("card declined")

    h = run(CHECKOUT, work=lambda _: "r1", charge=declined)  # RuntimeError is not caught by the route
    assert h.status("i1") == "FAILED"
    assert steps_of(h, CHECKOUT) == {"reserve": "done", "charge": "failed"}


def test_a_fail_step_that_ran_is_the_failed_step():
    h = run(ROUTED, work=lambda _: 500)
    h.signal("i1", "go")
    assert h.status("i1") == "FAILED"
    steps = steps_of(h, ROUTED)
    assert steps["route"] == "done" and steps["big"] == "failed" and "small" not in steps


def test_a_caught_timeout_shows_the_step_failed_and_the_handler_that_produced_the_result_done():
    h = EngineHarness()
    h.deploy(CHECKOUT)
    h.activity("work", lambda _: "r1")
    h.auto_run_tasks = False
    h.start("checkout", "i1", {"n": 1})
    h.run_task(h.pending_tasks.popleft())  # reserve answers ...
    h.drain()
    assert [t.name for t in h.pending_tasks] == ["charge"]  # ... charge never does
    h.advance(31)
    assert h.status("i1") == "COMPLETED" and h.result("i1") == "ActivityTimeout"
    assert steps_of(h, CHECKOUT) == {"reserve": "done", "charge": "failed", "notify": "done", "handled": "done"}


def test_a_caught_activity_error_routes_like_a_timeout():
    class CardDeclined(Exception):
        pass

    def declined(_: Any) -> Any:
        raise CardDeclined("no funds")

    h = run(CHECKOUT, work=lambda _: "r1", charge=declined)
    assert h.result("i1") == "CardDeclined"
    assert steps_of(h, CHECKOUT) == {"reserve": "done", "charge": "failed", "notify": "done", "handled": "done"}


def test_a_retried_attempt_is_not_a_failure():
    doc = {"name": "retried", "version": 1, "steps": [
        {"id": "flaky", "task": "flaky", "retry": {"initial": "1s", "max_attempts": 3}},
        {"id": "end", "succeed": "'ok'"},
    ]}
    calls = {"n": 0}

    def flaky(_: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("once")
        return "ok"

    h = run(doc, flaky=flaky)
    assert steps_of(h, doc) == {"flaky": "running"}  # waiting out the backoff
    h.advance(2)
    assert h.status("i1") == "COMPLETED"
    assert steps_of(h, doc) == {"flaky": "done", "end": "done"}


def test_a_step_waiting_when_the_instance_is_cancelled_is_failed():
    h = run(ROUTED, work=lambda _: 7)
    h.send("CancelWorkflow", "i1", reason="stop")
    assert h.status("i1") == "CANCELLED"
    steps = steps_of(h, ROUTED)
    assert steps["a"] == "done" and steps["b2"] == "failed" and steps["fan"] == "failed"
    assert "route" not in steps


def test_a_history_of_another_definition_is_not_replayed():
    h = run(ROUTED, work=lambda _: 7)
    other = {**ROUTED, "steps": [{"id": "only", "wait": {"signal": "x"}}]}
    assert history_steps(other, h.history["i1"]) is None
    assert history_steps(ROUTED, []) is None
