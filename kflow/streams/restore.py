"""Recovery: rebuild partition stores from the compacted ``engine-state`` and ``journal`` changelogs, all at once.

``restore_partitions`` assigns one ``read_committed`` consumer to every changelog partition that
needs restoring, of both changelogs (the engine's instance states, and the journal holding the history of
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

An earlier release kept the engine's state inside the public ``state`` records (field
``internal``) and wrote no ``engine-state``. :func:`upgrade_engine_state` (``kflow upgrade
engine-state``) copies the latest such state of every instance ``engine-state`` lacks, and
:func:`check_engine_state_upgraded` keeps an engine from starting on a deployment that needs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, cast

from confluent_kafka import Consumer, Message, Producer, TopicPartition

from kflow.model.errors import DecodeError, KflowError
from kflow.schemas.codec import decode_engine_state, decode_legacy_state, encode_engine_state
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
    """What restoring one partition did: ``engine-state`` changelog offsets ``start_offset..end_offset``
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
    suffix = "engine-state"
    if not state_topic.endswith(suffix):
        raise ValueError(f"expected the engine-state changelog topic ('<prefix>{suffix}'), but got {state_topic!r}")
    return TopicNames(state_topic[:-len(suffix)]).journal


def apply_state_records(store: StorePartition, msgs: list[Message]) -> None:
    """One WriteBatch: the latest state per instance of ``msgs`` (records of the ``engine-state``
    changelog partition of ``store``, in offset order), and the next changelog offset. Used by
    restore and by standby replicas tailing the changelog."""
    states: dict[str, dict[str, Any]] = {}
    old: dict[str, Optional[dict[str, Any]]] = {}
    for m in msgs:
        iid, state = decode_engine_state(m.value())
        if iid not in old:
            old[iid] = store.get(iid)  # its timers leave the index unless the new state keeps them
        states[iid] = state
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
    """Record that ``store`` reflects the ``engine-state`` changelog up to ``offset`` (nothing else to write)."""
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
        topic: The ``engine-state`` changelog topic.
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


# --------------------------------------------------------------------------- upgrade to engine-state

#: The latest ``state`` record of a key that is a tombstone.
DELETED = "deleted"
#: The latest ``state`` record of a key that has no ``internal`` (written by this release's schema).
NO_INTERNAL = "no-internal"
_UPGRADE_COMMAND = "kflow upgrade engine-state"


class UpgradeRequired(KflowError):
    """``state_topic`` holds records of the earlier release, with the engine's state in ``internal``
    (the first one met: ``instance_id``), and ``engine_state_topic`` is empty: an engine starting here
    would not see those instances. ``kflow upgrade engine-state`` copies them over."""

    def __init__(self, state_topic: str, engine_state_topic: str, instance_id: str) -> None:
        self.state_topic, self.engine_state_topic, self.instance_id = state_topic, engine_state_topic, instance_id
        super().__init__(f"topic '{state_topic}' holds state records of an earlier kflow release (with the engine's "
                         f"state in 'internal', e.g. instance '{instance_id}') and '{engine_state_topic}' is empty: "
                         f"run `{_UPGRADE_COMMAND}` (same --bootstrap and --prefix) before starting this engine, so "
                         "the instances open before the upgrade are restored")


class UpgradeReadError(KflowError):
    """A record of ``topic`` at ``partition``/``offset`` cannot be read (``reason``); nothing was written."""

    def __init__(self, topic: str, partition: int, offset: int, reason: str) -> None:
        self.topic, self.partition, self.offset, self.reason = topic, partition, offset, reason
        super().__init__(f"{topic}[{partition}]@{offset}: {reason}; nothing was written")


#: What the latest ``state`` record of a key holds: its partition, and the instance id and engine
#: state of a record of the earlier release, or :data:`DELETED` / :data:`NO_INTERNAL`.
LatestState = tuple[int, "tuple[str, dict[str, Any]] | str"]


@dataclass
class UpgradeSummary:
    """What ``kflow upgrade engine-state`` did (or, dry, would do)."""

    copied: int = 0  #: instances written to engine-state (or to be written)
    present: int = 0  #: instances engine-state already had (left alone)
    without_internal: int = 0  #: latest state records without ``internal`` and no engine-state record
    deleted: int = 0  #: keys whose latest state record is a tombstone
    by_partition: dict[int, int] = field(default_factory=dict)  #: partition -> instances copied


def plan_engine_state_copy(latest: dict[bytes, LatestState], present: set[bytes],
                           ) -> tuple[dict[int, list[tuple[bytes, str, dict[str, Any]]]], UpgradeSummary]:
    """Which engine states to write, per partition (key, instance id, state), and the counts.

    A key already on ``engine-state`` (``present``, a tombstone included: the engine wrote it, so it
    knows better) is left alone; so are keys whose latest ``state`` record has no ``internal`` or is
    a tombstone. Partitions and keys come out in a stable order."""
    writes: dict[int, list[tuple[bytes, str, dict[str, Any]]]] = {}
    summary = UpgradeSummary()
    for key in sorted(latest):
        p, what = latest[key]
        if key in present:
            summary.present += 1
        elif what == DELETED:
            summary.deleted += 1
        elif isinstance(what, str):
            summary.without_internal += 1
        else:
            writes.setdefault(p, []).append((key, what[0], what[1]))
    summary.by_partition = {p: len(writes[p]) for p in sorted(writes)}
    summary.copied = sum(summary.by_partition.values())
    return dict(sorted(writes.items())), summary


def _topic_partitions(consumer_conf: dict[str, Any], topic: str) -> int:
    """The partition count of ``topic``; KflowError when it does not exist."""
    c = Consumer({**consumer_conf, "group.id": "kflow-upgrade"})
    try:
        md = c.list_topics(topic, timeout=10)
    finally:
        c.close()
    t = md.topics.get(topic)
    if t is None or t.error is not None or not t.partitions:
        raise KflowError(f"topic '{topic}' does not exist (create kflow's topics with `kflow topics ensure`)")
    return len(t.partitions)


def _read_to_end(consumer_conf: dict[str, Any], topic: str, partitions: list[int],
                 on_batch: Callable[[list[Message]], None], starts: Optional[dict[int, int]] = None,
                 progress: Optional[Callable[[int], None]] = None) -> dict[int, int]:
    """Feed ``on_batch`` every committed record of ``partitions`` of ``topic`` (from ``starts``, else the
    beginning) up to the high watermarks they have now; return those high watermarks."""
    marks = end_offsets(consumer_conf, topic, partitions)
    begin = {p: max(low, (starts or {}).get(p, low)) for p, (low, _) in marks.items()}
    pending = {p: high for p, (_, high) in marks.items() if high > begin[p]}
    if pending:
        c = Consumer({**consumer_conf, "group.id": "kflow-upgrade", "enable.auto.commit": False,
                      "isolation.level": "read_committed", "auto.offset.reset": "earliest"})
        try:
            c.assign([TopicPartition(topic, p, begin[p]) for p in pending])
            total, next_log = 0, time.monotonic() + PROGRESS_SECONDS
            while pending:
                msgs = [m for m in _drain(c, 5000) if m.error() is None and m.partition() in pending]
                if msgs:
                    on_batch(msgs)
                    total += len(msgs)
                reached = [tp.partition for tp in c.position([TopicPartition(topic, p) for p in pending])
                           if tp.offset >= pending[tp.partition]]
                for p in reached:
                    del pending[p]
                if reached:
                    c.incremental_unassign([TopicPartition(topic, p) for p in reached])
                if progress is not None and time.monotonic() >= next_log:
                    progress(total)
                    next_log = time.monotonic() + PROGRESS_SECONDS
        finally:
            c.close()
    return {p: high for p, (_, high) in marks.items()}


def _latest_states(consumer_conf: dict[str, Any], topic: str, partitions: int,
                   progress: Callable[[str], None]) -> dict[bytes, LatestState]:
    """The latest record of every key of the ``state`` topic, classified (see :data:`LatestState`)."""
    latest: dict[bytes, LatestState] = {}

    def take(msgs: list[Message]) -> None:
        for m in msgs:
            key, value, p = m.key(), m.value(), m.partition()
            if key is None or p is None:
                continue
            if value is None:
                latest[key] = (p, DELETED)
                continue
            try:
                legacy = decode_legacy_state(value)
            except DecodeError as exc:
                raise UpgradeReadError(topic, p, m.offset() or 0, str(exc)) from None
            latest[key] = (p, NO_INTERNAL if legacy is None else legacy)

    _read_to_end(consumer_conf, topic, list(range(partitions)), take,
                 progress=lambda n: progress(f"{topic}: {n} records read, {len(latest)} keys"))
    return latest


def _engine_state_keys(consumer_conf: dict[str, Any], topic: str, partitions: list[int], present: set[bytes],
                       starts: Optional[dict[int, int]] = None) -> dict[int, int]:
    """Add the keys of ``topic``'s records (from ``starts``) to ``present``; the high watermarks read to."""
    def take(msgs: list[Message]) -> None:
        present.update(k for k in (m.key() for m in msgs) if k is not None)

    return _read_to_end(consumer_conf, topic, partitions, take, starts)


def upgrade_engine_state(consumer_conf: dict[str, Any], producer_conf: Callable[..., dict[str, Any]],
                         names: TopicNames, dry_run: bool = False,
                         echo: Callable[[str], None] = log.info) -> UpgradeSummary:
    """Copy the engine state of every instance whose latest ``state`` record carries it in
    ``internal`` (the earlier release's schema) and that ``engine-state`` does not have yet, into
    ``engine-state``: on the partition its ``state`` record is on, one transaction per partition.
    Running it again writes nothing. Run it while no engine runs (an engine deciding meanwhile could
    write a newer state of an instance just before the copy lands on top; each partition's
    ``engine-state`` is read again right before its transaction to keep that window small).

    Args:
        consumer_conf: librdkafka settings to read with (no group is joined).
        producer_conf: Makes the librdkafka settings of the transactional producer from extra settings.
        names: The deployment's topic names.
        dry_run: Read and report, write nothing.
        echo: Where progress lines and the plan go.

    Raises:
        UpgradeReadError: a ``state`` record cannot be decoded (nothing is written).
        KflowError: a topic is missing, or their partition counts differ.
    """
    partitions = _topic_partitions(consumer_conf, names.state)
    es_partitions = _topic_partitions(consumer_conf, names.engine_state)
    if es_partitions != partitions:
        raise KflowError(f"topic '{names.engine_state}' has {es_partitions} partitions but '{names.state}' has "
                         f"{partitions}: they must be co-partitioned")
    echo(f"reading {names.state} ({partitions} partitions) to its end")
    latest = _latest_states(consumer_conf, names.state, partitions, echo)
    echo(f"reading {names.engine_state} to its end")
    present: set[bytes] = set()
    seen = _engine_state_keys(consumer_conf, names.engine_state, list(range(partitions)), present)
    writes, summary = plan_engine_state_copy(latest, present)
    echo(f"{len(latest)} instances on {names.state}: {summary.copied} to copy, {summary.present} already on "
         f"{names.engine_state}, {summary.without_internal} without internal, {summary.deleted} deleted")
    if dry_run:
        for p, n in summary.by_partition.items():
            echo(f"partition {p}: would copy {n} instances")
        return summary
    if not writes:
        return summary
    producer = Producer(producer_conf(**{"transactional.id": f"{names.prefix}upgrade-engine-state",
                                         "acks": "all", "linger.ms": 5}))
    producer.init_transactions(30)
    for p, items in writes.items():
        # what an engine wrote since the plan was made stays: it is newer than the earlier release's
        late: set[bytes] = set()
        seen[p] = _engine_state_keys(consumer_conf, names.engine_state, [p], late, {p: seen[p]})[p]
        todo = [item for item in items if item[0] not in late]
        summary.present += len(items) - len(todo)
        producer.begin_transaction()
        try:
            for key, iid, state in todo:
                producer.produce(names.engine_state, encode_engine_state(iid, state), key, partition=p)
            producer.commit_transaction(60)
        except BaseException:
            producer.abort_transaction(30)
            raise
        summary.by_partition[p] = len(todo)
        echo(f"partition {p}: copied {len(todo)} instances")
    summary.copied = sum(summary.by_partition.values())
    return summary


def check_engine_state_upgraded(consumer_conf: dict[str, Any], names: TopicNames, partitions: int) -> None:
    """Refuse to start an engine that would not see the instances of an earlier release.

    Cheap on every start but the first after an upgrade: the ``state`` topic is read only when
    ``engine-state`` is empty in every partition while ``state`` is not, and then only until the
    first record with ``internal``.

    Raises:
        UpgradeRequired: such a record is there.
    """
    every = list(range(partitions))
    if any(high > low for low, high in end_offsets(consumer_conf, names.engine_state, every).values()):
        return
    if not any(high > low for low, high in end_offsets(consumer_conf, names.state, every).values()):
        return
    found: list[str] = []

    class _Found(Exception):
        pass

    def take(msgs: list[Message]) -> None:
        for m in msgs:
            try:
                legacy = decode_legacy_state(m.value()) if m.value() is not None else None
            except DecodeError:
                continue  # not the engine's to judge here; the upgrade command names it
            if legacy is not None:
                found.append(legacy[0])
                raise _Found

    try:
        _read_to_end(consumer_conf, names.state, every, take)
    except _Found:
        raise UpgradeRequired(names.state, names.engine_state, found[0]) from None
