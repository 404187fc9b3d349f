"""The ``kafka`` connector: produce to, and request/reply with, other services over Kafka.

Settings: ``bootstrap`` (host:port list), ``config`` (librdkafka properties passed through, e.g.
``security.protocol``, ``sasl.password``; secret ones are never logged), ``reply_topic`` (for
``request`` operations) and ``connect_timeout``.

Operations (``action``):

- ``produce``: ``topic`` and ``key`` (templates), ``value`` (a CEL expression, sent as JSON) and
  ``headers`` (templates); returns ``{topic, partition, offset}`` once the broker acknowledged it.
  Keys are partitioned with ``murmur2_random``, like every kflow producer (and Java clients).
- ``request``: produces like ``produce`` with the headers ``kflow.correlation_id`` (fresh) and
  ``kflow.reply_topic``; the responder produces its reply to the reply topic with the same
  ``kflow.correlation_id`` header; the operation returns the reply value (JSON when it parses,
  else text). No reply within ``timeout`` is a retryable ``KafkaTimeout``.

One consumer per connector reads the reply topic: at connect time it is assigned every
partition of that topic at its current end, so only replies to this process's requests matter.
Producer and consumer are served by one daemon thread each; results reach the connector loop
through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any, Literal

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from pydantic import BaseModel, ConfigDict, Field

from kflow.connectors.base import (
    Connector,
    ConnectorConfigError,
    ConnectorError,
    ConnectorSpec,
    Operation,
    connector_type,
)
from kflow.connectors.config import Duration, Expr, Template, parse_settings
from kflow.readend import at_end

__all__ = ["CORRELATION_HEADER", "REPLY_TOPIC_HEADER", "KafkaConnector"]

CORRELATION_HEADER = "kflow.correlation_id"
REPLY_TOPIC_HEADER = "kflow.reply_topic"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KafkaSettings(_Model):
    """Settings of a ``kafka`` connector."""

    bootstrap: str = Field(min_length=1)
    config: dict[str, Any] = Field(default_factory=dict)
    reply_topic: str | None = None
    connect_timeout: Duration = 10.0


class _Operation(_Model):
    action: Literal["produce", "request"] = "produce"
    topic: str = Field(min_length=1)
    key: str | None = None
    value: str = "input"
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: Duration = 30.0


class _Compiled:
    def __init__(self, name: str, op: _Operation, where: str) -> None:
        self.name, self.op = name, op
        self.topic = Template(op.topic, f"{where}.topic")
        self.key = Template(op.key, f"{where}.key") if op.key is not None else None
        self.value = Expr(op.value, f"{where}.value")
        self.headers = {k: Template(v, f"{where}.headers.{k}") for k, v in op.headers.items()}


def _decode(value: bytes | None) -> Any:
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value.decode("utf-8", "replace")


def _header(msg: Message, name: str) -> str | None:
    raw = msg.headers() or []
    for k, v in raw.items() if isinstance(raw, dict) else raw:
        if k == name and v is not None:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


@connector_type
class KafkaConnector(Connector):
    """Produce and request/reply over Kafka topics outside kflow's own."""

    type = "kafka"

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        self.settings: KafkaSettings = parse_settings(KafkaSettings, spec.settings, spec)
        self._ops = {name: _Compiled(name, parse_settings(_Operation, decl, spec, f"operation '{name}'"),
                                     f"connector '{spec.name}' operation '{name}'")
                     for name, decl in spec.operations.items()}
        if any(c.op.action == "request" for c in self._ops.values()) and not self.settings.reply_topic:
            raise ConnectorConfigError(f"connector '{spec.name}' (kafka): settings.reply_topic is required "
                                       "by its request operations")
        self.producer: Producer | None = None
        self.consumer: Consumer | None = None
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _conf(self) -> dict[str, Any]:
        return {**{k: str(v) if not isinstance(v, (bool, int, float)) else v for k, v in self.settings.config.items()},
                "bootstrap.servers": self.settings.bootstrap}

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        timeout = self.settings.connect_timeout
        self.producer = Producer({**self._conf(), "partitioner": "murmur2_random", "enable.idempotence": True,
                                  "linger.ms": 2})
        await self._loop.run_in_executor(None, self._check_metadata, self.producer, timeout)
        self._spawn(self._serve_producer, "producer")
        if self.settings.reply_topic:
            self.consumer = Consumer({**self._conf(), "group.id": f"kflow-connector-{self.name}-{uuid.uuid4().hex[:8]}",
                                      "enable.auto.commit": False, "enable.partition.eof": False,
                                      "fetch.wait.max.ms": 10})
            await self._loop.run_in_executor(None, self._assign_at_end, timeout)
            self._spawn(self._serve_consumer, "replies")

    def _check_metadata(self, client: Producer, timeout: float) -> None:
        try:
            client.list_topics(timeout=timeout)
        except KafkaException as e:
            raise ConnectorError("KafkaError", f"cannot reach Kafka at {self.settings.bootstrap}: {e}") from None

    def _assign_at_end(self, timeout: float) -> None:
        assert self.consumer is not None and self.settings.reply_topic
        topic = self.settings.reply_topic
        md = self.consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            raise ConnectorError("KafkaError", f"reply topic {topic!r} does not exist"
                                 + (f": {md.error}" if md is not None and md.error else ""))
        self.consumer.assign(at_end(self.consumer, topic, md.partitions, timeout))

    def _spawn(self, target: Any, what: str) -> None:
        t = threading.Thread(target=target, args=(self._stop,), name=f"kflow-kafka-{self.name}-{what}", daemon=True)
        t.start()
        self._threads.append(t)

    def _serve_producer(self, stop: threading.Event) -> None:
        producer = self.producer
        while not stop.is_set() and producer is not None:
            producer.poll(0.05)

    def _serve_consumer(self, stop: threading.Event) -> None:
        consumer = self.consumer
        while not stop.is_set() and consumer is not None:
            try:
                msg = consumer.poll(0.1)
            except RuntimeError:  # closed underneath us during shutdown
                return
            if msg is None or msg.error() is not None:
                continue
            cid = _header(msg, CORRELATION_HEADER)
            if cid is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self._on_reply, cid, _decode(msg.value()))

    def _on_reply(self, cid: str, value: Any) -> None:
        fut = self._waiting.pop(cid, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    async def disconnect(self) -> None:
        self._stop.set()
        threads, self._threads = self._threads, []
        loop = asyncio.get_running_loop()
        for t in threads:
            await loop.run_in_executor(None, t.join, 5)
        for fut in self._waiting.values():
            fut.cancel()
        self._waiting.clear()
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            await loop.run_in_executor(None, consumer.close)
        producer, self.producer = self.producer, None
        if producer is not None:
            await loop.run_in_executor(None, producer.flush, 5)

    async def health(self) -> bool:
        return self.producer is not None and all(t.is_alive() for t in self._threads)

    def operations(self) -> dict[str, Operation]:
        return {name: self._operation(c) for name, c in self._ops.items()}

    async def _produce(self, topic: str, key: bytes | None, value: bytes,
                       headers: list[tuple[str, str | bytes | None]], what: str) -> Message:
        producer = self.producer
        if producer is None:
            raise ConnectorError("ConnectorUnavailable", f"connector '{self.name}' is not connected")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Message] = loop.create_future()

        def report(err: KafkaError | None, msg: Message) -> None:
            def settle() -> None:
                if done.done():
                    return
                if err is None:
                    done.set_result(msg)
                else:
                    done.set_exception(ConnectorError("KafkaError", f"{what}: delivery failed: {err.str()}",
                                                      retryable=err.retriable() or not err.fatal()))
            loop.call_soon_threadsafe(settle)

        try:
            producer.produce(topic, value, key, headers=headers, on_delivery=report)
        except BufferError:
            raise ConnectorError("KafkaError", f"{what}: the producer queue is full", retryable=True) from None
        except KafkaException as e:
            raise ConnectorError("KafkaError", f"{what}: {e}", retryable=True) from None
        return await done

    def _operation(self, c: _Compiled) -> Operation:
        async def run(input: Any) -> Any:
            scope = {"input": input}
            topic = c.topic.render(scope)
            key = c.key.render(scope).encode() if c.key is not None else None
            value = orjson.dumps(c.value.value(scope))
            headers: list[tuple[str, str | bytes | None]] = [(k, t.render(scope).encode())
                                                             for k, t in c.headers.items()]
            what = f"connector '{self.name}' operation '{c.name}'"
            if c.op.action == "produce":
                msg = await asyncio.wait_for(self._produce(topic, key, value, headers, what), c.op.timeout)
                return {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()}
            assert self.settings.reply_topic is not None
            cid = uuid.uuid4().hex
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiting[cid] = fut
            headers += [(CORRELATION_HEADER, cid.encode()), (REPLY_TOPIC_HEADER, self.settings.reply_topic.encode())]
            try:
                async with asyncio.timeout(c.op.timeout):
                    await self._produce(topic, key, value, headers, what)
                    return await fut
            except TimeoutError:
                raise ConnectorError("KafkaTimeout", f"{what}: no reply on {self.settings.reply_topic!r} within "
                                     f"{c.op.timeout:g}s", retryable=True) from None
            finally:
                self._waiting.pop(cid, None)

        return run
