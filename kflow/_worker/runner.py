r"""The worker's processing loop: consume tasks, run activities concurrently, report results, commit.

One consumer (group ``<prefix>worker.<queues joined by +>``) reads the ``tasks.<queue>`` topics of
every queue the worker serves. Sync activities run in a thread pool and async ones on one event
loop in a background thread, at most ``concurrency`` at a time. Each result is produced as a
command by the activity's own thread; its delivery report (served by this loop) marks the task's
offset finished, and only the contiguous prefix of finished offsets per partition is committed,
so a crash re-runs unfinished tasks and never skips one (at-least-once per attempt).

::

                 +-------------------------------------------------------------+
                 v                                                             |
    start --> FETCHING --(in-flight == concurrency)--> FULL --(no slot for    |
                 ^   \                                  |      a moment)--> PAUSED
                 |    \--(slot frees)<------------------+                     |
                 +--------------(slot frees: resume every partition)----------+
    any state --(stop requested)--> DRAINING: paused, waiting for in-flight activities
              (bounded by shutdown_timeout) --> flush producer --> commit --> close consumer

In every state the loop serves delivery reports, sends automatic heartbeats for quiet
activities and commits committable offsets at most every ``_COMMIT_INTERVAL`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from kflow._worker import metrics
from kflow._worker.context import ActivityContext, bind, unbind
from kflow._worker.offsets import PartitionOffsets
from kflow._worker.registry import ActivityDefinition, Registry
from kflow.model.errors import DecodeError, NonRetryableError
from kflow.model.messages import Command, Task
from kflow.schemas.codec import decode_task, encode_command

log = logging.getLogger("kflow.worker")

_COMMIT_INTERVAL = 0.2  # seconds between asynchronous commits of committable offsets
_POLL_BUSY = 0.02  # consumer poll timeout while activities run: bounds slot-release latency
_POLL_IDLE = 0.1  # consumer poll timeout with nothing running
_FULL_GRACE = 1.0  # how long a full worker waits for a slot before pausing its partitions
_PAUSED_WAIT = 0.1  # while paused, wait this long for a slot between heartbeat and commit checks
_PAUSED_POLL_EVERY = 0.5  # while paused, poll this often to serve rebalances and stay in the group
_MAX_MESSAGE_CHARS = 4000  # failure messages are cut to this length

TP = tuple[str, int]


@dataclass(slots=True, eq=False)
class _Record:
    """One consumed task record and the outputs still awaiting delivery before it counts as finished."""

    offsets: PartitionOffsets
    offset: int
    remaining: int = 0


@dataclass(slots=True, eq=False)
class _Out:
    """One record to produce on behalf of a consumed record."""

    topic: str
    key: bytes | None
    value: bytes
    record: _Record
    headers: list[tuple[str, bytes]] | None = None


@dataclass(slots=True, eq=False)
class _Job:
    """One activity attempt handed to a thread or the event loop."""

    definition: ActivityDefinition
    task: Task
    queue: str
    record: _Record
    ctx: ActivityContext
    outcome: str = ""
    duration: float = 0.0
    unsent: _Out | None = None  # set when the producer queue was full; the loop produces it
    done: bool = field(default=False)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 1] + "…"


def result_command(task: Task, result: Any = None, error: BaseException | None = None) -> tuple[bytes, str]:
    """Encode the command reporting one attempt's outcome; returns ``(value, outcome label)``."""
    ident = {"activity_id": task.activity_id, "attempt": task.attempt}
    cid = f"{task.activity_id}/{task.attempt}/result"
    if error is None:
        try:
            cmd = Command("CompleteActivity", task.instance_id, {**ident, "result": result}, cid, _now_ms())
            return encode_command(cmd), metrics.Outcome.COMPLETED
        except ValueError as exc:
            data = {**ident, "error_type": "InvalidResult", "retryable": False,
                    "message": _cut(f"activity '{task.name}' returned a value that is not JSON-serialisable: {exc}")}
            outcome = metrics.Outcome.INVALID_RESULT
    elif isinstance(error, NonRetryableError):
        data = {**ident, "error_type": str(error.type), "message": _cut(str(error.message)), "retryable": False}
        outcome = metrics.Outcome.NON_RETRYABLE
    else:
        data = {**ident, "error_type": type(error).__name__, "message": _cut(str(error) or repr(error)),
                "retryable": True}
        outcome = metrics.Outcome.FAILED
    return encode_command(Command("FailActivity", task.instance_id, data, cid, _now_ms())), outcome


class Loop:
    """One run of a worker: owns the consumer, producer, executors and offset tracking.

    Every method not marked otherwise runs on the thread that called :meth:`run`; the
    activity threads only call :meth:`_produce_result`, :meth:`send_heartbeat` and put finished
    jobs on ``_finished``.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        topics: dict[str, str],
        commands_topic: str,
        dlq_topic: str,
        group_id: str,
        consumer_conf: dict[str, Any],
        producer_conf: dict[str, Any],
        concurrency: int,
        heartbeat_interval: float,
        shutdown_timeout: float,
        should_stop: Callable[[], bool],
        on_assigned: Callable[[], None],
    ) -> None:
        self.registry = registry
        self.topics = topics  # task topic -> queue
        self.commands_topic = commands_topic
        self.dlq_topic = dlq_topic
        self.group_id = group_id
        self.concurrency = concurrency
        self.heartbeat_interval = heartbeat_interval
        self.shutdown_timeout = shutdown_timeout
        self.should_stop = should_stop
        self.on_assigned = on_assigned
        self._finished: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._running: dict[int, _Job] = {}
        self._offsets: dict[TP, PartitionOffsets] = {}
        self._retry: list[_Out] = []
        self._fatal: KafkaException | None = None
        self._paused = False
        self._last_commit = 0.0
        self._last_beat_scan = 0.0
        self._last_paused_poll = 0.0
        # Incremental (cooperative) rebalancing assigns added partitions; eager replaces the set.
        self._incremental = "cooperative" in str(consumer_conf.get("partition.assignment.strategy", "")) or (
            str(consumer_conf.get("group.protocol", "")).lower() == "consumer"
        )
        self.producer = Producer({**producer_conf, "error_cb": self._on_kafka_error})
        self.consumer = Consumer(
            {**consumer_conf, "enable.auto.commit": False, "on_commit": self._on_commit,
             "error_cb": self._on_kafka_error}
        )
        has_sync = any(not d.is_async for acts in registry.values() for d in acts.values())
        has_async = any(d.is_async for acts in registry.values() for d in acts.values())
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="kflow-activity") if has_sync else None
        self._aio: asyncio.AbstractEventLoop | None = None
        self._aio_thread: threading.Thread | None = None
        if has_async:
            self._aio = asyncio.new_event_loop()
            self._aio_thread = threading.Thread(target=self._aio.run_forever, name="kflow-activity-loop", daemon=True)

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        """Consume and run tasks until ``should_stop()``, then shut down gracefully."""
        if self._aio_thread is not None:
            self._aio_thread.start()
        self.consumer.subscribe(
            list(self.topics), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        try:
            while not self.should_stop():
                self._step()
        finally:
            self._shutdown()

    def _step(self) -> None:
        self._drain_finished()
        self._serve_producer()
        free = self.concurrency - len(self._running)
        if free > 0:
            if self._paused:
                self._resume()
            self._fetch(free)
        elif not self._wait_finished(_FULL_GRACE if not self._paused else _PAUSED_WAIT):
            if not self._paused:
                self._pause()
            self._poll_while_paused()
        now = time.monotonic()
        self._auto_heartbeats(now)
        if now - self._last_commit >= _COMMIT_INTERVAL:
            self._commit(asynchronous=True)
            self._last_commit = now

    def _fetch(self, free: int) -> None:
        msg = self.consumer.poll(_POLL_BUSY if self._running else _POLL_IDLE)
        if msg is None:
            return
        batch = [msg]
        if free > 1:
            batch.extend(self.consumer.consume(free - 1, 0))
        for m in batch:
            self._handle(m)

    def _poll_while_paused(self) -> None:
        """Serve rebalance callbacks while full; rewind anything fetched before the pause took hold."""
        now = time.monotonic()
        if now - self._last_paused_poll < _PAUSED_POLL_EVERY:
            return
        self._last_paused_poll = now
        msg = self.consumer.poll(0)
        if msg is not None and not self._is_error(msg):
            self._rewind(msg)
        if self._paused:
            self._pause()  # partitions assigned during this poll start unpaused

    def _rewind(self, msg: Message) -> None:
        """Put an unwanted message back: the partition is sought to it and paused."""
        tp = TopicPartition(msg.topic(), msg.partition(), msg.offset())
        self.consumer.pause([TopicPartition(msg.topic(), msg.partition())])
        try:
            self.consumer.seek(tp)
        except KafkaException as exc:
            # The partition is no longer assigned; its new owner starts from the committed offset.
            log.debug("cannot rewind %s[%d] to %d: %s", msg.topic(), msg.partition(), msg.offset(), exc)

    def _pause(self) -> None:
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(assignment)
        self._paused = True

    def _resume(self) -> None:
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.resume(assignment)
        self._paused = False

    # ------------------------------------------------------------------ one record

    def _is_error(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return False
        if err.fatal():
            raise KafkaException(err)
        log.warning("consumer error: %s", err)
        return True

    def _handle(self, msg: Message) -> None:
        if self._is_error(msg):
            return
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        offsets = self._offsets.get((topic, partition))
        if offsets is None:
            # Fetched before a revocation took effect: not ours to run or commit.
            return
        if len(self._running) >= self.concurrency:
            self._rewind(msg)
            return
        if not offsets.add(offset):
            return
        record = _Record(offsets, offset)
        queue_name = self.topics[topic]
        try:
            task = decode_task(msg.value())
        except DecodeError as exc:
            self._dead_letter(msg, record, f"undecodable task: {exc.reason}")
            metrics.TASKS.labels(queue_name, metrics.UNDECODABLE, metrics.Outcome.UNDECODABLE).inc()
            return
        definition = self.registry.get(queue_name, {}).get(task.name)
        if definition is None:
            self._unknown_activity(msg, record, task, queue_name)
            return
        self._start(_Job(definition, task, queue_name, record, ActivityContext(task, self.send_heartbeat)))

    def _unknown_activity(self, msg: Message, record: _Record, task: Task, queue_name: str) -> None:
        known = ", ".join(sorted(self.registry.get(queue_name, {}))) or "none"
        reason = f"unknown activity '{task.name}' on queue '{queue_name}' (registered: {known})"
        record.remaining += 1  # the FailActivity below, counted before the DLQ record can finish
        self._dead_letter(msg, record, reason)
        data = {"activity_id": task.activity_id, "attempt": task.attempt, "error_type": "UnknownActivity",
                "message": reason, "retryable": False}
        cid = f"{task.activity_id}/{task.attempt}/result"
        value = encode_command(Command("FailActivity", task.instance_id, data, cid, _now_ms()))
        self._produce(_Out(self.commands_topic, task.instance_id.encode(), value, record), counted=True)
        metrics.TASKS.labels(queue_name, metrics.UNREGISTERED, metrics.Outcome.UNKNOWN_ACTIVITY).inc()

    def _dead_letter(self, msg: Message, record: _Record, reason: str) -> None:
        headers = [
            ("kflow.reason", reason.encode()),
            ("kflow.original.topic", msg.topic().encode()),
            ("kflow.original.partition", str(msg.partition()).encode()),
            ("kflow.original.offset", str(msg.offset()).encode()),
            ("kflow.time", str(_now_ms()).encode()),
        ]
        log.warning("task %s[%d]@%d sent to %s: %s", msg.topic(), msg.partition(), msg.offset(), self.dlq_topic, reason)
        self._produce(_Out(self.dlq_topic, msg.key(), msg.value() or b"", record, headers))

    # ------------------------------------------------------------------ running activities

    def _start(self, job: _Job) -> None:
        self._running[id(job)] = job
        metrics.INFLIGHT.inc()
        if job.definition.is_async:
            assert self._aio is not None
            asyncio.run_coroutine_threadsafe(self._run_async(job), self._aio)
        else:
            assert self._pool is not None
            self._pool.submit(self._run_sync, job)

    def _run_sync(self, job: _Job) -> None:
        """Activity thread: run a sync activity and report its outcome."""
        token = bind(job.ctx)
        started = time.monotonic()
        try:
            result = job.definition.fn(job.task.input)
        except Exception as exc:  # the activity's failure is reported, not raised
            self._report(job, started, error=exc)
        else:
            self._report(job, started, result=result)
        finally:
            unbind(token)
            self._finished.put(job)

    async def _run_async(self, job: _Job) -> None:
        """Event-loop thread: run an async activity and report its outcome."""
        token = bind(job.ctx)
        started = time.monotonic()
        try:
            result = await job.definition.fn(job.task.input)
        except asyncio.CancelledError:
            raise  # shutdown: no result, the task is re-delivered from the uncommitted offset
        except Exception as exc:
            self._report(job, started, error=exc)
        else:
            self._report(job, started, result=result)
        finally:
            unbind(token)
            self._finished.put(job)

    def _report(self, job: _Job, started: float, result: Any = None, error: BaseException | None = None) -> None:
        """Activity thread: encode and produce the result command."""
        job.duration = time.monotonic() - started
        value, job.outcome = result_command(job.task, result, error)
        if error is not None:
            log.info("activity %s (%s, attempt %d) failed: %s: %s", job.task.name, job.task.activity_id,
                     job.task.attempt, type(error).__name__, error)
        out = _Out(self.commands_topic, job.task.instance_id.encode(), value, job.record)
        job.record.remaining += 1
        try:
            self._produce_raw(out)
        except BufferError:
            job.unsent = out  # the loop produces it once the producer queue has room
        job.done = True

    def _drain_finished(self) -> None:
        while True:
            try:
                job = self._finished.get_nowait()
            except queue.Empty:
                return
            self._settle(job)

    def _wait_finished(self, timeout: float) -> bool:
        """Block until an activity finishes (True) or ``timeout`` passes (False)."""
        try:
            job = self._finished.get(timeout=timeout)
        except queue.Empty:
            return False
        self._settle(job)
        self._drain_finished()
        return True

    def _settle(self, job: _Job) -> None:
        self._running.pop(id(job), None)
        metrics.INFLIGHT.dec()
        if not job.done:
            return  # cancelled at shutdown
        metrics.TASKS.labels(job.queue, job.definition.name, job.outcome).inc()
        metrics.ACTIVITY_SECONDS.labels(job.definition.name).observe(job.duration)
        if job.unsent is not None:
            self._produce(job.unsent, counted=True)

    # ------------------------------------------------------------------ heartbeats

    def send_heartbeat(self, cmd: Command) -> None:
        """Any thread: produce a heartbeat command; raises ValueError for bad details."""
        value = encode_command(cmd)
        try:
            self.producer.produce(self.commands_topic, value, cmd.instance_id.encode(), on_delivery=self._on_heartbeat)
        except BufferError:
            log.warning("producer queue full: heartbeat of activity %s dropped", cmd.data.get("activity_id"))

    def _on_heartbeat(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            log.warning("heartbeat not delivered: %s", err)

    def _auto_heartbeats(self, now: float) -> None:
        if now - self._last_beat_scan < min(0.1, self.heartbeat_interval / 4):
            return
        self._last_beat_scan = now
        for job in list(self._running.values()):
            if not job.done and job.ctx.due(now, self.heartbeat_interval):
                job.ctx.beat(None, automatic=True)

    # ------------------------------------------------------------------ producing

    def _produce_raw(self, out: _Out) -> None:
        """Any thread: hand ``out`` to the producer; raises BufferError when its queue is full."""
        self.producer.produce(
            out.topic, out.value, out.key, headers=out.headers,
            on_delivery=lambda err, msg, out=out: self._on_delivery(out, err),  # type: ignore[misc]
        )

    def _produce(self, out: _Out, counted: bool = False) -> None:
        """Produce ``out``, waiting for room in the producer queue; ``counted`` if already in ``remaining``."""
        if not counted:
            out.record.remaining += 1
        while True:
            try:
                self._produce_raw(out)
                return
            except BufferError:
                self.producer.poll(0.05)

    def _on_delivery(self, out: _Out, err: KafkaError | None) -> None:
        """Delivery report (served on the loop's thread by ``producer.poll``/``flush``)."""
        if err is None:
            out.record.remaining -= 1
            if out.record.remaining == 0:
                out.record.offsets.finish(out.record.offset)
            return
        if err.fatal():
            self._fatal = KafkaException(err)
            return
        log.error("delivery to %s failed, producing again: %s", out.topic, err)
        self._retry.append(out)

    def _serve_producer(self) -> None:
        self.producer.poll(0)
        if self._fatal is not None:
            raise self._fatal
        retry, self._retry = self._retry, []
        for out in retry:
            self._produce(out, counted=True)

    def _on_kafka_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = KafkaException(err)
            log.error("fatal Kafka error: %s", err)
        elif err.code() != KafkaError._ALL_BROKERS_DOWN:
            log.debug("Kafka error: %s", err)
        else:
            log.warning("Kafka error: %s", err)

    # ------------------------------------------------------------------ offsets and rebalances

    def _commit(self, asynchronous: bool, only: list[TP] | None = None) -> None:
        todo = [(tp, o) for tp, o in self._offsets.items() if (only is None or tp in only) and o.dirty]
        if not todo:
            return
        positions = [TopicPartition(t, p, o.committable) for (t, p), o in todo]
        try:
            self.consumer.commit(offsets=positions, asynchronous=asynchronous)
        except KafkaException as exc:
            log.warning("commit failed (the next commit covers it): %s", exc)
            return
        for _, o in todo:
            o.committed = o.committable

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:
            log.warning("offset commit failed: %s", err)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._offsets[(tp.topic, tp.partition)] = PartitionOffsets()
        if self._incremental:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if self._paused and partitions:
            consumer.pause(partitions)
        log.info("assigned %s", _describe(partitions))
        self.on_assigned()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        self.producer.flush(5)  # deliver finished results so their offsets can be committed now
        self._commit(asynchronous=False, only=revoked)
        self._drop(revoked)
        log.info("revoked %s", _describe(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop([(tp.topic, tp.partition) for tp in partitions])
        log.warning("lost %s", _describe(partitions))

    def _drop(self, tps: list[TP]) -> None:
        # Activities still running for these partitions finish and report; their offsets belong
        # to the partition's next owner, which re-runs them (the engine de-duplicates results).
        for tp in tps:
            self._offsets.pop(tp, None)

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self) -> None:
        """Stop fetching, wait (bounded) for in-flight activities, flush, commit, leave the group."""
        try:
            self._pause()
            deadline = time.monotonic() + self.shutdown_timeout
            while self._running and time.monotonic() < deadline:
                self._wait_finished(min(0.1, max(0.0, deadline - time.monotonic())))
                self._serve_producer()
                self._poll_while_paused()
            if self._running:
                log.warning("%d activities still running after %.1fs; their tasks will be re-delivered",
                            len(self._running), self.shutdown_timeout)
            self._flush(deadline=time.monotonic() + 10)
            self._commit(asynchronous=False)
        finally:
            self.consumer.close()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            if self._aio is not None and self._aio_thread is not None:
                self._aio.call_soon_threadsafe(self._cancel_async)
                self._aio_thread.join(5)
            metrics.INFLIGHT.dec(len(self._running))
            self._running.clear()

    def _flush(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._drain_finished()
            left = self.producer.flush(max(0.0, min(1.0, deadline - time.monotonic())))
            if self._fatal is not None:
                raise self._fatal
            retry, self._retry = self._retry, []
            for out in retry:
                self._produce(out, counted=True)
            if left == 0 and not retry:
                return
        log.warning("producer not flushed within its deadline; unconfirmed results are produced again on re-delivery")

    def _cancel_async(self) -> None:
        assert self._aio is not None
        for t in asyncio.all_tasks(self._aio):
            t.cancel()
        self._aio.call_soon(self._aio.stop)


def _describe(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
