"""The code-workflow replayer: how the engine delivers an input event to a code workflow.

:func:`apply_input`, called by :mod:`kflow.engine.core` for every input event of a code instance,
applies the event's effect on the state and maps it to what the coroutine is fed
(:mod:`kflow.engine.code_history`), journals it (:mod:`kflow.engine.code_journal`), and drives the
instance's machine (:mod:`kflow.engine.code_machine`): the live one parked in the replay cache of
the definitions view (:mod:`kflow.engine.code_cache`), so the common case reads no history, or on
a miss (restart, rebalance, eviction) one rebuilt by replaying the run's journal once, every
command it issues checked against the recorded one. A mismatch is non-determinism: the instance
becomes ``BLOCKED`` with a description, nothing else changes, and each later input (or the replay
timer the block sets) retries the replay, so deploying fixed code resumes the instance where it
stopped. What the machine issues is journaled; it then finishes, continues as new or is parked.
Queries and update validators run on the same live machine without writing anything.
"""

from __future__ import annotations

from typing import Any, Optional

import orjson

from kflow.engine import activity as activities
from kflow.engine.activity import limits_of
from kflow.engine.code_cache import ReplayCache, cache_of
from kflow.engine.code_context import ContinueAsNew, as_json
from kflow.engine.code_history import input_of, replay
from kflow.engine.code_journal import (
    BLOCKED_INFO,
    COMMAND_COUNT,
    DELIVERED,
    INPUT_COUNT,
    INPUTS,
    append_commands,
    append_input,
    end_journal,
    history_of,
    move_lists_to_journal,
    open_journal,
    position_key,
    run_history,
)
from kflow.engine.code_machine import CodeDefinition, Machine, NondeterminismError, ReplayMismatch
from kflow.engine.journal import Entries, Journal
from kflow.engine.run import AT_SAFE_POINT, PENDING_MIGRATION, PRIORITY, UPDATES, Run, new_state
from kflow.model.commands import CancelWorkflow
from kflow.model.errors import KflowError, WorkflowError
from kflow.model.events import AnyEvent, WorkflowContinuedAsNew
from kflow.model.messages import Event, JSONDict, Status

__all__ = ["answer_query", "apply_input", "drive", "forget", "keep_parked", "new_machine", "park", "query",
           "validate_update"]

#: Most runs started by ``continue_as_new`` within one decision (a loop that never awaits).
MAX_CONTINUATIONS_PER_DECISION = 10

#: Back-off of the timer that retries the replay of a BLOCKED instance: first, cap (ms).
REPLAY_RETRY_MS, REPLAY_RETRY_MAX_MS = 1_000, 300_000


def _passthrough(cache: ReplayCache, st: JSONDict, prev_key: Optional[tuple[Any, ...]]) -> None:
    """An event the coroutine does not see: keep the parked machine, re-keyed to the new position."""
    parked = cache.take(st["id"], prev_key) if prev_key is not None else None
    if parked is not None:
        cache.put(st["id"], position_key(st["seq"], st), parked)


def apply_input(run: Run, ev: Event, body: AnyEvent) -> None:
    """Deliver one input event (``body`` its model) to a code workflow, replaying its history first when needed."""
    st = run.state
    definition: Optional[CodeDefinition] = run.compiled
    # a new run, or one whose history was inside its state, has nothing in the journal to read
    journaled = ev.type != "WorkflowStarted" and INPUTS not in st
    if ev.type == "WorkflowStarted":
        open_journal(st)
        if definition is not None and definition.execution_timeout_ms is not None:
            activities.start_timer(run, None, run.now + definition.execution_timeout_ms, "execution")
    else:
        move_lists_to_journal(run)
    # core has already stamped the state with this event's seq; the machine was parked one before.
    prev_key = position_key(ev.seq - 1, st) if st[INPUT_COUNT] else None
    fed = input_of(run, ev, body)
    cache = cache_of(run.defs)
    if fed is None:
        _passthrough(cache, st, prev_key)
        _check_history(run)
        return
    if fed and fed[0] == "$timeout":
        run.fail("WorkflowTimeout", f"the workflow did not finish within {definition.execution_timeout_ms / 1000:g}s"
                 if definition is not None and definition.execution_timeout_ms else "the workflow timed out")
        return
    if fed:
        append_input(run, fed)
    if PENDING_MIGRATION in st:  # the input is recorded: a migration due at this point goes before it is fed
        for hook in AT_SAFE_POINT:
            moved = hook(run)
            if moved is not None:
                drive(run, moved, [fed] if fed else [])
                return
    if definition is None:
        _block(run, NondeterminismError(st["id"], st[DELIVERED], f"code workflow '{st['workflow']}@{st['version']}'",
                                        "no such workflow registered in this engine"))
        return
    machine = None
    if st["status"] in Status.ACTIVE and prev_key is not None:
        machine = cache.take(st["id"], prev_key)
    if machine is not None:  # parked right after the previous input: only this one is new
        drive(run, machine, [fed] if fed else [])
        return
    inputs, commands = run_history(run, journaled)
    machine = _rebuild(run, definition, inputs, commands)
    if machine is not None:
        drive(run, machine, inputs[st[DELIVERED]:])


def _rebuild(run: Run, definition: CodeDefinition, inputs: Entries, commands: Entries) -> Optional[Machine]:
    """Replay the delivered inputs into a fresh machine; None (and BLOCKED) on a mismatch."""
    st = run.state
    try:
        machine = replay(definition, st["id"], inputs[:st[DELIVERED]], commands, st.get("run", 1),
                         limits_of(run.defs).max_history_events, running=True)
    except NondeterminismError as e:
        _block(run, e)
        return None
    if st["status"] == Status.BLOCKED:
        _unblock(st)
    return machine


def park(defs: Any, state: JSONDict, machine: Machine) -> None:
    """Cache ``machine`` as the live machine of ``state``'s instance at the position ``state`` is at."""
    cache_of(defs).put(state["id"], position_key(state["seq"], state), machine)


def keep_parked(defs: Any, state: JSONDict, prev_seq: int) -> None:
    """An event the coroutine does not see moved the instance on from ``prev_seq``: re-key its machine."""
    _passthrough(cache_of(defs), state, position_key(prev_seq, state))


def forget(defs: Any, state: JSONDict) -> None:
    """Drop the live machine of ``state``'s instance (e.g. it moves to other code)."""
    cache_of(defs).take(state["id"], ())


def new_machine(run: Run, definition: CodeDefinition, commands: Entries) -> Machine:
    """A fresh machine for the run, its commands checked against the recorded ``commands``."""
    st = run.state
    machine = Machine(definition, st["id"], commands)
    machine.run_number = st.get("run", 1)
    machine.history_limit = limits_of(run.defs).max_history_events
    return machine


def drive(run: Run, machine: Machine, pending: Entries, depth: int = 0) -> None:
    """Feed the machine the inputs it has not seen, journal the commands it issues, then finish,
    continue or park it."""
    st = run.state
    issued: Entries = []
    machine.live, machine.run, machine.recorded = True, run, issued
    for type_, data, ts, seq in pending:
        machine.history_length = st["seq"] - st.get("run_seq", 0)
        machine.deliver(type_, data, ts, seq)
        if machine.finished:
            break
    st[DELIVERED] = st[INPUT_COUNT]
    append_commands(run, issued)
    machine.run = None
    if not machine.finished:
        cache_of(run.defs).put(st["id"], position_key(st["seq"], st), machine)
        _check_history(run)
        return
    assert machine.root is not None
    err = machine.root.future.error
    if isinstance(err, ContinueAsNew):
        if depth >= MAX_CONTINUATIONS_PER_DECISION:
            run.fail("ContinueAsNewLoop", f"continue_as_new was called {depth} times without awaiting anything")
            return
        _continue_as_new(run, err.input, depth)
    else:
        _finish(run, machine)


def _continue_as_new(run: Run, input_: Any, depth: int) -> None:
    """Close this run's pending work and start the next run of the workflow under the same id."""
    st = run.state
    name = st["workflow"]
    version = run.defs.latest(name) or st["version"]
    definition = run.defs.get(name, version)
    if getattr(definition, "kind", None) != "code":
        version, definition = st["version"], run.compiled
    for child_id in sorted(st["children"]):
        run.send(CancelWorkflow(reason=f"parent {st['id']} continued as new"), child_id)
    run.cancel_activities()
    run.abandon_updates(f"'{st['id']}' continued as new before the update's handler finished")
    number = st.get("run", 1) + 1
    run.record(WorkflowContinuedAsNew(input=input_, run=number, version=version))
    end_journal(run)
    fresh = new_state(st["id"], name, version, "code", input_, run.now, st.get("parent_id"),
                      st.get("parent_ref"), st["seq"])
    fresh["run"], fresh["run_seq"] = number, st["seq"]
    fresh["runs"] = (st.get("runs") or [])[-9:] + [{"run": number - 1, "version": st["version"],
                                                      "started_ms": st["started_ms"], "input": st["input"],
                                                      "continued_with": input_}]
    for kept in ("search", PRIORITY, UPDATES):  # the next run is the same instance: same attributes, level, updates
        if kept in st:
            fresh[kept] = st[kept]
    st.clear()
    st.update(fresh)
    open_journal(st)
    started = ["WorkflowStarted", {"input": input_}, run.now, st["seq"]]
    append_input(run, started)
    run.compiled = definition
    if definition.execution_timeout_ms is not None:
        activities.start_timer(run, None, run.now + definition.execution_timeout_ms, "execution")
    drive(run, new_machine(run, definition, []), [started], depth + 1)


def _check_history(run: Run) -> None:
    """Fail a run whose history outgrew the engine's limit (it should have continued as new)."""
    st = run.state
    limit = limits_of(run.defs).max_history_events
    if st["status"] in Status.ACTIVE and st["seq"] - st.get("run_seq", 0) > limit:
        run.fail("HistoryLimitExceeded", f"expected at most {limit} events per run, but this run has "
                 f"{st['seq'] - st.get('run_seq', 0)}; call ctx.continue_as_new() before the limit")


def answer_query(definition: CodeDefinition, state: JSONDict, name: str, args: list[Any],
                 journal: Optional[Journal] = None, cache: Optional[ReplayCache] = None) -> Any:
    """Answer query ``name`` from the instance's live machine (the engine's path, no history written).

    A cached machine at the instance's exact position answers at once; otherwise the instance is
    replayed from ``journal`` (and the rebuilt machine kept in ``cache``, so the next input does not
    replay again; without a cache, every query replays).
    """
    cache = cache if cache is not None else cache_of(None)
    active = state["status"] in Status.ACTIVE
    key = position_key(state["seq"], state) if active and state.get(INPUT_COUNT) else None
    machine = cache.take(state["id"], key) if key is not None else None
    if machine is None:
        machine = _replayed(definition, state, journal)
    try:
        return _call_query(machine, definition, name, args)
    finally:
        if key is not None and not machine.finished and machine.cursor == state[COMMAND_COUNT]:
            cache.put(state["id"], key, machine)


def validate_update(definition: CodeDefinition, state: JSONDict, name: str, data: Any,
                    journal: Optional[Journal] = None, cache: Optional[ReplayCache] = None) -> None:
    """Check update ``name`` against the instance's live machine: it has a handler, and its
    validator (if any) neither raises nor returns False. Writes nothing, like a query.

    Raises:
        WorkflowError: ``type`` ``"UnknownUpdate"`` (no handler) or ``"UpdateRejected"`` (the
            validator returned False); whatever the validator raised; a replay error.
    """
    cache = cache if cache is not None else cache_of(None)
    key = position_key(state["seq"], state) if state.get(INPUT_COUNT) else None
    machine = cache.take(state["id"], key) if key is not None else None
    if machine is None:
        machine = _replayed(definition, state, journal)
    try:
        entry = machine.update_handlers.get(name)
        if entry is None:
            known = ", ".join(sorted(machine.update_handlers)) or "none"
            raise WorkflowError(f"workflow '{definition.name}' has no update '{name}' (registered: {known})",
                                type="UnknownUpdate")
        if entry[1] is not None:
            try:
                with machine.sandbox_guard():
                    verdict = entry[1](data)
            except (GeneratorExit, ReplayMismatch, ContinueAsNew):  # it issued a command: the machine is not reused
                raise WorkflowError(f"the validator of update '{name}' must only read the workflow's variables, "
                                    "not start activities, timers or other workflow operations",
                                    type="InvalidValidator") from None
            if verdict is False:
                raise WorkflowError(f"the validator of update '{name}' returned False", type="UpdateRejected")
    finally:
        if key is not None and not machine.finished and machine.cursor == state[COMMAND_COUNT]:
            cache.put(state["id"], key, machine)


def _replayed(definition: CodeDefinition, state: JSONDict, journal: Optional[Journal]) -> Machine:
    """The instance's machine rebuilt from its recorded history, fed the inputs it was delivered."""
    inputs, commands = history_of(state, journal)
    return replay(definition, state["id"], inputs[:state[DELIVERED]], commands, state.get("run", 1), complete=False)


def _call_query(machine: Machine, definition: CodeDefinition, name: str, args: list[Any]) -> Any:
    handler = machine.queries.get(name)
    if handler is None:
        known = ", ".join(sorted(machine.queries)) or "none"
        raise KflowError(f"workflow '{definition.name}' has no query '{name}' (registered: {known})")
    with machine.sandbox_guard():
        value = handler(*args)
    return as_json(value, f"the answer to query '{name}'")


def query(definition: CodeDefinition, state: JSONDict, name: str, *args: Any,
          journal: Optional[Journal] = None) -> Any:
    """Rebuild an instance's coroutine by replay and call its query handler ``name``.

    Runs wherever the workflow's code is importable, on the ``internal`` state of the instance's
    ``state`` record and its history: ``journal`` (by default the in-memory journal of this
    process, which holds the instances decided here without a journal of their own, e.g. by the
    test harness), or the state itself when it predates the journal. It never changes the instance.
    An instance decided by an engine elsewhere is asked through that engine (``Client.query``).
    """
    return _call_query(_replayed(definition, state, journal), definition, name, list(args))


def _finish(run: Run, machine: Machine) -> None:
    assert machine.root is not None
    fut = machine.root.future
    if fut.error is None:
        try:
            result = orjson.loads(orjson.dumps(fut.value))
        except TypeError as e:
            run.fail("InvalidResult", f"workflow result is not JSON: {e}")
            return
        run.state.pop("cancel_reason", None)
        run.complete(result)
    elif run.state["status"] == Status.CANCELLING:
        run.close(Status.CANCELLED, "WorkflowCancelled", {"reason": run.state.pop("cancel_reason", "")})
    else:
        err = fut.error
        run.fail(getattr(err, "type", None) or type(err).__name__, str(getattr(err, "message", None) or err))


def _block(run: Run, err: NondeterminismError) -> None:
    """Park the instance: BLOCKED with a description and a timer that retries the replay."""
    st = run.state
    attempts = (st.get(BLOCKED_INFO) or {}).get("attempts", 0) + 1
    st["status"] = Status.BLOCKED
    st[BLOCKED_INFO] = {"seq": st["seq"], "index": err.event_index, "expected": err.expected,
                        "actual": err.actual, "message": str(err), "attempts": attempts}
    if not any(t.get("purpose") == "replay" for t in st["timers"].values()):
        delay = min(REPLAY_RETRY_MS * 2 ** (attempts - 1), REPLAY_RETRY_MAX_MS)
        st["timers"][f"replay-{st['seq']}"] = {"due": run.now + delay, "thread": "code", "purpose": "replay"}


def _unblock(st: JSONDict) -> None:
    st["status"] = Status.RUNNING
    st.pop(BLOCKED_INFO, None)
    for tid in [t for t, v in st["timers"].items() if v.get("purpose") == "replay"]:
        del st["timers"][tid]
