"""Prometheus metrics of the engine processor; names are prefixed ``kflow_`` and carry no instance ids.

Label values are bounded: command and event types, workflow and activity names (as deployed),
DLQ reason kinds and partition numbers. Workflow and activity counters are derived after each
commit from the events the batch recorded (:func:`record_batch`), so an aborted transaction
counts nothing. Gauges read from the stores and the consumer (cache, RocksDB size, pending
timers, consumer lag) are refreshed by the engine thread at most every
:data:`REFRESH_SECONDS` (:func:`refresh`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any, Optional

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["ACTIVITIES_COMPLETED", "ACTIVITIES_FAILED", "ACTIVITIES_RETRIED", "ACTIVITIES_SCHEDULED",
           "ACTIVITIES_TIMED_OUT", "DLQ", "WORKFLOWS_CANCELLED", "WORKFLOWS_COMPLETED", "WORKFLOWS_FAILED",
           "WORKFLOWS_STARTED", "WORKFLOW_SECONDS", "command", "event", "record_batch", "refresh"]

COMMANDS = Counter("kflow_engine_commands_total", "Commands decided, by command type.", ["type"])
EVENTS = Counter("kflow_engine_events_total", "Events recorded, by event type.", ["type"])
DLQ = Counter("kflow_dlq_messages_total", "Messages sent to the dead-letter topic, by reason kind.", ["reason"])
BATCH_SIZE = Histogram("kflow_engine_batch_commands", "Commands per transaction.",
                       buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000))
BATCH_SECONDS = Histogram("kflow_engine_batch_seconds", "Time to process and commit one batch.")
COMMIT_SECONDS = Histogram("kflow_engine_commit_seconds", "Kafka transaction commit latency.")
COMMAND_SECONDS = Histogram("kflow_engine_command_seconds", "Processing time per command (batch time / commands).",
                            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5))
TIMER_LATENESS = Histogram("kflow_engine_timer_lateness_seconds", "How late timers fire after their due time.")
RESTORE_SECONDS = Histogram("kflow_engine_restore_seconds", "Time to restore one partition from its changelog "
                            "(partitions of one assignment are restored together).")
RESTORE_RECORDS = Counter("kflow_engine_restore_records_total", "State records read from the changelog by restores "
                          "(its rate is the restore speed).")
RESTORE_PENDING = Gauge("kflow_engine_restore_partitions_pending", "Partitions whose restore has not reached its end "
                        "mark yet (0 when no restore runs).")
REBALANCES = Counter("kflow_engine_rebalances_total", "Partition assignments and revocations.", ["kind"])
ASSIGNED = Gauge("kflow_engine_assigned_partitions", "Partitions of commands owned by this engine.")
ABORTS = Counter("kflow_engine_transaction_aborts_total", "Transactions aborted and retried.")
STANDBY_LAG = Gauge("kflow_standby_lag_records", "Changelog records a standby replica has not applied yet (high "
                    "watermark - stored changelog offset), by partition it keeps warm.", ["partition"])
STANDBY_PARTITIONS = Gauge("kflow_standby_partitions", "Partitions of commands this engine keeps warm as a standby "
                           "replica (KFLOW_STANDBY_REPLICAS).")

WORKFLOWS_STARTED = Counter("kflow_workflows_started_total", "Workflow instances started, by workflow.", ["workflow"])
WORKFLOWS_COMPLETED = Counter("kflow_workflows_completed_total", "Workflow instances completed, by workflow.",
                              ["workflow"])
WORKFLOWS_FAILED = Counter("kflow_workflows_failed_total", "Workflow instances failed, by workflow.", ["workflow"])
WORKFLOWS_CANCELLED = Counter("kflow_workflows_cancelled_total",
                              "Workflow instances cancelled or terminated, by workflow.", ["workflow"])
WORKFLOW_SECONDS = Histogram(
    "kflow_workflow_duration_seconds", "Start to close of workflow instances, by workflow and final status.",
    ["workflow", "status"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 24 * 3600, 7 * 24 * 3600))
INCIDENTS_RAISED = Counter("kflow_incidents_raised_total", "Incidents raised (a step's retries ran out under "
                           "on_failure: incident), by workflow.", ["workflow"])
INCIDENTS_RESOLVED = Counter("kflow_incidents_resolved_total", "Incidents closed by an operator (retry, skip, fail) "
                             "or by their timeout (timeout), by workflow and action.", ["workflow", "action"])
ACTIVITIES_SCHEDULED = Counter("kflow_activities_scheduled_total", "Activity attempts scheduled, by activity.",
                               ["activity"])
ACTIVITIES_COMPLETED = Counter("kflow_activities_completed_total", "Activities completed, by activity.", ["activity"])
ACTIVITIES_FAILED = Counter("kflow_activities_failed_total", "Activity attempts failed, by activity.", ["activity"])
ACTIVITIES_RETRIED = Counter("kflow_activities_retried_total", "Activity retries scheduled (attempt > 1), by activity.",
                             ["activity"])
ACTIVITIES_TIMED_OUT = Counter("kflow_activities_timed_out_total", "Activity attempts timed out, by activity and kind.",
                               ["activity", "kind"])

LIMIT_PERMITS = Counter("kflow_limit_permits_total", "Permit requests decided by quota and limit counters, by "
                        "counter key (limit:<name>[:<tenant or key>]) and outcome: granted (an admission or a "
                        "dispatch), queued, refused (a rejection).", ["key", "outcome"])
LIMIT_IN_USE = Gauge("kflow_limit_in_use", "Permits a quota or concurrency limit has out, by counter key (counters "
                     "owned by this engine).", ["key"])
LIMIT_QUEUED = Gauge("kflow_limit_queued", "Requests waiting at a quota or limit counter, by counter key.", ["key"])
LIMIT_SATURATION = Gauge("kflow_limit_saturation", "Permits out / the limit's maximum (1 = full; above 1 while a "
                         "burst policy admits beyond it), by counter key.", ["key"])
TIMERS_PENDING = Gauge("kflow_engine_timers_pending", "Durable timers waiting in the due-date index, by partition "
                       "(counted up to 1000 per partition).", ["partition"])
CACHE_HITS = Counter("kflow_engine_cache_hits_total", "Instance state reads served by the in-memory cache.")
CACHE_MISSES = Counter("kflow_engine_cache_misses_total", "Instance state reads that went to RocksDB.")
CACHE_STATES = Gauge("kflow_engine_cache_states", "Instance states held in the in-memory cache.")
STORE_BYTES = Gauge("kflow_engine_store_bytes", "On-disk size of the RocksDB store, by partition.", ["partition"])
CONSUMER_LAG = Gauge("kflow_consumer_lag", "Records not yet consumed (high watermark - position), by consumer "
                     "(engine or worker), topic and partition.", ["consumer", "topic", "partition"])

#: Seconds between two refreshes of the gauges read from stores and consumers.
REFRESH_SECONDS = 5.0
#: Most timer index entries counted per partition per refresh. The count walks the index under the
#: GIL; at 10,000 per partition it stalled every engine thread for tens of milliseconds every
#: refresh, which showed up as a periodic latency tail.
TIMER_COUNT_CAP = 1_000

_TERMINAL: dict[str, tuple[Any, str]] = {
    "WorkflowCompleted": (WORKFLOWS_COMPLETED, "COMPLETED"),
    "WorkflowFailed": (WORKFLOWS_FAILED, "FAILED"),
    "WorkflowCancelled": (WORKFLOWS_CANCELLED, "CANCELLED"),
    "WorkflowTerminated": (WORKFLOWS_CANCELLED, "TERMINATED"),
}

_commands: dict[str, Any] = {}
_events: dict[str, Any] = {}
_last_refresh: dict[str, float] = {}
_cache_seen: dict[int, tuple[int, int]] = {}
_lag_labels: dict[str, set[tuple[str, str, str]]] = {}


def command(type_: str) -> None:
    """Count one decided command (label children cached: this is the hot path)."""
    child = _commands.get(type_)
    if child is None:
        child = _commands[type_] = COMMANDS.labels(type_)
    child.inc()


def event(type_: str) -> None:
    """Count one recorded event."""
    child = _events.get(type_)
    if child is None:
        child = _events[type_] = EVENTS.labels(type_)
    child.inc()


def _activity_name(aid: str, before: Optional[dict[str, Any]], after: Optional[dict[str, Any]],
                   scheduled: dict[str, str]) -> str:
    for st in (before, after):
        act = ((st or {}).get("activities") or {}).get(aid)
        if act and act.get("name"):
            return str(act["name"])
    return scheduled.get(aid, "<unknown>")


def record_batch(decisions: Iterable[tuple[Optional[dict[str, Any]], Any]], now_ms: int,
                 seconds: float, commands: int) -> None:
    """Count what a committed batch did: workflows and activities from its events, time per command.

    Args:
        decisions: ``(state before, decision)`` of every command that recorded events; a
            decision has ``events`` and ``state`` (after).
        now_ms: The batch's clock, for workflow durations.
        seconds: Time the batch took, decided to committed.
        commands: Commands the batch decided.
    """
    if commands:
        COMMAND_SECONDS.observe(seconds / commands)
    for before, d in decisions:
        after = d.state
        workflow = str((after or before or {}).get("workflow", "<unknown>"))
        scheduled: dict[str, str] = {}
        for ev in d.events:
            t, data = ev.type, ev.data
            if t == "ActivityScheduled":
                name = str(data.get("name") or "<unknown>")
                scheduled[str(data.get("activity_id"))] = name
                ACTIVITIES_SCHEDULED.labels(name).inc()
                if (data.get("attempt") or 1) > 1:
                    ACTIVITIES_RETRIED.labels(name).inc()
            elif t == "ActivityCompleted":
                ACTIVITIES_COMPLETED.labels(_activity_name(data.get("activity_id", ""), before, after, scheduled)).inc()
            elif t == "ActivityFailed":
                ACTIVITIES_FAILED.labels(_activity_name(data.get("activity_id", ""), before, after, scheduled)).inc()
            elif t == "ActivityTimedOut":
                name = _activity_name(data.get("activity_id", ""), before, after, scheduled)
                ACTIVITIES_TIMED_OUT.labels(name, str(data.get("kind") or "unknown")).inc()
            elif t == "WorkflowStarted":
                WORKFLOWS_STARTED.labels(str(data.get("workflow") or workflow)).inc()
            elif t in _PERMIT_OUTCOMES and after is not None:
                LIMIT_PERMITS.labels(str(after["id"]), _PERMIT_OUTCOMES[t]).inc()
            elif t == "IncidentRaised":
                INCIDENTS_RAISED.labels(workflow).inc()
            elif t == "IncidentResolved":
                INCIDENTS_RESOLVED.labels(workflow, str(data.get("action") or "unknown")).inc()
            elif t in _TERMINAL:
                counter, status = _TERMINAL[t]
                counter.labels(workflow).inc()
                if data.get("error_type") == "IncidentTimeout":
                    INCIDENTS_RESOLVED.labels(workflow, "timeout").inc()
                started = (after or {}).get("started_ms")
                if started is not None:
                    WORKFLOW_SECONDS.labels(workflow, status).observe(max(0, now_ms - int(started)) / 1000)


        if after is not None and after.get("kind") == "limit":
            key, in_use = str(after["id"]), len(after["held"])
            LIMIT_IN_USE.labels(key).set(in_use)
            LIMIT_QUEUED.labels(key).set(len(after["queue"]))
            if after.get("max"):
                LIMIT_SATURATION.labels(key).set(in_use / after["max"])


#: Counter events of quota and limit counters -> the outcome label of ``kflow_limit_permits_total``.
_PERMIT_OUTCOMES = {"PermitIssued": "granted", "PermitQueued": "queued", "PermitDenied": "refused"}


def _due(kind: str) -> bool:
    now = time.monotonic()
    if now - _last_refresh.get(kind, 0.0) < REFRESH_SECONDS:
        return False
    _last_refresh[kind] = now
    return True


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def consumer_lag(kind: str, consumer: Any) -> None:
    """Set ``kflow_consumer_lag`` of ``consumer``'s assigned partitions from cached watermarks (no I/O)."""
    try:
        assignment = consumer.assignment()
        positions = consumer.position(assignment) if assignment else []
    except Exception:  # noqa: BLE001 - a closed or rebalancing consumer has no lag to report now
        return
    current: set[tuple[str, str, str]] = set()
    for tp in positions:
        try:
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
        except Exception:  # noqa: BLE001
            continue
        if high < 0 or tp.offset < 0:
            continue
        labels = (kind, tp.topic, str(tp.partition))
        current.add(labels)
        CONSUMER_LAG.labels(*labels).set(max(0, high - tp.offset))
    for labels in _lag_labels.get(kind, set()) - current:
        try:
            CONSUMER_LAG.remove(*labels)
        except KeyError:
            pass
    _lag_labels[kind] = current


def refresh(processor: Any, force: bool = False) -> None:
    """Refresh the engine's store and consumer gauges, at most every :data:`REFRESH_SECONDS`."""
    if not force and not _due("engine"):
        return
    store = processor.store
    cached = 0
    STORE_BYTES.clear()
    TIMERS_PENDING.clear()
    for p, sp in list(store.partitions.items()):
        hits, misses = sp.hits, sp.misses
        seen_hits, seen_misses = _cache_seen.get(id(sp), (0, 0))
        CACHE_HITS.inc(max(0, hits - seen_hits))
        CACHE_MISSES.inc(max(0, misses - seen_misses))
        _cache_seen[id(sp)] = (hits, misses)
        cached += sp.cache_len
        STORE_BYTES.labels(str(p)).set(_dir_bytes(sp.path))
        TIMERS_PENDING.labels(str(p)).set(_count_timers(sp))
    for key in [k for k in _cache_seen if k not in {id(sp) for sp in store.partitions.values()}]:
        del _cache_seen[key]
    CACHE_STATES.set(cached)
    consumer_lag("engine", processor.consumer)


def _count_timers(sp: Any) -> int:
    from kflow.streams.store import TIMER_PREFIX

    n = 0
    for key in sp.db.keys(from_key=TIMER_PREFIX):
        if not key.startswith(TIMER_PREFIX) or n >= TIMER_COUNT_CAP:
            break
        n += 1
    return n
