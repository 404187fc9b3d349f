"""The declared instance state (:mod:`kflow.model.state`) against the engine: every state it writes fits.

Each scenario drives the pure engine (an :class:`~kflow.testing.harness.EngineHarness` with its manual
clock) through one area of its paths: spec and code workflows, activities with retries, timeouts and
heartbeats, timers, signals, children, sagas, cancel and terminate, suspend and resume, incidents,
updates, priorities, quotas, migrations, continue-as-new, id reuse, retries of closed instances, and
the owner, tenant and token ids the processor stamps with auth on. Every state a decision returns, its
``engine-state`` round trip, and every state that folding a recorded history rebuilds is validated
with pydantic, strictly, against :class:`~kflow.model.state.InstanceState`, unknown keys refused at
every level. Together the scenarios write every key the model declares, so a declared key that
nothing writes any more fails too.

pydantic validates a ``typing.TypedDict`` only on Python 3.12 and later, and the model keeps its
TypedDicts free of pydantic configuration; :func:`pydantic_type` rebuilds them as pydantic validates
them (``typing_extensions.TypedDicts`` with ``extra='forbid'``).
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable
from typing import Any, Literal, NotRequired, Required, Union, get_args, get_origin, is_typeddict

import pytest
import typing_extensions
from pydantic import ConfigDict, JsonValue, TypeAdapter, ValidationError

import kflow
from kflow.engine import CodeDefinition, Decision, fold
from kflow.engine.core import EVENTS_OFFSET, OWNER, SEEN_TOKENS, TENANT
from kflow.engine.limits import KIND as LIMIT_KIND
from kflow.engine.limits import LimitsView, parse_limits
from kflow.engine.run import new_state
from kflow.engine.schedules import KIND as SCHEDULE_KIND
from kflow.engine.schedules import ScheduleSpec
from kflow.engine.schedules import key_of as schedule_key
from kflow.model.messages import Command, JSONValue, Status
from kflow.model.state import INSTANCE_KINDS, STATE_FORMAT_VERSION, InstanceState
from kflow.model.versions import version_code
from kflow.schemas.codec import ENGINE_STATE_FORMAT, decode_engine_state, encode_engine_state
from kflow.testing.harness import EngineHarness
from tests.unit.engine.test_journal import LEGACY_STATE, legacy
from tests.unit.engine.test_migration import V1, V2

NOW = 1_700_000_000_000


# -- the model as pydantic validates it ---------------------------------------------------------------
def fields_of(td: Any) -> dict[str, Any]:
    """The keys of TypedDict ``td`` and their types, without ``Required``/``NotRequired``."""
    out = {}
    for name, hint in td.__annotations__.items():
        out[name] = get_args(hint)[0] if get_origin(hint) in (Required, NotRequired) else hint
    return out


_REBUILT: dict[Any, Any] = {}


def pydantic_type(tp: Any) -> Any:
    """``tp`` as pydantic validates it: every TypedDict refusing unknown keys, payloads as JSON values,
    a status as the enum's member or its plain string (what a decoded state holds)."""
    if tp is JSONValue:
        return JsonValue
    if tp is Status:
        return Literal[tuple(s.value for s in Status)]  # a member, or its plain string
    if is_typeddict(tp):
        if tp not in _REBUILT:
            required = tp.__required_keys__
            fields = {name: (typing_extensions.Required if name in required else typing_extensions.NotRequired)[
                pydantic_type(hint)] for name, hint in fields_of(tp).items()}
            rebuilt = typing_extensions.TypedDict(tp.__name__, fields)
            rebuilt.__pydantic_config__ = ConfigDict(extra="forbid")
            _REBUILT[tp] = rebuilt
        return _REBUILT[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return Union[tuple(pydantic_type(a) for a in args)]
    if origin in (list, dict):
        return origin[tuple(pydantic_type(a) for a in args)]
    return tp  # str, int, float, bool, None, Literal[...]


@functools.cache
def adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(pydantic_type(tp))


def validate(state: Any, tp: Any = InstanceState) -> None:
    """Raise ValidationError unless ``state`` is a ``tp`` (strict: no coercion, no unknown key)."""
    adapter(tp).validate_python(state, strict=True)


def declared(tp: Any, out: set[tuple[str, str]] | None = None) -> set[tuple[str, str]]:
    """Every ``(TypedDict, key)`` the model declares, from ``tp`` down."""
    out = set() if out is None else out
    if is_typeddict(tp):
        for name, hint in fields_of(tp).items():
            if (tp.__name__, name) not in out:
                out.add((tp.__name__, name))
                declared(hint, out)
    else:
        for arg in get_args(tp):
            declared(arg, out)
    return out


def written(value: Any, tp: Any, out: set[tuple[str, str]]) -> None:
    """Add the ``(TypedDict, key)`` of every key ``value`` (a valid ``tp``) has, from ``tp`` down."""
    if is_typeddict(tp):
        hints = fields_of(tp)
        for name, item in value.items():
            out.add((tp.__name__, name))
            written(item, hints[name], out)
        return
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        for member in args:
            if is_typeddict(member) and fits(value, member):
                written(value, member, out)
                return
    elif origin is dict and isinstance(value, dict):
        for item in value.values():
            written(item, args[1], out)
    elif origin is list and isinstance(value, list):
        for item in value:
            written(item, args[0], out)


def fits(value: Any, tp: Any) -> bool:
    try:
        validate(value, tp)
    except ValidationError:
        return False
    return True


# -- the engine, checked at every decision --------------------------------------------------------------
class CheckedHarness(EngineHarness):
    """An :class:`EngineHarness` that checks every state a decision returns against :class:`InstanceState`.

    With ``auth``, each decision's state is stamped as the processor stamps it with auth on (the
    starter's owner and tenant, the accepted command's token id, the offset of the first event).
    ``folds``: the recorded histories are folded and checked too (not when the code of a workflow
    was swapped under a running instance: its history then belongs to two codes).
    """

    def __init__(self, *, auth: bool = False, folds: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.auth, self.folds = auth, folds
        self.checked = 0
        self.seen: set[tuple[str, str]] = set()

    def _process(self, cmd: Command) -> Decision:
        d = super()._process(cmd)
        if d.state is not None and d.events and self.auth and d.state.get("kind") in INSTANCE_KINDS:
            stamp(d, self.clock.ms)
        if d.state is not None:
            self.check(d.state, f"after {cmd.type}")
        return d

    def check(self, state: dict[str, Any], where: str) -> None:
        kind = state.get("kind")
        if kind not in INSTANCE_KINDS:
            assert kind in (LIMIT_KIND, SCHEDULE_KIND), f"{state.get('id')}: unknown state kind {kind!r}"
            return
        for form, value in (("as decided", state), ("from engine-state", decode_engine_state(
                encode_engine_state(state["id"], state))[1])):
            try:
                validate(value)
            except ValidationError as e:
                raise AssertionError(f"the state of '{state['id']}' {where} ({form}) is not an InstanceState:\n{e}\n"
                                     f"state: {state}") from None
        written(state, InstanceState, self.seen)
        self.checked += 1

    def fold_all(self) -> None:
        """Fold every instance's history from scratch and check the state it rebuilds."""
        for iid, events in self.history.items():
            if self.states[iid].get("kind") in INSTANCE_KINDS:
                rebuilt = fold(events, self.defs)
                assert rebuilt is not None
                self.check(rebuilt, "folded")

    def run_tasks(self) -> None:
        """Run every pending task (and what it causes), then hold tasks again."""
        self.auto_run_tasks = True
        self.drain()
        self.auto_run_tasks = False

    def take(self, iid: str, name: str) -> Any:
        """The pending task of activity ``name`` of ``iid``, taken out of the queue (not run)."""
        task = next(t for t in self.pending_tasks if t.instance_id == iid and t.name == name and t.kind == "run")
        self.pending_tasks.remove(task)
        return task


def stamp(d: Decision, now_ms: int) -> None:
    """What the processor writes into a decided instance state with auth on (see ``kflow.streams.lane``
    and ``CommandGuard.remember``): owner and tenant of a start, the command's token id, the offset of
    the instance's first event once it was produced."""
    st = d.state
    assert st is not None
    if d.events[0].type in ("WorkflowStarted", "WorkflowQueued"):
        st[OWNER], st[TENANT] = "alice", "acme"
    tokens = {jti: exp for jti, exp in (st.get(SEEN_TOKENS) or {}).items() if exp > now_ms // 1000}
    tokens[f"jti-{st['id']}-{d.events[0].seq}"] = now_ms // 1000 + 300
    st[SEEN_TOKENS] = dict(list(tokens.items())[-32:])
    st.setdefault(EVENTS_OFFSET, 4096)


def code(h: EngineHarness, name: str, fn: Callable[..., Any], version: int = 1, **options: Any) -> None:
    h.defs.add(CodeDefinition(name=name, version=version, fn=fn, **options))


def marks(h: EngineHarness) -> None:
    """``mark`` returns its input; ``unbook`` works; ``boom`` always fails."""
    h.activity("mark", lambda x: x)
    h.activity("unbook", lambda x: "unbooked")

    def boom(x: Any) -> Any:
        raise RuntimeError("service down")

    h.activity("boom", boom)


def retry_cmd(h: EngineHarness, iid: str, **data: Any) -> None:
    h.send("RetryWorkflow", iid, **{"from_step": None, "input_patch": None, "force": False, "reason": "fixed",
                                    "by": "ops", **data})


def resolve(h: EngineHarness, iid: str, action: str, **data: Any) -> None:
    incident = next(iter(h.states[iid]["incidents"]))
    h.send("ResolveIncident", iid, **{"incident_id": incident, "action": action, "output": None, "input_patch": None,
                                      "by": "ops", "reason": "", **data})


SCENARIOS: dict[str, Callable[[], list[CheckedHarness]]] = {}


def scenario(fn: Callable[[], list[CheckedHarness]]) -> Callable[[], list[CheckedHarness]]:
    SCENARIOS[fn.__name__] = fn
    return fn


# -- spec workflows -------------------------------------------------------------------------------
LEAF = {"name": "sm.leaf", "version": 1, "steps": [{"id": "s", "task": "mark", "input": "input"}]}

#: An activity with every timeout and a retry policy, a local activity, one with its own priority and
#: fairness key; the definition's default priority is low.
ACTIVITIES = {"name": "sm.acts", "version": 1, "priority": "low", "steps": [
    {"id": "call", "task": "flaky", "input": "input", "output": "r",
     "retry": {"initial": "1s", "max_attempts": 3, "jitter": 0},
     "timeout": {"schedule_to_close": "1m", "start_to_close": "10s", "heartbeat": "2s"}},
    {"id": "quick", "task": "mark", "input": "r", "local": True},
    {"id": "urgent", "task": "mark", "input": "'u'", "priority": "critical", "fairness_key": "'customer-7'"},
]}


@scenario
def spec_activity_attempts() -> list[CheckedHarness]:
    """Start reports, heartbeats, a heartbeat timeout, backoffs, a failed attempt, a late result, a
    local activity, step priority and fairness key, and a priority change."""
    h = CheckedHarness()
    h.deploy(ACTIVITIES)
    marks(h)
    h.auto_run_tasks = False
    h.start("sm.acts", "sm-a1", {"n": 1})
    aid = h.take("sm-a1", "flaky").activity_id
    h.send("StartActivity", "sm-a1", activity_id=aid, attempt=1)
    h.clock.advance(1)
    h.send("HeartbeatActivity", "sm-a1", activity_id=aid, attempt=1, details=None)
    assert "beat" in h.states["sm-a1"]["activities"][aid]
    h.advance(2)  # silent for the whole heartbeat timeout: timed out, backoff
    act = h.states["sm-a1"]["activities"][aid]
    assert act["phase"] == "backoff" and act["timed_out"] and "retry" in act["timers"]
    h.send("CompleteActivity", "sm-a1", activity_id=aid, attempt=1, result="late")  # STALE
    h.advance(1)
    h.take("sm-a1", "flaky")
    h.send("FailActivity", "sm-a1", activity_id=aid, attempt=2, error_type="Busy", message="try later", retryable=True)
    h.advance(2)
    h.take("sm-a1", "flaky")
    h.send("SetPriority", "sm-a1", priority=2, reason="customer called")
    h.send("CompleteActivity", "sm-a1", activity_id=aid, attempt=3, result={"ok": True})
    assert h.states["sm-a1"]["ended"] == {aid: [3, True]}
    h.run_tasks()
    assert h.status("sm-a1") == Status.COMPLETED
    return [h]


#: Variables, search attributes, a parallel step (an activity, a sleep), a bounded foreach, a choice,
#: a wait with a timeout, a child workflow and a signal buffered before its wait, under an execution timeout.
FLOW = {"name": "sm.flow", "version": 1, "timeout": {"execution": "1h"}, "steps": [
    {"id": "init", "set": {"n": "input.n"}, "search": {"customer": "'acme'", "region": "'eu'"}},
    {"id": "fan", "parallel": [
        {"steps": [{"id": "a1", "task": "mark", "input": "'a'", "output": "x"}]},
        {"steps": [{"id": "nap", "sleep": "5s"}]},
    ], "output": "both"},
    {"id": "each", "foreach": "[1, 2, 3]", "as": "item", "concurrency": 2,
     "steps": [{"id": "per", "task": "mark", "input": "item", "output": "got"}], "output": "all"},
    {"id": "pick", "choice": [{"when": "n > 1", "goto": "hold"}], "otherwise": "hold"},
    {"id": "hold", "wait": {"signal": "go", "timeout": "30s"}, "output": "g"},
    {"id": "kid", "child": {"workflow": "sm.leaf", "input": "{'v': n}"}, "output": "k"},
    {"id": "late", "wait": {"signal": "extra"}, "output": "e", "search": {"region": "null"}},
]}


@scenario
def spec_control_flow() -> list[CheckedHarness]:
    h = CheckedHarness()
    for doc in (FLOW, LEAF):
        h.deploy(doc)
    marks(h)
    h.auto_run_tasks = False
    h.start("sm.flow", "sm-f1", {"n": 2})
    h.run_tasks()
    h.advance(5)  # the parallel's sleep
    h.run_tasks()  # the foreach, two at a time
    assert h.states["sm-f1"]["threads"]["0"]["wait"]["k"] == "signal"
    h.signal("sm-f1", "extra", {"early": True}, command_id="sig-1")  # nobody waits for it yet: buffered
    h.signal("sm-f1", "extra", {"early": True}, command_id="sig-1")  # a redelivery: rejected
    assert h.states["sm-f1"]["signals"] == {"extra": [{"early": True}]}
    h.signal("sm-f1", "go", "yes", command_id="sig-2")
    h.run_tasks()  # the child's activity; the child completes, then the buffered signal is taken
    assert h.status("sm-f1") == Status.COMPLETED, h.events("sm-f1")
    return [h]


#: Two steps with compensations, then a wait: a cancel runs the saga (one compensation fails).
TRIP = {"name": "sm.trip", "version": 1, "steps": [
    {"id": "book", "task": "mark", "input": "'hotel'", "compensate": {"task": "unbook", "input": "'hotel'"}},
    {"id": "fly", "task": "mark", "input": "'flight'", "compensate": {"task": "boom"}},
    {"id": "stay", "wait": {"signal": "never"}},
]}
#: A compensated step, then a step that fails: the saga runs before WorkflowFailed.
DOOMED = {"name": "sm.doomed", "version": 1, "steps": [
    {"id": "book", "task": "mark", "input": "'hotel'", "compensate": {"task": "unbook", "input": "'hotel'"}},
    {"id": "crash", "task": "boom"},
]}
#: A wait that times out: the instance fails at its first step and can be retried from there.
TIMES_OUT = {"name": "sm.timeout", "version": 1, "steps": [
    {"id": "w", "wait": {"signal": "s", "timeout": "10s"}},
    {"id": "after", "task": "mark", "input": "'after'"},
]}


@scenario
def spec_sagas_cancel_terminate_and_retry() -> list[CheckedHarness]:
    h = CheckedHarness()
    for doc in (TRIP, DOOMED, TIMES_OUT, LEAF):
        h.deploy(doc)
    marks(h)
    h.auto_run_tasks = False
    h.start("sm.trip", "sm-t1")
    h.run_tasks()
    assert len(h.states["sm-t1"]["compensations"]) == 2
    h.send("CancelWorkflow", "sm-t1", reason="changed plans")
    assert h.status("sm-t1") == Status.CANCELLING and h.states["sm-t1"]["compensation"] == "running"
    h.run_tasks()
    st = h.states["sm-t1"]
    assert st["status"] == Status.CANCELLED and st["compensation"] == "failed" and st["compensation_errors"]

    h.start("sm.doomed", "sm-t2")
    h.take("sm-t2", "mark")
    h.send("CompleteActivity", "sm-t2", activity_id=next(iter(h.states["sm-t2"]["activities"])), attempt=1,
           result="booked")
    crash = h.take("sm-t2", "boom")
    h.send("FailActivity", "sm-t2", activity_id=crash.activity_id, attempt=1, error_type="Fatal", message="no",
           retryable=False)
    assert h.status("sm-t2") == Status.COMPENSATING and h.states["sm-t2"]["closing"]["event"] == "WorkflowFailed"
    h.run_tasks()
    assert h.status("sm-t2") == Status.FAILED

    h.start("sm.timeout", "sm-t3")
    h.advance(10)
    assert h.status("sm-t3") == Status.FAILED and h.states["sm-t3"]["stopped_at"] == 0
    retry_cmd(h, "sm-t3", input_patch={"note": "again"})
    assert h.states["sm-t3"]["retries"] == 1
    h.send("TerminateWorkflow", "sm-t3", reason="enough")
    assert h.status("sm-t3") == Status.TERMINATED

    h.start("sm.leaf", "sm-t4", 1)
    h.send("CancelWorkflow", "sm-t4", reason="not needed")  # no compensations: cancelled at once
    h.send("StartWorkflow", "sm-t4", workflow="sm.leaf", version=None, input=2, id_reuse="allow_if_closed")
    h.run_tasks()
    assert h.status("sm-t4") == Status.COMPLETED
    return [h]


#: A task, a sleep, a signal wait and a child in parallel: what arrives while suspended is held.
HOLDS = {"name": "sm.holds", "version": 1, "steps": [{"id": "all", "parallel": [
    {"steps": [{"id": "t", "task": "mark", "input": "'t'"}]},
    {"steps": [{"id": "z", "sleep": "10s"}]},
    {"steps": [{"id": "s", "wait": {"signal": "go"}}]},
    {"steps": [{"id": "c", "child": {"workflow": "sm.leaf", "input": "1"}}]},
]}]}


@scenario
def suspend_and_resume() -> list[CheckedHarness]:
    h = CheckedHarness()
    for doc in (HOLDS, LEAF):
        h.deploy(doc)
    marks(h)
    h.auto_run_tasks = False
    h.start("sm.holds", "sm-s1")
    h.send("SuspendWorkflow", "sm-s1", reason="maintenance")
    h.run_tasks()  # its activity's result and its child's completion are held
    h.advance(10)  # so is the timer, with its entry
    h.signal("sm-s1", "go", "now")
    held = h.states["sm-s1"]["suspended"]["held"]
    assert sorted(e["type"] for e in held) == ["ActivityCompleted", "ChildCompleted", "SignalReceived", "TimerFired"]
    h.send("ResumeWorkflow", "sm-s1", reason="done")
    assert h.status("sm-s1") == Status.COMPLETED
    return [h]


#: A step whose retries run out opens an incident (4h to resolve) instead of failing.
ORDER = {"name": "sm.order", "version": 1, "steps": [
    {"id": "charge", "task": "boom", "input": "{'card': 'tok_1'}", "output": "c", "priority": "high",
     "retry": {"initial": "1s", "max_attempts": 2, "jitter": 0},
     "on_failure": {"incident": {"role": "ops", "instructions": "check the card service", "timeout": "4h"}}},
    {"id": "ship", "task": "mark", "input": "c"},
]}


@scenario
def spec_incidents() -> list[CheckedHarness]:
    h = CheckedHarness()
    h.deploy(ORDER)
    marks(h)
    for iid in ("sm-i1", "sm-i2", "sm-i3"):
        h.start("sm.order", iid)
        h.advance(1)
        assert h.status(iid) == Status.INCIDENT, h.events(iid)
    resolve(h, "sm-i1", "retry", input_patch={"card": "tok_2"})  # fails twice again: a new incident
    h.advance(1)
    resolve(h, "sm-i1", "skip", output="skipped")
    assert h.status("sm-i1") == Status.COMPLETED
    resolve(h, "sm-i2", "fail", reason="give up")
    h.advance(4 * 3600)  # sm-i3's incident times out
    assert h.status("sm-i2") == h.status("sm-i3") == Status.FAILED
    return [h]


#: A step waiting for an update (validated, answered with a reply), then for a second one.
APPROVAL = {"name": "sm.approval", "version": 1, "steps": [
    {"id": "ask", "wait": {"update": "approve", "timeout": "1m", "validate": "update.ok == true",
                           "reply": "'thanks ' + update.by"}, "output": "u"},
    {"id": "again", "wait": {"update": "approve"}},
]}


@scenario
def spec_updates() -> list[CheckedHarness]:
    h = CheckedHarness()
    h.deploy(APPROVAL)
    h.start("sm.approval", "sm-u1")
    assert h.update("sm-u1", "approve", {"ok": False, "by": "bob"})["rejected"]  # type: ignore[index]
    assert h.update("sm-u1", "approve", {"ok": True, "by": "ann"}, update_id="u-1") == {"result": "thanks ann"}
    h.send("TerminateWorkflow", "sm-u1", reason="stop")  # no update runs: nothing abandoned
    assert h.states["sm-u1"]["updates"]["u-1"]["answer"] == {"result": "thanks ann"}
    return [h]


@scenario
def quotas_and_activity_limits() -> list[CheckedHarness]:
    """Starts beyond a quota wait QUEUED (signals they get are queued too); attempts beyond an activity
    limit wait for a permit."""
    job = {"name": "sm.job", "version": 1, "steps": [{"id": "w", "wait": {"signal": "done"}}]}
    call = {"name": "sm.call", "version": 1, "steps": [{"id": "erp", "task": "erp.post", "input": "input"}]}
    h = CheckedHarness()
    for doc in (job, call):
        h.deploy(doc)
    h.activity("erp.post", lambda x: "posted")
    h.defs.quotas = LimitsView(parse_limits({"limits": [  # type: ignore[attr-defined]
        {"name": "one-job", "workflow": "sm.job", "max_running": 1},
        {"name": "erp", "activity": "erp.post", "max_in_flight": 1}]}))
    h.start("sm.job", "sm-q1")
    h.send("StartWorkflow", "sm-q2", workflow="sm.job", version=None, input=None, priority=2)
    assert h.status("sm-q2") == Status.QUEUED
    h.signal("sm-q2", "done", "early")
    assert h.states["sm-q2"]["queued_signals"]
    h.signal("sm-q1", "done")
    assert h.status("sm-q1") == h.status("sm-q2") == Status.COMPLETED
    h.auto_run_tasks = False
    h.start("sm.call", "sm-q3", 1)
    h.start("sm.call", "sm-q4", 2)
    act = next(iter(h.states["sm-q4"]["activities"].values()))
    assert act.get("waiting_permit") and h.states["sm-q4"]["permits"]
    h.run_tasks()
    assert h.status("sm-q3") == h.status("sm-q4") == Status.COMPLETED
    return [h]


@scenario
def spec_migration() -> list[CheckedHarness]:
    """A migration that meets an activity in flight waits for the safe point after its result."""
    h = CheckedHarness()
    for doc in (V1, V2):
        h.deploy(doc)
    h.activity("prepare", lambda _: {"n": 1})
    h.activity("ship", lambda x: "shipped")
    h.auto_run_tasks = False
    h.start("order", "sm-m1", version=version_code("1.2.0"))
    h.send("MigrateWorkflow", "sm-m1", plan_id="p1", from_range="^1", to_version=version_code("2.0.0"),
           step_map={"approve": "approval"}, vars={"total": "prep.n * 10"}, transform=None, reason="v2", by="ops")
    assert h.states["sm-m1"]["pending_migration"]["to_version"] == version_code("2.0.0")
    h.run_tasks()
    assert h.states["sm-m1"]["version"] == version_code("2.0.0") and "pending_migration" not in h.states["sm-m1"]
    h.signal("sm-m1", "approved", True)
    h.run_tasks()
    assert h.status("sm-m1") == Status.COMPLETED
    return [h]


@scenario
def scheduled_runs_and_children() -> list[CheckedHarness]:
    """Runs started by a schedule (its own state is a ``schedule``, not an instance)."""
    h = CheckedHarness(auth=True)
    h.deploy(LEAF)
    marks(h)
    h.send("CreateSchedule", schedule_key("sm-nightly"),
           spec=ScheduleSpec.build("sm-nightly", "sm.leaf", every="1h", input=5).to_dict(), replace=False)
    h.advance(3600)
    runs = [iid for iid, st in h.states.items() if st.get("parent_id") == schedule_key("sm-nightly")]
    assert runs and all(h.status(r) == Status.COMPLETED for r in runs)
    return [h]


# -- code workflows -------------------------------------------------------------------------------
FULL_RETRY = {"initial": 1, "backoff": 2.0, "max_interval": "10s", "max_attempts": 2, "jitter": 0.0,
              "non_retryable": ["Fatal"]}


async def shop(ctx: Any, input: Any) -> Any:
    """Search attributes, a priority, updates, activities with every policy, a local activity, timers,
    a signal, a condition, a child, a side effect, a saga, and continue-as-new once."""
    notes: list[Any] = []
    ctx.set_update_handler("note", lambda d: notes.append(d) or len(notes))

    def refuse(d: Any) -> Any:
        raise kflow.WorkflowError("no notes of that kind", type="Refused")

    ctx.set_update_handler("bad", refuse)
    ctx.upsert_search_attributes({"customer": "acme", "tier": 1})
    if ctx.run_number == 1:
        ctx.set_priority("high", "vip")
        a = await ctx.activity("mark", input, retry=FULL_RETRY, start_to_close=10, schedule_to_close="1m",
                               heartbeat=2, priority="critical", fairness_key="customer-7")
        b = await ctx.local_activity("mark", a)
        await ctx.sleep(5)
        got = await ctx.wait_signal("go", timeout=60)
        await ctx.wait_condition(lambda: "stop" in notes, timeout=120)
        kid = await ctx.child("sm.leaf", {"v": 1})
        ctx.continue_as_new({"a": a, "b": b, "got": got, "kid": kid, "side": await ctx.side_effect(lambda: 7)})
    async with ctx.saga() as saga:
        await ctx.activity("mark", "booked")
        saga.add_compensation("unbook", "booked")
        await ctx.activity("boom", None)
    return "unreachable"


@scenario
def code_workflow_paths() -> list[CheckedHarness]:
    h = CheckedHarness(auth=True)
    code(h, "sm.shop", shop, execution_timeout_ms=3_600_000)
    h.deploy(LEAF)
    marks(h)
    h.auto_run_tasks = False
    h.start("sm.shop", "sm-c1", {"n": 1})
    task = h.take("sm-c1", "mark")
    h.send("StartActivity", "sm-c1", activity_id=task.activity_id, attempt=1)
    h.clock.advance(1)
    h.send("HeartbeatActivity", "sm-c1", activity_id=task.activity_id, attempt=1, details=None)
    h.advance(2)  # the heartbeat timeout: backoff, then attempt 2
    h.advance(1)
    h.run_tasks()  # attempt 2, then the local activity
    h.advance(5)
    h.signal("sm-c1", "go", "now")
    assert h.update("sm-c1", "bad", None) == {"error": {"type": "Refused", "message": "no notes of that kind"}}
    assert h.update("sm-c1", "note", "stop") == {"result": 1}
    h.run_tasks()  # the child
    st = h.states["sm-c1"]
    assert st["run"] == 2 and st["runs"][0]["run"] == 1 and st["priority"] == 2, h.events("sm-c1")
    h.run_tasks()  # the saga: boom fails, unbook compensates
    assert h.status("sm-c1") == Status.FAILED and h.states["sm-c1"]["compensation"] == "completed"
    return [h]


async def charge(ctx: Any, input: Any) -> Any:
    return await ctx.activity("boom", input, retry={"initial": 1, "max_attempts": 2, "jitter": 0},
                              on_failure={"incident": {"role": "ops", "instructions": "check the card", "timeout": "1h"}})


async def two_steps(ctx: Any, input: Any) -> Any:
    a = await ctx.activity("mark", input)
    # numbers given as text, as a policy read from a config file may have them: the state keeps them converted
    return await ctx.activity("boom", a, retry={"initial": 1, "max_attempts": "2", "jitter": "0"})


@scenario
def code_incidents_and_retries() -> list[CheckedHarness]:
    """An incident keeps the activity record; a retry of a failed run goes on above its attempts."""
    h = CheckedHarness()
    code(h, "sm.charge", charge)
    code(h, "sm.two", two_steps)
    marks(h)
    h.start("sm.charge", "sm-ci1", 5)
    h.advance(1)
    assert h.status("sm-ci1") == Status.INCIDENT
    resolve(h, "sm-ci1", "retry")  # reopened under its id: attempts 3 and 4 fail, a new incident
    h.advance(1)
    resolve(h, "sm-ci1", "skip", output=0)
    assert h.status("sm-ci1") == Status.COMPLETED

    h.start("sm.two", "sm-ci2", 1)
    h.advance(1)
    assert h.status("sm-ci2") == Status.FAILED and h.states["sm-ci2"]["reset_attempts"]
    retry_cmd(h, "sm-ci2")
    assert h.states["sm-ci2"]["retries"] == 1
    h.advance(1)
    return [h]


async def waits_then_works(ctx: Any, input: Any) -> Any:
    a = await ctx.activity("mark", input)
    try:
        await ctx.wait_signal("go")
    except kflow.CancelledError:
        await ctx.activity("mark", "cleanup")
        raise
    return a


async def works_differently(ctx: Any, input: Any) -> Any:
    a = await ctx.activity("boom", input)
    await ctx.wait_signal("go")
    return a


@scenario
def code_blocked_cancelled_terminated() -> list[CheckedHarness]:
    """Code that no longer replays its history blocks the instance until fixed code replays it; a
    cancel runs the code's cleanup first; terminate closes at once."""
    h = CheckedHarness(folds=False)
    code(h, "sm.wait", waits_then_works)
    marks(h)
    h.start("sm.wait", "sm-b1", 1)
    code(h, "sm.wait", works_differently)
    h.replay_cache.clear()  # a restart: the next input replays the history on the new code
    h.signal("sm-b1", "nudge")
    assert h.status("sm-b1") == Status.BLOCKED and h.states["sm-b1"]["blocked"]["attempts"] == 1
    code(h, "sm.wait", waits_then_works)
    h.advance(1)  # the replay timer: the fixed code replays it
    assert h.status("sm-b1") == Status.RUNNING and "blocked" not in h.states["sm-b1"]
    h.auto_run_tasks = False
    h.send("CancelWorkflow", "sm-b1", reason="not needed")
    assert h.status("sm-b1") == Status.CANCELLING and h.states["sm-b1"]["cancel_reason"] == "not needed"
    h.run_tasks()
    assert h.status("sm-b1") == Status.CANCELLED
    h.start("sm.wait", "sm-b2", 2)
    h.send("TerminateWorkflow", "sm-b2", reason="stop")
    assert h.status("sm-b2") == Status.TERMINATED
    return [h]


async def migrating_v1(ctx: Any, input: Any) -> Any:
    a = await ctx.activity("mark", input)
    return await ctx.activity("mark", a)


async def migrating_v2(ctx: Any, input: Any) -> Any:
    a = await ctx.activity("mark", input)
    if ctx.patched("audit"):
        a = await ctx.activity("mark", {"audited": a})
    return await ctx.activity("mark", a)


@scenario
def code_migration_and_suspend() -> list[CheckedHarness]:
    h = CheckedHarness()
    code(h, "sm.mig", migrating_v1)
    code(h, "sm.mig", migrating_v2, version=2)
    marks(h)
    h.auto_run_tasks = False
    h.start("sm.mig", "sm-cm1", 1, version=1)
    h.send("MigrateWorkflow", "sm-cm1", plan_id="p2", from_range="1", to_version=2, step_map={}, vars={},
           transform=None, reason="", by="ops")
    assert h.states["sm-cm1"]["pending_migration"]["waiting_on"]
    h.send("SuspendWorkflow", "sm-cm1", reason="hold on")
    h.run_tasks()
    h.send("ResumeWorkflow", "sm-cm1", reason="go")
    h.run_tasks()
    assert h.states["sm-cm1"]["version"] == 2 and h.status("sm-cm1") == Status.COMPLETED
    return [h]


@scenario
def legacy_state_moves_into_the_journal() -> list[CheckedHarness]:
    """A state written before the journal (its history inside) is an InstanceState, and so is the
    state its first input leaves."""
    h = CheckedHarness(folds=False)
    h.defs.add(kflow.authoring.definition_of(legacy))
    h.activity("inc", lambda x: x + 1)
    st = copy.deepcopy(LEGACY_STATE)
    st["id"] = "sm-legacy"
    h.states["sm-legacy"] = st
    h.check(st, "as written before the journal")
    h.send("CompleteActivity", "sm-legacy", activity_id="inc-6", attempt=1, result=10)
    assert "inputs" not in h.states["sm-legacy"] and h.status("sm-legacy") == Status.COMPLETED
    return [h]


# -- the checks ---------------------------------------------------------------------------------------
@functools.cache
def outcome(name: str) -> tuple[frozenset[tuple[str, str]], int]:
    """Run scenario ``name`` once: the declared keys its states had, and how many states were checked."""
    seen: set[tuple[str, str]] = set()
    checked = 0
    for h in SCENARIOS[name]():
        if h.folds:
            h.fold_all()
        seen |= h.seen
        checked += h.checked
    return frozenset(seen), checked


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_state_the_engine_writes_is_an_instance_state(name: str) -> None:
    _, checked = outcome(name)
    assert checked >= 3


def test_the_engine_writes_every_key_the_model_declares() -> None:
    seen = frozenset().union(*(outcome(name)[0] for name in SCENARIOS))
    assert sorted(declared(InstanceState) - seen) == []


def test_a_fresh_state_has_exactly_the_required_keys() -> None:
    st = new_state("sm-new", "w", 1, "spec", {"x": 1}, NOW, None, None)
    validate(st)
    assert set(st) == InstanceState.__required_keys__


def test_the_model_owns_the_engine_state_format() -> None:
    assert STATE_FORMAT_VERSION == ENGINE_STATE_FORMAT


def running_state() -> dict[str, Any]:
    """A spec instance waiting in a parallel step on an activity, a timer and a signal."""
    h = CheckedHarness()
    for doc in (HOLDS, LEAF):
        h.deploy(doc)
    h.auto_run_tasks = False
    h.start("sm.holds", "sm-neg")
    st = h.states["sm-neg"]
    validate(st)
    return st


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change of ``state`` at ``path`` (``a.b.*``: ``*`` is the first key of that table)."""
    def change(state: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = state
        for part in parents:
            node = node[next(iter(node))] if part == "*" else node[part]
        node[next(iter(node)) if last == "*" else last] = value
    return change


@pytest.mark.parametrize(("change", "why"), [
    (_set("surprise", 1), "extra_forbidden"),  # a key the model does not declare
    (_set("activities.*.colour", "red"), "extra_forbidden"),  # ... in a table entry
    (_set("threads.*.wait.deadline", 5), "extra_forbidden"),  # ... in a thread's wait
    (_set("seq", "3"), "int_type"),  # a number as text
    (_set("seq", 3.0), "int_type"),
    (_set("closed_ms", True), "int_type"),
    (_set("status", "SLEEPING"), "literal_error"),  # not a status
    (_set("kind", "limit"), "literal_error"),  # not an instance
    (_set("priority", 7), "literal_error"),  # not a level
    (_set("activities.*.phase", "paused"), "literal_error"),
    (_set("activities.*.attempt", None), "int_type"),
    (_set("timers.*.due", "soon"), "int_type"),
    (_set("input", ("a", "tuple")), "invalid-json-value"),  # not a JSON value
    (_set("vars", {"x": {1, 2}}), "invalid-json-value"),
    (_set("error", {"type": "Boom"}), "missing"),  # an error without its message
    (_set("ended", {"a-1": ["1", True]}), "int_type"),
])
def test_a_state_the_model_does_not_declare_is_refused(change: Callable[[dict[str, Any]], None], why: str) -> None:
    st = running_state()
    change(st)
    with pytest.raises(ValidationError) as e:
        validate(st)
    assert why in str(e.value)


def test_a_missing_required_key_is_refused_and_a_missing_optional_one_is_not() -> None:
    st = running_state()
    st["timers"][next(iter(st["timers"]))].pop("purpose")
    with pytest.raises(ValidationError, match="missing"):
        validate(st)
    st = running_state()
    act = st["activities"][next(iter(st["activities"]))]
    act.pop("local", None)
    st.pop("priority", None)
    validate(st)


def test_the_checked_harness_fails_on_an_undeclared_key() -> None:
    h = CheckedHarness()
    st = running_state()
    st["surprise"] = 1
    with pytest.raises(AssertionError, match="is not an InstanceState"):
        h.check(st, "made up")
