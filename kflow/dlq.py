"""The dead-letter topic as an operator sees it: list what landed there, and replay it after a fix.

Every record on ``dlq`` carries its original key and value unchanged plus headers naming why it
was dead-lettered and where it came from (``kflow.reason``, ``kflow.original.topic``,
``kflow.original.partition``, ``kflow.original.offset``, ``kflow.time``). Replaying re-sends the
original key, value and non-kflow headers to the original topic, so the engine (or worker) sees
exactly the message it refused before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from kflow.config import KafkaConfig
from kflow.model.errors import BrokerUnavailable, KflowError

DLQ_HEADERS = ("kflow.reason", "kflow.original.topic", "kflow.original.partition", "kflow.original.offset",
               "kflow.time")


@dataclass
class DlqRecord:
    """One dead-lettered message and where it came from."""

    partition: int
    offset: int
    key: Optional[bytes]
    value: bytes
    reason: str
    original_topic: str
    original_partition: int
    original_offset: int
    time_ms: int
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def ref(self) -> str:
        """``partition:offset`` on the dlq topic — what ``kflow dlq replay --ref`` takes."""
        return f"{self.partition}:{self.offset}"


def _record(m: object) -> DlqRecord:
    hs = list(m.headers() or [])  # type: ignore[attr-defined]
    h = {k: (v or b"").decode("utf-8", "replace") for k, v in hs}
    return DlqRecord(
        partition=m.partition(), offset=m.offset(), key=m.key(), value=m.value() or b"",  # type: ignore[attr-defined]
        reason=h.get("kflow.reason", "?"), original_topic=h.get("kflow.original.topic", ""),
        original_partition=int(h.get("kflow.original.partition", "-1") or -1),
        original_offset=int(h.get("kflow.original.offset", "-1") or -1), time_ms=int(h.get("kflow.time", "0") or 0),
        headers=[(k, v) for k, v in hs if not k.startswith("kflow.")])


def read_dlq(config: KafkaConfig, limit: int = 1000, timeout: float = 15.0) -> list[DlqRecord]:
    """Every record on the dlq topic (oldest first, at most ``limit``), read up to the high watermark."""
    topic = config.names.dlq
    c = Consumer(config.consumer_conf("kflow-dlq-reader", **{"enable.partition.eof": True}))
    try:
        try:
            md = c.list_topics(topic, timeout=min(timeout, 10))
        except Exception as e:  # KafkaException: the broker cannot be reached
            raise BrokerUnavailable(config.bootstrap, str(e)) from None
        if topic not in md.topics or md.topics[topic].error is not None:
            return []
        ends: dict[int, int] = {}
        tps = []
        for p in md.topics[topic].partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout, cached=False)
            if high > low:
                ends[p] = high
                tps.append(TopicPartition(topic, p, low))
        if not tps:
            return []
        c.assign(tps)
        out: list[DlqRecord] = []
        deadline = time.monotonic() + timeout
        while ends and len(out) < limit:
            if time.monotonic() > deadline:
                raise KflowError(f"reading {topic} took longer than {timeout:g}s")
            for m in c.consume(500, 0.2):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        ends.pop(m.partition(), None)
                    continue
                out.append(_record(m))
                if m.offset() + 1 >= ends.get(m.partition(), 0):
                    ends.pop(m.partition(), None)
        return sorted(out, key=lambda r: (r.time_ms, r.partition, r.offset))[:limit]
    finally:
        c.close()


def replay(config: KafkaConfig, records: Iterable[DlqRecord]) -> int:
    """Re-send each record's original key, value and headers to its original topic; returns the count."""
    p = Producer(config.producer_conf())
    failures: list[str] = []
    n = 0
    for r in records:
        if not r.original_topic:
            failures.append(f"{r.ref}: no original topic header")
            continue
        p.produce(r.original_topic, r.value, r.key, headers=r.headers or None,
                  on_delivery=lambda err, _m, ref=r.ref: failures.append(f"{ref}: {err}") if err else None)
        n += 1
    p.flush(30)
    if failures:
        raise KflowError("replay failed for " + "; ".join(failures))
    return n
