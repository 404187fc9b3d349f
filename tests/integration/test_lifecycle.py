"""Suspend, resume and retry end to end: the real engine and a worker on the test broker, the client and the CLI.

A suspended instance must hold a timer that comes due and a signal that arrives, dispatch nothing,
and on resume apply both and run on to its result. A failed instance retried from its failed step
must not run the steps before it again.
"""

from __future__ import annotations

import uuid

import typer
from typer.testing import CliRunner

from kflow._cli import workflows
from kflow.testing import assert_eventually
from tests.integration import flows

NAPPER = {"name": "lifecycle_napper", "version": 1, "steps": [
    {"id": "nap", "sleep": "3s"},
    {"id": "go", "wait": {"signal": "go"}, "output": "g"},
    {"id": "echo", "task": "t.echo", "input": "g", "output": "e"},
    {"id": "done", "succeed": "e"},
]}


FLAKY_ORDER = {"name": "lifecycle_flaky", "version": 1, "steps": [
    {"id": "first", "task": "t.flaky", "input": "{'key': input + '-first', 'fail': 0}", "output": "a"},
    {"id": "second", "task": "t.flaky", "input": "{'key': input + '-second', 'fail': 1}", "output": "b"},
    {"id": "done", "succeed": "[a, b]"},
]}


def _cli() -> typer.Typer:
    """The lifecycle commands as the ``kflow`` CLI runs them."""
    app = typer.Typer()
    for name in ("suspend", "resume", "retry"):
        app.command(name)(getattr(workflows, name))
    return app


def _run(stack, *args: str) -> str:
    out = CliRunner().invoke(_cli(), [*args, "--bootstrap", stack.bootstrap, "--prefix", stack.prefix])
    assert out.exit_code == 0, out.output
    return out.output


def _history(stack, iid: str) -> list[str]:
    return [e.type for e in stack.client.history(iid)]


def test_suspend_holds_timer_and_signal_and_resume_applies_them(engine_only_stack):
    stack = engine_only_stack
    stack.start_worker([flows])
    stack.client.deploy(NAPPER)
    iid = f"ls-{uuid.uuid4().hex[:6]}"
    handle = stack.client.start("lifecycle_napper", None, id=iid)
    assert "suspend requested" in _run(stack, "suspend", iid, "--reason", "supplier outage")
    assert_eventually(lambda: (stack.client.status(iid) or {}).get("status") == "SUSPENDED", timeout=30)

    handle.signal("go", "ahead")
    # the 3s nap comes due while suspended: recorded, not applied
    assert_eventually(lambda: "TimerFired" in _history(stack, iid), timeout=30)
    assert_eventually(lambda: "SignalReceived" in _history(stack, iid), timeout=30)
    history = _history(stack, iid)
    assert "ActivityScheduled" not in history
    assert stack.client.status(iid)["status"] == "SUSPENDED"

    _run(stack, "resume", iid)
    assert handle.result(timeout=60) == "ahead"
    history = _history(stack, iid)
    assert history.index("WorkflowSuspended") < history.index("TimerFired") < history.index("WorkflowResumed")
    assert history.index("WorkflowResumed") < history.index("ActivityScheduled")


def test_suspend_of_a_closed_instance_is_rejected_through_the_client(engine_only_stack):
    stack = engine_only_stack
    stack.start_worker([flows])
    stack.client.deploy(flows.chain("lifecycle_chain", 1))
    iid = f"lc-{uuid.uuid4().hex[:6]}"
    handle = stack.client.start("lifecycle_chain", 1, id=iid)
    handle.result(timeout=60)
    handle.suspend("too late")
    rejected = assert_eventually(
        lambda: [e for e in stack.client.history(iid) if e.type == "CommandRejected"], timeout=30)
    assert rejected[0].data["command_type"] == "SuspendWorkflow"
    assert rejected[0].data["code"] == "INVALID_STATE"
    assert stack.client.status(iid)["status"] == "COMPLETED"


def test_retry_from_the_failed_step_through_the_cli(engine_only_stack):
    stack = engine_only_stack
    stack.start_worker([flows])
    stack.client.deploy(FLAKY_ORDER)
    iid = f"lr-{uuid.uuid4().hex[:6]}"
    stack.client.start("lifecycle_flaky", iid, id=iid)
    assert_eventually(lambda: (stack.client.status(iid) or {}).get("status") == "FAILED", timeout=60)

    assert "retry requested" in _run(stack, "retry", iid, "--reason", "flaky dependency back")
    handle = stack.client.handle(iid)
    assert_eventually(lambda: (stack.client.status(iid) or {}).get("status") == "COMPLETED", timeout=60)
    assert handle.result(timeout=10) == [1, 2]  # the first step ran once, the second twice
    assert flows.FLAKY[f"{iid}-first"] == 1
    retried = [e.data for e in stack.client.history(iid) if e.type == "WorkflowRetried"]
    assert [(r["from_step"], r["reason"], r["attempt"]) for r in retried] == [("second", "flaky dependency back", 1)]
