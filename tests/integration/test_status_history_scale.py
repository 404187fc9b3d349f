"""Status and history stay bounded however large the topics grow.

A real engine and worker run on the test broker; before the instance starts, the ``events`` and
``state`` partitions it lands on already hold a million unrelated records each (and more arrive
while it runs and after it ends). ``Client.status`` is answered by the owning engine and
``Client.history`` reads from where the instance's history starts up to its last event, so both
read a handful of records; the client's ``records_read`` counter says how many, and the old
full-partition scan (``scan=True``) shows what they would cost otherwise.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from typer.testing import CliRunner

from kflow.cli import app
from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.model.messages import Event
from kflow.schemas.codec import decode_event, encode_event, encode_state
from kflow.streams.partitioner import partition_for
from kflow.streams.topics import ensure_topics
from kflow.testing import assert_eventually
from tests.integration.conftest import PARTITIONS, Stack

#: Unrelated records put on each of the instance's events and state partitions before it starts.
NOISE = 1_000_000
#: Unrelated records written on the instance's events partition while it runs (read, and counted).
INTERLEAVED = 200
#: Most records a status or history read of the instance may take.
BOUND = 1_000

SPEC = {"name": "scale_order", "version": 1, "steps": [
    {"id": "pay", "task": "t.echo", "input": "input", "output": "paid"},
    {"id": "approve", "wait": {"signal": "go", "timeout": "1h"}, "output": "ok"},
    {"id": "ship", "task": "t.echo", "input": "ok", "output": "shipped"},
    {"id": "done", "succeed": "shipped"},
]}


def _noise(bootstrap: str, topic: str, partition: int, value: bytes, count: int) -> None:
    """``count`` small records on ``topic[partition]``, as fast as one producer goes."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 100, "batch.num.messages": 100_000,
                         "batch.size": 4_000_000, "queue.buffering.max.messages": 2_000_000,
                         "queue.buffering.max.kbytes": 2_000_000, "acks": 1, "enable.idempotence": False,
                         "compression.type": "lz4"})
    for _ in range(count):
        while True:
            try:
                producer.produce(topic, value, b"noise", partition=partition)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(120) == 0


def _noise_values() -> tuple[bytes, bytes]:
    event = encode_event(Event("SignalReceived", "noise", 1, 0, {"name": "n", "data": None, "signal_id": ""}))
    state = encode_state({"instance_id": "noise", "workflow": "noise", "version": 1, "status": "RUNNING", "seq": 1,
                          "started_ms": 0, "updated_ms": 0})
    return event, state


@pytest.fixture(scope="module")
def noisy(stack: Stack) -> Iterator[tuple[Client, str, int]]:
    """A client, and an instance id whose events and state partitions hold NOISE records each."""
    stack.client.deploy(SPEC)
    iid = f"scale-{uuid.uuid4().hex[:8]}"
    p = partition_for(iid.encode(), PARTITIONS)
    event, state = _noise_values()
    _noise(stack.bootstrap, f"{stack.prefix}events", p, event, NOISE)
    _noise(stack.bootstrap, f"{stack.prefix}state", p, state, NOISE)
    with Client(config=stack.kafka_config(KafkaConfig)) as client:
        yield client, iid, p


def _read_at(stack: Stack, partition: int, offset: int) -> Event:
    consumer = Consumer(stack.kafka_config(KafkaConfig).consumer_conf(f"t-{uuid.uuid4().hex}"))
    try:
        consumer.assign([TopicPartition(f"{stack.prefix}events", partition, offset)])
        msg = assert_eventually(lambda: next((m for m in consumer.consume(1, 0.5) if not m.error()), None),
                                timeout=20, msg=f"the record at offset {offset}")
        assert msg.offset() == offset
        return decode_event(msg.value())
    finally:
        consumer.close()


def _reads(client: Client, fn):  # type: ignore[no-untyped-def]
    """``fn()`` and the number of records it read."""
    before = client.records_read
    out = fn()
    return out, client.records_read - before


def test_status_and_history_of_an_instance_read_a_bounded_number_of_records(stack: Stack, noisy) -> None:
    client, iid, p = noisy
    handle = client.start("scale_order", {"sku": "A1"}, id=iid)

    def waiting() -> dict:
        st = client.status(iid)
        assert st is not None and st["status"] == "RUNNING"
        assert [(t.get("wait") or {}).get("name") for t in st["internal"]["threads"].values()] == ["go"]
        return st

    running, n = _reads(client, lambda: assert_eventually(waiting, timeout=60, msg="waiting for the signal"))
    # its history starts exactly at its first event, after the million unrelated ones
    first = _read_at(stack, p, running["events_offset"])
    assert (first.instance_id, first.seq, first.type) == (iid, 1, "WorkflowStarted")
    assert running["events_offset"] >= NOISE
    events, n = _reads(client, lambda: client.history(iid))
    assert [e.seq for e in events] == list(range(1, running["seq"] + 1))
    assert n < BOUND, f"history of a running instance read {n} records"

    _noise(stack.bootstrap, f"{stack.prefix}events", p, _noise_values()[0], INTERLEAVED)
    client.signal(iid, "go", {"by": "ada"})
    assert handle.result(timeout=60) == {"by": "ada"}
    _noise(stack.bootstrap, f"{stack.prefix}events", p, _noise_values()[0], 10_000)  # after its last event

    done, n = _reads(client, lambda: client.status(iid))
    assert done is not None and (done["status"], done["result"]) == ("COMPLETED", {"by": "ada"})
    assert done["events_offset"] == running["events_offset"] and done["seq"] > running["seq"]
    assert n < BOUND, f"status read {n} records"

    events, n = _reads(client, lambda: client.history(iid))
    assert [e.seq for e in events] == list(range(1, done["seq"] + 1))
    assert (events[0].type, events[-1].type) == ("WorkflowStarted", "WorkflowCompleted")
    assert {e.instance_id for e in events} == {iid}
    # the interleaved records are read (and counted); the ones after its last event are not
    assert INTERLEAVED <= n < BOUND, f"history read {n} records"

    # the full scan finds the same history, reading the whole partition: what status/history avoid
    scanned, n = _reads(client, lambda: client.history(iid, scan=True))
    assert [(e.seq, e.type, e.data) for e in scanned] == [(e.seq, e.type, e.data) for e in events]
    assert n >= NOISE

    # the CLI takes the same paths: the step tree drawn from the history, the history itself
    conn = ["--bootstrap", stack.bootstrap, "--prefix", stack.prefix]
    shown = CliRunner().invoke(app, ["status", iid, *conn], terminal_width=200, env={"KFLOW_API": ""})
    assert shown.exit_code == 0, shown.output
    assert "COMPLETED" in shown.stdout and "✔ approve" in shown.stdout and "✔ ship" in shown.stdout
    listed = CliRunner().invoke(app, ["history", iid, "--json", *conn], env={"KFLOW_API": ""})
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["seq"] for line in listed.stdout.splitlines()] == list(range(1, done["seq"] + 1))


def test_an_unknown_id_is_answered_not_found_without_reading_the_topics(noisy) -> None:
    client, _iid, _p = noisy
    missing = f"nobody-{uuid.uuid4().hex[:6]}"
    status, n = _reads(client, lambda: client.status(missing))
    assert status is None and n < BOUND
    history, n = _reads(client, lambda: client.history(missing))
    assert history == [] and n < BOUND


def test_no_engine_is_a_clear_error_and_scan_reads_without_one(kafka_bootstrap: str) -> None:
    config = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=f"n{uuid.uuid4().hex[:8]}.", partitions=PARTITIONS,
                         dev_tuning=True)
    ensure_topics(config.client_conf(), config.names, config.topic_settings)  # topics, but no engine
    with Client(config=config) as client:
        with pytest.raises(TimeoutError, match="no engine answered QueryStatus for x within 1s"):
            client.status("x", timeout=1)
        assert client.status("x", scan=True) is None
        assert client.history("x", scan=True) == []
    conn = ["--bootstrap", kafka_bootstrap, "--prefix", config.topic_prefix]
    out = CliRunner().invoke(app, ["status", "x", "--timeout", "1", *conn], env={"KFLOW_API": ""})
    assert out.exit_code == 1 and "no engine answered within 1s" in out.stderr and "--scan" in out.stderr
    scanned = CliRunner().invoke(app, ["status", "x", "--scan", *conn], env={"KFLOW_API": ""})
    assert scanned.exit_code == 1 and "no state for workflow instance 'x'" in scanned.stderr
