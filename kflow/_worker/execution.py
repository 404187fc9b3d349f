"""Run activity functions: plain ones in a thread pool, ``async`` ones on one event loop thread.

Each :class:`Job` runs with its :class:`ActivityContext` bound (so ``heartbeat()`` and
``current_task()`` work), reports its start, hands its outcome to the ``report`` callback on the
thread that ran it, and is then put on the ``finished`` queue, which the worker loop drains to
free the slot. :meth:`Executors.cancel` is how the engine's cancel reaches a running attempt: the
context is marked (the next heartbeat raises) and an ``async`` activity's own asyncio task is
cancelled. That task is separate from the job's wrapper task, so a cancelled activity is still
reported, while a worker shutdown (which cancels the wrappers) reports nothing.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message

from kflow._worker.context import ActivityContext, bind, unbind
from kflow._worker.output import Out, Record
from kflow.model.messages import Task
from kflow.streams.activities import ActivityDefinition

__all__ = ["Executors", "Job"]

_CLOSE_GRACE = 2.0  # seconds cancelled async activities get to end when the executors close

#: ``report(job, result, error)``: called on the activity's thread when it returns or raises.
Report = Callable[["Job", Any, "BaseException | None"], None]


@dataclass(slots=True, eq=False)
class Job:
    """One activity attempt from dispatch until its slot is freed."""

    definition: ActivityDefinition
    task: Task
    queue: str
    record: Record
    ctx: ActivityContext
    msg: Message | None = None  # the consumed task record (its value and origin go to the DLQ if need be)
    outcome: str = ""  # the ``outcome`` metric label, set by the report
    duration: float = 0.0
    unsent: Out | None = None  # set when the producer queue was full; the loop produces it
    reported: bool = False  # False if cancelled at shutdown: nothing was produced
    inner: asyncio.Future[Any] | None = None  # an async activity's own task, once it runs
    received_us: int = 0  # wall clock when the task was consumed (hop stamps)
    level: int = 3  # priority level of the topic the task came from (3: normal)

    @property
    def attempt_key(self) -> tuple[str, str, int]:
        """``(instance id, activity id, attempt)``: what a cancel task names."""
        t = self.task
        return t.instance_id, t.activity_id, t.attempt


class Executors:
    """The thread pool and event loop activities run on, created only for the kinds registered."""

    def __init__(self, concurrency: int, has_sync: bool, has_async: bool, report: Report) -> None:
        self.finished: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._report = report
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="kflow-activity") if has_sync else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._closing = False
        if has_async:
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=self._loop.run_forever, name="kflow-activity-loop",
                                                 daemon=True)
            self._loop_thread.start()

    def start(self, job: Job) -> None:
        """Start ``job`` on the executor of its kind; returns at once."""
        if job.definition.is_async:
            assert self._loop is not None, "async activity without an event loop"
            asyncio.run_coroutine_threadsafe(self._run_async(job), self._loop)
        else:
            assert self._pool is not None, "sync activity without a thread pool"
            self._pool.submit(self._run_sync, job)

    def cancel(self, job: Job) -> None:
        """Tell a started ``job`` the engine cancelled it; returns at once.

        Its context is marked cancelled, so its next ``heartbeat()`` raises (or, if it has not
        begun yet, it is reported cancelled without running); an async activity's task is also
        cancelled at its current ``await``. A sync activity that never heartbeats runs on.
        """
        job.ctx.cancel()
        if job.definition.is_async and self._loop is not None:
            self._loop.call_soon_threadsafe(self._cancel_inner, job)

    def next_finished(self, timeout: float) -> Job | None:
        """The next finished job, waiting up to ``timeout`` seconds (0: do not wait)."""
        try:
            return self.finished.get(timeout=timeout) if timeout > 0 else self.finished.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        """Abandon what still runs: queued sync jobs are cancelled, async ones too.

        A sync activity already running cannot be interrupted; its thread ends when it returns.
        """
        self._closing = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._cancel_all)
            self._loop_thread.join(5)

    def _run_sync(self, job: Job) -> None:
        token = bind(job.ctx)
        started = time.monotonic()
        try:
            job.ctx.begin()
            result = job.definition.call(job.task.input)
        except Exception as exc:  # the activity's failure is reported, not raised
            self._done(job, started, None, exc)
        else:
            self._done(job, started, result, None)
        finally:
            unbind(token)
            self.finished.put(job)

    async def _run_async(self, job: Job) -> None:
        token = bind(job.ctx)  # each asyncio task runs in its own copy of the context
        started = time.monotonic()
        try:
            job.ctx.begin()
            # The activity runs in a task of its own (inheriting the bound context), so the
            # engine's cancel interrupts the activity and not this wrapper.
            job.inner = asyncio.ensure_future(job.definition.call(job.task.input))
            result = await job.inner
        except asyncio.CancelledError as exc:
            if self._closing or not job.ctx.cancelled:
                raise  # shutdown: nothing is reported and the task is re-delivered
            self._done(job, started, None, exc)  # cancelled by the engine: reported
        except Exception as exc:
            self._done(job, started, None, exc)
        else:
            self._done(job, started, result, None)
        finally:
            unbind(token)
            self.finished.put(job)

    def _done(self, job: Job, started: float, result: Any, error: BaseException | None) -> None:
        job.duration = time.monotonic() - started
        self._report(job, result, error)

    @staticmethod
    def _cancel_inner(job: Job) -> None:
        """Event loop thread: cancel an async activity's task (before it began, ``begin`` raises)."""
        if job.inner is not None and not job.inner.done():
            job.inner.cancel()

    def _cancel_all(self) -> None:
        """Event loop thread: cancel every task, and stop the loop once they ended (or after a grace)."""
        loop = self._loop
        assert loop is not None
        tasks = asyncio.all_tasks(loop)
        for t in tasks:
            t.cancel()
        if not tasks:
            loop.stop()
            return
        asyncio.gather(*tasks, return_exceptions=True).add_done_callback(lambda _: loop.stop())
        loop.call_later(_CLOSE_GRACE, loop.stop)  # an activity that ignores its cancellation
