"""``decide`` reads every command through its typed model (:mod:`kflow.model.commands`), built once:
a command whose data does not fit its model (made in-process or by hand) goes to the DLQ, the reason
naming the fields, and changes nothing."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kflow.engine import InMemoryDefinitions, compile_spec, decide
from kflow.engine.core import TENANT
from kflow.engine.schedules import ScheduleSpec, key_of
from kflow.model.commands import CancelWorkflow, StartWorkflow, command, to_data
from kflow.model.messages import Command, JSONDict, RejectCode
from kflow.testing.harness import EngineHarness

NOW = 1_700_000_000_000

WAIT_WF = {"name": "waiter", "version": 1, "steps": [{"id": "w", "wait": {"signal": "go"}, "output": "g"}]}
TASK_WF = {"name": "orders", "version": 1, "steps": [{"id": "charge", "task": "charge"}]}


def defs() -> InMemoryDefinitions:
    d = InMemoryDefinitions()
    d.add(compile_spec(WAIT_WF))
    d.add(compile_spec(TASK_WF))
    return d


def started(d: InMemoryDefinitions, workflow: str = "waiter") -> JSONDict:
    dec = decide(None, command(StartWorkflow(workflow=workflow, input={"n": 1}), "i1"), NOW, d)
    assert dec.dlq_reason is None and dec.state is not None
    return dec.state


@pytest.mark.parametrize(("type_", "data", "reason"), [
    ("CancelWorkflow", {"reason": "stop", "reson": "typo"}, "CancelWorkflow: unknown field(s) 'reson'"),
    ("SignalWorkflow", {"data": 1}, "SignalWorkflow: missing field(s) 'name'"),
    ("FailActivity", {"activity_id": "a", "attempt": 1, "error_type": "E", "message": "m"},
     "FailActivity: missing field(s) 'retryable'"),
    ("CompleteActivity", {"activity_id": "a", "attempt": 1, "result": 1, "message": "m"},
     "CompleteActivity: unknown field(s) 'message'"),
    ("SuspendWorkflow", {}, "SuspendWorkflow: missing field(s) 'reason'"),
])
def test_a_command_that_does_not_fit_its_model_is_dead_lettered(type_: str, data: dict[str, Any],
                                                                 reason: str) -> None:
    d = defs()
    st = started(d)
    before = copy.deepcopy(st)
    dec = decide(st, Command(type_, "i1", data, "c-1", NOW + 1), NOW + 1, d)
    assert dec.dlq_reason == reason
    assert dec.state == before and (dec.events, dec.tasks, dec.commands, dec.journal) == ([], [], [], [])
    assert st == before


def test_a_misfit_for_an_unknown_instance_is_dead_lettered_with_its_fields() -> None:
    dec = decide(None, Command("SignalWorkflow", "ghost", {"name": "go", "date": 1}), NOW, defs())
    assert (dec.state, dec.events, dec.dlq_reason) == (None, [], "SignalWorkflow: unknown field(s) 'date'")


def test_a_command_of_an_unknown_type_is_dead_lettered_as_before() -> None:
    d = defs()
    st = started(d)
    dec = decide(st, Command("RebootWorkflow", "i1", {"reason": "x"}), NOW + 1, d)
    assert (dec.state, dec.events, dec.dlq_reason) == (st, [], "unknown command type 'RebootWorkflow'")


def test_the_same_command_well_formed_is_decided() -> None:
    d = defs()
    st = started(d)
    dec = decide(st, command(CancelWorkflow(reason="stop"), "i1"), NOW + 1, d)
    assert dec.dlq_reason is None
    assert [e.type for e in dec.events] == ["WorkflowCancelled"] and dec.events[0].data == {"reason": "stop"}


# -- objects that are not workflow instances -----------------------------------------------------------
def schedule() -> tuple[EngineHarness, JSONDict]:
    h = EngineHarness()
    h.deploy(WAIT_WF)
    h.send("CreateSchedule", key_of("s"), spec=ScheduleSpec.build("s", "waiter", every="1h").to_dict(), replace=False)
    return h, h.states[key_of("s")]


def test_a_misfit_for_a_schedule_is_dead_lettered() -> None:
    h, st = schedule()
    dec = decide(st, Command("PauseSchedule", key_of("s"), {"note": "n", "until": 5}), h.clock.ms, h.defs)
    assert (dec.state, dec.events, dec.dlq_reason) == (st, [], "PauseSchedule: unknown field(s) 'until'")


def test_a_type_no_model_has_is_still_refused_by_a_schedule() -> None:
    h, st = schedule()
    dec = decide(st, Command("RebootWorkflow", key_of("s"), {}), h.clock.ms, h.defs)
    assert dec.dlq_reason is None
    [ev] = dec.events
    assert ev.type == "CommandRejected" and ev.data["code"] == RejectCode.INVALID_STATE
    assert ev.data["reason"] == "expected a workflow instance for RebootWorkflow, but 'schedule:s' is a schedule"


# -- the processor's tenant stamp ------------------------------------------------------------------------
def test_the_tenant_the_processor_stamps_on_a_start_is_read_but_is_no_field() -> None:
    # with auth on, the processor puts the verified tenant into a StartWorkflow's data (never on the wire)
    d = defs()
    data = {**to_data(StartWorkflow(workflow="orders", input=None)), TENANT: "acme"}
    dec = decide(None, Command("StartWorkflow", "i1", data), NOW, d)
    assert dec.dlq_reason is None
    assert [t.fairness_key for t in dec.tasks] == ["acme"]  # the default fairness key of the first step
    assert TENANT not in dec.events[0].data


def test_a_tenant_key_on_another_command_is_an_unknown_field() -> None:
    d = defs()
    st = started(d)
    dec = decide(st, Command("CancelWorkflow", "i1", {"reason": "stop", TENANT: "acme"}), NOW + 1, d)
    assert dec.dlq_reason == "CancelWorkflow: unknown field(s) 'tenant'"
