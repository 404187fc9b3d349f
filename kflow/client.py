"""The Python client: deploy definitions, start, signal and cancel workflows, and await their results.

Everything goes through Kafka. Definitions are produced to ``definitions`` (key ``name@version``),
commands to ``commands`` (key = instance id), and results are read back from the ``state`` topic,
the engine's public state-change feed. A :class:`StateWatcher` (one consumer thread per client,
started lazily) follows every state partition from the moment it starts; :meth:`Client.start`
makes sure it runs *before* the command is produced, so no result can slip past it. For an id the
watcher did not see start, :meth:`Client.result` first scans the id's state partition and then
waits on the watcher. :meth:`Client.status` asks the engine that owns the instance (a
``QueryStatus`` command answered on the ``replies`` topic), and :meth:`Client.history` reads the
instance's events from where its history starts, so neither reads the topics from the beginning.
The watcher also follows the ``dlq`` topic: when the engine dead-letters a ``StartWorkflow`` this client sent (an unknown workflow, say), that
start's handle raises :class:`~kflow.model.errors.StartRejectedError` instead of timing out. The client keeps a view of the
``definitions`` topic, so ``deploy`` refuses to change a deployed ``name@version`` and ``start``
refuses a workflow that is not deployed, both before anything is written. The client never uses
transactions; it produces with ``acks=all`` and idempotence and confirms delivery before returning.
With a principal token (``KFLOW_TOKEN``) and keys configured, every command carries a signed
``kflow.auth`` header bound to its key and value, which engines with auth on require.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import orjson
import yaml
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from kflow import _tracing
from kflow.config import KafkaConfig
from kflow.converter import from_json, return_type, to_json
from kflow.engine import compile_spec
from kflow.engine.core import status_record
from kflow.engine.definitions import definition_fingerprint
from kflow.engine.schedules import OVERLAP_POLICIES, ScheduleSpec
from kflow.engine.schedules import key_of as schedule_key
from kflow.model import commands as cmds
from kflow.model.errors import (
    ActivityError,
    BrokerUnavailable,
    DefinitionConflict,
    DefinitionError,
    KflowError,
    QueryFailedError,
    StartRejectedError,
    UpdateFailedError,
    UpdateRejectedError,
    WorkflowFailedError,
    WorkflowNotDeployed,
)
from kflow.model.messages import (
    DEFS_OFFSET_HEADER,
    INCIDENT_ACTIONS,
    Command,
    Definition,
    Event,
    JSONValue,
    Status,
    priority_level,
)
from kflow.readend import EndReader, at_end, watermarks
from kflow.schemas.codec import (
    decode_command,
    decode_engine_state,
    decode_event,
    decode_state,
    encode_command,
    encode_definition,
)
from kflow.security.tokens import CommandSigner
from kflow.streams.definitions import DefinitionsLog
from kflow.streams.partitioner import partition_for
from kflow.streams.schedules import backfill_command, read_schedules, with_next_runs

__all__ = ["ID_REUSE_POLICIES", "Client", "Deployed", "StateWatcher", "WorkflowHandle", "load_spec"]

log = logging.getLogger("kflow.client")

#: The id-reuse policies a ``StartWorkflow`` may carry (``None`` means the engine's default).
ID_REUSE_POLICIES = frozenset({"reject_duplicate", "allow_if_closed", "return_existing"})

_DEFINITION_LOOKUP_SECONDS = 1.0  # how long a start reads the definitions again before "not deployed"
_SCHEDULE_LOOKUP_SECONDS = 3.0  # how long a schedule operation waits for a just-created schedule's record
_CONSUME_BATCH = 500
_POLL_SECONDS = 0.1

#: Status of the terminal pseudo-state the watcher records for a dead-lettered start (never on the wire).
REJECTED = "REJECTED"


@dataclasses.dataclass(slots=True)
class Deployed(Definition):
    """What :meth:`Client.deploy` returns: the definition that counts for ``name@version``.

    ``unchanged`` is True when that exact content was already deployed (nothing was written).
    """

    unchanged: bool = False


class _KafkaLog:
    """Routes librdkafka's own log lines to DEBUG: the client reports failures as exceptions."""

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(name)

    def log(self, level: int, msg: str, *args: Any) -> None:
        self._log.debug(msg, *args)


def load_spec(spec: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """Read a spec document from a dict or a YAML/JSON file path.

    Raises:
        OSError: the file cannot be read.
        DefinitionError: the file is not YAML/JSON or not a mapping.
    """
    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(spec)
    text = path.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)  # JSON is YAML, so one parser reads both
    except yaml.YAMLError as exc:
        raise DefinitionError(path.name, [("", f"{path} is not valid YAML/JSON: {exc}")]) from None
    if not isinstance(doc, dict):
        raise DefinitionError(path.name, [("", f"expected a mapping with name, version and steps in {path}, "
                                               f"but got {type(doc).__name__}")])
    return doc


def _same_content(a: Definition, b: Definition) -> bool:
    return definition_fingerprint(a.kind, a.body) == definition_fingerprint(b.kind, b.body)


def _outcome(instance_id: str, state: Mapping[str, Any]) -> JSONValue:
    """The result of a terminal state record, or the error it ended with."""
    if state["status"] == Status.COMPLETED:
        result: JSONValue = state.get("result")
        return result
    if state["status"] == REJECTED:
        raise StartRejectedError(instance_id, state.get("error_message") or "")
    error_type, message = state.get("error_type"), state.get("error_message")
    raise WorkflowFailedError(instance_id, state["status"], error_type, message, _activity_cause(error_type, message))


#: How the engine words a workflow failure that an activity's failure caused: ``activity 'NAME'
#: failed: MESSAGE`` from code workflows, ``activity 'NAME' (step 'STEP') failed: MESSAGE`` from specs.
_ACTIVITY_FAILURE = re.compile(r"activity '(?P<activity>[^']*)'(?: \(step '[^']*'\))? failed: (?P<message>.*)",
                               re.DOTALL)


def _activity_cause(error_type: str | None, message: str | None) -> ActivityError | None:
    """The activity failure a terminal state's error reports, if an activity's failure is what ended it."""
    found = _ACTIVITY_FAILURE.fullmatch(message or "")
    if error_type is None or found is None:
        return None
    return ActivityError(found["message"], type=error_type, activity=found["activity"])


def _drain(consumer: Consumer) -> list[Message]:
    """The records fetched so far, waiting at most ``_POLL_SECONDS`` for the first one.

    ``consume(n, timeout)`` alone would wait the whole timeout whenever fewer than n arrive.
    """
    first = consumer.poll(_POLL_SECONDS)
    if first is None:
        return []
    return [first, *consumer.consume(_CONSUME_BATCH, 0)]


# --------------------------------------------------------------------------- the watcher


class _Waiter:
    """Terminal states awaited for a set of ids; ``event`` is set once every id has one.

    ``starts`` maps an id to the command id of the start whose dead-lettering also ends the wait.
    """

    __slots__ = ("pending", "states", "event", "starts", "on_done")

    def __init__(self, ids: Iterable[str], starts: Mapping[str, str] | None = None,
                 on_done: Callable[[], None] | None = None) -> None:
        self.pending = set(ids)
        self.starts = dict(starts or {})
        self.states: dict[str, dict[str, Any]] = {}
        self.event = threading.Event()
        self.on_done = on_done  # called once, from whichever thread completes the wait (async waiters)
        if not self.pending:
            self._done()

    def deliver(self, instance_id: str, state: dict[str, Any]) -> None:
        """Record a terminal state (the first one per id wins); called with the watcher's lock held."""
        if instance_id in self.pending:
            self.pending.discard(instance_id)
            self.states[instance_id] = state
            if not self.pending:
                self._done()

    def _done(self) -> None:
        self.event.set()
        if self.on_done is not None:
            self.on_done()


def _rejection(msg: Message) -> dict[str, Any] | None:
    """The terminal pseudo-state of a dead-lettered ``StartWorkflow`` record, or None for anything else.

    The pseudo-state carries the start's ``command_id`` too (popped before it is handed out).
    """
    key, value = msg.key(), msg.value()
    if key is None or value is None:
        return None
    headers = list(msg.headers() or [])
    try:
        cmd = decode_command(value, headers)
    except KflowError:
        return None
    if cmd.type != "StartWorkflow":
        return None
    reason = next((v.decode("utf-8", "replace") for k, v in headers if k == "kflow.reason" and v), "dead-lettered")
    return {"instance_id": key.decode("utf-8", "replace"), "workflow": cmd.data.get("workflow"),
            "version": cmd.data.get("version"), "status": REJECTED, "result": None,
            "error_type": "StartRejected", "error_message": reason, "command_id": cmd.command_id}


class StateWatcher:
    """Follows every partition of the ``state`` topic and hands terminal states to waiters.

    One consumer thread, ``assign``-ed (no consumer group membership, no commits) to all state
    partitions at their high watermark as of :meth:`start`. Terminal states are kept per id in a
    bounded LRU dict, so a ``result()`` that comes after the workflow finished still finds them.
    With ``dlq_topic`` it follows the dead-letter topic too: when the ``StartWorkflow`` a waiter
    names (by command id, see :meth:`expect`) is dead-lettered, the wait ends with a ``REJECTED``
    pseudo-state carrying the engine's reason. A rejection belongs to that start command, not to
    the id: it is forgotten as soon as any state of the id shows up (a replayed start that ran).

    Args:
        config: Connection settings (``consumer_conf`` is used, ``read_committed``).
        topic: The state topic.
        dlq_topic: The dead-letter topic, or None not to follow it.
        cache_size: Most terminal states (and most "expected" ids) remembered.
        timeout: Seconds allowed for the metadata and watermark look-ups in :meth:`start`.
    """

    def __init__(self, config: KafkaConfig, topic: str, *, dlq_topic: str | None = None, cache_size: int = 100_000,
                 timeout: float = 10.0) -> None:
        self._config = config
        self._topic = topic
        self._dlq_topic = dlq_topic
        self._cache_size = cache_size
        self._timeout = timeout
        self._lock = threading.Lock()
        self._terminal: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._expected: OrderedDict[str, None] = OrderedDict()
        self._rejected: OrderedDict[str, dict[str, Any]] = OrderedDict()  # start command id -> pseudo-state
        self._starts: OrderedDict[str, str] = OrderedDict()  # start command id -> instance id
        self._waiters: dict[str, list[_Waiter]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.partitions = 0
        """Partition count of the state topic, known once started."""

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Position on every partition's high watermark and start the thread; idempotent.

        When this returns, every state record produced afterwards will be seen.
        """
        with self._lock:
            if self._thread is not None:
                self._raise_if_failed()
                return
            consumer = Consumer(self._config.consumer_conf(
                f"kflow-client-{uuid.uuid4().hex}",
                logger=_KafkaLog("kflow.client.kafka")))
            try:
                assignment = self._positions(consumer)
                consumer.assign(assignment)
            except BaseException:
                consumer.close()
                raise
            self.partitions = sum(1 for tp in assignment if tp.topic == self._topic)
            self._thread = threading.Thread(target=self._run, args=(consumer,), name="kflow-state-watcher",
                                            daemon=True)
            self._thread.start()
            log.debug("state watcher on %s: %d partitions from %s", self._topic, len(assignment),
                      {tp.partition: tp.offset for tp in assignment})

    def _positions(self, consumer: Consumer) -> list[TopicPartition]:
        try:
            topic = consumer.list_topics(self._topic, timeout=self._timeout).topics.get(self._topic)
            if topic is None or topic.error is not None or not topic.partitions:
                raise KflowError(f"state topic '{self._topic}' is not available: {topic.error if topic else 'missing'}")
            out = at_end(consumer, self._topic, topic.partitions, self._timeout)
            if self._dlq_topic:
                dlq = consumer.list_topics(self._dlq_topic, timeout=self._timeout).topics.get(self._dlq_topic)
                if dlq is not None and dlq.error is None and dlq.partitions:
                    out += at_end(consumer, self._dlq_topic, dlq.partitions, self._timeout)
            return out
        except KafkaException as exc:
            raise BrokerUnavailable(self._config.bootstrap, f"cannot read the state topic offsets: {exc}") from None

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread and close its consumer. Waiters still waiting time out."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- waiting ---------------------------------------------------------------------------

    def expect(self, instance_id: str, command_id: str | None = None) -> None:
        """Note that ``instance_id`` is being started now (by ``command_id``), while the watcher runs.

        Any terminal state remembered from an earlier run of the same id is forgotten, so the
        next terminal state is the new run's. With ``command_id``, the dead-lettering of that start
        is remembered as its rejection.
        """
        with self._lock:
            self._terminal.pop(instance_id, None)
            self._expected[instance_id] = None
            self._expected.move_to_end(instance_id)
            while len(self._expected) > self._cache_size:
                self._expected.popitem(last=False)
            if command_id is not None:
                self._starts[command_id] = instance_id
                while len(self._starts) > self._cache_size:
                    self._starts.popitem(last=False)

    def covers(self, instance_id: str) -> bool:
        """True if every state record of ``instance_id`` that matters passed through this watcher."""
        with self._lock:
            return instance_id in self._expected or instance_id in self._terminal

    def terminal(self, instance_id: str) -> dict[str, Any] | None:
        """The remembered terminal state of ``instance_id``, if any."""
        with self._lock:
            return self._terminal.get(instance_id)

    def register(self, ids: Iterable[str], starts: Mapping[str, str] | None = None,
                 on_done: Callable[[], None] | None = None) -> _Waiter:
        """Wait for terminal states of ``ids``; already remembered ones are delivered at once.

        ``starts`` maps ids to the command id of their start: its rejection ends the wait too.
        ``on_done`` is called once every id has its state (for waiting without a blocked thread).
        """
        waiter = _Waiter(ids, starts, on_done)
        with self._lock:
            self._raise_if_failed()
            for iid in list(waiter.pending):
                state = self._terminal.get(iid)
                if state is None and iid in waiter.starts:
                    state = self._rejected.get(waiter.starts[iid])
                if state is not None:
                    waiter.deliver(iid, state)
                else:
                    self._waiters.setdefault(iid, []).append(waiter)
        return waiter

    def deliver(self, waiter: _Waiter, instance_id: str, state: dict[str, Any]) -> None:
        """Hand ``waiter`` a terminal state found elsewhere (by a partition scan)."""
        with self._lock:
            waiter.deliver(instance_id, state)

    def pending(self, waiter: _Waiter) -> set[str]:
        """The ids ``waiter`` still waits for (a snapshot)."""
        with self._lock:
            return set(waiter.pending)

    def unregister(self, waiter: _Waiter) -> None:
        with self._lock:
            for iid in list(waiter.pending):
                waiting = self._waiters.get(iid)
                if waiting is not None:
                    if waiter in waiting:
                        waiting.remove(waiter)
                    if not waiting:
                        del self._waiters[iid]

    def wait(self, waiter: _Waiter, timeout: float) -> dict[str, dict[str, Any]]:
        """Block until ``waiter`` is complete or ``timeout`` passes; return the states it got.

        Raises:
            KflowError: the watcher's thread died (its cause is chained).
        """
        waiter.event.wait(max(timeout, 0.0))
        with self._lock:
            self._raise_if_failed()
            return dict(waiter.states)

    def is_waiting(self, instance_id: str) -> bool:
        """True while some caller waits for ``instance_id`` (lets tests synchronise on it)."""
        with self._lock:
            return bool(self._waiters.get(instance_id))

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise KflowError(f"the state watcher stopped: {self._failure}") from self._failure

    # -- the thread ------------------------------------------------------------------------

    def _run(self, consumer: Consumer) -> None:
        try:
            while not self._stop.is_set():
                # poll() wakes on the first record; consume(n, 0) drains what is already fetched
                first = consumer.poll(_POLL_SECONDS)
                if first is None:
                    continue
                self._on_message(first)
                for msg in consumer.consume(_CONSUME_BATCH, 0):
                    self._on_message(msg)
        except BaseException as exc:
            log.exception("state watcher failed")
            with self._lock:
                self._failure = exc
                for waiting in self._waiters.values():
                    for waiter in waiting:
                        waiter.event.set()
        finally:
            consumer.close()

    def _on_message(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.fatal():
                raise KafkaException(err)
            log.debug("state watcher: %s", err)
            return
        key, value = msg.key(), msg.value()
        if key is None or value is None:
            return  # tombstones and unkeyed records carry no state
        if msg.topic() != self._topic:
            self._on_dead_letter(msg)
            return
        try:
            state = decode_state(value)
        except KflowError as exc:
            log.warning("state watcher: skipping undecodable record %s[%d]@%d: %s",
                        msg.topic(), msg.partition(), msg.offset(), exc)
            return
        if self._rejected:  # rarely non-empty: the common path takes no lock here
            iid = state["instance_id"]
            with self._lock:
                # the id has state after all (a replayed start ran): its old rejections are void
                for cid in [c for c, r in self._rejected.items() if r["instance_id"] == iid]:
                    del self._rejected[cid]
        if state["status"] not in Status.TERMINAL:
            return
        self._finish(state)

    def _on_dead_letter(self, msg: Message) -> None:
        iid = (msg.key() or b"").decode("utf-8", "replace")
        state = _rejection(msg)
        if state is None:
            return
        cid = state.pop("command_id")
        with self._lock:
            if self._starts.get(cid) != iid:
                return
            self._rejected[cid] = state
            while len(self._rejected) > self._cache_size:
                self._rejected.popitem(last=False)
            for waiter in list(self._waiters.get(iid, ())):
                if waiter.starts.get(iid) == cid:
                    waiter.deliver(iid, state)

    def _finish(self, state: dict[str, Any]) -> None:
        """Remember a terminal state and hand it to the waiters of its id."""
        iid = state["instance_id"]
        with self._lock:
            self._terminal[iid] = state
            self._terminal.move_to_end(iid)
            while len(self._terminal) > self._cache_size:
                evicted, _ = self._terminal.popitem(last=False)
                # Its terminal state is gone from memory: result() must scan for it again.
                self._expected.pop(evicted, None)
            for waiter in self._waiters.pop(iid, ()):
                waiter.deliver(iid, state)


# --------------------------------------------------------------------------- the client


def _workflow_name(workflow: Any) -> tuple[str, Any]:
    """A workflow given by name or as a decorated code workflow: (its name, its result type or None)."""
    if isinstance(workflow, str):
        return workflow, None
    definition = getattr(workflow, "__kflow_workflow__", None)
    if definition is None:
        raise TypeError(f"expected a workflow name or a function/class decorated with @kflow.workflow, not {workflow!r}")
    run = getattr(workflow, "run", workflow) if isinstance(workflow, type) else workflow
    return definition.name, return_type(run)


T = TypeVar("T")


class WorkflowHandle(Generic[T]):
    """A started (or known) workflow instance: a client plus an instance id.

    A handle from ``client.start(workflow_function, ...)`` is typed by the function's return
    annotation: ``result()`` converts the JSON result to it (a dataclass, a pydantic model ...).

    Example:
        >>> handle = client.start("order", {"sku": "A1", "qty": 2})  # doctest: +SKIP
        >>> handle.result(timeout=60)  # doctest: +SKIP
    """

    __slots__ = ("_client", "id", "start_command_id", "result_type")

    def __init__(self, client: Client, id: str, start_command_id: str | None = None,
                 result_type: Any = None) -> None:
        self._client = client
        self.id = id
        #: The id of the command that started the instance (None: a handle to a known instance).
        self.start_command_id = start_command_id
        #: What ``result()`` converts the JSON result to by default (None: the JSON as is).
        self.result_type = result_type

    def result(self, timeout: float = 30, type: Any = None) -> T:
        """Wait for the instance's result; see :meth:`Client.result`.

        A handle returned by :meth:`Client.start` also knows its start command: if the engine
        dead-lettered it (an unknown workflow, say), this raises
        :class:`~kflow.model.errors.StartRejectedError` with the engine's reason instead of
        waiting for the timeout. ``type`` (default: the handle's result type, if any) is what the
        JSON result is converted to.
        """
        starts = {self.id: self.start_command_id} if self.start_command_id is not None else None
        states = self._client.wait_many([self.id], timeout, starts=starts)
        if self.id not in states:
            raise TimeoutError(f"workflow {self.id} did not finish within {timeout:g}s")
        value = _outcome(self.id, states[self.id])
        wanted = type if type is not None else self.result_type
        return from_json(value, wanted, f"the result of workflow {self.id}") if wanted is not None else value  # type: ignore[no-any-return]

    def status(self, *, timeout: float = 10.0, scan: bool = False) -> dict[str, Any] | None:
        """The instance's current state record; see :meth:`Client.status`."""
        return self._client.status(self.id, timeout=timeout, scan=scan)

    def history(self, *, timeout: float = 10.0, scan: bool = False) -> list[Event]:
        """The instance's events, oldest first; see :meth:`Client.history`."""
        return self._client.history(self.id, timeout=timeout, scan=scan)

    def query(self, name: str, *args: JSONValue, timeout: float = 10.0) -> JSONValue:
        """Ask this instance query ``name``; see :meth:`Client.query`."""
        return self._client.query(self.id, name, *args, timeout=timeout)

    def signal(self, name: str, data: JSONValue = None) -> None:
        """Send the instance a signal; see :meth:`Client.signal`."""
        self._client.signal(self.id, name, data)

    def update(self, name: str, data: JSONValue = None, *, update_id: str | None = None,
               timeout: float = 30.0) -> JSONValue:
        """Send the instance an update and return its answer; see :meth:`Client.update`."""
        return self._client.update(self.id, name, data, update_id=update_id, timeout=timeout)

    def cancel(self, reason: str = "") -> None:
        """Ask the engine to cancel the instance; see :meth:`Client.cancel`."""
        self._client.cancel(self.id, reason)

    def terminate(self, reason: str = "") -> None:
        """Stop the instance at once, without cleanup; see :meth:`Client.terminate`."""
        self._client.terminate(self.id, reason)

    def suspend(self, reason: str = "") -> None:
        """Pause the instance; see :meth:`Client.suspend`."""
        self._client.suspend(self.id, reason)

    def resume(self, reason: str = "") -> None:
        """Resume the suspended instance; see :meth:`Client.resume`."""
        self._client.resume(self.id, reason)

    def set_priority(self, level: str | int, reason: str = "") -> None:
        """Change the instance's priority level; see :meth:`Client.set_priority`."""
        self._client.set_priority(self.id, level, reason)

    def retry(self, from_step: str | None = None, input_patch: dict[str, Any] | None = None, *,
              force: bool = False, reason: str = "", by: str = "", to_event: int | None = None) -> None:
        """Re-open the failed instance at a step, or reset a code workflow; see :meth:`Client.retry`."""
        self._client.retry(self.id, from_step, input_patch, force=force, reason=reason, by=by, to_event=to_event)

    def resolve_incident(self, incident_id: str, action: str, *, output: Any = None,
                         input_patch: dict[str, Any] | None = None, reason: str = "", by: str = "") -> None:
        """Resolve an open incident of the instance; see :meth:`Client.resolve_incident`."""
        self._client.resolve_incident(self.id, incident_id, action, output=output, input_patch=input_patch,
                                      reason=reason, by=by)

    def __repr__(self) -> str:
        return f"WorkflowHandle({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkflowHandle) and other.id == self.id and other._client is self._client

    def __hash__(self) -> int:
        return hash(self.id)


class Client:
    """Talks to a kflow deployment through Kafka alone.

    Example:
        >>> with Client("localhost:9092") as client:  # doctest: +SKIP
        ...     client.deploy("order.yaml")
        ...     print(client.start("order", {"sku": "A1", "qty": 2}).result(timeout=60))

    Args:
        bootstrap: Kafka bootstrap servers; default ``KFLOW_BOOTSTRAP`` (or the config's).
        topic_prefix: Topic prefix; default ``KFLOW_TOPIC_PREFIX`` (or the config's).
        config: Full connection settings; default read from ``KFLOW_*`` variables. ``bootstrap``
            and ``topic_prefix`` override its fields when given.
        connect_timeout: Seconds to wait for the broker before raising :class:`BrokerUnavailable`.
        request_timeout: Seconds allowed for a delivery confirmation or a state partition scan.
    """

    def __init__(
        self,
        bootstrap: str | None = None,
        *,
        topic_prefix: str | None = None,
        config: KafkaConfig | None = None,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
    ) -> None:
        overrides: dict[str, Any] = {}
        if bootstrap is not None:
            overrides["bootstrap"] = bootstrap
        if topic_prefix is not None:
            overrides["topic_prefix"] = topic_prefix
        if config is None:
            config = KafkaConfig(**overrides)
        elif overrides:
            config = config.model_copy(update=overrides)
        self.config = config
        self.names = config.names
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._lock = threading.Lock()
        self._ready = False
        self._producer: Producer | None = None
        self._deployed_offset = -1  # offset of this client's last deploy on the definitions topic
        self._watcher: StateWatcher | None = None
        self._definitions: DefinitionsLog | None = None
        self._definitions_lock = threading.Lock()  # one reader of the definitions consumer at a time
        self._reader: EndReader | None = None  # status answers and histories; assigned per read
        self._marks: Consumer | None = None  # high watermarks, read_uncommitted (see _end_offset)
        self._reader_lock = threading.Lock()  # one read at a time owns the reader's assignment
        self._partition_counts: dict[str, int] = {}
        self._reply_partition = -1  # this client's status answers all land on one replies partition
        self._signer: CommandSigner | None = None  # signs commands with KFLOW_TOKEN (made on first use)
        self._signer_made = False
        self._closed = False
        self.records_read = 0
        """Records read from Kafka by :meth:`status`, :meth:`history` and state-topic scans so far
        (answers, events and state records of every instance on the partitions read)."""

    # -- set-up ----------------------------------------------------------------------------

    def _conf(self) -> dict[str, Any]:
        """Connection settings that make an unreachable broker fail fast."""
        ms = max(int(self.connect_timeout * 1000), 1000)
        return {"socket.connection.setup.timeout.ms": ms, "reconnect.backoff.max.ms": 1000,
                "logger": _KafkaLog("kflow.client.kafka")}

    def _ensure_ready(self) -> Producer:
        """Check the broker and kflow's topics (once per client) and create the producer.

        A client never creates topics (that needs rights a producer should not have): an engine
        does at start-up, or an operator with ``kflow topics ensure``. Raises BrokerUnavailable
        fast when the broker does not answer, and a KflowError naming the fix when topics are missing.
        """
        with self._lock:
            if self._closed:
                raise KflowError("the client is closed")
            if not self._ready:
                missing = self._check_broker()
                if missing:
                    raise KflowError(f"kflow's topics do not exist on {self.config.bootstrap} (missing: "
                                     f"{', '.join(missing)}): start an engine (it creates them) or run "
                                     f"`kflow topics ensure --prefix {self.names.prefix}`")
                self._ready = True
            if self._producer is None:
                self._producer = Producer(self.config.producer_conf(**{
                    "acks": "all", "message.timeout.ms": int(self.request_timeout * 1000), "client.id": "kflow-client",
                    **self._conf()}))
            return self._producer

    def _check_broker(self) -> list[str]:
        """One metadata round trip bounded by ``connect_timeout``; the topics a client needs that are missing."""
        from confluent_kafka.admin import AdminClient

        errors: list[str] = []
        admin = AdminClient({**self.config.client_conf(), **self._conf(),
                             "error_cb": lambda err: errors.append(err.str())})
        try:
            meta = admin.list_topics(timeout=self.connect_timeout)
        except KafkaException as exc:
            detail = errors[-1] if errors else (exc.args[0].str() if exc.args else str(exc))
            raise BrokerUnavailable(self.config.bootstrap,
                                    f"no answer within {self.connect_timeout:g}s ({detail})") from None
        needed = (self.names.commands, self.names.events, self.names.state, self.names.definitions)
        return [t for t in needed if t not in meta.topics or meta.topics[t].error is not None]

    def watcher(self) -> StateWatcher:
        """The client's state watcher, started if it is not running yet."""
        self._ensure_ready()
        with self._lock:
            if self._watcher is None:
                self._watcher = StateWatcher(self.config, self.names.state, dlq_topic=self.names.dlq,
                                             timeout=max(self.connect_timeout, 1.0) * 2)
            watcher = self._watcher
        watcher.start()
        return watcher

    # -- producing -------------------------------------------------------------------------

    def _command_signer(self) -> CommandSigner | None:
        """The signer of this client's commands: from ``KFLOW_TOKEN`` and the keys, None without a token.

        Raises:
            KeyConfigError: auth is on without a token, or the keys cannot sign.
        """
        with self._lock:
            if not self._signer_made:
                self._signer, self._signer_made = self.config.command_signer(), True
            return self._signer

    def _produce(self, topic: str, key: str, value: bytes, *, confirm: bool = True,
                 headers: list[tuple[str, bytes]] | None = None) -> None:
        producer = self._ensure_ready()
        if topic == self.names.commands:
            signer = self._command_signer()
            if signer is not None:  # the engine verifies it against exactly this key and value
                headers = [*(headers or ()), signer.header(key.encode(), value)]
        outcome: list[KafkaError | None] = []

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            outcome.append(err)
            if err is None and topic == self.names.definitions:
                self._deployed_offset = max(self._deployed_offset, msg.offset())
            if err is not None and not confirm:
                log.error("delivery of a record to %s (key %r) failed: %s", topic, key, err)

        while True:
            try:
                producer.produce(topic, value, key.encode(), on_delivery=on_delivery, headers=headers)
                break
            except BufferError:  # the local queue is full: let deliveries drain, then retry
                producer.poll(0.1)
        if not confirm:
            producer.poll(0)
            return
        deadline = time.monotonic() + self.request_timeout + 5
        while not outcome and time.monotonic() < deadline:
            producer.flush(min(1.0, max(deadline - time.monotonic(), 0.0)))
        if not outcome:
            raise BrokerUnavailable(self.config.bootstrap, f"no delivery confirmation for {topic} "
                                                           f"within {self.request_timeout:g}s")
        err = outcome[0]
        if err is not None:
            if err.code() in (KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
                raise BrokerUnavailable(self.config.bootstrap, f"producing to {topic} failed: {err.str()}")
            raise KflowError(f"producing to {topic} failed: {err.str()}")

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record produced with ``confirm=False`` is delivered."""
        if self._producer is None:
            return
        left = self._producer.flush(self.request_timeout if timeout is None else timeout)
        if left:
            raise BrokerUnavailable(self.config.bootstrap, f"{left} record(s) still undelivered")

    def _command(self, cmd: Command, *, confirm: bool = True) -> None:
        cmd.command_id = cmd.command_id or uuid.uuid4().hex
        cmd.ts = cmd.ts or int(time.time() * 1000)
        self._produce(self.names.commands, cmd.instance_id, encode_command(cmd), confirm=confirm)

    def send_command(self, cmd: Command, *, confirm: bool = True) -> None:
        """Produce ``cmd`` as it is, keeping its ``command_id`` (a random one when empty).

        For tools that must re-send a command after a crash under the same id, so the engine
        tells the redelivery apart (batch operations); ``confirm=False`` returns before delivery
        (see :meth:`flush`).
        """
        self._command(cmd, confirm=confirm)

    # -- the API ---------------------------------------------------------------------------

    def definitions_view(self, *, refresh: bool) -> DefinitionsLog:
        """This client's view of the definitions topic; with ``refresh``, read to its high watermark.

        Raises:
            BrokerUnavailable: the topic could not be read to its high watermark in time.
        """
        self._ensure_ready()
        with self._lock:
            if self._definitions is None:
                self._definitions = DefinitionsLog(self.config.consumer_conf(
                    f"kflow-client-defs-{uuid.uuid4().hex}", **self._conf()), self.names.definitions)
            view = self._definitions
        if refresh and not self._read_definitions(lambda: view.catch_up(self.request_timeout)):
            raise BrokerUnavailable(self.config.bootstrap, f"could not read {self.names.definitions} to its end "
                                                           f"within {self.request_timeout:g}s")
        return view

    def _read_definitions(self, read: Callable[[], bool]) -> bool:
        with self._definitions_lock:
            return read()

    def definition(self, name: str, version: int | None = None) -> Definition | None:
        """The deployed definition ``name@version`` (the latest version when None), or None.

        Reads the definitions topic to its end first; code workflows appear there as ``kind="code"``
        records once an engine hosting them has started.
        """
        view = self.definitions_view(refresh=True)
        if version is None:
            versions = view.versions(name)
            if not versions:
                return None
            version = versions[-1]
        return view.get(name, version)

    def resolve_version(self, workflow: str, wanted: int | str | None) -> int:
        """The deployed version of ``workflow`` a start of ``wanted`` runs (exact, a range, or None: latest).

        Raises:
            VersionRangeError: ``wanted`` is malformed, or no deployed version matches it (the
                message lists the deployed ones).
        """
        from kflow.engine.migration import VersionRangeError, resolve_version

        try:
            return resolve_version(workflow, wanted, self.definitions_view(refresh=False).versions(workflow))
        except VersionRangeError:  # a deploy this process has not read yet may match
            return resolve_version(workflow, wanted, self.definitions_view(refresh=True).versions(workflow))

    def deploy(self, spec: Mapping[str, Any] | str | Path) -> Deployed:
        """Validate a spec workflow locally and publish it to the ``definitions`` topic.

        A deployed ``name@version`` never changes: deploying the same content again writes nothing
        (the result says ``unchanged``), and other content under a deployed name and version is
        refused before anything is written. Engines keep the first content per ``name@version``
        too, so running instances finish on the content they started on.

        Args:
            spec: The definition as a dict, or the path of a YAML or JSON file.

        Returns:
            The definition that counts for its key (``name@version``), once the broker confirmed it.

        Raises:
            DefinitionError: the definition is invalid; every problem is named with its step.
            DefinitionConflict: ``name@version`` is deployed with other content; bump the version.
            OSError: the file cannot be read.
            BrokerUnavailable: Kafka cannot be reached.
        """
        doc = load_spec(spec)
        compiled = compile_spec(doc)
        definition = Deployed(name=compiled.name, version=compiled.version, kind="spec", body=doc,
                              deployed_ms=int(time.time() * 1000))
        view = self.definitions_view(refresh=True)
        existing = view.get(definition.name, definition.version)
        if existing is None:
            self._produce(self.names.definitions, definition.key, encode_definition(definition))
            # Another deployer may have won the race for this key: the first record is the one that counts.
            self._read_definitions(lambda: view.read_through(self._deployed_offset, self.request_timeout))
            existing = view.get(definition.name, definition.version)
            if existing is None or _same_content(existing, definition):
                log.info("deployed %s", definition.key)
                return definition
        elif _same_content(existing, definition):
            log.info("%s already deployed, unchanged", definition.key)
            return Deployed(name=existing.name, version=existing.version, kind=existing.kind, body=existing.body,
                            deployed_ms=existing.deployed_ms, unchanged=True)
        raise DefinitionConflict(definition.name, definition.version,
                                 definition_fingerprint(existing.kind, existing.body),
                                 definition_fingerprint(definition.kind, definition.body))

    def require_deployed(self, workflow: str, version: int | None) -> None:
        """Raise WorkflowNotDeployed unless the definitions topic holds ``workflow`` (at ``version``)."""
        def known(view: DefinitionsLog) -> bool:
            return bool(view.versions(workflow)) if version is None else view.get(workflow, version) is not None

        if known(self.definitions_view(refresh=False)):
            return  # deployed versions never go away: no round trip for a name already seen
        view = self.definitions_view(refresh=True)
        deadline = time.monotonic() + _DEFINITION_LOOKUP_SECONDS
        while not known(view):  # read again briefly before saying no: a "no" stops the caller
            if time.monotonic() >= deadline:
                raise WorkflowNotDeployed(workflow, version, view.versions(workflow))
            time.sleep(0.1)
            view = self.definitions_view(refresh=True)

    def start(
        self,
        workflow: str | Callable[..., Any] | type,
        input: Any = None,
        *,
        id: str | None = None,
        version: int | str | None = None,
        id_reuse: str | None = None,
        confirm: bool = True,
        require_deployed: bool = True,
        priority: str | None = None,
    ) -> WorkflowHandle:
        """Start a workflow instance by producing ``StartWorkflow`` to the ``commands`` topic.

        Args:
            workflow: The definition's name, or a code workflow (a function or class decorated
                with ``@kflow.workflow``): its name, and its return annotation types the handle.
            input: The workflow input: any JSON value, or a dataclass, pydantic model ... (converted
                to JSON, see :mod:`kflow.converter`).
            id: The instance id; a random one (uuid4 hex) when omitted.
            version: The definition version: exact (``3``, ``"1.4.0"``), a range (``"^1.2"``,
                ``"~1.4"``, ``">=1.2,<2"``: the newest deployed match, resolved here before anything is
                sent), or the latest deployed one when omitted.
            id_reuse: What the engine does if the id exists: ``reject_duplicate`` (default),
                ``allow_if_closed`` or ``return_existing``.
            confirm: Wait for the broker to confirm the command (default). With False the
                command is only queued; call :meth:`flush` to confirm a batch.
            require_deployed: Check the definitions topic first and raise
                :class:`~kflow.model.errors.WorkflowNotDeployed` if the workflow (or version) is
                not there (default). With False the command is sent anyway; an engine that does
                not know the workflow dead-letters it, and the handle's ``result()`` raises
                :class:`~kflow.model.errors.StartRejectedError` with the engine's reason.
            priority: ``critical``, ``high``, ``normal``, ``low`` or ``background``: the level the
                instance's tasks are dispatched at (and its children's), unless a step or call
                sets its own. Default: the definition's ``priority:``, else ``normal``.

        Returns:
            A handle to await the result with.

        Raises:
            WorkflowNotDeployed: the workflow or version is not deployed (unless ``require_deployed=False``).
            ValueError: ``priority`` is not one of the five levels.
            VersionRangeError: ``version`` is malformed, or no deployed version matches it.
        """
        level = priority_level(priority)
        workflow, result_type = _workflow_name(workflow)
        if isinstance(version, str):
            version = self.resolve_version(workflow, version)
        input = to_json(input, f"the input of workflow '{workflow}'")
        if id_reuse is not None and id_reuse not in ID_REUSE_POLICIES:
            raise ValueError(f"id_reuse must be one of {', '.join(sorted(ID_REUSE_POLICIES))}, not {id_reuse!r}")
        if id is not None and not id:
            raise ValueError("a workflow instance id must not be empty")
        if require_deployed:
            self.require_deployed(workflow, version)
        instance_id = id or uuid.uuid4().hex
        command_id = uuid.uuid4().hex
        watcher = self.watcher()  # running before the command exists, so its result cannot be missed
        if id_reuse != "return_existing":
            # With return_existing a closed instance produces no new state record: result() scans.
            watcher.expect(instance_id, command_id)
        start = cmds.StartWorkflow(workflow=workflow, version=version, input=input, id_reuse=id_reuse, priority=level)
        cmd = cmds.command(start, instance_id, command_id=command_id, ts=int(time.time() * 1000))
        # read-your-deploys: the engine decides this start only after reading the definitions
        # topic at least up to this client's last deploy, so "latest version" includes it
        headers = [(DEFS_OFFSET_HEADER, str(self._deployed_offset).encode())] if self._deployed_offset >= 0 else None
        traced = _tracing.client_start(workflow, instance_id)  # W3C traceparent: the instance's trace starts here
        if traced:
            headers = (headers or []) + traced
        self._produce(self.names.commands, instance_id, encode_command(cmd), confirm=confirm, headers=headers)
        return WorkflowHandle(self, instance_id, command_id, result_type)

    def handle(self, id: str) -> WorkflowHandle:
        """A handle for an existing instance id."""
        return WorkflowHandle(self, id)

    def signal(self, id: str, name: str, data: JSONValue = None) -> None:
        """Send signal ``name`` with ``data`` to instance ``id`` (``SignalWorkflow``)."""
        self._command(cmds.command(cmds.SignalWorkflow(name=name, data=to_json(data, f"signal '{name}' data")), id))

    def cancel(self, id: str, reason: str = "") -> None:
        """Ask the engine to cancel instance ``id`` (``CancelWorkflow``): compensations run first."""
        self._command(cmds.command(cmds.CancelWorkflow(reason=reason), id))

    def terminate(self, id: str, reason: str = "") -> None:
        """Stop instance ``id`` immediately with no cleanup (``TerminateWorkflow``); idempotent."""
        self._command(cmds.command(cmds.TerminateWorkflow(reason=reason), id))

    def suspend(self, id: str, reason: str = "") -> None:
        """Pause instance ``id`` (``SuspendWorkflow``): it dispatches no new tasks and fires no timers.

        Running activities finish and their results are recorded; those results, due timers and
        signals are applied when it is resumed. Suspending a closed instance is rejected.
        """
        self._command(cmds.command(cmds.SuspendWorkflow(reason=reason), id))

    def resume(self, id: str, reason: str = "") -> None:
        """Resume suspended instance ``id`` (``ResumeWorkflow``): what it held is applied in arrival order."""
        self._command(cmds.command(cmds.ResumeWorkflow(reason=reason), id))

    def set_priority(self, id: str, level: str | int, reason: str = "") -> None:
        """Change the priority level of open instance ``id`` (``SetPriority`` -> ``PriorityChanged``).

        Work not dispatched yet moves to the new level: a start or an activity waiting for a
        quota's permit is re-queued at it, and retries and later steps are dispatched at it.
        Tasks already on a task topic stay where they are.

        Raises:
            ValueError: ``level`` is not one of the five levels (nothing is sent).
        """
        number = priority_level(level)
        if number is None:
            raise ValueError("expected a priority level, but got None")
        self._command(cmds.command(cmds.SetPriority(priority=number, reason=reason), id))

    def apply_limits(self, doc: Any, source: str = "limits") -> list[Any]:
        """Validate a limits document and make it the set in force on every engine; returns the limits.

        Raises:
            LimitSpecError: the document does not validate (nothing is applied).
        """
        from kflow.streams.limits import publish_limits

        return publish_limits(self.config, doc, source)[1]

    def retry(self, id: str, from_step: str | None = None, input_patch: dict[str, Any] | None = None, *,
              force: bool = False, reason: str = "", by: str = "", to_event: int | None = None) -> None:
        """Re-open FAILED instance ``id`` (``RetryWorkflow``).

        A spec instance re-opens at ``from_step``, by default the step it failed at (for a failure
        inside a ``parallel`` or ``foreach``, that whole step), with its variables as they were,
        updated with ``input_patch`` (its key ``input`` replaces the workflow input). The steps
        before it do not run again.

        A code instance is reset to event ``to_event`` of its history (its ``seq``), by default the
        last one before the input that ended it, and replays from there: the activities pending at
        that point are dispatched again under a new attempt, the ones completed before it are not
        run again. ``from_step`` and ``input_patch`` are for spec instances only.

        ``force`` also re-opens a CANCELLED or TERMINATED instance; ``reason`` and ``by`` are
        recorded in ``WorkflowRetried``. A retry that does not fit the instance is rejected
        (``CommandRejected`` in its history, with the reason).

        Raises:
            ValueError: both ``from_step`` and ``to_event`` given, or ``to_event`` negative.
        """
        if to_event is not None:
            if from_step is not None:
                raise ValueError("give from_step (a spec workflow's step) or to_event (a code workflow's event), not both")
            if type(to_event) is not int or to_event < 0:
                raise ValueError(f"to_event must be an event seq (an int >= 0), but got {to_event!r}")
            from_step = f"event:{to_event}"  # the reset point travels in from_step (kflow.engine.code_retry)
        self._command(cmds.command(cmds.RetryWorkflow(
            from_step=from_step, input_patch=to_json(input_patch, "retry input_patch"), force=force,
            reason=reason, by=by), id))

    def resolve_incident(self, id: str, incident_id: str, action: str, *, output: Any = None,
                         input_patch: dict[str, Any] | None = None, reason: str = "", by: str = "") -> None:
        """Resolve open incident ``incident_id`` of instance ``id`` (``ResolveIncident``).

        ``action`` is ``retry`` (run the step again with a fresh retry policy, its input updated
        with ``input_patch``), ``skip`` (``output`` becomes the step's output and the workflow goes
        on) or ``fail`` (fail the workflow with the step's error). ``reason`` and ``by`` are recorded
        in ``IncidentResolved``. With auth on, the sender needs the role the step names (or
        ``system_admin``). The engine rejects (``CommandRejected``) a resolve of an incident that is
        not open, and applies nothing.

        Raises:
            ValueError: an unknown action, or ``output``/``input_patch`` with an action that takes none.
        """
        if action not in INCIDENT_ACTIONS:
            raise ValueError(f"expected action {', '.join(INCIDENT_ACTIONS)}, but got {action!r}")
        if input_patch is not None and (action != "retry" or not isinstance(input_patch, dict)):
            raise ValueError("input_patch is a JSON object, and only for action 'retry'")
        if output is not None and action != "skip":
            raise ValueError("output is only for action 'skip'")
        self._command(cmds.command(cmds.ResolveIncident(
            incident_id=incident_id, action=action, output=to_json(output, "incident output"),
            input_patch=to_json(input_patch, "incident input_patch"), by=by, reason=reason), id))

    # -- schedules -------------------------------------------------------------------------

    def create_schedule(self, id: str, workflow: str, *, cron: str | None = None,
                        every: str | float | timedelta | None = None, input: Any = None, version: int | None = None,
                        timezone: str = "UTC", jitter: str | float | timedelta | None = None,
                        start: str | datetime | None = None, end: str | datetime | None = None,
                        overlap: str = "skip", catchup_window: str | float | timedelta | None = None,
                        replace: bool = False) -> ScheduleSpec:
        """Create schedule ``id``: start ``workflow`` on a cron expression or every interval.

        The declaration is checked here (one :class:`ScheduleSpecError` listing every problem, and
        nothing is sent) and then sent to the engine that owns the key ``schedule:<id>``, which
        fires it. Each run's id is ``<id>:<scheduled time, UTC ISO 8601>``. See ``docs/schedules.md``.

        Args:
            id: The schedule's name (letters, digits, ``.``, ``_``, ``-``).
            workflow: The workflow each run starts; ``version`` pins one (default: the latest).
            cron: A 5-field cron expression or ``@daily``-style alias, read in ``timezone``.
            every: An interval (``"30s"``, ``"1h"``, seconds, a timedelta) instead of ``cron``.
            input: The JSON input of every run.
            timezone: IANA time zone of ``cron`` (DST handled; see the docs).
            jitter: Delay each run by a deterministic offset below this.
            start: No run before this instant (ISO 8601 with a zone, or an aware datetime).
            end: No run after this instant.
            overlap: ``skip``, ``buffer_one``, ``allow_all``, ``cancel_other`` or ``terminate_other``.
            catchup_window: After downtime, missed runs this recent are still started (default 1h).
            replace: Replace an existing schedule's declaration instead of refusing.

        Raises:
            ScheduleSpecError: the declaration is invalid (bad cron, unknown time zone, ...).
            KflowError: the schedule exists and ``replace`` is False.
        """
        spec = ScheduleSpec.build(id, workflow, cron=cron, every=every, input=to_json(input, "schedule input"),
                                  version=version, timezone=timezone, jitter=jitter, start=start, end=end,
                                  overlap=overlap, catchup_window=catchup_window)
        if not replace and id in self.schedules():
            raise KflowError(f"schedule '{id}' exists: replace it (replace=True, or `kflow schedule create --update`)")
        self._command(cmds.command(cmds.CreateSchedule(spec=spec.to_dict(), replace=replace), schedule_key(id)))
        return spec

    def schedules(self) -> dict[str, dict[str, Any]]:
        """Every schedule, by id, as the schedules table holds it (declaration, paused, running runs...)."""
        self._ensure_ready()
        return read_schedules(self.config, self.request_timeout)

    def describe_schedule(self, id: str) -> dict[str, Any] | None:
        """Schedule ``id`` as the table holds it plus its ``next_runs``; None when there is none."""
        record = self.schedules().get(id)
        return None if record is None else with_next_runs(record, int(time.time() * 1000))

    def _schedule(self, id: str) -> dict[str, Any]:
        """Schedule ``id`` from the table; asked again for a few seconds before saying there is none,
        because the engine writes a new schedule's record in the transaction that decides its creation."""
        deadline = time.monotonic() + _SCHEDULE_LOOKUP_SECONDS
        while True:
            known = self.schedules()
            if id in known:
                return known[id]
            if time.monotonic() >= deadline:
                raise KflowError(f"no schedule '{id}' (schedules: {', '.join(sorted(known)) or 'none'})")
            time.sleep(0.25)

    def pause_schedule(self, id: str, note: str = "") -> None:
        """Pause schedule ``id``: no run starts until it is unpaused, and none is caught up then."""
        self._schedule(id)
        self._command(cmds.command(cmds.PauseSchedule(note=note), schedule_key(id)))

    def unpause_schedule(self, id: str, note: str = "") -> None:
        """Unpause schedule ``id``: it fires again from its next scheduled time after now."""
        self._schedule(id)
        self._command(cmds.command(cmds.UnpauseSchedule(note=note), schedule_key(id)))

    def trigger_schedule(self, id: str, overlap: str | None = None) -> None:
        """Start a run of schedule ``id`` now (id ``<id>:<now>``), under its overlap policy or ``overlap``."""
        if overlap is not None and overlap not in OVERLAP_POLICIES:
            raise ValueError(f"unknown overlap policy {overlap!r}: expected one of {', '.join(OVERLAP_POLICIES)}")
        self._schedule(id)
        self._command(cmds.command(cmds.TriggerSchedule(overlap=overlap), schedule_key(id)))

    def backfill_schedule(self, id: str, start: str | datetime, end: str | datetime) -> None:
        """Start one run per scheduled time of schedule ``id`` in ``[start, end)``.

        Times that already have a run (same deterministic id) are not started again.

        Raises:
            ValueError: a bad range, or more runs than one backfill may start (1000).
        """
        self._command(backfill_command(self._schedule(id), start, end))

    def delete_schedule(self, id: str, reason: str = "") -> None:
        """Delete schedule ``id``: no further runs; runs already started go on."""
        self._schedule(id)
        self._command(cmds.command(cmds.DeleteSchedule(reason=reason), schedule_key(id)))

    def _reply_reader(self, key: str, what: str) -> Consumer:
        """A consumer of the ``replies`` partition of ``key``, at its end: assigned before the request
        is produced, so the answer cannot be missed. The caller closes it.

        Raises:
            KflowError: the replies topic does not exist.
            BrokerUnavailable: its offsets could not be read.
        """
        topic = self.names.replies
        consumer = Consumer(self.config.consumer_conf(
            f"kflow-client-{what}-{uuid.uuid4().hex}", **{"isolation.level": "read_committed", **self._conf()}))
        try:
            meta = consumer.list_topics(topic, timeout=self.connect_timeout)
            partitions = len(meta.topics[topic].partitions)
            if partitions == 0:
                raise KflowError(f"replies topic '{topic}' does not exist; start an engine (it creates it)")
            consumer.assign(at_end(consumer, topic, [partition_for(key.encode(), partitions)], self.connect_timeout))
        except KafkaException as exc:
            consumer.close()
            raise BrokerUnavailable(self.config.bootstrap, f"cannot read reply offsets: {exc}") from None
        except BaseException:
            consumer.close()
            raise
        return consumer

    def query(self, id: str, name: str, *args: JSONValue, timeout: float = 10.0) -> JSONValue:
        """Ask instance ``id`` query ``name`` with ``args`` and return the answer.

        The engine that owns the instance answers it from the live workflow object (code
        workflows: a ``@workflow.query`` method or ``ctx.set_query_handler``; spec workflows: a
        variable, or ``vars`` for all of them) without writing to its history.

        Raises:
            QueryFailedError: the engine answered with an error: the instance does not exist
                (``type`` ``"NotFound"``), has no such query (``"UnknownQuery"``), or the handler
                raised (its error type); ``message`` says more.
            TimeoutError: no engine answered within ``timeout`` seconds.
        """
        self._ensure_ready()
        qid = uuid.uuid4().hex
        consumer = self._reply_reader(qid, "query")
        try:
            self._command(cmds.command(cmds.QueryWorkflow(
                query_id=qid, name=name, args=[to_json(a, f"query '{name}' argument") for a in args]), id))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for msg in consumer.consume(_CONSUME_BATCH, _POLL_SECONDS):
                    if msg.error() is not None or msg.key() != qid.encode():
                        continue
                    answer = orjson.loads(msg.value())
                    if "error" in answer:
                        err = answer["error"]
                        raise QueryFailedError(err["type"], err["message"], instance_id=id, query=name)
                    return answer.get("result")
            raise TimeoutError(f"no answer to query '{name}' on {id} within {timeout:g}s (is an engine running?)")
        finally:
            consumer.close()

    def update(self, id: str, name: str, data: JSONValue = None, *, update_id: str | None = None,
               timeout: float = 30.0) -> JSONValue:
        """Send instance ``id`` update ``name`` with ``data`` and return its handler's answer.

        An update is a signal that returns a result (``UpdateWorkflow``). The engine that owns
        the instance validates it first (a code workflow's ``@workflow.update`` validator, a spec
        ``wait: {update: name, validate: ...}`` step): a rejected update writes no history. Once
        accepted it is recorded (``UpdateAccepted``), its handler runs (an async one may await
        activities and timers) and the caller is answered when it returns (``UpdateCompleted``).

        An update is idempotent by ``update_id`` (default: a fresh one): sending the same id again,
        e.g. after a timeout, runs nothing twice and returns the answer the first one got (the
        instance keeps the answers of its recent updates).

        Raises:
            UpdateRejectedError: refused before it was accepted: the validator raised (``type`` is
                its error type), no handler or waiting step takes ``name``, the instance does not
                exist (``"NotFound"``) or is not running (``"InvalidState"``).
            UpdateFailedError: accepted, but the handler raised (its error type), or the instance
                closed before it finished (``"WorkflowClosed"``).
            TimeoutError: no answer within ``timeout`` seconds (no engine running, or the handler
                still waits); send the same ``update_id`` again to keep waiting for it.
        """
        self._ensure_ready()
        uid = update_id or uuid.uuid4().hex
        consumer = self._reply_reader(uid, "update")
        try:
            self._command(cmds.command(cmds.UpdateWorkflow(
                update_id=uid, name=name, data=to_json(data, f"update '{name}' data")), id))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for msg in consumer.consume(_CONSUME_BATCH, _POLL_SECONDS):
                    if msg.error() is not None or msg.key() != uid.encode():
                        continue
                    answer = orjson.loads(msg.value())
                    if "error" in answer:
                        err = answer["error"]
                        kind = UpdateRejectedError if answer.get("rejected") else UpdateFailedError
                        raise kind(err["type"], err["message"], instance_id=id, update=name, update_id=uid)
                    return answer.get("result")  # type: ignore[no-any-return]
            raise TimeoutError(f"no answer to update '{name}' (id {uid}) on {id} within {timeout:g}s "
                               "(is an engine running? the same update_id can be sent again)")
        finally:
            consumer.close()

    def status(self, id: str, *, timeout: float = 10.0, scan: bool = False) -> dict[str, Any] | None:
        """The current state record of instance ``id``, or None if there is no such instance.

        The engine that owns the instance's partition answers (a ``QueryStatus`` command, answered
        on the ``replies`` topic without writing history), so the cost does not grow with the
        topics. The record is a dict with the fields of the public state record
        (docs/state-contract.md), ``events_offset`` and ``internal``: ``events_offset`` is where
        the instance's history starts on its ``events`` partition (None for instances started by
        a kflow version that did not record it); ``internal`` is the engine's whole state of the
        instance, kflow's own format (the ``engine-state`` record), not a stable contract.

        Args:
            id: The instance id.
            timeout: Seconds to wait for the engine's answer.
            scan: Read the id's partition of the ``engine-state`` topic from the beginning instead of
                asking an engine (works with no engine running; slower as the topic grows).

        Raises:
            TimeoutError: no engine answered within ``timeout`` (none is running, or the
                partition is being handed over); ``scan=True`` reads without one.
            BrokerUnavailable: Kafka cannot be reached.
        """
        if scan:
            return self._scan_engine([id]).get(id)
        answer = self._ask(id, "QueryStatus", {}, timeout)
        if "error" in answer:
            err = answer["error"]
            if err.get("type") == "NotFound":
                return None
            raise KflowError(f"status of {id} failed: {err.get('type')}: {err.get('message')}")
        state: dict[str, Any] = answer["result"]
        return state

    def _ask(self, id: str, command: str, data: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send ``command`` (with a fresh ``query_id``) to instance ``id`` and return the engine's answer.

        The reader is positioned on this client's replies partition at its end *before* the
        command is produced, so the answer cannot be missed; query ids are drawn until one lands
        on that partition (the engine keys its answer by it), so only answers produced while this
        call waits are read.
        """
        topic = self.names.replies
        with self._reader_lock:
            reader = self._end_reader().consumer
            partitions = self._partition_count(reader, topic)
            if self._reply_partition < 0:
                self._reply_partition = uuid.uuid4().int % partitions
            qid = uuid.uuid4().hex
            while partition_for(qid.encode(), partitions) != self._reply_partition:
                qid = uuid.uuid4().hex
            high = self._end_offset(topic, self._reply_partition)
            reader.assign([TopicPartition(topic, self._reply_partition, high)])
            self._command(Command(command, id, {"query_id": qid, **data}))
            key = qid.encode()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for msg in _drain(reader):
                    if msg.error() is not None or msg.topic() != topic:
                        continue
                    self.records_read += 1
                    if msg.key() == key and msg.value() is not None:
                        answer: dict[str, Any] = orjson.loads(msg.value())
                        return answer
        raise TimeoutError(f"no engine answered {command} for {id} within {timeout:g}s (is an engine running? "
                           "status and history can read the topics without one: scan=True, or --scan)")

    def _end_reader(self) -> EndReader:
        """The client's reader (created once); called with ``_reader_lock`` held."""
        self._ensure_ready()
        if self._reader is None:
            self._reader = EndReader(self.config.consumer_conf(f"kflow-client-reader-{uuid.uuid4().hex}",
                                                               **self._conf()), timeout=self.connect_timeout)
        return self._reader

    def _partition_count(self, consumer: Consumer, topic: str) -> int:
        count = self._partition_counts.get(topic)
        if count is None:
            try:
                meta = consumer.list_topics(topic, timeout=self.connect_timeout).topics.get(topic)
            except KafkaException as exc:
                raise BrokerUnavailable(self.config.bootstrap, f"cannot read metadata of {topic}: {exc}") from None
            if meta is None or meta.error is not None or not meta.partitions:
                raise KflowError(f"topic '{topic}' does not exist; start an engine (it creates it)")
            count = self._partition_counts[topic] = len(meta.partitions)
        return count

    def _end_offset(self, topic: str, partition: int) -> int:
        """The high watermark of ``topic[partition]`` as written, committed or not.

        Asked ``read_uncommitted``: a ``read_committed`` answer is the last stable offset, which an
        engine's open transaction holds back (some brokers then answer 0), and an end offset that
        low would skip records or send a reader back to the beginning of the partition.
        """
        with self._lock:
            if self._marks is None:
                self._marks = Consumer(self.config.consumer_conf(
                    f"kflow-client-marks-{uuid.uuid4().hex}", **{"isolation.level": "read_uncommitted", **self._conf()}))
            marks = self._marks
        try:
            _low, high = watermarks(marks, topic, [partition], self.connect_timeout)[partition]
        except KafkaException as exc:
            raise BrokerUnavailable(self.config.bootstrap, f"cannot read offsets of {topic}: {exc}") from None
        return high

    def result(self, id: str, timeout: float = 30) -> JSONValue:
        """Wait until instance ``id`` finishes and return its result.

        Returns:
            The workflow result (a JSON value) once the instance is COMPLETED.

        An instance whose start was dead-lettered never gets a state, so this waits for the
        timeout; the :class:`WorkflowHandle` returned by :meth:`start` reports the rejection
        instead, and :meth:`start_rejection` tells why a start of ``id`` was refused.

        Raises:
            WorkflowFailedError: the instance ended FAILED or CANCELLED.
            TimeoutError: it did not finish within ``timeout`` seconds.
        """
        states = self._wait([id], timeout)
        if id not in states:
            raise TimeoutError(f"workflow {id} did not finish within {timeout:g}s")
        return _outcome(id, states[id])

    def wait_many(self, ids: Iterable[str], timeout: float = 60, *,
                  starts: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """Wait for many instances at once (benchmarks, fan-out scripts).

        ``starts`` maps an id to the id of the command that started it: a start the engine
        dead-lettered then raises :class:`~kflow.model.errors.StartRejectedError` at once.

        Returns:
            The terminal state record of every id that finished within ``timeout``; ids missing
            from the dict had not finished. Failures are returned, not raised.
        """
        return self._wait(list(dict.fromkeys(ids)), timeout, starts)

    def _wait(self, ids: list[str], timeout: float,
              starts: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        watcher = self.watcher()
        # Registered before the scan: records newer than the scan reach the waiter, older ones the scan.
        waiter = watcher.register(ids, starts)
        try:
            pending = watcher.pending(waiter)
            unseen = [i for i in ids if i in pending and not watcher.covers(i)]
            if unseen:
                for iid, state in self._scan(unseen).items():
                    if state["status"] in Status.TERMINAL:
                        watcher.deliver(waiter, iid, state)
            return watcher.wait(waiter, deadline - time.monotonic())
        finally:
            watcher.unregister(waiter)

    async def wait_many_async(self, ids: Iterable[str], timeout: float = 60, *,
                              starts: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """:meth:`wait_many` for asyncio: no thread blocks while waiting (only the scan of unseen ids runs in one)."""
        import asyncio

        wanted = list(dict.fromkeys(ids))

        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_done() -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        watcher = await asyncio.to_thread(self.watcher)
        waiter = watcher.register(wanted, starts, on_done)
        try:
            pending = watcher.pending(waiter)
            unseen = [i for i in wanted if i in pending and not watcher.covers(i)]
            if unseen:
                for iid, state in (await asyncio.to_thread(self._scan, unseen)).items():
                    if state["status"] in Status.TERMINAL:
                        watcher.deliver(waiter, iid, state)
            try:
                await asyncio.wait_for(asyncio.shield(done), max(timeout, 0.0))
            except TimeoutError:
                pass
            return watcher.wait(waiter, 0)
        finally:
            watcher.unregister(waiter)

    def start_rejection(self, id: str, *, scan: bool = False) -> str | None:
        """Why the engine refused to start instance ``id``, if it did and the instance never ran.

        Args:
            id: The instance id.
            scan: Check for the instance's state by scanning the state topic (see :meth:`status`).

        Returns:
            The engine's reason from the last dead-lettered ``StartWorkflow`` for ``id`` (for
            example ``unknown workflow 'order': deploy it first``), or None when the instance
            has state or no start of it was dead-lettered.
        """
        if self.status(id, scan=scan) is not None:
            return None
        state = self._rejections([id]).get(id)
        return None if state is None else str(state["error_message"])

    def _rejections(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The last dead-lettered start per id, as ``REJECTED`` pseudo-states, read from the dlq."""
        found: dict[str, dict[str, Any]] = {}

        def take(msg: Message) -> None:
            state = _rejection(msg)
            if state is not None:
                state.pop("command_id")
                found[state["instance_id"]] = state

        self._read_keys(self.names.dlq, ids, take)
        return found

    def history(self, id: str, *, timeout: float = 10.0, scan: bool = False) -> list[Event]:
        """Every event recorded for instance ``id``, in order, read from the ``events`` topic.

        Asks the owning engine for the instance's status first (see :meth:`status`): it says
        where the instance's history starts on its ``events`` partition and the sequence number
        of its last event. The partition is read from there only until that event, so the cost
        is bounded by the instance's own lifetime (records of other instances written in between
        are read and skipped), not by the size of the topic. An instance whose state has no
        ``events_offset`` (started by an older kflow) is read by scanning the partition from the
        beginning, which is logged.

        Args:
            id: The instance id.
            timeout: Seconds to wait for the engine's status answer.
            scan: Read the id's partition from the beginning to its end instead of asking an
                engine (works with no engine running).

        Returns:
            The events, oldest first; empty when the instance does not exist.

        Raises:
            TimeoutError: no engine answered within ``timeout``; ``scan=True`` reads without one.
            BrokerUnavailable: Kafka cannot be reached, or the events could not be read in time.
        """
        if scan:
            return self._scan_history(id)
        state = self.status(id, timeout=timeout)
        if state is None:
            return []
        start = state.get("events_offset")
        if start is None:
            log.info("instance %s has no recorded events offset (started by an older kflow): "
                     "scanning its events partition from the beginning", id)
            return self._scan_history(id)
        return self._read_history(id, int(start), int(state["seq"]))

    def _read_history(self, id: str, start: int, last_seq: int) -> list[Event]:
        """The events of ``id`` from offset ``start`` of its partition up to the one numbered ``last_seq``."""
        topic, key = self.names.events, id.encode()
        by_seq: dict[int, Event] = {}  # a seq seen again after an aborted transaction: the later one counts
        with self._reader_lock:
            reader = self._end_reader()
            p = partition_for(key, self._partition_count(reader.consumer, topic))
            before = reader.records
            try:
                for msg in reader.read(topic, start={p: start}, ends={p: self._end_offset(topic, p)},
                                       timeout=self.request_timeout, what=f"reading {topic}[{p}] from offset {start}"):
                    if msg.key() == key and msg.value() is not None:
                        ev = self._decode_event(msg)
                        if ev is not None:
                            by_seq[ev.seq] = ev
                            if ev.seq == last_seq:
                                break
            finally:
                self.records_read += reader.records - before
        return [by_seq[s] for s in sorted(by_seq)]

    def _scan_history(self, id: str) -> list[Event]:
        """The events of ``id`` read from its partition's beginning to the high watermark."""
        by_seq: dict[int, Event] = {}

        def take(msg: Message) -> None:
            ev = self._decode_event(msg)
            if ev is not None:
                by_seq[ev.seq] = ev

        self._read_keys(self.names.events, [id], take)
        return [by_seq[s] for s in sorted(by_seq)]

    @staticmethod
    def _decode_event(msg: Message) -> Event | None:
        try:
            return decode_event(msg.value())
        except KflowError as exc:
            log.warning("skipping undecodable event %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
            return None

    def _scan(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Latest state record per id, read from the ids' state partitions up to the high watermark."""
        found: dict[str, dict[str, Any]] = {}

        def take(msg: Message) -> None:
            try:
                state = decode_state(msg.value())
            except KflowError as exc:
                log.warning("skipping undecodable state record %s[%d]@%d: %s", msg.topic(), msg.partition(),
                            msg.offset(), exc)
            else:
                found[state["instance_id"]] = state

        self._read_keys(self.names.state, ids, take)
        return found

    def _scan_engine(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Latest status record per id (as a ``QueryStatus`` answer: the public fields, ``events_offset``
        and the engine's state as ``internal``), read from the ids' ``engine-state`` partitions."""
        found: dict[str, dict[str, Any]] = {}

        def take(msg: Message) -> None:
            try:
                iid, state = decode_engine_state(msg.value())
            except KflowError as exc:
                log.warning("skipping undecodable engine-state record %s[%d]@%d: %s", msg.topic(), msg.partition(),
                            msg.offset(), exc)
            else:
                found[iid] = status_record(state)

        self._read_keys(self.names.engine_state, ids, take)
        return found

    def limit_counters(self) -> dict[str, dict[str, Any]]:
        """The state of every quota and limit counter (keys ``limit:...``), by key.

        Read from the whole ``engine-state`` topic to its high watermark (an operator's view: ``kflow
        queues``); each value is the counter's state with ``held``, ``queue`` and ``tokens``.
        """
        self._ensure_ready()
        topic, found = self.names.engine_state, {}
        with EndReader(self.config.consumer_conf(f"kflow-client-scan-{uuid.uuid4().hex}", **self._conf()),
                       timeout=self.connect_timeout) as reader:
            partitions = reader.partitions(topic)
            ends = {p: self._end_offset(topic, p) for p in partitions}
            try:
                for msg in reader.read(topic, ends=ends, timeout=self.request_timeout, what=f"reading {topic}"):
                    key = msg.key()
                    if key and key.startswith(b"limit:") and msg.value() is not None:
                        iid, state = decode_engine_state(msg.value())
                        found[iid] = state
            finally:
                self.records_read += reader.records
        return found

    def _read_keys(self, topic: str, ids: list[str], take: Callable[[Message], None]) -> None:
        """Call ``take`` for every record keyed by one of ``ids`` in their partitions of ``topic``,
        from the beginning to the high watermark."""
        self._ensure_ready()
        wanted = {i.encode() for i in ids}
        with EndReader(self.config.consumer_conf(f"kflow-client-scan-{uuid.uuid4().hex}", **self._conf()),
                       timeout=self.connect_timeout) as reader:
            partitions = reader.partitions(topic)
            if not partitions:
                raise KflowError(f"topic '{topic}' has no partitions")
            wanted_partitions = sorted({partition_for(i.encode(), len(partitions)) for i in ids})
            ends = {p: self._end_offset(topic, p) for p in wanted_partitions}
            try:
                for msg in reader.read(topic, ends=ends, timeout=self.request_timeout,
                                       what=f"reading {topic} partitions {sorted(ends)}"):
                    if msg.key() in wanted and msg.value() is not None:
                        take(msg)
            finally:
                self.records_read += reader.records

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Flush queued commands, stop the state watcher. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watcher, producer, definitions = self._watcher, self._producer, self._definitions
            self._watcher = self._producer = self._definitions = None
        if definitions is not None:
            definitions.close()
        with self._reader_lock:
            consumers, self._reader, self._marks = (self._reader, self._marks), None, None
        for consumer in consumers:
            if consumer is not None:
                consumer.close()
        try:
            if producer is not None:
                left = producer.flush(self.request_timeout)
                if left:
                    log.warning("closing the client with %d undelivered record(s)", left)
                if hasattr(producer, "close"):  # confluent-kafka >= 2.13; older ones free it when collected
                    producer.close()
        finally:
            if watcher is not None:
                watcher.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.config.bootstrap!r}, topic_prefix={self.names.prefix!r})"
