"""Recovery: rebuild partition stores from the compacted ``state`` changelog, all partitions at once.

``restore_partitions`` assigns one ``read_committed`` consumer to every changelog partition that
needs restoring, each from the offset its store last recorded, and reads until every partition's
position reaches the high watermark it saw when it began. Each drained batch is written per
partition in one WriteBatch holding the states, their timer index entries and the next changelog
offset, so a store is always a consistent prefix of its changelog. There is no fixed wait per
partition: a poll returns as soon as any partition has records, and a partition is finished the
moment its position reaches its end mark. Progress (records, records/s, partitions left) is
logged and exported as metrics. ``restore_partition`` is the one-partition case.

An open transaction of a crashed writer holds the last stable offset below the high watermark
until the broker aborts it (``transaction.timeout.ms``) or a producer with the same transactional
id fences it; restore waits for that, logging, rather than start from a state that may miss
committed records.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from confluent_kafka import Consumer, Message, TopicPartition

from kflow.schemas.codec import decode_state
from kflow.streams import metrics
from kflow.streams.store import StorePartition

log = logging.getLogger("kflow.restore")

#: Seconds between two progress lines (and the open-transaction warning) of a running restore.
PROGRESS_SECONDS = 5.0
#: How long one poll waits when no partition has records (only reached at an end mark or behind
#: an open transaction: a poll returns as soon as records arrive).
POLL_SECONDS = 0.1


@dataclass
class RestoreStats:
    """What restoring one partition did: changelog offsets ``start_offset..end_offset``."""

    partition: int
    start_offset: int
    end_offset: int
    records: int
    seconds: float


def needs_restore(stored_next: int, low: int, high: int) -> bool:
    """A store needs restoring when the changelog holds records past what it reflects."""
    return high > max(stored_next, low)


def end_offsets(consumer_conf: dict[str, Any], topic: str, partitions: list[int]) -> dict[int, tuple[int, int]]:
    """(low, high) watermarks of changelog partitions as written, committed or not.

    Asked with ``read_uncommitted``: a ``read_committed`` query returns the last stable offset,
    which an open transaction of a crashed writer holds back (some brokers even report 0), and
    stopping there would silently skip committed records."""
    conf = {**consumer_conf, "group.id": "kflow-restore", "isolation.level": "read_uncommitted"}
    c = Consumer(conf)
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False) for p in partitions}
    finally:
        c.close()


@dataclass
class _Pending:
    """One partition being restored: its store, where it began and the end mark it must reach."""

    store: StorePartition
    begin: int
    high: int
    records: int = 0


def _write(store: StorePartition, msgs: list[Message]) -> None:
    """One WriteBatch: the latest state per instance of ``msgs``, and the next changelog offset."""
    states: dict[str, dict[str, Any]] = {}
    old: dict[str, Optional[dict[str, Any]]] = {}
    for m in msgs:
        rec = decode_state(m.value())
        iid = rec["instance_id"]
        if iid not in old:
            old[iid] = store.get(iid)  # its timers leave the index unless the new state keeps them
        states[iid] = rec["internal"]
    store.write(states, old, msgs[-1].offset() + 1)


def _drain(c: Consumer, batch: int) -> list[Message]:
    """Records the client has fetched: waits only until the first arrives (or ``POLL_SECONDS``)."""
    first = c.poll(POLL_SECONDS)
    if first is None:
        return []
    return [first, *c.consume(batch - 1, 0)] if batch > 1 else [first]


def restore_partitions(consumer_conf: dict[str, Any], topic: str, stores: list[StorePartition],
                       batch: int = 5000, marks: Optional[dict[int, tuple[int, int]]] = None,
                       progress_seconds: float = PROGRESS_SECONDS) -> dict[int, RestoreStats]:
    """Bring every store in ``stores`` up to its changelog partition's high watermark, together.

    Args:
        consumer_conf: librdkafka settings of the restore consumer (no group is joined).
        topic: The ``state`` changelog topic.
        stores: The stores of the partitions to restore (one per changelog partition).
        batch: Most records taken from the client per write round.
        marks: ``(low, high)`` per partition when already known (:func:`end_offsets`).
        progress_seconds: Seconds between progress lines.

    Returns:
        The :class:`RestoreStats` of every partition in ``stores`` (zero records when it was current).
    """
    t0 = time.monotonic()
    if not stores:
        return {}
    marks = marks if marks is not None else end_offsets(consumer_conf, topic, [s.partition for s in stores])
    out: dict[int, RestoreStats] = {}
    pending: dict[int, _Pending] = {}
    for sp in stores:
        start = sp.changelog_offset()
        low, high = marks[sp.partition]
        if needs_restore(start, low, high):
            pending[sp.partition] = _Pending(sp, max(start, low), high)
        else:
            out[sp.partition] = RestoreStats(sp.partition, start, start, 0, 0.0)
    if not pending:
        return out
    metrics.RESTORE_PENDING.set(len(pending))
    conf = {**consumer_conf, "group.id": "kflow-restore", "enable.auto.commit": False,
            "isolation.level": "read_committed", "auto.offset.reset": "earliest"}
    c = Consumer(conf)
    try:
        c.assign([TopicPartition(topic, p, st.begin) for p, st in pending.items()])
        total, last_progress, next_log = 0, time.monotonic(), time.monotonic() + progress_seconds
        while pending:
            msgs = _drain(c, batch)
            by_partition: dict[int, list[Message]] = {}
            for m in msgs:
                if m.error() is None and m.partition() in pending:
                    by_partition.setdefault(m.partition(), []).append(m)
            for p, part in by_partition.items():
                _write(pending[p].store, part)
                pending[p].records += len(part)
            got = sum(len(v) for v in by_partition.values())
            if got:
                total += got
                metrics.RESTORE_RECORDS.inc(got)
                last_progress = time.monotonic()
            _finish_reached(c, topic, pending, out, t0)
            if time.monotonic() >= next_log and pending:
                _log_progress(c, topic, pending, total, t0, time.monotonic() - last_progress)
                next_log = time.monotonic() + progress_seconds
        seconds = time.monotonic() - t0
        log.info("restored %d state records of %d partitions in %.2fs (%.0f records/s)", total,
                 sum(1 for s in out.values() if s.records or s.end_offset > s.start_offset), seconds,
                 total / seconds if seconds > 0 else 0.0)
        return out
    finally:
        metrics.RESTORE_PENDING.set(0)
        c.close()


def _finish_reached(c: Consumer, topic: str, pending: dict[int, _Pending], out: dict[int, RestoreStats],
                    t0: float) -> None:
    """Close every partition whose position reached its end mark (positions are local: no I/O)."""
    positions = c.position([TopicPartition(topic, p) for p in pending])
    done = []
    for tp in positions:
        st = pending[tp.partition]
        if tp.offset >= st.high:
            # past the end mark only control records (commit markers) remain: the store reflects
            # the changelog up to the position, recorded with nothing else to write
            st.store.write({}, {}, max(tp.offset, st.store.changelog_offset()))
            out[tp.partition] = RestoreStats(tp.partition, st.begin, st.store.changelog_offset(), st.records,
                                             time.monotonic() - t0)
            done.append(TopicPartition(topic, tp.partition))
            del pending[tp.partition]
    if done:
        c.incremental_unassign(done)
        metrics.RESTORE_PENDING.set(len(pending))


def _log_progress(c: Consumer, topic: str, pending: dict[int, _Pending], total: int, t0: float,
                  idle: float) -> None:
    elapsed = time.monotonic() - t0
    log.info("restoring: %d records so far (%.0f records/s), %d partitions left", total,
             total / elapsed if elapsed > 0 else 0.0, len(pending))
    if idle > PROGRESS_SECONDS:
        # Records below the high watermark that read_committed cannot pass belong to a transaction
        # still open (a crashed writer's, until the broker aborts it or its transactional id is
        # fenced). Skipping them could skip committed state, so wait.
        for tp in c.position([TopicPartition(topic, p) for p in pending]):
            log.warning("partition %d: restore waiting at offset %d below high watermark %d for an open "
                        "transaction to be resolved", tp.partition, tp.offset, pending[tp.partition].high)


def restore_partition(consumer_conf: dict[str, Any], topic: str, store: StorePartition,
                      batch: int = 5000, marks: Optional[tuple[int, int]] = None) -> RestoreStats:
    """Bring one ``store`` up to its changelog partition's high watermark; see the module docstring."""
    p = store.partition
    return restore_partitions(consumer_conf, topic, [store], batch,
                              marks={p: marks} if marks is not None else None)[p]
