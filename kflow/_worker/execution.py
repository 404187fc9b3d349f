"""Run activity functions: plain ones in a thread pool, ``async`` ones on one event loop thread.

Each :class:`Job` runs with its :class:`ActivityContext` bound (so ``heartbeat()`` and
``current_task()`` work), hands its outcome to the ``report`` callback on the thread that ran it,
and is then put on the ``finished`` queue, which the worker loop drains to free the slot.
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

from kflow._worker.context import ActivityContext, bind, unbind
from kflow._worker.output import Out, Record
from kflow._worker.registry import ActivityDefinition
from kflow.model.messages import Task

__all__ = ["Executors", "Job"]

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
    outcome: str = ""  # the ``outcome`` metric label, set by the report
    duration: float = 0.0
    unsent: Out | None = None  # set when the producer queue was full; the loop produces it
    reported: bool = False  # False if cancelled at shutdown: nothing was produced


class Executors:
    """The thread pool and event loop activities run on, created only for the kinds registered."""

    def __init__(self, concurrency: int, has_sync: bool, has_async: bool, report: Report) -> None:
        self.finished: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._report = report
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="kflow-activity") if has_sync else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
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
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._cancel_all)
            self._loop_thread.join(5)

    def _run_sync(self, job: Job) -> None:
        token = bind(job.ctx)
        started = time.monotonic()
        try:
            result = job.definition.fn(job.task.input)
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
            result = await job.definition.fn(job.task.input)
        except asyncio.CancelledError:
            raise  # shutdown: nothing is reported and the task is re-delivered
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

    def _cancel_all(self) -> None:
        assert self._loop is not None
        for t in asyncio.all_tasks(self._loop):
            t.cancel()
        self._loop.call_soon(self._loop.stop)
