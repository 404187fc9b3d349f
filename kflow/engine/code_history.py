"""What a code workflow is fed: the one mapping from events to its inputs, and the one replay.

Only some events reach the coroutine, some in another form: an activity's final outcome (not a
failed attempt that is retried, nor its start or heartbeats), a timeout of the attempt as that
activity's failure, timers the code started (not the engine's own: activity timeouts, retry
backoff, the execution timeout, the replay retry of a blocked instance, an incident's timeout), and
for an activity whose failure opened an incident, what resolved the incident (a skip's output as
its result; a fail, or the incident's timeout, as its error). :func:`input_of` applies
this while the engine decides, together with the event's effect on the state; :func:`history_from_events`
applies it to a recorded history (``kflow.testing.replay``, ``kflow replay``, the what-if of a
migration). :func:`replay` feeds such inputs to a fresh machine and checks every command the code
issues against the recorded ones; the engine's rebuilds, migrations, queries and updates use it,
and so do ``kflow.testing`` and the CLI.
"""

from __future__ import annotations

from typing import Any, Optional

from kflow.engine import activity as activities
from kflow.engine import incidents
from kflow.engine.code_machine import CodeDefinition, Machine, NondeterminismError, ReplayMismatch, describe, outcome
from kflow.engine.journal import Entries
from kflow.engine.run import Run
from kflow.model.commands import CancelWorkflow
from kflow.model.events import (
    ActivityCompleted,
    ActivityFailed,
    ActivityStarted,
    AnyEvent,
    CancelRequested,
    ChildCompleted,
    ChildFailed,
    HeartbeatRecorded,
    IncidentResolved,
    TimerFired,
)
from kflow.model.messages import Event, Status
from kflow.model.spec import IncidentSpec

__all__ = ["ENGINE_TIMERS", "WORKFLOW_INPUTS", "history_from_events", "input_of", "replay"]

#: Input events a code workflow reacts to; any other input event (e.g. an attempt that started or a
#: recorded heartbeat) is history for the shared deciders only and leaves the coroutine untouched.
WORKFLOW_INPUTS = frozenset({"WorkflowStarted", "ActivityCompleted", "ActivityFailed", "TimerFired",
                             "SignalReceived", "ChildCompleted", "ChildFailed", "CancelRequested",
                             "UpdateAccepted"})

#: Timers the engine starts for activities (timeouts, retry backoff) and for itself; not workflow code's.
ENGINE_TIMERS = frozenset({"activity_timeout", "retry", "execution", "replay", incidents.TIMER_PURPOSE})


def input_of(run: Run, ev: Event, body: AnyEvent) -> Optional[list[Any]]:
    """Apply an input event's effect on the state; return what the coroutine must be fed, or None.

    ``body`` is the event's model, built once by ``core.evolve``: the event's fields are read from
    it. What the coroutine is fed (and journaled) carries the event's ``data`` as recorded.

    Activity lifecycle events (start reports, heartbeats, retries and timeouts that lead to
    another attempt) are the engine's business, shared with spec workflows; the coroutine only
    sees an activity's final outcome.
    """
    st = run.state
    if isinstance(body, ActivityCompleted):
        activities.drop(run, body.activity_id)
    elif isinstance(body, ActivityFailed):
        aid = body.activity_id
        if aid in st["activities"] and activities.retry_or_give_up(run, aid, body.error_type, body.retryable):
            return None
        if _raise_incident(run, aid, body.error_type, body.message):
            return None
        activities.drop(run, aid)
    elif isinstance(body, (ActivityStarted, HeartbeatRecorded)):
        aid = body.activity_id
        if aid in st["activities"]:
            (activities.on_started if isinstance(body, ActivityStarted) else activities.on_heartbeat)(run, aid)
        return None
    elif isinstance(body, (ChildCompleted, ChildFailed)):
        st["children"].pop(body.child_id, None)
    elif isinstance(body, TimerFired):
        timer = st["timers"].pop(body.timer_id, None) or {}
        purpose = timer.get("purpose")
        if purpose == "replay":
            return []  # retry a blocked replay; nothing new for the coroutine
        if purpose == "retry":
            activities.on_retry_timer(run, timer["activity"])
            return None
        if purpose == "activity_timeout":
            aid = timer["activity"]
            attempt = st["activities"][aid]["attempt"]
            retrying, message = activities.on_timeout(run, aid, timer["kind"])
            if retrying or _raise_incident(run, aid, "ActivityTimeout", message):
                return None
            activities.drop(run, aid)
            return ["ActivityFailed", {"activity_id": aid, "attempt": attempt, "error_type": "ActivityTimeout",
                                       "message": message, "retryable": False}, ev.ts, ev.seq]
        if purpose == "execution":
            return ["$timeout", {}, ev.ts, ev.seq]
        if purpose == incidents.TIMER_PURPOSE:
            inc, message = incidents.timed_out(run, timer)
            return ["ActivityFailed", {"activity_id": inc["activity"], "attempt": inc["attempts"],
                                       "error_type": "IncidentTimeout", "message": message, "retryable": False},
                    ev.ts, ev.seq]
    elif isinstance(body, IncidentResolved):
        return _incident_resolved(run, ev, body)
    elif isinstance(body, CancelRequested):
        st["status"] = Status.CANCELLING
        st["cancel_reason"] = body.reason
        for child_id in sorted(st["children"]):
            run.send(CancelWorkflow(reason=f"parent {st['id']} is cancelling"), child_id)
        run.cancel_activities()
        st["children"] = {}
        st["timers"] = {t: v for t, v in st["timers"].items() if v.get("purpose") == "execution"}
    elif ev.type not in WORKFLOW_INPUTS:
        return None
    return [ev.type, ev.data, ev.ts, ev.seq]


def _raise_incident(run: Run, aid: str, error_type: str, message: str) -> bool:
    """An activity failed for good: open an incident instead when its ``on_failure`` asks for one.

    The activity leaves the activities table (a late result for it is rejected) and travels in
    the incident, so that a retry can schedule its next attempt under the same id: the workflow's
    await is not fed until the incident is resolved as skip or fail, or times out.
    """
    act = run.state["activities"].get(aid)
    spec = ((act or {}).get("policy") or {}).get("on_failure", {}).get("incident")
    if act is None or spec is None:
        return False
    activities.drop(run, aid)
    text = f"activity '{act['name']}' failed: {message}"
    incidents.open_incident(run, f"{act['name']}-{run.next_seq()}", "code", act["name"], aid, act, error_type, text,
                            IncidentSpec.model_validate(spec), record=act)
    return True


def _incident_resolved(run: Run, ev: Event, body: IncidentResolved) -> Optional[list[Any]]:
    """What resolving an incident feeds the workflow: nothing for a retry (the activity's next attempt
    is scheduled), the output as the activity's result for a skip, its error for a fail."""
    inc = incidents.close_incident(run, body.incident_id)
    aid, attempt = inc["activity"], inc["attempts"]
    if body.action == "retry":
        activities.reopen(run, aid, inc["record"], incidents.patched_input(inc, body.input_patch))
        return None
    if body.action == "skip":
        return ["ActivityCompleted", {"activity_id": aid, "attempt": attempt, "result": body.output}, ev.ts, ev.seq]
    return ["ActivityFailed", {"activity_id": aid, "attempt": attempt, "error_type": inc["error"]["type"],
                               "message": incidents.fail_message(inc, body.incident_id, body.by, body.reason),
                               "retryable": False}, ev.ts, ev.seq]


def history_from_events(events: list[Event]) -> tuple[Entries, Entries]:
    """The coroutine's inputs and commands of the last run in ``events``, rebuilt from the events alone.

    The same inputs :func:`input_of` journals while the engine decides: only an activity's final
    outcome is an input (a failure followed by another attempt, or a timeout that was retried, is
    the engine's business), and only timers the code started count. A final failure that opened an
    incident is no input either: resolving the incident is (``skip`` as the activity's result,
    ``fail`` as its error, ``retry`` as nothing, the next attempt's outcome counting instead), and
    so is its timeout (``IncidentTimeout``). Events do not carry patch markers or side-effect values:
    replaying these treats the history as recorded before any ``ctx.patched()`` change and runs
    side-effect functions again.
    """
    last_run = max((i for i, e in enumerate(events) if e.type == "WorkflowContinuedAsNew"), default=None)
    if last_run is not None:
        cont = events[last_run]
        events = [Event("WorkflowStarted", cont.instance_id, cont.seq, cont.ts, {"input": cont.data.get("input")})] + \
            events[last_run + 1:]
    retried = {(e.data["activity_id"], e.data["attempt"] - 1) for e in events
               if e.type == "ActivityScheduled" and e.data.get("attempt", 1) > 1}
    timers = {e.data["timer_id"]: e.data.get("purpose", "") for e in events if e.type == "TimerStarted"}
    raised = _incidents(events)
    to_incident = {(inc["activity"], inc["attempts"]) for inc in raised.values()}
    by_timer = {inc["timer"]: (iid, inc) for iid, inc in raised.items() if inc["timer"] is not None}
    inputs: Entries = []
    commands: Entries = []
    started, queued = False, []  # signals of a queued start follow its WorkflowStarted
    for e in events:
        d = e.data
        if e.type in ("ActivityFailed", "ActivityTimedOut") and ((d["activity_id"], d["attempt"]) in retried
                                                                   or (d["activity_id"], d["attempt"]) in to_incident):
            continue
        if e.type == "ActivityTimedOut" and d["kind"]:
            inputs.append(["ActivityFailed", {"activity_id": d["activity_id"], "attempt": d["attempt"],
                                              "error_type": "ActivityTimeout", "message": f"{d['kind']} timeout",
                                              "retryable": False}, e.ts, e.seq])
        elif e.type == "TimerFired" and d["timer_id"] in by_timer:
            incident_id, inc = by_timer[d["timer_id"]]
            inputs.append(["ActivityFailed", {"activity_id": inc["activity"], "attempt": inc["attempts"],
                                              "error_type": "IncidentTimeout",
                                              "message": incidents.timeout_message(incident_id, inc["timeout_ms"],
                                                                                   inc["error"]),
                                              "retryable": False}, e.ts, e.seq])
        elif e.type == "TimerFired" and (timers.get(d["timer_id"]) in ENGINE_TIMERS
                                         or str(d["timer_id"]).startswith("replay-")):
            continue
        elif e.type == "IncidentResolved" and d["incident_id"] in raised:
            fed = _resolved_input(raised[d["incident_id"]], e)
            if fed is not None:
                inputs.append(fed)
        elif e.type == "SignalReceived" and not started:
            queued.append([e.type, d, e.ts, e.seq])  # received while QUEUED: the engine applies it once admitted
        elif e.type in WORKFLOW_INPUTS:
            inputs.append([e.type, d, e.ts, e.seq])
            if e.type == "WorkflowStarted":
                started = True
                inputs.extend(queued)
                queued.clear()
        elif e.type == "ActivityScheduled" and d.get("attempt", 1) == 1:
            commands.append(["activity", d["name"], d["activity_id"]])
        elif e.type == "TimerStarted" and d.get("purpose", "") not in ENGINE_TIMERS:
            commands.append(["timer", d.get("purpose") or None, d["timer_id"]])  # the code's name of it
        elif e.type == "ChildStarted":
            commands.append(["child", d["workflow"], d["child_id"]])
    return inputs, commands


def _incidents(events: list[Event]) -> dict[str, dict[str, Any]]:
    """The incidents ``events`` raised, by id, with what the engine kept of each: the activity and
    the attempt whose final failure (the ``ActivityFailed`` or ``ActivityTimedOut`` just before)
    raised it, its error, and its timeout timer (the ``incident`` timer started with it) and length."""
    last_attempt: dict[str, int] = {}
    raised: dict[str, dict[str, Any]] = {}
    newest: Optional[dict[str, Any]] = None
    for e in events:
        d = e.data
        if e.type in ("ActivityFailed", "ActivityTimedOut"):
            last_attempt[d["activity_id"]] = d["attempt"]
        elif e.type == "IncidentRaised":
            newest = {"activity": d["activity_id"], "attempts": last_attempt.get(d["activity_id"], 1),
                      "error": {"type": d["error_type"], "message": d["message"]}, "timer": None, "timeout_ms": 0}
            raised[d["incident_id"]] = newest
        elif e.type == "TimerStarted" and d.get("purpose") == incidents.TIMER_PURPOSE and newest is not None:
            # an incident's timer is started in the decision that raised it, right after IncidentRaised
            newest["timer"], newest["timeout_ms"] = d["timer_id"], d["due_ms"] - e.ts
            newest = None
    return raised


def _resolved_input(inc: dict[str, Any], ev: Event) -> Optional[list[Any]]:
    """What resolving incident ``inc`` fed the workflow (as :func:`_incident_resolved` does)."""
    d = ev.data
    aid, attempt = inc["activity"], inc["attempts"]
    if d["action"] == "skip":
        return ["ActivityCompleted", {"activity_id": aid, "attempt": attempt, "result": d.get("output")}, ev.ts, ev.seq]
    if d["action"] == "fail":
        return ["ActivityFailed", {"activity_id": aid, "attempt": attempt, "error_type": inc["error"]["type"],
                                   "message": incidents.fail_message(inc, d["incident_id"], d.get("by"), d.get("reason")),
                                   "retryable": False}, ev.ts, ev.seq]
    return None


def replay(definition: CodeDefinition, instance_id: str, inputs: Entries, commands: Entries, run_number: int = 1,
           history_limit: Optional[int] = None, *, running: bool = False, complete: bool = True) -> Machine:
    """A fresh machine of ``definition`` fed ``inputs``: the one replay of recorded history.

    Every command the code issues must equal the recorded one in ``commands``. ``complete``: it
    must issue all of them. ``running``: it must still be waiting for input after the last one (the
    instance is running); otherwise feeding stops when the workflow finishes. Migrating an instance
    to another version replays its journal with that version's code this way: the target is
    compatible when it reproduces the history exactly (e.g. its changes are ``ctx.patched()``
    branches the history did not take).

    Raises:
        NondeterminismError: the first command (index into ``commands``) the code does not reproduce.
    """
    machine = Machine(definition, instance_id, commands)
    machine.run_number = run_number
    if history_limit is not None:
        machine.history_limit = history_limit
    try:
        for type_, data, ts, seq in inputs:
            machine.deliver(type_, data, ts, seq)
            if machine.finished:
                if running:
                    raise ReplayMismatch(machine.cursor, describe(commands[machine.cursor]
                                                                  if machine.cursor < len(commands) else None)
                                         + " or a wait for input", outcome(machine))
                break
        if complete and machine.cursor != len(commands):
            raise ReplayMismatch(machine.cursor, describe(commands[machine.cursor]), "no further command")
    except ReplayMismatch as m:
        raise NondeterminismError(instance_id, m.index, m.expected, m.actual) from None
    return machine
