"""The engine's two pure functions: ``decide(state, command, now)`` and ``evolve(state, event)``.

``decide`` validates a command against an instance's state and turns it into one *input event*
(or a ``CommandRejected`` event, or a DLQ verdict for commands that address nothing); ``evolve``
applies an input event, running the workflow's interpreter until it blocks, and returns the new
state with the *consequence events* it produced (``ActivityScheduled``, ``TimerStarted``,
``WorkflowCompleted`` …) and the outputs that are not events (tasks, commands for other instances).
``fold`` replays a recorded history through ``evolve`` and checks that every consequence event
is reproduced exactly, which is how restore-by-replay and determinism checks work. No I/O here.

A code workflow's history lives in its journal (:mod:`kflow.engine.journal`), outside the state:
``decide`` is handed a reader of it and returns, in ``Decision.journal``, what it appended (or
deleted); the caller persists those with the state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import orjson

from kflow.engine import code_journal, code_replayer, code_retry, spec_interpreter
from kflow.engine.activity import heartbeat_due, late_result, limits_of, note_ended, payload_size
from kflow.engine.code_cache import cache_of
from kflow.engine.definitions import DefinitionsView
from kflow.engine.journal import MEMORY, InMemoryJournal, Journal, JournalOp
from kflow.engine.run import INCIDENTS, PRIORITY, UPDATES, Run, new_state
from kflow.model.commands import (
    COMMAND_TYPES,
    AnyCommand,
    CancelWorkflow,
    CompleteActivity,
    CompleteChild,
    FailActivity,
    FailChild,
    FireTimer,
    HeartbeatActivity,
    QueryStatus,
    QueryWorkflow,
    ResolveIncident,
    ResumeWorkflow,
    RetryWorkflow,
    SignalWorkflow,
    StartActivity,
    StartWorkflow,
    SuspendWorkflow,
    TerminateWorkflow,
    UpdateWorkflow,
    command,
    from_data,
)
from kflow.model.errors import DeterminismError
from kflow.model.events import (
    ActivityCompleted,
    ActivityFailed,
    ActivityStarted,
    AnyEvent,
    CancelRequested,
    ChildCompleted,
    ChildFailed,
    CommandRejected,
    HeartbeatRecorded,
    IncidentResolved,
    SignalReceived,
    TimerFired,
    UpdateAccepted,
    WorkflowCancelled,
    WorkflowQueued,
    WorkflowResumed,
    WorkflowRetried,
    WorkflowStarted,
    WorkflowSuspended,
    WorkflowTerminated,
)
from kflow.model.events import from_data as event_from_data
from kflow.model.events import to_data as event_data
from kflow.model.messages import INCIDENT_ACTIONS, PRIORITIES, Command, Event, JSONDict, RejectCode, Status, Task

#: Events that carry new information into an instance; all others are consequences of these.
INPUT_EVENTS = frozenset({"WorkflowStarted", "ActivityCompleted", "ActivityFailed", "TimerFired",
                          "SignalReceived", "ChildCompleted", "ChildFailed", "WorkflowCancelled",
                          "ActivityStarted", "HeartbeatRecorded", "CancelRequested", "WorkflowTerminated",
                          "WorkflowSuspended", "WorkflowResumed", "WorkflowRetried", "IncidentResolved",
                          "UpdateAccepted", "WorkflowQueued", "PermitGranted", "PermitRefused", "PriorityChanged",
                          "WorkflowMigrated", "MigrationDeferred"})

#: Input events a suspended instance records but does not apply: each would advance the workflow
#: (dispatch tasks, start timers, run steps). They are kept in ``state["suspended"]["held"]`` and
#: applied, in arrival order, when the instance is resumed. Start reports and heartbeats only keep
#: running attempts' bookkeeping and are applied at once.
HELD_INPUTS = frozenset({"ActivityCompleted", "ActivityFailed", "TimerFired", "SignalReceived",
                         "ChildCompleted", "ChildFailed"})

#: State key of a suspended instance: the status it resumes to, and the input events it holds.
SUSPENDED = "suspended"
#: State key of the signals a QUEUED instance received: applied in arrival order once it is admitted.
QUEUED_SIGNALS = "queued_signals"


#: State key of where the instance's history starts on its ``events`` partition: an offset at or
#: before its first event. The processor stamps it on the instance's first state (it knows offsets,
#: the engine does not); ``evolve`` carries it over when a run starts afresh under the same id.
EVENTS_OFFSET = "events_offset"

#: State keys of the principal that started the instance and of the tenant it belongs to. With
#: auth on, the processor stamps them on the state of an instance a verified principal started (the
#: engine knows no principals); ``evolve`` carries them over when a run starts afresh under the
#: same id, so continue-as-new keeps them. Absent: started with auth off (the default tenant).
OWNER = "owner"
TENANT = "tenant"
#: State key of the command token ids the instance accepted with auth on (``{jti: expiry}``; the
#: processor's guard keeps them, see ``kflow.security.guard.SEEN_STATE_KEY``): ``evolve`` carries them
#: over when a run starts afresh under the same id, so a command of the earlier run cannot be replayed.
SEEN_TOKENS = "seen_tokens"

#: Command ids of the most recent signals kept per instance, so a redelivered signal (same command
#: id, e.g. from a trigger re-reading its source) is rejected as a duplicate instead of applied twice.
SIGNAL_DEDUP_WINDOW = 256


@dataclass
class Decision:
    """Everything one command produced. ``state`` is None when the instance does not exist."""

    state: Optional[JSONDict]
    events: list[Event] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    timers_set: list[tuple[str, int]] = field(default_factory=list)
    timers_cancel: list[tuple[str, int]] = field(default_factory=list)
    dlq_reason: Optional[str] = None
    replies: list[tuple[str, JSONDict]] = field(default_factory=list)  # (query id, answer): not history
    journal: list[JournalOp] = field(default_factory=list)  # what a code workflow's journal gets, in order

    @property
    def changed(self) -> bool:
        return bool(self.events)


def copy_state(state: JSONDict) -> JSONDict:
    """A deep copy cheap enough for the hot path (states are small JSON documents)."""
    copy: JSONDict = orjson.loads(orjson.dumps(state))
    return copy


# -- evolve -----------------------------------------------------------------------------------
def evolve(state: Optional[JSONDict], ev: Event, defs: DefinitionsView,
           journal: Optional[Journal] = None, model: Optional[AnyEvent] = None) -> tuple[JSONDict, Run]:
    """Apply one input event to (a copy of) ``state``; the Run holds consequence events and outputs.

    ``journal`` is read when a code workflow must be rebuilt (default: the in-memory
    :data:`~kflow.engine.journal.MEMORY`); what this event appends is in ``Run.journal_ops``.

    The event's model (:mod:`kflow.model.events`) is built here, once, and every applier reads the
    event's fields from it, never from ``ev.data`` (see :func:`event_model`). ``model`` is that model
    when the caller made ``ev`` from it (:func:`accept`): it is not built again.
    """
    body = model if model is not None else event_model(ev)
    fresh = isinstance(body, (WorkflowStarted, WorkflowQueued))
    if isinstance(body, (WorkflowStarted, WorkflowQueued)):
        seq = state["seq"] if state else 0
        kind = getattr(defs.get(body.workflow, body.version), "kind", "spec")
        st = new_state(ev.instance_id, body.workflow, body.version, kind, body.input, ev.ts,
                       body.parent_id, body.parent_ref, seq)
    else:
        assert state is not None, f"{ev.type} for an instance without state"
        st = copy_state(state)
    before = state["activities"] if state is not None and not fresh else {}
    compiled = defs.get(st["workflow"], st["version"])
    run = Run(st, ev.ts, defs, compiled, journal if journal is not None else MEMORY)
    _record(run, ev)
    if fresh and state is not None:
        code_retry.drop_kept_journal(run, state)  # id reuse: the closed run's kept journal goes
    if isinstance(body, SignalReceived) and body.signal_id:
        ids = st.setdefault("signal_ids", [])
        ids.append(body.signal_id)
        del ids[:-SIGNAL_DEDUP_WINDOW]
    if isinstance(body, UpdateAccepted):  # running until its handler (or waiting step) answers it
        st.setdefault(UPDATES, {})[body.update_id] = {"name": body.name, "answer": None}
    if isinstance(body, WorkflowResumed):
        _resume(run)  # notes ended activities per held event
    elif st["status"] == Status.SUSPENDED and ev.type in HELD_INPUTS:
        _hold(run, ev, body)
    elif st["status"] == Status.QUEUED and ev.type == "SignalReceived":  # kept as recorded, applied once admitted
        st.setdefault(QUEUED_SIGNALS, []).append({"seq": ev.seq, "ts": ev.ts, "data": ev.data})
    elif isinstance(body, WorkflowRetried):
        (code_retry.on_retried if st["kind"] == "code" else spec_interpreter.on_retried)(run, ev, body)
    elif isinstance(body, WorkflowSuspended):
        st[SUSPENDED] = {"status": st["status"], "reason": body.reason, "held": []}
        st["status"] = Status.SUSPENDED
    elif isinstance(body, WorkflowCancelled):
        _close_cancelled(run, body.reason)
    elif isinstance(body, WorkflowTerminated):
        _close_terminated(run, body.reason)
    elif ev.type == "CommandRejected":
        pass
    elif ev.type in INPUT_APPLIERS:
        INPUT_APPLIERS[ev.type](run, ev, body)
    elif st["kind"] == "code":
        code_replayer.apply_input(run, ev, body)
    else:
        spec_interpreter.apply_input(run, ev, body)
    if not isinstance(body, WorkflowResumed):
        note_ended(run, before, body)
    if run.state["status"] in Status.TERMINAL:
        run.state.pop(QUEUED_SIGNALS, None)  # a queued start cancelled, terminated or refused: nothing to deliver
    if run.state["kind"] == "code" and run.state["status"] in Status.TERMINAL:
        if run.state["status"] == Status.COMPLETED:
            code_journal.end_journal(run)  # a completed run is never replayed again
        elif state is not None and not fresh and state["status"] not in Status.TERMINAL:
            code_retry.keep_journal(run, state)  # a retry resets the run and replays it
    if state is not None:
        # id reuse and continue-as-new build a fresh state: the history still starts where it did,
        # the instance still belongs to whom it did (a start re-stamps its new owner), and the
        # command tokens it accepted stay used
        for key in (EVENTS_OFFSET, OWNER, TENANT, SEEN_TOKENS):
            if key in state:
                run.state.setdefault(key, state[key])
    for hook in AFTER_EVOLVE:
        hook(run, None if fresh else state)
    return run.state, run


def event_model(ev: Event) -> AnyEvent:
    """The typed model of the input event ``ev`` (:mod:`kflow.model.events`), built from ``ev.data``.

    A recorded event decoded by the codec has every field of its model (one recorded before a field
    existed gets the schema's default), and the engine builds its own from the models' fields: an
    event that does not fit is a corrupt history or an engine defect, never skipped.

    Raises:
        DeterminismError: ``ev.data`` has a field the type does not have or lacks one it requires
            (or the type is unknown); the message names the event's type, sequence number and fields.
    """
    try:
        return event_from_data(ev.type, ev.data)
    except ValueError as e:
        raise DeterminismError(ev.instance_id, ev.seq, (ev.type, ev.data), None,
                               f"instance {ev.instance_id}: event #{ev.seq} does not fit its model: {e}") from None


def _record(run: Run, ev: Event) -> None:
    """Stamp the state with an already-numbered input event."""
    run.state["seq"] = ev.seq
    run.state["updated_ms"] = ev.ts


def _hold(run: Run, ev: Event, body: AnyEvent) -> None:
    """Keep an input event of a suspended instance for its resume (as recorded: the state holds JSON).

    A fired timer leaves the timers table (it is due and must not fire again) and travels with
    the event, so the resume can put it back before the event is applied.
    """
    entry: JSONDict = {"type": ev.type, "seq": ev.seq, "ts": ev.ts, "data": ev.data}
    if isinstance(body, TimerFired):
        entry["timer"] = run.state["timers"].pop(body.timer_id)
    run.state[SUSPENDED]["held"].append(entry)


def apply_queued_signals(run: Run) -> None:
    """An admitted instance (its ``WorkflowStarted`` just applied) gets the signals it received
    while QUEUED, in arrival order, as if they had arrived right after its start."""
    st = run.state
    held = st.pop(QUEUED_SIGNALS, None) or []
    apply = code_replayer.apply_input if st["kind"] == "code" else spec_interpreter.apply_input
    for entry in held:
        if run.closed:
            break
        ev = Event(type="SignalReceived", instance_id=st["id"], seq=entry["seq"], ts=entry["ts"], data=entry["data"])
        apply(run, ev, event_model(ev))


def _still_applies(state: JSONDict, body: AnyEvent) -> bool:
    """Whether a held event still means something after the ones held before it were applied.

    A wait's timeout timer is void once its signal was applied, an attempt's result once its
    timeout gave it up, a child's result once an error elsewhere cancelled it: the instance
    treats them as it would have had they arrived in that order while it ran.
    """
    if isinstance(body, TimerFired):
        return body.timer_id in state["timers"]
    if isinstance(body, (ActivityCompleted, ActivityFailed)):
        return late_result(state, body.activity_id, body.attempt) is None
    if isinstance(body, (ChildCompleted, ChildFailed)):
        return body.child_id in state["children"]
    return True


def _resume(run: Run) -> None:
    """Back to the status it was suspended in; then apply the held input events in arrival order.

    The held entries are JSON in the state; each event's model is built here, as it is applied.
    """
    st = run.state
    suspended = st.pop(SUSPENDED)
    st["status"] = suspended["status"]
    held = []
    for entry in suspended["held"]:
        ev = Event(type=entry["type"], instance_id=st["id"], seq=entry["seq"], ts=entry["ts"], data=entry["data"])
        body = event_model(ev)
        if "timer" in entry and isinstance(body, TimerFired):
            st["timers"][body.timer_id] = entry["timer"]
        held.append((ev, body))
    apply = code_replayer.apply_input if st["kind"] == "code" else spec_interpreter.apply_input
    for ev, body in held:
        if run.closed or not _still_applies(st, body):
            continue
        before = st["activities"]
        st["activities"] = copy_state(before)
        apply(run, ev, body)
        note_ended(run, before, body)


def _close_cancelled(run: Run, reason: str) -> None:
    st = run.state
    run.note_stop()
    st["status"] = Status.CANCELLED
    st["closed_ms"] = run.now
    st["error"] = {"type": "Cancelled", "message": reason}
    st.pop(INCIDENTS, None)
    run.abandon_updates(f"'{st['id']}' was cancelled before the update's handler finished")
    for child_id in sorted(st["children"]):
        run.send(CancelWorkflow(reason=f"parent {st['id']} cancelled"), child_id)
    run.cancel_activities()
    st["children"], st["timers"], st["threads"], st["signals"] = {}, {}, {}, {}
    if st.get("parent_id"):
        run.send(FailChild(child_id=st.get("parent_ref") or st["id"], error_type="Cancelled", message=reason),
                 st["parent_id"])


def _close_terminated(run: Run, reason: str) -> None:
    """Terminate: close at once, no compensation, no cleanup beyond telling children and parent."""
    st = run.state
    run.note_stop()
    st["status"] = Status.TERMINATED
    st["closed_ms"] = run.now
    st["error"] = {"type": "Terminated", "message": reason}
    st.pop("closing", None)
    st.pop(SUSPENDED, None)  # what a suspended instance held is dropped with the rest
    st.pop(INCIDENTS, None)
    run.abandon_updates(f"'{st['id']}' was terminated before the update's handler finished")
    for child_id in sorted(st["children"]):
        run.send(TerminateWorkflow(reason=f"parent {st['id']} terminated"), child_id)
    run.cancel_activities()
    for table in ("children", "timers", "threads", "signals"):
        st[table] = {}
    if st.get("parent_id"):
        run.send(FailChild(child_id=st.get("parent_ref") or st["id"], error_type="Terminated", message=reason),
                 st["parent_id"])


# -- decide -----------------------------------------------------------------------------------
def _event(state: Optional[JSONDict], instance_id: str, now: int, model: AnyEvent) -> Event:
    """The next event of ``instance_id``, carrying ``model`` (:mod:`kflow.model.events`)."""
    return Event(type=model.TYPE, instance_id=instance_id, seq=(state["seq"] if state else 0) + 1, ts=now,
                 data=event_data(model))


def reject(state: JSONDict, cmd: Command, now: int, code: str, reason: str) -> Decision:
    """``CommandRejected(code, reason)`` for ``cmd``: the instance changes only its sequence."""
    ev = _event(state, cmd.instance_id, now, CommandRejected(command_type=cmd.type, code=code, reason=reason))
    st = dict(state)
    st["seq"], st["updated_ms"] = ev.seq, now
    return Decision(state=st, events=[ev])


def refuse(state: JSONDict, cmd: Command, now: int, code: str, reason: str) -> Decision:
    """``CommandRejected(code, reason)`` on an existing instance for a command refused before it
    was decided: with auth on, its sender was not authenticated, or is not allowed it."""
    return reject(state, cmd, now, code, reason)


def accept(state: Optional[JSONDict], cmd: Command, now: int, model: AnyEvent, defs: DefinitionsView,
           journal: Journal) -> Decision:
    """The input event ``model`` (:mod:`kflow.model.events`) for ``cmd``, applied: the decision carries
    what applying it produced (events, tasks, commands, journal ops, replies) and the timers it set or
    cancelled. The event's data is the model's fields (``to_data``), and ``evolve`` reads the model itself."""
    ev = _event(state, cmd.instance_id, now, model)
    new, run = evolve(state, ev, defs, journal, model)
    d = Decision(state=new, events=[ev, *run.events], tasks=run.tasks, commands=run.commands,
                 journal=run.journal_ops, replies=run.replies)
    before = state["timers"] if state else {}
    after = new["timers"]
    d.timers_set = [(t, v["due"]) for t, v in after.items() if t not in before]
    d.timers_cancel = [(t, v["due"]) for t, v in before.items() if t not in after]
    return d


def _start(state: Optional[JSONDict], cmd: Command, body: StartWorkflow, now: int, defs: DefinitionsView,
           journal: Journal) -> Decision:
    policy = body.id_reuse or "reject_duplicate"
    if state is not None:
        closed = state["status"] in Status.TERMINAL
        if policy == "return_existing":
            return Decision(state=state)
        if not (policy == "allow_if_closed" and closed):
            rejected = reject(state, cmd, now, RejectCode.DUPLICATE,
                              f"expected no instance with id '{cmd.instance_id}', but one exists ({state['status']})")
            parent = body.parent_id
            ref = body.parent_ref or cmd.instance_id
            if parent and (state.get("parent_id"), state.get("parent_ref")) != (parent, ref):
                # A parent waits on this child id; the instance holding it belongs to someone else,
                # so the parent must hear that its child never started, or it would wait forever.
                rejected.commands.append(command(
                    FailChild(child_id=ref, error_type="WorkflowAlreadyStarted", message=rejected.events[0].data["reason"]),
                    parent, command_id=f"{cmd.instance_id}#{rejected.events[0].seq}:0", ts=now))
            return rejected
    name = body.workflow
    version: Any = body.version  # an int; a command made in-process may name a range instead
    if isinstance(version, str):  # an exact version or a range ("^1.2"): the newest deployed match
        from kflow.engine.migration import VersionRangeError, deployed_versions, resolve_version

        try:
            version = resolve_version(name, version, deployed_versions(defs, name))
        except VersionRangeError as e:
            return Decision(state=state, dlq_reason=str(e))
    if version is None:
        version = defs.latest(name)
    if version is None or defs.get(name, version) is None:
        what = f"'{name}'" if body.version is None else f"'{name}@{body.version}'"
        return Decision(state=state, dlq_reason=f"unknown workflow {what}: deploy it first")
    level = body.priority
    if level is not None and level not in PRIORITIES.values():  # clients check; a hand-made command may not
        return Decision(state=state, dlq_reason=f"unknown priority {level!r}: expected 1 (critical) to 5 (background)")
    if level is None:
        level = getattr(getattr(defs.get(name, version), "spec", None), "priority", None)
    started = WorkflowStarted(workflow=name, version=version, input=body.input, parent_id=body.parent_id,
                              parent_ref=body.parent_ref)
    tenant = _start_tenant(cmd)
    for gate in START_GATES:  # a start subject to a quota is queued until it is admitted
        queued = gate(state, cmd, now, defs, journal, started, level, tenant)
        if queued is not None:
            return queued
    decision = accept(state, cmd, now, started, defs, journal)
    _stamp_priority(decision, level)
    if tenant:  # with auth on: the default fairness key of the first step's tasks, decided before the
        for task in decision.tasks:  # tenant is stamped on the state (later ones read it there)
            task.fairness_key = task.fairness_key or tenant
    return decision


def _start_tenant(cmd: Command) -> Optional[str]:
    """The tenant of the principal that sent the ``StartWorkflow`` ``cmd``, or None (auth off).

    Not a field of the command (nor on the wire): with auth on, the processor stamps it into
    ``cmd.data`` under :data:`TENANT` before deciding, so it is read from there, and :func:`decide`
    builds the command's model without it.
    """
    tenant: Optional[str] = cmd.data.get(TENANT)
    return tenant


def _stamp_priority(decision: Decision, level: Optional[int]) -> None:
    """Record a started instance's level; its first step's work, decided before it was known, inherits it.

    The level is state, not part of ``WorkflowStarted``: later decisions read it from the state
    (see :meth:`Run.priority`), and continue-as-new carries it over. None (normal) leaves no key.
    """
    if level is None:
        return
    assert decision.state is not None  # an accepted start
    decision.state[PRIORITY] = level
    for task in decision.tasks:
        if task.priority is None:
            task.priority = level
    for c in decision.commands:
        if c.type == "StartWorkflow" and c.data.get("priority") is None:
            c.data["priority"] = level


_ACCEPTING = frozenset({Status.RUNNING, Status.BLOCKED, Status.INCIDENT})
#: Statuses that take signals and child results: a suspended instance records them for its resume.
_RECEIVING = _ACCEPTING | {Status.SUSPENDED}


def _running(state: Optional[JSONDict], cmd: Command, now: int,
             accepting: frozenset[str] = _ACCEPTING) -> Optional[Decision]:
    """The common guard: a missing instance goes to the DLQ, a closed one is a rejection.

    A BLOCKED code instance still accepts input: it is recorded, and each one retries the replay.
    """
    if state is None:
        return Decision(state=None, dlq_reason=f"{cmd.type} for unknown instance '{cmd.instance_id}'")
    if state["status"] not in accepting:
        return reject(state, cmd, now, RejectCode.INVALID_STATE,
                      f"expected a RUNNING instance, but '{cmd.instance_id}' is {state['status']}")
    return None


def _active(state: Optional[JSONDict], cmd: Command, now: int) -> Optional[Decision]:
    """Like :func:`_running`, but also admits instances running their saga compensations."""
    return _running(state, cmd, now, Status.ACTIVE)


def _signal(state: Optional[JSONDict], cmd: Command, body: SignalWorkflow, now: int, defs: DefinitionsView,
            journal: Journal) -> Decision:
    guard = _running(state, cmd, now, _RECEIVING | {Status.QUEUED})  # a queued start gets it once admitted
    if guard:
        return guard
    assert state is not None
    size, limit = payload_size(body.data), limits_of(defs).max_payload_bytes
    if size > limit:
        return reject(state, cmd, now, RejectCode.LIMIT_EXCEEDED,
                      f"expected signal data of at most {limit} bytes, but got {size} bytes")
    if cmd.command_id and cmd.command_id in state.get("signal_ids", ()):
        return reject(state, cmd, now, RejectCode.DUPLICATE,
                      f"signal command '{cmd.command_id}' was already applied (a redelivery)")
    return accept(state, cmd, now, SignalReceived(name=body.name, data=body.data, signal_id=cmd.command_id),
                  defs, journal)


def _cancel(state: Optional[JSONDict], cmd: Command, body: CancelWorkflow, now: int, defs: DefinitionsView,
            journal: Journal) -> Decision:
    guard = _running(state, cmd, now, _ACCEPTING | {Status.QUEUED})
    if guard:
        return guard
    assert state is not None
    reason = body.reason or ""
    if state["status"] == Status.QUEUED:  # never started: nothing to compensate or clean up
        return accept(state, cmd, now, WorkflowCancelled(reason=reason), defs, journal)
    if state.get("compensations") or state["kind"] == "code":
        # Completed compensable steps: undo them first; WorkflowCancelled follows the last one.
        # A code workflow sees CancelledError at its pending awaits and cleans up in its own code.
        return accept(state, cmd, now, CancelRequested(reason=reason), defs, journal)
    return accept(state, cmd, now, WorkflowCancelled(reason=reason), defs, journal)


def _terminate(state: Optional[JSONDict], cmd: Command, body: TerminateWorkflow, now: int, defs: DefinitionsView,
               journal: Journal) -> Decision:
    return _active(state, cmd, now) or accept(state, cmd, now, WorkflowTerminated(reason=body.reason or ""),
                                              defs, journal)


def _pending_attempt(state: JSONDict, cmd: Command, body: Union[CompleteActivity, FailActivity, StartActivity],
                     now: int) -> Optional[Decision]:
    """Reject a report for an activity attempt that is not the pending one (``STALE`` or ``DUPLICATE``)."""
    aid, attempt = body.activity_id, body.attempt
    verdict = late_result(state, aid, attempt)
    if verdict is None and cmd.type in ("CompleteActivity", "FailActivity") and _held_result(state, aid, attempt):
        verdict = (RejectCode.DUPLICATE, f"expected a result for attempt {attempt} of '{aid}', but its result "
                   "is already recorded, held until the instance is resumed (a redelivery)")
    return None if verdict is None else reject(state, cmd, now, *verdict)


def _held_result(state: JSONDict, aid: str, attempt: int) -> bool:
    """Whether a suspended instance already holds a result for this attempt."""
    held = state.get(SUSPENDED, {}).get("held", ())
    return any(e["type"] in ("ActivityCompleted", "ActivityFailed") and e["data"]["activity_id"] == aid
               and e["data"]["attempt"] == attempt for e in held)


def _suspend(state: Optional[JSONDict], cmd: Command, body: SuspendWorkflow, now: int, defs: DefinitionsView,
             journal: Journal) -> Decision:
    """Pause an open instance (``WorkflowSuspended``); a closed or already suspended one is rejected."""
    if state is None:
        return Decision(state=None, dlq_reason=f"{cmd.type} for unknown instance '{cmd.instance_id}'")
    if state["status"] not in Status.ACTIVE:
        return reject(state, cmd, now, RejectCode.INVALID_STATE,
                      f"expected an open instance to suspend, but '{cmd.instance_id}' is closed ({state['status']})")
    if state["status"] == Status.QUEUED:
        return reject(state, cmd, now, RejectCode.INVALID_STATE,
                      f"expected a started instance to suspend, but '{cmd.instance_id}' is QUEUED (it waits for "
                      "a quota; cancel or terminate it, or change its priority)")
    if state["status"] == Status.SUSPENDED:
        return reject(state, cmd, now, RejectCode.INVALID_STATE,
                      f"expected an instance that is not suspended, but '{cmd.instance_id}' already is "
                      f"(reason: {state[SUSPENDED]['reason'] or 'none given'})")
    return accept(state, cmd, now, WorkflowSuspended(reason=body.reason or ""), defs, journal)


#: Closed statuses a retry re-opens without ``force``; CANCELLED and TERMINATED were someone's choice.
_RETRYABLE = frozenset({Status.FAILED})


def _retry(state: Optional[JSONDict], cmd: Command, body: RetryWorkflow, now: int, defs: DefinitionsView,
           journal: Journal) -> Decision:
    """Re-open a failed spec instance at a top-level step (``WorkflowRetried``), or reject why not."""
    if state is None:
        return Decision(state=None, dlq_reason=f"{cmd.type} for unknown instance '{cmd.instance_id}'")
    if state["kind"] == "code":
        return _retry_code(state, cmd, body, now, defs, journal)
    step, why = _retry_step(state, cmd, body, defs)
    if why is not None:
        return reject(state, cmd, now, *why)
    return accept(state, cmd, now, WorkflowRetried(from_step=step, input_patch=body.input_patch,
                                                   reason=body.reason or "", by=body.by or "",
                                                   attempt=state.get("retries", 0) + 1), defs, journal)


def _retry_code(state: JSONDict, cmd: Command, body: RetryWorkflow, now: int, defs: DefinitionsView,
                journal: Journal) -> Decision:
    """Reset a closed code instance to an event of its history and replay from there
    (``WorkflowRetried`` with ``from_step`` ``"event:<seq>"``; see :mod:`kflow.engine.code_retry`)."""
    why = _cannot_retry(state, cmd, body)
    step = body.from_step
    to_event = code_retry.reset_event(step)
    if why is None and step and to_event is None:
        why = (RejectCode.INVALID_INPUT, f"expected no step for code workflow instance '{cmd.instance_id}' (it has "
               f"no steps: name an event to reset to, '{code_retry.EVENT_PREFIX}<seq>'), but got '{step}'")
    if why is None and body.input_patch is not None:
        why = (RejectCode.INVALID_INPUT, f"expected no input_patch for code workflow instance '{cmd.instance_id}' "
               "(its code replays its recorded input), but got one")
    seq = 0
    if why is None:
        seq, why = code_retry.reset_point(defs.get(state["workflow"], state["version"]), state, to_event, journal)
    if why is not None:
        return reject(state, cmd, now, *why)
    return accept(state, cmd, now, WorkflowRetried(from_step=f"{code_retry.EVENT_PREFIX}{seq}", input_patch=None,
                                                   reason=body.reason or "", by=body.by or "",
                                                   attempt=state.get("retries", 0) + 1), defs, journal)


def _retry_step(state: JSONDict, cmd: Command, body: RetryWorkflow,
                defs: DefinitionsView) -> tuple[str, Optional[tuple[str, str]]]:
    """The top-level step ``cmd`` retries ``state`` from, and ``(code, reason)`` when it cannot."""
    why = _cannot_retry(state, cmd, body)
    if why is not None:
        return "", why
    spec = defs.get(state["workflow"], state["version"])
    top = [s.id for s in spec.lists[""]] if spec is not None else []
    step = body.from_step
    if not step:
        at = state.get("stopped_at")
        if at is None or at >= len(top):
            return "", (RejectCode.INVALID_INPUT, f"'{cmd.instance_id}' did not stop at a step: name the step to retry from")
        step = top[at]
    if step not in top:
        return "", (RejectCode.INVALID_INPUT, f"expected a top-level step of '{state['workflow']}@{state['version']}' "
                     f"({', '.join(top)}), but got '{step}'")
    return step, None


def _cannot_retry(state: JSONDict, cmd: Command, body: RetryWorkflow) -> Optional[tuple[str, str]]:
    """``(code, reason)`` when ``state`` cannot be retried whatever the step, else None."""
    iid, status = cmd.instance_id, state["status"]
    if state["kind"] not in ("spec", "code"):
        return RejectCode.INVALID_STATE, f"expected a workflow instance, but '{iid}' is a {state['kind']}"
    if status not in Status.TERMINAL or status == Status.COMPLETED:
        return RejectCode.INVALID_STATE, f"expected a FAILED instance to retry, but '{iid}' is {status}"
    if status not in _RETRYABLE and not body.force:
        return RejectCode.INVALID_STATE, f"expected a FAILED instance to retry, but '{iid}' is {status} (use force)"
    if state.get("compensation"):
        return (RejectCode.INVALID_STATE, f"expected an instance whose compensations did not run, but '{iid}' "
                "compensated its completed steps: start a new instance instead")
    patch = body.input_patch
    if patch is not None and not isinstance(patch, dict):
        return RejectCode.INVALID_INPUT, f"expected input_patch to be a JSON object, but got {type(patch).__name__}"
    return None


def _resume_cmd(state: Optional[JSONDict], cmd: Command, body: ResumeWorkflow, now: int, defs: DefinitionsView,
                journal: Journal) -> Decision:
    """Resume a suspended instance (``WorkflowResumed``): what it held is applied, then it runs on."""
    if state is None:
        return Decision(state=None, dlq_reason=f"{cmd.type} for unknown instance '{cmd.instance_id}'")
    if state["status"] != Status.SUSPENDED:
        return reject(state, cmd, now, RejectCode.INVALID_STATE,
                      f"expected a SUSPENDED instance to resume, but '{cmd.instance_id}' is {state['status']}")
    return accept(state, cmd, now, WorkflowResumed(reason=body.reason or ""), defs, journal)


def _resolve_incident(state: Optional[JSONDict], cmd: Command, body: ResolveIncident, now: int,
                      defs: DefinitionsView, journal: Journal) -> Decision:
    """Resolve an open incident (``IncidentResolved``), or reject why not; a rejection changes nothing."""
    if state is None:
        return Decision(state=None, dlq_reason=f"{cmd.type} for unknown instance '{cmd.instance_id}'")
    why = _cannot_resolve(state, cmd, body)
    if why is not None:
        return reject(state, cmd, now, *why)
    return accept(state, cmd, now, IncidentResolved(incident_id=body.incident_id, action=body.action,
                                                    output=body.output, input_patch=body.input_patch,
                                                    by=body.by or "", reason=body.reason or ""), defs, journal)


def _cannot_resolve(state: JSONDict, cmd: Command, body: ResolveIncident) -> Optional[tuple[str, str]]:
    """``(code, reason)`` when ``cmd`` cannot resolve an incident of ``state``, else None."""
    iid, status = cmd.instance_id, state["status"]
    incident_id, action = body.incident_id, body.action
    if status in Status.TERMINAL:
        return RejectCode.INVALID_STATE, f"expected an open instance to resolve incident '{incident_id}' of, but '{iid}' is {status}"
    if status == Status.SUSPENDED:
        return (RejectCode.INVALID_STATE, f"expected an instance that is not suspended, but '{iid}' is SUSPENDED: "
                "resume it first")
    incidents = state.get(INCIDENTS) or {}
    inc = incidents.get(incident_id) if isinstance(incident_id, str) else None
    if inc is None:
        return RejectCode.NOT_FOUND, (f"expected an open incident of '{iid}' ({', '.join(sorted(incidents)) or 'it has none'}), "
                                      f"but got '{incident_id}'")
    if action not in INCIDENT_ACTIONS:
        return RejectCode.INVALID_INPUT, f"expected action {', '.join(INCIDENT_ACTIONS)}, but got {action!r}"
    patch, output = body.input_patch, body.output
    if patch is not None and action != "retry":
        return RejectCode.INVALID_INPUT, f"expected no input_patch with action {action} (it patches a retry's input)"
    if output is not None and action != "skip":
        return RejectCode.INVALID_INPUT, f"expected no output with action {action} (it is the output of a skip)"
    if patch is not None and not isinstance(patch, dict):
        return RejectCode.INVALID_INPUT, f"expected input_patch to be a JSON object, but got {type(patch).__name__}"
    if patch and inc["input"] is not None and not isinstance(inc["input"], dict):
        return (RejectCode.INVALID_INPUT, f"expected a step whose input is a JSON object to patch, but the input of "
                f"step '{inc['step']}' is {type(inc['input']).__name__}")
    return None


def _activity_result(state: Optional[JSONDict], cmd: Command, body: Union[CompleteActivity, FailActivity], now: int,
                     defs: DefinitionsView, journal: Journal) -> Decision:
    guard = _active(state, cmd, now) or _pending_attempt(state, cmd, body, now)  # type: ignore[arg-type]
    if guard:
        return guard
    assert state is not None
    aid, attempt = body.activity_id, body.attempt
    if isinstance(body, CompleteActivity):
        size, limit = payload_size(body.result), limits_of(defs).max_payload_bytes
        if size > limit:
            return accept(state, cmd, now, ActivityFailed(
                activity_id=aid, attempt=attempt, error_type="LimitExceeded",
                message=f"expected a result of at most {limit} bytes, but got {size} bytes", retryable=False),
                defs, journal)
        return accept(state, cmd, now, ActivityCompleted(activity_id=aid, attempt=attempt, result=body.result),
                      defs, journal)
    return accept(state, cmd, now, ActivityFailed(activity_id=aid, attempt=attempt,
                                                  error_type=body.error_type or "ActivityError",
                                                  message=body.message or "", retryable=bool(body.retryable)),
                  defs, journal)


def _heartbeat(state: Optional[JSONDict], cmd: Command, body: HeartbeatActivity, now: int, defs: DefinitionsView,
               journal: Journal) -> Decision:
    # Heartbeats are not history. Only an attempt with a heartbeat timeout records one, at most
    # HEARTBEAT_RESOLUTION per timeout (HeartbeatRecorded stamps the attempt; the timer re-arms
    # itself from that stamp when it fires); the rest change nothing.
    if state is None or state["status"] not in Status.ACTIVE:
        return Decision(state=state)
    act = state["activities"].get(body.activity_id)
    if act is None or act["attempt"] != body.attempt or not heartbeat_due(act, state["timers"], now):
        return Decision(state=state)
    return accept(state, cmd, now, HeartbeatRecorded(activity_id=body.activity_id, attempt=body.attempt),
                  defs, journal)


def _start_activity(state: Optional[JSONDict], cmd: Command, body: StartActivity, now: int, defs: DefinitionsView,
                    journal: Journal) -> Decision:
    guard = _active(state, cmd, now) or _pending_attempt(state, cmd, body, now)  # type: ignore[arg-type]
    if guard:
        return guard
    assert state is not None
    act = state["activities"][body.activity_id]
    if "timers" not in act or (act.get("phase") == "started" and not act.get("local")):
        # A redelivered start report, or an activity without spec timeouts (code workflows).
        # A local attempt's start comes from the engine that deferred it, and every one means
        # "run it now": it is recorded each time so the attempt is never left without a runner.
        return Decision(state=state)
    return accept(state, cmd, now, ActivityStarted(activity_id=body.activity_id, attempt=body.attempt),
                  defs, journal)


def _fire_timer(state: Optional[JSONDict], cmd: Command, body: FireTimer, now: int, defs: DefinitionsView,
                journal: Journal) -> Decision:
    tid = body.timer_id
    if state is None or state["status"] not in Status.ACTIVE or tid not in state["timers"]:
        return Decision(state=state)  # a timer cancelled after it was indexed: nothing to do
    return accept(state, cmd, now, TimerFired(timer_id=tid), defs, journal)


def _child_result(state: Optional[JSONDict], cmd: Command, body: Union[CompleteChild, FailChild], now: int,
                  defs: DefinitionsView, journal: Journal) -> Decision:
    guard = _running(state, cmd, now, _RECEIVING)
    if guard:
        return guard
    assert state is not None
    cid = body.child_id
    if cid not in state["children"]:
        return reject(state, cmd, now, RejectCode.DUPLICATE, f"expected a running child '{cid}', but there is none")
    if isinstance(body, CompleteChild):
        return accept(state, cmd, now, ChildCompleted(child_id=cid, result=body.result), defs, journal)
    return accept(state, cmd, now, ChildFailed(child_id=cid, error_type=body.error_type or "ChildFailed",
                                               message=body.message or ""), defs, journal)


def _query(state: Optional[JSONDict], cmd: Command, body: QueryWorkflow, now: int, defs: DefinitionsView,
           journal: Journal) -> Decision:
    """Answer a query from the instance as it is now; nothing is written to its history.

    A code workflow answers from its live object (replayed when it is not cached); a spec
    workflow answers ``vars`` (all variables) or the name of one variable.
    """
    qid, name, args = body.query_id, body.name, body.args or []
    answer: JSONDict
    if state is None:
        answer = {"error": {"type": "NotFound", "message": f"no instance '{cmd.instance_id}'"}}
    elif not isinstance(args, list):
        answer = {"error": {"type": "InvalidQuery", "message": "query args must be a JSON array"}}
    elif state["kind"] == "code":
        compiled = defs.get(state["workflow"], state["version"])
        if compiled is None:
            answer = {"error": {"type": "UnknownWorkflow",
                                "message": f"code workflow '{state['workflow']}@{state['version']}' is not hosted here"}}
        else:
            try:
                answer = {"result": code_replayer.answer_query(compiled, state, name, args, journal,
                                                                  cache_of(defs))}
            except Exception as e:  # the handler's (or replay's) error is the answer
                answer = {"error": {"type": getattr(e, "type", None) or type(e).__name__, "message": str(e)}}
    elif name == "vars":
        answer = {"result": state["vars"]}
    elif name in state["vars"]:
        answer = {"result": state["vars"][name]}
    else:
        answer = {"error": {"type": "UnknownQuery", "message": f"spec workflow '{state['workflow']}' has no variable "
                            f"'{name}' (known: {', '.join(sorted(state['vars'])) or 'none'}; 'vars' returns all)"}}
    return Decision(state=state, replies=[(qid, answer)])


def _update(state: Optional[JSONDict], cmd: Command, body: UpdateWorkflow, now: int, defs: DefinitionsView,
            journal: Journal) -> Decision:
    """Validate an update and, if accepted, record ``UpdateAccepted`` and run its handler.

    Nothing is written before the update is accepted: a rejection (no instance, a closed one, no
    handler or waiting step for the name, the validator raising, data too large) is only an answer
    with ``"rejected": true``. A repeated update id is answered from the instance's record of it
    (or, while its handler still runs, left to the answer that handler will send).
    """
    uid, name = body.update_id, body.name
    entry = (state.get(UPDATES) or {}).get(uid) if state is not None else None
    if entry is not None:
        return Decision(state=state, replies=[(uid, entry["answer"])] if entry["answer"] is not None else [])
    why = _cannot_update(state, cmd, body, defs, journal)
    if why is not None:
        return Decision(state=state, replies=[(uid, {"error": {"type": why[0], "message": why[1]}, "rejected": True})])
    return accept(state, cmd, now, UpdateAccepted(update_id=uid, name=name, data=body.data), defs, journal)


def _cannot_update(state: Optional[JSONDict], cmd: Command, body: UpdateWorkflow, defs: DefinitionsView,
                   journal: Journal) -> Optional[tuple[str, str]]:
    """``(error type, message)`` when the update ``cmd`` is rejected, else None (it is accepted)."""
    iid, name, data = cmd.instance_id, body.name, body.data
    if state is None:
        return "NotFound", f"no instance '{iid}'"
    if state["status"] not in _ACCEPTING:
        return "InvalidState", f"expected a RUNNING instance to update, but '{iid}' is {state['status']}"
    if not isinstance(body.update_id, str) or not body.update_id:
        return "InvalidUpdate", "expected a non-empty update_id"
    size, limit = payload_size(data), limits_of(defs).max_payload_bytes
    if size > limit:
        return "LimitExceeded", f"expected update data of at most {limit} bytes, but got {size} bytes"
    compiled = defs.get(state["workflow"], state["version"])
    if compiled is None:
        return "UnknownWorkflow", f"workflow '{state['workflow']}@{state['version']}' is not hosted here"
    try:
        if state["kind"] == "code":
            code_replayer.validate_update(compiled, state, name, data, journal, cache_of(defs))
        else:
            spec_interpreter.validate_update(compiled, state, name, data)
    except Exception as e:  # the validator's (or replay's) error is the rejection
        return getattr(e, "type", None) or type(e).__name__, str(getattr(e, "message", None) or e)
    return None


#: Fields of an open incident copied into the public state record's ``incidents`` summary.
_INCIDENT_SUMMARY = ("step", "activity", "name", "queue", "error", "role", "instructions", "attempts", "raised_ms",
                     "timeout")
#: Prefix of the compensation activities of a step (their step id follows it).
_COMPENSATE_PREFIX = "compensate:"


def positions(state: JSONDict) -> list[str]:
    """Where ``state`` is: ``p:<list>:<index>`` per thread (its place in a steps list of the
    definition), ``s:<step id>`` per running activity or child workflow; sorted, no repeats."""
    out: set[str] = set()
    for th in (state.get("threads") or {}).values():
        idx = th.get("idx", 0)
        if isinstance(idx, int):
            out.add(f"p:{th.get('list', '')}:{idx}")
    for act in (state.get("activities") or {}).values():
        step = act.get("step")
        if isinstance(step, str):
            out.add("s:" + step.removeprefix(_COMPENSATE_PREFIX))
    for child in (state.get("children") or {}).values():
        if isinstance(child, dict) and isinstance(child.get("step"), str):
            out.add("s:" + child["step"])
    return sorted(out)


def public_state(state: JSONDict) -> JSONDict:
    """The public ``state`` record of ``state`` (the fields of state.avsc; docs/state-contract.md).

    Only stable fields derived from the engine's state: the engine's own bookkeeping stays on the
    ``engine-state`` changelog. Runs once per changed instance per transaction, so it only copies."""
    err = state.get("error") or {}
    search = state.get("search")
    incidents = state.get(INCIDENTS)
    tenant = state.get(TENANT)
    if tenant is None and search and isinstance(search.get(TENANT), str):
        tenant = search[TENANT]  # with auth off, a "tenant" search attribute names the tenant
    instance = "threads" in state  # a workflow instance, not a limit or schedule object
    return {"instance_id": state["id"], "workflow": state["workflow"], "version": state["version"],
            "status": state["status"], "seq": state["seq"], "started_ms": state["started_ms"],
            "updated_ms": state["updated_ms"], "closed_ms": state.get("closed_ms"), "result": state.get("result"),
            "error_type": err.get("type"), "error_message": err.get("message"), "format_version": 2,
            "kind": state.get("kind"), "tenant": tenant, "owner": state.get(OWNER),
            "parent_id": state.get("parent_id"), "run": state.get("run", 1) if instance else None,
            "priority": state.get(PRIORITY), "search_attributes": search or None,
            "incidents": {i: {k: inc.get(k) for k in _INCIDENT_SUMMARY} for i, inc in incidents.items()}
            if incidents else None,
            "position": positions(state) if instance else None}


def status_record(state: JSONDict) -> JSONDict:
    """The public state-record fields of ``state``, the full state as ``internal``, and ``events_offset``."""
    return {**public_state(state), "events_offset": state.get(EVENTS_OFFSET), "internal": state}


def _status(state: Optional[JSONDict], cmd: Command, body: QueryStatus, now: int, defs: DefinitionsView,
            journal: Journal) -> Decision:
    """Answer a status query with the instance's state record as it is now; nothing is written.

    The owner answers from the same state it decides on, so the answer includes every command
    decided before it (also those earlier in the same transaction, committed with the answer).
    """
    answer: JSONDict
    if state is None:
        answer = {"error": {"type": "NotFound", "message": f"no instance '{cmd.instance_id}'"}}
    else:
        answer = {"result": status_record(state)}
    return Decision(state=state, replies=[(body.query_id, answer)])


#: A command's decider: ``(state, command, its model, now, definitions, journal) -> Decision``. The model
#: (:mod:`kflow.model.commands`) is built once by :func:`decide`, and the decider reads the command's
#: fields from it, never from ``cmd.data``; each decider names its model's precise class, the
#: registries cannot. A kind's decider (:data:`KIND_DECIDERS`) takes any command, and None for a
#: type no model has.
Decider = Callable[[Optional[JSONDict], Command, Any, int, DefinitionsView, Journal], Decision]

DECIDERS: dict[str, Decider] = {
    "StartWorkflow": _start,
    "SignalWorkflow": _signal,
    "CancelWorkflow": _cancel,
    "CompleteActivity": _activity_result,
    "FailActivity": _activity_result,
    "HeartbeatActivity": _heartbeat,
    "FireTimer": _fire_timer,
    "CompleteChild": _child_result,
    "FailChild": _child_result,
    "StartActivity": _start_activity,
    "TerminateWorkflow": _terminate,
    "QueryWorkflow": _query,
    "QueryStatus": _status,
    "SuspendWorkflow": _suspend,
    "ResumeWorkflow": _resume_cmd,
    "RetryWorkflow": _retry,
    "ResolveIncident": _resolve_incident,
    "UpdateWorkflow": _update,
}

#: Deciders of objects that are not workflow instances, by their state's ``kind``: every command
#: addressed to such a state goes to its kind's decider (schedules register theirs, see
#: :mod:`kflow.engine.schedules`).
KIND_DECIDERS: dict[str, Decider] = {}

#: An input event's applier: ``(run, event, its model) -> None``. The model (:mod:`kflow.model.events`)
#: is built once by :func:`evolve`, and the applier reads the event's fields from it, never from
#: ``ev.data`` (``ev`` gives its ``seq``, ``ts``, ``instance_id`` and ``type``); each applier names its
#: model's precise class, the registries cannot.
Applier = Callable[[Run, Event, Any], None]

#: Appliers of input events neither interpreter knows (admission, permits, priority changes,
#: migrations), by event type; :mod:`kflow.engine.limits` and :mod:`kflow.engine.migration` register them.
INPUT_APPLIERS: dict[str, Applier] = {}
#: Called at the end of every ``evolve`` with the run and the state before the event (None for a
#: fresh start): limits release the permits of the work that ended in it.
AFTER_EVOLVE: list[Callable[[Run, Optional[JSONDict]], None]] = []
#: Asked by ``StartWorkflow`` with ``(state, cmd, now, defs, journal, WorkflowStarted model, level, tenant)``
#: (tenant: see :func:`_start_tenant`): a decision that queues the start instead (quotas), or None to
#: start it now.
START_GATES: list[Callable[..., Optional[Decision]]] = []


def decide(state: Optional[JSONDict], cmd: Command, now: int, defs: DefinitionsView,
           journal: Optional[Journal] = None) -> Decision:
    """Decide one command against one instance's state at time ``now`` (ms). Never mutates ``state``.

    ``journal`` reads the history of code workflows (only when one must be rebuilt); the caller
    persists ``Decision.journal`` with the new state. Without one, the process's in-memory
    :data:`~kflow.engine.journal.MEMORY` is read and the decision is applied to it at once: the
    mode of in-memory callers that keep no journal of their own.

    The command's model (:mod:`kflow.model.commands`) is built here, once, and handed to its
    decider; a command whose data does not fit its model goes to the DLQ, the reason naming the
    fields.
    """
    decider = DECIDERS.get(cmd.type)
    by_kind = state is not None and state.get("kind") in KIND_DECIDERS
    if by_kind:
        assert state is not None
        decider = KIND_DECIDERS[state["kind"]]
    if decider is None:
        return Decision(state=state, dlq_reason=f"unknown command type '{cmd.type}'")
    data = cmd.data
    if TENANT in data and cmd.type == "StartWorkflow":  # the processor's stamp, no field: see _start_tenant
        data = {k: v for k, v in data.items() if k != TENANT}
    body: Optional[AnyCommand]
    try:
        body = from_data(cmd.type, data)
    except ValueError as e:  # made in-process or by hand: the codec only passes commands that fit
        if not by_kind or cmd.type in COMMAND_TYPES:
            return Decision(state=state, dlq_reason=str(e))
        body = None  # a type no model has, sent to a schedule or a limit: its kind's decider refuses it
    if journal is not None:
        return decider(state, cmd, body, now, defs, journal)
    d = decider(state, cmd, body, now, defs, MEMORY)
    MEMORY.apply(d.journal)
    return d


# -- fold (replay) -------------------------------------------------------------------------------
def fold(events: list[Event], defs: DefinitionsView, journal: Optional[InMemoryJournal] = None) -> Optional[JSONDict]:
    """Rebuild an instance's state from its history, checking every consequence event matches.

    The code-workflow journal the history implies is rebuilt alongside, in ``journal`` (a fresh
    one by default).
    """
    journal = journal if journal is not None else InMemoryJournal()
    state: Optional[JSONDict] = None
    i = 0
    while i < len(events):
        ev = events[i]
        if ev.type == "CommandRejected":
            assert state is not None
            state = dict(state)
            state["seq"], state["updated_ms"] = ev.seq, ev.ts
            i += 1
            continue
        if ev.type not in INPUT_EVENTS:
            raise DeterminismError(ev.instance_id, ev.seq, ev.type, "no event (consequence without cause)")
        state, run = evolve(state, ev, defs, journal)
        journal.apply(run.journal_ops)
        for produced in run.events:
            i += 1
            recorded = events[i] if i < len(events) else None
            if recorded is None or (recorded.type, recorded.seq, recorded.data) != (produced.type, produced.seq, produced.data):
                expected = None if recorded is None else (recorded.type, recorded.data)
                raise DeterminismError(ev.instance_id, produced.seq, expected, (produced.type, produced.data))
        i += 1
    return state
