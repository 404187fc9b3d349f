"""The engine processor: consume commands, decide, and commit every output in one transaction.

::

    ┌────────────┐ assign  ┌───────────┐ restored ┌────────────────────────────────────────────┐
    │ JOINING    ├────────►│ RESTORING ├─────────►│ RUNNING: poll ─► decide ─► produce ─►      │
    └────────────┘         └───────────┘          │   send offsets ─► commit ─► write RocksDB  │
          ▲  revoke: close stores, drop caches        └──────┬─────────────────────────────────────┘
          └───────────────────────────────────────────────┘ stop: finish batch, leave group

The consumer that owns partition *p* of ``commands`` is the only writer of the state of every
instance on *p*. One batch = one Kafka transaction holding the events, the state changelog
records, the tasks, the commands for other instances, DLQ records and the consumed offsets.
RocksDB is written only after the commit, with the changelog offset in the same WriteBatch, so a
crash at any instant is repaired by restoring from the changelog. Due timers are fired by the
partition owner through the same decide/commit path, at most ``timer_batch`` per partition per
transaction so a burst of timers cannot starve commands.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
import orjson

from kflow import _tracing
from kflow.config import EngineConfig
from kflow.engine import decide
from kflow.engine.core import EVENTS_OFFSET
from kflow.model.errors import DecodeError, KflowError
from kflow.model.messages import DEFS_OFFSET_HEADER, Command, JSONDict
from kflow.schemas.codec import decode_command, encode_command, encode_event, encode_state, encode_task
from kflow.streams import metrics
from kflow.streams.definitions import DefinitionsTable
from kflow.streams.partitioner import partition_for
from kflow.streams.restore import restore_partitions
from kflow.streams.store import EngineStore, timer_key
from kflow.streams.topics import ensure_task_topic, ensure_topics

log = logging.getLogger("kflow.engine")



class SystemClock:
    def now_ms(self) -> int:
        return int(time.time() * 1000)


@dataclass
class Batch:
    """Scratch state of one transaction; discarded on abort."""

    now: int
    states: dict[str, JSONDict] = field(default_factory=dict)
    old: dict[str, Optional[JSONDict]] = field(default_factory=dict)
    partition_of: dict[str, int] = field(default_factory=dict)
    fired: dict[int, list[bytes]] = field(default_factory=dict)
    first_offsets: dict[int, int] = field(default_factory=dict)
    changelog_next: dict[int, int] = field(default_factory=dict)
    commands: int = 0
    events: int = 0
    defs_synced: bool = False
    decided: list[tuple[Optional[JSONDict], Any]] = field(default_factory=list)  # (state before, decision) for metrics


def state_record(st: JSONDict) -> dict[str, Any]:
    """The public ``state`` record of an instance (the changelog carries the full state inside)."""
    err = st.get("error") or {}
    return {"instance_id": st["id"], "workflow": st["workflow"], "version": st["version"], "status": st["status"],
            "seq": st["seq"], "started_ms": st["started_ms"], "updated_ms": st["updated_ms"],
            "closed_ms": st.get("closed_ms"), "result": st.get("result"), "error_type": err.get("type"),
            "error_message": err.get("message"), "internal": st}


def _note_first_event(batch: Batch, err: Any, msg: Message) -> None:
    """Delivery report of an event: stamp an instance new in ``batch`` with its first event's offset.

    Reports of one partition arrive in offset order, so the first one per instance is its first event."""
    iid = msg.key().decode()
    st = batch.states.get(iid)
    if err is None and st is not None and batch.old.get(iid) is None:
        st.setdefault(EVENTS_OFFSET, msg.offset())


class EngineProcessor:
    """Runs the engine for the partitions of ``commands`` the consumer group assigns to it."""

    def __init__(self, config: EngineConfig, clock: Any = None,
                 compile_code: Optional[Callable[[Any], Any]] = None) -> None:
        self.config = config
        self.names = config.names
        self.clock = clock or SystemClock()
        self.store = EngineStore(config.state_dir, config.cache_size)
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._compile_code = compile_code
        self._known_queues: set[str] = set()
        self._next_due: dict[int, Optional[int]] = {}
        self.defs: DefinitionsTable
        self.consumer: Consumer
        self.producer: Producer

    # -- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self, stop_event: Optional[threading.Event] = None) -> None:
        """Process until ``stop()`` (or ``stop_event``) — finishing the open batch — then leave the group."""
        if stop_event is not None:
            self._stop = stop_event
        self._setup()
        try:
            while not self._stop.is_set():
                self.run_once()
        finally:
            self._shutdown()

    def _setup(self) -> None:
        cfg = self.config
        ensure_topics(cfg.client_conf(), self.names, cfg.topic_settings, queues=["default"])
        self._known_queues.add("default")
        compile_code, hosted = self._compile_code, []
        if cfg.workflows:
            # Code workflows are hosted, not deployed as data: import the modules and register
            # their definitions before the first command is decided.
            from kflow._workflow import code_definitions, compile_code as registered_code

            hosted = code_definitions(cfg.workflows)
            compile_code = compile_code or registered_code
        self.defs = DefinitionsTable(cfg.consumer_conf("kflow-definitions"), self.names.definitions, compile_code)
        self.defs.limits = cfg.limits()
        self.defs.catch_up(10)
        self.defs.host(hosted, cfg.producer_conf(), self.clock.now_ms())
        tid = f"{self.names.prefix}engine-{cfg.resolved_engine_id()}"
        self.producer = Producer(cfg.producer_conf(**{
            "transactional.id": tid, "transaction.timeout.ms": cfg.transaction_timeout_ms,
            "linger.ms": 5, "queue.buffering.max.messages": 1_000_000, "acks": "all"}))
        self.producer.init_transactions(30)
        # session, heartbeat, poll interval and static identity: EngineConfig.group_conf
        self.consumer = Consumer(cfg.consumer_conf(f"{self.names.prefix}engine", **cfg.group_conf()))
        self.consumer.subscribe([self.names.commands], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_revoke)
        log.info("engine %s started: topics prefix '%s', %d partitions, state dir %s, %d definitions",
                 tid, self.names.prefix, cfg.partitions, cfg.state_dir, len(self.defs))

    def _shutdown(self) -> None:
        log.info("engine stopping: leaving the group and closing stores")
        try:
            self.consumer.close()
        finally:
            self.producer.flush(10)
            self.store.close_all()
            self.defs.close()
            self.ready.clear()

    # -- rebalances ------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        t0 = time.monotonic()
        per_partition = max(1, self.config.cache_size // max(1, self.config.partitions))
        conf = self.config.consumer_conf("kflow-restore")
        stores = [self.store.open(tp.partition, per_partition) for tp in partitions]
        # every assigned partition is restored together, by one consumer, before any is processed
        for stats in restore_partitions(conf, self.names.state, stores).values():
            if stats.records:
                metrics.RESTORE_SECONDS.observe(stats.seconds)
        for sp in stores:
            self._next_due[sp.partition] = sp.next_due()  # one seek of the due-date index, no scan
        metrics.REBALANCES.labels("assign").inc()
        metrics.ASSIGNED.set(len(self.store.partitions))
        log.info("assigned partitions %s (restored in %.2fs)", sorted(tp.partition for tp in partitions),
                 time.monotonic() - t0)
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.store.close(tp.partition)
            self._next_due.pop(tp.partition, None)
        metrics.REBALANCES.labels("revoke").inc()
        metrics.ASSIGNED.set(len(self.store.partitions))
        log.info("revoked partitions %s", sorted(tp.partition for tp in partitions))

    # -- the loop ----------------------------------------------------------------------------
    def run_once(self) -> int:
        """Poll once and, if there is work, process it in one transaction. Returns commands handled."""
        # poll() returns as soon as one command is there; consume(n, 0) then drains what the
        # client already fetched. (consume(n, t) alone would wait t whenever fewer than n arrive.)
        first = self.consumer.poll(self.config.poll_timeout_ms / 1000)
        msgs = [first] if first is not None else []
        if first is not None and self.config.max_batch > 1:
            msgs.extend(self.consumer.consume(self.config.max_batch - 1, 0))
        self.defs.poll(0)
        metrics.refresh(self)
        now = self.clock.now_ms()
        timers = self._due_timers(now)
        if not msgs and not timers:
            return 0
        return self._process(msgs, timers, now)

    def _due_timers(self, now: int) -> list[tuple[int, int, str, str]]:
        out = []
        for p, nd in list(self._next_due.items()):
            if nd is None or nd > now or p not in self.store.partitions:
                continue
            sp = self.store.get(p)
            for due, iid, tid in sp.due_timers(now, self.config.timer_batch):
                out.append((p, due, iid, tid))
        return out

    def _process(self, msgs: list[Message], timers: list[tuple[int, int, str, str]], now: int) -> int:
        """The commit protocol, in order: (1) decide the batch and produce its outputs, (2) send
        the consumed offsets to the transaction, (3) commit, (4) write RocksDB with the changelog
        offsets. Any failure before (3) aborts the transaction and rewinds the consumer."""
        t0 = time.perf_counter()
        batch = Batch(now)
        self.producer.begin_transaction()
        try:
            for m in msgs:  # (1)
                if m.error():
                    if m.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", m.error())
                    continue
                p = m.partition()
                batch.first_offsets.setdefault(p, m.offset())
                try:
                    cmd = decode_command(m.value(), m.headers())
                except DecodeError as e:
                    self._dlq(m, e.reason, now)
                    continue
                if partition_for(cmd.instance_id, self.config.partitions) != p:
                    self._dlq(m, f"misrouted: key '{cmd.instance_id}' belongs to partition "
                                 f"{partition_for(cmd.instance_id, self.config.partitions)}, not {p} "
                                 "(produce with the murmur2 partitioner)", now)
                    continue
                self._decide(batch, p, cmd, m)
            for p, due, iid, tid in timers:
                batch.fired.setdefault(p, []).append(timer_key(due, iid, tid))
                self._decide(batch, p, Command("FireTimer", iid, {"timer_id": tid}, f"timer:{tid}", now), None)
                metrics.TIMER_LATENESS.observe(max(0, now - due) / 1000)
            self._stamp_events_offsets(batch)
            self._produce_states(batch)
            self.producer.flush()
            if msgs:  # (2)
                positions = self.consumer.position(self.consumer.assignment())
                self.producer.send_offsets_to_transaction(positions, self.consumer.consumer_group_metadata())
            t1 = time.perf_counter()
            self.producer.commit_transaction()  # (3)
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - t1)
        except KafkaException as e:
            self._abort(batch, e)
            return 0
        for p in set(batch.partition_of.values()) | set(batch.fired):  # (4)
            if p not in self.store.partitions:
                continue
            sp = self.store.get(p)
            states = {iid: st for iid, st in batch.states.items() if batch.partition_of[iid] == p}
            sp.write(states, batch.old, batch.changelog_next.get(p), batch.fired.get(p, ()))
            self._next_due[p] = sp.next_due()
        metrics.BATCH_SIZE.observe(batch.commands)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)
        metrics.record_batch(batch.decided, now, time.perf_counter() - t0, batch.commands)
        return batch.commands

    def _abort(self, batch: Batch, e: KafkaException) -> None:
        err = e.args[0] if e.args else None
        if isinstance(err, KafkaError) and err.fatal():
            raise KflowError(f"fatal Kafka error, this engine must restart: {err}") from e
        log.warning("transaction aborted (%s); rewinding %d partitions", err, len(batch.first_offsets))
        try:
            self.producer.abort_transaction(30)
        except KafkaException as e2:
            raise KflowError(f"could not abort the transaction: {e2}") from e2
        for p, off in batch.first_offsets.items():
            self.consumer.seek(TopicPartition(self.names.commands, p, off))
        metrics.ABORTS.inc()

    # -- one command ------------------------------------------------------------------------
    def _decide(self, batch: Batch, p: int, cmd: Command, m: Optional[Message]) -> None:
        iid = cmd.instance_id
        if iid in batch.states:
            st: Optional[JSONDict] = batch.states[iid]
        else:
            st = self.store.get(p).get(iid)
            batch.old.setdefault(iid, st)
        if cmd.type == "StartWorkflow":
            self._sync_definitions(batch, cmd, m)
        t_ns = time.time_ns()
        d = decide(st, cmd, batch.now, self.defs)
        batch.commands += 1
        metrics.command(cmd.type)
        if d.dlq_reason:
            if m is not None:
                self._dlq(m, d.dlq_reason, batch.now)
            return
        for qid, answer in d.replies:  # in this transaction: the asker sees it once the batch commits
            self.producer.produce(self.names.replies, orjson.dumps({"query_id": qid, "instance_id": iid, **answer}),
                                  qid.encode())
        if not d.events:
            return
        assert d.state is not None
        batch.states[iid] = d.state
        batch.partition_of[iid] = p
        produce = self.producer.produce
        for ev in d.events:
            produce(self.names.events, encode_event(ev), iid.encode(), partition=p,
                    on_delivery=functools.partial(_note_first_event, batch))
            metrics.event(ev.type)
        batch.events += len(d.events)
        batch.decided.append((st, d))
        headers = _tracing.engine_step(cmd.type, iid, m.headers() if m is not None else None, d.state, d.events, t_ns)
        for task in d.tasks:
            if task.queue not in self._known_queues:
                ensure_task_topic(self.config.client_conf(), self.names, self.config.topic_settings, task.queue)
                self._known_queues.add(task.queue)
            produce(self.names.tasks(task.queue), encode_task(task), iid.encode(), headers=headers)
        for c in d.commands:
            produce(self.names.commands, encode_command(c), c.instance_id.encode(), headers=headers)

    def _sync_definitions(self, batch: Batch, cmd: Command, m: Optional[Message]) -> None:
        """Make the definitions table current enough to decide this start.

        A client that deployed puts its deploy's offset in a header: the table is read at least
        that far (read-your-deploys, no round trip when it already is). A start naming a workflow
        or version the table does not know reads the table to its high watermark, once per batch.
        """
        needed = -1
        for k, v in (m.headers() or []) if m is not None else []:
            if k == DEFS_OFFSET_HEADER:
                try:
                    needed = int(v)
                except (TypeError, ValueError):
                    pass
        if needed >= 0:
            self.defs.read_through(needed, 5)
        name, version = cmd.data.get("workflow"), cmd.data.get("version")
        if version is None:
            version = self.defs.latest(name)
        if not batch.defs_synced and (version is None or self.defs.get(name, version) is None):
            self.defs.catch_up(2)
            batch.defs_synced = True

    def _stamp_events_offsets(self, batch: Batch) -> None:
        """Give each instance new in this batch the offset of its first event, before its state is produced.

        The offsets come from the events' delivery reports, so the events are flushed first; only
        a batch that starts an instance pays that round trip. The state carrying the offset is
        written in this same transaction as the events."""
        if any(batch.old.get(iid) is None and EVENTS_OFFSET not in st for iid, st in batch.states.items()):
            self.producer.flush()  # serves the delivery reports: _note_first_event stamps the states

    def _produce_states(self, batch: Batch) -> None:
        """One changelog record per changed instance per batch (latest wins), offsets tracked."""
        def on_delivery(err: Any, msg: Message) -> None:
            if err is None:
                p = msg.partition()
                batch.changelog_next[p] = max(batch.changelog_next.get(p, 0), msg.offset() + 1)
        for iid, st in batch.states.items():
            self.producer.produce(self.names.state, encode_state(state_record(st)), iid.encode(),
                                  partition=batch.partition_of[iid], on_delivery=on_delivery)

    def _dlq(self, m: Message, reason: str, now: int) -> None:
        log.warning("dead-lettered %s[%d]@%d: %s", m.topic(), m.partition(), m.offset(), reason)
        headers = [("kflow.reason", reason.encode()), ("kflow.original.topic", m.topic().encode()),
                   ("kflow.original.partition", str(m.partition()).encode()),
                   ("kflow.original.offset", str(m.offset()).encode()), ("kflow.time", str(now).encode())]
        headers += [(k, v) for k, v in (m.headers() or []) if not k.startswith("kflow.")]
        self.producer.produce(self.names.dlq, m.value() or b"", m.key(), headers=headers)
        metrics.DLQ.labels(reason.split(" ")[0].split(":")[0][:32]).inc()
