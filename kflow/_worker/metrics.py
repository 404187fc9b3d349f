"""Prometheus metrics of activity workers, created once per process; names are prefixed ``kflow_``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["ACTIVITY_SECONDS", "CONCURRENCY_LIMIT", "INFLIGHT", "TASKS", "Outcome"]

TASKS = Counter(
    "kflow_worker_tasks_total",
    "Tasks handled by workers, by queue, activity and outcome.",
    ["queue", "activity", "outcome"],
)
INFLIGHT = Gauge("kflow_worker_inflight", "Activities running right now in this process.")
CONCURRENCY_LIMIT = Gauge("kflow_worker_concurrency_limit", "Most activities a worker runs at once.")
ACTIVITY_SECONDS = Histogram(
    "kflow_activity_duration_seconds",
    "Wall time of one activity attempt, by activity.",
    ["activity"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


class Outcome:
    """Values of the ``outcome`` label of ``kflow_worker_tasks_total``."""

    COMPLETED = "completed"
    FAILED = "failed"  # retryable
    NON_RETRYABLE = "non_retryable"
    INVALID_RESULT = "invalid_result"
    UNKNOWN_ACTIVITY = "unknown_activity"
    UNDECODABLE = "undecodable"


#: ``activity`` label for tasks that name no registered activity (keeps label values bounded).
UNREGISTERED = "<unregistered>"
#: ``activity`` label for task records that could not be decoded.
UNDECODABLE = "<undecodable>"
