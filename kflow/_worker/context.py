"""The running activity's context: which task it serves, how it heartbeats, and whether it was cancelled.

Each activity runs with a :class:`ActivityContext` in a ``ContextVar``, set by the worker in the
thread (sync activities) or task (async activities) that runs it, so :func:`heartbeat` and
:func:`current_task` need no arguments. The ``StartActivity`` report and heartbeats are produced
straight from the calling thread (the Kafka producer is thread-safe); the worker's loop adds
automatic heartbeats for activities that have been quiet for a whole heartbeat interval. When
the engine cancels the attempt, the worker loop marks the context cancelled and the activity's
next :func:`heartbeat` raises :class:`ActivityCancelledError`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from kflow.model.errors import KflowError
from kflow.model.messages import Command, JSONValue, Task

__all__ = ["ActivityCancelledError", "ActivityContext", "NotInActivityError", "current_task", "heartbeat"]


class NotInActivityError(KflowError):
    """``heartbeat()`` or ``current_task()`` was called outside a running activity."""

    def __init__(self, function: str) -> None:
        self.function = function
        super().__init__(f"{function}() must be called from inside an activity run by a kflow Worker")


class ActivityCancelledError(KflowError):
    """The engine no longer wants this activity attempt; raised by :func:`heartbeat` inside it.

    The engine cancels an attempt when its workflow is cancelled, terminated or closed, when its
    ``parallel`` branch is abandoned, or when the attempt timed out. Let it propagate (clean up in
    ``finally``): the worker reports the attempt as a non-retryable ``Cancelled`` failure, which the
    engine records and ignores, since it has already moved on.

    Attributes:
        activity_id: The cancelled activity's id.
        attempt: The cancelled attempt.
        name: The activity's name.
    """

    def __init__(self, activity_id: str, attempt: int, name: str) -> None:
        self.activity_id, self.attempt, self.name = activity_id, attempt, name
        super().__init__(f"activity '{name}' ({activity_id}, attempt {attempt}) was cancelled by the engine")


@dataclass(slots=True, eq=False)
class ActivityContext:
    """One running attempt of one activity.

    Attributes:
        task: The task being executed.
        send: Produces a start or heartbeat command (installed by the worker; thread-safe).
        started: ``time.monotonic()`` when the activity started (or was fetched, until it starts).
        last_beat: ``time.monotonic()`` of the last heartbeat (or the start).
        details: The details of the last heartbeat, repeated by automatic heartbeats.
        beats: Heartbeats sent so far (makes command ids unique).
        cancelled: Set (by the worker loop) once the engine cancelled this attempt; never cleared.
    """

    task: Task
    send: Callable[[Command], None]
    started: float = field(default_factory=time.monotonic)
    last_beat: float = 0.0
    details: JSONValue = None
    beats: int = 0
    cancelled: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.last_beat = self.started

    def begin(self) -> None:
        """The attempt starts executing now: report ``StartActivity`` (fire and forget) when the
        task asks for it (``report_start``: it has a start-to-close or heartbeat timeout).

        The engine counts the attempt's ``start_to_close`` and ``heartbeat`` timeouts from this
        report. It is produced before the attempt's result, by the same idempotent producer and
        with the same key, so the engine always sees the start first.

        Raises:
            ActivityCancelledError: the attempt was cancelled before it started; nothing is sent.
        """
        self.check()
        t = self.task
        if t.report_start:  # only attempts with start_to_close or heartbeat timeouts need it
            self.send(Command(
                type="StartActivity",
                instance_id=t.instance_id,
                data={"activity_id": t.activity_id, "attempt": t.attempt},
                command_id=f"{t.activity_id}/{t.attempt}/start",
                ts=int(time.time() * 1000),
            ))
        with self._lock:
            self.started = self.last_beat = time.monotonic()

    def cancel(self) -> None:
        """Mark the attempt cancelled (worker loop thread); the next :meth:`check` raises."""
        self.cancelled = True

    def check(self) -> None:
        """Raise :class:`ActivityCancelledError` if the engine cancelled this attempt."""
        if self.cancelled:
            t = self.task
            raise ActivityCancelledError(t.activity_id, t.attempt, t.name)

    def beat(self, details: JSONValue, *, automatic: bool = False) -> None:
        """Build and send one ``HeartbeatActivity`` command.

        Raises:
            ValueError: ``details`` is not JSON-serialisable (manual heartbeats only).
        """
        with self._lock:
            self.beats += 1
            n = self.beats
            if automatic:
                details = self.details
        t = self.task
        cmd = Command(
            type="HeartbeatActivity",
            instance_id=t.instance_id,
            data={"activity_id": t.activity_id, "attempt": t.attempt, "details": details},
            command_id=f"{t.activity_id}/{t.attempt}/heartbeat/{n}",
            ts=int(time.time() * 1000),
        )
        self.send(cmd)  # encodes first, so bad details raise before they are remembered
        with self._lock:
            self.details = details
            self.last_beat = time.monotonic()

    def due(self, now: float, interval: float) -> bool:
        """True if no heartbeat was sent for a whole ``interval`` (seconds)."""
        return now - self.last_beat >= interval


_current: ContextVar[ActivityContext | None] = ContextVar("kflow_activity", default=None)


def _context(function: str) -> ActivityContext:
    ctx = _current.get()
    if ctx is None:
        raise NotInActivityError(function)
    return ctx


def heartbeat(details: Any = None) -> None:
    """Tell the engine the current activity is alive, optionally with progress ``details``.

    Call it from inside an activity (sync or async). The worker also heartbeats automatically
    every ``heartbeat_interval_ms`` while an activity runs, repeating the last details.

    A heartbeat is also where an activity learns that the engine cancelled its attempt (the
    workflow was cancelled or closed, its branch abandoned, or the attempt timed out): the call
    raises :class:`ActivityCancelledError` instead of sending. An ``async`` activity is
    additionally interrupted at its current ``await`` (``asyncio.CancelledError``); a plain
    function that never heartbeats runs to completion and its result is ignored by the engine.

    Args:
        details: A JSON value describing progress (kept by the engine with the attempt).

    Raises:
        ActivityCancelledError: the engine cancelled this attempt; nothing is sent.
        NotInActivityError: when no activity is running in this thread or task.
        ValueError: when ``details`` is not JSON-serialisable.
    """
    ctx = _context("heartbeat")
    ctx.check()
    ctx.beat(details)


def current_task() -> Task:
    """Return the task the calling activity is executing.

    Raises:
        NotInActivityError: when no activity is running in this thread or task.
    """
    return _context("current_task").task


def bind(ctx: ActivityContext) -> Any:
    """Make ``ctx`` current; returns the token for :func:`unbind`."""
    return _current.set(ctx)


def unbind(token: Any) -> None:
    _current.reset(token)
