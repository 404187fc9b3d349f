"""Retry of a closed code workflow: reset its run to an input of its history and replay from there.

A code run that closes other than COMPLETED keeps its journal (:func:`keep_journal`), so that
``RetryWorkflow`` can re-open it. The reset point is an event of the instance's history (its
``seq``): the run keeps the journaled inputs up to that event and drops the ones after it. By
default that is every input before the one that ended the run (for an activity that failed for
good, everything but its final ``ActivityFailed``; for a forced retry of a cancelled run, everything
before ``CancelRequested``; for a terminated one, everything). ``decide`` checks the reset with
:func:`reset_point`, a dry replay, and records it in ``WorkflowRetried.from_step`` as
``"event:<seq>"``; ``evolve`` applies it with :func:`on_retried`:

1. the run's journal entries are deleted and the kept inputs appended again, with the commands
   the code issued while it was fed them (the run number stays: ``ctx.run_number`` is seen by code);
2. a fresh machine is fed the kept inputs in replay mode, and every command it re-issues rebuilds
   the state entry the original made (an activity record, a timer with its original due time)
   without events or tasks, so the instance stands exactly where it stood after that input;
3. its work is dispatched again: every activity pending there is scheduled under a higher attempt
   number than any it had (:data:`RESET_ATTEMPTS`, so a late report of an old attempt stays
   ``STALE``), its retry policy counted afresh; the execution timeout, if any, counts from now.

The machine is then live and parked like after any input. History events are never removed: the
journal is only the replay's working copy of the run.
"""

from __future__ import annotations

from typing import Any, Optional

from kflow.engine import activity as activities
from kflow.engine.code_journal import (
    BLOCKED_INFO,
    COMMAND_COUNT,
    INPUT_COUNT,
    INPUTS,
    HistoryUnavailable,
    append_commands,
    append_input,
    end_journal,
    history_of,
    open_journal,
    run_history,
)
from kflow.engine.code_machine import Machine, NondeterminismError, ReplayMismatch
from kflow.engine.code_replayer import drive, new_machine
from kflow.engine.journal import Entries, Journal, Reset
from kflow.engine.run import INCIDENTS, Run
from kflow.model.events import WorkflowRetried
from kflow.model.messages import Event, JSONDict, RejectCode, Status

#: ``RetryWorkflow.from_step`` / ``WorkflowRetried.from_step`` of a code workflow: ``"event:<seq>"``,
#: the last event of the history its run is reset to (``from_step`` names a step for spec workflows).
EVENT_PREFIX = "event:"

#: State key of a closed code run (persisted name): activity id -> the highest attempt it reached.
#: A reset dispatches each pending activity under the next attempt number.
RESET_ATTEMPTS = "reset_attempts"
#: Most activities :data:`RESET_ATTEMPTS` remembers (the most recent ones).
ATTEMPTS_WINDOW = 256

Why = tuple[str, str]


def reset_event(from_step: Any) -> Optional[int]:
    """The event seq of an ``"event:<seq>"`` reset point, or None when ``from_step`` is not one."""
    if not isinstance(from_step, str) or not from_step.startswith(EVENT_PREFIX):
        return None
    digits = from_step[len(EVENT_PREFIX):]
    return int(digits) if digits.isdigit() else None


# -- closing and reusing a run -------------------------------------------------------------------------
def keep_journal(run: Run, before: JSONDict) -> None:
    """A code run just closed other than COMPLETED: its journal stays for a retry; note how far
    each activity's attempts went (``before`` is the state before the closing event). A state
    that still carries its history as lists (written before the journal) drops it instead."""
    if INPUTS in run.state:
        end_journal(run)
        return
    attempts: dict[str, int] = dict(before.get(RESET_ATTEMPTS) or {})

    def note(aid: Any, attempt: Any) -> None:
        if isinstance(aid, str) and isinstance(attempt, int):
            attempts[aid] = max(attempts.pop(aid, 0), attempt)  # re-inserted last: the window keeps the newest

    for aid, entry in (before.get("ended") or {}).items():
        note(aid, entry[0])
    for inc in (before.get(INCIDENTS) or {}).values():
        note(inc.get("activity"), inc.get("attempts"))
    for aid, act in before.get("activities", {}).items():
        note(aid, act["attempt"])
    for aid in list(attempts)[:-ATTEMPTS_WINDOW]:
        del attempts[aid]
    if attempts:
        run.state[RESET_ATTEMPTS] = attempts


def drop_kept_journal(run: Run, old: JSONDict) -> None:
    """A start reuses the id of a closed code instance: delete the journal its last run kept."""
    if old.get("kind") == "code" and old["status"] in Status.TERMINAL and INPUT_COUNT in old:
        run.journal_ops.append(Reset(old["id"], old.get("run", 1), old[INPUT_COUNT], old[COMMAND_COUNT]))


# -- deciding: where a retry resets to ---------------------------------------------------------------------
def reset_point(definition: Any, state: JSONDict, to_event: Optional[int],
                journal: Journal) -> tuple[int, Optional[Why]]:
    """The seq of the last event a retry of closed code instance ``state`` keeps, or why it cannot.

    ``to_event`` is the event asked for (None: just before the input that ended the run). The
    kept inputs are replayed once here, so a reset that would not replay is refused up front.
    """
    iid = state["id"]
    if INPUT_COUNT not in state:
        return 0, (RejectCode.INVALID_STATE, f"expected the kept history of a closed code run, but '{iid}' has "
                   "none (its history was deleted when it closed): start a new instance")
    if getattr(definition, "kind", None) != "code":
        return 0, (RejectCode.INVALID_STATE, f"expected code workflow '{state['workflow']}@{state['version']}' "
                   "to be hosted by this engine, but it is not")
    try:
        inputs, commands = history_of(state, journal)
    except HistoryUnavailable as e:
        return 0, (RejectCode.INVALID_STATE, str(e))
    first = inputs[0][3]
    try:
        if to_event is None:
            keep = _default_keep(definition, state, inputs, commands)
        elif to_event < first:
            return 0, (RejectCode.INVALID_INPUT, f"expected an event of the current run of '{iid}' (event {first} "
                       f"or later), but got event {to_event}")
        else:
            keep = _prefix(inputs, to_event)
        if keep == 0:
            return 0, (RejectCode.INVALID_STATE, f"expected a run that got past its start, but '{iid}' ended on "
                       "its first input: start a new instance")
        tables, machine = _replay(definition, state, inputs[:keep], commands)
    except ReplayMismatch as m:
        err = NondeterminismError(iid, m.index, m.expected, m.actual)
        return 0, (RejectCode.INVALID_STATE, f"expected a history the deployed code replays, but {err}")
    seq = inputs[keep - 1][3]
    if machine.finished:
        return 0, (RejectCode.INVALID_INPUT, f"expected an event before the one that ended '{iid}', but event "
                   f"{to_event} is at or after it (event {seq} ended the run)")
    if tables["children"]:
        return 0, (RejectCode.INVALID_STATE, f"expected no child workflow pending at event {seq}, but "
                   f"{', '.join(sorted(tables['children']))} was (children are cancelled when the parent closes): "
                   "reset to an event after its result, or start a new instance")
    return seq, None


def _prefix(inputs: Entries, seq: int) -> int:
    """How many leading inputs are at or before event ``seq``."""
    n = 0
    while n < len(inputs) and inputs[n][3] <= seq:
        n += 1
    return n


def _default_keep(definition: Any, state: JSONDict, inputs: Entries, commands: Entries) -> int:
    """How many inputs a retry keeps by default: all before the one that ended the run."""
    if state["status"] == Status.CANCELLED:
        for i, entry in enumerate(inputs):
            if entry[0] == "CancelRequested":
                return i
    probe = Machine(definition, state["id"], commands)
    probe.run_number = state.get("run", 1)
    for i, entry in enumerate(inputs):
        probe.deliver(*entry)
        if probe.finished:
            return i
    return len(inputs)  # the run ended outside its code (terminated, timed out, a limit): keep all


def _replay(definition: Any, state: JSONDict, kept: Entries, commands: Entries) -> tuple[JSONDict, Machine]:
    """Feed ``kept`` to a fresh machine, rebuilding the tables its commands made; a dry run."""
    tables: JSONDict = {"status": Status.RUNNING, "activities": {}, "timers": {}, "children": {}}
    machine = Machine(definition, state["id"], commands)
    machine.run_number = state.get("run", 1)
    machine.restoring = tables
    for entry in kept:
        _restore_input(tables, entry)
        machine.deliver(*entry)
        if machine.finished:
            break
    machine.restoring = None
    return tables, machine


def _restore_input(st: JSONDict, entry: list[Any]) -> None:
    """What a journaled input did to the instance's tables (its events were recorded then)."""
    type_, data = entry[0], entry[1]
    if type_ in ("ActivityCompleted", "ActivityFailed"):
        st["activities"].pop(data["activity_id"], None)
    elif type_ in ("ChildCompleted", "ChildFailed"):
        st["children"].pop(data["child_id"], None)
    elif type_ == "TimerFired":
        st["timers"].pop(data["timer_id"], None)
    elif type_ == "CancelRequested":
        st["status"] = Status.CANCELLING
        st["cancel_reason"] = data.get("reason", "")
        st["activities"], st["children"], st["timers"] = {}, {}, {}


# -- evolving: the reset itself ------------------------------------------------------------------------------
def on_retried(run: Run, ev: Event, body: WorkflowRetried) -> None:
    """Re-open a closed code run at the event ``WorkflowRetried`` (``body``) names and dispatch its work again."""
    st = run.state
    definition = run.compiled
    seq = reset_event(body.from_step)
    assert seq is not None and definition is not None, "decide checks the reset point and the definition"
    inputs, commands = run_history(run, True)
    keep = _prefix(inputs, seq)
    attempts: dict[str, int] = st.pop(RESET_ATTEMPTS, None) or {}
    run.journal_ops.append(Reset(st["id"], st.get("run", 1), st[INPUT_COUNT], st[COMMAND_COUNT]))
    st["status"] = Status.RUNNING
    st["closed_ms"], st["error"], st["result"] = None, None, None
    st["retries"] = body.attempt
    for key in ("ended", "cancel_reason", BLOCKED_INFO, INCIDENTS):
        st.pop(key, None)
    st["activities"], st["timers"], st["children"], st["signals"], st["threads"] = {}, {}, {}, {}, {}
    open_journal(st)
    machine = new_machine(run, definition, commands)
    machine.restoring = st
    try:
        for entry in inputs[:keep]:
            _restore_input(st, entry)
            append_input(run, entry)
            machine.deliver(*entry)
    except ReplayMismatch as m:  # decide replayed the same inputs with the same code a moment ago
        raise NondeterminismError(st["id"], m.index, m.expected, m.actual) from None
    machine.restoring = None
    append_commands(run, commands[:machine.cursor])
    if definition.execution_timeout_ms is not None:
        activities.start_timer(run, None, run.now + definition.execution_timeout_ms, "execution")
    for aid in list(st["activities"]):
        act = st["activities"][aid]
        act["attempt"] = attempts.get(aid, 1)  # reopen schedules the next one, its policy counted afresh
        activities.reopen(run, aid, act, act["input"])
    drive(run, machine, [])
