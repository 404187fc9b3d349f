"""Failure policies: ``on_failure: skip`` and incidents an operator resolves by retry, skip or fail.

Driven through :class:`~kflow.testing.harness.EngineHarness` with its manual clock: an incident's
timeout comes due by advancing the clock, never by sleeping. Every engine test ends with the fold
property: replaying the recorded histories from scratch reproduces the live states exactly.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest

import kflow
from kflow.engine.code_context import on_failure_policy
from kflow.engine.core import OWNER, TENANT
from kflow.model.errors import ActivityError, DefinitionError
from kflow.model.messages import Command, Event, RejectCode, Status
from kflow.model.spec import parse_spec
from kflow.schemas.codec import decode_command, decode_event, encode_command, encode_event
from kflow.security.guard import CommandGuard
from kflow.security.policy import Policy, parse_policy
from kflow.security.principal import Principal
from kflow.security.tokens import Keys
from kflow.testing.harness import EngineHarness
from tests.unit.engine.test_lifecycle import order_with_broken_charge

#: reserve -> charge (3 attempts, then an incident for ops, 4h to resolve) -> ship.
ORDER = {"name": "order", "version": 1, "steps": [
    {"id": "reserve", "task": "reserve", "input": "input", "output": "r"},
    {"id": "charge", "task": "charge", "input": "{'sku': r.sku, 'card': 'tok_1'}", "output": "c",
     "retry": {"initial": "1s", "max_attempts": 3},
     "on_failure": {"incident": {"role": "ops", "instructions": "check the card service, then retry",
                                 "timeout": "4h"}}},
    {"id": "ship", "task": "ship", "input": "c", "output": "s"},
]}


def order() -> tuple[EngineHarness, dict[str, list[Any]]]:
    """Instance o1 of ``order`` with its ``charge`` step failing every attempt, every call recorded."""
    h, calls = order_with_broken_charge(ORDER)
    h.advance(1)
    h.advance(2)  # the two backoffs: attempts 2 and 3 fail too
    return h, calls


def incident_id(h: EngineHarness, iid: str = "o1") -> str:
    return next(iter(h.states[iid]["incidents"]))


def resolve(h: EngineHarness, incident: str, action: str, iid: str = "o1", **data: Any) -> None:
    """Send ``ResolveIncident`` with the fields the client sends by default, overridden by ``data``."""
    h.send("ResolveIncident", iid, **{"incident_id": incident, "action": action, "by": "", "reason": "", **data})


def assert_folds(h: EngineHarness) -> None:
    assert h.reprocess() == h.states


def rejection(h: EngineHarness, iid: str = "o1") -> dict[str, Any]:
    last = h.history[iid][-1]
    assert last.type == "CommandRejected"
    return last.data


# -- raising ---------------------------------------------------------------------------------------
def test_exhausted_retries_raise_an_incident_and_the_instance_stays_open() -> None:
    h, calls = order()
    assert len(calls["charge"]) == 3
    assert h.status("o1") == Status.INCIDENT
    raised = [e.data for e in h.history["o1"] if e.type == "IncidentRaised"]
    inc = incident_id(h)
    assert raised == [{"incident_id": inc, "step": "charge", "activity_id": raised[0]["activity_id"],
                       "error_type": "RuntimeError",
                       "message": "activity 'charge' (step 'charge') failed: card service down",
                       "role": "ops", "instructions": "check the card service, then retry"}]
    st = h.states["o1"]
    assert st["error"]["type"] == "RuntimeError"
    assert "check the card service, then retry" in st["error"]["message"]
    assert st["incidents"][inc]["role"] == "ops"
    assert calls["ship"] == []
    assert h.states["o1"]["activities"] == {}
    assert [t["purpose"] for t in st["timers"].values()] == ["incident"]
    h.advance(3 * 3600)  # within the 4h: still waiting for an operator
    assert h.status("o1") == Status.INCIDENT
    assert_folds(h)


# -- resolving -------------------------------------------------------------------------------------
def test_incident_resolved_by_retry_runs_the_step_again_and_later_steps_once() -> None:
    h, calls = order()
    h.activity("charge", lambda x: calls["charge"].append(x) or {"paid": x["sku"]})
    resolve(h, incident_id(h), "retry", by="alice", reason="card service back")
    assert h.status("o1") == Status.COMPLETED
    assert calls["reserve"] == ["A1"]
    assert len(calls["charge"]) == 4
    assert calls["ship"] == [{"paid": "A1"}]
    assert h.result("o1")["s"] == "shipped"
    assert h.states["o1"]["error"] is None and "incidents" not in h.states["o1"]
    resolved = [e.data for e in h.history["o1"] if e.type == "IncidentResolved"]
    assert resolved == [{"incident_id": resolved[0]["incident_id"], "action": "retry", "output": None,
                         "input_patch": None, "by": "alice", "reason": "card service back"}]
    h.advance(5 * 3600)  # the incident's timeout went with it
    assert h.status("o1") == Status.COMPLETED
    assert_folds(h)


def test_retry_with_a_patched_input_and_a_fresh_retry_budget() -> None:
    h, calls = order()
    resolve(h, incident_id(h), "retry", input_patch={"card": "tok_2"})
    assert calls["charge"][-1] == {"sku": "A1", "card": "tok_2"}
    h.advance(1)
    h.advance(2)  # the retried step gets its whole retry policy again, then a new incident
    assert len(calls["charge"]) == 6
    assert h.status("o1") == Status.INCIDENT
    assert [e.type for e in h.history["o1"]].count("IncidentRaised") == 2
    assert_folds(h)


def test_incident_resolved_by_skip_with_an_output() -> None:
    h, calls = order()
    resolve(h, incident_id(h), "skip", output={"paid": "manually"}, by="bob")
    assert h.status("o1") == Status.COMPLETED
    assert len(calls["charge"]) == 3
    assert calls["ship"] == [{"paid": "manually"}]
    assert h.result("o1")["c"] == {"paid": "manually"}
    assert_folds(h)


def test_incident_resolved_by_fail_fails_the_workflow_with_the_steps_error() -> None:
    h, calls = order()
    resolve(h, incident_id(h), "fail", by="carol", reason="card blocked")
    assert h.status("o1") == Status.FAILED
    err = h.states["o1"]["error"]
    assert err["type"] == "RuntimeError"
    assert "card service down" in err["message"] and "by carol: card blocked" in err["message"]
    assert calls["ship"] == []
    assert h.states["o1"]["timers"] == {} and "incidents" not in h.states["o1"]
    assert_folds(h)


def test_an_unresolved_incident_fails_the_workflow_when_its_timeout_comes_due() -> None:
    h, calls = order()
    h.advance(4 * 3600 - 10)
    assert h.status("o1") == Status.INCIDENT
    h.advance(10)
    assert h.status("o1") == Status.FAILED
    err = h.states["o1"]["error"]
    assert err["type"] == "IncidentTimeout"
    assert err["message"].startswith(f"incident '{[e.data for e in h.history['o1'] if e.type == 'IncidentRaised'][0]['incident_id']}' "
                                     "was not resolved within 4h: RuntimeError: ")
    assert calls["ship"] == []
    assert_folds(h)


def test_the_retry_after_a_retry_is_also_a_fresh_retry_policy_and_an_incident_resolves_only_once() -> None:
    h, _ = order()
    first = incident_id(h)
    h.activity("charge", lambda x: {"paid": 1})
    resolve(h, first, "retry")
    resolve(h, first, "skip", output=1)
    assert rejection(h)["code"] == RejectCode.INVALID_STATE  # the instance completed meanwhile
    assert_folds(h)


# -- bad input: one precise rejection, nothing applied -------------------------------------------
@pytest.mark.parametrize(("incident", "action", "data", "code", "reason"), [
    ("nope", "retry", {}, RejectCode.NOT_FOUND, "expected an open incident of 'o1' ({inc}), but got 'nope'"),
    (None, "redo", {}, RejectCode.INVALID_INPUT, "expected action retry, skip, fail, but got 'redo'"),
    (None, "retry", {"input_patch": [1]}, RejectCode.INVALID_INPUT,
     "expected input_patch to be a JSON object, but got list"),
    (None, "fail", {"output": 3}, RejectCode.INVALID_INPUT,
     "expected no output with action fail (it is the output of a skip)"),
    (None, "skip", {"input_patch": {"a": 1}}, RejectCode.INVALID_INPUT,
     "expected no input_patch with action skip (it patches a retry's input)"),
])
def test_bad_resolve_is_rejected_and_changes_nothing(incident: Optional[str], action: str, data: dict[str, Any],
                                                     code: str, reason: str) -> None:
    h, calls = order()
    inc = incident_id(h)
    before = dict(h.states["o1"])
    resolve(h, incident or inc, action, **data)
    assert rejection(h) == {"command_type": "ResolveIncident", "code": code, "reason": reason.format(inc=inc)}
    after = dict(h.states["o1"])
    for key in ("seq", "updated_ms"):
        before.pop(key), after.pop(key)
    assert after == before
    assert len(calls["charge"]) == 3 and h.pending_tasks == type(h.pending_tasks)()
    assert_folds(h)


def test_resolve_on_a_closed_or_unknown_instance_applies_nothing() -> None:
    h, _ = order()
    inc = incident_id(h)
    h.send("CancelWorkflow", "o1", reason="customer withdrew")
    assert h.status("o1") == Status.CANCELLED and "incidents" not in h.states["o1"]
    resolve(h, inc, "retry")
    assert rejection(h) == {"command_type": "ResolveIncident", "code": RejectCode.INVALID_STATE,
                            "reason": f"expected an open instance to resolve incident '{inc}' of, but 'o1' is CANCELLED"}
    resolve(h, inc, "retry", iid="ghost")
    assert h.dlq[-1][1] == "ResolveIncident for unknown instance 'ghost'" and "ghost" not in h.states
    assert_folds(h)


def test_resolve_of_a_suspended_instance_asks_to_resume_first() -> None:
    h, _ = order()
    inc = incident_id(h)
    h.send("SuspendWorkflow", "o1", reason="audit")
    resolve(h, inc, "skip")
    assert rejection(h)["reason"].endswith("is SUSPENDED: resume it first")
    h.send("ResumeWorkflow", "o1", reason="")
    assert h.status("o1") == Status.INCIDENT  # back to the status it was suspended in
    resolve(h, inc, "skip")
    assert h.status("o1") == Status.COMPLETED
    assert_folds(h)


# -- skip, catch and parallel branches -------------------------------------------------------------
SKIPPING = {"name": "enrich", "version": 1, "steps": [
    {"id": "lookup", "task": "lookup", "output": "extra",
     "on_failure": {"skip": {"output": "{'missing': true, 'why': error.type}"}}},
    {"id": "save", "task": "save", "input": "extra"},
]}


def test_on_failure_skip_records_the_step_as_skipped_and_goes_on_with_its_output() -> None:
    h = EngineHarness()
    h.deploy(SKIPPING)
    saved: list[Any] = []
    h.activity("lookup", lambda _: 1 / 0)
    h.activity("save", lambda x: saved.append(x) or "ok")
    h.start("enrich", "e1")
    assert h.status("e1") == Status.COMPLETED
    assert saved == [{"missing": True, "why": "ZeroDivisionError"}]
    skipped = [e.data for e in h.history["e1"] if e.type == "StepSkipped"]
    assert [(s["step"], s["error_type"], s["output"]) for s in skipped] == [
        ("lookup", "ZeroDivisionError", {"missing": True, "why": "ZeroDivisionError"})]
    assert_folds(h)


def test_bare_skip_gives_a_null_output() -> None:
    h = EngineHarness()
    h.deploy({**SKIPPING, "steps": [{**SKIPPING["steps"][0], "on_failure": "skip"}, SKIPPING["steps"][1]]})
    saved: list[Any] = []
    h.activity("lookup", lambda _: 1 / 0)
    h.activity("save", lambda x: saved.append(x) or "ok")
    h.start("enrich", "e1")
    assert saved == [None] and h.status("e1") == Status.COMPLETED
    assert_folds(h)


def test_a_matching_catch_route_wins_over_on_failure() -> None:
    doc = {"name": "c", "version": 1, "steps": [
        {"id": "a", "task": "boom", "on_failure": "incident",
         "catch": [{"errors": ["ValueError"], "goto": "handled", "output": "e"}]},
        {"id": "handled", "succeed": "'handled ' + e.type"},
    ]}
    h = EngineHarness()
    h.deploy(doc)
    h.activity("boom", lambda _: int("x"))
    h.start("c", "c1")
    assert h.result("c1") == "handled ValueError"
    h.activity("boom", lambda _: 1 / 0)
    h.start("c", "c2")
    assert h.status("c2") == Status.INCIDENT
    assert_folds(h)


def test_an_incident_in_one_branch_lets_the_other_branch_go_on() -> None:
    doc = {"name": "p", "version": 1, "steps": [
        {"id": "both", "parallel": [
            {"steps": [{"id": "bad", "task": "bad", "on_failure": {"incident": {}}}]},
            {"steps": [{"id": "nap", "sleep": "10s"}, {"id": "good", "task": "good"}]},
        ], "output": "out"},
    ]}
    h = EngineHarness()
    h.deploy(doc)
    ran: list[str] = []
    h.activity("bad", lambda _: 1 / 0)
    h.activity("good", lambda _: ran.append("good") or "g")
    h.start("p", "p1")
    assert h.status("p1") == Status.INCIDENT
    h.advance(10)
    assert ran == ["good"] and h.status("p1") == Status.INCIDENT
    resolve(h, incident_id(h, "p1"), "skip", iid="p1", output="b")
    assert h.result("p1") == {"out": ["b", "g"]}
    assert_folds(h)


def test_cancel_and_terminate_close_an_instance_with_an_open_incident() -> None:
    for how in ("CancelWorkflow", "TerminateWorkflow"):
        h, _ = order()
        h.send(how, "o1", reason="stop")
        st = h.states["o1"]
        assert st["status"] in (Status.CANCELLED, Status.TERMINATED)
        assert "incidents" not in st and st["timers"] == {}
        assert_folds(h)


def test_compensations_run_when_an_incident_is_resolved_by_fail() -> None:
    doc = {"name": "saga", "version": 1, "steps": [
        {"id": "book", "task": "book", "compensate": {"task": "unbook"}},
        {"id": "pay", "task": "pay", "on_failure": {"incident": {"role": "ops"}}},
    ]}
    h = EngineHarness()
    h.deploy(doc)
    undone: list[Any] = []
    h.activity("book", lambda _: 1)
    h.activity("pay", lambda _: 1 / 0)
    h.activity("unbook", lambda x: undone.append("unbook"))
    h.start("saga", "s1")
    resolve(h, incident_id(h, "s1"), "fail", iid="s1")
    assert undone == ["unbook"] and h.status("s1") == Status.FAILED
    assert h.states["s1"]["compensation"] == "completed"
    assert_folds(h)


# -- the definition format -------------------------------------------------------------------------
@pytest.mark.parametrize(("on_failure", "expected"), [
    ("retry", "expected 'skip', 'incident' or a mapping with one of them, but got 'retry'"),
    ({"incident": {"timeout": "soon"}}, "expected a duration like '2s', '5m', '1h', but got 'soon'"),
    ({"incident": {"rol": "ops"}}, "on_failure.incident.rol: Extra inputs are not permitted"),
    ({"skip": {}, "incident": {}}, "expected exactly one of 'skip' or 'incident'"),
])
def test_bad_on_failure_is_a_definition_error(on_failure: Any, expected: str) -> None:
    with pytest.raises(DefinitionError) as err:
        parse_spec({"name": "x", "steps": [{"id": "a", "task": "t", "on_failure": on_failure}]})
    assert expected in str(err.value) and "step 'a'" in str(err.value)


def test_on_failure_is_only_for_task_steps() -> None:
    with pytest.raises(DefinitionError, match="'on_failure' is only allowed on a task step"):
        parse_spec({"name": "x", "steps": [{"id": "a", "sleep": "1s", "on_failure": "skip"}]})


def test_a_bad_skip_output_expression_is_refused_at_deploy() -> None:
    h = EngineHarness()
    with pytest.raises(DefinitionError, match="invalid expression"):
        h.deploy({"name": "x", "steps": [{"id": "a", "task": "t", "on_failure": {"skip": {"output": "1 +"}}}]})


# -- the wire --------------------------------------------------------------------------------------
def test_incident_records_round_trip_through_avro() -> None:
    cmd = Command("ResolveIncident", "o1", {"incident_id": "charge-9", "action": "skip", "output": {"paid": 0},
                                            "input_patch": None, "by": "bob", "reason": "manual"}, "c1", 5)
    assert decode_command(encode_command(cmd)) == cmd
    for type_, data in [
        ("StepSkipped", {"step": "a", "activity_id": "a-2", "error_type": "E", "message": "m", "output": [1]}),
        ("IncidentRaised", {"incident_id": "a-3", "step": "a", "activity_id": "a-2", "error_type": "E",
                            "message": "m", "role": "ops", "instructions": "look"}),
        ("IncidentResolved", {"incident_id": "a-3", "action": "retry", "output": None, "input_patch": {"x": 1},
                              "by": "", "reason": ""}),
    ]:
        ev = Event(type_, "o1", 7, 9, data)
        assert decode_event(encode_event(ev)) == ev


# -- who may resolve (auth on) ---------------------------------------------------------------------
POLICY = parse_policy({"roles": {"ops": ["instance:View"], "manager": ["instance:Manage"]},
                       "bindings": {"acme": {"olga": ["ops"], "mia": ["manager"], "alice": []}}})


def guard(policy: Policy = POLICY) -> CommandGuard:
    return CommandGuard(Keys(secret=b"s" * 32), lambda: policy, engine_ttl_s=3600)


def incident_state() -> dict[str, Any]:
    h, _ = order()
    st = dict(h.states["o1"])
    st[OWNER], st[TENANT] = "alice", "acme"
    return st


@pytest.mark.parametrize(("who", "allowed"), [
    (Principal("olga", "acme", frozenset()), True),  # bound to the incident's role
    (Principal("root", "other", frozenset({"system_admin"})), True),
    (Principal("alice", "acme", frozenset()), False),  # owns the instance, but lacks the role
    (Principal("mia", "acme", frozenset()), False),  # may manage instances, but lacks the role
    (Principal("olga", "globex", frozenset({"ops"})), False),  # the role, in another tenant
])
def test_resolving_needs_the_incidents_role_or_system_admin(who: Principal, allowed: bool) -> None:
    st = incident_state()
    cmd = Command("ResolveIncident", "o1", {"incident_id": next(iter(st["incidents"])), "action": "retry"})
    check = guard().authorize(who, cmd, st)
    assert check.allowed is allowed, check.reason
    if not allowed:
        assert check.code == RejectCode.FORBIDDEN
        assert "role 'ops'" in check.reason


def test_an_incident_without_a_role_needs_instance_manage() -> None:
    h = EngineHarness()
    h.deploy({"name": "n", "steps": [{"id": "a", "task": "t", "on_failure": "incident"}]})
    h.start("n", "n1")
    st = {**h.states["n1"], OWNER: "alice", TENANT: "acme"}
    cmd = Command("ResolveIncident", "n1", {"incident_id": next(iter(st["incidents"])), "action": "skip"})
    assert guard().authorize(Principal("mia", "acme", frozenset()), cmd, st).allowed
    assert not guard().authorize(Principal("olga", "acme", frozenset()), cmd, st).allowed


# -- code workflows: the activity option -----------------------------------------------------------
@kflow.workflow(name="incidents.code", version=1)
async def code_order(ctx, input):
    paid = await ctx.activity("charge", input, retry={"initial": "1s", "max_attempts": 2},
                              on_failure={"incident": {"role": "ops", "timeout": "1h"}})
    try:
        shipped = await ctx.activity("ship", paid)
    except ActivityError as e:
        shipped = f"not shipped: {e.type}"
    return {"paid": paid, "shipped": shipped}


def code_harness() -> tuple[EngineHarness, list[Any]]:
    h = EngineHarness()
    h.defs.add(kflow.authoring.definition_of(code_order))
    calls: list[Any] = []

    def broken(x: Any) -> Any:
        calls.append(x)
        raise RuntimeError("card service down")

    h.activity("charge", broken)
    h.activity("ship", lambda x: f"shipped {x}")
    h.start("incidents.code", "k1", {"sku": "A1"})
    h.advance(1)
    return h, calls


@pytest.mark.parametrize("cached", [True, False], ids=["live-machine", "rebuilt"])
def test_code_workflow_incident_resolved_by_retry_with_a_patch(cached: bool) -> None:
    h, calls = code_harness()
    assert len(calls) == 2 and h.status("k1") == Status.INCIDENT
    inc = incident_id(h, "k1")
    assert h.states["k1"]["incidents"][inc]["role"] == "ops"
    if not cached:
        h.replay_cache.clear()  # an engine restart while the incident is open
    h.activity("charge", lambda x: calls.append(x) or x["card"])
    resolve(h, inc, "retry", iid="k1", input_patch={"card": "tok_2"})
    assert calls[-1] == {"sku": "A1", "card": "tok_2"}
    assert h.result("k1") == {"paid": "tok_2", "shipped": "shipped tok_2"}
    attempts = [e.data["attempt"] for e in h.history["k1"] if e.type == "ActivityScheduled"
                and e.data["name"] == "charge"]
    assert attempts == [1, 2, 3]  # the same activity, its attempts numbered on
    assert_folds(h)


def test_code_workflow_incident_resolved_by_skip_and_by_fail() -> None:
    h, _ = code_harness()
    resolve(h, incident_id(h, "k1"), "skip", iid="k1", output="manual")
    assert h.result("k1") == {"paid": "manual", "shipped": "shipped manual"}
    h.start("incidents.code", "k2", {"sku": "B2"})
    h.advance(1)
    resolve(h, incident_id(h, "k2"), "fail", iid="k2", reason="card blocked")
    assert h.status("k2") == Status.FAILED
    assert h.states["k2"]["error"]["type"] == "RuntimeError"
    assert_folds(h)


def test_code_workflow_incident_timeout_raises_at_the_await() -> None:
    h, _ = code_harness()
    h.advance(3600)
    assert h.status("k1") == Status.FAILED
    assert h.states["k1"]["error"]["type"] == "IncidentTimeout"
    assert_folds(h)


def test_code_workflow_on_failure_skip_is_refused() -> None:
    with pytest.raises(ValueError, match="catch ActivityError"):
        on_failure_policy("skip")
