"""The ``limits`` topic: the declared quotas and activity limits, read by every engine as a global table.

The topic is compacted with one partition; its record keyed :data:`LIMITS_KEY` holds the whole
limits document (``{"limits": [...]}`` as JSON, see :func:`~kflow.engine.limits.parse_limits`).
``kflow limits apply FILE`` validates the file and replaces the set in one record, so engines see
the old set or the new one, never a mix. Every engine reads the topic to its end at start-up and
keeps polling it: a changed limit applies from the next command its counter decides. A record that
does not validate (written by hand) is logged and skipped: the set in force stays.

With auth on, a record counts only if it is signed (``kflow limits apply`` signs it with
``KFLOW_TOKEN``) by a principal the policy in force allows ``limits_apply`` on ``system:limits`` of
the default tenant (role ``system_admin``, or ``system:Admin`` granted there), as for the
``policies`` topic (:class:`~kflow.streams.onerecord.RecordSigners`): a producer that can write to
the topic cannot lift a quota or throttle everyone. ``kflow limits apply`` writes the record and
its audit record in one transaction.

The table is handed to the engine as ``defs.quotas`` (see :func:`kflow.engine.limits.table_of`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Optional

import orjson
from confluent_kafka import KafkaException, Message, Producer

from kflow.config import KafkaConfig
from kflow.engine.limits import LimitSpec, LimitSpecError, LimitsView, parse_limits
from kflow.model.errors import KflowError
from kflow.security.policy import Policy, Resource, evaluate
from kflow.security.principal import DEFAULT_TENANT, AuthError
from kflow.security.tokens import Keys
from kflow.streams.onerecord import (
    ADMIN_NEEDS,
    OneRecordTable,
    RecordSigners,
    admin_audit,
    producer_error,
    publish_audited,
    sign_record,
)

__all__ = ["LIMITS_KEY", "LimitsTable", "publish_limits", "read_limits"]

log = logging.getLogger("kflow.limits")

#: The key of the limits record.
LIMITS_KEY = b"limits"
#: What applying limits needs, on which resource: limits bind every tenant, as the policy does.
_APPLY = ("limits_apply", Resource("system", "limits", DEFAULT_TENANT))


class LimitsTable(LimitsView, OneRecordTable):
    """The limits in force, fed from the ``limits`` topic.

    Args:
        consumer_conf: librdkafka consumer settings (no group membership: the partition is assigned).
        topic: The limits topic.
        keys: With auth on, the keys limits records must be signed with; None: records count unsigned.
        policy: With auth on, the policy in force (who may apply limits).
    """

    def __init__(self, consumer_conf: dict[str, Any], topic: str, keys: Optional[Keys] = None,
                 policy: Optional[Callable[[], Policy]] = None) -> None:
        LimitsView.__init__(self, [])
        OneRecordTable.__init__(self, consumer_conf, topic, LIMITS_KEY, "limits")
        self._signers = RecordSigners(keys, policy or Policy, *_APPLY, ADMIN_NEEDS, "applying limits")
        self.offset = -1
        """Offset of the record the limits in force came from (-1: none yet)."""

    def _take(self, m: Message) -> None:
        offset = m.offset() or 0
        where = f"{self.topic}@{offset}"
        try:
            specs = parse_limits(orjson.loads(m.value()), where)  # type: ignore[arg-type]  # a value: see OneRecordTable
            who = self._signers.signer(m)
        except (orjson.JSONDecodeError, LimitSpecError, AuthError) as e:
            log.error("ignoring the limits record at %s (the limits in force stay): %s", where, e)
            return
        self.replace(specs)
        self.offset = offset
        log.info("limits from %s in force%s: %s", where, f" (applied by {who.name} of {who.tenant})" if who else "",
                 ", ".join(s.name for s in specs) or "none")


def publish_limits(config: KafkaConfig, doc: Any, source: str, timeout: float = 30.0) -> tuple[int, list[LimitSpec]]:
    """Validate ``doc`` and make it the set of limits in force; returns (offset, the limits).

    The record and its audit record are written in one transaction. With ``KFLOW_TOKEN`` set (or
    auth on) the record is signed as the token's principal, so engines with auth on accept it.

    Raises:
        LimitSpecError: the document does not validate; nothing is written.
        KflowError: the topic does not exist, or producing failed.
        BrokerUnavailable: the broker cannot be reached.
        KeyConfigError, AuthError: auth is on and the record cannot be signed, or (``Forbidden``,
            audited) the policy in force does not let its signer apply limits.
    """
    specs = parse_limits(doc, source)  # before anything is written
    names = config.names
    value = orjson.dumps({"limits": [{k: v for k, v in _declared(s).items() if v is not None} for s in specs]})
    headers, who = sign_record(config, LIMITS_KEY, value)
    if who is not None and config.auth:  # refused here, with its audit record, rather than ignored by every engine
        from kflow.streams.policies import read_policy

        verdict = evaluate(read_policy(config, timeout), who, *_APPLY)
        if not verdict.allowed:
            _audit_denied(config, admin_audit(who, "limits_apply", "limits", "denied", {"reason": verdict.reason},
                                              source), timeout)
            raise AuthError("Forbidden", f"applying limits needs {ADMIN_NEEDS}: {verdict.reason}")
    audit = admin_audit(who, "limits_apply", "limits", "success",
                        {"limits": ", ".join(s.name for s in specs) or "none"}, source)
    return publish_audited(config, names.limits, LIMITS_KEY, value, headers, audit, "applying the limits",
                           timeout), specs


def _audit_denied(config: KafkaConfig, audit: bytes, timeout: float) -> None:
    """Write the audit record of a refused ``kflow limits apply`` (nothing else is written)."""
    producer = Producer(config.producer_conf(**{"acks": "all", "enable.idempotence": True}))
    try:
        producer.produce(config.names.audit, audit, LIMITS_KEY)
        if producer.flush(timeout):
            log.warning("the audit record of a refused limits apply was not confirmed within %gs", timeout)
    except KafkaException as e:
        raise producer_error(config, e, "auditing the refused limits apply") from None


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
    """The limits in force, read to the end of the topic (close the table when done); with auth on,
    only signed records count, as in an engine (the policy in force read first)."""
    keys = policy = None
    if config.auth:
        from kflow.streams.policies import read_policy

        keys, in_force = config.keys(), read_policy(config, timeout)
        policy = lambda: in_force  # noqa: E731  # the policy read once, as of now
    table = LimitsTable(config.consumer_conf("kflow-limits-read"), config.names.limits, keys, policy)
    if not table.catch_up(timeout):
        table.close()
        raise KflowError(f"could not read {config.names.limits} to its end within {timeout:g}s")
    return table
