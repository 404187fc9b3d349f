"""Name kflow's Kafka topics and make sure they exist with the configuration kflow relies on.

Topic names hang off one prefix (``kflow.`` by default) so several environments can share a
cluster; :class:`TopicNames` and :class:`TopicSettings` are defined in :mod:`kflow.model.topics` and
re-exported here. On start-up :func:`ensure_topics` creates whatever is missing with explicit configs
(partitions, ``cleanup.policy``, ``retention.ms``, ``max.message.bytes``) and checks that topics
which already exist have the partition count and cleanup policy kflow needs, raising
:class:`TopicConfigMismatch` otherwise; an unreachable cluster raises :class:`BrokerUnavailable`
within the timeout. A queue has one task topic per priority level: ``tasks.<queue>`` (normal) and
``tasks.<queue>.p<level>`` (1, 2, 4, 5). Every instance-keyed topic (commands, events, state, engine-state, journal,
``tasks.<queue>[.p<level>]``), the DLQ and the audit trail share one partition count so they are
co-partitioned; ``definitions``, ``policies``, ``schedules`` and ``batches`` are global tables with a single partition.
With a Schema Registry configured (``TopicSettings.schema_registry_url``), ensuring topics also registers
their value schemas (:mod:`kflow.schemas.registry`).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from kflow.model.errors import BrokerUnavailable, KflowError, TopicConfigMismatch
from kflow.model.messages import NORMAL_PRIORITY, PRIORITIES
from kflow.model.topics import TopicNames, TopicSettings

__all__ = ["PartitionCountMismatch", "TopicNames", "TopicSettings", "TopicSpec", "ensure_topics", "ensure_task_topic",
           "level_topics", "topic_specs"]

_POLL_S = 0.05  # metadata re-check interval while waiting for new topics to appear
_LEVELS = sorted(PRIORITIES.values())
_UNREACHABLE = frozenset({KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN})


class PartitionCountMismatch(TopicConfigMismatch):
    """An existing topic has another partition count than the one configured.

    The fix is to configure the count the topics have (the partition count of existing topics
    cannot be lowered, and raising it moves keys), or to use fresh topics under another prefix.
    """

    def __init__(self, topic: str, expected: int, actual: int) -> None:
        super().__init__(topic, "partitions", expected, actual)
        self.args = (f"topic '{topic}': expected partitions={expected}, but the broker has partitions={actual}; "
                     f"set KFLOW_PARTITIONS={actual} (or --partitions {actual}) to match the existing topics, "
                     "or use another prefix (KFLOW_TOPIC_PREFIX) for new ones",)


def level_topics(task_topic: str) -> dict[str, int]:
    """Every topic of the queue whose (normal) task topic is ``task_topic`` -> its level, most urgent first."""
    return {task_topic if level == NORMAL_PRIORITY else f"{task_topic}.p{level}": level
            for level in _LEVELS}


#: Query answers are read within seconds of being written; an hour is plenty.
REPLIES_RETENTION_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """What one topic must look like."""

    name: str
    partitions: int
    cleanup_policy: str  # "delete" or "compact"
    retention_ms: int  # -1 = forever

    def configs(self, settings: TopicSettings) -> dict[str, str]:
        """The topic configs kflow sets explicitly at creation."""
        return {
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention_ms),
            "max.message.bytes": str(settings.max_message_bytes),
        }


def _task_spec(names: TopicNames, settings: TopicSettings, queue: str, priority: int | None = None) -> TopicSpec:
    return TopicSpec(names.tasks(queue, priority), settings.partitions, "delete", settings.commands_retention_ms)


def topic_specs(names: TopicNames, settings: TopicSettings, queues: Iterable[str] = ()) -> list[TopicSpec]:
    """Every topic kflow needs, per the Topics table of the design."""
    p = settings.partitions
    specs = [
        TopicSpec(names.commands, p, "delete", settings.commands_retention_ms),
        TopicSpec(names.events, p, "delete", settings.events_retention_ms),
        TopicSpec(names.state, p, "compact", -1),
        TopicSpec(names.engine_state, p, "compact", -1),
        TopicSpec(names.journal, p, "compact", -1),
        TopicSpec(names.definitions, 1, "compact", -1),
        TopicSpec(names.policies, 1, "compact", -1),
        TopicSpec(names.schedules, 1, "compact", -1),
        TopicSpec(names.limits, 1, "compact", -1),
        TopicSpec(names.batches, 1, "compact", -1),
        TopicSpec(names.dlq, p, "delete", settings.events_retention_ms),
        TopicSpec(names.audit, p, "delete", settings.audit_retention_ms),
        TopicSpec(names.replies, p, "delete", REPLIES_RETENTION_MS),
    ]
    specs += [_task_spec(names, settings, q, level) for q in dict.fromkeys(queues) for level in _LEVELS]
    return specs


# --------------------------------------------------------------------------- public entry points


def ensure_topics(
    admin_conf: Mapping[str, Any],
    names: TopicNames,
    settings: TopicSettings,
    queues: Sequence[str] = (),
    timeout: float = 15.0,
) -> None:
    """Create kflow's missing topics and verify the existing ones; see the module docstring."""
    specs = topic_specs(names, settings, queues)
    admin = AdminClient(dict(admin_conf))
    _ensure(admin, _bootstrap(admin_conf), specs, settings, time.monotonic() + timeout)
    _register_schemas(settings, names, [s.name for s in specs])
    _known_for(admin_conf).update(names.tasks(q, level) for q in queues for level in _LEVELS)


def ensure_task_topic(
    admin: AdminClient | Mapping[str, Any],
    names: TopicNames,
    settings: TopicSettings,
    queue: str,
    timeout: float = 15.0,
    priority: int | None = None,
) -> str:
    """Make sure the task topic of ``queue`` at ``priority`` exists (once per admin client or cluster);
    return its name."""
    spec = _task_spec(names, settings, queue, priority)
    known = _known_for(admin)
    if spec.name in known:
        return spec.name
    client = admin if isinstance(admin, AdminClient) else AdminClient(dict(admin))
    bootstrap = "the configured brokers" if isinstance(admin, AdminClient) else _bootstrap(admin)
    _ensure(client, bootstrap, [spec], settings, time.monotonic() + timeout)
    _register_schemas(settings, names, [spec.name])
    known.add(spec.name)
    return spec.name


def _register_schemas(settings: TopicSettings, names: TopicNames, topics: list[str]) -> None:
    """Register the value schemas of ``topics`` when a Schema Registry is configured (all or none)."""
    if settings.schema_registry_url:
        from kflow.schemas.registry import activate  # the registry extra is needed only then

        activate(settings.schema_registry_url, names, topics)


# --------------------------------------------------------------------------- cache of ensured task topics

_known_by_bootstrap: dict[str, set[str]] = {}
_known_by_client: weakref.WeakKeyDictionary[AdminClient, set[str]] = weakref.WeakKeyDictionary()


def _known_for(admin: AdminClient | Mapping[str, Any]) -> set[str]:
    """The task topics already ensured through this client, or on this cluster."""
    if isinstance(admin, AdminClient):
        return _known_by_client.setdefault(admin, set())
    return _known_by_bootstrap.setdefault(_bootstrap(admin), set())


def _bootstrap(conf: Mapping[str, Any]) -> str:
    return str(conf.get("bootstrap.servers") or conf.get("metadata.broker.list") or "")


# --------------------------------------------------------------------------- the work


def _ensure(
    admin: AdminClient, bootstrap: str, specs: list[TopicSpec], settings: TopicSettings, deadline: float
) -> None:
    """Create what is missing, wait until it is visible, and verify what already existed."""
    existing = _topic_partitions(admin, bootstrap, deadline)
    missing = [s for s in specs if s.name not in existing]
    raced = _create(admin, bootstrap, missing, settings, deadline)
    if missing:
        existing = _await_topics(admin, bootstrap, [s.name for s in missing], deadline)
    to_verify = [s for s in specs if s not in missing or s.name in raced]
    _verify(admin, bootstrap, to_verify, existing, deadline)


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def _kafka_failure(bootstrap: str, exc: KafkaException, doing: str) -> KflowError:
    """BrokerUnavailable when the cluster cannot be reached, otherwise a KflowError naming the step."""
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    detail = err.str() if err is not None else str(exc)
    if err is None or err.code() in _UNREACHABLE:
        return BrokerUnavailable(bootstrap, detail)
    return KflowError(f"{doing}: {detail}")


def _topic_partitions(admin: AdminClient, bootstrap: str, deadline: float) -> dict[str, int]:
    """Topic name -> partition count, as the cluster reports it now."""
    try:
        md = admin.list_topics(timeout=_remaining(deadline))
    except KafkaException as exc:
        raise _kafka_failure(bootstrap, exc, "cannot list topics") from None
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None or t.partitions}


def _create(
    admin: AdminClient, bootstrap: str, specs: list[TopicSpec], settings: TopicSettings, deadline: float
) -> set[str]:
    """Create ``specs``; return the names someone else created first (to be verified instead)."""
    if not specs:
        return set()
    new = [NewTopic(s.name, s.partitions, settings.replication, config=s.configs(settings)) for s in specs]
    wait = _remaining(deadline)
    futures = admin.create_topics(new, operation_timeout=wait, request_timeout=wait)
    raced: set[str] = set()
    for name, future in futures.items():
        if _created(future, name, bootstrap, deadline):
            continue
        raced.add(name)
    return raced


def _created(future: Any, name: str, bootstrap: str, deadline: float) -> bool:
    """Wait for one creation; False if the topic already existed, raise on any other failure."""
    try:
        future.result(timeout=_remaining(deadline))
        return True
    except FutureTimeout:
        raise BrokerUnavailable(bootstrap, f"timed out creating topic '{name}'") from None
    except KafkaException as exc:
        if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False
        raise _kafka_failure(bootstrap, exc, f"cannot create topic '{name}'") from None


def _await_topics(admin: AdminClient, bootstrap: str, wanted: list[str], deadline: float) -> dict[str, int]:
    """Poll metadata until every topic in ``wanted`` is visible with its partitions."""
    while True:
        existing = _topic_partitions(admin, bootstrap, deadline)
        absent = [n for n in wanted if not existing.get(n)]
        if not absent:
            return existing
        if time.monotonic() >= deadline:
            raise BrokerUnavailable(bootstrap, f"created topics not visible in metadata: {', '.join(absent)}")
        time.sleep(_POLL_S)


def _verify(
    admin: AdminClient, bootstrap: str, specs: list[TopicSpec], partitions: dict[str, int], deadline: float
) -> None:
    """Raise TopicConfigMismatch if an existing topic has the wrong partitions or cleanup policy."""
    for s in specs:
        if s.name in partitions and partitions[s.name] != s.partitions:
            raise PartitionCountMismatch(s.name, s.partitions, partitions[s.name])
    policies = _cleanup_policies(admin, bootstrap, [s.name for s in specs], deadline)
    for s in specs:
        actual = policies.get(s.name)
        if actual is not None and _policy_set(actual) != _policy_set(s.cleanup_policy):
            raise TopicConfigMismatch(s.name, "cleanup.policy", s.cleanup_policy, actual)


def _policy_set(policy: str) -> frozenset[str]:
    return frozenset(p.strip() for p in policy.split(",") if p.strip())


def _cleanup_policies(admin: AdminClient, bootstrap: str, topics: list[str], deadline: float) -> dict[str, str]:
    """Topic -> cleanup.policy for the topics whose broker reports one (a missing entry is unknown)."""
    if not topics:
        return {}
    resources = [ConfigResource(ResourceType.TOPIC, t) for t in topics]
    wait = _remaining(deadline)
    out: dict[str, str] = {}
    for resource, future in admin.describe_configs(resources, request_timeout=wait).items():
        try:
            entries = future.result(timeout=_remaining(deadline))
        except FutureTimeout:
            raise BrokerUnavailable(bootstrap, f"timed out describing topic '{resource.name}'") from None
        except KafkaException as exc:
            raise _kafka_failure(bootstrap, exc, f"cannot describe topic '{resource.name}'") from None
        entry = entries.get("cleanup.policy")
        if entry is not None and entry.value is not None:
            out[resource.name] = entry.value
    return out
