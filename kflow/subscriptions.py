"""Webhook subscriptions: push the public state changes of workflow instances to HTTP endpoints.

A subscription (declared in YAML, applied with ``kflow subscriptions apply``) names an http(s)
URL, filters on workflow, status and tenant, the environment variable that holds its HMAC secret
(never the secret itself) and how hard to retry. Subscriptions live on the compacted, single
partition ``<prefix>subscriptions`` topic (key = id, value = JSON, a tombstone deletes), which every
delivery process reads live as a table: a change applies without a restart.

The delivery process (:class:`SubscriptionRunner`, ``kflow subscriptions run``) consumes the
``state`` topic in the consumer group ``<prefix>subscriptions`` and POSTs every change a
subscription matches as the JSON of :class:`StateChange`, signed with
``X-Kflow-Signature: sha256=<hex HMAC-SHA256 of the body>`` and named by ``X-Kflow-Delivery``, an
id derived from the subscription and the change, so retries and redeliveries carry the same one.
Delivery is at least once and in order per partition, hence per instance::

    consumer thread                    delivery loop (asyncio, one thread)
    ───────────────                    ──────────────────────────────────────────────────────────
    consume(state) ──record──────────▶ dispatch: decode, match the table, put one item into the
                                         lane (partition, subscription) of every match
                                       lane: POST ─fail─▶ backoff ─▶ POST … ─max_attempts─▶ dlq
                                         │ 2xx, or dead-lettered
                                         ▼
    commit(done) ◀──────────────────── partition.done: the offset after the longest prefix of
                                         records every lane has finished

A lane delivers its items one after another, so a failing endpoint holds back only its own lane
(other subscriptions and other partitions go on); the committed offset never passes an item a
lane has not finished, and a partition whose backlog reaches :data:`MAX_BACKLOG` records is paused
until it drains to half. A delivery that failed ``max_attempts`` times goes to the ``dlq`` topic
(the state record with ``kflow.reason`` and ``kflow.original.*`` headers, plus ``kflow.source``,
``kflow.subscription`` and ``kflow.delivery``) and its lane moves on. A consumer group without
committed offsets starts at the end of the state topic and commits that position at once: a new
delivery process pushes the changes from then on, not the topic's history.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar, Union
from urllib.parse import urlsplit

import httpx
import orjson
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType
from prometheus_client import Counter
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError

from kflow.config import KafkaConfig
from kflow.dlq import dlq_record
from kflow.model.errors import BrokerUnavailable, DecodeError, KflowError, ProblemsError, TopicConfigMismatch
from kflow.model.messages import Status
from kflow.model.spec import parse_duration_ms
from kflow.readend import EndReader, at_end, watermarks
from kflow.schemas.codec import decode_state
from kflow.streams.topics import TopicNames, TopicSpec, ensure_topics

__all__ = ["DELIVERIES", "DELIVERY_HEADER", "SIGNATURE_HEADER", "Backoff", "DeliveryLog", "Filter", "StateChange",
           "Subscription", "SubscriptionConfigError", "SubscriptionRunner", "apply_subscriptions",
           "delete_subscription", "ensure_subscriptions_topic", "load_subscriptions", "parse_subscriptions",
           "read_subscriptions", "serve_operations", "sign", "subscriptions_topic", "verify_signature"]

log = logging.getLogger("kflow.subscriptions")

DELIVERIES = Counter("kflow_subscription_deliveries_total", "State changes pushed to webhook subscriptions, by "
                     "subscription and outcome (delivered, dead_lettered).", ["subscription", "outcome"])

SIGNATURE_HEADER = "X-Kflow-Signature"
DELIVERY_HEADER = "X-Kflow-Delivery"
SUBSCRIPTION_HEADER = "X-Kflow-Subscription"
#: Statuses a filter may name: every status a state record can carry.
STATUSES = frozenset(Status.ACTIVE | Status.TERMINAL)
#: The fields of the body POSTed for a state change, in order.
PUBLIC_FIELDS = ("instance_id", "workflow", "version", "status", "seq", "result", "error", "updated_ms")
#: Records of one partition dispatched but not finished at which the partition is paused.
MAX_BACKLOG = 1000
#: Deliveries kept per subscription in the log served on ``/subscriptions``.
LOG_SIZE = 100
#: Port of the delivery process's operations endpoint when ``KFLOW_METRICS_PORT`` is not set.
DEFAULT_METRICS_PORT = 9467

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# Delivery ids are uuid5s in this namespace over (subscription, instance, run start, seq).
_DELIVERY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "kflow:subscription-delivery")
_KAFKA_TIMEOUT_S = 10.0
_UNREACHABLE = frozenset({KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN})
_T = TypeVar("_T")


class SubscriptionConfigError(ProblemsError):
    """A subscriptions file is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("subscriptions file", problems)


# --------------------------------------------------------------------------- declarations


def _duration(value: Any) -> Any:
    """``2s``, ``250ms``, ``1m`` or a number of seconds as a timedelta (the wire form is ``<n>ms``)."""
    return value if isinstance(value, timedelta) else timedelta(milliseconds=parse_duration_ms(value))


def _as_ms_text(value: timedelta) -> str:
    return f"{value // timedelta(milliseconds=1)}ms"


Duration = Annotated[timedelta, BeforeValidator(_duration), PlainSerializer(_as_ms_text, return_type=str)]


def _http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, but got {url!r}")
    return url


def _known_status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r} (expected one of {', '.join(sorted(STATUSES))})")
    return status


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Backoff(_Model):
    """The pause before retry n: ``initial × multiplier^(n-1)``, at most ``max``."""

    initial: Duration = Field(timedelta(seconds=1), gt=timedelta(0), le=timedelta(hours=1))
    max: Duration = Field(timedelta(seconds=30), gt=timedelta(0), le=timedelta(hours=1))
    multiplier: float = Field(2.0, ge=1.0, le=10.0)

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (computed in float: no overflow)."""
        return min(self.initial.total_seconds() * self.multiplier ** (failures - 1), self.max.total_seconds())


class Filter(_Model):
    """Which state changes a subscription receives; an empty list or no tenant matches everything."""

    workflows: tuple[str, ...] = ()
    statuses: tuple[Annotated[str, AfterValidator(_known_status)], ...] = ()
    tenant: Optional[str] = None


class Subscription(_Model):
    """One webhook subscription, as declared in a subscriptions file and stored on the topic.

    Attributes:
        id: Unique name; the key on the subscriptions topic and the ``subscription`` metric label.
        url: The http(s) endpoint each matching state change is POSTed to.
        secret_env: The environment variable holding the HMAC secret in the delivery process.
        filter: Workflows, statuses and tenant to deliver (default: every change).
        max_attempts: Attempts of one delivery before it goes to the dlq topic.
        backoff: Pauses between attempts.
        timeout: Most time one attempt may take.
    """

    id: str = Field(pattern=_ID)
    url: Annotated[str, AfterValidator(_http_url)]
    secret_env: str = Field(pattern=_ENV_NAME)
    filter: Filter = Filter()
    max_attempts: int = Field(5, ge=1, le=100)
    backoff: Backoff = Backoff()
    timeout: Duration = Field(timedelta(seconds=10), gt=timedelta(0), le=timedelta(minutes=5))

    def matches(self, change: StateChange) -> bool:
        f = self.filter
        return ((not f.workflows or change.workflow in f.workflows)
                and (not f.statuses or change.status in f.statuses)
                and (f.tenant is None or change.tenant == f.tenant))


def load_subscriptions(path: Union[str, Path], environ: Optional[Mapping[str, str]] = None) -> list[Subscription]:
    """Read and validate a subscriptions file; see :func:`parse_subscriptions`.

    Raises:
        SubscriptionConfigError: listing every problem.
        OSError: the file cannot be read.
    """
    return parse_subscriptions(Path(path).read_text(encoding="utf-8"), environ)


def parse_subscriptions(text: str, environ: Optional[Mapping[str, str]] = None) -> list[Subscription]:
    """Validate the YAML text of a subscriptions file (``subscriptions:`` a list of subscriptions).

    Besides the fields, every ``secret_env`` must be set (non-empty) in ``environ`` (default: this
    process's environment), so a subscription is never applied that could not be signed, and a
    secret written inline is refused with the fix.

    Raises:
        SubscriptionConfigError: listing every problem; nothing is returned if there is one.
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SubscriptionConfigError([f"not valid YAML: {' '.join(str(exc).split())}"]) from None
    if not isinstance(doc, dict) or set(doc) != {"subscriptions"} or not isinstance(doc["subscriptions"], list):
        raise SubscriptionConfigError(["expected a mapping with one key, 'subscriptions', holding a list"])
    if not doc["subscriptions"]:
        raise SubscriptionConfigError(["the file declares no subscriptions"])
    env = os.environ if environ is None else environ
    problems: list[str] = []
    out: list[Subscription] = []
    ids = [item.get("id") for item in doc["subscriptions"] if isinstance(item, dict)]
    problems += [f"subscription '{sid}': declared {ids.count(sid)} times" for sid in dict.fromkeys(ids)
                 if isinstance(sid, str) and ids.count(sid) > 1]
    for i, item in enumerate(doc["subscriptions"]):
        found = _declared(i, item, env, problems)
        if found is not None:
            out.append(found)
    if problems:
        raise SubscriptionConfigError(problems)
    return out


def _declared(index: int, item: Any, env: Mapping[str, str], problems: list[str]) -> Optional[Subscription]:
    """One declared subscription, or None with its problems appended."""
    if not isinstance(item, dict):
        problems.append(f"subscriptions[{index}]: expected a mapping, but got {type(item).__name__}")
        return None
    where = f"subscription '{item['id']}'" if isinstance(item.get("id"), str) else f"subscriptions[{index}]"
    item = dict(item)
    if "secret" in item:
        del item["secret"]
        problems.append(f"{where}: secret: a secret is never written in the file (nor on the topic); put it in an "
                        "environment variable of the delivery process and name that variable in secret_env")
    name = item.get("secret_env")
    if isinstance(name, str) and re.match(_ENV_NAME, name) and not env.get(name):
        problems.append(f"{where}: secret_env: environment variable {name} is not set (it holds the HMAC secret)")
    try:
        return Subscription.model_validate(item)
    except ValidationError as exc:
        problems.extend(f"{where}: {_problem(e)}" for e in exc.errors())
        return None


def _problem(error: Any) -> str:
    """One pydantic error as ``field.path: what is wrong (got value)``."""
    text = f"{'.'.join(str(p) for p in error['loc'])}: {str(error['msg']).removeprefix('Value error, ')}"
    return text if error["type"] in ("value_error", "missing") else f"{text} (got {error['input']!r})"


# --------------------------------------------------------------------------- state changes and signatures


@dataclass(frozen=True, slots=True)
class StateChange:
    """One record of the ``state`` topic as subscribers see it (:data:`PUBLIC_FIELDS` go in the body).

    ``error`` is ``{"type": ..., "message": ...}`` for a failed instance, else None; ``started_ms``
    (which run of the instance id) and ``tenant`` (for filters) are not sent.
    """

    instance_id: str
    workflow: str
    version: int
    status: str
    seq: int
    result: Any
    error: Optional[dict[str, Optional[str]]]
    updated_ms: int
    started_ms: int = 0
    tenant: Optional[str] = None

    @classmethod
    def from_state(cls, rec: Mapping[str, Any]) -> StateChange:
        """From a decoded state record (:func:`kflow.schemas.codec.decode_state`)."""
        error_type, message = rec.get("error_type"), rec.get("error_message")
        error = {"type": error_type, "message": message} if error_type is not None or message is not None else None
        return cls(rec["instance_id"], rec["workflow"], rec["version"], str(rec["status"]), rec["seq"],
                   rec.get("result"), error, rec["updated_ms"], rec.get("started_ms") or 0, _tenant(rec))

    def body(self) -> bytes:
        """The JSON POSTed for this change: exactly the bytes the signature covers."""
        return orjson.dumps({f: getattr(self, f) for f in PUBLIC_FIELDS})

    def delivery_id(self, subscription: str) -> str:
        """The same id for this change to this subscription on every attempt and redelivery."""
        name = "\x00".join((subscription, self.instance_id, str(self.started_ms), str(self.seq)))
        return str(uuid.uuid5(_DELIVERY_NAMESPACE, name))


def _tenant(rec: Mapping[str, Any]) -> Optional[str]:
    """The tenant of a public state record: its ``tenant`` field, else its ``tenant`` search attribute."""
    search = rec.get("search_attributes")
    search = search if isinstance(search, dict) else {}
    for value in (rec.get("tenant"), search.get("tenant")):
        if value is not None:
            return str(value)
    return None


def sign(body: bytes, secret: str) -> str:
    """The ``X-Kflow-Signature`` value of ``body``: ``sha256=`` and the hex HMAC-SHA256 under ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, secret: str, header: str) -> bool:
    """Whether ``header`` is the signature of ``body`` under ``secret`` (constant-time), for receivers."""
    return hmac.compare_digest(sign(body, secret), header.strip())


# --------------------------------------------------------------------------- the table topic


def subscriptions_topic(names: TopicNames) -> str:
    """The compacted table of subscriptions under ``names``' prefix."""
    return f"{names.prefix}subscriptions"


def _kafka_error(bootstrap: str, exc: KafkaException, doing: str) -> KflowError:
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    if err is None or err.code() in _UNREACHABLE:
        return BrokerUnavailable(bootstrap, f"{doing}: {exc}")
    return KflowError(f"{doing}: {err.str()}")


def ensure_subscriptions_topic(config: KafkaConfig, timeout: float = 15.0) -> str:
    """Create the subscriptions topic when missing (one partition, compacted, kept forever); return its name.

    Raises:
        TopicConfigMismatch: the topic exists but is not compacted.
        BrokerUnavailable: the cluster did not answer in time.
    """
    topic = subscriptions_topic(config.names)
    spec = TopicSpec(topic, 1, "compact", -1)
    admin = AdminClient(config.client_conf())
    deadline = time.monotonic() + timeout
    try:
        if topic not in admin.list_topics(timeout=timeout).topics:
            new = NewTopic(topic, 1, config.replication, config=spec.configs(config.topic_settings))
            try:
                admin.create_topics([new], request_timeout=timeout)[topic].result(timeout)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
            while not admin.list_topics(timeout=timeout).topics.get(topic):
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(config.bootstrap, f"created topic {topic} not visible in metadata")
                time.sleep(0.05)
        described = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)], request_timeout=timeout)
        entry = next(iter(described.values())).result(timeout).get("cleanup.policy")
    except KafkaException as exc:
        raise _kafka_error(config.bootstrap, exc, f"cannot create or describe topic {topic}") from None
    except TimeoutError:
        raise BrokerUnavailable(config.bootstrap, f"timed out creating or describing topic {topic}") from None
    policy = entry.value if entry is not None else None
    if policy is not None and {p.strip() for p in policy.split(",")} != {"compact"}:
        raise TopicConfigMismatch(topic, "cleanup.policy", "compact", policy)
    return topic


def _fold(table: dict[str, Subscription], msg: Message) -> Optional[str]:
    """Apply one record of the subscriptions topic to ``table``; return the id it deleted, if any."""
    key = (msg.key() or b"").decode("utf-8", "replace")
    value = msg.value()
    if value is None:
        return key if table.pop(key, None) is not None else None
    try:
        table[key] = Subscription.model_validate_json(value)
    except ValidationError as exc:
        log.warning("subscriptions: ignoring the invalid record of '%s' at offset %d (the previous one stays): %s",
                    key, msg.offset(), " ".join(str(exc).split()))
    return None


def read_subscriptions(config: KafkaConfig, timeout: float = 15.0) -> dict[str, Subscription]:
    """Every subscription on the topic now, by id (empty when the topic does not exist).

    Raises:
        BrokerUnavailable: the topic could not be read within ``timeout``.
    """
    table: dict[str, Subscription] = {}
    with EndReader(config.consumer_conf("kflow-subscriptions-reader"), timeout=min(timeout, 10)) as reader:
        for msg in reader.read(subscriptions_topic(config.names), timeout=timeout, what="reading the subscriptions"):
            _fold(table, msg)
    return table


def apply_subscriptions(config: KafkaConfig, subscriptions: Iterable[Subscription], timeout: float = 30.0) -> None:
    """Create or replace ``subscriptions`` on the topic (created if missing).

    Raises:
        BrokerUnavailable: the broker did not acknowledge them within ``timeout``.
    """
    ensure_subscriptions_topic(config)
    _write(config, [(s.id, s.model_dump_json().encode()) for s in subscriptions], timeout)


def delete_subscription(config: KafkaConfig, subscription_id: str, timeout: float = 30.0) -> None:
    """Delete a subscription (a tombstone); running delivery processes stop delivering to it.

    Raises:
        KflowError: there is no such subscription.
    """
    known = read_subscriptions(config, timeout)
    if subscription_id not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise KflowError(f"no subscription '{subscription_id}' (subscriptions: {listed})")
    _write(config, [(subscription_id, None)], timeout)


def _write(config: KafkaConfig, records: list[tuple[str, Optional[bytes]]], timeout: float) -> None:
    topic = subscriptions_topic(config.names)
    producer = Producer(config.producer_conf(acks="all"))
    failures: list[str] = []
    for key, value in records:
        producer.produce(topic, value, key.encode(),
                         on_delivery=lambda err, _m, k=key: failures.append(f"{k}: {err}") if err else None)
    left = producer.flush(timeout)
    if left:
        raise BrokerUnavailable(config.bootstrap, f"{left} subscription record(s) not acknowledged within {timeout:g}s")
    if failures:
        raise KflowError("writing subscriptions failed: " + "; ".join(failures))


# --------------------------------------------------------------------------- delivery bookkeeping


class DeliveryLog:
    """The last :data:`LOG_SIZE` deliveries of each subscription, newest first; safe across threads."""

    def __init__(self, size: int = LOG_SIZE) -> None:
        self._size = size
        self._entries: dict[str, deque[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def add(self, subscription: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self._entries.setdefault(subscription, deque(maxlen=self._size)).appendleft(entry)

    def entries(self, subscription: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._entries.get(subscription, ()))


@dataclass(eq=False, slots=True)
class _Item:
    """One state change to deliver to the subscriptions of the lanes it was put in."""

    offset: int
    change: StateChange
    body: bytes
    message: Message


@dataclass(eq=False, slots=True)
class _Lane:
    """The items of one partition for one subscription, delivered strictly one after another."""

    subscription: str
    queue: asyncio.Queue[_Item]
    task: Optional[asyncio.Task[None]] = None
    current: Optional[_Item] = None


class _Partition:
    """Delivery progress of one assigned partition of the state topic.

    Every dispatched record is open until each lane it was put in has finished it. ``done`` is the
    offset after the longest finished prefix: the one offset that may be committed, so a restart
    re-reads (and redelivers) whatever was not finished, never skips it.
    """

    def __init__(self, number: int, start: int) -> None:
        self.number = number
        self.done = start
        self.lanes: dict[str, _Lane] = {}
        self._open: dict[int, int] = {}
        self._order: deque[int] = deque()

    def add(self, offset: int, lanes: int) -> None:
        """Record ``offset`` as dispatched to ``lanes`` lanes (0: finished already)."""
        self._order.append(offset)
        self._open[offset] = lanes
        self._advance()

    def finish(self, offset: int) -> None:
        """One lane finished ``offset`` (delivered, dead-lettered, or its subscription was deleted)."""
        self._open[offset] -= 1
        self._advance()

    def _advance(self) -> None:
        while self._order and self._open[self._order[0]] == 0:
            offset = self._order.popleft()
            del self._open[offset]
            self.done = offset + 1


# --------------------------------------------------------------------------- the delivery process


class SubscriptionRunner:
    """Delivers state changes to the subscriptions on the table topic; see the module docstring.

    Example:
        >>> runner = SubscriptionRunner(KafkaConfig())  # doctest: +SKIP
        >>> runner.start(); runner.ready(30); ...; runner.stop()  # doctest: +SKIP

    Args:
        config: Kafka connection and topic prefix.
        group_id: Consumer group on the state topic (default ``<prefix>subscriptions``); processes
            sharing it share the partitions.
    """

    def __init__(self, config: KafkaConfig, *, group_id: Optional[str] = None) -> None:
        self.config = config
        self.names = config.names
        self.group_id = group_id or f"{config.topic_prefix}subscriptions"
        self.log = DeliveryLog()
        self.error: Optional[BaseException] = None
        self._table: dict[str, Subscription] = {}
        self._table_loaded = threading.Event()
        self._assigned = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closing: Optional[asyncio.Event] = None
        self._http: Optional[httpx.AsyncClient] = None
        self._producer: Optional[Producer] = None
        # written only by the delivery loop, while the consumer thread waits in a rebalance callback
        self._parts: dict[int, _Partition] = {}
        # consumer thread only
        self._sent: dict[int, int] = {}
        self._committed: dict[int, int] = {}
        self._paused: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        """The table as this process sees it now."""
        return self._table

    def positions(self) -> dict[int, int]:
        """Partition -> offset after the records this process has finished (what it commits)."""
        return {p: part.done for p, part in list(self._parts.items())}

    def start(self) -> None:
        """Create the topics, then read the table and deliver in daemon threads."""
        ensure_topics(self.config.client_conf(), self.names, self.config.topic_settings)
        ensure_subscriptions_topic(self.config)
        self._producer = Producer(self.config.producer_conf(acks="all"))
        loop_ready = threading.Event()
        self._spawn(lambda: self._loop_main(loop_ready), "kflow-subscriptions-deliver")
        if not loop_ready.wait(30):
            raise KflowError("the subscriptions delivery loop did not start")
        self._spawn(self._table_main, "kflow-subscriptions-table")
        self._spawn(self._consume_main, "kflow-subscriptions-consume")

    def ready(self, timeout: float) -> bool:
        """Wait until the table is loaded and the group assigned this process its partitions."""
        deadline = time.monotonic() + timeout
        return all(ev.wait(max(deadline - time.monotonic(), 0)) for ev in (self._table_loaded, self._assigned))

    def is_ready(self) -> bool:
        return self._table_loaded.is_set() and self._assigned.is_set()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop consuming, abandon unfinished deliveries (they are redelivered), commit; idempotent."""
        self._stop.set()
        for t in reversed(self._threads[1:]):  # the consumer, then the table: both use the delivery loop
            t.join(timeout)
        if self._loop is not None and self._closing is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._closing.set)
        for t in self._threads[:1]:
            t.join(timeout)
        self._threads.clear()
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(timeout)

    def run(self, stop: threading.Event) -> None:
        """Start, block until ``stop`` is set (or a part fails), then stop."""
        self.start()
        try:
            while not stop.wait(0.5):
                if self.error is not None:
                    raise self.error
        finally:
            self.stop()

    def describe(self) -> dict[str, Any]:
        """What ``/subscriptions`` serves: the table, each with its delivery log, and the positions."""
        return {"group": self.group_id, "positions": {str(p): o for p, o in sorted(self.positions().items())},
                "subscriptions": [{**s.model_dump(mode="json"), "deliveries": self.log.entries(s.id)}
                                  for _, s in sorted(self._table.items())]}

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                self.error = exc
                log.exception("subscriptions: %s failed", name)

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # -- the table -------------------------------------------------------------------------------

    def _table_main(self) -> None:
        """Read the subscriptions topic from its beginning, then follow it: the live table."""
        topic = subscriptions_topic(self.names)
        consumer = Consumer(self.config.consumer_conf(f"kflow-subscriptions-table-{uuid.uuid4().hex}"))
        try:
            _low, end = watermarks(consumer, topic, [0], _KAFKA_TIMEOUT_S)[0]
            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            if end == 0:
                self._table_loaded.set()
            while not self._stop.is_set():
                msgs = consumer.consume(100, 0.2)
                table, removed = dict(self._table), set()
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.fatal():
                            raise KafkaException(err)
                        continue
                    gone = _fold(table, msg)
                    if gone is not None:
                        removed.add(gone)
                    if msg.offset() >= end - 1:
                        self._table_loaded.set()
                if msgs:
                    self._set_table(table, removed)
        finally:
            consumer.close()

    def _set_table(self, table: dict[str, Subscription], removed: set[str]) -> None:
        before, self._table = self._table, table
        removed = {sid for sid in removed if sid not in table}  # deleted and declared again in one batch
        for sid, sub in table.items():
            if before.get(sid) != sub:
                log.info("subscriptions: %s '%s' → %s", "updated" if sid in before else "loaded", sid, sub.url)
                if not os.environ.get(sub.secret_env):
                    log.warning("subscriptions: '%s': environment variable %s (its secret) is not set here; its "
                                "deliveries fail until it is", sid, sub.secret_env)
        if removed:
            log.info("subscriptions: deleted %s", ", ".join(sorted(removed)))
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._close_lanes, removed)

    # -- consuming the state topic (consumer thread) ----------------------------------------------

    def _consume_main(self) -> None:
        while not self._table_loaded.wait(0.1):
            if self._stop.is_set():
                return
        consumer = Consumer(self.config.consumer_conf(self.group_id))
        consumer.subscribe([self.names.state], on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_lost)
        assert self._loop is not None
        try:
            while not self._stop.is_set():
                for msg in consumer.consume(500, 0.1):
                    err = msg.error()
                    if err is not None:
                        if err.fatal():
                            raise KafkaException(err)
                        log.debug("subscriptions consumer: %s", err)
                        continue
                    self._sent[msg.partition()] = msg.offset() + 1
                    self._loop.call_soon_threadsafe(self._dispatch, msg)
                self._pace(consumer)
                self._commit(consumer, self.positions(), asynchronous=True)
        finally:
            self._commit(consumer, self._in_loop(self._drop(list(self._parts))), asynchronous=False)
            consumer.close()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each partition at its committed offset, or a fresh group's at the end (committed now)."""
        topic = self.names.state
        committed = consumer.committed(partitions, timeout=_KAFKA_TIMEOUT_S) if partitions else []
        starts = {tp.partition: tp.offset for tp in committed if tp.offset >= 0}
        fresh = [tp.partition for tp in committed if tp.offset < 0]
        ends = at_end(consumer, topic, fresh, _KAFKA_TIMEOUT_S) if fresh else []
        starts.update({tp.partition: tp.offset for tp in ends})
        consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
        if ends:
            self._commit(consumer, {tp.partition: tp.offset for tp in ends}, asynchronous=False)
        self._in_loop(self._add(starts))
        self._sent.update(starts)
        self._committed.update(starts)
        self._assigned.set()
        log.info("subscriptions: assigned %s",
                 ", ".join(f"{topic}[{p}]@{o}" for p, o in sorted(starts.items())) or "no partition")

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Abandon the partitions' unfinished deliveries (their next owner redelivers them), commit the rest."""
        self._commit(consumer, self._release(partitions), asynchronous=False)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions)

    def _release(self, partitions: list[TopicPartition]) -> dict[int, int]:
        done = self._in_loop(self._drop([tp.partition for tp in partitions]))
        for tp in partitions:
            self._sent.pop(tp.partition, None)
            self._committed.pop(tp.partition, None)
            self._paused.discard(tp.partition)
        return done

    def _pace(self, consumer: Consumer) -> None:
        """Pause a partition whose backlog reached MAX_BACKLOG records; resume it at half."""
        for p, part in list(self._parts.items()):
            backlog = self._sent.get(p, part.done) - part.done
            tp = [TopicPartition(self.names.state, p)]
            if p not in self._paused and backlog >= MAX_BACKLOG:
                consumer.pause(tp)
                self._paused.add(p)
                log.info("subscriptions: pausing %s[%d] (%d records not delivered yet)", self.names.state, p, backlog)
            elif p in self._paused and backlog <= MAX_BACKLOG // 2:
                consumer.resume(tp)
                self._paused.discard(p)

    def _commit(self, consumer: Consumer, done: Mapping[int, int], *, asynchronous: bool) -> None:
        """Commit the offsets that moved; a failed commit only means those records are delivered again."""
        moved = {p: o for p, o in done.items() if o > self._committed.get(p, -1)}
        if not moved:
            return
        try:
            consumer.commit(offsets=[TopicPartition(self.names.state, p, o) for p, o in moved.items()],
                            asynchronous=asynchronous)
        except KafkaException as exc:
            if exc.args and exc.args[0].fatal():
                raise
            log.warning("subscriptions: committing offsets failed (%s); those records will be delivered again", exc)
            return
        self._committed.update(moved)

    def _in_loop(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the delivery loop and wait for it (the loop never waits on this thread)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    # -- delivering (the asyncio loop) --------------------------------------------------------

    def _loop_main(self, ready: threading.Event) -> None:
        async def main() -> None:
            self._closing = asyncio.Event()
            async with httpx.AsyncClient(headers={"user-agent": "kflow-subscriptions"}) as http:
                self._http = http
                ready.set()
                await self._closing.wait()
                await self._drop(list(self._parts))

        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()

    async def _add(self, starts: Mapping[int, int]) -> None:
        for p, offset in starts.items():
            self._parts[p] = _Partition(p, offset)

    async def _drop(self, partitions: Iterable[int]) -> dict[int, int]:
        """Forget partitions: cancel their lanes and wait until no request of theirs is in flight."""
        done: dict[int, int] = {}
        tasks: list[asyncio.Task[None]] = []
        for p in partitions:
            part = self._parts.pop(p, None)
            if part is not None:
                done[p] = part.done
                tasks += [lane.task for lane in part.lanes.values() if lane.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return done

    def _dispatch(self, msg: Message) -> None:
        """Put one state record into the lane of every subscription that matches it."""
        part = self._parts.get(msg.partition())
        if part is None:
            return  # revoked meanwhile: the partition's next owner reads it again
        if msg.value() is None:
            part.add(msg.offset(), 0)  # a tombstone: the instance's record was removed, nothing changed
            return
        try:
            change = StateChange.from_state(decode_state(msg.value()))
        except DecodeError as exc:
            part.add(msg.offset(), 1)
            self._task(self._dead_letter_undecodable(part, msg, str(exc)))
            return
        matching = [s.id for s in self._table.values() if s.matches(change)]
        part.add(msg.offset(), len(matching))
        if matching:
            item = _Item(msg.offset(), change, change.body(), msg)
            for sid in matching:
                lane = part.lanes.get(sid) or self._open_lane(part, sid)
                lane.queue.put_nowait(item)

    def _open_lane(self, part: _Partition, subscription: str) -> _Lane:
        lane = _Lane(subscription, asyncio.Queue())
        lane.task = self._task(self._run_lane(part, lane))
        part.lanes[subscription] = lane
        return lane

    def _task(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        """A task whose failure (a bug, or a dead letter Kafka would not take) stops the process."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)

        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                self.error = t.exception()
                log.error("subscriptions: delivery failed", exc_info=t.exception())

        task.add_done_callback(done)
        return task

    def _close_lanes(self, removed: set[str]) -> None:
        """Deleted subscriptions: stop their lanes and count what they held as finished."""
        for part in self._parts.values():
            for sid in removed & part.lanes.keys():
                lane = part.lanes.pop(sid)
                if lane.task is not None:
                    lane.task.cancel()
                left = [lane.current] if lane.current is not None else []
                while not lane.queue.empty():
                    left.append(lane.queue.get_nowait())
                for item in left:
                    part.finish(item.offset)

    async def _run_lane(self, part: _Partition, lane: _Lane) -> None:
        while True:
            item = await lane.queue.get()
            lane.current = item
            await self._deliver(lane.subscription, item)
            lane.current = None
            part.finish(item.offset)

    async def _deliver(self, subscription: str, item: _Item) -> None:
        """POST until a 2xx, at most ``max_attempts`` times with backoff; then the dlq topic."""
        delivery = item.change.delivery_id(subscription)
        attempts, code, error = 0, None, None
        while True:
            sub = self._table.get(subscription)
            if sub is None:
                return  # deleted: nothing to deliver to (the settings of each attempt are the latest)
            attempts += 1
            code, error = await self._post(sub, item, delivery)
            if error is None:
                self._record(subscription, item, delivery, "delivered", code, attempts, None)
                return
            if attempts >= sub.max_attempts:
                break
            delay = sub.backoff.delay(attempts)
            log.info("subscriptions: '%s' delivery %s (%s seq %d) failed: %s; retrying in %.2fs", subscription,
                     delivery, item.change.instance_id, item.change.seq, error, delay)
            await asyncio.sleep(delay)
        reason = f"subscription '{subscription}': POST {sub.url} failed {attempts} time(s); last: {error}"
        log.warning("subscriptions: dead-lettering delivery %s: %s", delivery, reason)
        await asyncio.to_thread(self._dead_letter, item.message, reason, [
            ("kflow.subscription", subscription.encode()), ("kflow.delivery", delivery.encode())])
        self._record(subscription, item, delivery, "dead_lettered", code, attempts, error)

    async def _post(self, sub: Subscription, item: _Item, delivery: str) -> tuple[Optional[int], Optional[str]]:
        """One attempt: ``(HTTP status or None, None on success else what went wrong)``."""
        secret = os.environ.get(sub.secret_env)
        if not secret:
            return None, f"environment variable {sub.secret_env} (the HMAC secret) is not set in the delivery process"
        headers = {"content-type": "application/json", SIGNATURE_HEADER: sign(item.body, secret),
                   DELIVERY_HEADER: delivery, SUBSCRIPTION_HEADER: sub.id}
        assert self._http is not None
        try:
            response = await self._http.post(sub.url, content=item.body, headers=headers,
                                             timeout=sub.timeout.total_seconds())
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if response.is_success:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}"

    def _record(self, subscription: str, item: _Item, delivery: str, outcome: str, code: Optional[int],
                attempts: int, error: Optional[str]) -> None:
        DELIVERIES.labels(subscription, outcome).inc()
        self.log.add(subscription, {"time_ms": int(time.time() * 1000), "delivery": delivery,
                                    "instance_id": item.change.instance_id, "seq": item.change.seq,
                                    "status": item.change.status, "http_status": code, "attempts": attempts,
                                    "outcome": outcome, "error": error})

    async def _dead_letter_undecodable(self, part: _Partition, msg: Message, problem: str) -> None:
        log.warning("subscriptions: dead-lettering the undecodable record %s[%d]@%d: %s", msg.topic(),
                    msg.partition(), msg.offset(), problem)
        await asyncio.to_thread(self._dead_letter, msg, f"undecodable state record: {problem}", [])
        part.finish(msg.offset())

    def _dead_letter(self, msg: Message, reason: str, extra: list[tuple[str, bytes]]) -> None:
        """Write ``msg`` to the dlq topic and wait for the broker's acknowledgement (a worker thread)."""
        assert self._producer is not None
        value, key, headers = dlq_record(msg, reason, int(time.time() * 1000))
        headers += [("kflow.source", b"subscription"), *extra]
        failed: list[KafkaError] = []
        self._producer.produce(self.names.dlq, value, key, headers=headers,
                               on_delivery=lambda err, _m: failed.append(err) if err else None)
        if self._producer.flush(30) or failed:
            raise BrokerUnavailable(self.config.bootstrap, f"the dlq topic did not take a dead letter: "
                                                           f"{failed[0] if failed else 'no acknowledgement in 30s'}")


# --------------------------------------------------------------------------- the operations endpoint


def serve_operations(runner: SubscriptionRunner, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """``/metrics``, ``/healthz``, ``/readyz`` (see :mod:`kflow._http`) plus ``/subscriptions``: the JSON of
    :meth:`SubscriptionRunner.describe` (the table, each subscription's last deliveries, positions).

    Raises:
        KflowError: the port cannot be bound.
    """
    from kflow._http import serve_operations as serve

    server = serve(port, runner.is_ready, host=host, bootstrap=runner.config.bootstrap)
    base: Any = server.RequestHandlerClass

    class Handler(base):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] == "/subscriptions":
                self._send(200, orjson.dumps(runner.describe(), option=orjson.OPT_INDENT_2), "application/json")
            else:
                super().do_GET()

    server.RequestHandlerClass = Handler
    return server
