"""Triggers end to end: Kafka records and MQTT messages start and signal workflows on a real engine."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from typing import Any

import aiomqtt
import fastavro
import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kflow.config import TriggerConfig
from kflow.connectors.triggers import TRIGGER_MESSAGES, TriggerConfigError, TriggerRunner, load_triggers
from kflow.dlq import read_dlq
from kflow.testing import assert_eventually
from tests import mqtt_fixtures
from tests.integration.conftest import PARTITIONS
from tests.mqtt_fixtures import events_of, unique_prefix

mqtt_broker = mqtt_fixtures.mqtt_broker  # the session's MQTT broker fixture

TRIGGERS = """
triggers:
  - name: order-created
    source: {{kafka: {{topic: {topic}, format: json}}}}
    when: "message.type == 'created'"
    action: start
    workflow: trg.order
    id: "'order-' + message.order_id"
    input: "{{'qty': message.qty, 'key': key}}"
  - name: order-paid
    source: {{kafka: {{topic: {topic}}}}}
    when: "message.type == 'paid'"
    action: signal
    instance: "'order-' + message.order_id"
    signal: paid
    input: "message.amount"
  - name: meter-reading
    source: {{kafka: {{topic: {avro_topic}, format: avro, schema: {schema}}}}}
    action: start
    workflow: trg.echo
    id: "'meter-' + message.meter + '-' + string(offset)"
  - name: sensor-alarm
    source: {{mqtt: {{topic: "{mqtt_prefix}/devices/+/telemetry/#"}}}}
    when: "topic_parts[4] == 'alarm'"
    action: signal
    instance: "'watch-' + topic_parts[2]"
    signal: alarm
    input: "{{'level': message.level, 'device': topic_parts[2]}}"
"""


@pytest.fixture(scope="module")
def setup(stack, mqtt_broker, tmp_path_factory) -> Any:
    topic, avro_topic = f"{stack.prefix}orders-in", f"{stack.prefix}meters-avro"
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    for f in admin.create_topics([NewTopic(t, num_partitions=2, replication_factor=1)
                                  for t in (topic, avro_topic)]).values():
        f.result(30)
    schema = tmp_path_factory.mktemp("avro") / "reading.avsc"
    schema.write_text(json.dumps(READING))
    mqtt_prefix = unique_prefix("trg")
    text = TRIGGERS.format(topic=topic, avro_topic=avro_topic, schema=schema, mqtt_prefix=mqtt_prefix)
    c = stack.client
    c.deploy({"name": "trg.order", "version": 1, "steps": [
        {"id": "inc", "task": "t.inc", "input": "input.qty", "output": "qty"},
        {"id": "pay", "wait": {"signal": "paid", "timeout": "1m"}, "output": "paid"}]})
    c.deploy({"name": "trg.echo", "version": 1, "steps": [{"id": "e", "task": "t.echo", "input": "input", "output": "e"}]})
    c.deploy({"name": "trg.watch", "version": 1, "steps": [
        {"id": "w", "wait": {"signal": "alarm", "timeout": "1m"}, "output": "alarm"}]})
    config = stack.kafka_config(TriggerConfig)
    runner = TriggerRunner(load_triggers(text), config, mqtt_url=mqtt_broker.url, group_id=f"{stack.prefix}trg-a")
    runner.start()
    assert runner.ready(30)
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    try:
        yield {"topic": topic, "avro_topic": avro_topic, "text": text, "runner": runner, "producer": producer, "config": config,
               "mqtt_prefix": mqtt_prefix}
    finally:
        runner.stop()


READING = {"type": "record", "name": "Reading", "fields": [{"name": "meter", "type": "string"},
                                                          {"name": "kwh", "type": "double"}]}


def send(setup: dict, key: str, value: Any) -> None:
    body = value if isinstance(value, bytes) else orjson.dumps(value)
    setup["producer"].produce(setup["topic"], body, key.encode())
    assert setup["producer"].flush(10) == 0


def counted(trigger: str, outcome: str) -> float:
    return TRIGGER_MESSAGES.labels(trigger, outcome)._value.get()


def test_kafka_message_delivered_twice_starts_one_workflow(stack, setup):
    c = stack.client
    oid = uuid.uuid4().hex[:8]
    iid = f"order-{oid}"
    send(setup, oid, {"type": "created", "order_id": oid, "qty": 4})
    assert_eventually(lambda: (c.status(iid) or {}).get("status") == "RUNNING", timeout=30)
    # redelivery: a second runner in a fresh group reads the same records again (same offsets)
    again = TriggerRunner(load_triggers(setup["text"]), setup["config"], group_id=f"{stack.prefix}trg-b-{oid}")
    before = counted("order-created", "started")
    again.start()
    try:
        assert_eventually(lambda: counted("order-created", "started") > before, timeout=60)
        assert_eventually(lambda: any(e.type == "CommandRejected" and e.data["code"] == "DUPLICATE" for e in
                                      events_of(stack.bootstrap, c.config.names.events, PARTITIONS, iid)), timeout=60)
    finally:
        again.stop()
    send(setup, oid, {"type": "paid", "order_id": oid, "amount": 12.5})
    try:
        assert c.result(iid, timeout=60) == {"qty": 5, "paid": 12.5}
    except TimeoutError:
        events = events_of(stack.bootstrap, c.config.names.events, PARTITIONS, iid)
        pytest.fail(f"{iid} did not finish: runner error {setup['runner'].error!r}, signalled "
                    f"{counted('order-paid', 'signalled')}, workers {[w.error for w in stack.workers]}, "
                    f"events {[(e.type, e.data) for e in events]}")
    events = events_of(stack.bootstrap, c.config.names.events, PARTITIONS, iid)
    assert [e.type for e in events].count("WorkflowStarted") == 1
    assert [e.type for e in events].count("ActivityScheduled") == 1  # the duplicate changed nothing


def test_mqtt_telemetry_signals_the_right_instance(stack, setup, mqtt_broker):
    c = stack.client
    a, b = f"watch-s{uuid.uuid4().hex[:6]}", f"watch-s{uuid.uuid4().hex[:6]}"
    ha, hb = c.start("trg.watch", None, id=a), c.start("trg.watch", None, id=b)
    for h in (ha, hb):
        assert_eventually(lambda h=h: (c.status(h.id) or {}).get("status") == "RUNNING", timeout=30)
    device = a.removeprefix("watch-")
    prefix = setup["mqtt_prefix"]

    async def publish() -> None:
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as cl:
            await cl.publish(f"{prefix}/devices/{device}/telemetry/alarm", json.dumps({"level": 3}), qos=1)

    asyncio.run(publish())
    assert ha.result(timeout=60) == {"alarm": {"level": 3, "device": device}}
    assert (c.status(b) or {}).get("status") == "RUNNING"  # the other instance got nothing
    c.terminate(b, "test done")


def test_malformed_and_unmatched_messages_go_to_the_dlq(stack, setup):
    runner = setup["runner"]
    bad_key, odd_key = f"bad-{uuid.uuid4().hex[:6]}", f"odd-{uuid.uuid4().hex[:6]}"
    failed_before = counted("order-created", "failed")
    send(setup, bad_key, b"{not json")
    send(setup, odd_key, {"type": "refunded", "order_id": "x"})
    send(setup, f"nofield-{bad_key}", {"type": "created", "qty": 1})  # no order_id: the id expression fails

    def dead() -> dict[str, Any]:
        return {(r.key or b"").decode(): r for r in read_dlq(setup["config"], timeout=10)}

    assert_eventually(lambda: {bad_key, odd_key, f"nofield-{bad_key}"} <= set(dead()), timeout=30)
    records = dead()
    bad, odd, nofield = records[bad_key], records[odd_key], records[f"nofield-{bad_key}"]
    assert "invalid JSON" in bad.reason and bad.original_topic == setup["topic"] and bad.value == b"{not json"
    assert bad.original_offset >= 0
    assert "no trigger matched" in odd.reason
    assert "trigger 'order-created'" in nofield.reason and "order_id" in nofield.reason
    assert counted("order-created", "failed") >= failed_before + 2
    assert counted("none", "unmatched") >= 1
    assert runner.error is None  # bad input never stops the runner


def test_bad_triggers_file_names_every_problem(tmp_path):
    with pytest.raises(TriggerConfigError) as ei:
        load_triggers("""
triggers:
  - name: a
    source: {kafka: {topic: t, format: avro}}
    action: start
    workflow: w
  - name: b
    source: {mqtt: {topic: x/#}}
    action: signal
    instance: "'i-' +"
    signal: s
""")
    msg = str(ei.value)
    assert "trigger 'a': action 'start' needs 'id'" in msg
    assert "format 'avro' needs 'schema'" in msg
    assert "trigger 'b': instance:" in msg


def test_avro_records_start_workflows(stack, setup):
    meter = uuid.uuid4().hex[:6]
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(READING), {"meter": meter, "kwh": 12.25})
    framed = b"\x00\x00\x00\x00\x07" + buf.getvalue()  # Confluent Schema Registry framing (schema id 7)
    setup["producer"].produce(setup["avro_topic"], framed, meter.encode())
    assert setup["producer"].flush(10) == 0
    c = stack.client

    def started() -> list[str]:
        return [r for r in (c.status(f"meter-{meter}-{o}") for o in range(3)) if r]

    assert_eventually(lambda: started(), timeout=30)
    [state] = started()
    assert c.result(state["instance_id"], timeout=60) == {"e": {"meter": meter, "kwh": 12.25}}
