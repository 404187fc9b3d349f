"""MQTT fixtures: the local Mosquitto at 127.0.0.1:1883 when it answers, otherwise an amqtt broker.

Import the fixtures into a test module (``from tests.mqtt_fixtures import mqtt_broker``); each
module should use its own topic prefix (:func:`unique_prefix`). :func:`events_of` reads an
instance's events without joining a consumer group.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from kflow.connectors.simulator import LocalMqttBroker, mqtt_reachable
from kflow.model.messages import Event
from kflow.schemas.codec import decode_event
from kflow.streams.partitioner import partition_for

LOCAL_MQTT = ("127.0.0.1", 1883)


@dataclass(frozen=True)
class MqttBroker:
    """Where the session's MQTT broker is."""

    host: str
    port: int
    kind: str

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[MqttBroker]:
    """The local Mosquitto (``KFLOW_TEST_MQTT=amqtt`` forces a private amqtt broker instead)."""
    if os.environ.get("KFLOW_TEST_MQTT") != "amqtt" and mqtt_reachable(*LOCAL_MQTT):
        yield MqttBroker(*LOCAL_MQTT, "local")
        return
    with LocalMqttBroker(prefer="amqtt") as broker:
        yield MqttBroker(broker.host, broker.port, broker.kind)


def unique_prefix(tag: str) -> str:
    """A topic prefix no other test (or run) shares."""
    return f"kt-{tag}-{uuid.uuid4().hex[:8]}"


def events_of(bootstrap: str, topic: str, partitions: int, instance_id: str) -> list[Event]:
    """Every event of ``instance_id`` on the events topic up to its high watermark."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "isolation.level": "read_committed"})
    p = partition_for(instance_id.encode(), partitions)
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
        if high <= low:
            return []
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)])
        out: list[Event] = []
        while True:
            for m in consumer.consume(500, 1.0):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        return out
                    continue
                if m.key() == instance_id.encode():
                    out.append(decode_event(m.value()))
                if m.offset() >= high - 1:
                    return out
    finally:
        consumer.close()
