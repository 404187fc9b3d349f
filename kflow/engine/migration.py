"""Version ranges, and moving running instances to another version of their workflow.

Three pure parts. :func:`resolve_version` picks the version a start names (exact, a range such as
``^1.2``, ``~1.4`` or ``>=1.2,<2`` in :class:`semantic_version.SimpleSpec` syntax, or the latest).
:func:`what_if` replays an instance's recorded history on a target version and reports the first
difference (or that the history is compatible): a spec history's input events are re-interpreted
and its consequence events compared, with the waiting positions a ``step_map`` leaves without a
place in the target; a code history's inputs are fed to the target's code, which must issue every
recorded command (the replay :func:`~kflow.engine.code_history.replay` a migration makes). The
``MigrateWorkflow`` decider and the ``WorkflowMigrated`` / ``MigrationDeferred`` appliers (registered
into :mod:`kflow.engine.core`'s tables on import) move one instance at a safe point: every thread
waits on a signal, an update, a timer or a join, or stands between steps, and no activity or child
is in flight. A spec instance's positions are mapped and its variables transformed; a code
instance moves only to another registered version of its code whose replay of the journal
reproduces the recorded commands exactly (its changes are ``ctx.patched()`` branches), else the
command is rejected with the first divergence and it runs on where it was. An instance with work in
flight records the migration as pending (``MigrationDeferred``; a later one replaces it) and the
interpreters apply it in the decision that reaches the next safe point, after the input's effect
(the activity's result) and before anything runs on: ``WorkflowMigrated``, or ``CommandRejected``
when the plan no longer fits there. Closing or cancelling the instance drops it. The event carries
the variables after the transform, and the state change is made by one function for both paths, so
folding the history reproduces the state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, cast

import orjson
import semantic_version

from kflow.engine import code_replayer, core
from kflow.engine.activity import limits_of
from kflow.engine.code_history import history_from_events, replay
from kflow.engine.code_journal import DELIVERED, INPUT_COUNT, HistoryUnavailable, history_of, run_history
from kflow.engine.code_machine import CodeDefinition, Machine, NondeterminismError
from kflow.engine.definitions import CompiledSpec, DefinitionsView
from kflow.engine.expr import ExpressionError, evaluate
from kflow.engine.journal import Entries, InMemoryJournal, Journal
from kflow.engine.registry import registry_of
from kflow.engine.run import AT_SAFE_POINT, PENDING_MIGRATION, Run
from kflow.model.commands import MigrateWorkflow, to_data
from kflow.model.errors import DeterminismError, KflowError
from kflow.model.events import CommandRejected, MigrationDeferred, WorkflowMigrated
from kflow.model.events import to_data as event_data
from kflow.model.messages import Command, Event, JSONDict, RejectCode, Status
from kflow.model.spec import Step
from kflow.model.versions import format_version, is_version_text, version_code, version_tuple

__all__ = ["Divergence", "PositionMap", "VersionRangeError", "WhatIf", "map_positions", "matches",
           "resolve_version", "transform_key", "what_if"]


class VersionRangeError(KflowError, ValueError):
    """A version or range is malformed, or no deployed version matches it; the message says which."""


# -- versions and ranges -------------------------------------------------------------------------
def _spec(text: str) -> semantic_version.BaseSpec:
    """``text`` as a range: :class:`~semantic_version.SimpleSpec` (``^1.2``, ``>=1.2,<2``), else npm syntax (``1.x``)."""
    try:
        return semantic_version.SimpleSpec(text.replace(" ", ""))
    except ValueError:
        pass
    try:
        return semantic_version.NpmSpec(text)
    except ValueError:
        raise VersionRangeError(f"expected a version (3, 1.4.0) or a range (^1.2, ~1.4, >=1.2,<2, 1.x), but got "
                                f"{text!r}") from None


def matches(wanted: Any, code: int) -> bool:
    """Whether version ``code`` is the exact version or within the range ``wanted`` (``None``/``latest``: any)."""
    if wanted is None or (isinstance(wanted, str) and wanted.strip() in ("", "latest", "*")):
        return True
    if isinstance(wanted, int) or (isinstance(wanted, str) and is_version_text(wanted)):
        try:
            return version_code(wanted) == code
        except ValueError as e:
            raise VersionRangeError(str(e)) from None
    matched: bool = _spec(str(wanted)).match(semantic_version.Version("{}.{}.{}".format(*version_tuple(code))))
    return matched


def resolve_version(name: str, wanted: Any, available: Sequence[int]) -> int:
    """The version of ``name`` a start of ``wanted`` runs: the newest of ``available`` that matches.

    Raises:
        VersionRangeError: ``wanted`` is malformed, or no version in ``available`` matches it.
    """
    found = [v for v in available if matches(wanted, v)]
    if not found:
        known = ", ".join(format_version(v) for v in sorted(available, key=version_tuple)) or "none"
        raise VersionRangeError(f"no deployed version of '{name}' matches {str(wanted)!r} (deployed: {known})")
    return max(found, key=version_tuple)


def deployed_versions(defs: DefinitionsView, name: str) -> list[int]:
    """Every version of ``name`` ``defs`` knows (only the latest when the view cannot list them)."""
    listing = getattr(defs, "versions", None)
    if listing is not None:
        return list(listing(name))
    latest = defs.latest(name)
    return [] if latest is None else [latest]


# -- Python transforms ----------------------------------------------------------------------------
# Python variable transforms (``fn(vars) -> vars``) are kept by :func:`transform_key` in the
# registry of the definitions view (:func:`~kflow.engine.registry.registry_of`), filled by
# :func:`kflow.migration` in the process that decides (the engine), like hosted code workflows.
def transform_key(workflow: str, from_range: str, to: Any) -> str:
    """The registry key of the Python transform of ``workflow`` from ``from_range`` to version ``to``."""
    code = to if isinstance(to, int) else version_code(to)
    return f"{workflow}:{from_range.replace(' ', '')}:{format_version(code)}"


# -- positions ----------------------------------------------------------------------------------------
#: Thread waits that are safe points: the thread runs nothing until an input arrives.
SAFE_WAITS = frozenset({"signal", "update", "timer", "join"})


@dataclass
class PositionMap:
    """Where each thread of an instance goes in the target version, or why it cannot go.

    ``moves``: thread id -> ``(list key, index)`` in the target. ``unmapped``: the step ids where a
    thread waits that neither ``step_map`` nor the target (by the same id) places. ``problems``:
    every other reason the instance cannot move (an activity in flight, a step of another kind ...).
    """

    moves: dict[str, tuple[str, int]] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.problems or self.unsafe)


def _owner(old: CompiledSpec, list_key: str) -> tuple[Optional[str], str]:
    """The step owning list ``list_key`` and the key's suffix (``.i`` of a parallel branch, ``""`` for a foreach)."""
    if list_key == "":
        return None, ""
    if list_key in old.where:
        return list_key, ""
    head, _, tail = list_key.rpartition(".")
    return head, f".{tail}"


def map_positions(state: JSONDict, old: CompiledSpec, new: CompiledSpec, step_map: Mapping[str, str],
                  between_steps: bool = False) -> PositionMap:
    """Where the threads of spec instance ``state`` (on ``old``) go in ``new`` under ``step_map``.

    A step maps to ``step_map[id]``, else to the step of the same id in ``new``. A thread's step must
    map to a step of the same kind in the list its owner maps to (a parallel step to one with as
    many branches); waiting on an activity or a child is not a safe point. With ``between_steps``
    (a decision that just recorded an input), a thread that waits on nothing stands before the step
    at its index, which it has not started: that step maps to a step of any kind in the owner's
    list, and a thread past its list's end goes to the end of the mapped list.
    """
    out = PositionMap()
    for aid in sorted(state.get("activities") or {}):
        out.unsafe.append(f"activity '{aid}' is in flight")
    for cid in sorted(state.get("children") or {}):
        out.unsafe.append(f"child workflow '{cid}' is running")
    threads = state.get("threads") or {}
    for tid in sorted(threads, key=int):
        th = threads[tid]
        steps = old.lists.get(th["list"], [])
        wait = th.get("wait")
        if between_steps and wait is None:
            _map_between(out, tid, th, old, new, step_map)
            continue
        if th["idx"] >= len(steps):
            out.problems.append(f"thread {tid} stands past the end of its list")
            continue
        step = steps[th["idx"]]
        kind = wait["k"] if wait else None
        if kind not in SAFE_WAITS:
            if kind not in ("activity", "child"):  # those are named above, by activity or child id
                out.unsafe.append(f"step '{step.id}' is not waiting on a signal, update, timer or join ({kind})")
            continue
        target = step_map.get(step.id, step.id if step.id in new.where else None)
        if target is None or target not in new.where:
            out.unmapped.append(step.id)
            continue
        owner, suffix = _owner(old, th["list"])
        want_list = "" if owner is None else step_map.get(owner, owner) + suffix
        new_list, new_idx = new.where[target]
        new_step = new.lists[new_list][new_idx]
        if new_list != want_list:
            out.problems.append(f"step '{step.id}' maps to '{target}', which is not in the list its thread runs "
                                f"({want_list or 'the top level'})")
        elif new_step.kind != step.kind:
            out.problems.append(f"step '{step.id}' ({step.kind}) maps to '{target}', a {new_step.kind or '?'} step")
        elif step.kind == "parallel" and len(new_step.parallel or []) != len(step.parallel or []):
            out.problems.append(f"parallel step '{step.id}' has {len(step.parallel or [])} branches, but "
                                f"'{target}' has {len(new_step.parallel or [])}")
        elif step.kind == "wait" and _waits_for_update(new_step) != _waits_for_update(step):
            out.problems.append(f"step '{step.id}' waits for a {'update' if _waits_for_update(step) else 'signal'}, "
                                f"but '{target}' does not")
        else:
            out.moves[tid] = (new_list, new_idx)
    return out


def _map_between(out: PositionMap, tid: str, th: JSONDict, old: CompiledSpec, new: CompiledSpec,
                 step_map: Mapping[str, str]) -> None:
    """Place thread ``tid``, which stands before the step at its index (or past its list's end)."""
    owner, suffix = _owner(old, th["list"])
    want_list = "" if owner is None else step_map.get(owner, owner) + suffix
    if want_list not in new.lists:
        out.problems.append(f"thread {tid} runs list '{th['list']}', which has no counterpart in {new.name}@"
                            f"{format_version(new.version)}")
        return
    steps = old.lists.get(th["list"], [])
    if th["idx"] >= len(steps):
        out.moves[tid] = (want_list, len(new.lists[want_list]))
        return
    step = steps[th["idx"]]
    target = step_map.get(step.id, step.id if step.id in new.where else None)
    if target is None or target not in new.where:
        out.unmapped.append(step.id)
        return
    new_list, new_idx = new.where[target]
    if new_list != want_list:
        out.problems.append(f"step '{step.id}' maps to '{target}', which is not in the list its thread runs "
                            f"({want_list or 'the top level'})")
    else:
        out.moves[tid] = (new_list, new_idx)


def _waits_for_update(step: Step) -> bool:
    """Whether wait step ``step`` waits for an update (else for a signal)."""
    assert step.wait is not None  # a wait step has its wait
    return step.wait.update is not None


def step_map_problems(step_map: Mapping[str, str], olds: Sequence[CompiledSpec], new: CompiledSpec) -> list[str]:
    """Unknown step ids of a ``step_map``: each key must be a step of some ``olds``, each value of ``new``."""
    problems = []
    for old_id, new_id in sorted(step_map.items()):
        if not any(old_id in o.where for o in olds):
            known = ", ".join(f"{o.name}@{format_version(o.version)}" for o in olds) or "no version"
            problems.append(f"step_map: '{old_id}' is not a step of {known}")
        if new_id not in new.where:
            problems.append(f"step_map: '{old_id}' -> '{new_id}': '{new_id}' is not a step of "
                            f"{new.name}@{format_version(new.version)}")
    return problems


# -- the decider and the applier ----------------------------------------------------------------------
def new_vars(state: JSONDict, exprs: Mapping[str, str], transform: Optional[Callable[[dict[str, Any]], Any]]) -> dict[str, Any]:
    """The variables of ``state`` after a plan's CEL transforms (over the variables before) and Python transform.

    Raises:
        KflowError: a transform failed or returned something that is not a JSON object; the message names it.
    """
    before = state.get("vars") or {}
    scope = {"input": state.get("input"), **before, "vars": before}
    out = dict(before)
    for name in sorted(exprs):
        try:
            out[name] = evaluate(exprs[name], scope)
        except ExpressionError as e:
            raise KflowError(f"variable '{name}': {e}") from None
    if transform is not None:
        try:
            out = transform(orjson.loads(orjson.dumps(out)))
        except Exception as e:  # the user's transform failing is this instance's rejection
            raise KflowError(f"Python transform: {type(e).__name__}: {e}") from None
        if not isinstance(out, dict):
            raise KflowError(f"Python transform: expected a dict of variables, but it returned {type(out).__name__}")
    try:
        return orjson.loads(orjson.dumps(out))  # type: ignore[no-any-return]
    except TypeError as e:
        raise KflowError(f"the migrated variables are not JSON: {e}") from None


#: The fields of a migration as the command, ``MigrationDeferred`` and the pending entry carry them.
_PLAN_FIELDS = ("plan_id", "from_range", "to_version", "step_map", "vars", "transform", "reason", "by")


@dataclass
class _Verdict:
    """Whether an instance at a safe point moves: its ``WorkflowMigrated``, or why not."""

    migrated: Optional[WorkflowMigrated] = None
    rejected: Optional[tuple[str, str]] = None  # (RejectCode, reason)
    machine: Optional[Machine] = None  # a code workflow's live machine on the target code


def _plan(d: Mapping[str, Any]) -> JSONDict:
    """A migration's fields (from a command or a pending entry), with their defaults."""
    return {"plan_id": str(d.get("plan_id") or ""), "from_range": str(d.get("from_range") or ""),
            "to_version": d.get("to_version"), "step_map": d.get("step_map") or {}, "vars": d.get("vars") or {},
            "transform": d.get("transform") or None, "reason": str(d.get("reason") or ""), "by": str(d.get("by") or "")}


def _check(state: JSONDict, d: JSONDict, defs: DefinitionsView) -> Optional[tuple[str, str]]:
    """``(code, reason)`` when migration ``d`` cannot apply to ``state`` wherever its threads stand."""
    iid, to, frm = state["id"], d["to_version"], d["from_range"]
    here = f"{state['workflow']}@{format_version(state['version'])}"
    if state["status"] != Status.RUNNING:
        return RejectCode.INVALID_STATE, f"expected a RUNNING instance to migrate, but '{iid}' is {state['status']}"
    try:
        if not matches(frm, state["version"]):
            return RejectCode.INVALID_STATE, f"expected an instance on a version matching '{frm}', but '{iid}' runs {here}"
    except VersionRangeError as e:
        return RejectCode.INVALID_INPUT, str(e)
    if not isinstance(to, int) or to == state["version"]:
        return RejectCode.INVALID_STATE, f"expected a version other than the one '{iid}' runs ({here}), but got {to!r}"
    kind = state["kind"]
    old, new = defs.get(state["workflow"], state["version"]), defs.get(state["workflow"], to)
    if new is None or getattr(new, "kind", "spec") != kind or old is None:
        how = "deployed as a spec workflow" if kind == "spec" else "registered as a code workflow (@kflow.workflow)"
        return RejectCode.UNKNOWN_WORKFLOW, (f"expected {state['workflow']}@{format_version(to)} to be {how}, but "
                                             "this engine does not know it")
    step_map, exprs = d["step_map"], d["vars"]
    if kind == "code":
        if step_map or exprs or d["transform"]:
            return RejectCode.INVALID_INPUT, ("expected no step_map, vars or Python transform for a code workflow "
                                              f"('{iid}' moves by replaying its history on the new code), but the "
                                              "plan gives them")
        return None
    if not isinstance(step_map, dict) or not isinstance(exprs, dict):
        return RejectCode.INVALID_INPUT, "expected step_map and vars to be JSON objects"
    problems = step_map_problems(step_map, [old], new)
    if problems:
        return RejectCode.INVALID_INPUT, "; ".join(problems)
    if d["transform"] and str(d["transform"]) not in registry_of(defs).transforms:
        return RejectCode.INVALID_STATE, (f"expected the Python migration '{d['transform']}' to be registered "
                                          "(@kflow.migration) in the engine, but it is not")
    return None


def in_flight(state: JSONDict, defs: DefinitionsView, d: Optional[JSONDict] = None, between_steps: bool = False) -> list[str]:
    """The work the instance waits for before it is at a safe point (empty: it is at one)."""
    if state["kind"] == "code":
        return ([f"activity '{a}' is in flight" for a in sorted(state.get("activities") or {})]
                + [f"child workflow '{c}' is running" for c in sorted(state.get("children") or {})])
    old = defs.get(state["workflow"], state["version"])
    new = defs.get(state["workflow"], d["to_version"]) if d is not None else None
    if old is None:
        return []
    return map_positions(state, old, new if new is not None else old, (d or {}).get("step_map") or {},
                         between_steps).unsafe


def _verdict(state: JSONDict, d: JSONDict, defs: DefinitionsView, history: Callable[[], tuple[Entries, Entries]],
             between_steps: bool) -> _Verdict:
    """Migration ``d`` of ``state``, which :func:`_check` passed and which stands at a safe point."""
    iid, to = state["id"], d["to_version"]
    new = defs.get(state["workflow"], to)
    if state["kind"] == "code":
        assert isinstance(new, CodeDefinition)
        try:
            inputs, commands = history()
            machine = replay(new, iid, inputs[:state[DELIVERED]], commands, state.get("run", 1),
                             limits_of(defs).max_history_events, running=True)
        except HistoryUnavailable as e:
            return _Verdict(rejected=(RejectCode.INVALID_STATE, str(e)))
        except NondeterminismError as e:
            return _Verdict(rejected=(RejectCode.INVALID_STATE, f"expected {state['workflow']}@{format_version(to)} to "
                                      f"replay the history of '{iid}' exactly, but it diverges at command "
                                      f"#{e.event_index}: the history has {e.expected}, the new code issues "
                                      f"{e.actual}; the instance stays on {format_version(state['version'])}"))
        return _Verdict(migrated=_migrated(state, d, state.get("vars") or {}), machine=machine)
    old = defs.get(state["workflow"], state["version"])
    assert old is not None and new is not None  # _check found both
    mapping = map_positions(state, old, new, d["step_map"], between_steps)
    if mapping.unmapped:
        return _Verdict(rejected=(RejectCode.INVALID_INPUT, f"positions without a mapping to {format_version(to)}: "
                                  f"{', '.join(mapping.unmapped)} (add them to step_map)"))
    if mapping.problems:
        return _Verdict(rejected=(RejectCode.INVALID_INPUT, "; ".join(mapping.problems)))
    transform = registry_of(defs).transforms.get(str(d["transform"])) if d["transform"] else None
    try:
        vars_ = new_vars(state, d["vars"], transform)
    except KflowError as e:
        return _Verdict(rejected=(RejectCode.INVALID_INPUT, f"variable transform failed on '{iid}': {e}"))
    return _Verdict(migrated=_migrated(state, d, vars_))


def _migrated(state: JSONDict, d: JSONDict, vars_: Any) -> WorkflowMigrated:
    """The ``WorkflowMigrated`` of migration ``d`` for ``state``, whose variables become ``vars_``."""
    return WorkflowMigrated(from_version=state["version"], to_version=d["to_version"], plan_id=d["plan_id"],
                            step_map=d["step_map"], vars=vars_, reason=d["reason"], by=d["by"])


def _migrate(state: Optional[JSONDict], cmd: Command, body: MigrateWorkflow, now: int, defs: DefinitionsView,
             journal: Journal) -> core.Decision:
    """``MigrateWorkflow`` -> ``WorkflowMigrated``, ``MigrationDeferred`` (work in flight), or ``CommandRejected``."""
    if state is None:
        return core.Decision(state=None, dlq_reason=f"{cmd.type} for unknown instance '{cmd.instance_id}'")
    d = _plan(to_data(body))  # the plan's fields as the deferred entry keeps them, with their defaults
    why = _check(state, d, defs)
    if why is None:
        waiting = in_flight(state, defs, d)
        if waiting:  # recorded as pending; applied (or rejected) at the next safe point
            return core.accept(state, cmd, now, MigrationDeferred(**d, waiting_on="; ".join(waiting)), defs, journal)
        verdict = _verdict(state, d, defs, lambda: history_of(state, journal), False)
        why = verdict.rejected
    if why is not None:
        return core.reject(state, cmd, now, why[0], f"plan '{d['plan_id']}': {why[1]}")
    assert verdict.migrated is not None
    decision = core.accept(state, cmd, now, verdict.migrated, defs, journal)
    if verdict.machine is not None and decision.state is not None:  # the next input resumes it, no replay
        code_replayer.park(defs, decision.state, verdict.machine)
    return decision


def _move(run: Run, d: WorkflowMigrated) -> None:
    """Move the instance to ``to_version`` (``WorkflowMigrated`` ``d``): threads to their mapped steps,
    variables to the recorded ones."""
    st = run.state
    st.pop(PENDING_MIGRATION, None)
    new = run.defs.get(st["workflow"], d.to_version)
    if st["kind"] == "code":
        if INPUT_COUNT in st:
            code_replayer.forget(run.defs, st)  # the machine of the old code is not resumed
        st["version"] = d.to_version
        run.compiled = new
        return
    mapping = map_positions(st, run.compiled, new, cast(Optional[Mapping[str, str]], d.step_map) or {}, True)
    assert mapping.ok, f"WorkflowMigrated applied where it cannot be: {mapping}"
    for tid, (list_key, idx) in mapping.moves.items():
        th = st["threads"][tid]
        th["list"], th["idx"] = list_key, idx
        wait = th["wait"]
        step = new.lists[list_key][idx] if idx < len(new.lists[list_key]) else None
        if wait is not None and wait["k"] in ("signal", "update") and step is not None and step.wait is not None:
            wait["name"] = step.wait.signal if wait["k"] == "signal" else step.wait.update
    st["version"] = d.to_version
    st["vars"] = d.vars
    run.compiled = new


def _on_migrated(run: Run, ev: Event, body: WorkflowMigrated) -> None:
    _move(run, body)


def _on_deferred(run: Run, ev: Event, body: MigrationDeferred) -> None:
    """Record the pending migration (replacing an earlier one); a code workflow's live machine stays parked."""
    st = run.state
    st[PENDING_MIGRATION] = {**_plan(event_data(body)), "waiting_on": body.waiting_on, "seq": ev.seq}
    if st["kind"] == "code" and INPUT_COUNT in st:
        code_replayer.keep_parked(run.defs, st, ev.seq - 1)


def _at_safe_point(run: Run) -> Optional[Machine]:
    """The interpreters' hook: apply the pending migration if the instance now stands at a safe point.

    Called after an input's effect on the state (an activity's result recorded, its thread between
    steps) and before the workflow runs on, so nothing is dispatched on the old version after the
    safe point. A migration that no longer fits (a position without a mapping, a failing transform,
    code that does not replay the history) is rejected here and the instance runs on unchanged.
    """
    st = run.state
    pending = st.get(PENDING_MIGRATION)
    if pending is None or st["status"] != Status.RUNNING or in_flight(st, run.defs, pending, True):
        return None
    d = _plan(pending)
    why = _check(st, d, run.defs)
    verdict = _verdict(st, d, run.defs, lambda: run_history(run, True), True) if why is None else _Verdict(rejected=why)
    if verdict.rejected is not None:
        del st[PENDING_MIGRATION]
        run.record(CommandRejected(command_type="MigrateWorkflow", code=verdict.rejected[0],
                                   reason=f"plan '{d['plan_id']}' (deferred): {verdict.rejected[1]}"))
        return None
    migrated = verdict.migrated
    assert migrated is not None
    run.record(migrated)
    _move(run, migrated)
    return verdict.machine


def _drop_pending(run: Run, before: Optional[JSONDict]) -> None:
    """A closed, cancelling or compensating instance does not migrate: its pending migration goes."""
    st = run.state
    if PENDING_MIGRATION in st and st["status"] not in _KEEPS_PENDING:
        del st[PENDING_MIGRATION]


#: Statuses an instance keeps its pending migration in (it may still reach a safe point).
_KEEPS_PENDING = frozenset({Status.RUNNING, Status.SUSPENDED, Status.INCIDENT, Status.BLOCKED})

core.DECIDERS["MigrateWorkflow"] = _migrate
core.INPUT_APPLIERS["WorkflowMigrated"] = _on_migrated
core.INPUT_APPLIERS["MigrationDeferred"] = _on_deferred
core.AFTER_EVOLVE.append(_drop_pending)
AT_SAFE_POINT.append(_at_safe_point)


# -- what-if --------------------------------------------------------------------------------------------
@dataclass
class Divergence:
    """The first place a replay on the target differs: history index, the recorded event and the produced one."""

    index: int
    seq: Optional[int]
    expected: Optional[tuple[str, Any]]
    got: Optional[tuple[str, Any]]
    #: ``event`` (a spec history: ``index`` into the events) or ``command`` (a code history: ``index``
    #: into the commands its code issued; ``expected``/``got`` are ``("command", description)``).
    kind: str = "event"

    def text(self) -> str:
        if self.kind == "command":
            return (f"command #{self.index}: the history has {(self.expected or ('', '?'))[1]}, but the target "
                    f"issues {(self.got or ('', '?'))[1]}")
        return f"event #{self.index} (seq {self.seq}): expected {self.expected!r}, but got {self.got!r}"


@dataclass
class WhatIf:
    """The what-if verdict for one instance against a target version."""

    instance_id: str
    target: str
    divergence: Optional[Divergence] = None
    unmapped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Work in flight: the migration would be deferred until it ends, and checked again there.
    waiting_on: list[str] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return self.divergence is None

    def to_json(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "target": self.target, "compatible": self.compatible,
                "divergence": None if self.divergence is None else {
                    "kind": self.divergence.kind, "index": self.divergence.index, "seq": self.divergence.seq,
                    "expected": self.divergence.expected, "got": self.divergence.got},
                "unmapped": self.unmapped, "problems": self.problems, "waiting_on": self.waiting_on}


_STARTS = ("WorkflowStarted", "WorkflowQueued", "WorkflowContinuedAsNew")


def _retarget(events: Sequence[Event], to: int) -> list[Event]:
    out = []
    for ev in events:
        if ev.type in ("WorkflowMigrated", "MigrationDeferred"):
            continue  # replayed on the target from the start, there is nothing to move
        if ev.type in _STARTS and "version" in ev.data:
            ev = Event(ev.type, ev.instance_id, ev.seq, ev.ts, {**ev.data, "version": to})
        out.append(ev)
    return out


def replay_on(events: Sequence[Event], defs: DefinitionsView, to: int) -> Optional[Divergence]:
    """Re-interpret the input events of a history with version ``to``; the first consequence that differs.

    The recorded consequences are compared, in order, with what the target produces from the same
    inputs (sequence numbers shift with the events before them, so they are compared too). None:
    the target reproduces the whole history.
    """
    history = _retarget(events, to)
    journal = InMemoryJournal()
    state: Optional[JSONDict] = None
    i = 0
    while i < len(history):
        ev = history[i]
        if ev.type == "CommandRejected" or ev.type not in core.INPUT_EVENTS:
            if ev.type not in core.INPUT_EVENTS and ev.type != "CommandRejected":
                return Divergence(i, ev.seq, (ev.type, ev.data), None)
            i += 1
            continue
        try:
            state, run = core.evolve(state, ev, defs, journal)
        except (DeterminismError, KflowError, ExpressionError) as e:
            return Divergence(i, ev.seq, (ev.type, ev.data), ("error", str(e)))
        journal.apply(run.journal_ops)
        for produced in run.events:
            i += 1
            recorded = history[i] if i < len(history) else None
            if recorded is None or (recorded.type, recorded.seq, recorded.data) != (produced.type, produced.seq, produced.data):
                return Divergence(i, produced.seq, None if recorded is None else (recorded.type, recorded.data),
                                  (produced.type, produced.data))
        i += 1
    return None


def what_if(events: Sequence[Event], defs: DefinitionsView, to: int,
            step_map: Optional[Mapping[str, str]] = None) -> WhatIf:
    """The what-if report of one instance's history against version ``to`` of its workflow.

    ``defs`` must hold the instance's own version(s) and ``to``. The divergence is from
    :func:`replay_on`; the unmapped positions are those of the instance's current state (folded on
    the versions it ran) that ``step_map`` does not place in ``to``.
    """
    iid = events[0].instance_id if events else "?"
    started = next((e for e in events if e.type in _STARTS), None)
    name = started.data["workflow"] if started is not None else "?"
    report = WhatIf(iid, f"{name}@{format_version(to)}")
    if started is None:
        report.divergence = Divergence(0, None, None, ("error", "the history has no WorkflowStarted event"))
        return report
    target = defs.get(name, to)
    if isinstance(target, CodeDefinition):
        return _what_if_code(events, defs, target, report)
    report.divergence = replay_on(events, defs, to)
    try:
        state = core.fold(list(events), defs)
    except KflowError as e:
        report.problems.append(f"the history does not replay on the versions it ran: {e}")
        return report
    new = defs.get(name, to)
    if state is None or state["status"] in Status.TERMINAL or state["kind"] != "spec" or new is None:
        return report
    old = defs.get(name, state["version"])
    if old is None:
        report.problems.append(f"{name}@{format_version(state['version'])} is not known here")
        return report
    mapping = map_positions(state, old, new, step_map or {})
    report.unmapped = mapping.unmapped
    report.problems = mapping.problems
    report.waiting_on = mapping.unsafe
    return report


_CLOSES = ("WorkflowCompleted", "WorkflowFailed", "WorkflowCancelled", "WorkflowTerminated")


def _what_if_code(events: Sequence[Event], defs: DefinitionsView, target: CodeDefinition, report: WhatIf) -> WhatIf:
    """The what-if of a code history: its inputs fed to the target's code, the same replay a migration makes.

    The inputs and commands are rebuilt from the events (:func:`history_from_events`), which carry
    no patch markers: the history counts as recorded before any ``ctx.patched()`` change. The engine
    replays the exact journal when it decides the migration.
    """
    last_start = max(i for i, e in enumerate(events) if e.type in _STARTS)
    closed = next((e for e in events[last_start:] if e.type in _CLOSES), None)
    if closed is not None:
        report.problems.append(f"the instance is closed ({closed.type})")
        return report
    inputs, commands = history_from_events(list(events))
    run_number = next((e.data.get("run", 1) for e in reversed(events) if e.type == "WorkflowContinuedAsNew"), 1)
    try:
        replay(target, report.instance_id, inputs, commands, run_number, limits_of(defs).max_history_events,
               running=True)
    except NondeterminismError as e:
        report.divergence = Divergence(e.event_index, None, ("command", e.expected), ("command", e.actual), "command")
    open_acts = {e.data["activity_id"] for e in events[last_start:] if e.type == "ActivityScheduled"}
    open_acts -= {e.data["activity_id"] for e in events[last_start:]
                  if e.type in ("ActivityCompleted", "ActivityFailed") and not _retried(events, e)}
    children = {e.data["child_id"] for e in events[last_start:] if e.type == "ChildStarted"}
    children -= {e.data["child_id"] for e in events[last_start:] if e.type in ("ChildCompleted", "ChildFailed")}
    report.waiting_on = ([f"activity '{a}' is in flight" for a in sorted(open_acts)]
                         + [f"child workflow '{c}' is running" for c in sorted(children)])
    return report


def _retried(events: Sequence[Event], failed: Event) -> bool:
    """Whether the attempt ``failed`` reports was followed by another attempt of the same activity."""
    d = failed.data
    return failed.type == "ActivityFailed" and any(
        e.type == "ActivityScheduled" and e.data["activity_id"] == d["activity_id"]
        and e.data.get("attempt", 1) == d["attempt"] + 1 for e in events)
