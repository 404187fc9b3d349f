"""Replay a recorded history against (possibly changed) code-workflow code, raising on non-determinism.

Use it in a test before deploying a change: fetch histories of running instances (``kflow history``
or the events topic), and check that the new code issues exactly the commands they recorded::

    from kflow.testing import replay
    replay(order_workflow, events)                                   # raises NondeterminismError on a mismatch
    replay(order_workflow, events, state=internal, journal=journal)  # exact: also side effects and patches

From events alone, timers match by position (the purpose of a timer is not in its event),
``ctx.side_effect`` functions run again, and ``ctx.patched()`` returns False (the history is
treated as recorded before the patch). Passing a running instance's internal state (``state``
record ``internal`` field) with the journal holding its history (by default the in-memory journal
of this process, where the test harness decides) replays its recorded commands exactly; so does a
state written before the journal existed, which carries them itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, Union

from kflow._workflow.api import definition_of
from kflow.engine.code_replayer import (
    WORKFLOW_INPUTS,
    HistoryUnavailable,
    Machine,
    NondeterminismError,
    ReplayMismatch,
    _describe,
    _outcome,
    history_of,
)
from kflow.engine.journal import Entries, Journal
from kflow.model.messages import Event, JSONDict

__all__ = ["replay"]


def _as_event(e: Union[Event, JSONDict]) -> Event:
    if isinstance(e, Event):
        return e
    return Event(type=e["type"], instance_id=e.get("instance_id", ""), seq=int(e.get("seq", 0)),
                 ts=int(e.get("ts", 0)), data=dict(e.get("data") or {}))


#: Timers the engine starts for activities (timeouts, retry backoff) and for itself; not workflow code's.
_ENGINE_TIMERS = frozenset({"activity_timeout", "retry", "execution", "replay"})


def _from_events(events: list[Event]) -> tuple[list[list[Any]], list[list[Any]]]:
    """The coroutine's inputs and commands, rebuilt from the events of its last run.

    Only an activity's final outcome is an input (a failure followed by another attempt, or a
    timeout that was retried, is the engine's business), and only timers the code started count.
    """
    last_run = max((i for i, e in enumerate(events) if e.type == "WorkflowContinuedAsNew"), default=None)
    if last_run is not None:
        cont = events[last_run]
        events = [Event("WorkflowStarted", cont.instance_id, cont.seq, cont.ts, {"input": cont.data.get("input")})] + \
            events[last_run + 1:]
    retried = {(e.data["activity_id"], e.data["attempt"] - 1) for e in events
               if e.type == "ActivityScheduled" and e.data.get("attempt", 1) > 1}
    timers = {e.data["timer_id"]: e.data.get("purpose", "") for e in events if e.type == "TimerStarted"}
    inputs: list[list[Any]] = []
    commands: list[list[Any]] = []
    for e in events:
        d = e.data
        if e.type == "ActivityFailed" and (d["activity_id"], d["attempt"]) in retried:
            continue
        if e.type == "ActivityTimedOut" and (d["activity_id"], d["attempt"]) not in retried and d["kind"]:
            inputs.append(["ActivityFailed", {"activity_id": d["activity_id"], "attempt": d["attempt"],
                                              "error_type": "ActivityTimeout", "message": f"{d['kind']} timeout",
                                              "retryable": False}, e.ts, e.seq])
        elif e.type == "TimerFired" and timers.get(d["timer_id"]) in _ENGINE_TIMERS:
            continue
        elif e.type in WORKFLOW_INPUTS:
            inputs.append([e.type, d, e.ts, e.seq])
        elif e.type == "ActivityScheduled" and d.get("attempt", 1) == 1:
            commands.append(["activity", d["name"], d["activity_id"]])
        elif e.type == "TimerStarted" and d.get("purpose", "") not in _ENGINE_TIMERS:
            commands.append(["timer", None, d["timer_id"]])
        elif e.type == "ChildStarted":
            commands.append(["child", d["workflow"], d["child_id"]])
    return inputs, commands


def _recorded(state: Optional[JSONDict], journal: Optional[Journal]) -> Optional[tuple[Entries, Entries]]:
    """The exact inputs and commands of ``state``'s run, when its journal (or the state) still has them."""
    if state is None:
        return None
    try:
        return history_of(state, journal)
    except HistoryUnavailable:  # closed, or decided elsewhere: the events are what is left
        return None


def replay(workflow_fn: Any, history: Iterable[Union[Event, JSONDict]], state: Optional[JSONDict] = None,
           journal: Optional[Journal] = None) -> Any:
    """Re-run ``workflow_fn`` over ``history`` and check it reproduces every recorded command.

    Args:
        workflow_fn: A ``@kflow.workflow`` function (or its ``CodeDefinition``).
        history: The instance's events, in order, as :class:`Event` objects or dicts.
        state: The instance's internal state; when ``journal`` (default: this process's in-memory
            journal) holds its run's history, or the state predates the journal and carries it,
            the recorded inputs and commands are used instead of the events.
        journal: Where the history of ``state``'s run is read.

    Returns:
        The workflow's result when the replay finishes it, else None (still running).

    Raises:
        NondeterminismError: The code issued a different command, or ended differently, than recorded.
    """
    definition = definition_of(workflow_fn)
    events = [_as_event(e) for e in history]
    instance_id = events[0].instance_id if events else ((state or {}).get("id") or "replay")
    inputs, commands = _recorded(state, journal) or _from_events(events)
    closed = next((e for e in events if e.type in ("WorkflowCompleted", "WorkflowFailed", "WorkflowCancelled")), None)
    machine = Machine(definition, instance_id, commands)
    continued = [e for e in events if e.type == "WorkflowContinuedAsNew"]
    machine.run_number = (state or {}).get("run") or (continued[-1].data["run"] if continued else 1)
    try:
        for type_, data, ts, seq in inputs:
            if type_ == "TimerFired" and str(data.get("timer_id", "")).startswith("replay-"):
                continue
            machine.deliver(type_, data, ts, seq)
            if machine.finished:
                break
        if machine.cursor != len(commands):
            raise ReplayMismatch(machine.cursor, _describe(commands[machine.cursor]), "no further command")
        if machine.finished and closed is None:
            raise ReplayMismatch(machine.cursor, "a workflow still running", _outcome(machine))
        if closed is not None and not machine.finished:
            raise ReplayMismatch(machine.cursor, closed.type, "a workflow still waiting")
    except ReplayMismatch as m:
        raise NondeterminismError(instance_id, m.index, m.expected, m.actual) from None
    if machine.finished:
        assert machine.root is not None
        fut = machine.root.future
        want_ok = closed is not None and closed.type == "WorkflowCompleted"
        if (fut.error is None) != want_ok or (want_ok and closed is not None and fut.value != closed.data.get("result")):
            raise NondeterminismError(instance_id, machine.cursor, f"{closed.type if closed else '?'} "
                                      f"{closed.data if closed else ''}", _outcome(machine))
        return fut.value if fut.error is None else None
    return None
