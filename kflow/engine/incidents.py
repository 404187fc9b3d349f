"""Incidents: an activity whose retries ran out waits for an operator instead of failing its step.

An open incident lives in ``state["incidents"]`` (keyed by incident id) from ``IncidentRaised``
until ``IncidentResolved``, its timeout timer (purpose ``incident``) or the close of the instance.
It keeps what a retry needs to schedule the activity again (name, queue, input, priority and, for
code workflows, the whole activity record) and what an operator is shown (step, error, role,
instructions). While any is open the status is ``INCIDENT`` and ``error`` describes the newest;
when the last one closes the instance is ``RUNNING`` again. What resolving means for the workflow
(a thread of a spec workflow, an awaited activity of a code workflow) is the interpreters' job.
"""

from __future__ import annotations

from typing import Any, Optional, cast

from kflow.engine import activity
from kflow.engine.run import INCIDENTS, PRIORITY, Run
from kflow.model.events import IncidentRaised
from kflow.model.messages import JSONDict, JSONValue, Status
from kflow.model.spec import IncidentSpec, parse_duration_ms

#: Timer purpose of an incident's timeout.
TIMER_PURPOSE = "incident"


def open_incident(run: Run, incident_id: str, thread: Optional[str], step: str, aid: str, act: JSONDict,
                  error_type: str, message: str, spec: IncidentSpec, **extra: Any) -> JSONDict:
    """Record ``IncidentRaised`` for the activity ``aid`` (already out of the activities table), arm
    its timeout, and mark the instance INCIDENT. Returns the incident record (``extra`` merged in)."""
    run.record(IncidentRaised(incident_id=incident_id, step=step, activity_id=aid, error_type=error_type,
                              message=message, role=spec.role or "", instructions=spec.instructions))
    timer = None
    if spec.timeout is not None:
        timer = activity.start_timer(run, thread, run.now + parse_duration_ms(spec.timeout), TIMER_PURPOSE,
                                     incident=incident_id)
    inc: JSONDict = {"thread": thread, "step": step, "activity": aid, "name": act["name"], "queue": act["queue"],
                     "input": act["input"], "priority": act.get(PRIORITY), "attempts": act["attempt"],
                     "error": {"type": error_type, "message": message}, "role": spec.role,
                     "instructions": spec.instructions, "timeout": spec.timeout, "timer": timer,
                     "raised_ms": run.now, **extra}
    st = run.state
    st.setdefault(INCIDENTS, {})[incident_id] = inc
    st["status"] = Status.INCIDENT
    st["error"] = {"type": error_type, "message": f"incident '{incident_id}' at step '{step}': {message}"
                   + (f" (instructions: {spec.instructions})" if spec.instructions else "")}
    return inc


def close_incident(run: Run, incident_id: str) -> JSONDict:
    """Forget an open incident and its timer; the last one closed makes the instance RUNNING again."""
    st = run.state
    incidents = st[INCIDENTS]
    inc: JSONDict = incidents.pop(incident_id)
    if inc["timer"] is not None:
        st["timers"].pop(inc["timer"], None)
    if not incidents:
        del st[INCIDENTS]
        if st["status"] == Status.INCIDENT:
            st["status"] = Status.RUNNING
            st["error"] = None
    return inc


def timed_out(run: Run, timer: JSONDict) -> tuple[JSONDict, str]:
    """The timeout timer of an incident fired: close it; returns it and the error message to fail with."""
    incident_id = timer["incident"]
    inc = close_incident(run, incident_id)
    return inc, timeout_message(incident_id, parse_duration_ms(inc["timeout"]), inc["error"])


def timeout_message(incident_id: str, timeout_ms: int, error: JSONDict) -> str:
    """The error message of an incident that timed out. The timeout is written from its milliseconds
    (the largest whole unit), which its timer's event also carries, so the message can be rebuilt from
    the events alone."""
    return (f"incident '{incident_id}' was not resolved within {_whole_units(timeout_ms)}: "
            f"{error['type']}: {error['message']}")


_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000))


def _whole_units(ms: int) -> str:
    """``4h``, ``90m``, ``1500ms``: ``ms`` in the largest unit that divides it."""
    for unit, size in _UNITS:
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms" if ms else "0s"


def fail_message(inc: JSONDict, incident_id: str, by: Optional[str], reason: Optional[str]) -> str:
    """The error message of incident ``incident_id`` resolved with action ``fail`` (``by`` whom, for
    what ``reason``, as ``IncidentResolved`` records them): the step's, then who and why."""
    who = f" by {by}" if by else ""
    why = f": {reason}" if reason else ""
    return f"{inc['error']['message']} (incident '{incident_id}' resolved as fail{who}{why})"


def patched_input(inc: JSONDict, patch: JSONValue) -> Any:
    """The input a retry schedules: the activity's, updated with ``patch`` (a JSON object, or null:
    ``ResolveIncident`` is refused with any other ``input_patch``)."""
    fields = cast(Optional[JSONDict], patch)
    return {**(inc["input"] or {}), **fields} if fields else inc["input"]
