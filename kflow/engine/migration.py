"""Version ranges, and moving running spec instances to another version of their workflow.

Three pure parts. :func:`resolve_version` picks the version a start names (exact, a range such as
``^1.2``, ``~1.4`` or ``>=1.2,<2`` in :class:`semantic_version.SimpleSpec` syntax, or the latest).
:func:`what_if` re-interprets an instance's recorded input events with a target version and reports
the first consequence event that differs (or that the history is compatible), and which waiting
positions a ``step_map`` leaves without a place in the target. The ``MigrateWorkflow`` decider and
the ``WorkflowMigrated`` applier (registered into :mod:`kflow.engine.core`'s tables on import) move
one instance in one decision: accepted only at a safe point (every thread waits on a signal, an
update, a timer or a join; no activity or child in flight, otherwise the command is rejected and the
instance keeps running on its version), positions mapped, variables transformed. The event carries
the variables after the transform, so replaying it reproduces the state without running the
transform again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import orjson
import semantic_version

from kflow.engine import core
from kflow.engine.definitions import CompiledSpec, DefinitionsView
from kflow.engine.expr import ExpressionError, evaluate
from kflow.engine.journal import InMemoryJournal, Journal
from kflow.engine.run import Run
from kflow.model.errors import DeterminismError, KflowError
from kflow.model.messages import Command, Event, JSONDict, RejectCode, Status
from kflow.model.spec import Step
from kflow.model.versions import format_version, is_version_text, version_code, version_tuple

__all__ = ["TRANSFORMS", "Divergence", "PositionMap", "VersionRangeError", "WhatIf", "map_positions", "matches",
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
#: Python variable transforms by :func:`transform_key`: ``fn(vars) -> vars`` (a dict of JSON values).
#: Filled by :func:`kflow.migration` in the process that decides (the engine), like hosted code workflows.
TRANSFORMS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


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


def map_positions(state: JSONDict, old: CompiledSpec, new: CompiledSpec, step_map: Mapping[str, str]) -> PositionMap:
    """Where the threads of spec instance ``state`` (on ``old``) go in ``new`` under ``step_map``.

    A step maps to ``step_map[id]``, else to the step of the same id in ``new``. A thread's step must
    map to a step of the same kind in the list its owner maps to (a parallel step to one with as
    many branches); waiting on an activity or a child is not a safe point.
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
        if th["idx"] >= len(steps):
            out.problems.append(f"thread {tid} stands past the end of its list")
            continue
        step = steps[th["idx"]]
        wait = th.get("wait")
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


def _migrate(state: Optional[JSONDict], cmd: Command, now: int, defs: DefinitionsView, journal: Journal) -> core.Decision:
    """``MigrateWorkflow`` -> ``WorkflowMigrated``, or ``CommandRejected`` saying why; a rejection changes nothing."""
    if state is None:
        return core.Decision(state=None, dlq_reason=f"{cmd.type} for unknown instance '{cmd.instance_id}'")
    d, iid = cmd.data, cmd.instance_id
    to, frm = d.get("to_version"), str(d.get("from_range") or "")
    here = f"{state['workflow']}@{format_version(state['version'])}"

    def reject(code: str, reason: str) -> core.Decision:
        return core.reject(state, cmd, now, code, f"plan '{d.get('plan_id')}': {reason}")

    if state["status"] != Status.RUNNING:
        return reject(RejectCode.INVALID_STATE, f"expected a RUNNING instance to migrate, but '{iid}' is {state['status']}")
    if state["kind"] != "spec":
        return reject(RejectCode.INVALID_STATE, f"expected a spec workflow instance, but '{iid}' runs code: a code "
                      "workflow moves by replay (host code whose replay of its history is deterministic)")
    try:
        if not matches(frm, state["version"]):
            return reject(RejectCode.INVALID_STATE, f"expected an instance on a version matching '{frm}', but "
                          f"'{iid}' runs {here}")
    except VersionRangeError as e:
        return reject(RejectCode.INVALID_INPUT, str(e))
    if not isinstance(to, int) or to == state["version"]:
        return reject(RejectCode.INVALID_STATE, f"expected a version other than the one '{iid}' runs ({here}), "
                      f"but got {to!r}")
    old, new = defs.get(state["workflow"], state["version"]), defs.get(state["workflow"], to)
    if new is None or getattr(new, "kind", "spec") != "spec" or old is None:
        return reject(RejectCode.UNKNOWN_WORKFLOW, f"expected {state['workflow']}@{format_version(to)} to be deployed "
                      "as a spec workflow, but this engine does not know it")
    step_map = d.get("step_map") or {}
    exprs = d.get("vars") or {}
    if not isinstance(step_map, dict) or not isinstance(exprs, dict):
        return reject(RejectCode.INVALID_INPUT, "expected step_map and vars to be JSON objects")
    problems = step_map_problems(step_map, [old], new)
    if problems:
        return reject(RejectCode.INVALID_INPUT, "; ".join(problems))
    mapping = map_positions(state, old, new, step_map)
    if mapping.unsafe:
        return reject(RejectCode.INVALID_STATE, f"expected a safe point (waiting on a signal, an update or a timer), "
                      f"but {', '.join(mapping.unsafe)}: the instance stays on {here}; migrate it again once that ends")
    if mapping.unmapped:
        return reject(RejectCode.INVALID_INPUT, f"positions without a mapping to {format_version(to)}: "
                      f"{', '.join(mapping.unmapped)} (add them to step_map)")
    if mapping.problems:
        return reject(RejectCode.INVALID_INPUT, "; ".join(mapping.problems))
    transform = None
    if d.get("transform"):
        transform = TRANSFORMS.get(str(d["transform"]))
        if transform is None:
            return reject(RejectCode.INVALID_STATE, f"expected the Python migration '{d['transform']}' to be "
                          "registered (@kflow.migration) in the engine, but it is not")
    try:
        values = new_vars(state, exprs, transform)
    except KflowError as e:
        return reject(RejectCode.INVALID_INPUT, f"variable transform failed on '{iid}': {e}")
    return core.accept(state, cmd, now, "WorkflowMigrated",
                       {"from_version": state["version"], "to_version": to, "plan_id": str(d.get("plan_id") or ""),
                        "step_map": step_map, "vars": values, "reason": str(d.get("reason") or ""),
                        "by": str(d.get("by") or "")}, defs, journal)


def _on_migrated(run: Run, ev: Event) -> None:
    """Move the instance to ``to_version``: threads to their mapped steps, variables to the recorded ones."""
    st, d = run.state, ev.data
    new = run.defs.get(st["workflow"], d["to_version"])
    mapping = map_positions(st, run.compiled, new, d.get("step_map") or {})
    assert mapping.ok, f"WorkflowMigrated applied where it cannot be: {mapping}"
    for tid, (list_key, idx) in mapping.moves.items():
        th = st["threads"][tid]
        th["list"], th["idx"] = list_key, idx
        wait, step = th["wait"], new.lists[list_key][idx]
        if wait["k"] in ("signal", "update") and step.wait is not None:
            wait["name"] = step.wait.signal if wait["k"] == "signal" else step.wait.update
    st["version"] = d["to_version"]
    st["vars"] = d["vars"]
    run.compiled = new


core.DECIDERS["MigrateWorkflow"] = _migrate
core.INPUT_APPLIERS["WorkflowMigrated"] = _on_migrated


# -- what-if --------------------------------------------------------------------------------------------
@dataclass
class Divergence:
    """The first place a replay on the target differs: history index, the recorded event and the produced one."""

    index: int
    seq: Optional[int]
    expected: Optional[tuple[str, Any]]
    got: Optional[tuple[str, Any]]

    def text(self) -> str:
        return f"event #{self.index} (seq {self.seq}): expected {self.expected!r}, but got {self.got!r}"


@dataclass
class WhatIf:
    """The what-if verdict for one instance against a target version."""

    instance_id: str
    target: str
    divergence: Optional[Divergence] = None
    unmapped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return self.divergence is None

    def to_json(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "target": self.target, "compatible": self.compatible,
                "divergence": None if self.divergence is None else {
                    "index": self.divergence.index, "seq": self.divergence.seq,
                    "expected": self.divergence.expected, "got": self.divergence.got},
                "unmapped": self.unmapped, "problems": self.problems}


_STARTS = ("WorkflowStarted", "WorkflowQueued", "WorkflowContinuedAsNew")


def _retarget(events: Sequence[Event], to: int) -> list[Event]:
    out = []
    for ev in events:
        if ev.type == "WorkflowMigrated":
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
    report.problems = mapping.problems + mapping.unsafe
    return report
