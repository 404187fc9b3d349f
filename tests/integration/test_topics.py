"""Topic naming and start-up creation against a real broker: configs, idempotence, mismatches, outages."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from kflow.model.errors import BrokerUnavailable, TopicConfigMismatch
from kflow.streams.topics import TopicNames, TopicSettings, ensure_task_topic, ensure_topics

SETTINGS = TopicSettings(partitions=4, events_retention_ms=3_600_000, commands_retention_ms=1_800_000,
                         max_message_bytes=2_000_000)


def admin_for(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def partitions_of(admin: AdminClient, topics: list[str]) -> dict[str, int]:
    md = admin.list_topics(timeout=10)
    return {t: len(md.topics[t].partitions) for t in topics if t in md.topics}


def configs_of(admin: AdminClient, topic: str) -> dict[str, str]:
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)], request_timeout=10)
    (future,) = futures.values()
    return {k: v.value for k, v in future.result(timeout=10).items()}


def create_topic(admin: AdminClient, name: str, partitions: int, config: dict[str, str] | None = None) -> None:
    (future,) = admin.create_topics([NewTopic(name, partitions, 1, config=config or {})], request_timeout=10).values()
    future.result(timeout=10)


# --------------------------------------------------------------------------- names (no broker)


def test_topic_names_follow_the_prefix() -> None:
    names = TopicNames("acme.")
    assert (names.commands, names.events, names.state, names.definitions, names.dlq) == (
        "acme.commands", "acme.events", "acme.state", "acme.definitions", "acme.dlq",
    )
    assert names.tasks("payments") == "acme.tasks.payments"
    assert names.journal == "acme.journal"
    assert TopicNames().commands == "kflow.commands"


@pytest.mark.parametrize("queue", ["", "has space", "slash/queue", "x" * 300])
def test_illegal_queue_names_are_rejected(queue: str) -> None:
    with pytest.raises(ValueError, match="legal topic name"):
        TopicNames().tasks(queue)


def test_settings_defaults() -> None:
    s = TopicSettings()
    assert (s.partitions, s.replication, s.max_message_bytes) == (8, 1, 1_048_576)
    assert s.events_retention_ms == s.commands_retention_ms == 7 * 24 * 3600 * 1000


def test_unreachable_broker_raises_broker_unavailable_within_the_timeout() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bootstrap = f"127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        ensure_topics({"bootstrap.servers": bootstrap}, TopicNames("x."), TopicSettings(), timeout=2)
    assert time.monotonic() - started < 10
    assert info.value.bootstrap == bootstrap


# --------------------------------------------------------------------------- creation


def test_ensure_topics_creates_every_topic_with_explicit_configs(kafka_bootstrap: str, topic_prefix: str) -> None:
    names = TopicNames(topic_prefix)
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, names, SETTINGS, queues=["default", "payments"])
    admin = admin_for(kafka_bootstrap)
    expected = {
        names.commands: (4, "delete", "1800000"),
        names.events: (4, "delete", "3600000"),
        names.state: (4, "compact", "-1"),
        names.engine_state: (4, "compact", "-1"),
        names.journal: (4, "compact", "-1"),
        names.definitions: (1, "compact", "-1"),
        names.dlq: (4, "delete", "3600000"),
        names.tasks("default"): (4, "delete", "1800000"),
        names.tasks("payments"): (4, "delete", "1800000"),
    }
    assert partitions_of(admin, list(expected)) == {t: p for t, (p, _, _) in expected.items()}
    for topic, (_, policy, retention) in expected.items():
        configs = configs_of(admin, topic)
        assert configs["cleanup.policy"] == policy, topic
        assert configs["retention.ms"] == retention, topic
        assert configs["max.message.bytes"] == "2000000", topic


def test_ensure_topics_is_idempotent(kafka_bootstrap: str, topic_prefix: str) -> None:
    conf = {"bootstrap.servers": kafka_bootstrap}
    names = TopicNames(topic_prefix)
    ensure_topics(conf, names, SETTINGS, queues=["q"])
    ensure_topics(conf, names, SETTINGS, queues=["q"])
    assert partitions_of(admin_for(kafka_bootstrap), [names.commands, names.tasks("q")]) == {
        names.commands: 4, names.tasks("q"): 4,
    }


def test_concurrent_creators_all_succeed(kafka_bootstrap: str, topic_prefix: str) -> None:
    names = TopicNames(topic_prefix)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait(timeout=30)
            ensure_topics({"bootstrap.servers": kafka_bootstrap}, names, SETTINGS, queues=["q"])
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert partitions_of(admin_for(kafka_bootstrap), [names.state])[names.state] == 4


# --------------------------------------------------------------------------- mismatches


def test_wrong_partition_count_is_a_start_up_error(kafka_bootstrap: str, topic_prefix: str) -> None:
    names = TopicNames(topic_prefix)
    create_topic(admin_for(kafka_bootstrap), names.commands, 3)
    with pytest.raises(TopicConfigMismatch) as info:
        ensure_topics({"bootstrap.servers": kafka_bootstrap}, names, SETTINGS)
    assert (info.value.topic, info.value.key, info.value.expected, info.value.actual) == (
        names.commands, "partitions", 4, 3,
    )


def test_wrong_cleanup_policy_is_a_start_up_error(kafka_bootstrap: str, topic_prefix: str) -> None:
    names = TopicNames(topic_prefix)
    create_topic(admin_for(kafka_bootstrap), names.state, 4, {"cleanup.policy": "delete"})
    with pytest.raises(TopicConfigMismatch) as info:
        ensure_topics({"bootstrap.servers": kafka_bootstrap}, names, SETTINGS)
    assert (info.value.topic, info.value.key, info.value.expected, info.value.actual) == (
        names.state, "cleanup.policy", "compact", "delete",
    )


def test_a_matching_topic_created_without_configs_is_accepted(kafka_bootstrap: str, topic_prefix: str) -> None:
    # Tansu reports no configs for such a topic (unknown, not a mismatch); Kafka reports its default "delete".
    names = TopicNames(topic_prefix)
    create_topic(admin_for(kafka_bootstrap), names.events, 4)
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, names, SETTINGS)
    assert partitions_of(admin_for(kafka_bootstrap), [names.commands])[names.commands] == 4


# --------------------------------------------------------------------------- task topics on demand


@pytest.mark.parametrize("pass_client", [True, False], ids=["admin-client", "admin-conf"])
def test_ensure_task_topic_creates_once_then_uses_its_cache(
    kafka_bootstrap: str, topic_prefix: str, pass_client: bool
) -> None:
    names = TopicNames(topic_prefix)
    admin: Any = admin_for(kafka_bootstrap) if pass_client else {"bootstrap.servers": kafka_bootstrap}
    topic = ensure_task_topic(admin, names, SETTINGS, "reports")
    assert topic == names.tasks("reports")
    assert partitions_of(admin_for(kafka_bootstrap), [topic]) == {topic: 4}
    # Asking the broker again would now fail verification (4 partitions, not 6): the cache answers instead.
    assert ensure_task_topic(admin, names, TopicSettings(partitions=6), "reports") == topic


def test_ensure_task_topic_verifies_a_topic_it_did_not_create(kafka_bootstrap: str, topic_prefix: str) -> None:
    names = TopicNames(topic_prefix)
    create_topic(admin_for(kafka_bootstrap), names.tasks("legacy"), 2)
    with pytest.raises(TopicConfigMismatch, match="partitions"):
        ensure_task_topic(admin_for(kafka_bootstrap), names, SETTINGS, "legacy")
