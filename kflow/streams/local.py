"""Local activities: the engine runs short activities itself, inside the transaction that scheduled them.

The pure engine emits a local attempt as data (a :class:`~kflow.model.messages.Task` with
``local=True``); the lane hands it to :class:`LocalRuns`, which runs the function synchronously
(a sync function on a private daemon thread, an async one on a private event loop, either bounded
by the attempt's ``start_to_close``) and feeds the outcome back through ``decide`` as a
``CompleteActivity`` or ``FailActivity`` command for the same instance in the same batch, again
while the instance produces local tasks. The events are those of any activity, so history, replay
and the read side see no difference, and local tasks never reach a task topic.

Ordering and bounds: a batch runs at most :data:`MAX_RUNS_PER_INSTANCE` local attempts per
instance and spends at most a quarter of the transaction timeout on local runs; an attempt past
either bound is *deferred*: a ``StartActivity`` command for it goes to the ``commands`` topic in
the same transaction, and deciding it (in a later batch) emits the task again. A crash loses
nothing: the decision that scheduled an attempt and the attempt's outcome commit together or not
at all, so an aborted batch runs its local activities again when it is redone (execution is
at-least-once, recording exactly once). Runs happen under the engine's decide lock: a slow local
activity holds up the engine, which is why they are for short work.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Optional

import orjson

from kflow.converter import ConversionError, to_json
from kflow.model.errors import KflowError, NonRetryableError
from kflow.model.messages import Command, Task
from kflow.streams.activities import ActivityDefinition, build_registry

__all__ = ["MAX_RUNS_PER_INSTANCE", "LocalActivities", "LocalRuns", "UNKNOWN_ACTIVITY", "local_activities"]

log = logging.getLogger("kflow.engine")

#: Most local attempts one batch runs for one instance; the next one is deferred to a later batch.
MAX_RUNS_PER_INSTANCE = 100
#: Error type of a local attempt naming an activity this engine does not have (non-retryable).
UNKNOWN_ACTIVITY = "UnknownActivity"


# -- where the functions come from -----------------------------------------------------------------
class LocalActivities:
    """The ``@kflow.activity`` functions of some modules, found by name (and queue) for local runs."""

    def __init__(self, modules: str, registry: dict[str, dict[str, ActivityDefinition]]) -> None:
        self.modules = modules
        self._by_key = {(q, n): d for q, acts in registry.items() for n, d in acts.items()}
        self._by_name: dict[str, list[ActivityDefinition]] = {}
        for d in self._by_key.values():
            self._by_name.setdefault(d.name, []).append(d)

    @classmethod
    def load(cls, modules: str) -> LocalActivities:
        """Import the comma-separated ``modules`` and collect their activities.

        Raises:
            KflowError: a module does not import, or two functions claim one name on one queue.
        """
        names = [m.strip() for m in modules.split(",") if m.strip()]
        loaded = []
        for name in names:
            try:
                loaded.append(importlib.import_module(name))
            except Exception as e:  # what the user module raised is the message
                raise KflowError(f"local activities: cannot import module '{name}': {type(e).__name__}: {e}") from e
        return cls(modules, build_registry(loaded) if loaded else {})

    def find(self, name: str, queue_: str) -> tuple[Optional[ActivityDefinition], str]:
        """The definition serving ``name`` (on ``queue_`` first), or None and why not."""
        found = self._by_key.get((queue_, name))
        if found is not None:
            return found, ""
        claims = self._by_name.get(name, [])
        if len(claims) == 1:
            return claims[0], ""
        if claims:
            queues = ", ".join(sorted(d.queue for d in claims))
            return None, (f"activity '{name}' is registered on several queues ({queues}) but not on '{queue_}': "
                          "give the task the queue whose function it should run")
        where = f"the modules '{self.modules}'" if self.modules else "no modules (KFLOW_ACTIVITIES is empty)"
        return None, (f"activity '{name}' is not available for local execution in this engine, which loaded "
                      f"{where}: start the engine with --activities MODULE")

    def __len__(self) -> int:
        return len(self._by_key)


_LOADED: dict[str, LocalActivities] = {}
_LOADED_LOCK = threading.Lock()


def local_activities(modules: str) -> LocalActivities:
    """The activities of ``modules``, imported once per process (``EngineConfig.activities``)."""
    with _LOADED_LOCK:
        found = _LOADED.get(modules)
        if found is None:
            found = _LOADED[modules] = LocalActivities.load(modules)
        return found


# -- running one function with a time bound ----------------------------------------------------------
class _Runner:
    """Runs functions off the calling thread so each run can be bounded.

    Sync functions run on daemon threads fed from one queue; a run that outlives its bound keeps
    its thread (Python cannot stop it), so a fresh thread is started to serve the next runs. Async
    functions run on one private event loop; a run past its bound is cancelled.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[Any], Any], Any, Future[Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def run(self, d: ActivityDefinition, arg: Any, timeout_s: float) -> Any:
        """``d.call(arg)``'s result; raises what it raised, or :class:`FutureTimeout` past ``timeout_s``."""
        fut: Future[Any]
        if d.is_async:
            fut = asyncio.run_coroutine_threadsafe(d.call(arg), self._event_loop())
        else:
            fut = Future()
            self._ensure_thread()
            self._jobs.put((d.call, arg, fut))
        try:
            return fut.result(timeout_s)
        except FutureTimeout:
            fut.cancel()
            if not d.is_async:
                self._spawn()  # the stuck thread stays busy; the next run gets a fresh one
            raise

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._threads == 0:
                self._spawn_locked()

    def _spawn(self) -> None:
        with self._lock:
            self._spawn_locked()

    def _spawn_locked(self) -> None:
        self._threads += 1
        threading.Thread(target=self._serve, name=f"kflow-local-{self._threads}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, arg, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(arg))
            except BaseException as e:  # the activity's error is its outcome
                fut.set_exception(e)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="kflow-local-loop", daemon=True).start()
                self._loop = loop
            return self._loop


_RUNNER = _Runner()


@dataclass(frozen=True)
class Outcome:
    """How one local attempt ended: a result, or an error type, message and retryability."""

    result: Any = None
    error_type: Optional[str] = None
    message: str = ""
    retryable: bool = True

    def command(self, task: Task, now: int) -> Command:
        """The ``CompleteActivity`` / ``FailActivity`` command reporting this outcome."""
        cid = f"{task.activity_id}/{task.attempt}/local"
        base = {"activity_id": task.activity_id, "attempt": task.attempt}
        if self.error_type is None:
            return Command("CompleteActivity", task.instance_id, {**base, "result": self.result}, cid, now)
        return Command("FailActivity", task.instance_id, {**base, "error_type": self.error_type, "message": self.message,
                                                          "retryable": self.retryable}, cid, now)


def _failure(error: BaseException) -> Outcome:
    """The same classification a worker applies to an activity's exception."""
    if isinstance(error, NonRetryableError):
        return Outcome(error_type=str(error.type), message=str(error.message), retryable=False)
    typed, retryable = getattr(error, "type", None), getattr(error, "retryable", None)
    if isinstance(typed, str) and typed and isinstance(retryable, bool):
        return Outcome(error_type=typed, message=str(getattr(error, "message", None) or error), retryable=retryable)
    return Outcome(error_type=type(error).__name__, message=str(error) or repr(error), retryable=True)


def run_local(activities: LocalActivities, task: Task, timeout_ms: int) -> Outcome:
    """Run one local attempt to its outcome; never raises for what the activity does."""
    d, why = activities.find(task.name, task.queue)
    if d is None:
        return Outcome(error_type=UNKNOWN_ACTIVITY, message=why, retryable=False)
    try:
        result = _RUNNER.run(d, task.input, timeout_ms / 1000)
    except FutureTimeout:
        return Outcome(error_type="ActivityTimeout", retryable=True,
                       message=f"start_to_close timeout of {timeout_ms / 1000:g}s elapsed "
                               f"(attempt {task.attempt}, run in the engine)")
    except Exception as e:
        return _failure(e)
    try:  # the JSON document the history records
        return Outcome(result=orjson.loads(orjson.dumps(to_json(result, f"the result of activity '{task.name}'"))))
    except (TypeError, ConversionError) as e:
        return Outcome(error_type="InvalidResult", retryable=False,
                       message=f"activity '{task.name}' returned a value that is not JSON-serialisable: {e}")


# -- one batch's local runs ------------------------------------------------------------------------
Decide = Callable[[Command], None]


class LocalRuns:
    """The local runs of one batch: runs tasks, feeds their outcomes back, defers past the bounds.

    Args:
        activities: Where the functions come from.
        now: The batch's clock reading (ms): the time of the commands fed back.
        budget_ms: Wall time this batch may spend on local runs; later tasks are deferred.
        cap_ms: The longest one run may take (its ``start_to_close``, when shorter, or this).
    """

    def __init__(self, activities: LocalActivities, now: int, budget_ms: int, cap_ms: int) -> None:
        self.activities, self.now, self.cap_ms = activities, now, cap_ms
        self.deadline = time.monotonic() + budget_ms / 1000
        self.runs: Counter[str] = Counter()
        self.deferred = 0
        self._queue: deque[tuple[Task, Decide, Decide]] = deque()
        self._draining = False

    def submit(self, tasks: list[Task], decide: Decide, defer: Decide) -> None:
        """Run ``tasks`` (and the local tasks their outcomes lead to) before returning.

        ``decide`` decides a command for the same instance in this batch; ``defer`` produces a
        command to the ``commands`` topic in this batch's transaction. Called again from inside
        ``decide`` (an outcome scheduled the next local task), it only queues: one loop drains.
        """
        self._queue.extend((t, decide, defer) for t in tasks)
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue:
                task, dec, dfr = self._queue.popleft()
                if self.runs[task.instance_id] >= MAX_RUNS_PER_INSTANCE or time.monotonic() >= self.deadline:
                    self.deferred += 1
                    dfr(Command("StartActivity", task.instance_id,
                                {"activity_id": task.activity_id, "attempt": task.attempt},
                                f"{task.activity_id}/{task.attempt}/deferred", self.now))
                    continue
                self.runs[task.instance_id] += 1
                timeout = min(task.start_to_close_ms or self.cap_ms, self.cap_ms)
                dec(run_local(self.activities, task, timeout).command(task, self.now))
        finally:
            self._draining = False
            self._queue.clear()
