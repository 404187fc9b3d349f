"""Schedules: cron or interval declarations that start workflow runs, decided like instances.

A schedule is an object of the engine keyed ``schedule:<id>`` on the ``commands`` topic, so the
engine that owns that key's partition is its single writer and fires it. Its state (``kind``
``schedule``) lives in the partition's store with one durable timer armed at the next fire time;
when the timer fires, the same transaction records ``ScheduleFired``, produces a ``StartWorkflow``
for the run id ``<schedule-id>:<scheduled time, UTC ISO 8601>`` and arms the next timer. A crash
anywhere aborts the transaction and the restored timer fires again with the same scheduled time,
hence the same run id; a second start of an id is rejected by the engine anyway. Runs are started
as children of the schedule key, so their ``CompleteChild``/``FailChild`` come back and tell the
overlap policy what is still running.

This module is pure: the declaration (:class:`ScheduleSpec`), fire times (croniter on naive wall
times of the schedule's time zone; see :func:`fire_times` for DST), deterministic jitter, overlap
decisions, catch-up, backfill expansion, and the deciders registered with :mod:`kflow.engine.core`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Optional, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from croniter import croniter

from kflow.engine import core
from kflow.engine.core import Decision, status_record
from kflow.engine.definitions import DefinitionsView
from kflow.engine.journal import Journal
from kflow.engine.run import Recorder
from kflow.model.commands import (
    AnyCommand,
    BackfillSchedule,
    CancelWorkflow,
    CompleteChild,
    CreateSchedule,
    DeleteSchedule,
    FailChild,
    FireTimer,
    PauseSchedule,
    QueryStatus,
    QueryWorkflow,
    StartWorkflow,
    TerminateWorkflow,
    TriggerSchedule,
    UnpauseSchedule,
)
from kflow.model.errors import ProblemsError
from kflow.model.events import (
    ScheduleCreated,
    ScheduleDeleted,
    ScheduleFired,
    SchedulePaused,
    ScheduleRunClosed,
    ScheduleUnpaused,
)
from kflow.model.messages import Command, JSONDict, RejectCode, Status
from kflow.model.spec import parse_duration_ms

__all__ = ["KIND", "OVERLAP_POLICIES", "PREFIX", "SCHEDULE_COMMANDS", "ScheduleSpec", "ScheduleSpecError",
           "backfill_times", "fire_times", "iso", "jitter_ms", "key_of", "next_runs", "overlap_action", "run_id",
           "schedule_view", "table_record"]

#: State ``kind`` of a schedule, and the key prefix of its commands.
KIND = "schedule"
PREFIX = "schedule:"
#: What to do with a run that is due while an earlier run of the schedule is still open.
OVERLAP_POLICIES = ("skip", "buffer_one", "allow_all", "cancel_other", "terminate_other")
SCHEDULE_COMMANDS = frozenset({"CreateSchedule", "PauseSchedule", "UnpauseSchedule", "TriggerSchedule",
                               "BackfillSchedule", "DeleteSchedule"})
#: Fires one timer pass may record; more due runs (a long catch-up) continue in the next transaction.
MAX_FIRES_PER_PASS = 100
#: Runs one backfill may start.
MAX_BACKFILL_RUNS = 1000
#: Missed runs counted one by one before the count is reported as "at least".
MAX_MISSED_COUNT = 10_000
#: Open runs a schedule tracks (``allow_all`` may have many); the oldest are forgotten beyond it.
MAX_TRACKED_RUNS = 100
#: Recent actions kept in the schedule's state (describe shows them).
RECENT = 10
DEFAULT_CATCHUP_MS = 3_600_000
#: The shortest catch-up window applied: a timer always fires a little late, and a run that is
#: only that late is not missed.
MIN_CATCHUP_MS = 10_000
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_CRON_ALIASES = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
#: Wall-time steps tried when a fall-back or spring-forward filters candidates out (one DST hour at most).
_SEARCH_LIMIT = 10_000
#: Longer than any DST shift (2 h at most, historically).
_DST_MARGIN_MS = 3 * 3_600_000


class ScheduleSpecError(ProblemsError, ValueError):
    """A schedule declaration that cannot be applied; ``problems`` lists every reason."""

    def __init__(self, schedule_id: str, problems: list[str]) -> None:
        super().__init__(f"schedule '{schedule_id}'", problems)
        self.schedule_id = schedule_id


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """A schedule's declaration, as stored on the wire (durations in ms, instants in epoch ms).

    Attributes:
        id: The schedule's name; its key is ``schedule:<id>`` and its runs are ``<id>:<time>``.
        workflow: The workflow each run starts.
        version: The workflow version (None: the latest deployed when the run starts).
        input: The JSON input of every run.
        cron: A 5-field cron expression (minute hour day-of-month month day-of-week) or an alias
            such as ``@daily``, read in ``timezone``; exactly one of ``cron`` and ``every_ms``.
        every_ms: A fixed interval, counted from ``start_ms`` (or the Unix epoch).
        timezone: IANA time zone of the cron expression (``Europe/Berlin``); default UTC.
        jitter_ms: Each run is delayed by a deterministic offset in ``[0, jitter_ms)``.
        start_ms: No run is scheduled before this instant.
        end_ms: No run is scheduled after this instant.
        overlap: What a due run does while an earlier run is open (see :data:`OVERLAP_POLICIES`).
        catchup_window_ms: After downtime, missed runs scheduled within this window before now
            are fired (per the overlap policy); older ones are skipped. At least 10 seconds apply.
    """

    id: str
    workflow: str
    version: Optional[int] = None
    input: Any = None
    cron: Optional[str] = None
    every_ms: Optional[int] = None
    timezone: str = "UTC"
    jitter_ms: int = 0
    start_ms: Optional[int] = None
    end_ms: Optional[int] = None
    overlap: str = "skip"
    catchup_window_ms: int = DEFAULT_CATCHUP_MS

    @classmethod
    def build(cls, id: str, workflow: str, *, cron: Optional[str] = None,
              every: Union[str, int, float, timedelta, None] = None, version: Optional[int] = None, input: Any = None,
              timezone: str = "UTC", jitter: Union[str, int, float, timedelta, None] = None,
              start: Union[str, datetime, None] = None, end: Union[str, datetime, None] = None,
              overlap: str = "skip", catchup_window: Union[str, int, float, timedelta, None] = None) -> ScheduleSpec:
        """A spec from human forms (``"1h"``, timedeltas, ISO 8601 or aware datetimes), checked.

        Raises:
            ScheduleSpecError: every problem at once (bad cron, unknown time zone, ...).
        """
        problems: list[str] = []
        doc: JSONDict = {"id": id, "workflow": workflow, "version": version, "input": input, "cron": cron,
                         "timezone": timezone, "overlap": overlap}
        for name, value, default in (("every_ms", every, None), ("jitter_ms", jitter, 0),
                                     ("catchup_window_ms", catchup_window, DEFAULT_CATCHUP_MS)):
            try:
                doc[name] = default if value is None else _duration_ms(value)
            except ValueError as e:
                problems.append(f"{name[:-3]}: {e}")
        for name, instant in (("start_ms", start), ("end_ms", end)):
            try:
                doc[name] = None if instant is None else _instant_ms(instant)
            except ValueError as e:
                problems.append(f"{name[:-3]}: {e}")
        return cls.from_dict(doc, problems)

    @classmethod
    def from_dict(cls, doc: Any, problems: Optional[list[str]] = None) -> ScheduleSpec:
        """Check a wire declaration and build the spec.

        Raises:
            ScheduleSpecError: every problem at once.
        """
        problems = list(problems or [])
        if not isinstance(doc, dict):
            raise ScheduleSpecError("?", [f"expected a JSON object, but got {type(doc).__name__}"])
        sid = doc.get("id")
        unknown = set(doc) - set(cls.__slots__)
        if unknown:
            problems.append(f"unknown field(s) {', '.join(sorted(unknown))}")
        if not isinstance(sid, str) or not _ID.match(sid):
            problems.append(f"id: expected letters, digits, '.', '_' or '-' (at most 200, not starting with "
                            f"a symbol), but got {sid!r}")
        if not isinstance(doc.get("workflow"), str) or not doc.get("workflow"):
            problems.append("workflow: expected the name of a workflow")
        version = doc.get("version")
        if version is not None and (type(version) is not int or version < 1):
            problems.append(f"version: expected a version number (1, 2, ...) or none for the latest, but got {version!r}")
        cron, every = doc.get("cron"), doc.get("every_ms")
        if (cron is None) == (every is None):
            problems.append("expected exactly one of cron and every")
        tz = doc.get("timezone", "UTC")
        _zone(tz, problems)  # intervals are fixed durations, but a bad zone is still an error
        if cron is not None:
            _check_cron(cron, problems)
        if every is not None and (type(every) is not int or every < 1):
            problems.append(f"every: expected a positive duration, but got {every!r}")
        for name in ("jitter_ms", "catchup_window_ms"):
            value = doc.get(name, 0)
            if type(value) is not int or value < 0:
                problems.append(f"{name[:-3]}: expected a non-negative duration, but got {value!r}")
        start, end = doc.get("start_ms"), doc.get("end_ms")
        for name, value in (("start", start), ("end", end)):
            if value is not None and type(value) is not int:
                problems.append(f"{name}: expected an instant, but got {value!r}")
        if type(start) is int and type(end) is int and end < start:
            problems.append("end: expected an end after the start")
        overlap = doc.get("overlap", "skip")
        if overlap not in OVERLAP_POLICIES:
            problems.append(f"overlap: expected one of {', '.join(OVERLAP_POLICIES)}, but got {overlap!r}")
        if problems:
            raise ScheduleSpecError(sid if isinstance(sid, str) else "?", problems)
        spec = cls(**{k: v for k, v in doc.items() if k in cls.__slots__})
        if cron is not None:
            try:
                next(fire_times(spec, -1 if start is None else start - 1), None)
            except Exception as e:  # croniter gives up on expressions that never match (Feb 30)
                raise ScheduleSpecError(spec.id, [f"cron: '{cron}' never fires ({e})"]) from None
        return spec

    def to_dict(self) -> JSONDict:
        return asdict(self)


def _duration_ms(value: Union[str, int, float, timedelta]) -> int:
    if isinstance(value, timedelta):
        return int(value.total_seconds() * 1000)
    return parse_duration_ms(value)


def _instant_ms(value: Union[str, datetime]) -> int:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"expected an ISO 8601 instant such as 2026-01-31T08:00:00Z, but got {value!r}") from None
    if value.tzinfo is None:
        raise ValueError(f"expected an instant with a time zone (2026-01-31T08:00:00+01:00 or ...Z), but got {value}")
    return int(value.timestamp() * 1000)


def _zone(name: Any, problems: list[str]) -> Optional[ZoneInfo]:
    try:
        if not isinstance(name, str) or not name:
            raise ValueError
        return _tz(name)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(f"timezone: expected an IANA time zone such as Europe/Berlin or UTC, but got {name!r}")
        return None


def _tz(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _check_cron(expr: Any, problems: list[str]) -> None:
    if not isinstance(expr, str):
        problems.append(f"cron: expected an expression, but got {expr!r}")
        return
    text = expr.strip()
    if text.startswith("@"):
        if text not in _CRON_ALIASES:
            problems.append(f"cron: unknown alias {text!r} (known: {', '.join(sorted(_CRON_ALIASES))})")
        return
    if len(text.split()) != 5:
        problems.append(f"cron: expected 5 fields (minute hour day-of-month month day-of-week), but got "
                        f"{len(text.split())} in {expr!r}")
    elif not croniter.is_valid(text):
        problems.append(f"cron: {expr!r} is not a valid cron expression")


# -- fire times --------------------------------------------------------------------------------
def key_of(schedule_id: str) -> str:
    """The Kafka key (instance id) of a schedule."""
    return PREFIX + schedule_id


def iso(ms: int) -> str:
    """An instant as UTC ISO 8601 (``2026-03-29T01:00:00Z``; milliseconds only when there are any)."""
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    if ms % 1000:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def run_id(schedule_id: str, scheduled_ms: int) -> str:
    """The deterministic id of the run scheduled at ``scheduled_ms``: ``<schedule-id>:<UTC ISO time>``."""
    return f"{schedule_id}:{iso(scheduled_ms)}"


def fire_times(spec: ScheduleSpec, after_ms: int, until_ms: Optional[int] = None,
               bounded: bool = True) -> Iterator[int]:
    """Scheduled instants strictly after ``after_ms`` (and at most ``until_ms``), ascending.

    With ``bounded``, the spec's start and end apply. A cron expression is matched against naive
    wall times of the schedule's time zone, and each match becomes an instant with ``fold=0``:

    * a wall time a spring-forward skips (02:30 in Europe/Berlin on the last Sunday of March)
      does not exist; it fires once, at the instant it maps to, shifted forward by the gap
      (03:30 CEST). A shifted instant already reached by an earlier match is not fired again;
    * a wall time a fall-back repeats (02:30 on the last Sunday of October) fires once, at its
      first occurrence (CEST).

    Instants are strictly increasing, so no scheduled time is ever fired twice.
    """
    lo = after_ms
    end = until_ms
    if bounded:
        if spec.start_ms is not None:
            lo = max(lo, spec.start_ms - 1)
        if spec.end_ms is not None:
            end = spec.end_ms if end is None else min(end, spec.end_ms)
    if spec.every_ms is not None:
        anchor = spec.start_ms if spec.start_ms is not None else 0
        k = max(0, (lo - anchor) // spec.every_ms + 1)
        while True:
            t = anchor + k * spec.every_ms
            if end is not None and t > end:
                return
            yield t
            k += 1
    assert spec.cron is not None
    tz = _tz(spec.timezone)
    # matching starts a DST gap earlier: a wall time a spring-forward skipped maps to an instant
    # after the gap, so it may lie after ``lo`` although its wall time is before lo's
    wall = datetime.fromtimestamp((lo - _DST_MARGIN_MS) / 1000, tz).replace(tzinfo=None, fold=0)
    it = croniter(spec.cron.strip(), wall)
    last = lo
    stale = 0
    while True:
        w: datetime = it.get_next(datetime)
        t = int(w.replace(tzinfo=tz, fold=0).timestamp() * 1000)
        if t <= last:
            stale += 1  # a fall-back's second hour, or a shifted spring-forward time already passed
            if stale > _SEARCH_LIMIT:
                return
            continue
        if end is not None and t > end:
            return
        stale = 0
        last = t
        yield t


def next_runs(spec: ScheduleSpec, now_ms: int, n: int = 5) -> list[int]:
    """The next ``n`` scheduled instants at or after ``now_ms`` (before jitter)."""
    out = []
    for t in fire_times(spec, now_ms - 1):
        out.append(t)
        if len(out) >= n:
            break
    return out


def backfill_times(spec: ScheduleSpec, start_ms: int, end_ms: int, limit: int = MAX_BACKFILL_RUNS) -> list[int]:
    """Scheduled instants in ``[start_ms, end_ms)`` (the spec's own start and end do not apply).

    Raises:
        ValueError: the range holds more than ``limit`` runs.
    """
    out: list[int] = []
    for t in fire_times(spec, start_ms - 1, end_ms - 1, bounded=False):
        if len(out) >= limit:
            raise ValueError(f"expected a range with at most {limit} runs, but [{iso(start_ms)}, {iso(end_ms)}) "
                             "holds more: backfill it in smaller ranges")
        out.append(t)
    return out


def jitter_ms(schedule_id: str, scheduled_ms: int, jitter: int) -> int:
    """The deterministic delay of one run in ``[0, jitter)``: a hash of the schedule and the time,
    so a replay, a restore or another engine computes the same instant."""
    if jitter <= 0:
        return 0
    digest = hashlib.sha256(f"{schedule_id}@{scheduled_ms}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % jitter


# -- overlap -------------------------------------------------------------------------------------
def overlap_action(policy: str, running: bool, buffered: bool) -> str:
    """What a due run does: ``start``, ``skip``, ``buffer`` (start when the open runs close),
    ``cancel`` or ``terminate`` (stop the open runs, then start this one when they have closed).

    ``buffer_one`` buffers one run and skips further ones while it waits; ``cancel_other`` and
    ``terminate_other`` keep only the newest due run buffered.
    """
    if not running or policy == "allow_all":
        return "start"
    if policy == "skip":
        return "skip"
    if policy == "buffer_one":
        return "skip" if buffered else "buffer"
    return "cancel" if policy == "cancel_other" else "terminate"


# -- the schedule's state -------------------------------------------------------------------------
def schedule_view(state: JSONDict) -> JSONDict:
    """The record of the ``schedules`` table: the declaration and what the schedule is doing."""
    return {"id": state["spec"]["id"], "spec": state["spec"], "paused": state["paused"], "note": state["note"],
            "next_ms": state.get("next_ms"), "running": state["running"], "buffered": state.get("buffered"),
            "recent": state["recent"], "runs_started": state["runs_started"], "created_ms": state["started_ms"],
            "updated_ms": state["updated_ms"]}


def table_record(state: JSONDict) -> Optional[bytes]:
    """The value of the schedule's record in the ``schedules`` table; None (a tombstone) once deleted."""
    if state["status"] in Status.TERMINAL:
        return None
    return orjson.dumps(schedule_view(state))


class _Ctx(Recorder):
    """One decision over one schedule: a copy of its state, the events and commands it produced."""

    @property
    def spec(self) -> ScheduleSpec:
        return ScheduleSpec.from_dict(dict(self.state["spec"]))

    def decision(self, before: Optional[JSONDict]) -> Decision:
        d = Decision(state=self.state, events=self.events, commands=self.commands)
        old = before["timers"] if before else {}
        new = self.state["timers"]
        d.timers_set = [(t, v["due"]) for t, v in new.items() if t not in old]
        d.timers_cancel = [(t, v["due"]) for t, v in old.items() if t not in new]
        return d

    # -- runs ---------------------------------------------------------------------------------
    def start(self, spec: ScheduleSpec, scheduled: int, track: bool = True) -> str:
        rid = run_id(spec.id, scheduled)
        self.send(StartWorkflow(workflow=spec.workflow, version=spec.version, input=spec.input,
                                parent_id=self.state["id"], parent_ref=rid, id_reuse="reject_duplicate", priority=None),
                  rid)
        self.state["runs_started"] += 1
        if track:
            running = self.state["running"]
            running.append(rid)
            del running[:-MAX_TRACKED_RUNS]
        return rid

    def due(self, spec: ScheduleSpec, scheduled: int, policy: str, out: JSONDict) -> None:
        """Apply the overlap policy to one due run; record what happened in ``out``."""
        st = self.state
        action = overlap_action(policy, bool(st["running"]), st.get("buffered") is not None)
        rid = run_id(spec.id, scheduled)
        if action == "start":
            self.start(spec, scheduled)
            out.setdefault("started", []).append(rid)
        elif action == "skip":
            out.setdefault("skipped", []).append(rid)
        else:
            replaced = st.get("buffered")
            if replaced is not None:
                out.setdefault("skipped", []).append(replaced["run_id"])
            st["buffered"] = {"scheduled_ms": scheduled, "run_id": rid}
            out["buffered"] = rid
            if action in ("cancel", "terminate"):
                stopping = st.setdefault("stopping", [])
                for other in st["running"]:
                    if other in stopping:
                        continue
                    if action == "cancel":
                        self.send(CancelWorkflow(reason=f"schedule '{spec.id}': run {rid} is due (cancel_other)"), other)
                    else:
                        self.send(TerminateWorkflow(reason=f"schedule '{spec.id}': run {rid} is due (terminate_other)"),
                                  other)
                    stopping.append(other)
                    out.setdefault("cancelled" if action == "cancel" else "terminated", []).append(other)

    def note(self, trigger: str, out: JSONDict) -> None:
        """Record one firing: the event, and the short list of recent actions describe shows."""
        self.record(ScheduleFired(trigger=trigger, outcome=out))
        recent = self.state["recent"]
        recent.append({"at_ms": self.now, "trigger": trigger, **{k: v for k, v in out.items() if k != "missed_before_ms"}})
        del recent[:-RECENT]

    def arm(self, spec: ScheduleSpec, after_ms: int) -> None:
        """Arm the timer at the first scheduled time after ``after_ms`` (plus jitter), or none."""
        self.arm_at(spec, next(fire_times(spec, after_ms), None))

    def arm_at(self, spec: ScheduleSpec, nxt: Optional[int]) -> None:
        """Arm the timer at scheduled time ``nxt`` (plus its jitter); None (past the end) arms none.
        The timer id names the scheduled time, so re-arming leaves no stale index entry behind."""
        st = self.state
        st["timers"] = {}
        st["next_ms"] = nxt
        if nxt is None or st["paused"]:
            return
        due = nxt + jitter_ms(spec.id, nxt, spec.jitter_ms)
        st["timers"] = {f"fire:{nxt}": {"due": due, "scheduled": nxt}}


def _new_state(key: str, spec: ScheduleSpec, now: int, seq: int) -> JSONDict:
    return {"id": key, "kind": KIND, "workflow": spec.workflow, "version": spec.version or 0,
            "status": Status.RUNNING, "seq": seq, "started_ms": now, "updated_ms": now, "closed_ms": None,
            "result": None, "error": None, "spec": spec.to_dict(), "paused": False, "note": "", "next_ms": None,
            "timers": {}, "running": [], "buffered": None, "stopping": [], "recent": [], "runs_started": 0}


def _copy(state: JSONDict) -> JSONDict:
    return core.copy_state(state)


def _reject(state: JSONDict, cmd: Command, now: int, code: str, reason: str) -> Decision:
    return core.refuse(state, cmd, now, code, reason)


def _unknown(cmd: Command) -> Decision:
    return Decision(state=None, dlq_reason=f"{cmd.type} for unknown schedule '{cmd.instance_id}'")


def _not_a_schedule(state: JSONDict, cmd: Command, now: int) -> Decision:
    return _reject(state, cmd, now, RejectCode.INVALID_STATE,
                   f"expected a schedule, but '{cmd.instance_id}' is a workflow instance ({state['status']})")


def _open(state: Optional[JSONDict], cmd: Command, now: int) -> Optional[Decision]:
    """The guard of commands for an existing schedule: missing -> DLQ, deleted -> rejected."""
    if state is None:
        return _unknown(cmd)
    if state.get("kind") != KIND:
        return _not_a_schedule(state, cmd, now)
    if state["status"] in Status.TERMINAL:
        return _reject(state, cmd, now, RejectCode.NOT_FOUND, f"expected a schedule, but '{cmd.instance_id}' was deleted")
    return None


# -- deciders ---------------------------------------------------------------------------------------
def _create(state: Optional[JSONDict], cmd: Command, body: CreateSchedule, now: int, defs: DefinitionsView,
            journal: Journal) -> Decision:
    if not cmd.instance_id.startswith(PREFIX):
        if state is not None:
            return _not_a_schedule(state, cmd, now)
        return Decision(state=None, dlq_reason=f"CreateSchedule for '{cmd.instance_id}': a schedule's key is "
                                               f"'{PREFIX}<id>'")
    try:
        spec = ScheduleSpec.from_dict(body.spec)
    except ScheduleSpecError as e:
        if state is None:
            return Decision(state=None, dlq_reason=str(e))
        return _reject(state, cmd, now, RejectCode.INVALID_INPUT, str(e))
    if key_of(spec.id) != cmd.instance_id:
        reason = f"expected the spec of '{cmd.instance_id[len(PREFIX):]}', but got the spec of '{spec.id}'"
        return Decision(state=None, dlq_reason=reason) if state is None else _reject(
            state, cmd, now, RejectCode.INVALID_INPUT, reason)
    replaced = False
    if state is not None:
        if state.get("kind") != KIND:
            return _not_a_schedule(state, cmd, now)
        if state["status"] not in Status.TERMINAL:
            if not body.replace:
                return _reject(state, cmd, now, RejectCode.DUPLICATE,
                               f"expected no schedule '{spec.id}', but one exists (replace it with --update)")
            replaced = True
    if replaced:
        assert state is not None
        st = _copy(state)
        st["spec"], st["workflow"], st["version"] = spec.to_dict(), spec.workflow, spec.version or 0
    else:
        st = _new_state(cmd.instance_id, spec, now, state["seq"] if state else 0)
    ctx = _Ctx(st, now)
    ctx.record(ScheduleCreated(spec=spec.to_dict(), replaced=replaced))
    ctx.arm(spec, now)  # the first scheduled time after now
    return ctx.decision(state)


def _pause(state: Optional[JSONDict], cmd: Command, body: Union[PauseSchedule, UnpauseSchedule], now: int,
           defs: DefinitionsView, journal: Journal) -> Decision:
    guard = _open(state, cmd, now)
    if guard:
        return guard
    assert state is not None
    pausing = isinstance(body, PauseSchedule)
    if state["paused"] == pausing:
        return _reject(state, cmd, now, RejectCode.INVALID_STATE,
                       f"expected a {'running' if pausing else 'paused'} schedule, but '{state['spec']['id']}' is "
                       f"{'paused' if state['paused'] else 'running'}")
    ctx = _Ctx(_copy(state), now)
    st = ctx.state
    st["paused"], st["note"] = pausing, body.note or ""
    st["status"] = Status.SUSPENDED if pausing else Status.RUNNING
    ctx.record(SchedulePaused(note=st["note"]) if pausing else ScheduleUnpaused(note=st["note"]))
    # paused: no timer, and the runs due meanwhile are not caught up; unpaused: the next one from now
    ctx.arm(ctx.spec, now)
    return ctx.decision(state)


def _trigger(state: Optional[JSONDict], cmd: Command, body: TriggerSchedule, now: int, defs: DefinitionsView,
             journal: Journal) -> Decision:
    guard = _open(state, cmd, now)
    if guard:
        return guard
    assert state is not None
    policy = body.overlap or state["spec"]["overlap"]
    if policy not in OVERLAP_POLICIES:
        return _reject(state, cmd, now, RejectCode.INVALID_INPUT,
                       f"expected an overlap policy ({', '.join(OVERLAP_POLICIES)}), but got {policy!r}")
    ctx = _Ctx(_copy(state), now)
    out: JSONDict = {}
    ctx.due(ctx.spec, now, policy, out)
    ctx.note("manual", out)
    return ctx.decision(state)


def _backfill(state: Optional[JSONDict], cmd: Command, body: BackfillSchedule, now: int, defs: DefinitionsView,
              journal: Journal) -> Decision:
    guard = _open(state, cmd, now)
    if guard:
        return guard
    assert state is not None
    start, end = body.start_ms, body.end_ms
    if end <= start:
        return _reject(state, cmd, now, RejectCode.INVALID_INPUT, f"expected a range end after its start, but got "
                       f"[{iso(start)}, {iso(end)})")
    ctx = _Ctx(_copy(state), now)
    spec = ctx.spec
    try:
        times = backfill_times(spec, start, end)
    except ValueError as e:
        return _reject(state, cmd, now, RejectCode.INVALID_INPUT, str(e))
    # every scheduled time in the range gets its run; ids already used (it ran) are refused by the
    # engine as duplicates, so a backfill over a range that ran starts only what is missing
    started = [ctx.start(spec, t, track=False) for t in times]
    ctx.note("backfill", {"started": started, "range": [start, end]})
    return ctx.decision(state)


def _delete(state: Optional[JSONDict], cmd: Command, body: DeleteSchedule, now: int, defs: DefinitionsView,
            journal: Journal) -> Decision:
    guard = _open(state, cmd, now)
    if guard:
        return guard
    assert state is not None
    ctx = _Ctx(_copy(state), now)
    st = ctx.state
    reason = body.reason or ""
    ctx.record(ScheduleDeleted(reason=reason))
    st["status"], st["closed_ms"], st["timers"], st["next_ms"], st["buffered"] = Status.TERMINATED, now, {}, None, None
    st["error"] = {"type": "Deleted", "message": reason}
    return ctx.decision(state)


def _fire(state: JSONDict, body: FireTimer, now: int) -> Decision:
    """A schedule's timer is due: fire every run due up to ``now`` (catch-up), then arm the next."""
    tid = body.timer_id
    timer = state["timers"].get(tid)
    if timer is None or state["status"] in Status.TERMINAL or state["paused"]:
        return Decision(state=state)  # cancelled or re-armed after it was indexed
    ctx = _Ctx(_copy(state), now)
    spec = ctx.spec
    out: JSONDict = {}
    first = timer["scheduled"]
    horizon = now - max(spec.catchup_window_ms, MIN_CATCHUP_MS)
    times = fire_times(spec, first - 1)
    t: Optional[int] = next(times, None)
    missed = 0
    while t is not None and t < horizon and t + jitter_ms(spec.id, t, spec.jitter_ms) <= now:
        missed += 1
        if missed >= MAX_MISSED_COUNT:  # jump over the rest of what is older than the window
            out["missed_at_least"] = True
            times = fire_times(spec, horizon - 1)
            t = next(times, None)
            break
        t = next(times, None)
    if missed:
        out["missed"], out["missed_before_ms"] = missed, horizon
    fired = 0
    while (t is not None and fired < MAX_FIRES_PER_PASS
           and t + jitter_ms(spec.id, t, spec.jitter_ms) <= now):
        ctx.due(spec, t, spec.overlap, out)
        fired += 1
        t = next(times, None)
    ctx.note("timer", out)
    ctx.arm_at(spec, t)  # the first scheduled time not handled yet: due later, or the rest of a long catch-up
    return ctx.decision(state)


def _run_closed(state: JSONDict, body: Union[CompleteChild, FailChild], now: int) -> Decision:
    """A run of the schedule closed (``CompleteChild``/``FailChild``): the buffered run may start."""
    rid = body.child_id
    if rid not in state["running"]:
        return Decision(state=state)  # a backfilled or forgotten run: nothing depends on it
    ctx = _Ctx(_copy(state), now)
    st = ctx.state
    st["running"].remove(rid)
    if rid in st.get("stopping", ()):
        st["stopping"].remove(rid)
    status = "COMPLETED" if isinstance(body, CompleteChild) else (body.error_type or "FAILED")
    ctx.record(ScheduleRunClosed(run_id=rid, status=status))
    buffered = st.get("buffered")
    if buffered is not None and not st["running"] and st["status"] not in Status.TERMINAL:
        st["buffered"] = None
        spec = ctx.spec
        ctx.start(spec, buffered["scheduled_ms"])
        ctx.note("buffer", {"started": [buffered["run_id"]]})
    return ctx.decision(state)


def _as_schedule(state: Optional[JSONDict], cmd: Command, body: Optional[AnyCommand], now: int,
                 defs: DefinitionsView, journal: Journal) -> Decision:
    """Every command addressed to an existing schedule (its state's ``kind`` is ``schedule``; ``body``
    None: a type no model has)."""
    assert state is not None
    decider = _DECIDERS.get(cmd.type)
    if decider is not None:
        return decider(state, cmd, body, now, defs, journal)
    if isinstance(body, FireTimer):
        return _fire(state, body, now)
    if isinstance(body, (CompleteChild, FailChild)):
        return _run_closed(state, body, now)
    if isinstance(body, QueryStatus):
        return Decision(state=state, replies=[(body.query_id, {"result": status_record(state)})])
    if isinstance(body, QueryWorkflow):
        return Decision(state=state, replies=[(body.query_id, {"result": schedule_view(state)})])
    return _reject(state, cmd, now, RejectCode.INVALID_STATE,
                   f"expected a workflow instance for {cmd.type}, but '{cmd.instance_id}' is a schedule")


_DECIDERS: dict[str, core.Decider] = {
    "CreateSchedule": _create,
    "PauseSchedule": _pause,
    "UnpauseSchedule": _pause,
    "TriggerSchedule": _trigger,
    "BackfillSchedule": _backfill,
    "DeleteSchedule": _delete,
}

core.DECIDERS.update(_DECIDERS)
core.KIND_DECIDERS[KIND] = _as_schedule
