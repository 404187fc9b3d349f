"""The projection processor: folds the ``engine-state``, ``events`` and ``definitions`` topics into the
visibility store.

Instances are read from ``engine-state``, kflow's own changelog of the engine's whole state, not
from the public ``state`` topic: the console shows what only the engine keeps (variables, pending
activities and timers, the position in the graph). Each record is turned into the status record
a ``QueryStatus`` answers (the public fields with the engine's state as ``internal``).

A plain consumer group (``read_committed``) on the three topics. Kafka commits are not what makes
it correct: every batch is written to the store **together with the offsets after it, in one
database transaction**, and on assignment each partition is positioned at the offset stored
there. A crash between consuming and committing re-reads the batch; folding it again changes
nothing (see :mod:`kflow.visibility.store`). Kafka offsets are also committed (asynchronously),
only so that lag tools see the group's progress.

::

    assign ──> seek to stored offsets ──> poll batch ──> decode ──> store.apply(records, offsets)
                                             ^                              │  (one DB transaction)
                                             └──── notify listeners <───────┘
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Counter, Gauge

from kflow.config import KafkaConfig
from kflow.engine.core import status_record
from kflow.model.errors import KflowError
from kflow.schemas.codec import decode_definition, decode_engine_state, decode_event
from kflow.streams.topics import ensure_topics
from kflow.visibility.store import Record, VisibilityStore

__all__ = ["ProjectionProcessor", "LAG", "RECORDS"]

log = logging.getLogger("kflow.visibility")

LAG = Gauge("kflow_visibility_lag", "Records of a partition not yet folded into the visibility store.",
            ["topic", "partition"])
RECORDS = Counter("kflow_visibility_records_total", "Records folded into the visibility store, by topic.", ["topic"])
BATCH = 500
_POLL_SECONDS = 0.2
_LAG_SECONDS = 2.0  # how often the lag gauge is refreshed (one watermark request per partition)


class _KafkaLog:
    def __init__(self) -> None:
        self._log = logging.getLogger("kflow.visibility.kafka")

    def log(self, level: int, msg: str, *args: Any) -> None:
        self._log.debug(msg, *args)


class ProjectionProcessor:
    """Consumes the public topics and keeps a :class:`VisibilityStore` up to date.

    Args:
        config: Kafka settings (bootstrap, prefix, dev tuning).
        store: The store to write.
        group_id: The consumer group; several processes with one PostgreSQL store share the work.
        on_change: Called after each committed batch with the instance ids that changed.
    """

    def __init__(self, config: KafkaConfig, store: VisibilityStore, *, group_id: str = "kflow-visibility",
                 on_change: Optional[Callable[[set[str]], None]] = None) -> None:
        self.config = config
        self.store = store
        self.group_id = group_id
        self.on_change = on_change
        names = config.names
        self._kinds = {names.engine_state: "state", names.events: "event", names.definitions: "definition"}
        self.ready = threading.Event()
        """Set once partitions are assigned and positioned."""
        self.records = 0
        """Records folded since start (including skipped duplicates)."""
        self.consumed = 0
        """Kafka records consumed since start (tombstones and undecodable ones included)."""
        self._assigned: list[TopicPartition] = []

    # -- rebalancing -------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        stored = self.store.offsets()
        for tp in partitions:
            tp.offset = stored.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        consumer.assign(partitions)
        self._assigned = list(partitions)
        log.info("visibility projection assigned %d partition(s)", len(partitions))
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned = [tp for tp in self._assigned if (tp.topic, tp.partition) not in
                          {(p.topic, p.partition) for p in partitions}]
        for tp in partitions:
            try:
                LAG.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass  # never measured

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, idle_timeout: Optional[float] = None, max_records: Optional[int] = None,
            batch: int = BATCH) -> None:
        """Fold records until ``stop`` is set.

        Args:
            stop: Set to stop after the current batch.
            idle_timeout: Also stop when nothing arrived for this many seconds.
            max_records: Also stop once this many records were consumed (batches of ``batch``).
            batch: Most records per consume call and per database transaction.
        """
        ensure_topics(self.config.client_conf(), self.config.names, self.config.topic_settings)
        consumer = Consumer(self.config.consumer_conf(self.group_id, logger=_KafkaLog()))
        consumer.subscribe(list(self._kinds), on_assign=self._on_assign, on_revoke=self._on_revoke)
        idle_since = time.monotonic()
        last_lag = 0.0
        try:
            while not stop.is_set():
                want = batch if max_records is None else min(batch, max_records - self.consumed)
                msgs = consumer.consume(want, _POLL_SECONDS)
                if msgs:
                    self._fold(msgs)
                    consumer.commit(asynchronous=True)
                    idle_since = time.monotonic()
                    if max_records is not None and self.consumed >= max_records:
                        return
                elif not self.ready.is_set():
                    idle_since = time.monotonic()  # idleness counts from the assignment on
                elif idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                    return
                if time.monotonic() - last_lag > _LAG_SECONDS:
                    self._update_lag(consumer)
                    last_lag = time.monotonic()
        finally:
            consumer.close()

    def _fold(self, msgs: list[Message]) -> None:
        records: list[Record] = []
        nxt: dict[tuple[str, int], int] = {}
        self.consumed += len(msgs)
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("visibility projection: %s", err)
                continue
            topic = msg.topic()
            nxt[(topic, msg.partition())] = msg.offset() + 1
            rec = self._decode(msg, self._kinds.get(topic, ""))
            if rec is not None:
                records.append(rec)
                RECORDS.labels(topic).inc()
        if not nxt:
            return
        changed = self.store.apply(records, nxt)
        self.records += len(records)
        if changed and self.on_change is not None:
            self.on_change(changed)

    @staticmethod
    def _decode(msg: Message, kind: str) -> Optional[Record]:
        key = (msg.key() or b"").decode(errors="replace")
        value = msg.value()
        try:
            if kind == "state":
                return Record("state", key, status_record(decode_engine_state(value)[1]) if value is not None else None)
            if kind == "event":
                return None if value is None else Record("event", key, decode_event(value))
            if kind == "definition":
                return None if value is None else Record("definition", key, decode_definition(value))
        except KflowError as exc:
            log.warning("visibility projection: skipping undecodable record %s[%d]@%d: %s",
                        msg.topic(), msg.partition(), msg.offset(), exc)
        return None

    def _update_lag(self, consumer: Consumer) -> None:
        if not self._assigned:
            return
        try:
            positions = consumer.position(self._assigned)
        except KafkaException:
            return
        for tp in positions:
            try:
                _low, high = consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
            except KafkaException:
                continue
            pos = tp.offset if tp.offset >= 0 else _low
            LAG.labels(tp.topic, str(tp.partition)).set(max(high - pos, 0))

