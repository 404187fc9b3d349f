"""The events-only mapping of a code workflow's history (``history_from_events``) against the journal
the engine keeps while it decides, for histories with incidents: resolved by retry, by skip with an
output, by fail, or left to time out. Both must hold the same inputs and commands, so replaying a
history from its events (``kflow.testing.replay``, ``kflow replay``, a migration's what-if) agrees
with the engine.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest

import kflow
from kflow.engine.code_history import history_from_events
from kflow.engine.core import Decision
from kflow.engine.journal import COMMAND, Append, Entries, put
from kflow.engine.migration import what_if
from kflow.model.errors import ActivityError
from kflow.model.messages import Command, Event, Status
from kflow.testing import replay
from kflow.testing.harness import EngineHarness


class JournalingHarness(EngineHarness):
    """The harness, keeping every journal entry the engine appended (also after the run closed)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: dict[tuple[str, int], tuple[Entries, Entries]] = {}

    def _process(self, cmd: Command) -> Decision:
        d = super()._process(cmd)
        for op in d.journal:
            if isinstance(op, Append):  # a Reset (close, continue-as-new) would delete what is compared
                inputs, commands = self.kept.setdefault((op.instance_id, op.run), ([], []))
                put(commands if op.kind == COMMAND else inputs, op.index, op.entry)
        return d

    def journal(self, iid: str) -> tuple[Entries, Entries]:
        return self.kept[(iid, self.states[iid].get("run", 1))]


@kflow.workflow(name="history.incidents", version=1)
async def charged(ctx, input):
    try:
        paid = await ctx.activity("charge", input, retry={"initial": "1s", "max_attempts": 2},
                                  start_to_close=30,
                                  on_failure={"incident": {"role": "ops", "timeout": "1.5h"}})
    except ActivityError as e:
        paid = {"error": e.type, "message": e.message, "attempt": e.attempt}
    await ctx.sleep(5)  # a timer of the code's own after the incident
    shipped = await ctx.activity("ship", paid)
    done = await ctx.wait_signal("done")
    return {"paid": paid, "shipped": shipped, "done": done}


def broken(x: Any) -> Any:
    raise RuntimeError("card service down")


def incident_of(h: EngineHarness, iid: str) -> str:
    assert h.status(iid) == Status.INCIDENT
    return next(iter(h.states[iid]["incidents"]))


def started(iid: str, charge: Any = broken) -> JournalingHarness:
    """Instance ``iid`` with its ``charge`` failing both attempts: an incident is open."""
    h = JournalingHarness()
    h.defs.add(kflow.authoring.definition_of(charged))
    h.activity("charge", charge)
    h.activity("ship", lambda x: f"shipped {x}")
    h.start("history.incidents", iid, {"sku": "A1"})
    h.advance(1)  # the backoff: attempt 2 fails too
    incident_of(h, iid)
    return h


def finish(h: EngineHarness, iid: str) -> None:
    h.advance(5)
    h.signal(iid, "done", True)


def agrees(h: JournalingHarness, iid: str, result: Optional[Any] = None) -> list[Event]:
    """The events-only mapping equals the engine's journal, and a replay from the events reproduces the run."""
    events = h.history[iid]
    assert history_from_events(events) == h.journal(iid)
    if h.status(iid) == Status.COMPLETED:
        assert replay(charged, events) == result == h.result(iid)
    return events


def test_incident_resolved_by_retry_maps_to_the_next_attempts_outcome() -> None:
    h = started("r1")
    h.activity("charge", lambda x: {"card": x["card"]})
    h.send("ResolveIncident", "r1", incident_id=incident_of(h, "r1"), action="retry", input_patch={"card": "tok_2"},
           by="", reason="")
    finish(h, "r1")
    paid = {"card": "tok_2"}
    agrees(h, "r1", {"paid": paid, "shipped": f"shipped {paid}", "done": True})


def test_incident_resolved_by_skip_feeds_the_output_as_the_activitys_result() -> None:
    h = started("s1")
    h.send("ResolveIncident", "s1", incident_id=incident_of(h, "s1"), action="skip", output={"manual": 7}, by="",
           reason="")
    finish(h, "s1")
    agrees(h, "s1", {"paid": {"manual": 7}, "shipped": "shipped {'manual': 7}", "done": True})


def test_incident_resolved_by_fail_feeds_the_error() -> None:
    h = started("f1")
    inc = incident_of(h, "f1")
    h.send("ResolveIncident", "f1", incident_id=inc, action="fail", by="mia", reason="card blocked")
    finish(h, "f1")
    paid = h.result("f1")["paid"]
    assert paid["error"] == "RuntimeError" and "resolved as fail by mia: card blocked" in paid["message"]
    agrees(h, "f1", h.result("f1"))


def test_incident_timeout_feeds_an_incident_timeout_error() -> None:
    h = started("t1")
    inc = incident_of(h, "t1")
    h.advance(90 * 60)
    finish(h, "t1")
    paid = h.result("t1")["paid"]
    assert paid["error"] == "IncidentTimeout" and paid["attempt"] == 2
    assert f"incident '{inc}' was not resolved within 90m: RuntimeError: " in paid["message"]
    agrees(h, "t1", h.result("t1"))


def test_an_attempt_timeout_that_opened_an_incident_and_was_skipped() -> None:
    h = JournalingHarness()
    h.defs.add(kflow.authoring.definition_of(charged))
    h.activity("ship", lambda x: f"shipped {x}")
    h.auto_run_tasks = False
    h.start("history.incidents", "a1", {"sku": "A1"})
    h.advance(30)  # attempt 1 times out, the backoff, attempt 2 times out: the incident
    h.advance(1)
    h.advance(30)
    inc = incident_of(h, "a1")
    assert [e.type for e in h.history["a1"]].count("ActivityTimedOut") == 2
    h.pending_tasks.clear()
    h.auto_run_tasks = True
    h.send("ResolveIncident", "a1", incident_id=inc, action="skip", output="manual", by="", reason="")
    finish(h, "a1")
    agrees(h, "a1", {"paid": "manual", "shipped": "shipped manual", "done": True})


@pytest.mark.parametrize("action", ["retry", "skip", "timeout"])
def test_what_if_of_an_open_instance_past_an_incident_is_compatible(action: str) -> None:
    h = started("w1")
    inc = incident_of(h, "w1")
    if action == "timeout":
        h.advance(90 * 60)
    else:
        h.activity("charge", lambda x: "paid")
        h.send("ResolveIncident", "w1", incident_id=inc, action=action, by="", reason="",
               **({"output": "manual"} if action == "skip" else {}))
    h.advance(5)  # ship ran: waiting for the signal
    assert h.status("w1") == Status.RUNNING
    events = agrees(h, "w1")
    report = what_if(events, h.defs, 1)
    assert report.compatible, report.to_json()
    assert replay(charged, events) is None  # still running, and no non-determinism


@kflow.workflow(name="history.queued", version=1)
async def queued_flow(ctx, input):
    got = await ctx.wait_signal("go")
    return {"input": input, "got": got}


def test_a_signal_received_while_queued_is_an_input_after_the_start() -> None:
    from kflow.engine.limits import LimitsView, parse_limits

    h = JournalingHarness()
    h.defs.add(kflow.authoring.definition_of(queued_flow))
    h.defs.quotas = LimitsView(parse_limits({"limits": [{"name": "one", "workflow": "history.queued",  # type: ignore[attr-defined]
                                                         "max_running": 1}]}))
    h.start("history.queued", "q1", 1)
    h.start("history.queued", "q2", 2)
    assert h.status("q2") == Status.QUEUED
    h.signal("q2", "go", "early")  # recorded while q2 waits for its permit
    h.signal("q1", "go", "now")  # q1 completes: q2 is admitted and its code gets the early signal
    assert h.result("q2") == {"input": 2, "got": "early"}
    events = h.history["q2"]
    assert history_from_events(events) == h.journal("q2")
    assert replay(queued_flow, events) == {"input": 2, "got": "early"}
