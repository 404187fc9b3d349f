"""Activity attempts: scheduling, retry backoff, timeouts and limits, as durable timers in the state.

An activity record in ``state["activities"]`` lives from its first schedule until its final
outcome; it carries the current ``attempt``, its ``phase`` (``scheduled``, ``started`` or
``backoff``) and the ids of its timers. Every timer is an ordinary durable timer in
``state["timers"]`` whose ``purpose`` says what firing means: ``retry`` schedules the next
attempt, ``activity_timeout`` (with its ``kind``) ends the current attempt with ``ActivityTimeout``.
``schedule_to_close`` spans every attempt; ``start_to_close`` and ``heartbeat`` belong to one attempt
and are re-armed under a fresh timer id (never by moving a due time) so the processor's timer index
stays a plain diff of ids. Retry delays and jitter are pure functions of the instance id, activity
id and attempt, so replay reproduces them. Deciding what the final outcome means for the workflow
(a thread, a catch route, a saga step) is the interpreter's job, not this module's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import orjson

from kflow.engine.run import Run
from kflow.model.messages import JSONDict
from kflow.model.spec import RetrySpec, TimeoutSpec, parse_duration_ms

COMPENSATE_PREFIX = "compensate:"
TIMEOUT_KINDS = ("schedule_to_close", "start_to_close", "heartbeat")


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
    run.emit("TimerStarted", {"timer_id": timer_id, "due_ms": due, "purpose": purpose})
    run.state["timers"][timer_id] = {"due": due, "thread": thread, "purpose": purpose, **extra}
    return timer_id


def _arm(run: Run, aid: str, act: JSONDict, kind: str, ms: Optional[int]) -> None:
    old = act["timers"].pop(kind, None)
    if old is not None:
        run.state["timers"].pop(old, None)
    if ms is not None:
        act["timers"][kind] = start_timer(run, act["thread"], run.now + ms, "activity_timeout",
                                          activity=aid, kind=kind)


def _cancel_timers(run: Run, act: JSONDict, keep: tuple[str, ...] = ()) -> None:
    for kind in list(act["timers"]):
        if kind not in keep:
            run.state["timers"].pop(act["timers"].pop(kind), None)


# -- lifecycle --------------------------------------------------------------------------------
def schedule(run: Run, aid: str, name: str, queue: str, input_: Any, thread: Optional[str], step_key: str,
             policy: Optional[JSONDict] = None) -> None:
    """Schedule attempt 1 of an activity with its timeouts. Raises :class:`LimitExceeded`.

    ``policy`` (code workflows) is the activity's own ``{"retry": ..., "timeout": ...}``.
    """
    check_pending(run, "activities")
    check_payload(run, f"the input of activity '{name}'", input_)
    run.emit("ActivityScheduled", {"activity_id": aid, "name": name, "queue": queue, "input": input_, "attempt": 1})
    act: JSONDict = {"name": name, "queue": queue, "attempt": 1, "thread": thread, "step": step_key,
                     "input": input_, "phase": "scheduled", "timers": {}}
    if policy is not None:
        act["policy"] = policy
    run.state["activities"][aid] = act
    _, timeouts = policies(run, step_key, act)
    run.task(aid, name, queue, input_, 1, run.state["workflow"], _reports_start(timeouts))
    _arm(run, aid, act, "schedule_to_close", _timeout_ms(timeouts, "schedule_to_close"))
    _start_attempt(run, aid, act, timeouts)


def _reports_start(timeouts: Optional[TimeoutSpec]) -> bool:
    """Whether the worker must report the attempt's start: only timeouts counted from it need it."""
    return timeouts is not None and (timeouts.start_to_close is not None or timeouts.heartbeat is not None)


def _start_attempt(run: Run, aid: str, act: JSONDict, timeouts: Optional[TimeoutSpec]) -> None:
    _arm(run, aid, act, "start_to_close", _timeout_ms(timeouts, "start_to_close"))
    hb = _timeout_ms(timeouts, "heartbeat")
    _arm(run, aid, act, "heartbeat", hb)
    if hb is not None:
        act["hb"] = hb


def on_started(run: Run, aid: str) -> None:
    """The worker reported the attempt started: ``start_to_close`` and ``heartbeat`` run from now."""
    act = run.state["activities"][aid]
    act["phase"] = "started"
    _, timeouts = policies(run, act["step"], act)
    _start_attempt(run, aid, act, timeouts)


def on_heartbeat(run: Run, aid: str) -> None:
    act = run.state["activities"][aid]
    _, timeouts = policies(run, act["step"], act)
    _arm(run, aid, act, "heartbeat", _timeout_ms(timeouts, "heartbeat"))


def heartbeat_due(act: JSONDict, timers: JSONDict, now: int) -> bool:
    """Whether a heartbeat is worth recording: at least half the heartbeat timeout has elapsed.

    Recording every heartbeat would flood the history; re-arming at half-time keeps the timeout
    honest (a worker that heartbeats at all within the timeout never times out) with at most two
    events per timeout interval.
    """
    tid = act.get("timers", {}).get("heartbeat")
    if tid is None or tid not in timers or act.get("phase") == "backoff":
        return False
    return bool(now >= timers[tid]["due"] - act["hb"] // 2)


def retry_or_give_up(run: Run, aid: str, error_type: str, retryable: bool) -> bool:
    """After a failed or timed-out attempt: start a backoff timer and return True, or return False."""
    act = run.state["activities"][aid]
    policy, _ = policies(run, act["step"], act)
    attempt = act["attempt"]
    if (not retryable or policy is None or error_type in policy.non_retryable
            or (policy.max_attempts and attempt >= policy.max_attempts)):
        return False
    _cancel_timers(run, act, keep=("schedule_to_close",))
    act["phase"] = "backoff"
    due = run.now + retry_delay_ms(policy, run.instance_id, aid, attempt)
    act["timers"]["retry"] = start_timer(run, act["thread"], due, "retry", activity=aid)
    return True


def on_retry_timer(run: Run, aid: str) -> None:
    """The backoff elapsed: schedule the next attempt under the same activity id."""
    act = run.state["activities"][aid]
    act["timers"].pop("retry", None)
    act["attempt"] += 1
    act["phase"] = "scheduled"
    run.emit("ActivityScheduled", {"activity_id": aid, "name": act["name"], "queue": act["queue"],
                                    "input": act["input"], "attempt": act["attempt"]})
    _, timeouts = policies(run, act["step"], act)
    run.task(aid, act["name"], act["queue"], act["input"], act["attempt"], run.state["workflow"],
             _reports_start(timeouts))
    _start_attempt(run, aid, act, timeouts)


def timeout_message(run: Run, act: JSONDict, kind: str) -> str:
    _, timeouts = policies(run, act["step"], act)
    return f"{kind} timeout of {getattr(timeouts, kind)} elapsed (attempt {act['attempt']})"


def drop(run: Run, aid: str, cancel: bool = False) -> Optional[JSONDict]:
    """Forget an activity and its timers (final outcome, or its thread was cancelled).

    With ``cancel``, the worker running the current attempt is told to stop it.
    """
    act = run.state["activities"].pop(aid, None)
    if act is not None:
        _cancel_timers(run, act)
        if cancel:
            run.cancel_task(aid, act)
    return act


def on_timeout(run: Run, aid: str, kind: str) -> tuple[bool, str]:
    """A timeout timer of ``aid`` fired: record it, stop the attempt, maybe retry.

    Returns ``(retrying, message)``; when not retrying the caller ends the activity with
    ``ActivityTimeout`` and ``message``.
    """
    act = run.state["activities"][aid]
    act["timers"].pop(kind, None)
    run.emit("ActivityTimedOut", {"activity_id": aid, "attempt": act["attempt"], "kind": kind})
    message = timeout_message(run, act, kind)
    run.cancel_task(aid, act)
    retrying = kind != "schedule_to_close" and retry_or_give_up(run, aid, "ActivityTimeout", True)
    return retrying, message
