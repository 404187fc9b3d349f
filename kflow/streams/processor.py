"""The engine processor: consume commands, decide, and commit every output in one transaction.

::

    ┌────────────┐ assign  ┌───────────┐ restored ┌────────────────────────────────────────────┐
    │ JOINING    ├────────►│ RESTORING ├─────────►│ RUNNING: poll ─► route to lanes; each lane: │
    └────────────┘         └───────────┘          │   decide ─► produce ─► send offsets ─►      │
          ▲  revoke: lanes finish, close stores       │   commit ─► write RocksDB ─► cancels        │
          └───────────────────────────────────────────┴──────┬───────────────────────────────────┘
                                                              stop: lanes finish, leave group

The consumer that owns partition *p* of ``commands`` is the only writer of the state of every
instance on *p*. This thread polls and routes each record to the lane of its partition
(:mod:`kflow.streams.lane`); a lane runs the commit protocol for its partitions in its own Kafka
transaction, so partitions commit side by side instead of queueing behind one another's broker
round trips. One batch = one transaction holding the events, the state changelog records, the
tasks, the commands for other instances, DLQ records and the consumed offsets. RocksDB is written
only after the commit, with the changelog offset in the same WriteBatch, so a crash at any instant
is repaired by restoring from the changelog. Due timers are fired by the lane of their partition
through the same decide/commit path, at most ``timer_batch`` per partition per transaction so a
burst of timers cannot starve commands.

With auth on, each lane checks every command it reads with the engine's
:class:`~kflow.security.guard.CommandGuard` against the policy of the ``policies`` table
(:mod:`kflow.streams.policies`, polled by this thread), and the token ids each partition accepted
(:class:`~kflow.security.guard.SeenTokens`) are loaded from its restored store on assignment.

With standby replicas (:mod:`kflow.streams.standby`) the stores of partitions this engine does not
own are kept warm by a background thread. An assigned partition's store is taken from it before
restore (so restore replays only the tail the standby had not applied), and a revoked or lost
partition's store goes back to it instead of being closed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Optional, cast

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from kflow import _hops
from kflow.config import EngineConfig
from kflow.engine.code_cache import ReplayCache
from kflow.engine.registry import WorkflowRegistry, default_registry
from kflow.model.errors import KflowError
from kflow.security.guard import SEEN_KEY_PREFIX, CommandGuard, SeenTokens
from kflow.streams import metrics
from kflow.streams.definitions import DefinitionsTable
from kflow.streams.lane import Batch, Lane, state_record
from kflow.streams.limits import LimitsTable
from kflow.streams.policies import PolicyTable
from kflow.streams.restore import RestoreStats, check_engine_state_upgraded, restore_partitions
from kflow.streams.standby import StandbyReplicas
from kflow.streams.store import JOURNAL_PREFIX, EngineStore, RawItems, StorePartition
from kflow.streams.topics import ensure_task_topic, ensure_topics

__all__ = ["Batch", "EngineProcessor", "SystemClock", "state_record"]

log = logging.getLogger("kflow.engine")

#: Seconds between two reads of the global tables (definitions, limits, policies) by the polling
#: thread: a change counts within about that long. Where sooner matters a lane reads a table itself:
#: a start carries its deploy's offset and a start naming an unknown workflow reads the definitions
#: to their end; before refusing a command as forbidden a lane reads the policies to their end.
#: Reading the policies on every poll cost about 5 % of the CPU of a saturated bench.
TABLES_POLL_S = 0.1


class SystemClock:
    def now_ms(self) -> int:
        return int(time.time() * 1000)


class EngineProcessor:
    """Runs the engine for the partitions of ``commands`` the consumer group assigns to it."""

    def __init__(self, config: EngineConfig, clock: Any = None,
                 compile_code: Optional[Callable[[Any], Any]] = None, registry: Optional[WorkflowRegistry] = None) -> None:
        self.config = config
        #: the code workflows and migration transforms this engine hosts (the decorators fill the default one)
        self.registry = registry if registry is not None else default_registry
        #: this engine's live code-workflow machines, read by the engine through its definitions table
        self.replay_cache = ReplayCache()
        self.names = config.names
        self.clock = clock or SystemClock()
        self.store = EngineStore(config.state_dir, config.cache_size)
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._compile_code = compile_code
        self._known_queues: set[str] = set()
        #: next due timer per owned partition; written by the partition's lane after each commit
        self.next_due: dict[int, Optional[int]] = {}
        #: Partitions being revoked or lost: lanes fire no more of their timers (their next owner
        #: will), so no lane opens work on a store the rebalance is about to close.
        self.closing: set[int] = set()
        #: serialises deciding across lanes (the engine, definitions, caches and tracing are shared)
        self.decide_lock = threading.RLock()
        self.lanes: list[Lane] = []
        self.lanes_n = max(1, config.lanes)
        self._route_lock = threading.Lock()
        self._blocked: set[int] = set()  # partitions a lane is rewinding: their records are dropped
        self._seeks: list[TopicPartition] = []
        self._moved: set[int] = set()  # partitions revoked or lost while one poll's records were read
        self.defs: DefinitionsTable
        self.quotas: LimitsTable
        self.consumer: Consumer
        self.side_producer: Producer  # cancel tasks, produced after the commit that decided them
        #: the consumer's group metadata for send_offsets_to_transaction, taken by this thread after
        #: each assignment: asking the consumer from a lane while this thread polls blocks
        self.group_metadata: Any = None
        self._metadata_stale = True
        self.per_partition_cache = max(1, config.cache_size // max(1, config.partitions))
        #: warm copies of the partitions other engines own (KFLOW_STANDBY_REPLICAS ≥ 1)
        self.standby: Optional[StandbyReplicas] = (
            StandbyReplicas(config, self.store.root, self.per_partition_cache) if config.standby_replicas else None)
        #: with auth on: the gate of every command read from Kafka, the policy it enforces, and the
        #: token ids each owned partition accepted; None / empty with auth off
        self.guard: Optional[CommandGuard] = None
        self.policies: PolicyTable
        self._tables_due = 0.0  # monotonic time of the next read of the global tables
        self.seen: dict[int, SeenTokens] = {}

    # -- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self, stop_event: Optional[threading.Event] = None) -> None:
        """Process until ``stop()`` (or ``stop_event``) — finishing the open batches — then leave the group."""
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
        # an earlier release kept the engine's state inside `state` records: refuse to start without it
        check_engine_state_upgraded(cfg.consumer_conf("kflow-restore"), self.names, cfg.partitions)
        self._known_queues.add("default")
        compile_code, hosted = self._compile_code, []
        if cfg.workflows:
            # Code workflows are hosted, not deployed as data: import the modules and register
            # their definitions before the first command is decided.
            from kflow.authoring import code_definitions

            hosted = code_definitions(cfg.workflows, self.registry)
            compile_code = compile_code or self.registry.compile_code
        self.defs = DefinitionsTable(cfg.consumer_conf("kflow-definitions"), self.names.definitions, compile_code,
                                     registry=self.registry, replay_cache=self.replay_cache)
        self.defs.limits = cfg.limits()
        self._setup_auth()  # the policy in force says whose limits records count
        self.quotas = LimitsTable(cfg.consumer_conf("kflow-limits"), self.names.limits,
                                  cfg.keys() if cfg.auth else None, lambda: self.policies.policy)
        self.quotas.catch_up(10)
        self.defs.quotas = self.quotas  # the limit counters and gates read it at decision time
        self.defs.catch_up(10)
        self.defs.host(hosted, cfg.producer_conf(), self.clock.now_ms())
        tid = f"{self.names.prefix}engine-{cfg.resolved_engine_id()}"
        for i in range(self.lanes_n):
            producer = Producer(cfg.producer_conf(**{
                "transactional.id": f"{tid}-lane{i}", "transaction.timeout.ms": cfg.transaction_timeout_ms,
                # linger 0: a task leaves for the workers as soon as it is decided, not at the commit
                "linger.ms": 0, "queue.buffering.max.messages": 1_000_000, "acks": "all"}))
            producer.init_transactions(30)
            self.lanes.append(Lane(self, i, producer))
        self.side_producer = Producer(cfg.producer_conf(**{"linger.ms": 0}))
        # session, heartbeat, poll interval and static identity: EngineConfig.group_conf
        self.consumer = Consumer(cfg.consumer_conf(f"{self.names.prefix}engine", **cfg.group_conf()))
        self.consumer.subscribe([self.names.commands], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        for lane in self.lanes:
            lane.thread.start()
        if self.standby is not None:
            self.standby.start()
        log.info("engine %s started: topics prefix '%s', %d partitions, %d lanes, state dir %s, %d definitions",
                 tid, self.names.prefix, cfg.partitions, self.lanes_n, cfg.state_dir, len(self.defs))

    def _setup_auth(self) -> None:
        """With auth on: the guard and the policies table, read to its end before any command.
        With auth off (and not a dev stack), one warning that says what that means."""
        cfg = self.config
        if not cfg.auth:
            if not cfg.dev_tuning:
                log.warning("auth is off: anyone who can write to %s can start, signal, cancel or terminate any "
                            "workflow and complete any activity; set KFLOW_AUTH=on (with KFLOW_JWT_SECRET) on every "
                            "process, see docs/security.md", self.names.commands)
            return
        keys = cfg.keys()
        # the guard first: a missing or unusable key is a start-up error before anything connects
        self.guard = CommandGuard(keys, lambda: self.policies.policy, cfg.topic_settings.commands_retention_ms / 1000)
        self.policies = PolicyTable(cfg.consumer_conf("kflow-policies"), self.names.policies, keys)
        self.policies.catch_up(10)
        log.info("auth is on: commands need a signed token (%s), results their attempt's token; policy from %s",
                 "/".join(sorted(keys.algorithms)),
                 f"{self.names.policies}@{self.policies.offset}" if self.policies.offset >= 0 else "nowhere yet (empty)")

    def _shutdown(self) -> None:
        log.info("engine stopping: finishing open batches, leaving the group and closing stores")
        try:
            for lane in self.lanes:
                lane.wait_idle(stop=True)
            self.consumer.close()
        finally:
            for lane in self.lanes:
                lane.producer.flush(10)
            self.side_producer.flush(10)
            if self.standby is not None:
                self.standby.stop()  # after leaving the group: the revoked stores came back to it
            self.store.close_all()
            self.defs.close()
            self.quotas.close()
            if self.guard is not None:
                self.policies.close()
            self.ready.clear()

    def known_queue(self, queue: str) -> None:
        """Create the task topic of a queue the first time a task goes to it (called under decide_lock)."""
        if queue not in self._known_queues:
            ensure_task_topic(self.config.client_conf(), self.names, self.config.topic_settings, queue)
            self._known_queues.add(queue)

    # -- rebalances ------------------------------------------------------------------------
    def _quiesce(self, partitions: list[TopicPartition], drop: bool) -> None:
        """Let every lane finish what it holds (or, with ``drop``, forget the given partitions' records)."""
        gone = {tp.partition for tp in partitions}
        for lane in self.lanes:
            if drop:
                lane.drop(gone)
            lane.wait_idle()
        self._raise_lane_error()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        t0 = time.monotonic()
        conf = self.config.consumer_conf("kflow-restore")
        # a standby's store is taken over once its tailer has stopped writing it (release waits)
        promoted = self.standby.release(tp.partition for tp in partitions) if self.standby is not None else {}
        stores = [self._adopt(tp.partition, promoted.get(tp.partition)) for tp in partitions]
        # every assigned partition is restored together, by one consumer, before any is processed:
        # a promoted standby from its stored offset, so only the tail it had not applied
        restored = restore_partitions(conf, self.names.engine_state, stores)
        for stats in restored.values():
            if stats.records:
                metrics.RESTORE_SECONDS.observe(stats.seconds)
        self._log_promoted(promoted, restored)
        for sp in stores:
            self.next_due[sp.partition] = sp.next_due()  # one seek of the due-date index, no scan
            if self.guard is not None:
                self.seen[sp.partition] = self._seen_tokens(sp)
        metrics.REBALANCES.labels("assign").inc()
        metrics.ASSIGNED.set(len(self.store.partitions))
        log.info("assigned partitions %s (restored in %.2fs)", sorted(tp.partition for tp in partitions),
                 time.monotonic() - t0)
        self._metadata_stale = True
        for lane in self.lanes:
            lane.wake()  # timers restored with the stores may already be due
        if self.standby is not None:
            self.standby.rebalanced(consumer.memberid() or "")
        self.ready.set()

    def _seen_tokens(self, sp: StorePartition) -> SeenTokens:
        """The token ids partition ``sp`` accepted, from the seen-token records of its restored store."""
        tokens = SeenTokens(self.config.replay_cache_size)
        prefix = JOURNAL_PREFIX + SEEN_KEY_PREFIX
        records: list[tuple[bytes, bytes]] = []
        for key, value in cast(RawItems, sp.db.items(from_key=prefix)):  # raw mode: bytes keys and values
            if not key.startswith(prefix):
                break
            records.append((key[len(JOURNAL_PREFIX):], value))
        tokens.load(records, self.clock.now_ms() / 1000)
        return tokens

    def _adopt(self, partition: int, sp: Optional[StorePartition]) -> StorePartition:
        """The store of an assigned partition: the standby's when it held one, else opened here."""
        if sp is None:
            return self.store.open(partition, self.per_partition_cache)
        self.store.partitions[partition] = sp
        return sp

    @staticmethod
    def _log_promoted(promoted: dict[int, StorePartition], restored: dict[int, RestoreStats]) -> None:
        for p in sorted(promoted):
            st = restored[p]
            log.info("promoted standby partition %d: replayed %d records in %.2fs (changelog offsets %d..%d)",
                     p, st.records, st.seconds, st.start_offset, st.end_offset)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._moved.update(tp.partition for tp in partitions)
        # still ours until this returns: the lanes commit what they hold before the stores close
        self.closing.update(tp.partition for tp in partitions)
        self._quiesce(partitions, drop=False)
        self._close(partitions, "revoked")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._moved.update(tp.partition for tp in partitions)
        # no longer ours: what is queued for them is dropped (a commit would be fenced anyway)
        self.closing.update(tp.partition for tp in partitions)
        self._quiesce(partitions, drop=True)
        self._close(partitions, "lost")

    def _close(self, partitions: list[TopicPartition], how: str) -> None:
        for tp in partitions:
            self.next_due.pop(tp.partition, None)
            self.seen.pop(tp.partition, None)
            if self.standby is None:
                self.store.close(tp.partition)
        if self.standby is not None:
            # back to standby, open and intact: it is a consistent prefix of its changelog
            self.standby.take_back([sp for sp in (self.store.partitions.pop(tp.partition, None) for tp in partitions)
                                    if sp is not None])
        with self._route_lock:
            self._blocked -= {tp.partition for tp in partitions}
            self._seeks = [tp for tp in self._seeks if tp.partition not in {x.partition for x in partitions}]
        self.closing -= {tp.partition for tp in partitions}
        metrics.REBALANCES.labels("revoke").inc()
        metrics.ASSIGNED.set(len(self.store.partitions))
        log.info("%s partitions %s", how, sorted(tp.partition for tp in partitions))

    # -- the loop ----------------------------------------------------------------------------
    def run_once(self) -> int:
        """Poll once and route what came to the lanes. Returns the records routed."""
        self._raise_lane_error()
        self._apply_seeks()
        self._backpressure()
        # poll() returns as soon as one command is there; consume(n, 0) then drains what the
        # client already fetched. (consume(n, t) alone would wait t whenever fewer than n arrive.)
        msgs = self._poll_batch()
        polled_us = _hops.now_us()
        if self._metadata_stale:
            self.group_metadata = self.consumer.consumer_group_metadata()
            self._metadata_stale = False
        if msgs:
            self._route(msgs, polled_us)
        now_s = time.monotonic()
        if now_s >= self._tables_due:  # each read of a (mostly idle) global table is a consumer call
            self._tables_due = now_s + TABLES_POLL_S
            self.defs.poll(0)  # a start after a deploy carries the deploy's offset: the lane reads that far
            self.quotas.poll(0)
            if self.guard is not None:
                self.policies.poll(0)  # a lane about to refuse a command reads the policies to their end
        metrics.refresh(self)
        return len(msgs)

    def _poll_batch(self) -> list[Message]:
        """The records of one poll: the first that comes, then what the client already fetched.

        A rebalance served inside ``consume`` revokes partitions after ``poll`` returned the first
        record: when that record's partition is one of them it is dropped, because its partition
        resumes (here or elsewhere) from the committed offset, which that record is not past. Kept,
        it would be decided ahead of the records read again from there (out of order, twice)."""
        first = self.consumer.poll(self.config.poll_timeout_ms / 1000)
        if first is None:
            return []
        if self.config.max_batch == 1:
            return [first]
        self._moved.clear()
        rest: list[Message] = self.consumer.consume(self.config.max_batch - 1, 0)
        if self._moved and first.partition() in self._moved:
            log.info("dropped %s[%s]@%s, read before its partition was revoked", first.topic(), first.partition(),
                     first.offset())
            return rest
        return [first, *rest]

    def _route(self, msgs: list[Message], polled_us: int) -> None:
        by_lane: dict[int, list[Message]] = {}
        n = self.lanes_n
        # filtering and handing over are one step under the route lock: a rewind (block, then drop
        # what the lane holds) can never fall between them, so a record fetched before the rewind
        # never reaches a lane after its drop, ahead of the records the seek brings back
        with self._route_lock:
            blocked = self._blocked
            for m in msgs:
                p = m.partition()
                if p is None or (blocked and p in blocked):
                    continue  # a lane is rewinding this partition: the seek brings the record back
                by_lane.setdefault(p % n, []).append(m)
            for i, batch in by_lane.items():
                self.lanes[i].submit(batch, polled_us)

    def request_rewind(self, lane: Lane, first_offsets: dict[int, int]) -> None:
        """Called by a lane whose transaction aborted: rewind its batch's partitions to their first offsets."""
        with self._route_lock:
            self._blocked |= set(first_offsets)
            self._seeks.extend(TopicPartition(self.names.commands, p, off) for p, off in first_offsets.items())
            lane.drop(set(first_offsets))

    def _apply_seeks(self) -> None:
        with self._route_lock:
            seeks, self._seeks = self._seeks, []
            for tp in seeks:
                try:
                    self.consumer.seek(tp)
                except KafkaException as e:
                    raise KflowError(f"could not rewind {tp.topic}[{tp.partition}] to {tp.offset}: {e}") from e
                self._blocked.discard(tp.partition)

    def _backpressure(self) -> None:
        """Stop polling while the lanes hold more than a few batches (bounded memory, fair latency)."""
        limit = 4 * self.config.max_batch
        while sum(lane.pending() for lane in self.lanes) > limit and not self._stop.is_set():
            self._raise_lane_error()
            time.sleep(0.001)

    def _raise_lane_error(self) -> None:
        for lane in self.lanes:
            if lane.error is not None:
                err = lane.error
                raise err if isinstance(err, KflowError) else KflowError(f"engine lane {lane.index} failed: {err!r}") from err
        if self.standby is not None and self.standby.error is not None:
            err = self.standby.error
            raise err if isinstance(err, KflowError) else KflowError(f"standby replica thread failed: {err!r}") from err
