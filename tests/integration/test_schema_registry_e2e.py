"""A workflow end to end on the real broker with a Schema Registry configured for the engine, the worker
and the client. The stack runs in this process, so all three share confluent-kafka's in-process
``mock://`` registry (a mock registry lives in one process; separate processes need a real one).
Every record kflow wrote to commands, events, state, tasks and definitions is Confluent-framed and
read by the stock AvroDeserializer; an engine facing an incompatible registered schema does not start
and produces nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from kflow.config import EngineConfig
from kflow.schemas import codec, registry
from kflow.schemas.registry import SchemaIncompatibleError, client_for
from kflow.streams.processor import EngineProcessor
from tests.integration import flows
from tests.integration.conftest import PARTITIONS, Stack


class RegistryStack(Stack):
    """A Stack whose every process (engine, worker, client) uses one registry."""

    def __init__(self, bootstrap: str, prefix: str, state_root: str, url: str) -> None:
        self.url = url
        super().__init__(bootstrap, prefix, state_root)

    def kafka_config(self, cls: Any, **kw: Any) -> Any:
        return super().kafka_config(cls, schema_registry_url=self.url, **kw)


@pytest.fixture(autouse=True)
def single_object_after() -> Iterator[None]:
    """The registry switches framing for the whole process: later tests get it back as it was."""
    registry.reset()
    yield
    registry.reset()


def read_all(bootstrap: str, topics: list[str]) -> list[tuple[str, bytes]]:
    """Every record of ``topics`` up to their current ends (read_uncommitted: tasks are read so too)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"sr-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False, "isolation.level": "read_uncommitted"})
    try:
        ends: dict[tuple[str, int], int] = {}
        for t in topics:
            for p in range(len(consumer.list_topics(t, timeout=10).topics[t].partitions)):
                high = consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10, cached=False)[1]
                if high > 0:
                    ends[(t, p)] = high
        consumer.assign([TopicPartition(t, p, 0) for t, p in ends])
        out: list[tuple[str, bytes]] = []
        remaining = dict(ends)
        idle = 0
        while remaining:  # the last offsets may be transaction markers: done when the position passes the end
            msg = consumer.poll(1)
            if msg is None:
                idle += 1
                assert idle < 30, f"records missing before the ends {remaining}"
                for tp in consumer.position([TopicPartition(t, p) for t, p in remaining]):
                    if tp.offset >= remaining[(tp.topic, tp.partition)]:
                        remaining.pop((tp.topic, tp.partition))
                continue
            assert msg.error() is None, msg.error()
            if msg.value() is not None:
                out.append((msg.topic(), msg.value()))
        return out
    finally:
        consumer.close()


def test_a_workflow_runs_with_registry_framing(kafka_bootstrap: str, tmp_path: Any) -> None:
    url = f"mock://e2e-{uuid.uuid4().hex[:8]}"
    stack = RegistryStack(kafka_bootstrap, f"sr{uuid.uuid4().hex[:8]}.", str(tmp_path), url)
    try:
        stack.start_engine()
        stack.start_worker([flows])
        c = stack.client
        c.deploy({"name": "sr", "version": 1, "steps": [
            {"id": "a", "task": "t.inc", "input": "input", "output": "x"},
            {"id": "b", "task": "t.inc", "input": "x", "output": "y"}]})
        assert c.start("sr", 1, id=f"sr-{uuid.uuid4().hex[:6]}").result(timeout=60) == {"x": 2, "y": 3}
    finally:
        stack.close()
    names = stack.client.names
    topics = [names.commands, names.events, names.state, names.engine_state, names.tasks("default"), names.definitions]
    records = read_all(kafka_bootstrap, topics)
    assert {t for t, _ in records} == set(topics)
    client = client_for(url)
    deserialize = AvroDeserializer(client)
    for topic, value in records:
        assert value[0] == 0, f"{topic}: not Confluent-framed ({value[:5].hex()})"
        schema_id = int.from_bytes(value[1:5], "big")
        latest = client.get_latest_version(f"{topic}-value")
        assert json.loads(client.get_schema(schema_id).schema_str) == json.loads(latest.schema.schema_str)
        decoded = deserialize(value, SerializationContext(topic, MessageField.VALUE))
        assert isinstance(decoded, dict) and decoded
    states = [deserialize(v, SerializationContext(t, MessageField.VALUE)) for t, v in records if t == names.state]
    assert states[-1]["status"] == "COMPLETED" and json.loads(states[-1]["result"]) == {"x": 2, "y": 3}


def test_an_engine_facing_an_incompatible_schema_does_not_start(kafka_bootstrap: str, tmp_path: Any) -> None:
    url = f"mock://bad-{uuid.uuid4().hex[:8]}"
    prefix = f"sb{uuid.uuid4().hex[:8]}."
    older = json.loads(codec.schema_text("event"))
    older["fields"] = [f for f in older["fields"] if f["name"] != "seq"]  # kflow's reader needs seq: no default
    client_for(url).register_schema(f"{prefix}events-value", Schema(json.dumps(older), "AVRO"))
    cfg = EngineConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True,
                       state_dir=str(tmp_path / "e"), engine_id="bad", schema_registry_url=url)
    with pytest.raises(SchemaIncompatibleError) as caught:
        EngineProcessor(cfg).run()
    assert (caught.value.topic, caught.value.subject) == (f"{prefix}events", f"{prefix}events-value")
    assert "seq" in caught.value.reason
    assert client_for(url).get_subjects() == [f"{prefix}events-value"]
    names = cfg.names
    assert read_all(kafka_bootstrap, [names.commands, names.events, names.state, names.definitions]) == []
