"""``evolve`` applies every input event through its typed model (:mod:`kflow.model.events`), built once:
an event whose data does not fit its model (a corrupt history, or an engine defect) is refused with its
type, sequence number and fields named, during a live decision, a replay (``fold``) and the resume of
a suspended instance alike; the commands and events the engine makes from the models carry the same
data as before."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

import kflow
import kflow.authoring
from kflow.engine import InMemoryDefinitions, compile_spec, decide, evolve, fold
from kflow.engine.core import Decision
from kflow.engine.run import Run, new_state
from kflow.model.errors import DeterminismError
from kflow.model.events import ActivityScheduled, TimerStarted, from_data, to_data
from kflow.model.messages import Command, Event, Status
from kflow.testing.harness import EngineHarness
from tests.unit.engine.test_typed_commands import NOW, TASK_WF, WAIT_WF, started

CHILD_WF = {"name": "parent", "version": 1, "steps": [
    {"id": "sub", "child": {"workflow": "waiter", "input": "input"}, "output": "k"}]}


def defs() -> InMemoryDefinitions:
    d = InMemoryDefinitions()
    for doc in (WAIT_WF, TASK_WF, CHILD_WF):
        d.add(compile_spec(doc))
    return d




# -- an event that does not fit its model --------------------------------------------------------------
@pytest.mark.parametrize(("type_", "data", "fields"), [
    ("SignalReceived", {"data": 1, "signal_id": "s"}, "SignalReceived: missing field(s) 'name'"),
    ("SignalReceived", {"name": "go", "data": 1, "sender": "x"}, "SignalReceived: unknown field(s) 'sender'"),
    ("WorkflowCancelled", {}, "WorkflowCancelled: missing field(s) 'reason'"),
    ("ActivityFailed", {"activity_id": "a", "attempt": 1, "error_type": "E", "message": "m"},
     "ActivityFailed: missing field(s) 'retryable'"),
])
def test_evolve_refuses_an_event_that_does_not_fit_its_model(type_: str, data: dict[str, Any], fields: str) -> None:
    d = defs()
    st = started(d)
    before = copy.deepcopy(st)
    seq = st["seq"] + 1
    with pytest.raises(DeterminismError) as caught:
        evolve(st, Event(type_, "i1", seq, NOW + 1, data), d)
    assert str(caught.value) == f"instance i1: event #{seq} does not fit its model: {fields}"
    assert (caught.value.instance_id, caught.value.seq, caught.value.expected) == ("i1", seq, (type_, data))
    assert st == before


def test_a_start_that_does_not_fit_its_model_is_refused_before_any_state_is_made() -> None:
    with pytest.raises(DeterminismError, match=r"event #1 does not fit its model: WorkflowStarted: missing field\(s\) "
                                               r"'input'"):
        evolve(None, Event("WorkflowStarted", "i1", 1, NOW, {"workflow": "waiter", "version": 1}), defs())


def test_fold_refuses_a_recorded_event_that_does_not_fit_its_model() -> None:
    h = EngineHarness()
    h.deploy(WAIT_WF)
    h.start("waiter", "i1")
    h.signal("i1", "go", {"ok": True})
    history = h.history["i1"]
    assert fold(history, h.defs) == h.states["i1"]  # as recorded, it replays
    [i] = [n for n, e in enumerate(history) if e.type == "SignalReceived"]
    tampered = list(history)
    tampered[i] = replace(history[i], data={**history[i].data, "nmae": "go"})
    with pytest.raises(DeterminismError) as caught:
        fold(tampered, h.defs)
    assert str(caught.value) == (f"instance i1: event #{history[i].seq} does not fit its model: "
                                 "SignalReceived: unknown field(s) 'nmae'")


def test_an_event_held_while_suspended_is_read_through_its_model_when_it_is_applied() -> None:
    h = EngineHarness()
    h.deploy(WAIT_WF)
    h.start("waiter", "i1")
    h.send("SuspendWorkflow", "i1", reason="")
    h.signal("i1", "go", 7)
    st = h.states["i1"]
    [held] = st["suspended"]["held"]
    assert (held["type"], held["data"]) == ("SignalReceived", {"name": "go", "data": 7, "signal_id": ""})
    resumed = decide(st, Command("ResumeWorkflow", "i1", {"reason": ""}), h.clock.ms, h.defs)
    assert resumed.state is not None and resumed.state["status"] == Status.COMPLETED
    assert resumed.state["result"] == {"g": 7}  # the held signal, applied on resume

    corrupt = copy.deepcopy(st)
    del corrupt["suspended"]["held"][0]["data"]["name"]
    with pytest.raises(DeterminismError, match=rf"event #{held['seq']} does not fit its model: "
                                               r"SignalReceived: missing field\(s\) 'name'"):
        decide(corrupt, Command("ResumeWorkflow", "i1", {"reason": ""}), h.clock.ms, h.defs)


# -- what the engine makes from the models ---------------------------------------------------------------
class CommandsHarness(EngineHarness):
    """The harness, keeping every command the engine sent, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Command] = []

    def _process(self, cmd: Command) -> Decision:
        d = super()._process(cmd)
        self.sent.extend(d.commands)
        return d


def test_a_spec_child_start_carries_the_same_data_as_before() -> None:
    h = CommandsHarness()
    for doc in (WAIT_WF, CHILD_WF):
        h.deploy(doc)
    h.start("parent", "p1", {"n": 1})
    [start] = [c for c in h.sent if c.type == "StartWorkflow"]
    assert list(start.data.items()) == [("workflow", "waiter"), ("version", 1), ("input", {"n": 1}),
                                        ("parent_id", "p1"), ("parent_ref", start.instance_id), ("id_reuse", None),
                                        ("priority", None)]
    h.signal(start.instance_id, "go", "done")
    assert h.result("p1") == {"k": {"g": "done"}}
    h.send("CancelWorkflow", "p1", reason="x")  # closed already: nothing more is sent
    assert [c.type for c in h.sent] == ["StartWorkflow", "CompleteChild"]


@kflow.workflow(name="typed.parent", version=1)
async def code_parent(ctx: Any, input: Any) -> Any:
    ctx.set_priority("high", reason="")
    return await ctx.child("waiter", input, id="kid-1")


def test_code_child_start_and_priority_carry_the_same_data_as_before() -> None:
    h = CommandsHarness()
    h.deploy(WAIT_WF)
    h.defs.add(kflow.authoring.definition_of(code_parent))
    h.start("typed.parent", "c1", 5)
    priority, start = h.sent[:2]
    assert (priority.type, priority.instance_id) == ("SetPriority", "c1")
    assert list(priority.data.items()) == [("priority", 2), ("reason", "ctx.set_priority")]
    assert (start.type, start.instance_id) == ("StartWorkflow", "kid-1")
    assert list(start.data.items()) == [("workflow", "waiter"), ("version", 1), ("input", 5), ("parent_id", "c1"),
                                        ("parent_ref", "kid-1"), ("id_reuse", None), ("priority", 2)]
    h.signal("kid-1", "go", "ok")
    assert h.status("c1") == Status.COMPLETED and h.result("c1") == {"g": "ok"}
    assert fold(h.history["c1"], h.defs) == h.states["c1"]


def test_an_event_recorded_from_its_model_carries_its_fields_in_schema_order() -> None:
    run = Run(new_state("i1", "orders", 1, "spec", None, NOW, None, None), NOW + 5, defs())
    scheduled = run.record(ActivityScheduled(activity_id="charge", name="charge", queue="default", input={"n": 1},
                                             attempt=1))
    timer = run.record(TimerStarted(timer_id="t2", due_ms=NOW + 100, purpose="retry"))
    assert [(e.type, e.seq, e.ts) for e in run.events] == [("ActivityScheduled", 1, NOW + 5), ("TimerStarted", 2, NOW + 5)]
    assert list(scheduled.data.items()) == [("activity_id", "charge"), ("name", "charge"), ("queue", "default"),
                                            ("input", {"n": 1}), ("attempt", 1)]
    assert timer.data == {"timer_id": "t2", "due_ms": NOW + 100, "purpose": "retry"}
    assert from_data(timer.type, timer.data) == TimerStarted(timer_id="t2", due_ms=NOW + 100, purpose="retry")
    assert to_data(from_data(scheduled.type, scheduled.data)) == scheduled.data
    assert run.state["seq"] == 2
