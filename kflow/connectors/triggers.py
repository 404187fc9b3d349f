"""Inbound triggers: Kafka records and MQTT messages that start or signal workflows.

A triggers file declares, per trigger, a source (a Kafka topic, JSON or Avro, or an MQTT topic
filter), an optional CEL ``when`` filter and an action: ``start`` a workflow under an instance id
computed from the message, or ``signal`` the instance the message correlates with. Expressions see
``message`` (the decoded payload), ``topic``, ``key``, ``headers`` and ``topic_parts`` (the topic
split on ``/``; Kafka records also get ``partition`` and ``offset``).

Delivery is idempotent by construction: command ids are derived from the source message (topic,
partition and offset for Kafka, a hash of topic and payload for MQTT) and starts use the
``reject_duplicate`` id-reuse policy, so a redelivered message cannot start a second instance.
Kafka sources are consumed at least once: offsets are committed only after every command (and
dead letter) produced for the consumed records is acknowledged by the broker. A source topic that
does not exist yet is read once it is created: the consumer subscribes by anchored pattern and
refreshes metadata every :data:`METADATA_REFRESH_MS`. A message no
trigger's ``when`` accepts, or one that fails (undecodable, an expression error, a missing field),
goes to the ``dlq`` topic with ``kflow.reason``/``kflow.original.*`` headers and is counted in
``kflow_trigger_messages_total{trigger, outcome}``.

With a principal token (``KFLOW_TOKEN``, required when ``KFLOW_AUTH=on``) every command carries a
``kflow.auth`` header signed as that principal by the client's signer
(:meth:`kflow.config.KafkaConfig.command_signer`): the runner is a principal of its own, which the
policy grants what its triggers do (``definition:Execute`` to start, ``instance:Execute`` to
signal) and which the audit trail names. The token is checked when the runner starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import orjson
import yaml
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kflow._worker.output import now_ms
from kflow.config import KafkaConfig
from kflow.dlq import Original, dlq_record
from kflow.engine.expr import ExpressionError, compile_expr, evaluate
from kflow.model.errors import KflowError
from kflow.model.messages import Command
from kflow.schemas.codec import encode_command
from kflow.streams.topics import ensure_topics

__all__ = ["TRIGGER_MESSAGES", "Trigger", "TriggerConfigError", "TriggerRunner", "load_triggers"]

log = logging.getLogger("kflow.triggers")

TRIGGER_MESSAGES = Counter("kflow_trigger_messages_total", "Source messages handled by triggers, by outcome "
                           "(started, signalled, unmatched, failed).", ["trigger", "outcome"])
#: The ``trigger`` label of messages no trigger accepted.
UNMATCHED = "none"
#: How often the Kafka source consumer looks for source topics created after it started.
METADATA_REFRESH_MS = 3000


def topic_pattern(topic: str) -> str:
    """A librdkafka subscription pattern matching exactly ``topic`` (legal names: letters, digits, ``._-``).

    Subscribing by pattern is what makes librdkafka pick a topic up when it is created later.
    """
    return "^" + topic.replace(".", "\\.") + "$"


class TriggerConfigError(KflowError):
    """A triggers file is invalid; every problem is listed."""


# --------------------------------------------------------------------------- declarations


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSource(_Strict):
    """Records of a Kafka topic, JSON or Avro (``schema``: an ``.avsc`` file, read at load time)."""

    topic: str = Field(min_length=1)
    format: Literal["json", "avro"] = "json"
    schema_: Optional[str] = Field(None, alias="schema")


class MqttSource(_Strict):
    """Messages of an MQTT topic filter (``+`` and ``#`` wildcards); broker defaults to the runner's."""

    topic: str = Field(min_length=1)
    host: Optional[str] = None
    port: Optional[int] = None


class _Source(_Strict):
    kafka: Optional[KafkaSource] = None
    mqtt: Optional[MqttSource] = None

    @model_validator(mode="after")
    def _one(self) -> _Source:
        if (self.kafka is None) == (self.mqtt is None):
            raise ValueError("a source is exactly one of {kafka: {...}} or {mqtt: {...}}")
        return self


class _TriggerDecl(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    source: _Source
    when: Optional[str] = None
    action: Literal["start", "signal"]
    workflow: Optional[str] = None
    version: Optional[int] = None
    id: Optional[str] = None
    instance: Optional[str] = None
    signal: Optional[str] = None
    input: Optional[str] = None


class _File(_Strict):
    triggers: list[_TriggerDecl]


@dataclass(frozen=True, slots=True)
class Trigger:
    """One validated trigger; expressions are CEL source strings, already compiled once."""

    name: str
    source: Union[KafkaSource, MqttSource]
    action: str
    when: Optional[str] = None
    workflow: Optional[str] = None
    version: Optional[int] = None
    id: Optional[str] = None
    instance: Optional[str] = None
    signal: Optional[str] = None
    input: Optional[str] = None
    avro_schema: Any = field(default=None, compare=False)

    def commands(self, scope: Mapping[str, Any], command_id: str) -> Optional[Command]:
        """The command for one message, or None if ``when`` is false.

        Raises:
            ExpressionError: an expression failed or gave a value of the wrong type.
        """
        if self.when is not None:
            ok = evaluate(self.when, scope)
            if not isinstance(ok, bool):
                raise ExpressionError(self.when, f"'when' must give a bool, but gave {ok!r}")
            if not ok:
                return None
        data = evaluate(self.input, scope) if self.input is not None else scope.get("message")
        ts = now_ms()
        if self.action == "start":
            assert self.id is not None and self.workflow is not None
            iid = _instance_id(self.id, evaluate(self.id, scope))
            return Command("StartWorkflow", iid, {"workflow": self.workflow, "version": self.version, "input": data,
                                                  "parent_id": None, "parent_ref": None, "id_reuse": "reject_duplicate"},
                           command_id=command_id, ts=ts)
        assert self.instance is not None and self.signal is not None
        iid = _instance_id(self.instance, evaluate(self.instance, scope))
        return Command("SignalWorkflow", iid, {"name": self.signal, "data": data}, command_id=command_id, ts=ts)


def _instance_id(source: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ExpressionError(source, f"an instance id must be a non-empty string, but the expression gave {value!r}")
    return value


def load_triggers(path_or_text: Union[str, Path], base_dir: Optional[Path] = None) -> list[Trigger]:
    """Read and validate a triggers file (or its YAML text).

    Avro ``schema`` paths are relative to the file's directory (or ``base_dir``).

    Raises:
        TriggerConfigError: listing every problem (structure, actions, expressions, schemas).
        OSError: the file cannot be read.
    """
    text = str(path_or_text)
    if "\n" not in text and (text.endswith((".yaml", ".yml", ".json")) or Path(text).exists()):
        path = Path(text)
        text = path.read_text(encoding="utf-8")
        base_dir = base_dir or path.parent
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TriggerConfigError(f"triggers file is not valid YAML: {exc}") from None
    try:
        decls = _File.model_validate(doc).triggers
    except ValidationError as exc:
        raise TriggerConfigError("invalid triggers file: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())) from None
    problems: list[str] = []
    out: list[Trigger] = []
    seen: set[str] = set()
    for d in decls:
        where = f"trigger '{d.name}'"
        if d.name in seen:
            problems.append(f"{where}: duplicate name")
        seen.add(d.name)
        if d.action == "start":
            problems += [f"{where}: action 'start' needs '{k}'" for k in ("workflow", "id") if getattr(d, k) is None]
            problems += [f"{where}: '{k}' is only for action 'signal'" for k in ("instance", "signal")
                         if getattr(d, k) is not None]
        else:
            problems += [f"{where}: action 'signal' needs '{k}'" for k in ("instance", "signal") if getattr(d, k) is None]
            problems += [f"{where}: '{k}' is only for action 'start'" for k in ("workflow", "version", "id")
                         if getattr(d, k) is not None]
        for key in ("when", "id", "instance", "input"):
            src = getattr(d, key)
            if src is not None:
                try:
                    compile_expr(src)
                except ExpressionError as exc:
                    problems.append(f"{where}: {key}: {exc}")
        source: Union[KafkaSource, MqttSource] = d.source.kafka or d.source.mqtt  # type: ignore[assignment]
        schema = None
        if isinstance(source, KafkaSource):
            if source.format == "avro" and not source.schema_:
                problems.append(f"{where}: format 'avro' needs 'schema' (an .avsc file)")
            elif source.format == "avro":
                schema = _load_schema(source.schema_, base_dir, where, problems)
        out.append(Trigger(d.name, source, d.action, d.when, d.workflow, d.version, d.id, d.instance, d.signal,
                           d.input, schema))
    if problems:
        raise TriggerConfigError("invalid triggers file: " + "; ".join(problems))
    return out


def _load_schema(name: Optional[str], base_dir: Optional[Path], where: str, problems: list[str]) -> Any:
    import fastavro

    path = Path(name or "")
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return fastavro.parse_schema(orjson.loads(path.read_bytes()))
    except OSError as exc:
        problems.append(f"{where}: cannot read Avro schema {path}: {exc.strerror or exc}")
    except (ValueError, fastavro.schema.SchemaParseException) as exc:
        problems.append(f"{where}: invalid Avro schema {path}: {exc}")
    return None


def _decode_avro(value: bytes, schema: Any) -> Any:
    import fastavro

    if value[:1] == b"\x00" and len(value) > 5:  # Confluent Schema Registry framing
        value = value[5:]
    elif value[:2] == b"\xc3\x01" and len(value) > 10:  # Avro single-object encoding
        value = value[10:]
    return _jsonable(fastavro.schemaless_reader(io.BytesIO(value), schema))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# --------------------------------------------------------------------------- the runner


@dataclass(slots=True)
class _Origin:
    """Where a source message came from (for DLQ headers and command ids)."""

    kind: str  # "kafka" or "mqtt"
    topic: str
    key: Optional[bytes]
    value: bytes
    partition: int = -1
    offset: int = -1
    message: Optional[Message] = None

    def command_id(self, trigger: str) -> str:
        if self.kind == "kafka":
            return f"trigger/{trigger}/{self.topic}/{self.partition}/{self.offset}"
        digest = hashlib.sha256(self.topic.encode() + b"\x00" + self.value).hexdigest()[:32]
        return f"trigger/{trigger}/{digest}"


class _Batch:
    """Records produced for a set of source messages, and their delivery outcome."""

    def __init__(self) -> None:
        self.pending = 0
        self.failed: list[tuple[str, bytes, bytes, Optional[list[tuple[str, bytes]]]]] = []
        self.lock = threading.Lock()


class TriggerRunner:
    """Consumes every trigger source and produces the resulting commands; see the module docstring.

    Example:
        >>> runner = TriggerRunner(load_triggers("triggers.yaml"), KafkaConfig())  # doctest: +SKIP
        >>> runner.start(); ...; runner.stop()                                   # doctest: +SKIP

    Args:
        triggers: The validated triggers.
        config: Kafka connection and topic prefix (commands and dlq topics).
        mqtt_url: Default broker of MQTT sources (``mqtt://host:port``).
        group_id: Consumer group of the Kafka sources (default ``<prefix>triggers``).
    """

    def __init__(self, triggers: list[Trigger], config: KafkaConfig, *, mqtt_url: str = "mqtt://127.0.0.1:1883",
                 group_id: Optional[str] = None) -> None:
        if not triggers:
            raise TriggerConfigError("no triggers declared")
        self.triggers = triggers
        self.config = config
        self.group_id = group_id or f"{config.topic_prefix}triggers"
        self.names = config.names
        self.kafka_triggers: dict[str, list[Trigger]] = {}
        self.mqtt_triggers: dict[tuple[str, int], list[Trigger]] = {}
        mqtt_sourced: list[tuple[Trigger, MqttSource]] = []
        for t in triggers:
            if isinstance(t.source, KafkaSource):
                self.kafka_triggers.setdefault(t.source.topic, []).append(t)
            else:
                mqtt_sourced.append((t, t.source))
        if mqtt_sourced:  # only MQTT sources need the mqtt extra
            from kflow.connectors.mqtt import parse_mqtt_url

            host, port, _tls = parse_mqtt_url(mqtt_url)
            for t, source in mqtt_sourced:
                broker = (source.host or host, source.port or port)
                self.mqtt_triggers.setdefault(broker, []).append(t)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._producer: Optional[Producer] = None
        # signs every command as KFLOW_TOKEN's principal; auth on without a token fails here, before any consumer
        self._signer = config.command_signer()
        self._kafka_ready = threading.Event()
        self._mqtt_ready: dict[tuple[str, int], threading.Event] = {b: threading.Event() for b in self.mqtt_triggers}
        self.error: Optional[BaseException] = None
        self.handled = 0
        """Source messages fully handled (commands acknowledged, offsets committed for Kafka)."""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Create the topics and producer, then consume every source in daemon threads.

        Raises:
            AuthError: the principal token (``KFLOW_TOKEN``) does not verify or has expired.
        """
        if self._signer is not None:
            who = self._signer.principal()
            log.info("triggers sign their commands as %s of tenant %s", who.name, who.tenant)
        ensure_topics(self.config.client_conf(), self.names, self.config.topic_settings)
        self._producer = Producer(self.config.producer_conf(acks="all"))
        if self.kafka_triggers:
            self._note_missing_topics()
            self._spawn(self._kafka_main, "kflow-triggers-kafka")
        else:
            self._kafka_ready.set()
        for broker in self.mqtt_triggers:
            self._spawn(lambda b=broker: asyncio.run(self._mqtt_main(b)), f"kflow-triggers-mqtt-{broker[0]}:{broker[1]}")
        log.info("triggers started: %s", ", ".join(f"{t.name} ({t.action})" for t in self.triggers))

    def _note_missing_topics(self) -> None:
        """Say which source topics do not exist yet (they are read as soon as they are created)."""
        assert self._producer is not None
        try:
            existing = set(self._producer.list_topics(timeout=10).topics)
        except KafkaException as exc:
            log.warning("triggers: cannot list topics (%s)", exc)
            return
        for topic in sorted(set(self.kafka_triggers) - existing):
            log.warning("triggers: source topic '%s' does not exist yet; it is read as soon as it is created "
                        "(looked for every %.0fs)", topic, METADATA_REFRESH_MS / 1000)

    def _spawn(self, target: Any, name: str) -> None:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                self.error = exc
                log.exception("trigger source failed")

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def ready(self, timeout: float) -> bool:
        """Wait until the Kafka consumer has partitions and every MQTT subscription is in place."""
        deadline = time.monotonic() + timeout
        for ev in (self._kafka_ready, *self._mqtt_ready.values()):
            if not ev.wait(max(deadline - time.monotonic(), 0)):
                return False
        return True

    def stop(self, timeout: float = 15.0) -> None:
        """Stop consuming, deliver what is pending and commit it; idempotent."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        producer, self._producer = self._producer, None
        if producer is not None:
            left = producer.flush(timeout)
            if left:
                log.warning("triggers: stopping with %d undelivered record(s)", left)
            if hasattr(producer, "close"):  # confluent-kafka >= 2.13
                producer.close()

    def run(self, stop: threading.Event) -> None:
        """Start, block until ``stop`` is set (or a source fails), then stop."""
        self.start()
        try:
            while not stop.wait(0.5):
                if self.error is not None:
                    raise self.error
        finally:
            self.stop()

    # -- handling one message ------------------------------------------------------------------

    def _handle(self, triggers: list[Trigger], origin: _Origin, headers: list[tuple[str, bytes]],
                batch: _Batch) -> None:
        """Decode, evaluate every trigger of the source, produce commands and dead letters."""
        text_headers = {k: (v or b"").decode("utf-8", "replace") for k, v in headers}
        try:
            message = self._decode(triggers[0], origin.value)
        except ValueError as exc:
            reason = f"undecodable {triggers[0].source.__class__.__name__[:-6].lower()} message: {exc}"
            for t in triggers:
                TRIGGER_MESSAGES.labels(t.name, "failed").inc()
            self._dead_letter(origin, reason, ",".join(t.name for t in triggers), batch)
            return
        scope = {"message": message, "topic": origin.topic, "key": (origin.key or b"").decode("utf-8", "replace")
                 if origin.key is not None else None, "headers": text_headers, "topic_parts": origin.topic.split("/"),
                 "partition": origin.partition, "offset": origin.offset}
        handled = False
        for t in triggers:
            try:
                cmd = t.commands(scope, origin.command_id(t.name))
                if cmd is not None:
                    value = encode_command(cmd)
            except (ExpressionError, ValueError) as exc:
                TRIGGER_MESSAGES.labels(t.name, "failed").inc()
                self._dead_letter(origin, f"trigger '{t.name}': {exc}", t.name, batch)
                handled = True  # handled as a failure, not unmatched
                continue
            if cmd is None:
                continue
            handled = True
            key = cmd.instance_id.encode()
            # the token binds exactly this key and value; a delivery retried later keeps it (same record)
            auth = [self._signer.header(key, value)] if self._signer is not None else None
            self._produce(batch, self.names.commands, key, value, auth)
            TRIGGER_MESSAGES.labels(t.name, "started" if t.action == "start" else "signalled").inc()
            log.debug("trigger %s: %s %s (command %s)", t.name, cmd.type, cmd.instance_id, cmd.command_id)
        if not handled:
            TRIGGER_MESSAGES.labels(UNMATCHED, "unmatched").inc()
            self._dead_letter(origin, "no trigger matched (" + ", ".join(
                f"{t.name}: when {t.when!r} was false" for t in triggers) + ")", "", batch)

    @staticmethod
    def _decode(trigger: Trigger, value: bytes) -> Any:
        if isinstance(trigger.source, KafkaSource) and trigger.source.format == "avro":
            try:
                return _decode_avro(value, trigger.avro_schema)
            except Exception as exc:  # fastavro raises several types on bad input
                raise ValueError(f"not Avro of the declared schema: {type(exc).__name__}: {exc}") from None
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc}") from None

    def _dead_letter(self, origin: _Origin, reason: str, trigger: str, batch: _Batch) -> None:
        original = origin.message if origin.message is not None else Original(origin.topic, origin.key, origin.value)
        value, key, headers = dlq_record(original, reason, now_ms())
        headers += [("kflow.source", origin.kind.encode()), ("kflow.trigger", trigger.encode())]
        log.warning("dead-lettering a %s message from %s: %s", origin.kind, origin.topic, reason)
        self._produce(batch, self.names.dlq, key if key is not None else origin.topic.encode(), value, headers)

    def _produce(self, batch: _Batch, topic: str, key: bytes, value: bytes,
                 headers: Optional[list[tuple[str, bytes]]]) -> None:
        assert self._producer is not None

        def on_delivery(err: Optional[KafkaError], _msg: Message) -> None:
            with batch.lock:
                batch.pending -= 1
                if err is not None:
                    log.warning("delivery to %s failed, producing again: %s", topic, err)
                    batch.failed.append((topic, key, value, headers))

        with batch.lock:
            batch.pending += 1
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:
                self._producer.poll(0.05)

    def _deliver(self, batch: _Batch, stop_grace: float = 10.0) -> bool:
        """Wait until every record of ``batch`` is acknowledged, producing failures again.

        Returns False only when the runner is stopping and records are still unacknowledged
        ``stop_grace`` seconds later (their source offsets must then not be committed).
        """
        assert self._producer is not None
        stopping_since: Optional[float] = None
        while True:
            self._producer.flush(0.5)
            with batch.lock:
                failed, batch.failed = batch.failed, []
                pending = batch.pending
            for topic, key, value, headers in failed:
                self._produce(batch, topic, key, value, headers)
            if pending == 0 and not failed:
                return True
            if self._stop.is_set():
                stopping_since = stopping_since or time.monotonic()
                if time.monotonic() - stopping_since > stop_grace:
                    return False

    # -- Kafka sources -------------------------------------------------------------------------

    def _kafka_main(self) -> None:
        consumer = Consumer(self.config.consumer_conf(
            self.group_id, **{"topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS}))
        consumer.subscribe([topic_pattern(t) for t in self.kafka_triggers],
                           on_assign=lambda c, parts: self._kafka_ready.set())
        try:
            while not self._stop.is_set():
                msgs = consumer.consume(500, 0.2)
                if not msgs:
                    continue
                batch = _Batch()
                ends: dict[tuple[str, int], int] = {}
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.fatal():
                            raise KafkaException(err)
                        log.debug("trigger consumer: %s", err)  # e.g. a source topic not created yet
                        continue
                    origin = _Origin("kafka", msg.topic(), msg.key(), msg.value() or b"", msg.partition(),
                                     msg.offset(), msg)
                    self._handle(self.kafka_triggers[msg.topic()], origin, list(msg.headers() or []), batch)
                    ends[(msg.topic(), msg.partition())] = msg.offset() + 1
                # at least once: commit only what every produced record was acknowledged for
                if not self._deliver(batch):
                    log.warning("triggers: stopping with unacknowledged commands; their records are re-read on restart")
                    return
                if ends:
                    try:
                        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()],
                                        asynchronous=False)
                    except KafkaException as exc:
                        if exc.args and exc.args[0].fatal():
                            raise
                        # e.g. a rebalance took the partitions: their new owner re-reads these
                        # records, and the commands they produce are idempotent
                        log.warning("triggers: committing offsets failed (%s); the records will be re-read", exc)
                    self.handled += len(msgs)
        finally:
            consumer.close()

    # -- MQTT sources --------------------------------------------------------------------------

    async def _mqtt_main(self, broker: tuple[str, int]) -> None:
        import uuid

        import aiomqtt

        from kflow.connectors.mqtt import MqttSettings

        host, port = broker
        triggers = self.mqtt_triggers[broker]
        filters = sorted({t.source.topic for t in triggers})
        kwargs = MqttSettings(host=host, port=port).client_kwargs()
        delay = 0.5
        while not self._stop.is_set():
            try:
                async with aiomqtt.Client(identifier=f"kflow-triggers-{uuid.uuid4().hex[:8]}", **kwargs) as client:
                    for f in filters:
                        await client.subscribe(f, qos=1)
                    self._mqtt_ready[broker].set()
                    delay = 0.5
                    log.info("triggers: subscribed to %s on MQTT %s:%d", ", ".join(filters), host, port)
                    incoming = client.messages.__aiter__()
                    nxt: Optional[asyncio.Future[Any]] = None
                    try:
                        while not self._stop.is_set():
                            if nxt is None:
                                nxt = asyncio.ensure_future(incoming.__anext__())
                            done, _ = await asyncio.wait({nxt}, timeout=0.5)
                            if not done:
                                continue
                            message, nxt = nxt.result(), None
                            await self._on_mqtt(message, triggers)
                    finally:
                        if nxt is not None:
                            nxt.cancel()
                    return
            except aiomqtt.MqttError as exc:
                log.warning("triggers: MQTT %s:%d unavailable (%s); reconnecting in %.1fs", host, port, exc, delay)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, 30.0)

    async def _on_mqtt(self, message: Any, triggers: list[Trigger]) -> None:
        topic = message.topic.value
        raw = message.payload if isinstance(message.payload, (bytes, bytearray)) else str(message.payload or "").encode()
        mine = [t for t in triggers if message.topic.matches(t.source.topic)]
        if not mine:
            return
        batch = _Batch()
        self._handle(mine, _Origin("mqtt", topic, None, bytes(raw)), [], batch)
        await asyncio.to_thread(self._deliver, batch)
        self.handled += 1
