"""The dead-letter topic: the one shape of its records, listing what landed there, and replaying it.

Every record on ``dlq`` carries its original key and value unchanged plus headers naming why it
was dead-lettered and where it came from (``kflow.reason``, ``kflow.original.topic``,
``kflow.original.partition``, ``kflow.original.offset``, ``kflow.time``), followed by the original's
own headers. Every writer (the engine, workers, trigger bridges) builds its records with
:func:`dlq_record`. Replaying re-sends the original key, value and non-kflow headers to the
original topic, so the engine (or worker) sees exactly the message it refused before.

Replaying is an operator's act on every tenant's records: with ``KFLOW_AUTH=on`` (or a
``KFLOW_TOKEN`` set) the operator's principal must be allowed ``dlq_replay`` (``system:Admin``:
role ``system_admin``, or ``system:Admin`` granted in tenant ``default``), checked before anything
is sent, and every record replayed to the ``commands`` topic is signed again as that principal
(a dead letter does not keep its original token, which an engine would refuse as used anyway).
The engine then checks the new signature and the operator's permission for the command itself.
Each replay, and each refused one, writes an audit record (action ``dlq_replay``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

from confluent_kafka import Message, Producer

from kflow.config import KafkaConfig
from kflow.model.errors import KflowError
from kflow.readend import EndReader
from kflow.security.audit import AuditOutcome, AuditRecord, encode_audit
from kflow.security.policy import Policy, Resource, Verdict, evaluate
from kflow.security.principal import DEFAULT_TENANT, SYSTEM_ADMIN, AuthError, Principal

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


#: The policy action replaying dead letters is, and what it acts on: the DLQ holds every tenant's records.
REPLAY_ACTION = "dlq_replay"
REPLAY_RESOURCE = Resource("system", "dlq", DEFAULT_TENANT)
_REPLAY_NEEDS = "role system_admin, or system:Admin granted in tenant 'default'"


#: Reads the policy in force (``config``, a timeout in seconds): the ``policies`` topic to its end,
#: verifying its records as an engine does (``kflow.streams.policies.read_policy``).
PolicyReader = Callable[[KafkaConfig, float], Policy]


def replay_verdict(config: KafkaConfig, who: Principal, read_policy: PolicyReader, timeout: float = 10.0) -> Verdict:
    """Whether ``who`` may replay dead letters: by its token's roles, else by the policy in force.

    ``read_policy`` is called only when the token does not carry role ``system_admin`` itself.
    """
    policy = read_policy(config, timeout) if SYSTEM_ADMIN not in who.roles else Policy()
    return evaluate(policy, who, REPLAY_ACTION, REPLAY_RESOURCE)


def replay(config: KafkaConfig, records: Iterable[DlqRecord], *, read_policy: PolicyReader, source: str = "") -> int:
    """Re-send each record's original key, value and headers to its original topic; returns the count.

    With a signer (``KFLOW_TOKEN``; required with auth on) its principal must be allowed
    ``dlq_replay`` before anything is sent, and records for the ``commands`` topic are signed as
    it; see the module docstring.

    Args:
        config: Connection, topic prefix and the operator's token and keys.
        records: The dead letters to replay.
        read_policy: Reads the policy in force, when the token's roles do not allow the replay alone.
        source: Where the replay was asked from, for the audit record (``cli:<host>``).

    Raises:
        AuthError: ``Unauthenticated`` (the token does not verify) or ``Forbidden`` (not system:Admin);
            nothing was sent.
        KeyConfigError: auth is on without a token, or the keys cannot sign.
        KflowError: a record has no original topic, or a delivery failed.
    """
    chosen = list(records)
    signer = config.command_signer()
    who = signer.principal() if signer is not None else None
    p = Producer(config.producer_conf())
    if who is not None:
        verdict = replay_verdict(config, who, read_policy)
        if not verdict.allowed:
            _audit(p, config, who, "denied", {"reason": verdict.reason, "records": len(chosen)}, source)
            p.flush(30)
            raise AuthError("Forbidden", f"replaying dead letters needs {_REPLAY_NEEDS}: {verdict.reason}")
    failures: list[str] = []
    n = 0
    for r in chosen:
        if not r.original_topic:
            failures.append(f"{r.ref}: no original topic header")
            continue
        headers = list(r.headers)
        if signer is not None and r.original_topic == config.names.commands:
            headers.append(signer.header(r.key, r.value))  # bound to exactly this key and value
        p.produce(r.original_topic, r.value, r.key, headers=headers or None,
                  on_delivery=lambda err, _m, ref=r.ref: failures.append(f"{ref}: {err}") if err else None)
        n += 1
    p.flush(30)
    if failures:
        raise KflowError("replay failed for " + "; ".join(failures))
    if who is not None:  # recorded once every replayed record is acknowledged
        _audit(p, config, who, "success", {"records": n, "refs": ", ".join(r.ref for r in chosen[:100])}, source)
        p.flush(30)
    return n


def _audit(producer: Producer, config: KafkaConfig, who: Principal, outcome: AuditOutcome,
           details: dict[str, object], source: str) -> None:
    record = AuditRecord(id=f"dlq:{uuid.uuid4().hex}", time=int(time.time() * 1000), principal=who.name,
                         tenant=who.tenant, action=REPLAY_ACTION, resource_type=REPLAY_RESOURCE.type,
                         resource_id=REPLAY_RESOURCE.id, outcome=outcome, details=details,  # type: ignore[arg-type]
                         source=source)
    producer.produce(config.names.audit, encode_audit(record), b"dlq")
