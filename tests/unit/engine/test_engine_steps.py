"""Every spec step kind, run through the pure engine with ``EngineHarness`` and a manual clock."""

from __future__ import annotations

from typing import Any

import pytest

from kflow.engine import decide
from kflow.model.messages import Command
from kflow.testing.harness import EngineHarness


def wf(name: str, steps: list[dict[str, Any]], version: int = 1) -> dict[str, Any]:
    return {"name": name, "version": version, "steps": steps}


def harness(*docs: dict[str, Any], **activities: Any) -> EngineHarness:
    h = EngineHarness()
    for doc in docs:
        h.deploy(doc)
    for name, fn in activities.items():
        h.activity(name, fn)
    return h


def replays(h: EngineHarness) -> None:
    """Folding the recorded histories must rebuild the live states exactly."""
    assert h.reprocess() == h.states


def event_data(h: EngineHarness, iid: str, type_: str) -> list[dict[str, Any]]:
    return [e.data for e in h.history[iid] if e.type == type_]


# -- set -----------------------------------------------------------------------------------------
def test_set_evaluates_against_input_and_earlier_variables() -> None:
    h = harness(wf("w", [
        {"id": "a", "set": {"x": "input.n * 2", "greeting": "'hi ' + input.who"}},
        {"id": "b", "set": {"y": "x + 1"}},
    ]))
    h.start("w", "i1", {"n": 4, "who": "ann"})
    assert h.status("i1") == "COMPLETED"
    assert h.result("i1") == {"x": 8, "greeting": "hi ann", "y": 9}
    replays(h)


# -- task ----------------------------------------------------------------------------------------
def test_task_schedules_on_its_queue_with_mapped_input_and_stores_output() -> None:
    h = harness(wf("w", [
        {"id": "charge", "task": "charge_card", "queue": "payments", "input": "{'amount': input.amount * 2}",
         "output": "receipt"},
        {"id": "done", "succeed": "receipt.id + ':' + string(receipt.amount)"},
    ]), charge_card=lambda inp: {"id": "r1", "amount": inp["amount"]})
    h.auto_run_tasks = False
    h.start("w", "i1", {"amount": 21})
    assert len(h.pending_tasks) == 1
    task = h.pending_tasks[0]
    assert (task.name, task.queue, task.input, task.attempt, task.workflow) == ("charge_card", "payments",
                                                                               {"amount": 42}, 1, "w")
    [scheduled] = event_data(h, "i1", "ActivityScheduled")
    assert scheduled == {"activity_id": task.activity_id, "name": "charge_card", "queue": "payments",
                         "input": {"amount": 42}, "attempt": 1}
    assert h.status("i1") == "RUNNING"
    h.run_task(h.pending_tasks.popleft())
    h.drain()
    assert h.status("i1") == "COMPLETED"
    assert h.result("i1") == "r1:42"
    replays(h)


def test_task_default_queue_and_no_input() -> None:
    h = harness(wf("w", [{"id": "t", "task": "noop"}]), noop=lambda inp: inp)
    h.auto_run_tasks = False
    h.start("w", "i1", {"ignored": True})
    task = h.pending_tasks[0]
    assert task.queue == "default"
    assert task.input is None


def test_task_failure_fails_the_workflow_with_the_activity_error_type() -> None:
    def boom(_: Any) -> Any:
        raise ValueError("card declined")

    h = harness(wf("w", [{"id": "charge", "task": "charge_card"}, {"id": "after", "set": {"x": "1"}}]),
                charge_card=boom)
    h.start("w", "i1")
    assert h.status("i1") == "FAILED"
    err = h.states["i1"]["error"]
    assert err["type"] == "ValueError"
    assert "card declined" in err["message"] and "charge" in err["message"]
    assert "x" not in h.states["i1"]["vars"]
    replays(h)


def test_unregistered_activity_fails_with_unknown_activity() -> None:
    h = harness(wf("w", [{"id": "t", "task": "missing"}]))
    h.start("w", "i1")
    assert h.status("i1") == "FAILED"
    assert h.states["i1"]["error"]["type"] == "UnknownActivity"


# -- choice --------------------------------------------------------------------------------------
CHOICE = wf("w", [
    {"id": "route", "choice": [{"when": "input.n > 10", "goto": "big"}, {"when": "input.n > 5", "goto": "mid"}],
     "otherwise": "small"},
    {"id": "big", "set": {"size": "'big'"}, "goto": "end"},
    {"id": "mid", "set": {"size": "'mid'"}, "goto": "end"},
    {"id": "small", "set": {"size": "'small'"}},
    {"id": "end", "succeed": "size"},
])


@pytest.mark.parametrize(("n", "expected"), [(20, "big"), (7, "mid"), (1, "small")])
def test_choice_first_true_rule_wins_else_otherwise(n: int, expected: str) -> None:
    h = harness(CHOICE)
    h.start("w", "i1", {"n": n})
    assert h.result("i1") == expected
    assert h.states["i1"]["vars"] == {"size": expected}  # the goto skipped the other branches
    replays(h)


def test_choice_without_match_or_otherwise_falls_through_to_the_next_step() -> None:
    h = harness(wf("w", [
        {"id": "route", "choice": [{"when": "input.n > 10", "goto": "big"}]},
        {"id": "next", "set": {"path": "'fell through'"}},
        {"id": "big", "set": {"big": "true"}},
    ]))
    h.start("w", "i1", {"n": 1})
    assert h.result("i1") == {"path": "fell through", "big": True}
    h.start("w", "i2", {"n": 11})
    assert h.result("i2") == {"big": True}


def test_choice_rule_must_evaluate_to_true_not_merely_truthy() -> None:
    h = harness(wf("w", [
        {"id": "route", "choice": [{"when": "input.n", "goto": "yes"}], "otherwise": "no"},
        {"id": "yes", "succeed": "'yes'"},
        {"id": "no", "succeed": "'no'"},
    ]))
    h.start("w", "i1", {"n": 1})
    assert h.result("i1") == "no"


# -- parallel ------------------------------------------------------------------------------------
def test_parallel_output_is_branch_last_outputs_in_branch_order() -> None:
    h = harness(wf("w", [
        {"id": "fan", "output": "results", "parallel": [
            {"steps": [{"id": "a", "task": "echo", "input": "'A'"}]},
            {"steps": [{"id": "b", "set": {"x": "2"}}]},
            {"steps": [{"id": "c1", "task": "echo", "input": "'C1'"}, {"id": "c2", "task": "echo", "input": "'C2'"}]},
        ]},
    ]), echo=lambda inp: inp.lower())
    h.auto_run_tasks = False
    h.start("w", "i1")
    assert [t.input for t in h.pending_tasks] == ["A", "C1"]  # both branches started at once
    # complete in reverse order of branch position
    h.run_task(h.pending_tasks.pop())
    h.drain()
    assert [t.input for t in h.pending_tasks] == ["A", "C2"]
    h.run_task(h.pending_tasks.pop())
    h.drain()
    assert h.status("i1") == "RUNNING"
    h.run_task(h.pending_tasks.pop())
    h.drain()
    assert h.status("i1") == "COMPLETED"
    assert h.result("i1") == {"results": ["a", {"x": 2}, "c2"]}
    replays(h)


def test_parallel_branch_variables_stay_local_and_see_workflow_variables() -> None:
    h = harness(wf("w", [
        {"id": "base", "set": {"k": "10"}},
        {"id": "fan", "output": "r", "parallel": [
            {"steps": [{"id": "b1", "set": {"v": "k + 1"}}]},
            {"steps": [{"id": "b2", "set": {"v": "k + 2"}}]},
        ]},
    ]))
    h.start("w", "i1")
    assert h.result("i1") == {"k": 10, "r": [{"v": 11}, {"v": 12}]}


# -- foreach -------------------------------------------------------------------------------------
def test_foreach_output_is_in_item_order_whatever_the_completion_order() -> None:
    h = harness(wf("w", [
        {"id": "each", "foreach": "input.items", "as": "it", "output": "doubled",
         "steps": [{"id": "double", "task": "double", "input": "it"}]},
    ]), double=lambda x: x * 2)
    h.auto_run_tasks = False
    h.start("w", "i1", {"items": [1, 2, 3, 4]})
    assert [t.input for t in h.pending_tasks] == [1, 2, 3, 4]  # concurrency 0 = all at once
    while h.pending_tasks:
        h.run_task(h.pending_tasks.pop())  # newest first
        h.drain()
    assert h.result("i1") == {"doubled": [2, 4, 6, 8]}
    replays(h)


def test_foreach_respects_concurrency() -> None:
    h = harness(wf("w", [
        {"id": "each", "foreach": "input.items", "concurrency": 2, "output": "out",
         "steps": [{"id": "work", "task": "work", "input": "item"}]},
    ]), work=lambda x: x + 100)
    h.auto_run_tasks = False
    h.start("w", "i1", {"items": [1, 2, 3, 4, 5]})
    seen_inputs: list[int] = []
    max_pending = 0
    flip = False
    while h.pending_tasks:
        pending_in_state = [a for a in h.states["i1"]["activities"].values() if a["step"] == "work"]
        assert len(pending_in_state) == len(h.pending_tasks) <= 2
        max_pending = max(max_pending, len(h.pending_tasks))
        task = h.pending_tasks.pop() if flip else h.pending_tasks.popleft()
        flip = not flip
        seen_inputs.append(task.input)
        h.run_task(task)
        h.drain()
    assert max_pending == 2
    assert sorted(seen_inputs) == [1, 2, 3, 4, 5]
    assert h.result("i1") == {"out": [101, 102, 103, 104, 105]}
    replays(h)


def test_foreach_over_empty_list_outputs_empty_list() -> None:
    h = harness(wf("w", [{"id": "each", "foreach": "input.items", "output": "out",
                          "steps": [{"id": "t", "task": "never"}]}]))
    h.start("w", "i1", {"items": []})
    assert h.result("i1") == {"out": []}
    assert h.events("i1") == ["WorkflowStarted", "WorkflowCompleted"]


def test_foreach_over_a_non_list_is_an_expression_error() -> None:
    h = harness(wf("w", [{"id": "each", "foreach": "input.items", "steps": [{"id": "t", "set": {"a": "1"}}]}]))
    h.start("w", "i1", {"items": 3})
    assert h.status("i1") == "FAILED"
    assert h.states["i1"]["error"]["type"] == "ExpressionError"
    assert "each" in h.states["i1"]["error"]["message"]


# -- wait ----------------------------------------------------------------------------------------
WAIT_AFTER_TASK = wf("w", [
    {"id": "prep", "task": "prep"},
    {"id": "approval", "wait": {"signal": "approve"}, "output": "decision"},
    {"id": "done", "succeed": "decision.by"},
])


def test_signal_before_the_wait_is_buffered_and_consumed() -> None:
    h = harness(WAIT_AFTER_TASK, prep=lambda _: None)
    h.auto_run_tasks = False
    h.start("w", "i1")
    h.signal("i1", "approve", {"by": "ann"})
    assert h.states["i1"]["signals"] == {"approve": [{"by": "ann"}]}
    assert h.status("i1") == "RUNNING"
    h.run_task(h.pending_tasks.popleft())
    h.drain()
    assert h.status("i1") == "COMPLETED"
    assert h.result("i1") == "ann"
    assert h.states["i1"]["signals"] == {}
    replays(h)


def test_buffered_signals_are_consumed_in_arrival_order() -> None:
    h = harness(wf("w", [
        {"id": "prep", "task": "prep"},
        {"id": "w1", "wait": {"signal": "s"}, "output": "a"},
        {"id": "w2", "wait": {"signal": "s"}, "output": "b"},
    ]), prep=lambda _: None)
    h.auto_run_tasks = False
    h.start("w", "i1")
    h.signal("i1", "s", 1)
    h.signal("i1", "s", 2)
    h.run_task(h.pending_tasks.popleft())
    h.drain()
    assert h.result("i1") == {"a": 1, "b": 2}


def test_signal_after_the_wait_is_reached_resumes_it() -> None:
    h = harness(WAIT_AFTER_TASK, prep=lambda _: None)
    h.start("w", "i1")
    assert h.status("i1") == "RUNNING"
    h.signal("i1", "other", {"by": "nobody"})
    assert h.status("i1") == "RUNNING"  # a different signal name does not wake the wait
    h.signal("i1", "approve", {"by": "bob"})
    assert h.result("i1") == "bob"
    replays(h)


def test_wait_timeout_fails_with_timeout_when_the_clock_passes_it() -> None:
    h = harness(wf("w", [{"id": "approval", "wait": {"signal": "approve", "timeout": "30s"}}]))
    h.start("w", "i1")
    started = h.clock.ms
    [timer] = event_data(h, "i1", "TimerStarted")
    assert timer["due_ms"] == started + 30_000
    h.advance(29)
    assert h.status("i1") == "RUNNING"
    h.advance(1)
    assert h.status("i1") == "FAILED"
    err = h.states["i1"]["error"]
    assert err["type"] == "Timeout"
    assert "approval" in err["message"] and "approve" in err["message"]
    assert h.events("i1")[-2:] == ["TimerFired", "WorkflowFailed"]
    replays(h)


def test_signal_cancels_the_timeout_timer() -> None:
    h = harness(wf("w", [{"id": "approval", "wait": {"signal": "approve", "timeout": "30s"}, "output": "d"}]))
    h.start("w", "i1")
    [timer] = event_data(h, "i1", "TimerStarted")
    state = h.states["i1"]
    d = decide(state, Command("SignalWorkflow", "i1", {"name": "approve", "data": "ok"}), h.clock.ms + 5, h.defs)
    assert d.timers_cancel == [(timer["timer_id"], timer["due_ms"])]
    assert d.timers_set == []
    assert d.state is not None and d.state["timers"] == {} and d.state["status"] == "COMPLETED"
    # through the harness: once signalled, advancing past the old deadline changes nothing
    h.signal("i1", "approve", "ok")
    h.advance(60)
    assert h.status("i1") == "COMPLETED"
    assert h.result("i1") == {"d": "ok"}
    assert "TimerFired" not in h.events("i1")
    replays(h)


# -- sleep ---------------------------------------------------------------------------------------
def test_sleep_is_not_done_before_its_duration_and_done_after() -> None:
    h = harness(wf("w", [{"id": "nap", "sleep": "10s"}, {"id": "after", "set": {"woke": "true"}}]))
    h.start("w", "i1")
    [timer] = event_data(h, "i1", "TimerStarted")
    assert timer["due_ms"] == h.clock.ms + 10_000
    h.advance(9)
    assert h.status("i1") == "RUNNING"
    assert "woke" not in h.states["i1"]["vars"]
    h.advance(1)
    assert h.status("i1") == "COMPLETED"
    assert h.result("i1") == {"woke": True}
    assert h.states["i1"]["timers"] == {}
    replays(h)


def test_sleep_duration_units() -> None:
    h = harness(wf("w", [{"id": "nap", "sleep": "2m"}]))
    h.start("w", "i1")
    h.advance(119)
    assert h.status("i1") == "RUNNING"
    h.advance(1)
    assert h.status("i1") == "COMPLETED"


# -- child ---------------------------------------------------------------------------------------
CHILD = wf("child_wf", [
    {"id": "double", "task": "double", "input": "input.n", "output": "d"},
    {"id": "ret", "succeed": "{'doubled': d}"},
])
PARENT = wf("parent", [
    {"id": "call", "child": {"workflow": "child_wf", "input": "{'n': input.n}"}, "output": "c"},
    {"id": "done", "succeed": "c.doubled + 1"},
])


def test_parent_gets_the_child_result_and_the_child_knows_its_parent() -> None:
    h = harness(CHILD, PARENT, double=lambda n: n * 2)
    h.start("parent", "p1", {"n": 5})
    assert h.status("p1") == "COMPLETED"
    assert h.result("p1") == 11
    [started] = event_data(h, "p1", "ChildStarted")
    child_id = started["child_id"]
    assert started["workflow"] == "child_wf" and started["input"] == {"n": 5} and started["version"] == 1
    child = h.states[child_id]
    assert child["status"] == "COMPLETED"
    assert child["parent_id"] == "p1"
    assert child["parent_ref"] == child_id
    assert event_data(h, "p1", "ChildCompleted") == [{"child_id": child_id, "result": {"doubled": 10}}]
    replays(h)


def test_child_id_expression_names_the_child_instance() -> None:
    parent = wf("parent", [{"id": "call", "child": {"workflow": "child_wf", "input": "{'n': input.n}",
                                                     "id": "'order-' + string(input.n)"}}])
    h = harness(CHILD, parent, double=lambda n: n * 2)
    h.start("parent", "p1", {"n": 3})
    assert h.states["order-3"]["parent_id"] == "p1"
    assert h.result("p1") == {}  # no output on the child step, so no variables


def test_child_failure_fails_the_parent() -> None:
    child = wf("child_wf", [{"id": "nope", "fail": {"error": "OutOfStock", "message": "'sku ' + input.sku"}}])
    parent = wf("parent", [{"id": "call", "child": {"workflow": "child_wf", "input": "input"}},
                           {"id": "after", "set": {"x": "1"}}])
    h = harness(child, parent)
    h.start("parent", "p1", {"sku": "X1"})
    assert h.status("p1") == "FAILED"
    err = h.states["p1"]["error"]
    assert err["type"] == "OutOfStock"
    assert "sku X1" in err["message"] and "call" in err["message"]
    assert "x" not in h.states["p1"]["vars"]
    replays(h)


@pytest.mark.parametrize("child_spec", [{"workflow": "ghost"}, {"workflow": "child_wf", "version": 7}])
def test_unknown_child_workflow_fails_the_parent(child_spec: dict[str, Any]) -> None:
    h = harness(CHILD, wf("parent", [{"id": "call", "child": child_spec}]))
    h.start("parent", "p1")
    assert h.status("p1") == "FAILED"
    err = h.states["p1"]["error"]
    assert err["type"] == "UnknownWorkflow"
    assert "call" in err["message"] and child_spec["workflow"] in err["message"]
    assert "ChildStarted" not in h.events("p1")
    assert h.dlq == []
    replays(h)


# -- succeed / fail / end ------------------------------------------------------------------------
def test_succeed_with_expression_returns_its_value() -> None:
    h = harness(wf("w", [{"id": "a", "set": {"x": "2"}}, {"id": "s", "succeed": "{'total': x * input.k}"},
                         {"id": "unreached", "set": {"y": "1"}}]))
    h.start("w", "i1", {"k": 3})
    assert h.result("i1") == {"total": 6}
    assert "y" not in h.states["i1"]["vars"]
    assert event_data(h, "i1", "WorkflowCompleted") == [{"result": {"total": 6}}]


def test_succeed_without_expression_returns_all_variables() -> None:
    h = harness(wf("w", [{"id": "a", "set": {"x": "2", "y": "'b'"}}, {"id": "s", "succeed": None},
                         {"id": "unreached", "set": {"z": "1"}}]))
    h.start("w", "i1")
    assert h.result("i1") == {"x": 2, "y": "b"}


def test_fail_uses_error_type_and_cel_message() -> None:
    h = harness(wf("w", [{"id": "check", "fail": {"error": "TooBig", "message": "'n is ' + string(input.n)"}},
                         {"id": "unreached", "set": {"z": "1"}}]))
    h.start("w", "i1", {"n": 99})
    assert h.status("i1") == "FAILED"
    assert h.states["i1"]["error"] == {"type": "TooBig", "message": "n is 99"}
    assert event_data(h, "i1", "WorkflowFailed") == [{"error_type": "TooBig", "message": "n is 99"}]
    assert h.events("i1") == ["WorkflowStarted", "WorkflowFailed"]


def test_reaching_the_end_returns_task_outputs_and_set_variables() -> None:
    h = harness(wf("w", [
        {"id": "t", "task": "echo", "input": "input", "output": "echoed"},
        {"id": "anon", "task": "echo", "input": "'not stored'"},
        {"id": "s", "set": {"flag": "true"}},
    ]), echo=lambda x: x)
    h.start("w", "i1", {"a": 1})
    assert h.status("i1") == "COMPLETED"
    assert h.result("i1") == {"echoed": {"a": 1}, "flag": True}
    assert h.events("i1") == ["WorkflowStarted", "ActivityScheduled", "ActivityCompleted", "ActivityScheduled",
                              "ActivityCompleted", "WorkflowCompleted"]
    replays(h)


# -- goto ----------------------------------------------------------------------------------------
def test_goto_counter_loop() -> None:
    h = harness(wf("w", [
        {"id": "init", "set": {"i": "0"}},
        {"id": "body", "task": "tick", "input": "i", "output": "last"},
        {"id": "inc", "set": {"i": "i + 1"}},
        {"id": "again", "choice": [{"when": "i < 5", "goto": "body"}]},
        {"id": "done", "succeed": "{'i': i, 'last': last}"},
    ]), tick=lambda i: i * 10)
    h.start("w", "i1")
    assert h.result("i1") == {"i": 5, "last": 40}
    scheduled = event_data(h, "i1", "ActivityScheduled")
    assert [s["input"] for s in scheduled] == [0, 1, 2, 3, 4]
    assert len({s["activity_id"] for s in scheduled}) == 5  # ids stay unique across loop iterations
    replays(h)


def test_goto_on_a_plain_step_jumps_after_it() -> None:
    h = harness(wf("w", [
        {"id": "a", "set": {"x": "1"}, "goto": "c"},
        {"id": "b", "set": {"skipped": "true"}},
        {"id": "c", "set": {"y": "2"}},
    ]))
    h.start("w", "i1")
    assert h.result("i1") == {"x": 1, "y": 2}


@pytest.mark.parametrize("blocking", [
    {"task": "echo", "input": "1", "output": "got"},
    {"sleep": "1s", "output": "got"},
    {"wait": {"signal": "go"}, "output": "got"},
])
def test_goto_on_a_blocking_step_applies_once_it_resumes(blocking: dict[str, Any]) -> None:
    h = harness(wf("w", [
        {"id": "a", "goto": "c", **blocking},
        {"id": "b", "set": {"skipped": "true"}},
        {"id": "c", "set": {"y": "2"}},
    ]), echo=lambda x: x)
    h.start("w", "i1")
    h.advance(1)
    h.signal("i1", "go", 1)
    assert h.status("i1") == "COMPLETED"
    assert "skipped" not in h.result("i1") and h.result("i1")["y"] == 2
    replays(h)


# -- runtime expression errors -------------------------------------------------------------------
@pytest.mark.parametrize("step", [
    {"id": "bad_set", "set": {"x": "input.missing + 1"}},
    {"id": "bad_input", "task": "t", "input": "1 / 0"},
    {"id": "bad_when", "choice": [{"when": "'a' + 1 == 'a1'", "goto": "bad_when"}]},
    {"id": "bad_succeed", "succeed": "nope.field"},
])
def test_runtime_expression_error_fails_the_workflow_naming_the_step(step: dict[str, Any]) -> None:
    h = harness(wf("w", [step, {"id": "after", "set": {"ok": "true"}}]), t=lambda x: x)
    h.start("w", "i1", {"n": 1})
    assert h.status("i1") == "FAILED"
    err = h.states["i1"]["error"]
    assert err["type"] == "ExpressionError"
    assert f"'{step['id']}'" in err["message"]
    assert h.events("i1") == ["WorkflowStarted", "WorkflowFailed"]
    replays(h)


def test_goto_loop_that_never_blocks_fails_instead_of_spinning(monkeypatch: pytest.MonkeyPatch) -> None:
    from kflow.engine import spec_interpreter

    monkeypatch.setattr(spec_interpreter, "MAX_STEPS_PER_DECISION", 50)
    h = harness(wf("w", [
        {"id": "a", "set": {"x": "1"}},
        {"id": "loop", "choice": [{"when": "x > 0", "goto": "a"}]},
    ]))
    h.start("w", "i1")
    assert h.status("i1") == "FAILED"
    err = h.states["i1"]["error"]
    assert err["type"] == "StepLimitExceeded"
    assert "50" in err["message"]
    replays(h)


def test_bounded_loop_within_the_step_limit_completes(monkeypatch: pytest.MonkeyPatch) -> None:
    from kflow.engine import spec_interpreter

    monkeypatch.setattr(spec_interpreter, "MAX_STEPS_PER_DECISION", 50)
    h = harness(wf("w", [
        {"id": "init", "set": {"i": "0"}},
        {"id": "inc", "set": {"i": "i + 1"}},
        {"id": "again", "choice": [{"when": "i < 20", "goto": "inc"}]},
    ]))
    h.start("w", "i1")
    assert h.result("i1") == {"i": 20}


def test_child_id_taken_by_another_instance_fails_the_parent() -> None:
    leaf = wf("leaf", [{"id": "w", "wait": {"signal": "go"}}])
    parent = wf("parent", [{"id": "call", "child": {"workflow": "leaf", "id": "'shared'"}}])
    h = harness(leaf, parent)
    h.start("parent", "p1")
    h.start("parent", "p2")
    assert h.states["shared"]["parent_id"] == "p1"
    assert h.events("shared") == ["WorkflowStarted", "CommandRejected"]
    assert h.status("p2") == "FAILED"
    assert h.states["p2"]["error"]["type"] == "WorkflowAlreadyStarted"
    assert "call" in h.states["p2"]["error"]["message"]
    h.signal("shared", "go")
    assert h.status("p1") == "COMPLETED"
    replays(h)
