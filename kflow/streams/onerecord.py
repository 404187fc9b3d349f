"""A global table held in one record: the latest record with a given key on a one-partition topic.

The ``limits`` and ``policies`` topics are compacted with one partition, and the whole declaration
is one record (so every engine sees the old set or the new one, never a mix). Every engine reads
such a topic with :class:`OneRecordTable`: a consumer assigned (no group) to partition 0 from its
beginning, ``poll`` applying what arrived, ``catch_up`` reading to the high watermark seen now.
Subclasses say what a record means in :meth:`OneRecordTable._take`; with auth on, a
:class:`RecordSigners` says who signed a record and whether that principal may make it.
:func:`publish_audited` writes a table's record (signed with :func:`sign_record`) with its audit
record in one transaction, as ``kflow policy apply`` and ``kflow limits apply`` do.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Optional, cast

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from kflow.config import KafkaConfig
from kflow.model.errors import BrokerUnavailable, KflowError
from kflow.security.audit import AuditOutcome, AuditRecord, encode_audit
from kflow.security.policy import Policy, Resource, evaluate
from kflow.security.principal import DEFAULT_TENANT, AuthError, Principal
from kflow.security.tokens import COMMAND_HEADER, Keys, ReplayCache, verify_command

__all__ = ["ADMIN_NEEDS", "OneRecordTable", "RecordSigners", "admin_audit", "producer_error", "publish_audited",
           "sign_record"]

log = logging.getLogger("kflow.tables")

#: Who may write a table that binds every tenant (the policy, the limits).
ADMIN_NEEDS = "role system_admin, or system:Admin in the default tenant"
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


class RecordSigners:
    """Who signed the records of a one-record table, and whether they may: with auth on, a record
    counts only if it carries a command token (the CLI signs it) that verifies at the record's
    time, was not used before, and names a principal the policy in force allows ``action`` on
    ``resource``. A producer that can write to the topic cannot make a record count by itself.

    The record's time is the latest record timestamp read so far, so a record produced with a
    timestamp in the past cannot revive an expired token, and the table's last record still
    counts when an engine reads it again at start-up, long after it was signed.

    Args:
        keys: The keys records must be signed with; None (auth off): records count unsigned.
        policy: The policy in force.
        action: The operation a record is (``policy_apply``, ``limits_apply``).
        resource: What it acts on.
        needs: What that takes, in words, for the log line of a refused record.
        doing: The operation in words (``applying a policy``).
    """

    def __init__(self, keys: Optional[Keys], policy: Callable[[], Policy], action: str, resource: Resource,
                 needs: str, doing: str) -> None:
        self.keys, self._policy, self.action, self.resource = keys, policy, action, resource
        self.needs, self.doing = needs, doing
        self._seen = ReplayCache(10_000)
        self._clock_s = 0.0

    def signer(self, m: Message) -> Optional[Principal]:
        """Who signed ``m`` (None when auth is off).

        Raises:
            AuthError: auth is on and the record is unsigned, badly signed, replayed, or its
                signer may not make it.
        """
        kind, ts_ms = m.timestamp()
        self._clock_s = max(self._clock_s, time.time() if kind == TIMESTAMP_NOT_AVAILABLE else ts_ms / 1000)
        if self.keys is None:
            return None
        headers = cast("Optional[list[tuple[str, bytes]]]", m.headers())  # a consumed record's: a list or None
        token = next((v for k, v in (headers or []) if k == COMMAND_HEADER), None)
        who = verify_command(token, m.key(), m.value(), self.keys, self._clock_s, self._seen)
        self._seen.commit()
        verdict = evaluate(self._policy(), who, self.action, self.resource)
        if not verdict.allowed:
            raise AuthError("Forbidden", f"{self.doing} needs {self.needs}: {verdict.reason}")
        return who


def sign_record(config: KafkaConfig, key: bytes, value: bytes) -> tuple[Optional[list[tuple[str, str | bytes | None]]],
                                                                          Optional[Principal]]:
    """``(headers, signer)`` of a table record: signed as ``KFLOW_TOKEN``'s principal when it is set
    (or auth is on), else no headers and no signer.

    Raises:
        KeyConfigError, AuthError: the record cannot be signed.
    """
    signer = config.command_signer()
    if signer is None:
        return None, None
    return [signer.header(key, value)], signer.principal()


def admin_audit(who: Optional[Principal], action: str, table: str, outcome: AuditOutcome, details: dict[str, Any],
                source: str) -> bytes:
    """The audit record of writing table ``table`` (resource ``system:<table>``), encoded."""
    return encode_audit(AuditRecord(id=f"{table}:{uuid.uuid4().hex}", time=int(time.time() * 1000),
                                    principal=who.name if who else "", tenant=who.tenant if who else DEFAULT_TENANT,
                                    action=action, resource_type="system", resource_id=table, outcome=outcome,
                                    details=details, source=source))


def producer_error(config: KafkaConfig, e: KafkaException, doing: str) -> KflowError:
    """What producing for ``doing`` failing with ``e`` is: the broker unreachable, or another failure."""
    err = e.args[0] if e.args else None
    if getattr(err, "code", lambda: None)() in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
                                                 KafkaError._ALL_BROKERS_DOWN):
        return BrokerUnavailable(config.bootstrap, f"{doing} failed: {err}")
    return KflowError(f"{doing} failed: {err or e}")


def publish_audited(config: KafkaConfig, topic: str, key: bytes, value: bytes,
                    headers: Optional[list[tuple[str, str | bytes | None]]], audit: bytes, doing: str,
                    timeout: float) -> int:
    """Write a table's record and its audit record (keyed ``key`` too) in one transaction; returns the
    record's offset.

    Raises:
        KflowError: the topic does not exist, or the transaction failed.
        BrokerUnavailable: the broker cannot be reached.
    """
    names = config.names
    producer = Producer(config.producer_conf(**{"transactional.id": f"{names.prefix}{key.decode()}-apply",
                                                "acks": "all"}))
    offsets: list[int] = []
    try:
        meta = producer.list_topics(topic, timeout=timeout)
        found = meta.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise KflowError(f"topic {topic} does not exist: start an engine (it creates it) or run "
                             f"`kflow topics ensure --prefix {names.prefix}`")
        producer.init_transactions(timeout)
        producer.begin_transaction()
        producer.produce(topic, value, key, headers=headers,
                         on_delivery=lambda err, msg: offsets.append(msg.offset() or 0) if err is None else None)
        producer.produce(names.audit, audit, key)
        producer.commit_transaction(timeout)
    except KafkaException as e:
        raise producer_error(config, e, doing) from None
    if not offsets:
        raise KflowError(f"the {key.decode()} record was not confirmed")
    return offsets[0]
