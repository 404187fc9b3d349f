"""Reading a topic to its end: every record there is now, and where "now" ends on each partition.

The one home of a job several parts of kflow do — the client scanning an instance's partition,
``kflow dlq list``, ``kflow doctor``, the CLI's ``--scan`` views, the bench's hop stamps — and of
its one subtlety: the end of a partition is the high watermark seen when the read starts, and a
``read_committed`` reader may never reach ``high - 1`` (the last offset of a transactional topic is
usually a commit marker, or an aborted record), so a partition is also finished by the consumer's
end-of-partition event. :class:`EndReader` does that read; :func:`watermarks` and :func:`at_end`
are the look-ups it shares with consumers that follow a topic from its current end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Optional

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from kflow.model.errors import BrokerUnavailable

__all__ = ["EndReader", "at_end", "watermarks"]

#: Records fetched per ``consume`` call, and how long one call waits for the first of them.
_BATCH, _POLL_SECONDS = 500, 0.1


def watermarks(consumer: Consumer, topic: str, partitions: Iterable[int], timeout: float) -> dict[int, tuple[int, int]]:
    """``partition -> (low, high)`` watermarks of ``topic``, asked of the broker (never cached).

    The answer depends on ``consumer``'s ``isolation.level``: ``read_committed`` gets the last
    stable offset as ``high``, which an open transaction holds back.

    Raises:
        KafkaException: the broker did not answer within ``timeout`` seconds.
    """
    out = {}
    for p in sorted(partitions):
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout, cached=False)
        out[p] = (int(low), int(high))
    return out


def at_end(consumer: Consumer, topic: str, partitions: Iterable[int], timeout: float) -> list[TopicPartition]:
    """``topic``'s ``partitions`` positioned at their high watermark: assign them to read only what comes next.

    Raises:
        KafkaException: the broker did not answer within ``timeout`` seconds.
    """
    marks = watermarks(consumer, topic, partitions, timeout)
    return [TopicPartition(topic, p, high) for p, (_low, high) in marks.items()]


class EndReader:
    """A consumer that reads partitions from a start offset to the end they had when the read began.

    It never joins its group or commits: partitions are ``assign``-ed. ``read_committed`` unless
    ``conf`` says otherwise; end-of-partition events are always on (see the module docstring).
    One reader serves many reads, one at a time.

    Args:
        conf: librdkafka consumer settings (``bootstrap.servers`` and security at least); a
            ``group.id`` is made up when missing.
        timeout: Seconds allowed for each metadata or watermark look-up.

    Attributes:
        consumer: The underlying consumer (for reads of another kind on the same connection).
        records: Records yielded by :meth:`read` so far, over every read.
    """

    def __init__(self, conf: Mapping[str, Any], *, timeout: float = 10.0) -> None:
        self.bootstrap = str(conf.get("bootstrap.servers", ""))
        self.timeout = timeout
        self.records = 0
        self.consumer = Consumer({"group.id": f"kflow-read-{uuid.uuid4().hex}", "isolation.level": "read_committed",
                                  **conf, "enable.auto.commit": False, "enable.partition.eof": True})

    def partitions(self, topic: str) -> list[int]:
        """The partitions of ``topic``; empty when the topic does not exist (or reports an error).

        Raises:
            BrokerUnavailable: the metadata could not be read.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                found = self.consumer.list_topics(topic, timeout=self.timeout).topics.get(topic)
            except KafkaException as exc:
                raise BrokerUnavailable(self.bootstrap, f"cannot read metadata of {topic}: {exc}") from None
            if found is None or found.error is None or found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                return [] if found is None or found.error is not None else sorted(found.partitions)
            # another error (a leader being elected, say) passes: an existing topic is not "none"
            if time.monotonic() > deadline:
                raise BrokerUnavailable(self.bootstrap, f"cannot read metadata of {topic}: {found.error}")
            time.sleep(0.1)

    def watermarks(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
        """:func:`watermarks` with this reader's consumer.

        Raises:
            BrokerUnavailable: the broker did not answer.
        """
        try:
            return watermarks(self.consumer, topic, partitions, self.timeout)
        except KafkaException as exc:
            raise BrokerUnavailable(self.bootstrap, f"cannot read offsets of {topic}: {exc}") from None

    def read(self, topic: str, partitions: Optional[Iterable[int]] = None, *,
             start: Optional[Mapping[int, int]] = None, ends: Optional[Mapping[int, int]] = None,
             timeout: float = 30.0, what: str = "") -> Iterator[Message]:
        """Yield the records of ``topic`` until every partition reached its end, in order per partition.

        Args:
            topic: The topic.
            partitions: Which partitions (default: all, or those of ``start``/``ends`` when given).
            start: ``partition -> offset`` to read from (default: each partition's beginning).
            ends: ``partition -> end offset`` (exclusive) when the caller looked them up already
                (with another isolation level, say); default: the high watermarks now.
            timeout: Seconds the whole read may take.
            what: What is being read, for the timeout's message.

        A partition with nothing between its start and end is not read at all. A partition is
        finished at its end offset or its end-of-partition event, whichever comes first, and the
        read ends with the fetch that finished the last one: records fetched with it are yielded
        too. So a read returns everything before the ends and possibly some records written
        after it began, never fewer. That is also what keeps a read whole on a broker whose high
        watermark stops inside a batch just written (the embedded one reports the last batch's
        base offset plus one): the rest of the batch arrives in the same fetch.

        Raises:
            BrokerUnavailable: the offsets could not be looked up, or the read took longer than
                ``timeout``.
            KafkaException: the consumer failed fatally.
        """
        if partitions is None:
            given = ends if ends is not None else start
            partitions = list(given) if given is not None else self.partitions(topic)
        partitions = sorted(partitions)
        # With ends of its own (this consumer's isolation level), a partition's end-of-partition
        # event below its end is early (an open transaction not yet committed, on the embedded
        # broker): the read goes on until the end is reached. Ends given by the caller may lie
        # beyond what this reader can ever read, so there the event ends the partition.
        own_ends = ends is None
        if ends is None:
            marks = self.watermarks(topic, partitions)
            todo = {p: high for p, (low, high) in marks.items() if high > max(low, (start or {}).get(p, low))}
        else:
            todo = {p: ends[p] for p in partitions if ends[p] > (start or {}).get(p, 0)}
        if not todo:
            return
        self.consumer.assign([TopicPartition(topic, p, (start or {}).get(p, OFFSET_BEGINNING)) for p in todo])
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(self.bootstrap, f"{what or f'reading {topic}'} took longer than {timeout:g}s")
            for msg in self._drain():
                if msg.topic() != topic:
                    continue  # left over from an earlier read's assignment
                err = msg.error()
                p, offset = msg.partition(), msg.offset()
                assert p is not None and offset is not None  # set on every record and partition event
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and (not own_ends or offset >= todo.get(p, 0) - 1):
                        todo.pop(p, None)
                    elif err.fatal():
                        raise KafkaException(err)
                    continue
                self.records += 1
                yield msg
                if p in todo and offset >= todo[p] - 1:
                    todo.pop(p)

    def _drain(self) -> list[Message]:
        """The records fetched so far, waiting at most ``_POLL_SECONDS`` for the first one.

        ``consume(n, timeout)`` alone would wait the whole timeout whenever fewer than n arrive.
        """
        first = self.consumer.poll(_POLL_SECONDS)
        if first is None:
            return []
        return [first, *self.consumer.consume(_BATCH, 0)]

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> EndReader:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()
