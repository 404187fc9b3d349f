"""Reading a topic to its end against a real broker: the ends are the high watermarks seen when the read
starts, start offsets are honoured, a transactional topic (ending in a commit marker) still finishes,
and the look-ups the tailing consumers share position them at the end."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kflow.readend import EndReader, at_end, watermarks

PARTITIONS = 3
TIMEOUT = 30.0


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = f"readend-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(name, PARTITIONS, 1)], operation_timeout=TIMEOUT)[name].result(timeout=TIMEOUT)
    return name


@pytest.fixture
def reader(kafka_bootstrap: str) -> Iterator[EndReader]:
    with EndReader({"bootstrap.servers": kafka_bootstrap}, timeout=TIMEOUT) as r:
        yield r


def producer_for(bootstrap: str) -> Producer:
    """A producer that sends one record per batch: the embedded broker reports a partition's high
    watermark as the base offset of its last batch plus one, which is the true end only then."""
    return Producer({"bootstrap.servers": bootstrap, "batch.num.messages": 1})


def produce(producer: Producer, topic: str, partition: int, values: list[str]) -> None:
    for v in values:
        producer.produce(topic, v.encode(), v.encode(), partition=partition)
    assert producer.flush(TIMEOUT) == 0


def test_reads_every_partition_to_the_ends_it_saw_at_the_start(kafka_bootstrap: str, topic: str,
                                                              reader: EndReader) -> None:
    producer = producer_for(kafka_bootstrap)
    produce(producer, topic, 0, [f"a{i}" for i in range(10)])
    produce(producer, topic, 2, ["c0", "c1"])  # partition 1 stays empty
    assert reader.partitions(topic) == [0, 1, 2]
    assert {p: high for p, (_low, high) in reader.watermarks(topic, [0, 1, 2]).items()} == {0: 10, 1: 0, 2: 2}

    read: dict[int, list[bytes]] = {}
    for msg in reader.read(topic):
        if not read:  # written after the read began
            produce(producer, topic, 0, [f"late{i}" for i in range(20)])
        read.setdefault(msg.partition(), []).append(msg.value())
    assert read[0][:10] == [f"a{i}".encode() for i in range(10)]  # in order per partition
    assert read[2] == [b"c0", b"c1"] and 1 not in read
    # records fetched with a partition's last one may ride along: only later ones, in order
    assert read[0][10:] == [f"late{i}".encode() for i in range(len(read[0]) - 10)]
    assert reader.records == len(read[0]) + 2


def test_start_offsets_and_given_ends(kafka_bootstrap: str, topic: str, reader: EndReader) -> None:
    producer = producer_for(kafka_bootstrap)
    produce(producer, topic, 1, [f"b{i}" for i in range(8)])
    assert [m.offset() for m in reader.read(topic, start={1: 5})] == [5, 6, 7]
    assert [m.offset() for m in reader.read(topic, start={1: 2}, ends={1: 4})][:2] == [2, 3]
    assert list(reader.read(topic, start={1: 8})) == []  # nothing between start and end: not even assigned
    assert list(reader.read(topic, start={1: 4}, ends={1: 4})) == []


def test_a_transactional_topic_finishes_at_its_commit_marker(kafka_bootstrap: str, topic: str,
                                                             reader: EndReader) -> None:
    tx = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"readend-{uuid.uuid4().hex}"})
    tx.init_transactions(TIMEOUT)
    for batch in (["t0", "t1", "t2"], ["t3"]):
        tx.begin_transaction()
        for v in batch:
            tx.produce(topic, v.encode(), v.encode(), partition=0)
        tx.commit_transaction(TIMEOUT)
    (_low, high), = reader.watermarks(topic, [0]).values()
    assert high > 4  # the commit markers take offsets no consumer ever sees
    assert [m.value() for m in reader.read(topic, [0], timeout=TIMEOUT)] == [b"t0", b"t1", b"t2", b"t3"]


def test_a_missing_topic_reads_as_empty(reader: EndReader) -> None:
    missing = f"readend-missing-{uuid.uuid4().hex[:8]}"
    assert reader.partitions(missing) == []
    assert list(reader.read(missing)) == []


def test_at_end_positions_a_tailing_consumer_after_what_is_there(kafka_bootstrap: str, topic: str) -> None:
    producer = producer_for(kafka_bootstrap)
    produce(producer, topic, 0, ["old0", "old1", "old2"])
    tail = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"readend-{uuid.uuid4().hex}",
                     "enable.auto.commit": False})
    try:
        positions = at_end(tail, topic, range(PARTITIONS), TIMEOUT)
        assert [(tp.partition, tp.offset) for tp in positions] == [(0, 3), (1, 0), (2, 0)]
        assert watermarks(tail, topic, [0], TIMEOUT) == {0: (0, 3)}
        tail.assign(positions)
        produce(producer, topic, 0, ["new0"])
        seen: list[bytes] = []
        while not seen:
            seen += [m.value() for m in tail.consume(10, 1.0) if m.error() is None]
        assert seen == [b"new0"]
    finally:
        tail.close()
