"""The ``policies`` topic: the policy every engine enforces, read as a global table and replaced live.

The topic is compacted with one partition; its record keyed :data:`POLICY_KEY` holds the policy
document (JSON or YAML, as :func:`~kflow.security.policy.parse_policy` validates). Every engine
reads it to the end at start-up and keeps polling it, so ``kflow policy apply`` takes effect
everywhere without a restart; an engine about to refuse a command reads the table to its high
watermark first (once per batch), so a grant applied before a command was sent counts for it.

With auth on, a record counts only if it carries a command token (``kflow policy apply`` signs
it) that verifies at the record's time, was not used before, and names a principal the policy in
force allows ``policy_apply`` on ``system:policy`` of the default tenant (role ``system_admin``,
or ``system:Admin`` granted in the default tenant), because the policy governs every tenant. A
producer that can write to the topic cannot grant itself anything. The record's time is the
latest record timestamp read so far, so a record produced with a timestamp in the past cannot
revive an expired token. An invalid or refused record is logged and skipped: the previous policy
stays in force. Before any record counts, the policy is empty, which allows only ``system_admin``
and owners.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import orjson
import yaml
from confluent_kafka import Message

from kflow.config import KafkaConfig
from kflow.security.policy import Policy, PolicyError, Resource, parse_policy
from kflow.security.principal import DEFAULT_TENANT, AuthError
from kflow.security.tokens import Keys
from kflow.streams.onerecord import (
    ADMIN_NEEDS,
    OneRecordTable,
    RecordSigners,
    admin_audit,
    publish_audited,
    sign_record,
)

__all__ = ["POLICY_KEY", "PolicyTable", "publish_policy", "read_policy"]

log = logging.getLogger("kflow.policies")

#: The key of the policy record.
POLICY_KEY = b"policy"
#: What applying a policy needs, on which resource.
_APPLY = ("policy_apply", Resource("system", "policy", DEFAULT_TENANT))


class PolicyTable(OneRecordTable):
    """The policy in force, fed from the ``policies`` topic.

    Args:
        consumer_conf: librdkafka consumer settings (no group membership: the partition is assigned).
        topic: The policies topic.
        keys: With auth on, the keys policy records must be signed with; None: records count unsigned.
    """

    def __init__(self, consumer_conf: dict[str, Any], topic: str, keys: Optional[Keys] = None) -> None:
        super().__init__(consumer_conf, topic, POLICY_KEY, "policies")
        self.keys = keys
        # the policy in force says who may replace it
        self._signers = RecordSigners(keys, lambda: self.policy, *_APPLY, ADMIN_NEEDS, "applying a policy")
        self.policy = Policy()
        """The policy in force."""
        self.offset = -1
        """Offset of the record the policy in force came from (-1: none yet)."""

    def _take(self, m: Message) -> None:
        self._apply(m)

    def _apply(self, m: Message) -> None:
        where = f"{self.topic}@{m.offset()}"
        try:
            value = m.value()
            assert value is not None  # only records with a value are applied
            doc = yaml.safe_load(value)
            policy = parse_policy(doc, where)
            who = self._signers.signer(m)
        except (yaml.YAMLError, PolicyError, AuthError) as e:
            log.error("ignoring the policy record at %s (the policy in force stays): %s", where, e)
            return
        self.policy, self.offset = policy, m.offset() or 0
        log.info("policy from %s in force%s: %d role(s), %d tenant(s) with bindings or grants", where,
                 f" (applied by {who.name} of {who.tenant})" if who else "", len(policy.roles),
                 len(set(policy.bindings) | set(policy.grants)))


def read_policy(config: KafkaConfig, timeout: float = 10.0) -> Policy:
    """The policy in force: the ``policies`` topic read to its end, its records verified with
    ``config``'s keys as an engine does (what ``kflow dlq replay`` asks when a token's roles alone
    do not allow it)."""
    table = PolicyTable(config.consumer_conf("kflow-policies"), config.names.policies, config.keys())
    try:
        table.catch_up(timeout)
        return table.policy
    finally:
        table.close()


def publish_policy(config: KafkaConfig, policy: Policy, source: str, timeout: float = 30.0) -> int:
    """Produce ``policy`` to the ``policies`` topic with its audit record, in one transaction.

    With ``KFLOW_TOKEN`` set (or auth on) the record is signed as the token's principal, so
    engines with auth on accept it. Returns the record's offset.

    Raises:
        KflowError: the topic does not exist, or the transaction failed.
        BrokerUnavailable: the broker cannot be reached.
        KeyConfigError, AuthError: auth is on and the record cannot be signed.
    """
    value = orjson.dumps(policy.model_dump(mode="json"))
    headers, who = sign_record(config, POLICY_KEY, value)
    audit = admin_audit(who, "policy_apply", "policy", "success",
                        {"roles": len(policy.roles),
                         "tenants": ", ".join(sorted(set(policy.bindings) | set(policy.grants)))}, source)
    return publish_audited(config, config.names.policies, POLICY_KEY, value, headers, audit, "applying the policy",
                           timeout)
