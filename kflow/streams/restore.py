"""Recovery: rebuild one partition's store from the compacted ``state`` changelog.

``restore_partition`` reads the changelog partition ``read_committed`` from the offset the store
last recorded up to the high watermark, writes every state record (and its timer index entries)
into the store in batches with the next offset in the same WriteBatch, and returns what it did.
It is bounded by the high watermark it saw when it began. An open transaction of a crashed writer
holds the last stable offset below that until the broker aborts it (``transaction.timeout.ms``) or
a producer with the same transactional id fences it; restore waits for that, logging, rather than
start from a state that may miss committed records.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from kflow.schemas.codec import decode_state
from kflow.streams.store import StorePartition

log = logging.getLogger("kflow.restore")


@dataclass
class RestoreStats:
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


def restore_partition(consumer_conf: dict[str, Any], topic: str, store: StorePartition,
                      idle_timeout: float = 3.0, batch: int = 2000,
                      marks: tuple[int, int] | None = None) -> RestoreStats:
    """Bring ``store`` up to the changelog's high watermark; see the module docstring."""
    t0 = time.monotonic()
    p = store.partition
    start = store.changelog_offset()
    conf = {**consumer_conf, "group.id": "kflow-restore", "enable.auto.commit": False,
            "isolation.level": "read_committed", "auto.offset.reset": "earliest"}
    c = Consumer(conf)
    try:
        low, high = marks if marks is not None else end_offsets(consumer_conf, topic, [p])[p]
        if not needs_restore(start, low, high):
            return RestoreStats(p, start, start, 0, time.monotonic() - t0)
        begin = max(start, low)
        c.assign([TopicPartition(topic, p, begin)])
        records = 0
        last_progress = time.monotonic()
        next_log = time.monotonic() + 5
        while True:
            msgs = c.consume(batch, 0.2)
            states: dict[str, dict[str, Any]] = {}
            old: dict[str, Any] = {}
            upto = None
            for m in msgs:
                if m.error():
                    continue
                rec = decode_state(m.value())
                iid = rec["instance_id"]
                if iid not in old:
                    old[iid] = store.get(iid)
                states[iid] = rec["internal"]
                upto = m.offset() + 1
                records += 1
            if states or upto is not None:
                store.write(states, old, upto)
                last_progress = time.monotonic()
            pos = c.position([TopicPartition(topic, p)])[0].offset
            if pos >= high:
                store.write({}, {}, max(pos, store.changelog_offset()))
                break
            if not msgs and time.monotonic() - last_progress > idle_timeout and time.monotonic() > next_log:
                # Records below the high watermark that read_committed cannot pass belong to a
                # transaction still open (a crashed writer's, until the broker aborts it or its
                # transactional id is fenced). Skipping them could skip committed state, so wait.
                log.warning("partition %d: restore waiting at offset %d below high watermark %d for an open "
                            "transaction to be resolved", p, pos, high)
            if time.monotonic() > next_log:
                log.info("partition %d: restoring, %d records so far (offset %d of %d)", p, records, pos, high)
                next_log = time.monotonic() + 5
        stats = RestoreStats(p, begin, store.changelog_offset(), records, time.monotonic() - t0)
        log.info("partition %d: restored %d state records (offsets %d..%d) in %.2fs", p, records,
                 stats.start_offset, stats.end_offset, stats.seconds)
        return stats
    finally:
        c.close()
