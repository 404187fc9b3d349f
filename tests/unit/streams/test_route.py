"""Routing commands to lanes and rewinding after an aborted transaction, without a broker.

A real :class:`EngineProcessor` (its lanes are not started and never produce) and real
``confluent_kafka.Message`` records; only the consumer is a recorder of seeks, because the polling
thread's part of a rewind is a ``seek`` and nothing else.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from confluent_kafka import Message, TopicPartition

from kflow.config import EngineConfig
from kflow.streams.lane import Batch, Lane
from kflow.streams.processor import EngineProcessor


class Seeks:
    """The consumer as a rewind sees it: it records the seeks it is asked for."""

    def __init__(self) -> None:
        self.done: list[tuple[int, int]] = []

    def seek(self, tp: TopicPartition) -> None:
        self.done.append((tp.partition, tp.offset))


def engine(tmp_path: Path, lanes: int = 1) -> EngineProcessor:
    proc = EngineProcessor(EngineConfig(state_dir=str(tmp_path), lanes=lanes, partitions=4))
    proc.lanes = [Lane(proc, i, producer=None) for i in range(proc.lanes_n)]  # type: ignore[arg-type]
    proc.consumer = Seeks()  # type: ignore[assignment]
    return proc


def cmd(p: int, offset: int) -> Message:
    return Message(topic=EngineConfig().names.commands, partition=p, offset=offset, key=b"k", value=b"v")


def held(lane: Lane) -> list[tuple[int, int]]:
    return [(m.partition(), m.offset()) for m, _ in lane._inbox]


def test_a_rewinding_partition_is_dropped_until_its_seek_then_read_again(tmp_path: Path) -> None:
    proc = engine(tmp_path)
    lane = proc.lanes[0]
    proc._route([cmd(0, 10), cmd(1, 20)], 0)
    proc.request_rewind(lane, {0: 10})
    assert held(lane) == [(1, 20)]  # what the lane held of partition 0 is forgotten
    proc._route([cmd(0, 11), cmd(1, 21)], 0)  # fetched before the seek: dropped, the seek brings it back
    assert held(lane) == [(1, 20), (1, 21)]
    proc._apply_seeks()
    assert proc.consumer.done == [(0, 10)]  # type: ignore[attr-defined]
    proc._route([cmd(0, 10), cmd(0, 11)], 0)
    assert held(lane) == [(1, 20), (1, 21), (0, 10), (0, 11)]


def test_a_rewind_never_falls_between_routing_and_handing_over(tmp_path: Path) -> None:
    """A rewind that lands while the polling thread hands records to the lane waits for it, then drops
    them: records fetched before the rewind never sit in the lane after its drop, ahead of the records
    the seek brings back (decided out of order, a second abort would rewind past them)."""
    proc = engine(tmp_path)
    lane = proc.lanes[0]
    handed = Lane.submit
    rewound = threading.Event()

    def rewind() -> None:
        proc.request_rewind(lane, {0: 5})
        rewound.set()

    def submit_meanwhile(self: Lane, msgs: list[Message], polled_us: int) -> None:
        other = threading.Thread(target=rewind)
        other.start()
        other.join(0.2)  # the lane thread's rewind runs now, if the route let it in
        handed(self, msgs, polled_us)

    lane.submit = submit_meanwhile.__get__(lane)  # type: ignore[method-assign]
    proc._route([cmd(0, 7), cmd(0, 8)], 0)
    assert rewound.wait(10)
    assert held(lane) == [], "records fetched before the rewind were handed to the lane after its drop"
    proc._apply_seeks()
    assert proc.consumer.done == [(0, 5)]  # type: ignore[attr-defined]


def test_a_batch_rewinds_to_its_lowest_offset_of_each_partition(tmp_path: Path) -> None:
    """Even records reaching a batch out of order never make its rewind skip any of them."""
    proc = engine(tmp_path)
    lane = proc.lanes[0]
    lane.producer = Produced()  # type: ignore[assignment]
    batch = Batch(now=0)
    for m in (cmd(2, 30), cmd(2, 31), cmd(2, 12), cmd(3, 40)):
        lane._one_record(batch, m)  # b"v" is no command: dead-lettered after its offset is counted
    assert batch.first_offsets == {2: 12, 3: 40}
    assert batch.next_offsets == {2: 32, 3: 41}
    assert len(lane.producer.records) == 4  # type: ignore[attr-defined]


class Produced:
    """The lane's producer as a batch sees it: it keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def produce(self, topic: str, value: bytes, key: bytes, **kw: Any) -> None:
        self.records.append((topic, key, value))


class Rebalancing:
    """A consumer whose ``poll`` returns one record and whose ``consume`` serves a rebalance first
    (revoking ``moved``, as librdkafka runs the callbacks inside the call), then returns ``after``."""

    def __init__(self, proc: EngineProcessor, first: Message, moved: list[int], after: list[Message]) -> None:
        self.proc, self.first, self.moved, self.after = proc, first, moved, after

    def poll(self, timeout: float) -> Message:
        return self.first

    def consume(self, n: int, timeout: float) -> list[Message]:
        self.proc._moved.update(self.moved)  # what _on_revoke / _on_lost note
        return self.after


def test_a_record_polled_before_its_partition_was_revoked_is_dropped(tmp_path: Path) -> None:
    """Re-assigned, the partition resumes from the committed offset: the record polled before the
    revoke would otherwise be decided ahead of the records read again from there."""
    proc = engine(tmp_path)
    again = [cmd(2, 12), cmd(2, 13)]
    proc.consumer = Rebalancing(proc, cmd(2, 31), [2, 3], again)  # type: ignore[assignment]
    assert [(m.partition(), m.offset()) for m in proc._poll_batch()] == [(2, 12), (2, 13)]
    # a rebalance that left the first record's partition alone keeps it
    proc.consumer = Rebalancing(proc, cmd(1, 7), [3], [cmd(1, 8)])  # type: ignore[assignment]
    assert [(m.partition(), m.offset()) for m in proc._poll_batch()] == [(1, 7), (1, 8)]
