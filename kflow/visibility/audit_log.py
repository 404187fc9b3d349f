"""Reading the ``audit`` topic: the audit records, filtered, in order.

Used by the API server (``GET`` of the audit trail) and by ``kflow audit list``. It needs only
Kafka, not the ``visibility`` extra.
"""

from __future__ import annotations

from typing import Optional

from confluent_kafka import KafkaException, TopicPartition

from kflow.config import KafkaConfig
from kflow.model.errors import BrokerUnavailable, DecodeError, KflowError
from kflow.readend import EndReader
from kflow.security.audit import AuditRecord, decode_audit

__all__ = ["read_audit"]


def read_audit(config: KafkaConfig, *, since_ms: Optional[int] = None, principal: Optional[str] = None,
               outcome: Optional[str] = None, timeout: float = 30.0) -> list[AuditRecord]:
    """The audit records on the ``audit`` topic (read to its end), filtered, in order.

    Records of one instance are in one partition, in the order their decisions committed; the
    partitions are merged by time (then partition and offset).

    Raises:
        BrokerUnavailable: the topic could not be read.
        KflowError: the topic does not exist.
    """
    topic = config.names.audit
    found: list[tuple[int, int, int, AuditRecord]] = []
    with EndReader(config.consumer_conf("kflow-audit-reader"), timeout=min(timeout, 10)) as reader:
        partitions = reader.partitions(topic)
        if not partitions:
            raise KflowError(f"topic {topic} does not exist: start an engine (it creates it)")
        start = _offsets_since(reader, topic, partitions, since_ms) if since_ms is not None else None
        for m in reader.read(topic, partitions, start=start, timeout=timeout, what="reading the audit trail"):
            try:
                r = decode_audit(m.value() or b"")
            except DecodeError:
                continue  # not an audit record: nothing to show
            if ((since_ms is None or r.time >= since_ms) and (principal is None or r.principal == principal)
                    and (outcome is None or r.outcome == outcome)):
                found.append((r.time, m.partition() or 0, m.offset() or 0, r))
    return [r for *_, r in sorted(found, key=lambda f: f[:3])]


def _offsets_since(reader: EndReader, topic: str, partitions: list[int], since_ms: int) -> dict[int, int]:
    """Per partition, the first offset at or after ``since_ms`` (its end when there is none)."""
    try:
        found = reader.consumer.offsets_for_times([TopicPartition(topic, p, since_ms) for p in partitions],
                                                  timeout=reader.timeout)
    except KafkaException as exc:
        raise BrokerUnavailable(reader.bootstrap, f"cannot look up offsets of {topic}: {exc}") from None
    marks = reader.watermarks(topic, partitions)
    return {tp.partition: tp.offset if tp.offset >= 0 else marks[tp.partition][1] for tp in found}
