"""Incidents end to end: the real engine and a worker on the test broker, the client and the CLI.

A task whose retries run out under ``on_failure: {incident: ...}`` keeps its instance open with an
incident; ``kflow incidents`` lists it from the state topic; once the activity is fixed, ``kflow
incident resolve --retry`` runs the step again and the workflow completes, its earlier steps not
run again; ``kflow graph --instance`` draws the path it took.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from typing import Any

from typer.testing import CliRunner

from kflow.cli import app
from kflow.testing import assert_eventually
from kflow.worker import activity

#: Instance key -> whether ``incident.charge`` fails for it; calls per (activity, key).
BROKEN: dict[str, bool] = {}
CALLS: dict[tuple[str, str], int] = {}
_lock = threading.Lock()


def _count(name: str, key: str) -> None:
    with _lock:
        CALLS[(name, key)] = CALLS.get((name, key), 0) + 1


@activity("incident.reserve")
def reserve(req: dict[str, Any]) -> dict[str, Any]:
    _count("reserve", req["key"])
    return {"key": req["key"], "sku": req["sku"]}


@activity("incident.charge")
def charge(req: dict[str, Any]) -> dict[str, Any]:
    _count("charge", req["key"])
    if BROKEN.get(req["key"], False):
        raise RuntimeError("card service down")
    return {"paid": req["sku"], "card": req.get("card")}


@activity("incident.ship")
def ship(req: dict[str, Any]) -> str:
    _count("ship", req["key"])
    return f"shipped {req['paid']} with {req['card']}"


ORDER = {"name": "incident_order", "version": 1, "steps": [
    {"id": "reserve", "task": "incident.reserve", "input": "input", "output": "r"},
    {"id": "charge", "task": "incident.charge", "input": "{'key': r.key, 'sku': r.sku}", "output": "c",
     "retry": {"initial": "100ms", "max_attempts": 2},
     "on_failure": {"incident": {"role": "ops", "instructions": "restart the card service, then retry",
                                 "timeout": "1h"}}},
    {"id": "ship", "task": "incident.ship", "input": "{'key': r.key, 'paid': c.paid, 'card': c.card}"},
]}


def _kflow(stack: Any, *args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--bootstrap", stack.bootstrap, "--prefix", stack.prefix])


def test_an_incident_resolved_by_retry_after_the_fix_completes_the_workflow(engine_only_stack: Any) -> None:
    stack = engine_only_stack
    stack.start_worker([sys.modules[__name__]])
    stack.client.deploy(ORDER)
    iid = f"inc-{uuid.uuid4().hex[:6]}"
    BROKEN[iid] = True
    handle = stack.client.start("incident_order", {"key": iid, "sku": "A1"}, id=iid)
    state = assert_eventually(
        lambda: (lambda s: s if (s or {}).get("status") == "INCIDENT" else None)(stack.client.status(iid)), timeout=60)
    assert CALLS[("charge", iid)] == 2
    assert "restart the card service" in state["error_message"]

    listed = assert_eventually(lambda: [json.loads(line) for line in _kflow(stack, "incidents", "--json", "--role",
                                                                            "ops").stdout.splitlines()
                                        if json.loads(line)["instance_id"] == iid], timeout=30)
    (row,) = listed
    assert (row["step"], row["role"], row["error_type"]) == ("charge", "ops", "RuntimeError")

    missing = _kflow(stack, "incident", "resolve", iid, "nope", "--retry")
    assert missing.exit_code == 1
    assert f"instance '{iid}' (INCIDENT) has no open incident 'nope' (open: {row['incident_id']})" in missing.stderr

    BROKEN[iid] = False  # the card service is back
    out = _kflow(stack, "incident", "resolve", iid, row["incident_id"], "--retry", "--input-patch",
                 '{"card": "tok_2"}', "--reason", "service restarted")
    assert out.exit_code == 0, out.output
    result = handle.result(timeout=60)  # the workflow's variables: no step's output is its result
    assert result["c"] == {"paid": "A1", "card": "tok_2"}
    assert stack.client.status(iid)["status"] == "COMPLETED"
    assert (CALLS[("reserve", iid)], CALLS[("charge", iid)], CALLS[("ship", iid)]) == (1, 3, 1)
    history = stack.client.history(iid)
    resolved = [e.data for e in history if e.type == "IncidentResolved"]
    assert [(r["incident_id"], r["action"], r["input_patch"], r["reason"]) for r in resolved] == [
        (row["incident_id"], "retry", {"card": "tok_2"}, "service restarted")]
    types = [e.type for e in history]
    assert types.index("IncidentRaised") < types.index("IncidentResolved") < types.index("WorkflowCompleted")

    drawn = _kflow(stack, "graph", "incident_order", "--instance", iid, "--format", "mermaid")
    assert drawn.exit_code == 0, drawn.output
    assert "  class n0,n1,n2 done;" in drawn.stdout.splitlines()


def test_an_incident_resolved_by_skip_through_the_client(engine_only_stack: Any) -> None:
    stack = engine_only_stack
    stack.start_worker([sys.modules[__name__]])
    stack.client.deploy(ORDER)
    iid = f"inc-{uuid.uuid4().hex[:6]}"
    BROKEN[iid] = True
    handle = stack.client.start("incident_order", {"key": iid, "sku": "B2"}, id=iid)
    state = assert_eventually(
        lambda: (lambda s: s if (s or {}).get("status") == "INCIDENT" else None)(stack.client.status(iid)), timeout=60)
    (incident_id,) = state["internal"]["incidents"]
    handle.resolve_incident(incident_id, "skip", output={"paid": "B2", "card": "invoice"}, by="ops-1")
    assert_eventually(lambda: (stack.client.status(iid) or {}).get("status") == "COMPLETED", timeout=60)
    assert CALLS[("charge", iid)] == 2 and CALLS[("ship", iid)] == 1
    assert stack.client.status(iid)["result"]["c"] == {"paid": "B2", "card": "invoice"}
