"""The ``definitions`` topic read as a table: the engine's global table and the client's view of it.

Definitions are compacted records keyed ``name@version``, and a deployed version is immutable: the
first record per key is the one that counts, a later one with the same content is a no-op, and a
later one with other content is ignored (logged) so running instances keep what they started on.
:class:`DefinitionsLog` reads the raw records (the client's view, used to refuse a conflicting
deploy and a start of an undeployed workflow before anything is written); :class:`DefinitionsTable`
compiles them into the engine's :class:`~kflow.engine.InMemoryDefinitions`. Both poll without
blocking, and ``catch_up()`` reads to the high watermark on demand, which the engine calls before
declaring a workflow unknown (a ``deploy`` may have just landed). Engines also publish a ``code``
record (module, function, source fingerprint) for every code workflow they host, so clients see
code workflows on the same topic.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from confluent_kafka import Consumer, Producer, TopicPartition

from kflow.engine import InMemoryDefinitions
from kflow.engine.definitions import definition_fingerprint
from kflow.model.errors import DecodeError, DefinitionConflict, DefinitionError
from kflow.model.messages import Definition
from kflow.model.versions import format_version, version_tuple
from kflow.schemas.codec import decode_definition, encode_definition

if TYPE_CHECKING:
    from kflow.engine.activity import Limits
    from kflow.engine.code_cache import ReplayCache
    from kflow.engine.limits import LimitsView
    from kflow.engine.registry import WorkflowRegistry

__all__ = ["DefinitionsLog", "DefinitionsTable", "code_fingerprint", "code_record"]

log = logging.getLogger("kflow.definitions")


class DefinitionsLog:
    """The definitions topic from its start: the first record per ``name@version``, uncompiled.

    Args:
        consumer_conf: librdkafka consumer settings (no group membership is used: partitions are assigned).
        topic: The definitions topic.
        on_record: Called with ``(offset, definition)`` for every decoded record, in topic order.
    """

    def __init__(self, consumer_conf: dict[str, Any], topic: str,
                 on_record: Optional[Callable[[int, Definition], None]] = None) -> None:
        self.topic = topic
        conf = {**consumer_conf, "group.id": "kflow-definitions", "enable.auto.commit": False,
                "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10}
        self._c = Consumer(conf)
        md = self._c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions) if topic in md.topics else [0]
        self._tps = [TopicPartition(topic, p, 0) for p in parts]
        self._c.assign(self._tps)
        self._on_record = on_record
        self._first: dict[str, Definition] = {}

    def get(self, name: str, version: int) -> Optional[Definition]:
        """The record that counts for ``name@version`` (the first one read), or None."""
        return self._first.get(f"{name}@{format_version(version)}")

    def versions(self, name: str) -> list[int]:
        """Every version of ``name`` read so far, ascending (semantic order: see :mod:`kflow.model.versions`)."""
        return sorted((d.version for d in self._first.values() if d.name == name), key=version_tuple)

    def note(self, d: Definition) -> None:
        """Remember a record this process wrote before it is read back (the first record still wins)."""
        self._first.setdefault(d.key, d)

    def poll(self, timeout: float = 0.0) -> int:
        """Read whatever arrived; returns how many records were decoded."""
        n = 0
        for m in self._c.consume(500, timeout):
            value = m.value()
            if m.error() or value is None:
                continue  # tombstones do not undeploy: running instances may still need the version
            try:
                d = decode_definition(value)
            except DecodeError as e:
                log.error("skipping undecodable definition at offset %d: %s", m.offset(), e)
                continue
            self._first.setdefault(d.key, d)
            n += 1
            if self._on_record is not None:
                offset = m.offset()
                assert offset is not None  # a consumed record without an error has one
                self._on_record(offset, d)
        return n

    def catch_up(self, timeout: float = 5.0) -> bool:
        """Read until every partition's position reaches the high watermark seen now; False on timeout."""
        deadline = time.monotonic() + timeout
        marks = {tp.partition: self._c.get_watermark_offsets(TopicPartition(self.topic, tp.partition),
                                                              timeout=timeout, cached=False) for tp in self._tps}
        while True:
            pos = {tp.partition: tp.offset for tp in self._c.position(self._tps)}
            if all(high <= low or pos[p] >= high for p, (low, high) in marks.items()):
                return True
            if time.monotonic() > deadline:
                log.warning("definitions table behind its high watermark after %.1fs", timeout)
                return False
            self.poll(0.005)

    def read_through(self, offset: int, timeout: float = 5.0) -> bool:
        """Read until the (single-partition) topic is consumed past ``offset``; cheap when it already is."""
        deadline = time.monotonic() + timeout
        tp = self._tps[0]
        while self._c.position([TopicPartition(self.topic, tp.partition)])[0].offset <= offset:
            if time.monotonic() > deadline:
                log.warning("definitions table did not reach offset %d within %.1fs", offset, timeout)
                return False
            self.poll(0.005)
        return True

    def close(self) -> None:
        self._c.close()


def code_fingerprint(d: Any) -> str:
    """SHA-256 (hex) of a hosted code workflow's source (the class for class-style workflows).

    Falls back to the function's bytecode when the source cannot be read.
    """
    target: Any = sys.modules.get(d.module)
    for part in str(getattr(d.fn, "__qualname__", "")).split("."):
        target = getattr(target, part, None)
    try:
        source = inspect.getsource(target if target is not None else d.fn)
    except (OSError, TypeError):
        source = d.fn.__code__.co_code.hex()
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def code_record(d: Any, now_ms: int) -> Definition:
    """The ``code`` definition record that makes a hosted code workflow visible on the topic."""
    body = {"module": d.module, "function": str(getattr(d.fn, "__qualname__", "")), "fingerprint": code_fingerprint(d)}
    return Definition(name=d.name, version=d.version, kind="code", body=body, deployed_ms=now_ms)


class DefinitionsTable(InMemoryDefinitions):
    """An :class:`InMemoryDefinitions` fed from the definitions topic (first content per key wins)."""

    #: Set by the engine: the per-instance limits (``kflow.engine.activity.limits_of``) and the limits
    #: table quotas are read from (``kflow.engine.limits.table_of``).
    limits: Limits
    quotas: LimitsView

    def __init__(self, consumer_conf: dict[str, Any], topic: str,
                 compile_code: Optional[Callable[[Any], Any]] = None, *, registry: Optional[WorkflowRegistry] = None,
                 replay_cache: Optional[ReplayCache] = None) -> None:
        super().__init__(registry, replay_cache)
        self.topic = topic
        self._compile_code = compile_code
        self._log = DefinitionsLog(consumer_conf, topic, self._apply)

    def _apply(self, offset: int, d: Definition) -> None:
        try:
            if d.kind == "spec":
                self.add_definition(d)
            elif self._compile_code is not None:
                self.add(self._compile_code(d))
        except DefinitionConflict as e:
            log.error("ignoring the definition at offset %d: %s", offset, e)
        except DefinitionError as e:
            # a code record of a workflow another engine hosts is expected; anything else is not
            level = logging.DEBUG if d.kind == "code" else logging.ERROR
            log.log(level, "skipping definition at offset %d: %s", offset, e)

    def poll(self, timeout: float = 0.0) -> int:
        """Apply whatever definitions arrived; returns how many records were read."""
        return self._log.poll(timeout)

    def catch_up(self, timeout: float = 5.0) -> bool:
        """Read until every partition's position reaches the high watermark seen now; False on timeout."""
        return self._log.catch_up(timeout)

    def read_through(self, offset: int, timeout: float = 5.0) -> bool:
        """Read until the table has consumed ``offset``; cheap when it already has."""
        return self._log.read_through(offset, timeout)

    def host(self, hosted: list[Any], producer_conf: dict[str, Any], now_ms: int) -> None:
        """Add the code workflows this process hosts and publish a ``code`` record for each new one.

        Call after :meth:`catch_up`. A version already on the topic is not written again; one whose
        recorded source fingerprint differs is logged: instances started on the old code replay
        against the code hosted now, and one whose history it does not reproduce is blocked with a
        non-determinism error (guard compatible changes with ``ctx.patched()``, or bump the version).
        """
        fresh: list[Definition] = []
        for d in hosted:
            try:
                self.add(d)
            except DefinitionConflict as e:
                log.error("not hosting code workflow %s@%d: %s", d.name, d.version, e)
                continue
            record, known = code_record(d, now_ms), self._log.get(d.name, d.version)
            if known is None:
                fresh.append(record)
            elif known.kind != "code":
                log.error("code workflow %s is also deployed as a %s definition; the deployed one counts",
                          record.key, known.kind)
            elif definition_fingerprint("code", known.body) != definition_fingerprint("code", record.body):
                log.warning("code workflow %s differs from the code first deployed under that version "
                            "(source %s, now %s): running instances replay against this code; bump the "
                            "version or guard the change with ctx.patched()", record.key,
                            str(known.body.get("fingerprint", ""))[:12], record.body["fingerprint"][:12])
        if fresh:
            producer = Producer({**producer_conf, "acks": "all", "enable.idempotence": True})
            for rec in fresh:
                producer.produce(self.topic, encode_definition(rec), rec.key.encode())
                self._log.note(rec)
            left = producer.flush(10)
            if left:
                log.warning("%d code definition record(s) not confirmed; clients may not see them yet", left)

    def close(self) -> None:
        self._log.close()
