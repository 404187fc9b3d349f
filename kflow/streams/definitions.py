"""The ``definitions`` topic as a global table: every engine reads all of it into memory.

Definitions are compacted records keyed ``name@version``. The table polls without blocking on
each processing loop, and ``catch_up()`` reads to the high watermark on demand, which the engine
calls before declaring a workflow unknown (a ``deploy`` may have just landed).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

from confluent_kafka import Consumer, TopicPartition

from kflow.engine import InMemoryDefinitions
from kflow.model.errors import DecodeError, DefinitionError
from kflow.schemas.codec import decode_definition

log = logging.getLogger("kflow.definitions")


class DefinitionsTable(InMemoryDefinitions):
    """An :class:`InMemoryDefinitions` fed from the definitions topic."""

    def __init__(self, consumer_conf: dict[str, Any], topic: str,
                 compile_code: Optional[Callable[[Any], Any]] = None) -> None:
        super().__init__()
        self.topic = topic
        conf = {**consumer_conf, "group.id": "kflow-definitions", "enable.auto.commit": False,
                "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10}
        self._c = Consumer(conf)
        md = self._c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions) if topic in md.topics else [0]
        self._tps = [TopicPartition(topic, p, 0) for p in parts]
        self._c.assign(self._tps)
        self._compile_code = compile_code

    def poll(self, timeout: float = 0.0) -> int:
        """Apply whatever definitions arrived; returns how many."""
        n = 0
        for m in self._c.consume(500, timeout):
            if m.error() or m.value() is None:
                continue
            try:
                d = decode_definition(m.value())
                if d.kind == "spec":
                    self.add_definition(d)
                elif self._compile_code is not None:
                    self.add(self._compile_code(d))
                n += 1
            except (DecodeError, DefinitionError) as e:
                log.error("skipping definition at offset %d: %s", m.offset(), e)
        return n

    def catch_up(self, timeout: float = 5.0) -> None:
        """Read until every partition's position reaches the high watermark seen now."""
        deadline = time.monotonic() + timeout
        marks = {tp.partition: self._c.get_watermark_offsets(TopicPartition(self.topic, tp.partition),
                                                              timeout=timeout, cached=False) for tp in self._tps}
        while True:
            pos = {tp.partition: tp.offset for tp in self._c.position(self._tps)}
            if all(high <= low or pos[p] >= high for p, (low, high) in marks.items()):
                return
            if time.monotonic() > deadline:
                log.warning("definitions table behind its high watermark after %.1fs", timeout)
                return
            self.poll(0.005)

    def read_through(self, offset: int, timeout: float = 5.0) -> None:
        """Read until the (single-partition) table has consumed ``offset``; cheap when it already has."""
        deadline = time.monotonic() + timeout
        tp = self._tps[0]
        while self._c.position([TopicPartition(self.topic, tp.partition)])[0].offset <= offset:
            if time.monotonic() > deadline:
                log.warning("definitions table did not reach offset %d within %.1fs", offset, timeout)
                return
            self.poll(0.005)

    def close(self) -> None:
        self._c.close()
