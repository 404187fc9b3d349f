"""Run activities for workflows: the ``@activity`` decorator, heartbeats, and the :class:`Worker`.

A worker consumes the ``tasks.<queue>`` topic of each queue it serves in that queue's consumer group
``<prefix>worker.<queue>``, so all workers of a queue share its tasks whatever other queues each
serves (one consumer per queue, sharing the worker's concurrency limit and result producer). It runs activities
concurrently (a thread pool for plain functions, one event loop for ``async`` ones), reports each
attempt's outcome as a ``CompleteActivity`` or ``FailActivity`` command, heartbeats for long
activities and commits only the contiguous prefix of finished offsets. Execution is
at-least-once per attempt; the engine de-duplicates results by (activity id, attempt).

Each attempt reports ``StartActivity`` when it begins (the engine's ``start_to_close`` and
``heartbeat`` timeouts count from it). When the engine no longer wants an attempt (its workflow
was cancelled or closed, its branch abandoned, or it timed out) the worker gets a cancel task:
the activity's next :func:`heartbeat` raises :class:`ActivityCancelledError`, an ``async``
activity is also cancelled at its current ``await``, and a queued attempt never starts. Tasks
naming no activity of the worker, undecodable tasks and results Kafka rejects for good (e.g. too
large) go to the ``dlq`` topic; the engine is told the attempt failed.

Example:
    >>> from kflow.worker import Worker, activity
    >>> @activity("inventory.reserve")
    ... def reserve(order):
    ...     return {"ok": order["qty"] <= 100}
    >>> Worker(WorkerConfig(), [reserve]).run()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, Union

from kflow._worker import metrics
from kflow._worker.consumers import worker_group
from kflow._worker.context import ActivityCancelledError, NotInActivityError, current_task, heartbeat
from kflow._worker.fairness import FairnessSettings
from kflow._worker.runner import Loop
from kflow.config import WorkerConfig
from kflow.model.errors import KflowError
from kflow.streams.activities import (
    DEFAULT_QUEUE,
    ActivityDefinition,
    ActivityDefinitionError,
    DuplicateActivityError,
    Registry,
    activity,
    build_registry,
    collect_activities,
    definition_of,
)
from kflow.streams.topics import ensure_topics

__all__ = [
    "DEFAULT_QUEUE",
    "ActivityCancelledError",
    "ActivityDefinition",
    "ActivityDefinitionError",
    "DuplicateActivityError",
    "NotInActivityError",
    "Worker",
    "activity",
    "collect_activities",
    "current_task",
    "definition_of",
    "heartbeat",
    "worker_group",
]

log = logging.getLogger("kflow.worker")

#: Everything :class:`Worker` accepts as its activities.
Activities = Union[
    ModuleType,
    Callable[..., Any],
    Mapping[str, Any],
    Iterable[Union[ModuleType, Callable[..., Any]]],
]


class Worker:
    """Consume the task topics of every queue its activities serve and run them.

    Each queue is consumed in its own group (:attr:`group_ids`, ``<prefix>worker.<queue>``), shared
    with every other worker of that queue.

    Example:
        >>> worker = Worker(WorkerConfig(concurrency=8), [my_module])  # doctest: +SKIP
        >>> worker.start_in_thread(); ...; worker.stop()                 # doctest: +SKIP

    Args:
        config: Kafka connection, topic prefix, ``concurrency`` and ``heartbeat_interval_ms``.
        activities: A module, a function, a list of modules and/or functions, ``{name: fn}``
            or ``{queue: {name: fn}}`` (as returned by :func:`collect_activities`).
            Undecorated functions are served under their ``__name__`` on the default queue.
        shutdown_timeout: Seconds a graceful stop waits for running activities; tasks still
            running after it are re-delivered to the group's next owner.
        create_topics: Create the worker's topics (commands, dlq, its task topics) if missing.

    Raises:
        ActivityDefinitionError: an activity is invalid, or there are none.
        DuplicateActivityError: two functions share a name on one queue.
    """

    def __init__(
        self,
        config: WorkerConfig,
        activities: Activities,
        *,
        shutdown_timeout: float = 30.0,
        create_topics: bool = True,
    ) -> None:
        if shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, but is {shutdown_timeout}")
        self.config = config
        self.registry: Registry = build_registry(activities)
        self.queues: list[str] = sorted(self.registry)
        self.group_ids: dict[str, str] = {q: worker_group(config.topic_prefix, q) for q in self.queues}
        self.shutdown_timeout = shutdown_timeout
        self.create_topics = create_topics
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._assigned = threading.Event()
        self._started = False
        self._thread: threading.Thread | None = None

    @property
    def group_id(self) -> str:
        """The consumer group of a worker serving one queue.

        Raises:
            KflowError: the worker serves several queues, each in its own group (see :attr:`group_ids`).
        """
        if len(self.group_ids) != 1:
            raise KflowError(f"expected a worker of one queue, but this one serves {len(self.group_ids)} "
                             f"({', '.join(self.queues)}), each in its own group: use group_ids[queue]")
        return next(iter(self.group_ids.values()))

    @property
    def activities(self) -> dict[str, list[str]]:
        """``{queue: [activity names]}`` served by this worker."""
        return {q: sorted(self.registry[q]) for q in self.queues}

    def run(self, stop: threading.Event | None = None) -> None:
        """Consume and run tasks until :meth:`stop` is called or ``stop`` is set; blocks.

        A stop is graceful: fetching stops, running activities get ``shutdown_timeout`` seconds
        to finish, their results are flushed, finished offsets committed and the groups left.
        A sync activity still running after that cannot be interrupted: it keeps its thread
        until it returns, its result is dropped and its task is re-delivered to the group.

        Raises:
            KflowError: the worker was already run.
            KafkaException: a fatal Kafka error (e.g. a fenced idempotent producer).
        """
        if self._started:
            raise KflowError("a Worker runs once; create a new one to run again")
        self._started = True
        cfg = self.config
        names = cfg.names
        if self.create_topics:
            ensure_topics(cfg.client_conf(), names, cfg.topic_settings, queues=self.queues)
        metrics.CONCURRENCY_LIMIT.set(cfg.concurrency)
        loop = Loop(
            registry=self.registry,
            topics={names.tasks(q): q for q in self.queues},
            commands_topic=names.commands,
            dlq_topic=names.dlq,
            consumer_confs={names.tasks(q): cfg.consumer_conf(g, **{"isolation.level": cfg.task_isolation})
                            for q, g in self.group_ids.items()},
            producer_conf=cfg.producer_conf(**{"linger.ms": cfg.result_linger_ms}),
            concurrency=cfg.concurrency,
            priority_policy=cfg.priority_policy,
            read_ahead=cfg.read_ahead,
            fairness=FairnessSettings(weights=cfg.fairness_weights, promote_after_ms=cfg.promote_after_ms,
                                      max_promotions=cfg.max_promotions),
            heartbeat_interval=cfg.heartbeat_interval_ms / 1000,
            shutdown_timeout=self.shutdown_timeout,
            should_stop=lambda: self._stop.is_set() or (stop is not None and stop.is_set()),
            on_assigned=self._assigned.set,
        )
        log.info(
            "worker started: groups=%s activities=%s concurrency=%d",
            ",".join(self.group_ids.values()),
            "; ".join(f"{q}: {', '.join(names_)}" for q, names_ in self.activities.items()),
            cfg.concurrency,
        )
        try:
            loop.run()
        finally:
            log.info("worker stopped: groups=%s", ",".join(self.group_ids.values()))

    def start_in_thread(self) -> threading.Thread:
        """Run the worker in a daemon thread (handy in tests); stop it with :meth:`stop`."""
        if self._thread is not None:
            raise KflowError("this Worker was already started in a thread")

        def target() -> None:
            try:
                self.run()
            except BaseException as exc:
                self.error = exc
                log.exception("worker failed")

        self._thread = threading.Thread(target=target, name=f"kflow-worker-{'+'.join(self.queues)}", daemon=True)
        self._thread.start()
        return self._thread

    def wait_assigned(self, timeout: float | None = None) -> bool:
        """Block until the consumer of every queue has had its first assignment; False on timeout."""
        return self._assigned.wait(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Ask the worker to stop gracefully; if started with :meth:`start_in_thread`, wait for it.

        Args:
            timeout: Most seconds to wait for the thread; defaults to ``shutdown_timeout + 30``.

        Raises:
            BaseException: whatever ended the worker's thread with an error.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.shutdown_timeout + 30 if timeout is None else timeout)
            if self._thread.is_alive():
                log.warning("worker thread still running after stop() timed out")
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def __repr__(self) -> str:
        return f"Worker(groups={list(self.group_ids.values())!r}, concurrency={self.config.concurrency})"
