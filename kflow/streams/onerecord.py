"""A global table held in one record: the latest record with a given key on a one-partition topic.

The ``limits`` and ``policies`` topics are compacted with one partition, and the whole declaration
is one record (so every engine sees the old set or the new one, never a mix). Every engine reads
such a topic with :class:`OneRecordTable`: a consumer assigned (no group) to partition 0 from its
beginning, ``poll`` applying what arrived, ``catch_up`` reading to the high watermark seen now.
Subclasses say what a record means in :meth:`OneRecordTable._take`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

__all__ = ["OneRecordTable"]

log = logging.getLogger("kflow.tables")

#: The broker holds each fetch of a (mostly idle) table up to this long; it answers as soon as a
#: record arrives, so a table is not asked 100 times a second, on every engine, all the time.
FETCH_WAIT_MS = 500


class OneRecordTable:
    """The records keyed ``key`` of the one-partition ``topic``, applied in order by :meth:`_take`.

    Args:
        consumer_conf: librdkafka consumer settings (no group membership: the partition is assigned).
        topic: The topic.
        key: The key of the table's record; records with other keys are skipped.
        what: What the table holds, for logs (``limits``, ``policies``).
    """

    def __init__(self, consumer_conf: dict[str, Any], topic: str, key: bytes, what: str) -> None:
        self.topic, self.key, self.what = topic, key, what
        self._c = Consumer({**consumer_conf, "group.id": f"kflow-{what}-{uuid.uuid4().hex}",
                            "enable.auto.commit": False, "auto.offset.reset": "earliest",
                            "fetch.wait.max.ms": FETCH_WAIT_MS, "enable.partition.eof": True})
        self._tp = TopicPartition(topic, 0, 0)
        self._c.assign([self._tp])
        self._lock = threading.Lock()  # the polling thread polls; a lane may catch up meanwhile
        # where the last end-of-partition event said the partition ended: a read_committed reader's
        # position stops short of the end when the last offset is a transaction's commit marker
        self._end = -1

    def _take(self, m: Message) -> None:
        """Apply one record with the table's key and a value."""
        raise NotImplementedError

    def poll(self, timeout: float = 0.0) -> int:
        """Apply whatever records arrived; returns how many were read."""
        with self._lock:
            return self._poll(timeout)

    def _poll(self, timeout: float) -> int:
        msgs = self._c.consume(100, timeout)
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._end = max(self._end, m.offset() or 0)
            elif m.key() == self.key and m.value() is not None:
                self._take(m)
        return len(msgs)

    def catch_up(self, timeout: float = 5.0) -> bool:
        """Read to the high watermark seen now; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            try:
                low, high = self._c.get_watermark_offsets(self._tp, timeout=timeout, cached=False)
            except KafkaException as e:
                log.warning("cannot read the end of %s: %s", self.topic, e)
                return False
            while high > low and max(self._c.position([self._tp])[0].offset, self._end) < high:
                if time.monotonic() > deadline:
                    log.warning("%s table behind its high watermark after %.1fs", self.what, timeout)
                    return False
                self._poll(0.005)
        return True

    def close(self) -> None:
        self._c.close()
