"""Prometheus metrics of activity workers, created once per process; names are prefixed ``kflow_``."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from kflow.streams.metrics import DLQ, consumer_lag

__all__ = ["ACTIVITIES_CANCELLED", "ACTIVITY_SECONDS", "CONCURRENCY_LIMIT", "INFLIGHT", "PROMOTIONS", "QUEUE_WAIT",
           "READ_AHEAD", "RESULTS_UNDELIVERABLE", "SCHEDULE_TO_START", "TASKS", "Outcome", "dead_lettered",
           "queue_wait", "refresh", "task_started"]

TASKS = Counter(
    "kflow_worker_tasks_total",
    "Tasks handled by workers, by queue, activity and outcome.",
    ["queue", "activity", "outcome"],
)
INFLIGHT = Gauge("kflow_worker_inflight", "Activities running right now in this process.")
CONCURRENCY_LIMIT = Gauge("kflow_worker_concurrency_limit", "Most activities a worker runs at once.")
ACTIVITIES_CANCELLED = Counter(
    "kflow_worker_activities_cancelled_total",
    "Attempts the engine cancelled while a worker was running or holding them, by activity.",
    ["activity"],
)
RESULTS_UNDELIVERABLE = Counter(
    "kflow_worker_results_undeliverable_total",
    "Results Kafka rejected for good (e.g. too large): task dead-lettered, attempt reported failed.",
    ["activity"],
)
ACTIVITY_SECONDS = Histogram(
    "kflow_activity_duration_seconds",
    "Wall time of one activity attempt, by activity.",
    ["activity"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

SCHEDULE_TO_START = Histogram(
    "kflow_activity_schedule_to_start_seconds",
    "Time from the engine scheduling an activity attempt to a worker starting it, by activity.",
    ["activity"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)

READ_AHEAD = Gauge("kflow_worker_read_ahead_tasks",
                   "Tasks workers in this process read and have not started yet (waiting for a slot).")
PROMOTIONS = Counter(
    "kflow_worker_task_promotions_total",
    "Tasks started at a more urgent level than their topic's because they waited longer than KFLOW_PROMOTE_AFTER_MS, "
    "by queue, topic level and level they were chosen at.",
    ["queue", "from_level", "to_level"],
)
QUEUE_WAIT = Histogram(
    "kflow_worker_queue_wait_seconds",
    "Time from a task's record being written to a worker starting it, by queue, priority level (of its topic) "
    "and fairness key (the first 100 keys seen by the process; later ones are counted as <other>).",
    ["queue", "level", "key"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)
#: Most distinct fairness keys labelled in ``kflow_worker_queue_wait_seconds``: keys are data (a
#: customer id), so the label set stays bounded.
MAX_KEY_LABELS = 100
OTHER_KEYS = "<other>"
_key_labels: set[str] = set()

#: Seconds between two refreshes of the worker's consumer lag.
REFRESH_SECONDS = 5.0
_last_refresh = [0.0]


def task_started(task: Any) -> None:
    """Observe the schedule-to-start latency of a task a worker is about to run."""
    if task.scheduled_ms:
        SCHEDULE_TO_START.labels(task.name).observe(max(0.0, time.time() - task.scheduled_ms / 1000))


def queue_wait(queue: str, level: int, key: str, seconds: float) -> None:
    """Observe how long a task waited (broker and read-ahead) before a worker started it."""
    if key not in _key_labels:
        if len(_key_labels) >= MAX_KEY_LABELS:
            key = OTHER_KEYS
        else:
            _key_labels.add(key)
    QUEUE_WAIT.labels(queue, str(level), key).observe(seconds)


def dead_lettered(reason: str) -> None:
    """Count a record a worker sent to the dead-letter topic (label: the reason's first word)."""
    DLQ.labels(reason.split(" ")[0].split(":")[0][:32]).inc()


def refresh(consumer: Any) -> None:
    """Refresh ``kflow_consumer_lag`` of the worker's partitions, at most every :data:`REFRESH_SECONDS`."""
    now = time.monotonic()
    if now - _last_refresh[0] >= REFRESH_SECONDS:
        _last_refresh[0] = now
        consumer_lag("worker", consumer)


class Outcome:
    """Values of the ``outcome`` label of ``kflow_worker_tasks_total``."""

    COMPLETED = "completed"
    FAILED = "failed"  # retryable
    NON_RETRYABLE = "non_retryable"
    INVALID_RESULT = "invalid_result"
    UNKNOWN_ACTIVITY = "unknown_activity"
    UNDECODABLE = "undecodable"
    CANCELLED = "cancelled"  # stopped after the engine cancelled the attempt


#: ``activity`` label for tasks that name no registered activity (keeps label values bounded).
UNREGISTERED = "<unregistered>"
#: ``activity`` label for task records that could not be decoded.
UNDECODABLE = "<undecodable>"
