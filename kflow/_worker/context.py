"""The running activity's context: which task it serves, and how it heartbeats.

Each activity runs with a :class:`ActivityContext` in a ``ContextVar``, set by the worker in the
thread (sync activities) or task (async activities) that runs it, so :func:`heartbeat` and
:func:`current_task` need no arguments. Heartbeats are produced straight from the calling thread
(the Kafka producer is thread-safe); the worker's loop adds automatic heartbeats for activities
that have been quiet for a whole heartbeat interval.
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

__all__ = ["ActivityContext", "NotInActivityError", "current_task", "heartbeat"]


class NotInActivityError(KflowError):
    """``heartbeat()`` or ``current_task()`` was called outside a running activity."""

    def __init__(self, function: str) -> None:
        self.function = function
        super().__init__(f"{function}() must be called from inside an activity run by a kflow Worker")


@dataclass(slots=True, eq=False)
class ActivityContext:
    """One running attempt of one activity.

    Attributes:
        task: The task being executed.
        send: Produces a heartbeat command (installed by the worker; thread-safe).
        started: ``time.monotonic()`` when the activity started.
        last_beat: ``time.monotonic()`` of the last heartbeat (or the start).
        details: The details of the last heartbeat, repeated by automatic heartbeats.
        beats: Heartbeats sent so far (makes command ids unique).
    """

    task: Task
    send: Callable[[Command], None]
    started: float = field(default_factory=time.monotonic)
    last_beat: float = 0.0
    details: JSONValue = None
    beats: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.last_beat = self.started

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

    Args:
        details: A JSON value describing progress (kept by the engine with the attempt).

    Raises:
        NotInActivityError: when no activity is running in this thread or task.
        ValueError: when ``details`` is not JSON-serialisable.
    """
    _context("heartbeat").beat(details)


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
