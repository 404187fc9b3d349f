"""The ``limits`` topic: the declared quotas and activity limits, read by every engine as a global table.

The topic is compacted with one partition; its record keyed :data:`LIMITS_KEY` holds the whole
limits document (``{"limits": [...]}`` as JSON, see :func:`~kflow.engine.limits.parse_limits`).
``kflow limits apply FILE`` validates the file and replaces the set in one record, so engines see
the old set or the new one, never a mix. Every engine reads the topic to its end at start-up and
keeps polling it: a changed limit applies from the next command its counter decides. A record that
does not validate (written by hand) is logged and skipped: the set in force stays.

The table is handed to the engine as ``defs.quotas`` (see :func:`kflow.engine.limits.table_of`).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from kflow.config import KafkaConfig
from kflow.engine.limits import LimitSpec, LimitSpecError, LimitsView, parse_limits
from kflow.model.errors import BrokerUnavailable, KflowError
from kflow.streams.onerecord import OneRecordTable

__all__ = ["LIMITS_KEY", "LimitsTable", "publish_limits", "read_limits"]

log = logging.getLogger("kflow.limits")

#: The key of the limits record.
LIMITS_KEY = b"limits"


class LimitsTable(LimitsView, OneRecordTable):
    """The limits in force, fed from the ``limits`` topic.

    Args:
        consumer_conf: librdkafka consumer settings (no group membership: the partition is assigned).
        topic: The limits topic.
    """

    def __init__(self, consumer_conf: dict[str, Any], topic: str) -> None:
        LimitsView.__init__(self, [])
        OneRecordTable.__init__(self, consumer_conf, topic, LIMITS_KEY, "limits")
        self.offset = -1
        """Offset of the record the limits in force came from (-1: none yet)."""

    def _take(self, m: Message) -> None:
        offset = m.offset() or 0
        where = f"{self.topic}@{offset}"
        try:
            specs = parse_limits(orjson.loads(m.value()), where)  # type: ignore[arg-type]  # a value: see OneRecordTable
        except (orjson.JSONDecodeError, LimitSpecError) as e:
            log.error("ignoring the limits record at %s (the limits in force stay): %s", where, e)
            return
        self.replace(specs)
        self.offset = offset
        log.info("limits from %s in force: %s", where, ", ".join(s.name for s in specs) or "none")


def _producer_error(config: KafkaConfig, e: KafkaException, doing: str) -> KflowError:
    err = e.args[0] if e.args else None
    if getattr(err, "code", lambda: None)() in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
                                                 KafkaError._ALL_BROKERS_DOWN):
        return BrokerUnavailable(config.bootstrap, f"{doing} failed: {err}")
    return KflowError(f"{doing} failed: {err or e}")


def publish_limits(config: KafkaConfig, doc: Any, source: str, timeout: float = 30.0) -> tuple[int, list[LimitSpec]]:
    """Validate ``doc`` and make it the set of limits in force; returns (offset, the limits).

    Raises:
        LimitSpecError: the document does not validate; nothing is written.
        KflowError: the topic does not exist, or producing failed.
        BrokerUnavailable: the broker cannot be reached.
    """
    specs = parse_limits(doc, source)  # before anything is written
    names = config.names
    value = orjson.dumps({"limits": [{k: v for k, v in _declared(s).items() if v is not None} for s in specs]})
    producer = Producer(config.producer_conf(**{"acks": "all", "enable.idempotence": True}))
    offsets: list[int] = []
    try:
        meta = producer.list_topics(names.limits, timeout=timeout)
        found = meta.topics.get(names.limits)
        if found is None or found.error is not None or not found.partitions:
            raise KflowError(f"topic {names.limits} does not exist: start an engine (it creates it) or run "
                             f"`kflow topics ensure --prefix {names.prefix}`")
        producer.produce(names.limits, value, LIMITS_KEY,
                         on_delivery=lambda err, msg: offsets.append(msg.offset() or 0) if err is None else None)
        producer.flush(timeout)
    except KafkaException as e:
        raise _producer_error(config, e, "applying the limits") from None
    if not offsets:
        raise KflowError("the limits record was not confirmed")
    return offsets[0], specs


def _declared(s: LimitSpec) -> dict[str, Any]:
    """A limit back in its file form (what :func:`~kflow.engine.limits.parse_limits` reads)."""
    doc: dict[str, Any] = {"name": s.name, s.scope: s.match, "per": s.per}
    if s.scope == "activity":
        doc.update(max_in_flight=s.max_concurrent, rate=s.rate)
    else:
        doc.update(max_running=s.max_concurrent, starts_per_second=s.rate)
    doc["burst_size"] = s.burst_size
    if s.policy == "burst":
        doc["policy"] = {"burst": {"factor": s.burst_factor, "max_duration": s.burst_ms / 1000}}
    else:
        doc["policy"] = s.policy
    return doc


def read_limits(config: KafkaConfig, timeout: float = 10.0) -> LimitsTable:
    """The limits in force, read to the end of the topic (close the table when done)."""
    table = LimitsTable(config.consumer_conf("kflow-limits-read"), config.names.limits)
    if not table.catch_up(timeout):
        table.close()
        raise KflowError(f"could not read {config.names.limits} to its end within {timeout:g}s")
    return table
