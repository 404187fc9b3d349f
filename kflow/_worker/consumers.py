"""The worker's consumers: one per queue, each in that queue's own group, driven as one by the loop.

A queue's consumer reads every priority level topic of the queue (see
:meth:`kflow.streams.topics.TopicNames.tasks`); which level is served first is the loop's choice.

Every worker of a queue joins the group ``<prefix>worker.<queue>`` whatever other queues it
serves, so the workers of a queue share its partitions and each task runs once per attempt. A
worker serving several queues therefore holds several consumers; :class:`QueueConsumers` gives
the loop one object with the consumer calls it needs and routes each call to the consumer that
owns the topic. Each consumer commits its own offsets; every other resource (execution slots,
the result producer, offset tracking) belongs to the loop and is shared.

A consumer serves its rebalance callbacks only while it is polled, and leaves its group when it
is not polled within ``max.poll.interval.ms``: every fetch polls each consumer, starting from a
different one each time, so a busy queue never starves a quiet one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

__all__ = ["QueueConsumers", "worker_group"]

Callback = Callable[[Consumer, list[TopicPartition]], None]


def worker_group(topic_prefix: str, queue: str) -> str:
    """The consumer group shared by every worker of ``queue``: ``<prefix>worker.<queue>``."""
    return f"{topic_prefix}worker.{queue}"


class QueueConsumers:
    """One consumer per queue; topics are disjoint, so each partition has exactly one owner.

    Args:
        confs: ``{task topic: consumer configuration}`` (each with its queue's ``group.id``).
        levels: ``{task topic: every topic of that queue}``: the consumer of a queue also reads its
            priority level topics (``tasks.<queue>.p<level>``), in the same group. Default: the
            task topic alone.
    """

    def __init__(self, confs: dict[str, dict[str, Any]], levels: Mapping[str, Sequence[str]] | None = None) -> None:
        if not confs:
            raise ValueError("a worker needs at least one task topic")
        self._subscriptions = {topic: list((levels or {}).get(topic, [topic])) for topic in confs}
        self._by_queue: dict[str, Consumer] = {topic: Consumer(conf) for topic, conf in confs.items()}
        self._by_topic: dict[str, Consumer] = {t: self._by_queue[topic] for topic, ts in self._subscriptions.items()
                                               for t in ts}
        self._all = list(self._by_queue.values())
        self._turn = 0  # index of the consumer polled first by the next fetch

    @property
    def topics(self) -> list[str]:
        return list(self._by_topic)

    def subscribe(self, on_assign: Callable[[str], Callback], on_revoke: Callback, on_lost: Callback) -> None:
        """Subscribe each consumer to its queue's topics; ``on_assign(topic)`` makes the assign callback of
        the consumer of task topic ``topic``."""
        for topic, consumer in self._by_queue.items():
            consumer.subscribe(self._subscriptions[topic], on_assign=on_assign(topic), on_revoke=on_revoke,
                               on_lost=on_lost)

    def fetch(self, room: int, timeout: float) -> list[Message]:
        """Up to ``room`` records (at least one record if any consumer has one within ``timeout``).

        Every consumer is polled while room is left; the wait is shared among them and ends with
        the first record, after which the others are only asked for what they already fetched.
        """
        batch: list[Message] = []
        n = len(self._all)
        start, self._turn = self._turn, (self._turn + 1) % n
        for i in range(n):
            left = room - len(batch)
            if left <= 0:
                break
            consumer = self._all[(start + i) % n]
            msg = consumer.poll(0 if batch else timeout / n)
            if msg is None:
                continue
            batch.append(msg)
            if left > 1:
                batch.extend(consumer.consume(left - 1, 0))
        return batch

    def consume(self, per_consumer: int) -> list[Message]:
        """What every consumer already fetched, up to ``per_consumer`` records each; never waits."""
        out: list[Message] = []
        for consumer in self._all:
            out.extend(consumer.consume(per_consumer, 0))
        return out

    def assignment(self) -> list[TopicPartition]:
        return [tp for consumer in self._all for tp in consumer.assignment()]

    def pause(self, partitions: list[TopicPartition]) -> None:
        for consumer, tps in self._route(partitions):
            consumer.pause(tps)

    def resume(self, partitions: list[TopicPartition]) -> None:
        for consumer, tps in self._route(partitions):
            consumer.resume(tps)

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [tp for consumer, tps in self._route(partitions) for tp in consumer.position(tps)]

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        """The committed offsets of ``partitions``, each from its own group (offset < 0: none)."""
        return [tp for consumer, tps in self._route(partitions) for tp in consumer.committed(tps, timeout=timeout)]

    def seek(self, partition: TopicPartition) -> None:
        self._by_topic[partition.topic].seek(partition)

    def get_watermark_offsets(self, partition: TopicPartition, **kwargs: Any) -> tuple[int, int]:
        return self._by_topic[partition.topic].get_watermark_offsets(partition, **kwargs)  # type: ignore[no-any-return]

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        """Commit each consumer's share of ``offsets`` to its own group.

        Raises:
            KafkaException: a synchronous commit failed (the other consumers are still committed).
        """
        error: BaseException | None = None
        for consumer, tps in self._route(offsets):
            try:
                consumer.commit(offsets=tps, asynchronous=asynchronous)
            except Exception as exc:  # noqa: BLE001 - re-raised after the other groups committed
                error = error or exc
        if error is not None:
            raise error

    def close(self) -> None:
        """Close every consumer (each commits nothing more and leaves its group)."""
        error: BaseException | None = None
        for consumer in self._all:
            try:
                consumer.close()
            except Exception as exc:  # noqa: BLE001 - every consumer must leave its group
                error = error or exc
        if error is not None:
            raise error

    def _route(self, partitions: Iterable[TopicPartition]) -> list[tuple[Consumer, list[TopicPartition]]]:
        groups: dict[int, tuple[Consumer, list[TopicPartition]]] = {}
        for tp in partitions:
            consumer = self._by_topic[tp.topic]
            groups.setdefault(id(consumer), (consumer, []))[1].append(tp)
        return list(groups.values())
