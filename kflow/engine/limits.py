"""Quotas and activity limits: fleet-wide counters folded by the engine like instances.

A limit is declared once (:class:`LimitSpec`, from ``kflow limits apply FILE``) and counted by an
object of the engine keyed ``limit:<name>`` (or ``limit:<name>:<key>`` for a per-key or per-tenant
limit) on the ``commands`` topic: the engine owning that key's partition is its single counter,
however many engines and workers there are. Its state (``kind`` ``limit``) holds the permits in
use, the queued requests (priority, then arrival order) and a token bucket for rates; a durable
timer wakes it when the bucket refills.

Work subject to a limit asks for a permit first, inside the transaction that decided it:

* a start subject to a quota records ``WorkflowQueued`` (status ``QUEUED``) and sends
  ``AcquirePermit`` to each matching limit in turn; when the last ``GrantPermit`` arrives it
  records ``PermitGranted`` followed by ``WorkflowStarted`` and runs; a ``RefusePermit`` (policy
  ``reject``) fails it with ``QuotaExceeded``;
* an activity attempt subject to a limit is recorded as scheduled but its task is held (its
  start-to-close and heartbeat timers are not armed) until the grant, then dispatched.

Whatever holds or waits for a permit sends ``ReleasePermit`` when it ends (the instance closes, the
attempt completes, fails, times out or is cancelled), after its ``AcquirePermit`` on the same
partition, so the counter always sees the request before the release; a grant that arrives for
work that ended meanwhile is ignored (its release is already on its way). Every hop is a command
produced in the deciding engine's transaction, so a crash or rebalance neither grants twice nor
loses a queued request.

The declaration is read from the limits table at decision time (``defs.quotas``, see
:func:`table_of`), so a changed limit applies from the next command its counter decides. This
module is pure: declarations, validation, the counters' deciders and the instance-side gates.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union, cast

from kflow.engine import activity, code_replayer, core, spec_interpreter
from kflow.engine.core import Decision, status_record
from kflow.engine.definitions import DefinitionsView
from kflow.engine.journal import Journal
from kflow.engine.run import PRIORITY, Recorder, Run
from kflow.model.commands import (
    AcquirePermit,
    AnyCommand,
    FireTimer,
    GrantPermit,
    QueryStatus,
    QueryWorkflow,
    RefusePermit,
    ReleasePermit,
    SetPriority,
)
from kflow.model.errors import ProblemsError
from kflow.model.events import (
    PermitDenied,
    PermitGranted,
    PermitIssued,
    PermitQueued,
    PermitRefused,
    PermitReleased,
    PriorityChanged,
    WorkflowQueued,
    WorkflowStarted,
)
from kflow.model.messages import NORMAL_PRIORITY, PRIORITIES, Command, Event, JSONDict, JSONValue, RejectCode, Status
from kflow.model.spec import parse_duration_ms

__all__ = ["ADMISSION", "KIND", "LIMIT_POLICIES", "PERMITS", "PREFIX", "InMemoryLimits", "LimitSpec", "LimitSpecError",
           "LimitsView", "key_of", "limit_view", "parse_limits", "table_of"]

#: State ``kind`` of a limit's counter, and the key prefix of its commands.
KIND = "limit"
PREFIX = "limit:"
#: What a start beyond a quota does: wait its turn, be refused, or run beyond it for a while.
LIMIT_POLICIES = ("queue", "reject", "burst")
#: What a limit applies to.
SCOPES = ("activity", "workflow", "tenant")
#: State key of a queued start: the limit keys it needs, how many it was granted, its level.
ADMISSION = "admission"
#: State key of the permits an instance's activity attempts hold or wait for: ``"<aid>#<attempt>"``
#: -> ``{"limits": [key, ...], "granted": n}``.
PERMITS = "permits"
#: ``ref`` of a start's permit (an activity's is ``<activity id>#<attempt>``).
START_REF = "start"
#: Requests one counter keeps queued; beyond it a request is refused (``LimitExceeded``).
MAX_QUEUED = 100_000
#: The tenant of a start with auth off.
DEFAULT_TENANT = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_FIELDS = frozenset({"name", "activity", "workflow", "tenant", "per", "max_running", "max_in_flight", "rate",
                     "starts_per_second", "burst_size", "policy"})


class LimitSpecError(ProblemsError, ValueError):
    """A limits file or declaration that cannot be applied; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"limits in {source}", problems)
        self.source = source


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One declared limit, as stored on the wire.

    Attributes:
        name: The limit's name; its counter's key is ``limit:<name>`` (``limit:<name>:<key>`` when
            it counts per key or per tenant).
        scope: ``activity`` (attempts of activity type ``match``), ``workflow`` (running instances
            of workflow ``match``) or ``tenant`` (running instances of tenant ``match``, ``*``
            for every tenant, each counted on its own).
        match: The activity type, workflow name or tenant it applies to.
        per: Count per key: for an activity, a field of its input (dotted path, ``plant`` or
            ``site.plant``); for a workflow, ``tenant``. None: one counter.
        max_concurrent: At most this many attempts in flight / instances running (None: no bound).
        rate: At most this many grants per second, as a token bucket (None: no rate).
        burst_size: The bucket's capacity (default: the rate rounded up, at least 1).
        policy: ``queue`` (wait, priority then FIFO), ``reject`` (starts only: fail at once with
            ``QuotaExceeded``) or ``burst`` (admit up to ``max_concurrent * burst_factor`` for at
            most ``burst_ms`` at a time, then queue).
        burst_factor: See ``policy``.
        burst_ms: See ``policy``.
    """

    name: str
    scope: str
    match: str
    per: Optional[str] = None
    max_concurrent: Optional[int] = None
    rate: Optional[float] = None
    burst_size: Optional[int] = None
    policy: str = "queue"
    burst_factor: float = 1.0
    burst_ms: int = 0

    @property
    def capacity(self) -> float:
        """The token bucket's size."""
        if self.burst_size is not None:
            return float(self.burst_size)
        return float(max(1, math.ceil(self.rate or 1)))

    def to_dict(self) -> JSONDict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: JSONDict) -> LimitSpec:
        return cls(**{k: v for k, v in doc.items() if k in cls.__slots__})


def _number(value: Any, what: str, problems: list[str], *, integer: bool) -> Optional[float]:
    if value is None:
        return None
    ok = type(value) is int or (not integer and type(value) is float and math.isfinite(value))
    if not ok:
        problems.append(f"{what}: expected a {'whole ' if integer else ''}number, but got {value!r}")
        return None
    if value < 0:
        problems.append(f"{what}: expected a non-negative limit, but got {value!r}")
        return None
    if value == 0:
        problems.append(f"{what}: expected a limit above 0 (remove the limit to stop work, suspend instead), "
                        f"but got 0")
        return None
    return float(value)


def _rate(value: Any, what: str, problems: list[str]) -> Optional[float]:
    """A rate as a number per second or text ``10/s``, ``600/m``, ``3600/h``."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*(s|m|h)\s*", value)
        if m is None:
            problems.append(f"{what}: expected a rate such as 10/s, 600/m or a number per second, but got {value!r}")
            return None
        value = float(m.group(1)) / {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    return _number(value, what, problems, integer=False)


def _one(doc: Any, where: str, problems: list[str]) -> Optional[LimitSpec]:
    """One declaration from its YAML form; problems are appended with ``where`` in front."""
    mine: list[str] = []
    if not isinstance(doc, dict):
        problems.append(f"{where}: expected a mapping, but got {type(doc).__name__}")
        return None
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        mine.append(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_FIELDS))})")
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        mine.append(f"name: expected letters, digits, '.', '_' or '-' (at most 100), but got {name!r}")
    scopes = [s for s in SCOPES if s in doc]
    if len(scopes) != 1:
        mine.append(f"expected exactly one of activity, workflow, tenant, but got {', '.join(scopes) or 'none'}")
    scope = scopes[0] if len(scopes) == 1 else "activity"
    match = doc.get(scope)
    if len(scopes) == 1 and (not isinstance(match, str) or not match):
        mine.append(f"{scope}: expected a name{' or *' if scope == 'tenant' else ''}, but got {match!r}")
    per = doc.get("per")
    if per is not None:
        if scope == "tenant":
            mine.append("per: a tenant limit already counts per tenant")
        elif scope == "workflow" and per != "tenant":
            mine.append(f"per: a workflow limit counts per tenant (per: tenant), but got {per!r}")
        elif not isinstance(per, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", per):
            mine.append(f"per: expected a field of the activity's input such as plant or site.plant, but got {per!r}")
    if scope == "activity":
        if "max_running" in doc:
            mine.append("max_running: an activity limit takes max_in_flight")
        if "starts_per_second" in doc:
            mine.append("starts_per_second: an activity limit takes rate")
        concurrent, rate = _number(doc.get("max_in_flight"), "max_in_flight", mine, integer=True), \
            _rate(doc.get("rate"), "rate", mine)
    else:
        for bad, instead in (("max_in_flight", "max_running"), ("rate", "starts_per_second")):
            if bad in doc:
                mine.append(f"{bad}: a {scope} limit takes {instead}")
        concurrent, rate = _number(doc.get("max_running"), "max_running", mine, integer=True), \
            _rate(doc.get("starts_per_second"), "starts_per_second", mine)
    if concurrent is None and rate is None and not any("max_" in p or "rate" in p or "per_second" in p for p in mine):
        mine.append("expected max_in_flight or rate (activity), max_running or starts_per_second (workflow, tenant)")
    burst_size = _number(doc.get("burst_size"), "burst_size", mine, integer=True)
    if burst_size is not None and rate is None:
        mine.append("burst_size: only a rate has a bucket size")
    policy, factor, burst_ms = _policy(doc.get("policy", "queue"), mine)
    if scope == "activity" and policy == "reject":
        mine.append("policy: an activity limit queues its attempts (reject is for starts)")
    if policy == "burst" and concurrent is None:
        mine.append("policy: burst needs max_running or max_in_flight")
    if mine:
        problems.extend(f"{where} ({name if isinstance(name, str) else '?'}): {p}" for p in mine)
        return None
    return LimitSpec(name=str(name), scope=scope, match=str(match), per=per,
                     max_concurrent=None if concurrent is None else int(concurrent), rate=rate,
                     burst_size=None if burst_size is None else int(burst_size), policy=policy,
                     burst_factor=factor, burst_ms=burst_ms)


def _policy(value: Any, problems: list[str]) -> tuple[str, float, int]:
    """``queue``, ``reject``, or ``{burst: {factor: 1.5, max_duration: 5m}}`` (also ``burst(1.5, 5m)``)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*burst\s*\(\s*([^,]+?)\s*,\s*([^)]+?)\s*\)\s*", value)
        if m is not None:
            value = {"burst": {"factor": m.group(1), "max_duration": m.group(2)}}
        elif value in ("queue", "reject"):
            return value, 1.0, 0
    if isinstance(value, dict) and set(value) == {"burst"} and isinstance(value["burst"], dict):
        b: JSONDict = value["burst"]
        extra = sorted(set(b) - {"factor", "max_duration"})
        try:
            factor = float(b["factor"])
        except (KeyError, TypeError, ValueError):
            factor = float("nan")
        try:
            ms = parse_duration_ms(b["max_duration"])
        except KeyError:
            problems.append("policy: burst max_duration: expected a duration such as 5m")
            ms = 0
        except (TypeError, ValueError) as e:
            problems.append(f"policy: burst max_duration: {e}")
            ms = 0
        if extra:
            problems.append(f"policy: burst takes factor and max_duration, not {', '.join(extra)}")
        if not math.isfinite(factor) or factor <= 1:
            problems.append(f"policy: burst factor: expected a number above 1, but got {b.get('factor')!r}")
        elif ms <= 0 and not any("max_duration" in p for p in problems):
            problems.append("policy: burst max_duration: expected a positive duration such as 5m")
        return "burst", factor if math.isfinite(factor) else 1.0, ms
    problems.append(f"policy: expected queue, reject or burst(factor, max_duration), but got {value!r}")
    return "queue", 1.0, 0


def parse_limits(doc: Any, source: str = "the limits file") -> list[LimitSpec]:
    """Validate a limits document (``{limits: [...]}`` or a bare list); every problem at once.

    Raises:
        LimitSpecError: anything is wrong; nothing of the document is usable then.
    """
    problems: list[str] = []
    if isinstance(doc, dict):
        extra = sorted(set(doc) - {"limits"})
        if extra:
            problems.append(f"unknown top-level key(s) {', '.join(extra)} (expected limits)")
        doc = doc.get("limits")
    if doc is None:
        doc = []
    if not isinstance(doc, list):
        raise LimitSpecError(source, problems + [f"limits: expected a list, but got {type(doc).__name__}"])
    specs: list[LimitSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(doc):
        spec = _one(item, f"limits[{i}]", problems)
        if spec is None:
            continue
        if spec.name in seen:
            problems.append(f"limits[{i}] ({spec.name}): the name is declared twice")
        seen.add(spec.name)
        specs.append(spec)
    if problems:
        raise LimitSpecError(source, problems)
    return specs


# -- the table every engine reads ------------------------------------------------------------------
class LimitsView:
    """Read-only access to the declared limits (the engine's limits table feeds one)."""

    def __init__(self, specs: Optional[list[LimitSpec]] = None) -> None:
        self.replace(specs or [])

    def replace(self, specs: list[LimitSpec]) -> None:
        """Swap in a new set at once (readers see the old or the new set, never a mix)."""
        by_name = {s.name: s for s in specs}
        acts: dict[str, list[LimitSpec]] = {}
        starts: list[LimitSpec] = []
        for s in sorted(specs, key=lambda s: s.name):
            if s.scope == "activity":
                acts.setdefault(s.match, []).append(s)
            else:
                starts.append(s)
        self._state = (by_name, acts, starts)

    def get(self, name: str) -> Optional[LimitSpec]:
        return self._state[0].get(name)

    def all(self) -> list[LimitSpec]:
        return sorted(self._state[0].values(), key=lambda s: s.name)

    def for_activity(self, name: str) -> list[LimitSpec]:
        return self._state[1].get(name, [])

    def for_start(self, workflow: str, tenant: str) -> list[LimitSpec]:
        return [s for s in self._state[2] if (s.scope == "workflow" and s.match == workflow)
                or (s.scope == "tenant" and s.match in ("*", tenant))]

    def __bool__(self) -> bool:
        return bool(self._state[0])


InMemoryLimits = LimitsView


def table_of(defs: Any) -> Optional[LimitsView]:
    """The limits a definitions view carries (``defs.quotas``), or None when none are declared."""
    found = getattr(defs, "quotas", None)
    return found if isinstance(found, LimitsView) and found else None


def key_of(name: str, key: Optional[str] = None) -> str:
    """The Kafka key of a limit's counter (one per key value, or one)."""
    return f"{PREFIX}{name}" if key is None else f"{PREFIX}{name}:{key}"


def _field(value: Any, path: str) -> str:
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


# -- the instance side -------------------------------------------------------------------------------
def _start_keys(defs: Any, workflow: str, tenant: str) -> list[str]:
    table = table_of(defs)
    if table is None:
        return []
    return sorted(key_of(s.name, tenant if s.scope == "tenant" or s.per == "tenant" else None)
                  for s in table.for_start(workflow, tenant))


def _gate_start(state: Optional[JSONDict], cmd: Command, now: int, defs: DefinitionsView, journal: Journal,
                started: WorkflowStarted, level: Optional[int], tenant: Optional[str]) -> Optional[Decision]:
    """``WorkflowQueued`` for a start subject to quotas (it waits for permits), or None (start now)."""
    keys = _start_keys(defs, started.workflow, tenant or DEFAULT_TENANT)
    if not keys:
        return None
    queued = WorkflowQueued(workflow=started.workflow, version=started.version, input=started.input,
                            parent_id=started.parent_id, parent_ref=started.parent_ref, limits=cast(JSONValue, keys),
                            priority=level)
    return core.accept(state, cmd, now, queued, defs, journal)


def _on_queued(run: Run, ev: Event, body: WorkflowQueued) -> None:
    """A start waits for its permits: status ``QUEUED``, the first ``AcquirePermit`` sent."""
    st = run.state
    st["status"] = Status.QUEUED
    level = body.priority
    if level is not None:
        st[PRIORITY] = level
    limits = list(cast(list[str], body.limits))  # the limit keys _gate_start found
    st[ADMISSION] = {"limits": limits, "granted": 0, "queued_ms": run.now}
    _acquire(run, limits[0], START_REF)


def _acquire(run: Run, key: str, ref: str, own: Optional[int] = None) -> None:
    run.send(AcquirePermit(holder=run.state["id"], ref=ref, priority=run.priority(own) or NORMAL_PRIORITY), key)


def _gate_task(run: Run, aid: str, act: JSONDict) -> bool:
    """Hold the task of ``act``'s attempt until its permits are granted; True when held."""
    table = table_of(run.defs)
    if table is None:
        return False
    specs = table.for_activity(act["name"])
    if not specs:
        return False
    keys = sorted(key_of(s.name, None if s.per is None else _field(act["input"], s.per)) for s in specs)
    ref = f"{aid}#{act['attempt']}"
    run.state.setdefault(PERMITS, {})[ref] = {"limits": keys, "granted": 0}
    act["waiting_permit"] = True
    _acquire(run, keys[0], ref, act.get(PRIORITY))
    return True


def _pending_ref(state: JSONDict, ref: str, key: str) -> Optional[JSONDict]:
    """The permit entry waiting for ``key`` under ``ref`` (a start or an attempt), or None (stale)."""
    if ref == START_REF:
        entry = state.get(ADMISSION) if state["status"] == Status.QUEUED else None
    else:
        entry = (state.get(PERMITS) or {}).get(ref)
        aid, _, attempt = ref.rpartition("#")
        act = state["activities"].get(aid)
        if act is None or str(act["attempt"]) != attempt or not act.get("waiting_permit"):
            entry = None
    if entry is None or entry["granted"] >= len(entry["limits"]) or entry["limits"][entry["granted"]] != key:
        return None
    found: JSONDict = entry
    return found


def _permit_answer(state: Optional[JSONDict], cmd: Command, body: Union[GrantPermit, RefusePermit], now: int,
                   defs: DefinitionsView, journal: Journal) -> Decision:
    """``GrantPermit`` / ``RefusePermit`` at the holder: recorded if it waits for it, else ignored."""
    key, ref = body.limit, body.ref
    if state is None or state.get("kind") not in ("spec", "code") or state["status"] in Status.TERMINAL:
        return Decision(state=state)  # ended meanwhile: its release is already on its way
    if _pending_ref(state, ref, key) is None:
        return Decision(state=state)
    if isinstance(body, GrantPermit):
        return core.accept(state, cmd, now, PermitGranted(limit=key, ref=ref), defs, journal)
    return core.accept(state, cmd, now, PermitRefused(limit=key, ref=ref, reason=body.reason or ""), defs, journal)


def _on_granted(run: Run, ev: Event, body: PermitGranted) -> None:
    st, key, ref = run.state, body.limit, body.ref
    entry = st[ADMISSION] if ref == START_REF else st[PERMITS][ref]
    entry["granted"] += 1
    if entry["granted"] < len(entry["limits"]):
        act = None if ref == START_REF else st["activities"][ref.rpartition("#")[0]]
        _acquire(run, entry["limits"][entry["granted"]], ref, None if act is None else act.get(PRIORITY))
        return
    if ref != START_REF:
        aid = ref.rpartition("#")[0]
        act = st["activities"][aid]
        act.pop("waiting_permit", None)
        _, timeouts = activity.policies(run, act["step"], act)
        activity.emit_task(run, aid, act, timeouts, gate=False)
        activity.start_attempt(run, aid, act, timeouts)
        return
    _admit(run, key)


def _admit(run: Run, key: str) -> None:
    """Every permit of a queued start is granted: ``WorkflowStarted``, and the workflow runs."""
    st = run.state
    st[ADMISSION]["admitted_ms"] = run.now
    st["status"] = Status.RUNNING
    st["started_ms"] = run.now
    model = WorkflowStarted(workflow=st["workflow"], version=st["version"], input=st["input"],
                            parent_id=st.get("parent_id"), parent_ref=st.get("parent_ref"))
    started = run.record(model)
    if st["kind"] == "code":
        code_replayer.apply_input(run, started, model)
    else:
        spec_interpreter.apply_input(run, started, model)
    core.apply_queued_signals(run)


def _on_refused(run: Run, ev: Event, body: PermitRefused) -> None:
    if body.ref == START_REF:
        run.fail("QuotaExceeded", f"limit '{body.limit}' refused the start: {body.reason}")


def release_ended(run: Run, before: Optional[JSONDict]) -> None:
    """After an input event: ``ReleasePermit`` for every permit whose work ended in it.

    An attempt's permit ends with the attempt (result, timeout, backoff, cancel, close); a start's
    with the instance. Continue-as-new keeps the start's permit for the next run.
    """
    st = run.state
    permits = st.get(PERMITS)
    if permits is None and before is not None and PERMITS in before and before.get("id") == st["id"]:
        permits = before[PERMITS]  # a fresh state (continue-as-new) dropped the table: its attempts ended
    if permits:
        acts = st["activities"]
        for ref in list(permits):
            aid, _, attempt = ref.rpartition("#")
            act = acts.get(aid)
            if act is None or str(act["attempt"]) != attempt or act.get("phase") == "backoff":
                entry = permits.pop(ref)
                for key in entry["limits"][:entry["granted"] + 1]:
                    run.send(ReleasePermit(holder=st["id"], ref=ref), key)
        if permits:
            st[PERMITS] = permits
        else:
            st.pop(PERMITS, None)
    adm = st.get(ADMISSION)
    if adm is None and before is not None and ADMISSION in before and st["status"] not in Status.TERMINAL \
            and before["status"] not in Status.TERMINAL:
        st[ADMISSION] = adm = before[ADMISSION]  # continue-as-new: the same instance still runs
    if adm is not None and st["status"] in Status.TERMINAL:
        st.pop(ADMISSION)
        for key in adm["limits"][:adm["granted"] + 1]:
            run.send(ReleasePermit(holder=st["id"], ref=START_REF), key)


# -- priority -----------------------------------------------------------------------------------------
def _set_priority(state: Optional[JSONDict], cmd: Command, body: SetPriority, now: int, defs: DefinitionsView,
                  journal: Journal) -> Decision:
    """``SetPriority(level)`` -> ``PriorityChanged``; work not dispatched yet moves to the new level."""
    if state is None:
        return Decision(state=None, dlq_reason=f"SetPriority for unknown instance '{cmd.instance_id}'")
    level = body.priority
    if type(level) is not int or level not in PRIORITIES.values():
        return core.refuse(state, cmd, now, RejectCode.INVALID_INPUT,
                           f"expected a priority level 1 (critical) to 5 (background), but got {level!r}")
    if state.get("kind") not in ("spec", "code") or state["status"] not in Status.ACTIVE:
        return core.refuse(state, cmd, now, RejectCode.INVALID_STATE,
                           f"expected an open workflow instance, but '{cmd.instance_id}' is {state['status']}")
    return core.accept(state, cmd, now, PriorityChanged(priority=level, reason=body.reason or ""), defs, journal)


def _on_priority(run: Run, ev: Event, body: PriorityChanged) -> None:
    st = run.state
    st[PRIORITY] = body.priority
    adm = st.get(ADMISSION)
    if adm is not None and st["status"] == Status.QUEUED:  # the queued request moves to the new level
        _acquire(run, adm["limits"][adm["granted"]], START_REF)
    for ref, entry in sorted((st.get(PERMITS) or {}).items()):
        act = st["activities"].get(ref.rpartition("#")[0])
        if act is not None and act.get("waiting_permit") and PRIORITY not in act:
            _acquire(run, entry["limits"][entry["granted"]], ref)


# -- the counter ----------------------------------------------------------------------------------------
def _new_state(key: str, name: str, now: int) -> JSONDict:
    return {"id": key, "kind": KIND, "limit": name, "workflow": name, "version": 0, "status": Status.RUNNING,
            "seq": 0, "started_ms": now, "updated_ms": now, "closed_ms": None, "result": None, "error": None,
            "held": {}, "queue": [], "arrivals": 0, "tokens": None, "refilled_ms": now, "timers": {},
            "burst_since": None, "granted": 0, "refused": 0}


class _Ctx(Recorder):
    """One decision over one limit counter: its state, the spec in force, the events and commands it produced."""

    __slots__ = ("spec",)

    def __init__(self, state: JSONDict, now: int, spec: Optional[LimitSpec]) -> None:
        super().__init__(state, now)
        self.spec = spec

    def decision(self, before: Optional[JSONDict]) -> Decision:
        d = Decision(state=self.state, events=self.events, commands=self.commands)
        old = before["timers"] if before else {}
        new = self.state["timers"]
        d.timers_set = [(t, v["due"]) for t, v in new.items() if t not in old]
        d.timers_cancel = [(t, v["due"]) for t, v in old.items() if t not in new]
        return d

    # -- token bucket ------------------------------------------------------------------------
    def refill(self) -> None:
        st, spec = self.state, self.spec
        if spec is None or spec.rate is None:
            st["tokens"] = None
            return
        cap = spec.capacity
        if st["tokens"] is None:
            st["tokens"] = cap
        else:
            st["tokens"] = min(cap, st["tokens"] + (self.now - st["refilled_ms"]) * spec.rate / 1000)
        st["refilled_ms"] = self.now

    def in_use(self) -> int:
        return len(self.state["held"])

    def room(self) -> bool:
        """Whether one more permit may be granted now (concurrency, burst and rate)."""
        st, spec = self.state, self.spec
        if spec is None:
            return True
        if st["tokens"] is not None and st["tokens"] < 1:
            return False
        if spec.max_concurrent is None:
            return True
        used = self.in_use()
        if used < spec.max_concurrent:
            return True
        if spec.policy != "burst" or used >= math.floor(spec.max_concurrent * spec.burst_factor):
            return False
        return st["burst_since"] is None or self.now - st["burst_since"] < spec.burst_ms

    def grant(self, holder: str, ref: str, priority: int) -> None:
        st, spec = self.state, self.spec
        if spec is None or spec.max_concurrent is not None:
            st["held"][f"{holder}|{ref}"] = {"holder": holder, "ref": ref, "since": self.now, "priority": priority}
        if st["tokens"] is not None:
            st["tokens"] -= 1
        st["granted"] += 1
        if spec is not None and spec.max_concurrent is not None and self.in_use() > spec.max_concurrent \
                and st["burst_since"] is None:
            st["burst_since"] = self.now
        self.record(PermitIssued(holder=holder, ref=ref, priority=priority))
        self.send(GrantPermit(limit=st["id"], ref=ref), holder)

    def pump(self) -> None:
        """Grant queued requests (priority, then arrival) while there is room; arm the refill timer."""
        st, spec = self.state, self.spec
        if spec is not None and spec.max_concurrent is not None and self.in_use() <= spec.max_concurrent:
            st["burst_since"] = None  # back within the limit: the next burst gets its full duration
        queue = st["queue"]
        while queue and self.room():
            head = queue.pop(0)
            self.grant(head["holder"], head["ref"], head["priority"])
        st["timers"] = {}
        if queue and st["tokens"] is not None and st["tokens"] < 1 and spec is not None and spec.rate:
            due = self.now + max(1, math.ceil((1 - st["tokens"]) * 1000 / spec.rate))
            st["timers"] = {f"refill:{due}": {"due": due}}


def _enqueue(queue: list[JSONDict], entry: JSONDict) -> None:
    """Insert keeping (priority, arrival) order."""
    rank = (entry["priority"], entry["n"])
    i = len(queue)
    while i > 0 and (queue[i - 1]["priority"], queue[i - 1]["n"]) > rank:
        i -= 1
    queue.insert(i, entry)


def _name_of(key: str) -> str:
    return key[len(PREFIX):].split(":", 1)[0]


def _ctx(state: Optional[JSONDict], key: str, now: int, defs: DefinitionsView) -> _Ctx:
    name = _name_of(key)
    st = core.copy_state(state) if state is not None else _new_state(key, name, now)
    table = table_of(defs)
    ctx = _Ctx(st, now, table.get(name) if table is not None else None)
    st["max"] = None if ctx.spec is None else ctx.spec.max_concurrent  # what the metrics divide by
    ctx.refill()
    return ctx


def _acquire_cmd(state: Optional[JSONDict], cmd: Command, body: AcquirePermit, now: int, defs: DefinitionsView,
                 journal: Journal) -> Decision:
    if not cmd.instance_id.startswith(PREFIX):
        if state is not None:
            return core.refuse(state, cmd, now, RejectCode.INVALID_STATE,
                               f"expected a limit ({PREFIX}<name>), but '{cmd.instance_id}' is a workflow instance")
        return Decision(state=None, dlq_reason=f"AcquirePermit for '{cmd.instance_id}': a limit's key is '{PREFIX}<name>'")
    holder, ref, priority = body.holder, body.ref, body.priority or NORMAL_PRIORITY
    hid = f"{holder}|{ref}"
    ctx = _ctx(state, cmd.instance_id, now, defs)
    st = ctx.state
    if hid in st["held"]:
        return Decision(state=state)  # granted already (a priority change crossed the grant)
    queued = next((q for q in st["queue"] if q["holder"] == holder and q["ref"] == ref), None)
    if queued is not None:  # the holder's priority changed: same arrival, new level
        if queued["priority"] == priority:
            return Decision(state=state)
        st["queue"].remove(queued)
        queued["priority"] = priority
        _enqueue(st["queue"], queued)
        ctx.record(PermitQueued(holder=holder, ref=ref, priority=priority))
        ctx.pump()
        return ctx.decision(state)
    spec = ctx.spec
    if not st["queue"] and ctx.room():
        ctx.grant(holder, ref, priority)
    elif spec is not None and spec.policy == "reject" or len(st["queue"]) >= MAX_QUEUED:
        why = (f"limit '{spec.name if spec else _name_of(cmd.instance_id)}' is full "
               f"({_usage(ctx)})" if len(st["queue"]) < MAX_QUEUED else f"{MAX_QUEUED} requests already wait")
        st["refused"] += 1
        ctx.record(PermitDenied(holder=holder, ref=ref, reason=why))
        ctx.send(RefusePermit(limit=st["id"], ref=ref, reason=why), holder)
    else:
        st["arrivals"] += 1
        _enqueue(st["queue"], {"holder": holder, "ref": ref, "priority": priority, "n": st["arrivals"], "since": now})
        ctx.record(PermitQueued(holder=holder, ref=ref, priority=priority))
    ctx.pump()
    return ctx.decision(state)


def _usage(ctx: _Ctx) -> str:
    spec = ctx.spec
    parts = []
    if spec is not None and spec.max_concurrent is not None:
        parts.append(f"{ctx.in_use()} of {spec.max_concurrent} in use")
    if spec is not None and spec.rate is not None:
        parts.append(f"rate {spec.rate:g}/s spent")
    return ", ".join(parts) or "no room"


def _release_cmd(state: Optional[JSONDict], cmd: Command, body: ReleasePermit, now: int, defs: DefinitionsView,
                 journal: Journal) -> Decision:
    if state is None or state.get("kind") != KIND:
        return Decision(state=state)  # nothing was ever asked of it
    holder, ref = body.holder, body.ref
    hid = f"{holder}|{ref}"
    ctx = _ctx(state, cmd.instance_id, now, defs)
    st = ctx.state
    if hid in st["held"]:
        del st["held"][hid]
    else:
        queued = next((q for q in st["queue"] if q["holder"] == holder and q["ref"] == ref), None)
        if queued is None:
            return Decision(state=state)  # a rate-only grant, or a refused request: nothing is held
        st["queue"].remove(queued)
    ctx.record(PermitReleased(holder=holder, ref=ref))
    ctx.pump()
    return ctx.decision(state)


def _as_limit(state: Optional[JSONDict], cmd: Command, body: Optional[AnyCommand], now: int,
              defs: DefinitionsView, journal: Journal) -> Decision:
    """Every command addressed to an existing limit counter (``body`` None: a type no model has)."""
    assert state is not None
    if isinstance(body, AcquirePermit):
        return _acquire_cmd(state, cmd, body, now, defs, journal)
    if isinstance(body, ReleasePermit):
        return _release_cmd(state, cmd, body, now, defs, journal)
    if isinstance(body, FireTimer):
        if body.timer_id not in state["timers"]:
            return Decision(state=state)
        ctx = _ctx(state, cmd.instance_id, now, defs)
        ctx.pump()
        # nothing granted (a lowered rate): the state is kept as it was; the next request or
        # release of this limit refills the bucket and re-arms its timer
        return ctx.decision(state) if ctx.events else Decision(state=state)
    if isinstance(body, QueryStatus):
        return Decision(state=state, replies=[(body.query_id, {"result": status_record(state)})])
    if isinstance(body, QueryWorkflow):
        return Decision(state=state, replies=[(body.query_id, {"result": limit_view(state)})])
    return core.refuse(state, cmd, now, RejectCode.INVALID_STATE,
                       f"expected a workflow instance for {cmd.type}, but '{cmd.instance_id}' is a limit")


def limit_view(state: JSONDict, spec: Optional[LimitSpec] = None) -> JSONDict:
    """What ``kflow queues`` shows of a counter's state: in use, queued by level, allowed."""
    by_level: dict[int, int] = {}
    for q in state["queue"]:
        by_level[q["priority"]] = by_level.get(q["priority"], 0) + 1
    return {"key": state["id"], "limit": state["limit"], "in_use": len(state["held"]), "queued": len(state["queue"]),
            "queued_by_level": {str(k): v for k, v in sorted(by_level.items())}, "granted": state["granted"],
            "refused": state["refused"], "tokens": state["tokens"], "bursting_since_ms": state["burst_since"],
            "max": None if spec is None else spec.max_concurrent, "rate": None if spec is None else spec.rate}


core.DECIDERS.update({"AcquirePermit": _acquire_cmd, "ReleasePermit": _release_cmd, "GrantPermit": _permit_answer,
                      "RefusePermit": _permit_answer, "SetPriority": _set_priority})
core.KIND_DECIDERS[KIND] = _as_limit
core.INPUT_APPLIERS.update({"WorkflowQueued": _on_queued, "PermitGranted": _on_granted, "PermitRefused": _on_refused,
                            "PriorityChanged": _on_priority})
core.START_GATES.append(_gate_start)
core.AFTER_EVOLVE.append(release_ended)
activity.TASK_GATES.append(_gate_task)
