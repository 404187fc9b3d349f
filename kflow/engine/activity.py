"""Activity attempts: scheduling, retry backoff, timeouts and limits, as durable timers in the state.

An activity record in ``state["activities"]`` lives from its first schedule until its final
outcome; it carries the current ``attempt``, its ``phase`` (``scheduled``, ``started`` or
``backoff``) and the ids of its timers. Every timer is an ordinary durable timer in
``state["timers"]`` whose ``purpose`` says what firing means: ``retry`` schedules the next
attempt, ``activity_timeout`` (with its ``kind``) ends the current attempt with ``ActivityTimeout``.
``schedule_to_close`` spans every attempt; ``start_to_close`` and ``heartbeat`` belong to one attempt
and are re-armed under a fresh timer id (never by moving a due time) so the processor's timer index
stays a plain diff of ids. A recorded heartbeat only stamps the attempt (``beat``); when the
heartbeat timer fires before ``beat + heartbeat`` it is re-armed for that instant, so an attempt
times out exactly when it was silent for the whole heartbeat timeout. Activities that ended with
something other than a single recorded attempt are remembered briefly (``ended``) so a late
result is told apart from a redelivery (``STALE`` vs ``DUPLICATE``). Retry delays and jitter are pure functions of the instance id, activity
id and attempt, so replay reproduces them. A *local* activity (``act["local"]``) has the same
record and events; its task is marked local for the engine process to run in the same transaction,
so it arms no start-to-close or heartbeat timer, gets no cancel message, and a ``StartActivity``
for it (the engine deferring the run) emits its task again. Deciding what the final outcome means
for the workflow (a thread, a catch route, a saga step) is the interpreter's job, not this module's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import orjson

from kflow.engine.run import PRIORITY, Run
from kflow.model.events import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    ActivityTimedOut,
    AnyEvent,
    TimerStarted,
)
from kflow.model.messages import JSONDict, RejectCode, Status
from kflow.model.spec import RetrySpec, TimeoutSpec, parse_duration_ms

COMPENSATE_PREFIX = "compensate:"
TIMEOUT_KINDS = ("schedule_to_close", "start_to_close", "heartbeat")
#: Key of an activity's own fairness key (the step's ``fairness_key``, evaluated when scheduled).
FAIRNESS_KEY = "fairness"
_TENANT = "tenant"  # state key of the instance's tenant (kflow.engine.core.TENANT)

#: Heartbeats are recorded at most this many times per heartbeat timeout: one closer than a
#: ``1/HEARTBEAT_RESOLUTION`` of the timeout after the last recorded one changes nothing.
HEARTBEAT_RESOLUTION = 10

#: Most ended activities remembered per instance (``state["ended"]``) to classify late results.
ENDED_WINDOW = 128


@dataclass(frozen=True)
class Limits:
    """Per-instance limits; a definitions view may carry its own as a ``limits`` attribute.

    Exceeding a pending-work limit fails the workflow with ``LimitExceeded``; an oversized payload
    fails the step that produced it (or rejects the signal that carried it).
    """

    max_pending_activities: int = 1_000
    max_pending_timers: int = 5_000
    max_pending_children: int = 1_000
    max_payload_bytes: int = 256 * 1024
    max_history_events: int = 50_000  # per run of a code workflow; continue_as_new starts afresh


DEFAULT_LIMITS = Limits()

#: Asked before a (non-local) attempt's task is dispatched, with ``(run, activity id, act)``: True
#: holds the task until the attempt's permits are granted (see :mod:`kflow.engine.limits`).
TASK_GATES: list[Callable[[Run, str, JSONDict], bool]] = []


class LimitExceeded(Exception):
    """Raised inside the engine when an instance would exceed one of its :class:`Limits`."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


def limits_of(defs: Any) -> Limits:
    found = getattr(defs, "limits", None)
    return found if isinstance(found, Limits) else DEFAULT_LIMITS


def payload_size(value: Any) -> int:
    return len(orjson.dumps(value))


def check_payload(run: Run, what: str, value: Any) -> None:
    size, limit = payload_size(value), limits_of(run.defs).max_payload_bytes
    if size > limit:
        raise LimitExceeded(f"expected {what} of at most {limit} bytes, but it is {size} bytes")


def check_pending(run: Run, table: str) -> None:
    lim = limits_of(run.defs)
    limit = {"activities": lim.max_pending_activities, "timers": lim.max_pending_timers,
             "children": lim.max_pending_children}[table]
    if len(run.state[table]) >= limit:
        raise LimitExceeded(f"expected at most {limit} pending {table} per instance, but one more was needed")


# -- policies ---------------------------------------------------------------------------------
def policies(run: Run, step_key: str, act: Optional[JSONDict] = None) -> tuple[Optional[RetrySpec], Optional[TimeoutSpec]]:
    """The retry policy and timeouts of an activity.

    A code workflow's activity carries its own (``act["policy"]``: ``{"retry": ..., "timeout": ...}``
    as JSON); a spec activity takes them from its task step, or from the step's compensation
    (``compensate:<step>``), falling back to the workflow's default retry policy.
    """
    if act is not None and act.get("thread") == "code":
        return _code_policies(orjson.dumps(act["policy"])) if "policy" in act else (None, None)
    c = run.compiled
    if step_key.startswith(COMPENSATE_PREFIX):
        step_id = step_key[len(COMPENSATE_PREFIX):]
        key, idx = c.where[step_id]
        comp = c.lists[key][idx].compensate
        return (comp.retry or c.spec.retry), comp.timeout
    key, idx = c.where[step_key]
    step = c.lists[key][idx]
    return (step.retry or c.spec.retry), step.timeout


@lru_cache(maxsize=1024)
def _code_policies(policy_json: bytes) -> tuple[Optional[RetrySpec], Optional[TimeoutSpec]]:
    policy = orjson.loads(policy_json)
    retry, timeout = policy.get("retry"), policy.get("timeout")
    return (RetrySpec.model_validate(retry) if retry is not None else None,
            TimeoutSpec.model_validate(timeout) if timeout is not None else None)


def retry_delay_ms(policy: RetrySpec, instance_id: str, activity_id: str, attempt: int) -> int:
    """Backoff before the attempt after ``attempt``: capped exponential, deterministic jitter."""
    initial = parse_duration_ms(policy.initial)
    cap = parse_duration_ms(policy.max_interval) if policy.max_interval is not None else 100 * initial
    delay = min(initial * policy.backoff ** (attempt - 1), cap)
    if policy.jitter:
        digest = hashlib.sha256(f"{instance_id}\x00{activity_id}\x00{attempt}".encode()).digest()
        unit = int.from_bytes(digest[:8], "big") / 2 ** 64  # in [0, 1)
        delay *= 1 + policy.jitter * (2 * unit - 1)
    return max(0, int(delay))


def _timeout_ms(timeouts: Optional[TimeoutSpec], kind: str) -> Optional[int]:
    value = getattr(timeouts, kind) if timeouts is not None else None
    return parse_duration_ms(value) if value is not None else None


# -- timers -----------------------------------------------------------------------------------
def start_timer(run: Run, thread: Optional[str], due: int, purpose: str, **extra: Any) -> str:
    check_pending(run, "timers")
    timer_id = f"t{run.next_seq()}"
    run.record(TimerStarted(timer_id=timer_id, due_ms=due, purpose=purpose))
    run.state["timers"][timer_id] = {"due": due, "thread": thread, "purpose": purpose, **extra}
    return timer_id


def _arm(run: Run, aid: str, act: JSONDict, kind: str, ms: Optional[int]) -> None:
    _arm_at(run, aid, act, kind, None if ms is None else run.now + ms)


def _arm_at(run: Run, aid: str, act: JSONDict, kind: str, due: Optional[int]) -> None:
    old = act["timers"].pop(kind, None)
    if old is not None:
        run.state["timers"].pop(old, None)
    if due is not None:
        act["timers"][kind] = start_timer(run, act["thread"], due, "activity_timeout", activity=aid, kind=kind)


def _cancel_timers(run: Run, act: JSONDict, keep: tuple[str, ...] = ()) -> None:
    for kind in list(act["timers"]):
        if kind not in keep:
            run.state["timers"].pop(act["timers"].pop(kind), None)


# -- lifecycle --------------------------------------------------------------------------------
def schedule(run: Run, aid: str, name: str, queue: str, input_: Any, thread: Optional[str], step_key: str,
             policy: Optional[JSONDict] = None, local: bool = False, priority: Optional[int] = None,
             fairness_key: Optional[str] = None) -> None:
    """Schedule attempt 1 of an activity with its timeouts. Raises :class:`LimitExceeded`.

    ``policy`` (code workflows) is the activity's own ``{"retry": ..., "timeout": ...}``. A
    ``local`` activity is recorded with the same events; its task is run by the engine process
    itself (see :func:`emit_task`). ``fairness_key`` goes on every task of the activity (default:
    the instance's tenant).
    """
    check_pending(run, "activities")
    check_payload(run, f"the input of activity '{name}'", input_)
    run.record(ActivityScheduled(activity_id=aid, name=name, queue=queue, input=input_, attempt=1))
    act: JSONDict = {"name": name, "queue": queue, "attempt": 1, "thread": thread, "step": step_key,
                     "input": input_, "phase": "scheduled", "timers": {}}
    if policy is not None:
        act["policy"] = policy
    if local:
        act["local"] = True
    if priority is not None:  # the step's or call's own level; without one, the instance's level applies
        act[PRIORITY] = priority
    if fairness_key is not None:
        act[FAIRNESS_KEY] = fairness_key
    run.state["activities"][aid] = act
    _, timeouts = policies(run, step_key, act)
    emit_task(run, aid, act, timeouts)
    _arm(run, aid, act, "schedule_to_close", _timeout_ms(timeouts, "schedule_to_close"))
    start_attempt(run, aid, act, timeouts)


def emit_task(run: Run, aid: str, act: JSONDict, timeouts: Optional[TimeoutSpec], gate: bool = True) -> None:
    """The task of ``act``'s current attempt, as data.

    A local task carries its ``start_to_close`` as the in-process bound of the run: the engine
    process runs it synchronously and feeds the outcome back within the same transaction, so no
    durable start-to-close or heartbeat timer is armed for it.
    """
    if act.get("local"):
        run.task(aid, act["name"], act["queue"], act["input"], act["attempt"], run.state["workflow"],
                 local=True, start_to_close_ms=_timeout_ms(timeouts, "start_to_close"))
    elif not (gate and any(held(run, aid, act) for held in TASK_GATES)):
        run.task(aid, act["name"], act["queue"], act["input"], act["attempt"], run.state["workflow"],
                 _reports_start(timeouts), priority=act.get(PRIORITY))
        # workers share a saturated queue fairly across this key; absent, the tenant's (auth off: none)
        run.tasks[-1].fairness_key = act.get(FAIRNESS_KEY) or run.state.get(_TENANT) or None


def _reports_start(timeouts: Optional[TimeoutSpec]) -> bool:
    """Whether the worker must report the attempt's start: only timeouts counted from it need it."""
    return timeouts is not None and (timeouts.start_to_close is not None or timeouts.heartbeat is not None)


def start_attempt(run: Run, aid: str, act: JSONDict, timeouts: Optional[TimeoutSpec]) -> None:
    if act.get("local") or act.get("waiting_permit"):
        return  # bounded in process by start_to_close; a local activity cannot heartbeat; a held task
        # is not running yet (its timers are armed when its permits are granted)
    _arm(run, aid, act, "start_to_close", _timeout_ms(timeouts, "start_to_close"))
    hb = _timeout_ms(timeouts, "heartbeat")
    _arm(run, aid, act, "heartbeat", hb)
    act.pop("beat", None)  # heartbeats count per attempt, from its (re)start
    if hb is not None:
        act["hb"] = hb


def on_started(run: Run, aid: str) -> None:
    """The worker reported the attempt started: ``start_to_close`` and ``heartbeat`` run from now.

    For a local activity the report comes from the engine itself: a local attempt it deferred
    (past its per-batch bounds) is due now, so its task is emitted again for the engine to run.
    """
    act = run.state["activities"][aid]
    act["phase"] = "started"
    _, timeouts = policies(run, act["step"], act)
    start_attempt(run, aid, act, timeouts)
    if act.get("local"):
        emit_task(run, aid, act, timeouts)


def on_heartbeat(run: Run, aid: str) -> None:
    """A heartbeat was recorded: the attempt's silence counts from now (the timer is left alone)."""
    run.state["activities"][aid]["beat"] = run.now


def heartbeat_due(act: JSONDict, timers: JSONDict, now: int) -> bool:
    """Whether a heartbeat is worth recording as ``HeartbeatRecorded``.

    Only attempts with an armed heartbeat timer record any, and only once a
    ``1/HEARTBEAT_RESOLUTION`` of the timeout has passed since the last recorded heartbeat (or
    the arming): at most that many events per timeout, however often the worker heartbeats, and
    the attempt's silence is known to within that resolution.
    """
    tid = act.get("timers", {}).get("heartbeat")
    if tid is None or tid not in timers or act.get("phase") == "backoff":
        return False
    hb = int(act["hb"])
    since = max(int(act.get("beat", 0)), int(timers[tid]["due"]) - hb)
    return now >= since + max(1, hb // HEARTBEAT_RESOLUTION)


def _heartbeat_deadline(act: JSONDict) -> Optional[int]:
    """When the attempt's silence reaches its heartbeat timeout, counted from its last recorded heartbeat."""
    beat = act.get("beat")
    return None if beat is None or "hb" not in act else int(beat) + int(act["hb"])


def retry_or_give_up(run: Run, aid: str, error_type: str, retryable: bool) -> bool:
    """After a failed or timed-out attempt: start a backoff timer and return True, or return False."""
    act = run.state["activities"][aid]
    policy, _ = policies(run, act["step"], act)
    attempt = act["attempt"] - act.get("base", 0)  # attempts since the first schedule, or since an incident's retry
    if (not retryable or policy is None or error_type in policy.non_retryable
            or (policy.max_attempts and attempt >= policy.max_attempts)):
        return False
    _cancel_timers(run, act, keep=("schedule_to_close",))
    act["phase"] = "backoff"
    due = run.now + retry_delay_ms(policy, run.instance_id, aid, attempt)
    act["timers"]["retry"] = start_timer(run, act["thread"], due, "retry", activity=aid)
    return True


def duration_text(value: Any) -> str:
    """A timeout as written in a spec (``"30s"``), or a number of seconds with its unit (``"1.5s"``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}s"
    return str(value)


def on_retry_timer(run: Run, aid: str) -> None:
    """The backoff elapsed: schedule the next attempt under the same activity id."""
    act = run.state["activities"][aid]
    act["timers"].pop("retry", None)
    act.pop("timed_out", None)
    act["attempt"] += 1
    act["phase"] = "scheduled"
    run.record(ActivityScheduled(activity_id=aid, name=act["name"], queue=act["queue"], input=act["input"],
                                 attempt=act["attempt"]))
    _, timeouts = policies(run, act["step"], act)
    emit_task(run, aid, act, timeouts)
    start_attempt(run, aid, act, timeouts)


def reopen(run: Run, aid: str, act: JSONDict, input_: Any) -> None:
    """Schedule the next attempt of an activity that had ended, under its id, with a fresh retry policy.

    Used when an incident is resolved by retry in a code workflow, whose await waits on the id.
    Attempt numbers go on from where they were (so a late report of an earlier attempt is still
    told apart); the retry policy counts from here (``base``), and ``schedule_to_close`` from now.
    """
    act = {**act, "input": input_, "base": act["attempt"], "phase": "backoff", "timers": {}}
    act.pop("timed_out", None)
    run.state["activities"][aid] = act
    _, timeouts = policies(run, act["step"], act)
    _arm(run, aid, act, "schedule_to_close", _timeout_ms(timeouts, "schedule_to_close"))
    on_retry_timer(run, aid)


def timeout_message(run: Run, act: JSONDict, kind: str) -> str:
    _, timeouts = policies(run, act["step"], act)
    return f"{kind} timeout of {duration_text(getattr(timeouts, kind))} elapsed (attempt {act['attempt']})"


def drop(run: Run, aid: str, cancel: bool = False) -> Optional[JSONDict]:
    """Forget an activity and its timers (final outcome, or its thread was cancelled).

    With ``cancel``, the worker running the current attempt is told to stop it.
    """
    act: Optional[JSONDict] = run.state["activities"].pop(aid, None)
    if act is not None:
        _cancel_timers(run, act)
        if cancel:
            run.cancel_task(aid, act)
    return act


def on_timeout(run: Run, aid: str, kind: str) -> tuple[bool, str]:
    """A timeout timer of ``aid`` fired: record it, stop the attempt, maybe retry.

    A heartbeat timer that fires while the last recorded heartbeat is younger than the timeout
    is re-armed for the instant the silence reaches it, and nothing else happens.

    Returns ``(pending, message)``: ``pending`` when the activity goes on (a retry is scheduled,
    or the heartbeat timer was re-armed); otherwise the caller ends the activity with
    ``ActivityTimeout`` and ``message``.
    """
    act = run.state["activities"][aid]
    act["timers"].pop(kind, None)
    deadline = _heartbeat_deadline(act) if kind == "heartbeat" else None
    if deadline is not None and deadline > run.now:
        _arm_at(run, aid, act, kind, deadline)
        return True, ""
    run.record(ActivityTimedOut(activity_id=aid, attempt=act["attempt"], kind=kind))
    message = timeout_message(run, act, kind)
    run.cancel_task(aid, act)
    retrying = kind != "schedule_to_close" and retry_or_give_up(run, aid, "ActivityTimeout", True)
    if retrying:
        act["timed_out"] = True  # its late result is STALE, not a redelivery of a recorded one
    return retrying, message


# -- late results -----------------------------------------------------------------------------
def note_ended(run: Run, before: JSONDict, body: AnyEvent) -> None:
    """Remember how the activities that the input event ``body`` (its model) ended, ended (``state["ended"]``, bounded).

    ``before`` is the activities table before the event. An activity whose only attempt's result was
    recorded needs no entry: any later result for it is a redelivery. The others (several
    attempts, or the last one timed out or no longer wanted) are kept as ``[attempt, recorded]``.
    A closed instance rejects every result anyway and forgets them.
    """
    st = run.state
    if st["status"] in Status.TERMINAL:
        st.pop("ended", None)
        return
    acts = st["activities"]
    gone = [aid for aid in before if aid not in acts]
    ended: JSONDict = st.get("ended") or {}
    for aid in [a for a in ended if a in acts]:  # an id scheduled again (a new run) is pending, not ended
        del ended[aid]
    result = body if isinstance(body, (ActivityCompleted, ActivityFailed)) else None
    for aid in gone:
        attempt = before[aid]["attempt"]
        recorded = result is not None and result.activity_id == aid and result.attempt == attempt
        if recorded and attempt == 1:
            continue
        ended.pop(aid, None)  # re-inserted last: the window keeps the most recent
        ended[aid] = [attempt, recorded]
    for aid in list(ended)[:-ENDED_WINDOW]:
        del ended[aid]
    if ended:
        st["ended"] = ended
    else:
        st.pop("ended", None)


def late_result(state: JSONDict, aid: str, attempt: int) -> Optional[tuple[str, str]]:
    """``(code, reason)`` rejecting a result for ``aid``/``attempt`` that is not the pending one, or None.

    ``STALE``: the attempt was superseded by a later one, timed out, or is no longer wanted.
    ``DUPLICATE``: the attempt's result was already recorded (a redelivery), or the activity is
    unknown (it ended long ago, or never existed).
    """
    act = state["activities"].get(aid)
    if act is None:
        return _ended_verdict(state.get("ended", {}).get(aid), aid, attempt)
    current = act["attempt"]
    if act.get("phase") != "backoff":
        if attempt == current:
            return None
        return RejectCode.STALE, f"expected a result for attempt {current} of '{aid}', but got attempt {attempt}"
    if attempt == current and not act.get("timed_out"):
        return (RejectCode.DUPLICATE, f"expected a result for attempt {current + 1} (after a backoff) of '{aid}', "
                f"but got attempt {attempt} again, whose failure is already recorded (a redelivery)")
    why = " (it timed out)" if attempt == current else ""
    return (RejectCode.STALE, f"expected a result for attempt {current + 1} (after a backoff) of '{aid}', "
            f"but got attempt {attempt}{why}")


def _ended_verdict(entry: Optional[list[Any]], aid: str, attempt: int) -> tuple[str, str]:
    if entry is None:
        return (RejectCode.DUPLICATE, f"expected a pending activity '{aid}', but it has no pending attempt "
                "(its result was already recorded)")
    last, recorded = entry
    if attempt == last and recorded:
        return (RejectCode.DUPLICATE, f"expected a pending activity '{aid}', but its attempt {attempt} "
                "was already recorded (a redelivery)")
    if attempt == last:
        return (RejectCode.STALE, f"expected a pending activity '{aid}', but its attempt {attempt} was given up "
                "(it timed out or is no longer wanted)")
    return (RejectCode.STALE, f"expected a result for attempt {last} of '{aid}' (its last), "
            f"but got attempt {attempt}")
