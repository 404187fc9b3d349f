"""Recovery: rebuild partition stores from the compacted ``state`` and ``journal`` changelogs, all at once.

``restore_partitions`` assigns one ``read_committed`` consumer to every changelog partition that
needs restoring, of both changelogs (the instance states, and the journal holding the history of
code workflows), each from the offset its store last recorded, and reads until every partition's
position reaches the high watermark it saw when it began. Each drained batch is written per
partition in one WriteBatch holding the records and the next offset of their changelog (states
with their timer index entries and ``m:changelog``; journal entries and tombstones with
``m:journal``), so a store is always a consistent prefix of each changelog. There is no fixed wait
per partition: a poll returns as soon as any partition has records, and a partition is finished
the moment its position reaches its end mark. Progress (records, records/s, partitions left) is
logged and exported as metrics. ``restore_partition`` is the one-partition case.

A store's state and journal may reflect different points of their changelogs while it is being
restored; nothing reads it until both reached their end marks, which the same transactions wrote.

An open transaction of a crashed writer holds the last stable offset below the high watermark
until the broker aborts it (``transaction.timeout.ms``) or a producer with the same transactional
id fences it; restore waits for that, logging, rather than start from a state that may miss
committed records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, cast

from confluent_kafka import Consumer, Message, TopicPartition

from kflow.schemas.codec import decode_state
from kflow.streams import metrics
from kflow.streams.store import JournalRecord, StorePartition
from kflow.streams.topics import TopicNames

log = logging.getLogger("kflow.restore")

#: Seconds between two progress lines (and the open-transaction warning) of a running restore.
PROGRESS_SECONDS = 5.0
#: How long one poll waits when no partition has records (only reached at an end mark or behind
#: an open transaction: a poll returns as soon as records arrive).
POLL_SECONDS = 0.1


@dataclass
class RestoreStats:
    """What restoring one partition did: ``state`` changelog offsets ``start_offset..end_offset``
    (``records`` records), and ``journal_records`` records of the ``journal`` changelog."""

    partition: int
    start_offset: int
    end_offset: int
    records: int
    seconds: float
    journal_records: int = 0


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


def journal_topic_of(state_topic: str) -> str:
    """The ``journal`` changelog beside ``state_topic`` (both hang off one topic prefix)."""
    if not state_topic.endswith("state"):
        raise ValueError(f"expected the state changelog topic ('<prefix>state'), but got {state_topic!r}")
    return TopicNames(state_topic[:-len("state")]).journal


def apply_state_records(store: StorePartition, msgs: list[Message]) -> None:
    """One WriteBatch: the latest state per instance of ``msgs`` (records of the ``state`` changelog
    partition of ``store``, in offset order), and the next changelog offset. Used by restore and by
    standby replicas tailing the changelog."""
    states: dict[str, dict[str, Any]] = {}
    old: dict[str, Optional[dict[str, Any]]] = {}
    for m in msgs:
        rec = decode_state(m.value())
        iid = rec["instance_id"]
        if iid not in old:
            old[iid] = store.get(iid)  # its timers leave the index unless the new state keeps them
        states[iid] = rec["internal"]
    store.write(states, old, _next_offset(msgs))


def apply_journal_records(store: StorePartition, msgs: list[Message]) -> None:
    """One WriteBatch: the entries and tombstones of ``msgs`` (records of the ``journal`` changelog
    partition of ``store``, in offset order), and the next journal changelog offset. Used by
    restore and by standby replicas tailing the changelog."""
    records = cast("list[JournalRecord]", [(m.key(), m.value()) for m in msgs])  # journal records are keyed
    store.write({}, {}, None, journal=records, journal_next=_next_offset(msgs))


def _next_offset(msgs: list[Message]) -> int:
    """The offset after the last of ``msgs`` (consumed records without an error, so they have offsets)."""
    last = msgs[-1].offset()
    assert last is not None
    return last + 1


def mark_state(store: StorePartition, offset: int) -> None:
    """Record that ``store`` reflects the ``state`` changelog up to ``offset`` (nothing else to write)."""
    store.write({}, {}, max(offset, store.changelog_offset()))


def mark_journal(store: StorePartition, offset: int) -> None:
    """Record that ``store`` reflects the ``journal`` changelog up to ``offset``."""
    store.write({}, {}, None, journal_next=max(offset, store.journal_offset()))


@dataclass
class _Changelog:
    """How one changelog is restored: where a store stands on it, how records and end marks are written."""

    topic: str
    stored: Callable[[StorePartition], int]
    apply: Callable[[StorePartition, list[Message]], None]
    mark: Callable[[StorePartition, int], None]


@dataclass
class _Pending:
    """One changelog partition being restored: its store, where it began and the end mark it must reach."""

    store: StorePartition
    begin: int
    high: int
    records: int = 0


@dataclass
class _Progress:
    """One store's restore over both changelogs; finished when neither has a pending partition."""

    store: StorePartition
    start: int
    end: int = -1
    records: int = 0
    journal_records: int = 0
    left: set[str] = field(default_factory=set)


def _drain(c: Consumer, batch: int) -> list[Message]:
    """Records the client has fetched: waits only until the first arrives (or ``POLL_SECONDS``)."""
    first = c.poll(POLL_SECONDS)
    if first is None:
        return []
    return [first, *c.consume(batch - 1, 0)] if batch > 1 else [first]


def restore_partitions(consumer_conf: dict[str, Any], topic: str, stores: list[StorePartition],
                       batch: int = 5000, marks: Optional[dict[int, tuple[int, int]]] = None,
                       progress_seconds: float = PROGRESS_SECONDS, journal_topic: Optional[str] = None,
                       journal_marks: Optional[dict[int, tuple[int, int]]] = None) -> dict[int, RestoreStats]:
    """Bring every store in ``stores`` up to the high watermarks of its partitions of both
    changelogs, together, with one consumer.

    Args:
        consumer_conf: librdkafka settings of the restore consumer (no group is joined).
        topic: The ``state`` changelog topic.
        stores: The stores of the partitions to restore (one per changelog partition).
        batch: Most records taken from the client per write round.
        marks: ``(low, high)`` per partition of ``topic`` when already known (:func:`end_offsets`).
        progress_seconds: Seconds between progress lines.
        journal_topic: The ``journal`` changelog topic (default: the one beside ``topic``).
        journal_marks: As ``marks``, for ``journal_topic``.

    Returns:
        The :class:`RestoreStats` of every partition in ``stores`` (zero records when it was current).
    """
    t0 = time.monotonic()
    if not stores:
        return {}
    journal_topic = journal_topic or journal_topic_of(topic)
    numbers = [s.partition for s in stores]
    changelogs = {
        topic: (_Changelog(topic, StorePartition.changelog_offset, apply_state_records, mark_state),
                marks if marks is not None else end_offsets(consumer_conf, topic, numbers)),
        journal_topic: (_Changelog(journal_topic, StorePartition.journal_offset, apply_journal_records,
                                   mark_journal),
                        journal_marks if journal_marks is not None
                        else end_offsets(consumer_conf, journal_topic, numbers)),
    }
    progress = {sp.partition: _Progress(sp, sp.changelog_offset()) for sp in stores}
    pending: dict[tuple[str, int], _Pending] = {}
    for name, (log_, topic_marks) in changelogs.items():
        for sp in stores:
            start = log_.stored(sp)
            low, high = topic_marks[sp.partition]
            if needs_restore(start, low, high):
                pending[(name, sp.partition)] = _Pending(sp, max(start, low), high)
                progress[sp.partition].left.add(name)
    out: dict[int, RestoreStats] = {}
    for p, pr in list(progress.items()):
        if not pr.left:
            out[p] = RestoreStats(p, pr.start, pr.start, 0, 0.0)
            del progress[p]
    if not pending:
        return out
    metrics.RESTORE_PENDING.set(len(progress))
    conf = {**consumer_conf, "group.id": "kflow-restore", "enable.auto.commit": False,
            "isolation.level": "read_committed", "auto.offset.reset": "earliest"}
    c = Consumer(conf)
    try:
        c.assign([TopicPartition(name, p, st.begin) for (name, p), st in pending.items()])
        total, last_progress, next_log = 0, time.monotonic(), time.monotonic() + progress_seconds
        while pending:
            msgs = _drain(c, batch)
            by_partition: dict[tuple[str, int], list[Message]] = {}
            for m in msgs:
                m_topic, m_p = m.topic(), m.partition()
                if m.error() is None and m_topic is not None and m_p is not None and (m_topic, m_p) in pending:
                    by_partition.setdefault((m_topic, m_p), []).append(m)
            for (name, p), part in by_partition.items():
                changelogs[name][0].apply(pending[(name, p)].store, part)
                pending[(name, p)].records += len(part)
            got = sum(len(v) for v in by_partition.values())
            if got:
                total += got
                metrics.RESTORE_RECORDS.inc(got)
                last_progress = time.monotonic()
            _finish_reached(c, changelogs, pending, progress, out, topic, t0)
            if time.monotonic() >= next_log and pending:
                _log_progress(c, pending, total, t0, time.monotonic() - last_progress)
                next_log = time.monotonic() + progress_seconds
        seconds = time.monotonic() - t0
        log.info("restored %d state and journal records of %d partitions in %.2fs (%.0f records/s)", total,
                 sum(1 for s in out.values() if s.records or s.journal_records or s.end_offset > s.start_offset),
                 seconds, total / seconds if seconds > 0 else 0.0)
        return out
    finally:
        metrics.RESTORE_PENDING.set(0)
        c.close()


def _finish_reached(c: Consumer, changelogs: dict[str, tuple[_Changelog, Any]],
                    pending: dict[tuple[str, int], _Pending], progress: dict[int, _Progress],
                    out: dict[int, RestoreStats], state_topic: str, t0: float) -> None:
    """Close every changelog partition whose position reached its end mark (positions are local:
    no I/O), and every store whose changelog partitions are all closed."""
    positions = c.position([TopicPartition(name, p) for name, p in pending])
    done = []
    for tp in positions:
        key = (tp.topic, tp.partition)
        st = pending[key]
        if tp.offset < st.high:
            continue
        # past the end mark only control records (commit markers) remain: the store reflects the
        # changelog up to the position, recorded with nothing else to write
        changelogs[tp.topic][0].mark(st.store, tp.offset)
        pr = progress[tp.partition]
        if tp.topic == state_topic:
            pr.records, pr.end = st.records, st.store.changelog_offset()
        else:
            pr.journal_records = st.records
        pr.left.discard(tp.topic)
        if not pr.left:
            end = pr.end if pr.end >= 0 else pr.start
            out[tp.partition] = RestoreStats(tp.partition, pr.start, end, pr.records, time.monotonic() - t0,
                                             pr.journal_records)
            del progress[tp.partition]
        done.append(TopicPartition(tp.topic, tp.partition))
        del pending[key]
    if done:
        c.incremental_unassign(done)
        metrics.RESTORE_PENDING.set(len(progress))


def _log_progress(c: Consumer, pending: dict[tuple[str, int], _Pending], total: int, t0: float,
                  idle: float) -> None:
    elapsed = time.monotonic() - t0
    log.info("restoring: %d records so far (%.0f records/s), %d changelog partitions left", total,
             total / elapsed if elapsed > 0 else 0.0, len(pending))
    if idle > PROGRESS_SECONDS:
        # Records below the high watermark that read_committed cannot pass belong to a transaction
        # still open (a crashed writer's, until the broker aborts it or its transactional id is
        # fenced). Skipping them could skip committed state, so wait.
        for tp in c.position([TopicPartition(name, p) for name, p in pending]):
            log.warning("%s[%d]: restore waiting at offset %d below high watermark %d for an open "
                        "transaction to be resolved", tp.topic, tp.partition, tp.offset,
                        pending[(tp.topic, tp.partition)].high)


def restore_partition(consumer_conf: dict[str, Any], topic: str, store: StorePartition,
                      batch: int = 5000, marks: Optional[tuple[int, int]] = None) -> RestoreStats:
    """Bring one ``store`` up to its changelog partition's high watermark; see the module docstring."""
    p = store.partition
    return restore_partitions(consumer_conf, topic, [store], batch,
                              marks={p: marks} if marks is not None else None)[p]
