"""The dead-letter topic: the one shape of its records, listing what landed there, and replaying it.

Every record on ``dlq`` carries its original key and value unchanged plus headers naming why it
was dead-lettered and where it came from (``kflow.reason``, ``kflow.original.topic``,
``kflow.original.partition``, ``kflow.original.offset``, ``kflow.time``), followed by the original's
own headers. Every writer (the engine, workers, trigger bridges) builds its records with
:func:`dlq_record`. Replaying re-sends the original key, value and non-kflow headers to the
original topic, so the engine (or worker) sees exactly the message it refused before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from confluent_kafka import Message, Producer

from kflow.config import KafkaConfig
from kflow.model.errors import KflowError
from kflow.streams.readend import EndReader

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


@dataclass(frozen=True)
class Original:
    """A dead-lettered message that did not come from a Kafka record (an MQTT message, say).

    ``partition`` and ``offset`` are -1: there is no Kafka position to name.
    """

    topic: str
    key: Optional[bytes]
    value: bytes
    partition: int = -1
    offset: int = -1
    headers: Sequence[tuple[str, bytes]] = ()


def dlq_record(original: Union[Message, Original], reason: str,
               now: int) -> tuple[bytes, Optional[bytes], list[tuple[str, bytes]]]:
    """``(value, key, headers)`` of the DLQ record of ``original``, dead-lettered at ``now`` (epoch ms).

    The value and key are the original's; the headers are the ``kflow.*`` ones of
    :data:`DLQ_HEADERS`, then the original's own headers except any ``kflow.*`` one (so a record
    dead-lettered twice names its latest reason and origin only).
    """
    if isinstance(original, Original):
        topic, partition, offset, key, value = (original.topic, original.partition, original.offset,
                                                original.key, original.value)
        own = list(original.headers)
    else:
        topic, partition, offset, key, value = (original.topic(), original.partition(), original.offset(),
                                                original.key(), original.value() or b"")
        own = list(original.headers() or [])
    headers = [("kflow.reason", reason.encode()), ("kflow.original.topic", topic.encode()),
               ("kflow.original.partition", str(partition).encode()), ("kflow.original.offset", str(offset).encode()),
               ("kflow.time", str(now).encode())]
    headers += [(k, v) for k, v in own if not k.startswith("kflow.")]
    return value, key, headers


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
    """Every record on the dlq topic (oldest first, at most ``limit``), read up to the high watermark.

    Raises:
        BrokerUnavailable: the broker cannot be reached, or the read took longer than ``timeout``.
    """
    topic = config.names.dlq
    with EndReader(config.consumer_conf("kflow-dlq-reader"), timeout=min(timeout, 10)) as reader:
        out: list[DlqRecord] = []
        for m in reader.read(topic, timeout=timeout):
            out.append(_record(m))
            if len(out) >= limit:
                break
    return sorted(out, key=lambda r: (r.time_ms, r.partition, r.offset))[:limit]


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
