"""Workflow updates through the pure engine: validation before history, answers, dedup by id, replay."""

from __future__ import annotations

from typing import Any

import pytest

import kflow
from kflow.engine.core import copy_state
from kflow.engine.run import UPDATE_WINDOW, UPDATES
from kflow.model.errors import DefinitionError
from kflow.model.messages import Command
from kflow.testing.harness import EngineHarness

CALLS: list[Any] = []


@kflow.workflow(name="u.cart", version=1)
class Cart:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.done = False
        self.ctx: Any = None

    @kflow.workflow.update
    def add(self, item: Any) -> int:
        CALLS.append(item)
        self.items.append(item)
        return len(self.items)

    @add.validator
    def check_add(self, item: Any) -> None:
        if not isinstance(item, dict) or not item.get("sku"):
            raise ValueError("an item needs a sku")

    @kflow.workflow.update(name="checkout")
    async def pay(self, data: Any) -> Any:
        total = await self.ctx.activity("price", self.items)
        self.done = True
        return {"total": total}

    @kflow.workflow.update
    def explode(self, data: Any) -> None:
        raise kflow.WorkflowError("no such thing", type="Boom")

    @kflow.workflow.query
    def count(self) -> int:
        return len(self.items)

    async def run(self, ctx: Any, input: Any) -> Any:
        self.ctx = ctx
        await ctx.wait_condition(lambda: self.done)
        return {"items": [i["sku"] for i in self.items]}


@kflow.workflow(name="u.fn", version=1)
async def fn_workflow(ctx: Any, input: Any) -> Any:
    seen: list[Any] = []
    ctx.set_update_handler("note", lambda d: seen.append(d) or len(seen),
                           validator=lambda d: isinstance(d, str))
    await ctx.wait_condition(lambda: "stop" in seen)
    return seen


@kflow.workflow(name="u.sneaky", version=1)
async def sneaky(ctx: Any, input: Any) -> Any:
    ctx.set_update_handler("go", lambda d: d, validator=lambda d: ctx.activity("price", d))
    await ctx.sleep(60)
    return "slept"


SPEC = {
    "name": "u.spec", "version": 1,
    "steps": [
        {"id": "ask", "wait": {"update": "approve", "validate": "update.amount <= input.limit",
                               "reply": "{'ok': true, 'amount': decision.amount}", "timeout": "1h"},
         "output": "decision"},
        {"id": "done", "succeed": "decision"},
    ],
}


def harness() -> EngineHarness:
    h = EngineHarness()
    for fn in (Cart, fn_workflow, sneaky):
        h.defs.add(kflow.authoring.definition_of(fn))
    h.deploy(SPEC)
    h.activity("price", lambda items: 10 * len(items))
    CALLS.clear()
    return h


def send(h: EngineHarness, iid: str, name: str, data: Any = None, uid: str = "u") -> list[tuple[str, Any]]:
    """The replies of the one decision an update gets (not of what it causes later)."""
    d = h._process(Command("UpdateWorkflow", iid, {"update_id": uid, "name": name, "data": data}, uid))
    h.drain()
    return d.replies


def kinds(h: EngineHarness, iid: str) -> list[str]:
    return [t for t in h.events(iid) if t.startswith("Update")]


# -- code workflows --------------------------------------------------------------------------------
def test_code_update_is_accepted_answered_and_recorded() -> None:
    h = harness()
    h.start("u.cart", "c1")
    assert h.update("c1", "add", {"sku": "A"}, "u1") == {"result": 1}
    assert h.update("c1", "add", {"sku": "B"}, "u2") == {"result": 2}
    assert kinds(h, "c1") == ["UpdateAccepted", "UpdateCompleted"] * 2
    completed = [e.data for e in h.history["c1"] if e.type == "UpdateCompleted"]
    assert completed[1] == {"update_id": "u2", "result": 2, "error_type": None, "message": None}
    assert kflow.query_state(Cart, h.states["c1"], "count") == 2
    assert h.states["c1"][UPDATES]["u1"] == {"name": "add", "answer": {"result": 1}}
    assert h.reprocess() == h.states


def test_plain_function_workflow_registers_handler_and_validator_on_ctx() -> None:
    h = harness()
    h.start("u.fn", "f1")
    assert h.update("f1", "note", "a", "n1") == {"result": 1}
    rejected = h.update("f1", "note", 42, "n2")
    assert rejected is not None and rejected["rejected"] and rejected["error"]["type"] == "UpdateRejected"
    assert h.update("f1", "note", "stop", "n3") == {"result": 2}
    assert h.status("f1") == "COMPLETED" and h.result("f1") == ["a", "stop"]


@pytest.mark.parametrize("cached", [True, False])
def test_validator_rejection_writes_no_event_and_changes_no_state(cached: bool) -> None:
    h = harness()
    h.start("u.cart", "c1")
    h.update("c1", "add", {"sku": "A"}, "u1")
    history, state = list(h.history["c1"]), copy_state(h.states["c1"])
    if not cached:
        h.replay_cache.clear()  # the validator runs on a machine rebuilt by replay
    replies = send(h, "c1", "add", {"nope": 1}, "bad")
    assert replies == [("bad", {"error": {"type": "ValueError", "message": "an item needs a sku"}, "rejected": True})]
    assert h.history["c1"] == history and h.states["c1"] == state
    assert CALLS[-1] == {"sku": "A"}  # the handler never saw the rejected data (a replay re-runs the first)
    # a rejected id is not remembered: the same id with valid data is accepted
    assert h.update("c1", "add", {"sku": "B"}, "bad") == {"result": 2}


def test_unknown_update_name_is_rejected_with_the_known_ones() -> None:
    h = harness()
    h.start("u.cart", "c1")
    history = list(h.history["c1"])
    answer = h.update("c1", "nope", None, "x")
    assert answer is not None and answer["rejected"] and answer["error"]["type"] == "UnknownUpdate"
    assert "add, checkout, explode" in answer["error"]["message"]
    assert h.history["c1"] == history


@pytest.mark.parametrize("cached", [True, False])
def test_a_validator_that_issues_a_workflow_command_is_refused_and_changes_nothing(cached: bool) -> None:
    h = harness()
    h.start("u.sneaky", "s1")
    history, state = list(h.history["s1"]), copy_state(h.states["s1"])
    if not cached:
        h.replay_cache.clear()
    answer = h.update("s1", "go", [1], "g1")
    assert answer is not None and answer["rejected"] and answer["error"]["type"] == "InvalidValidator"
    assert h.history["s1"] == history and h.states["s1"] == state and not h.pending_tasks
    h.advance(60)  # the instance goes on as before (rebuilt by replay: the refused machine was dropped)
    assert h.status("s1") == "COMPLETED" and h.result("s1") == "slept"


def test_an_async_validator_is_refused_when_the_class_is_written() -> None:
    with pytest.raises(TypeError, match="must be a plain"):
        class Bad:
            @kflow.workflow.update
            def up(self, d: Any) -> None: ...

            @up.validator
            async def check(self, d: Any) -> None: ...


def test_handler_error_is_the_answer_not_the_workflows_failure() -> None:
    h = harness()
    h.start("u.cart", "c1")
    assert h.update("c1", "explode", None, "e1") == {"error": {"type": "Boom", "message": "no such thing"}}
    assert h.status("c1") == "RUNNING"
    assert h.history["c1"][-1].data == {"update_id": "e1", "result": None, "error_type": "Boom",
                                        "message": "no such thing"}


def test_duplicate_update_id_is_answered_from_the_window_without_running_again() -> None:
    h = harness()
    h.start("u.cart", "c1")
    assert h.update("c1", "add", {"sku": "A"}, "same") == {"result": 1}
    events = len(h.history["c1"])
    assert send(h, "c1", "add", {"sku": "A"}, "same") == [("same", {"result": 1})]
    assert CALLS == [{"sku": "A"}] and len(h.history["c1"]) == events


def test_async_handler_is_answered_after_its_activity_completes() -> None:
    h = harness()
    h.start("u.cart", "c1")
    h.update("c1", "add", {"sku": "A"}, "u1")
    h.auto_run_tasks = False
    assert send(h, "c1", "checkout", None, "pay") == []  # accepted; the answer comes later
    assert kinds(h, "c1")[-1] == "UpdateAccepted" and h.states["c1"][UPDATES]["pay"]["answer"] is None
    # the same id again while the handler runs: no second run, no answer yet (the handler's will do)
    assert send(h, "c1", "checkout", None, "pay") == []
    assert kinds(h, "c1").count("UpdateAccepted") == 2  # add + checkout
    h.replay_cache.clear()  # the handler finishes on a machine rebuilt by replay
    task = h.pending_tasks.popleft()
    assert not h.pending_tasks
    d = h._process(Command("CompleteActivity", "c1", {"activity_id": task.activity_id, "attempt": 1, "result": 10}))
    assert d.replies == [("pay", {"result": {"total": 10}})]  # old answers are not sent again
    types = [e.type for e in d.events]
    assert types.index("UpdateCompleted") < types.index("WorkflowCompleted")
    assert h.status("c1") == "COMPLETED" and h.result("c1") == {"items": ["A"]}
    assert h.reprocess() == h.states


def test_update_to_a_closed_or_missing_instance_is_rejected() -> None:
    h = harness()
    h.start("u.cart", "c1")
    assert h.update("c1", "checkout", None, "pay") == {"result": {"total": 0}}
    assert h.status("c1") == "COMPLETED"
    history = list(h.history["c1"])
    answer = h.update("c1", "add", {"sku": "A"}, "late")
    assert answer is not None and answer["rejected"] and answer["error"]["type"] == "InvalidState"
    assert "COMPLETED" in answer["error"]["message"] and h.history["c1"] == history
    # a retried id still gets the answer it got while the instance ran
    assert send(h, "c1", "checkout", None, "pay") == [("pay", {"result": {"total": 0}})]
    missing = h.update("ghost", "add", {"sku": "A"}, "g")
    assert missing is not None and missing["error"]["type"] == "NotFound" and not h.dlq


def test_running_update_is_answered_when_the_instance_closes_under_it() -> None:
    h = harness()
    h.start("u.cart", "c1")
    h.auto_run_tasks = False
    send(h, "c1", "checkout", None, "pay")
    d = h._process(Command("TerminateWorkflow", "c1", {"reason": "ops"}))
    assert d.replies == [("pay", {"error": {"type": "WorkflowClosed",
                                             "message": "'c1' was terminated before the update's handler finished"}})]
    assert h.states["c1"][UPDATES]["pay"]["answer"]["error"]["type"] == "WorkflowClosed"
    assert h.reprocess() == h.states


def test_answered_updates_are_kept_in_a_bounded_window() -> None:
    h = harness()
    h.start("u.fn", "f1")
    for i in range(UPDATE_WINDOW + 5):
        h.update("f1", "note", f"n{i}", f"id{i}")
    window = h.states["f1"][UPDATES]
    assert len(window) == UPDATE_WINDOW and "id0" not in window and f"id{UPDATE_WINDOW + 4}" in window


# -- spec workflows ------------------------------------------------------------------------------
def test_spec_update_completes_the_wait_step_and_replies() -> None:
    h = harness()
    h.start("u.spec", "s1", {"limit": 10})
    assert h.update("s1", "approve", {"amount": 5}, "a1") == {"result": {"ok": True, "amount": 5}}
    assert h.events("s1")[-3:] == ["UpdateAccepted", "UpdateCompleted", "WorkflowCompleted"]
    assert h.result("s1") == {"amount": 5} and h.states["s1"]["timers"] == {}
    assert h.reprocess() == h.states
    assert send(h, "s1", "approve", {"amount": 5}, "a1") == [("a1", {"result": {"ok": True, "amount": 5}})]


def test_spec_validate_false_rejects_without_history() -> None:
    h = harness()
    h.start("u.spec", "s1", {"limit": 10})
    history, state = list(h.history["s1"]), copy_state(h.states["s1"])
    answer = h.update("s1", "approve", {"amount": 50}, "a1")
    assert answer is not None and answer["rejected"] and answer["error"]["type"] == "UpdateRejected"
    assert "update.amount <= input.limit" in answer["error"]["message"]
    assert h.history["s1"] == history and h.states["s1"] == state


def test_spec_update_nobody_waits_for_is_rejected_clearly() -> None:
    h = harness()
    h.start("u.spec", "s1", {"limit": 10})
    answer = h.update("s1", "reject", {}, "r1")
    assert answer is not None and answer["rejected"]
    assert answer["error"]["message"] == "expected a step of 'u.spec' waiting for update 'reject', but it waits for 'approve'"
    h.signal("s1", "approve", {"amount": 1})  # a signal of the same name does not satisfy an update wait
    assert h.status("s1") == "RUNNING"


def test_spec_update_wait_times_out_like_a_signal_wait() -> None:
    h = harness()
    h.start("u.spec", "s1", {"limit": 10})
    h.advance(3600)
    assert h.status("s1") == "FAILED"
    assert h.states["s1"]["error"]["message"] == "step 'ask': no update 'approve' arrived within 1h"


@pytest.mark.parametrize(("wait", "problem"), [
    ({"signal": "a", "update": "b"}, "exactly one of 'signal' or 'update'"),
    ({}, "exactly one of 'signal' or 'update'"),
    ({"signal": "a", "reply": "1"}, "only allowed when waiting for an 'update'"),
])
def test_spec_wait_names_one_thing_to_wait_for(wait: dict[str, Any], problem: str) -> None:
    h = EngineHarness()
    with pytest.raises(DefinitionError, match=problem):
        h.deploy({"name": "bad", "steps": [{"id": "w", "wait": wait}]})


def test_spec_reply_expression_is_checked_at_deploy() -> None:
    h = EngineHarness()
    with pytest.raises(DefinitionError, match="invalid expression"):
        h.deploy({"name": "bad", "steps": [{"id": "w", "wait": {"update": "u", "reply": "1 +"}}]})
