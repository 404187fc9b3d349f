"""Prometheus metrics of the engine processor; names are prefixed ``kflow_`` and carry no instance ids."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

COMMANDS = Counter("kflow_engine_commands_total", "Commands decided, by command type.", ["type"])
EVENTS = Counter("kflow_engine_events_total", "Events recorded, by event type.", ["type"])
DLQ = Counter("kflow_dlq_messages_total", "Messages sent to the dead-letter topic, by reason kind.", ["reason"])
BATCH_SIZE = Histogram("kflow_engine_batch_commands", "Commands per transaction.",
                       buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000))
BATCH_SECONDS = Histogram("kflow_engine_batch_seconds", "Time to process and commit one batch.")
COMMIT_SECONDS = Histogram("kflow_engine_commit_seconds", "Kafka transaction commit latency.")
TIMER_LATENESS = Histogram("kflow_engine_timer_lateness_seconds", "How late timers fire after their due time.")
RESTORE_SECONDS = Histogram("kflow_engine_restore_seconds", "Time to restore one partition from its changelog.")
REBALANCES = Counter("kflow_engine_rebalances_total", "Partition assignments and revocations.", ["kind"])
ASSIGNED = Gauge("kflow_engine_assigned_partitions", "Partitions of commands owned by this engine.")
ABORTS = Counter("kflow_engine_transaction_aborts_total", "Transactions aborted and retried.")


_commands: dict[str, Any] = {}
_events: dict[str, Any] = {}


def command(type_: str) -> None:
    """Count one decided command (label children cached: this is the hot path)."""
    child = _commands.get(type_)
    if child is None:
        child = _commands[type_] = COMMANDS.labels(type_)
    child.inc()


def event(type_: str) -> None:
    child = _events.get(type_)
    if child is None:
        child = _events[type_] = EVENTS.labels(type_)
    child.inc()
