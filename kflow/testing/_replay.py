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
state written before the journal existed, which carries them itself. The events are mapped to the
workflow's inputs, and replayed, by the same functions the engine uses
(:mod:`kflow.engine.code_history`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, Union

from kflow.authoring.api import definition_of
from kflow.engine.code_history import history_from_events
from kflow.engine.code_history import replay as replay_inputs
from kflow.engine.code_journal import HistoryUnavailable, history_of
from kflow.engine.code_machine import NondeterminismError, outcome
from kflow.engine.journal import Entries, Journal
from kflow.model.messages import Event, JSONDict

__all__ = ["replay"]


def _as_event(e: Union[Event, JSONDict]) -> Event:
    if isinstance(e, Event):
        return e
    return Event(type=e["type"], instance_id=e.get("instance_id", ""), seq=int(e.get("seq", 0)),
                 ts=int(e.get("ts", 0)), data=dict(e.get("data") or {}))


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
    inputs, commands = _recorded(state, journal) or history_from_events(events)
    inputs = [i for i in inputs if not (i[0] == "TimerFired" and str(i[1].get("timer_id", "")).startswith("replay-"))]
    closed = next((e for e in events if e.type in ("WorkflowCompleted", "WorkflowFailed", "WorkflowCancelled")), None)
    continued = [e for e in events if e.type == "WorkflowContinuedAsNew"]
    run_number = (state or {}).get("run") or (continued[-1].data["run"] if continued else 1)
    machine = replay_inputs(definition, instance_id, inputs, commands, run_number)
    if machine.finished and closed is None:
        raise NondeterminismError(instance_id, machine.cursor, "a workflow still running", outcome(machine))
    if closed is not None and not machine.finished:
        raise NondeterminismError(instance_id, machine.cursor, closed.type, "a workflow still waiting")
    if machine.finished:
        assert machine.root is not None
        fut = machine.root.future
        want_ok = closed is not None and closed.type == "WorkflowCompleted"
        if (fut.error is None) != want_ok or (want_ok and closed is not None and fut.value != closed.data.get("result")):
            raise NondeterminismError(instance_id, machine.cursor, f"{closed.type if closed else '?'} "
                                      f"{closed.data if closed else ''}", outcome(machine))
        return fut.value if fut.error is None else None
    return None
