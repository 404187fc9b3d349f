"""partition_for predicts where librdkafka's murmur2_random partitioner puts every keyed record."""

from __future__ import annotations

from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kflow.streams.partitioner import partition_for

PARTITIONS = 8
KEYS = (
    [f"order-{i}" for i in range(300)]
    + [f"{i:032x}" for i in range(0, 2**128, 2**121)]
    + ["a", "ab", "abc", "abcd", "ünïcødé-ключ", "🙂 emoji key", "x" * 1000]
)


def test_librdkafka_murmur2_random_lands_where_partition_for_says(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}partitioner"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    (created,) = admin.create_topics([NewTopic(topic, PARTITIONS, 1)], request_timeout=15).values()
    created.result(timeout=15)

    delivered: dict[str, int] = {}
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
        else:
            delivered[msg.key().decode("utf-8")] = msg.partition()

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random", "linger.ms": 5})
    for key in KEYS:
        producer.produce(topic, value=b"v", key=key.encode("utf-8"), on_delivery=on_delivery)
    assert producer.flush(60) == 0, "not every record was delivered within 60s"

    assert errors == []
    assert len(delivered) == len(set(KEYS))
    assert len(set(delivered.values())) == PARTITIONS  # the keys really spread over the topic
    expected = {k: partition_for(k, PARTITIONS) for k in delivered}
    assert delivered == expected
