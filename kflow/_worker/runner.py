r"""The worker's processing loop: consume tasks, run activities concurrently, report results, commit.

One consumer per queue the worker serves reads its ``tasks.<queue>`` topic in the group
``<prefix>worker.<queue>`` that every worker of the queue shares, whatever else each serves (see
:mod:`kflow._worker.consumers`); the consumers share the execution slots and the producer. At
most ``concurrency`` activities run at once, and up to as many more fetched tasks wait in a
queue for a slot. Each result is produced by the activity's own thread; its delivery report
(served by this loop) marks the task's offset finished, and only the contiguous prefix of
finished offsets per partition is committed (by the consumer of its topic), so a crash re-runs
unfinished tasks and never skips one (at-least-once per attempt).

The fetched tasks waiting for a slot (up to ``read_ahead`` of them) are a
:class:`kflow._worker.fairness.ReadAhead`: each free slot starts the task it picks by priority
level (with starvation promotion) and, within a queue and level, by weighted round robin across
fairness keys. Out-of-order starts are safe because only the finished prefix is committed.

Cancel tasks (``kind="cancel"``, sent by the engine when it no longer wants an attempt) take no
room: a full worker keeps reading, so a cancel overtakes the tasks queued ahead of it in other
partitions. A cancel marks the named running attempt cancelled (see :meth:`Executors.cancel`),
removes a queued one before it starts, and is otherwise ignored; its offset is finished at once.

::

              room: poll up to `room` records (free slots + free queue places)
             +-----------+
             v           |
    start -> FETCHING ---+---(slots and queue full)---> FULL: wait for a slot
               ^                                              |            |
               |<----------------(a slot frees)---------------+            | (none for
               |                                                           |  _FULL_GRACE)
               +--(a slot frees: resume every partition)--- READING ON <---+
                          (cancels are applied; a task to run is put back and
                           its partition paused until a slot frees)

    any state --(stop requested)--> DRAINING: paused; in-flight activities get
        shutdown_timeout --> flush results --> commit (sync) --> close the consumer

In every state the loop serves delivery reports, sends automatic heartbeats for quiet
activities, and commits what became committable at most every ``_COMMIT_INTERVAL`` seconds.
A rebalance commits the revoked partitions' finished prefix and drops their tracking; results
of activities still running for them are produced anyway (the engine de-duplicates).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Message, TopicPartition

from kflow import _hops, _tracing
from kflow._worker import metrics
from kflow._worker.consumers import Callback, QueueConsumers
from kflow._worker.context import ActivityCancelledError, ActivityContext
from kflow._worker.execution import Executors, Job
from kflow._worker.fairness import FairnessSettings, Picked, ReadAhead
from kflow._worker.offsets import PartitionOffsets
from kflow._worker.output import (
    Out,
    Outbox,
    Record,
    attempt_headers,
    dead_letter_headers,
    fail_command,
    progress_headers,
    result_command,
    weak_callback,
)
from kflow._worker.priority import Policy, next_level
from kflow.clock import Clock, SystemClock
from kflow.model.errors import DecodeError
from kflow.model.messages import NORMAL_PRIORITY, Command, Task
from kflow.schemas.codec import decode_task
from kflow.streams.activities import Registry
from kflow.streams.topics import level_topics

__all__ = ["Loop"]

log = logging.getLogger("kflow.worker")

_COMMIT_INTERVAL = 0.2  # seconds between asynchronous commits of committable offsets
_POLL_BUSY = 0.02  # consumer poll timeout while activities run: bounds slot-release latency
_POLL_IDLE = 0.1  # consumer poll timeout with nothing running
_FULL_GRACE = 0.5  # a full worker reads on (pausing partitions with tasks to run) when no slot frees for this long
_PAUSED_WAIT = 0.1  # while full, wait this long for a slot between heartbeat and commit checks
_FULL_BATCH = 100  # most records read at once by a full worker (to find cancels)
_COMMITTED_TIMEOUT = 2.0  # seconds to read committed offsets of partitions a choice of level must count
_UNKNOWN = -1  # the start of a partition whose committed offset could not be read
_FLUSH_SECONDS = 10.0  # how long a stopping worker waits for its results to be delivered

_HEADERS_ALLOWANCE = 1024  # bytes kept free for the key, headers and framing of a DLQ record

TP = tuple[str, int]


class Loop:
    """One run of a worker: owns the consumers, the outbox, the executors and offset tracking.

    Everything here runs on the thread that called :meth:`run`, except :meth:`_report`, which
    runs on the activity's thread.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        topics: dict[str, str],
        commands_topic: str,
        dlq_topic: str,
        consumer_confs: dict[str, dict[str, Any]],
        producer_conf: dict[str, Any],
        concurrency: int,
        heartbeat_interval: float,
        shutdown_timeout: float,
        should_stop: Callable[[], bool],
        on_assigned: Callable[[], None],
        priority_policy: Policy = "weighted",
        read_ahead: int | None = None,
        fairness: FairnessSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.registry = registry
        levels = {topic: level_topics(topic) for topic in topics}
        self.topics = {t: queue for topic, queue in topics.items() for t in levels[topic]}  # task topic -> queue
        self._level_of = {t: level for by_topic in levels.values() for t, level in by_topic.items()}
        self._unassigned = set(topics)  # queues' task topics whose consumer never had an assignment yet
        self.commands_topic = commands_topic
        self.dlq_topic = dlq_topic
        self.concurrency = concurrency
        self.heartbeat_interval = heartbeat_interval
        self.shutdown_timeout = shutdown_timeout
        self.should_stop = should_stop
        self.on_assigned = on_assigned
        self._running: dict[int, Job] = {}
        #: Tasks read ahead (at most ``read_ahead``, default ``concurrency``), waiting for a slot.
        self.read_ahead = concurrency if read_ahead is None else read_ahead
        self._clock = clock or SystemClock()
        self._queued: ReadAhead[Job] = ReadAhead(
            dataclasses.replace(fairness or FairnessSettings(), policy=priority_policy), self._clock)
        self._rewound: set[TP] = set()  # partitions sought back during the current batch
        self._offsets: dict[TP, PartitionOffsets] = {}
        self._paused = False
        self._paused_tps: set[TP] = set()  # partitions paused by this loop
        #: Set by the first task of a level other than normal: from then on a saturated worker
        #: chooses which level to read and run (until then it works exactly as without levels).
        self._levels_seen = False
        self.priority_policy = priority_policy
        self._lag: dict[int, int] = {}  # tasks known to wait on the broker per level, as of the last choice
        self._starts: dict[TP, int] = {}  # where partitions not read from yet resume (see _waiting)
        self._full_since: float | None = None
        self._last_commit = 0.0
        self._last_beat_scan = 0.0
        self._draining = False  # stopping: every task to run is put back
        # Incremental (cooperative) rebalancing assigns added partitions; eager replaces the set.
        any_conf = next(iter(consumer_confs.values()))
        strategy = str(any_conf.get("partition.assignment.strategy", ""))
        self._incremental = "cooperative" in strategy or str(any_conf.get("group.protocol", "")) == "consumer"
        self.outbox = Outbox(producer_conf, commands_topic)
        self.consumer = QueueConsumers({
            topic: {**conf, "enable.auto.commit": False, "on_commit": weak_callback(self._on_commit),
                    "error_cb": weak_callback(self._on_consumer_error)}
            for topic, conf in consumer_confs.items()}, levels)
        kinds = {d.is_async for acts in registry.values() for d in acts.values()}
        self.executors = Executors(concurrency, False in kinds, True in kinds, self._report)

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        """Consume and run tasks until ``should_stop()``, then shut down gracefully."""
        try:
            self.consumer.subscribe(self._assign_callback, self._on_revoke, self._on_lost)
            while not self.should_stop():
                self._step()
        finally:
            self._shutdown()

    def _step(self) -> None:
        self._settle_finished(0)
        self.outbox.serve()
        self._dispatch()
        room = self._room()
        if room > 0:
            self._full_since = None
            if self._levels_seen:
                self._choose_level()
            elif self._paused:
                self._resume()
            self._fetch(room)
            self._dispatch()
        else:
            now = time.monotonic()
            if self._full_since is None:
                self._full_since = now
            if not self._settle_finished(_PAUSED_WAIT) and now - self._full_since >= _FULL_GRACE:
                self._read_while_full()
        now = time.monotonic()
        self._auto_heartbeats(now)
        metrics.refresh(self.consumer)
        if now - self._last_commit >= _COMMIT_INTERVAL:
            self._commit(asynchronous=True)
            self._last_commit = now

    def _fetch(self, room: int) -> None:
        batch = self.consumer.fetch(room, _POLL_BUSY if self._running else _POLL_IDLE)
        if not batch:
            return
        self._rewound.clear()
        for m in batch:
            self._handle(m)

    def _room(self) -> int:
        """Tasks to run this worker can still take: free slots plus free queue places."""
        return self.concurrency + self.read_ahead - len(self._running) - len(self._queued)

    def _dispatch(self) -> None:
        """Start read-ahead jobs while slots are free, each the one the read-ahead picks next.

        The level choice is among the levels read ahead; its credit counts every level known to
        have work, on the broker too, so a level that waits there is owed its turn.
        """
        while self._queued and len(self._running) < self.concurrency:
            picked = self._queued.pop(self._lag if self._levels_seen else None)
            metrics.READ_AHEAD.dec()
            job = picked.item
            self._started(job, picked)
            self._running[id(job)] = job
            metrics.INFLIGHT.inc()
            metrics.task_started(job.task)
            _tracing.task_received(id(job), job.msg.headers() if job.msg is not None else None)
            self.executors.start(job)

    def _started(self, job: Job, picked: Picked[Job]) -> None:
        """Record the queue wait of a starting job, and its promotion if it was chosen at a more urgent level."""
        metrics.queue_wait(job.queue, picked.level, picked.unit[1], picked.waited_ms / 1000)
        if picked.promoted:
            metrics.PROMOTIONS.labels(job.queue, str(picked.level), str(picked.served_at)).inc()
            t = job.task
            log.info("activity %s (%s, attempt %d) of instance %s promoted from level %d to %d after waiting %d ms",
                     t.name, t.activity_id, t.attempt, t.instance_id, picked.level, picked.served_at,
                     picked.waited_ms)

    def _read_while_full(self) -> None:
        """Read what is fetched without room to run it: cancels are applied, tasks put back.

        Also serves rebalance callbacks. Once every partition has a task put back, all are
        paused and this reads nothing until :meth:`_resume`.
        """
        self._rewound.clear()
        for m in self.consumer.consume(_FULL_BATCH):
            self._handle(m)

    def _rewind(self, msg: Message) -> None:
        """Put a task back for lack of room: its partition is sought to it and paused."""
        self._rewound.add((msg.topic(), msg.partition()))
        tp = TopicPartition(msg.topic(), msg.partition(), msg.offset())
        self.consumer.pause([TopicPartition(msg.topic(), msg.partition())])
        self._paused_tps.add((msg.topic(), msg.partition()))
        self._paused = True
        try:
            self.consumer.seek(tp)
        except KafkaException as exc:
            # No longer assigned: its next owner starts from the committed offset anyway.
            log.debug("cannot rewind %s[%d] to %d: %s", msg.topic(), msg.partition(), msg.offset(), exc)

    def _pause(self) -> None:
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(assignment)
            self._paused_tps.update((tp.topic, tp.partition) for tp in assignment)
        self._paused = True

    def _resume(self) -> None:
        """There is room again: read on from every partition."""
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.resume(assignment)
            self._restart(assignment)
        self._paused_tps.clear()
        self._paused = False

    def _restart(self, partitions: list[TopicPartition]) -> None:
        """Seek ``partitions`` to their current position: a resumed one fetches at once (librdkafka
        notices a resume on its fetcher's next wake-up, up to a second away), a paused one drops
        what it had fetched ahead (read again when it is resumed)."""
        for tp in self.consumer.position(partitions):
            if tp.offset >= 0:
                try:
                    self.consumer.seek(tp)
                except KafkaException as exc:
                    log.debug("cannot restart fetching %s[%d]: %s", tp.topic, tp.partition, exc)

    def _choose_level(self) -> None:
        """Read only the level the priority policy serves next, among the levels with tasks waiting.

        Waiting tasks per partition are its cached high watermark minus its position (a paused
        partition's watermark is as of its pause: it has at least the task put back). Partitions
        of the other levels with tasks waiting are paused, so the next fetch brings the chosen
        level; partitions with nothing waiting stay open, so new work anywhere is noticed.
        """
        assignment = self.consumer.assignment()
        lag = self._waiting(assignment)
        by_level: dict[int, int] = {}
        for tp, n in lag.items():
            by_level[self._level_of[tp[0]]] = by_level.get(self._level_of[tp[0]], 0) + n
        self._lag = by_level
        level = next_level(by_level, self.priority_policy, self._queued.credit)
        hold = {tp for tp, n in lag.items() if n > 0 and self._level_of[tp[0]] != level}
        resume = [TopicPartition(t, p) for t, p in self._paused_tps - hold]
        pause = [TopicPartition(t, p) for t, p in hold - self._paused_tps]
        if resume:
            self.consumer.resume(resume)
        if pause:
            self.consumer.pause(pause)
        if resume or pause:
            self._restart(resume + pause)
        self._paused_tps = hold
        self._paused = bool(hold)

    def _waiting(self, assignment: list[TopicPartition]) -> dict[TP, int]:
        """Tasks not yet read per assigned partition, from cached watermarks.

        A partition nothing was read from yet has no position: it is counted from where its
        group resumes it (its committed offset, else its first offset), asked once. If that cannot
        be asked, it counts as nothing waiting: it is then never held back, only not preferred.
        """
        out: dict[TP, int] = {}
        unread = []
        for tp in self.consumer.position(assignment):
            key = (tp.topic, tp.partition)
            offset = tp.offset if tp.offset >= 0 else self._starts.get(key)
            low, high = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)
            if offset is None:
                unread.append(key)
                continue
            out[key] = max(high - max(offset, low), 0) if high >= 0 and offset != _UNKNOWN else 0
        if unread:
            self._starts.update(self._start_offsets(unread))
        return out

    def _start_offsets(self, tps: list[TP]) -> dict[TP, int]:
        """Where the group resumes ``tps``: the committed offset, else (a new group) the first one."""
        try:
            committed = self.consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=_COMMITTED_TIMEOUT)
        except KafkaException as exc:
            log.debug("cannot read committed offsets: %s", exc)
            return dict.fromkeys(tps, _UNKNOWN)
        return {(tp.topic, tp.partition): max(tp.offset, 0) for tp in committed}

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
            return  # fetched before a revocation took effect: not ours to run or commit
        if (topic, partition) in self._rewound:
            return  # behind a record put back in this batch: it is fetched again after it
        try:
            task: Task | None = decode_task(msg.value())
            problem = ""
        except DecodeError as exc:
            task, problem = None, exc.reason
        level = self._level_of[topic]
        if level != NORMAL_PRIORITY:
            self._levels_seen = True
        if task is not None and task.kind == "cancel":
            if offsets.add(offset):
                self._cancel(task)
                offsets.finish(offset)  # nothing is produced for a cancel
            return
        if self._draining or self._room() <= 0:
            self._rewind(msg)
            return
        if not offsets.add(offset):
            return
        record = Record(offsets, offset)
        queue = self.topics[topic]
        if task is None:
            self._dead_letter(msg, record, f"undecodable task: {problem}")
            metrics.TASKS.labels(queue, metrics.UNDECODABLE, metrics.Outcome.UNDECODABLE).inc()
            return
        if task.kind != "run":
            self._dead_letter(msg, record, f"unknown task kind '{task.kind}' (expected 'run' or 'cancel')")
            metrics.TASKS.labels(queue, metrics.UNDECODABLE, metrics.Outcome.UNDECODABLE).inc()
            return
        definition = self.registry.get(queue, {}).get(task.name)
        if definition is None:
            self._unknown_activity(msg, record, task, queue)
            return
        notify = partial(self._notify, task)  # start and heartbeat reports
        kind, ts = msg.timestamp()
        self._queued.push(Job(definition, task, queue, record, ActivityContext(task, notify), msg,
                              received_us=_hops.now_us(), level=level),
                          level=level, key=task.fairness_key or "", queue=queue,
                          arrived_ms=ts if kind != TIMESTAMP_NOT_AVAILABLE and ts > 0 else None)
        metrics.READ_AHEAD.inc()

    def _notify(self, task: Task, cmd: Command) -> None:
        """Produce a start or heartbeat report of ``task``'s attempt, with its progress token (made
        here: most attempts never report progress)."""
        self.outbox.notify(cmd, headers=progress_headers(task) or None)

    def _cancel(self, task: Task) -> None:
        """Apply a cancel task to the attempt it names, if this worker has it (running or queued)."""
        key = (task.instance_id, task.activity_id, task.attempt)
        where = f"activity {task.name} ({task.activity_id}, attempt {task.attempt})"
        running = [j for j in self._running.values() if j.attempt_key == key and not j.ctx.cancelled]
        queued = self._queued.remove(lambda j: j.attempt_key == key)
        metrics.READ_AHEAD.dec(len(queued))
        if not running and not queued:
            log.debug("cancel of %s ignored: not running here", where)
            return
        metrics.ACTIVITIES_CANCELLED.labels(task.name).inc()
        for job in running:
            log.info("cancelling %s: the engine no longer wants it", where)
            self.executors.cancel(job)
        for job in queued:
            log.info("cancelled %s before it started: the engine no longer wants it", where)
            job.record.offsets.finish(job.record.offset)  # never started: nothing to report

    def _unknown_activity(self, msg: Message, record: Record, task: Task, queue: str) -> None:
        known = ", ".join(sorted(self.registry.get(queue, {}))) or "none"
        reason = f"unknown activity '{task.name}' on queue '{queue}' (registered: {known})"
        record.remaining += 1  # the FailActivity, counted before the DLQ record's delivery can finish the record
        self._dead_letter(msg, record, reason)
        value = fail_command(task, "UnknownActivity", reason, False)
        self.outbox.produce(Out(self.commands_topic, task.instance_id.encode(), value, record,
                                attempt_headers(task) or None), counted=True)
        metrics.TASKS.labels(queue, metrics.UNREGISTERED, metrics.Outcome.UNKNOWN_ACTIVITY).inc()

    def _dead_letter(self, msg: Message, record: Record, reason: str) -> None:
        log.warning("task %s[%d]@%d sent to %s: %s", msg.topic(), msg.partition(), msg.offset(), self.dlq_topic, reason)
        metrics.dead_lettered(reason)
        self.outbox.produce(Out(self.dlq_topic, msg.key(), msg.value() or b"", record, dead_letter_headers(msg, reason)))

    # ------------------------------------------------------------------ finished activities

    def _report(self, job: Job, result: Any, error: BaseException | None) -> None:
        """Activity thread: encode and produce the outcome of ``job``.

        An attempt the engine cancelled that ended by raising (``ActivityCancelledError``,
        ``asyncio.CancelledError`` or anything else) is a non-retryable ``Cancelled`` failure.
        """
        t = job.task
        if error is not None and job.ctx.cancelled:
            why = str(error) if isinstance(error, ActivityCancelledError) else str(ActivityCancelledError(
                t.activity_id, t.attempt, t.name))
            value, job.outcome = fail_command(t, "Cancelled", why, False), metrics.Outcome.CANCELLED
            log.info("activity %s (%s, attempt %d) stopped after its cancel: %s", t.name, t.activity_id,
                     t.attempt, type(error).__name__)
        else:
            value, job.outcome = result_command(t, result, error)
            if error is not None:
                log.info("activity %s (%s, attempt %d) failed: %s: %s", t.name, t.activity_id,
                         t.attempt, type(error).__name__, error)
        headers = _tracing.activity_done(id(job), job.task, job.duration, error)
        if job.msg is not None and _hops.asked(job.msg.headers()):
            headers = [*(headers or ()), _hops.stamp("W", job.received_us)]
        headers = [*(headers or ()), *attempt_headers(t)] or None
        out = Out(self.commands_topic, job.task.instance_id.encode(), value, job.record, headers,
                  partial(self._undeliverable, job))
        job.record.remaining += 1  # before producing: the delivery report must find it counted
        if not self.outbox.try_produce(out):
            job.unsent = out
        job.reported = True

    def _settle_finished(self, timeout: float) -> bool:
        """Free the slots of finished jobs, waiting up to ``timeout`` for the first; True if any."""
        job = self.executors.next_finished(timeout)
        if job is None:
            return False
        while job is not None:
            self._settle(job)
            job = self.executors.next_finished(0)
        return True

    def _undeliverable(self, job: Job, out: Out, reason: str) -> None:
        """Loop thread: ``out``, the result of ``job``, was rejected for good; replace it.

        The task goes to the DLQ (with the undelivered command as a header when that fits) and
        the engine gets a small non-retryable ``ResultUndeliverable`` failure of the attempt.
        """
        t, msg = job.task, job.msg
        assert msg is not None, "a result of a job without its task record"
        cmd_type = "CompleteActivity" if job.outcome == metrics.Outcome.COMPLETED else "FailActivity"
        why = (f"undeliverable result: the {cmd_type} of activity '{t.name}' ({t.activity_id}, attempt "
               f"{t.attempt}, {len(out.value)} bytes) was rejected by Kafka: {reason}")
        log.error("%s; task %s[%d]@%d goes to %s and the attempt is reported failed (ResultUndeliverable)",
                  why, msg.topic(), msg.partition(), msg.offset(), self.dlq_topic)
        metrics.RESULTS_UNDELIVERABLE.labels(t.name).inc()
        metrics.dead_lettered(why)
        value = msg.value() or b""
        headers = [*dead_letter_headers(msg, why), ("kflow.undelivered.type", cmd_type.encode())]
        fallback = None
        if len(value) + len(out.value) + len(why) + _HEADERS_ALLOWANCE <= self.outbox.max_message_bytes:
            full = [*headers, ("kflow.undelivered.command", out.value)]
            fallback = partial(self._dead_letter_plain, headers)
            self.outbox.produce(Out(self.dlq_topic, msg.key(), value, job.record, full, fallback))
        else:
            self.outbox.produce(Out(self.dlq_topic, msg.key(), value, job.record, headers))
        failed = fail_command(t, "ResultUndeliverable", why, False)
        self.outbox.produce(Out(self.commands_topic, out.key, failed, job.record, attempt_headers(t) or None))

    def _dead_letter_plain(self, headers: list[tuple[str, bytes]], out: Out, reason: str) -> None:
        """Loop thread: a DLQ record with the undelivered command did not fit; send it without."""
        log.warning("dlq record of %r too large with its undelivered command (%s); sent without it", out.key, reason)
        self.outbox.produce(Out(out.topic, out.key, out.value, out.record, headers))

    def _settle(self, job: Job) -> None:
        self._running.pop(id(job), None)
        metrics.INFLIGHT.dec()
        if not job.reported:
            return
        metrics.TASKS.labels(job.queue, job.definition.name, job.outcome).inc()
        metrics.ACTIVITY_SECONDS.labels(job.definition.name).observe(job.duration)
        if job.unsent is not None:
            self.outbox.produce(job.unsent, counted=True)

    def _auto_heartbeats(self, now: float) -> None:
        if now - self._last_beat_scan < min(0.1, self.heartbeat_interval / 4):
            return
        self._last_beat_scan = now
        for job in list(self._running.values()):
            if not job.reported and not job.ctx.cancelled and job.ctx.due(now, self.heartbeat_interval):
                job.ctx.beat(None, automatic=True)

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

    def _on_consumer_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("fatal consumer error: %s", err)
        else:
            log.debug("consumer: %s", err)

    def _assign_callback(self, topic: str) -> Callback:
        """The assign callback of the consumer of ``topic``."""
        def on_assign(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            self._on_assign(topic, consumer, partitions)
        return on_assign

    def _on_assign(self, topic: str, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._offsets[(tp.topic, tp.partition)] = PartitionOffsets()
        if self._incremental:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if self._paused and partitions:
            consumer.pause(partitions)
            self._paused_tps.update((tp.topic, tp.partition) for tp in partitions)
        log.info("assigned %s", _describe(partitions) if partitions else f"nothing of {topic}")
        self._unassigned.discard(topic)
        if not self._unassigned:  # every queue's consumer has joined its group
            self.on_assigned()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        self._settle_finished(0)
        self.outbox.flush(time.monotonic() + 5)  # delivered results make their offsets committable
        self._commit(asynchronous=False, only=revoked)
        self._drop(revoked)
        log.info("revoked %s", _describe(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop([(tp.topic, tp.partition) for tp in partitions])
        log.warning("lost %s", _describe(partitions))

    def _drop(self, tps: list[TP]) -> None:
        """Forget partitions: their queued tasks never start here (their next owner runs them)."""
        for tp in tps:
            self._offsets.pop(tp, None)
        gone = set(tps)
        self._paused_tps -= gone
        for tp in gone:
            self._starts.pop(tp, None)
        dropped = self._queued.remove(lambda j: j.msg is not None and (j.msg.topic(), j.msg.partition()) in gone)
        metrics.READ_AHEAD.dec(len(dropped))

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self) -> None:
        """Stop fetching, wait (bounded) for in-flight activities, flush, commit, leave the group."""
        flushed = False
        try:
            self._pause()
            self._draining = True
            metrics.READ_AHEAD.dec(len(self._queued))
            self._queued.clear()  # never started: re-delivered to the group's next owner
            deadline = time.monotonic() + self.shutdown_timeout
            while self._running and time.monotonic() < deadline:
                self._settle_finished(min(0.1, max(0.0, deadline - time.monotonic())))
                self.outbox.serve()
                self._auto_heartbeats(time.monotonic())
                self._read_while_full()
            if self._running:
                log.warning("%d activities still running after %.1fs; their tasks will be re-delivered",
                            len(self._running), self.shutdown_timeout)
            flushed = self.outbox.flush(time.monotonic() + _FLUSH_SECONDS)
            if not flushed:
                log.warning("results not delivered within %.0fs; their tasks will be re-delivered", _FLUSH_SECONDS)
            self._commit(asynchronous=False)
        finally:
            try:
                self.consumer.close()
            finally:
                self.executors.close()
                self.outbox.close(flushed)
                metrics.INFLIGHT.dec(len(self._running))
                self._running.clear()


def _describe(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
