"""The ``amqp`` connector: publish to and request/reply over RabbitMQ (AMQP 0-9-1) with aio-pika.

Settings: ``url`` (``amqp://user@host:5672/vhost``), an optional ``password`` (kept out of the
URL, never logged), ``confirms`` (publisher confirms, default on) and ``connect_timeout``.

Operations (``action``):

- ``publish``: ``exchange`` (default: the default exchange), ``routing_key`` (a template),
  ``body`` (a CEL expression, sent as JSON), ``headers`` (templates), ``persistent`` (default
  true). With confirms on, it returns once the broker confirmed the message.
- ``request``: the same, plus ``timeout``; the message carries a fresh ``correlation_id`` and
  ``reply_to`` naming the connector's exclusive reply queue, and the operation returns the reply
  body (JSON when it parses, else text). No reply in time is a retryable ``AmqpTimeout``.

A nack, an unroutable message or a lost connection is a retryable ``AmqpError``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

try:
    import aio_pika
    from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel, AbstractRobustConnection
    from yarl import URL
except ModuleNotFoundError as exc:  # name the extra to install rather than the missing module
    raise ModuleNotFoundError("the AMQP connector needs the amqp extra: pip install 'kflow[amqp]'",
                              name=exc.name) from exc

from kflow.connectors.base import Connector, ConnectorError, ConnectorSpec, Operation, connector_type
from kflow.connectors.config import Duration, Expr, Template, parse_settings

__all__ = ["AmqpConnector"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AmqpSettings(_Model):
    """Settings of an ``amqp`` connector."""

    url: str = "amqp://guest@127.0.0.1:5672/"
    password: str | None = None
    confirms: bool = True
    connect_timeout: Duration = 10.0


class _Operation(_Model):
    action: Literal["publish", "request"] = "publish"
    exchange: str = ""
    routing_key: str = Field(min_length=1)
    body: str = "input"
    headers: dict[str, str] = Field(default_factory=dict)
    persistent: bool = True
    timeout: Duration = 30.0


class _Compiled:
    def __init__(self, name: str, op: _Operation, where: str) -> None:
        self.name, self.op = name, op
        self.routing_key = Template(op.routing_key, f"{where}.routing_key")
        self.body = Expr(op.body, f"{where}.body")
        self.headers = {k: Template(v, f"{where}.headers.{k}") for k, v in op.headers.items()}


def _decode(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


@connector_type
class AmqpConnector(Connector):
    """Publishes and request/reply calls over one robust AMQP connection."""

    type = "amqp"

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        self.settings: AmqpSettings = parse_settings(AmqpSettings, spec.settings, spec)
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
        self.reply_queue: AbstractQueue | None = None
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._ops = {name: _Compiled(name, parse_settings(_Operation, decl, spec, f"operation '{name}'"),
                                     f"connector '{spec.name}' operation '{name}'")
                     for name, decl in spec.operations.items()}

    def _url(self) -> str:
        url = URL(str(self.settings.url))
        if self.settings.password is not None:
            url = url.with_password(str(self.settings.password))
        return str(url)

    async def connect(self) -> None:
        self.connection = await aio_pika.connect_robust(self._url(), timeout=self.settings.connect_timeout)
        self.channel = await self.connection.channel(publisher_confirms=self.settings.confirms)  # type: ignore[assignment]
        if any(c.op.action == "request" for c in self._ops.values()):
            assert self.channel is not None
            self.reply_queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
            await self.reply_queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._waiting.pop(message.correlation_id or "", None)
        if fut is not None and not fut.done():
            fut.set_result(_decode(message.body))

    async def disconnect(self) -> None:
        conn, self.connection, self.channel, self.reply_queue = self.connection, None, None, None
        for fut in self._waiting.values():
            fut.cancel()
        self._waiting.clear()
        if conn is not None:
            await conn.close()

    async def health(self) -> bool:
        return (self.connection is not None and not self.connection.is_closed
                and self.channel is not None and not self.channel.is_closed)

    def operations(self) -> dict[str, Operation]:
        return {name: self._operation(c) for name, c in self._ops.items()}

    def _operation(self, c: _Compiled) -> Operation:
        async def run(input: Any) -> Any:
            if self.channel is None:
                raise ConnectorError("ConnectorUnavailable", f"connector '{self.name}' is not connected")
            scope = {"input": input}
            routing_key = c.routing_key.render(scope)
            body = orjson.dumps(c.body.value(scope))
            headers: dict[str, Any] = {k: t.render(scope) for k, t in c.headers.items()}
            correlation_id = reply_to = None
            fut: asyncio.Future[Any] | None = None
            if c.op.action == "request":
                if self.reply_queue is None:
                    raise ConnectorError("ConnectorUnavailable", f"connector '{self.name}' has no reply queue yet")
                correlation_id, reply_to = uuid.uuid4().hex, self.reply_queue.name
                fut = asyncio.get_running_loop().create_future()
                self._waiting[correlation_id] = fut
            message = aio_pika.Message(
                body, headers=headers or None, content_type="application/json", correlation_id=correlation_id,
                reply_to=reply_to, message_id=uuid.uuid4().hex,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT if c.op.persistent else aio_pika.DeliveryMode.NOT_PERSISTENT)
            what = f"connector '{self.name}' operation '{c.name}'"
            try:
                exchange = (self.channel.default_exchange if not c.op.exchange
                            else await self.channel.get_exchange(c.op.exchange, ensure=False))
                await exchange.publish(message, routing_key=routing_key, timeout=c.op.timeout)
                if fut is None:
                    return {"published": True, "message_id": message.message_id, "routing_key": routing_key}
                try:
                    return await asyncio.wait_for(fut, c.op.timeout)
                except TimeoutError:
                    raise ConnectorError("AmqpTimeout", f"{what}: no reply within {c.op.timeout:g}s "
                                         f"(routing key {routing_key!r})", retryable=True) from None
            except ConnectorError:
                raise
            except TimeoutError:
                raise ConnectorError("AmqpTimeout", f"{what}: publish not confirmed within {c.op.timeout:g}s",
                                     retryable=True) from None
            except (aio_pika.exceptions.AMQPError, ConnectionError) as e:
                raise ConnectorError("AmqpError", f"{what}: {type(e).__name__}: {e}", retryable=True) from None
            finally:
                if correlation_id is not None:
                    self._waiting.pop(correlation_id, None)

        return run
