"""A lane: one transactional producer and the thread that runs the commit protocol for its partitions.

The engine splits the partitions it owns over a few lanes (partition *p* goes to lane
``p % lanes``). Each lane decides, produces and commits its own batches in its own Kafka
transaction, so one partition's commit round trips never hold up another partition's commands:
while lane A waits for the broker (librdkafka releases the GIL), lane B decides. Deciding itself
is serialised by one lock: the pure engine, the definitions table, the code-workflow cache and the
tracing bookkeeping are shared, and Python runs one thread at a time anyway.

Single writer still holds: a partition belongs to exactly one lane, and a lane processes its
partitions' commands in offset order. A batch is one transaction holding the events, the state
changelog records, the journal changelog records (the history of code workflows, see
:class:`BatchJournal`), the tasks, the commands for other instances, the DLQ records and the
consumed offsets of its partitions. Cancel tasks are produced after the commit, outside the
transaction: workers may read tasks before they commit, and must never stop an attempt on the
word of a decision that is later aborted.

With auth on (``KFLOW_AUTH``), every command read from Kafka passes the engine's
:class:`~kflow.security.guard.CommandGuard` before ``decide``: a refused one becomes a
``CommandRejected(UNAUTHENTICATED|FORBIDDEN)`` event of its instance, or a DLQ record when there is
no instance, and an audit record either way; every granted mutating command is audited too, in
the same transaction as its decision. The token ids a batch accepted are written in the batch's
transaction, into their instances' states or else to the journal changelog (see
:meth:`~kflow.security.guard.CommandGuard.remember`), so a replay is refused after a restart as
well, and they count as seen only once it commits. Commands decided
in the batch itself (timers, local activity outcomes) are the engine's own and are not checked.

Rewinding after an aborted transaction goes through the polling thread (it owns the consumer):
the lane blocks the batch's partitions (the polling thread drops their records from then on),
forgets what it holds of them and asks for a seek; the polling thread seeks (which also purges
what the client had fetched beyond) and unblocks them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Optional

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from kflow import _hops, _tracing
from kflow.dlq import dlq_record
from kflow.engine import decide, schedules
from kflow.engine.core import EVENTS_OFFSET, OWNER, TENANT, Decision, public_state, refuse
from kflow.engine.journal import Entries, JournalOp, apply_to
from kflow.model.errors import DecodeError, KflowError
from kflow.model.messages import DEFS_OFFSET_HEADER, NORMAL_PRIORITY, Command, JSONDict, RejectCode, Task
from kflow.schemas.codec import (
    decode_command,
    encode_command,
    encode_engine_state,
    encode_event,
    encode_state,
    encode_task,
)
from kflow.security.audit import AuditOutcome
from kflow.security.guard import AUDIT_PARTITION, MUTATING, REPORTS, Check
from kflow.security.tokens import ATTEMPT_HEADER, COMMAND_HEADER
from kflow.streams import metrics
from kflow.streams.local import LocalRuns, local_activities
from kflow.streams.partitioner import partition_for
from kflow.streams.store import JournalRecord, StorePartition, journal_records, timer_key
from kflow.streams.topics import ensure_task_topic

if TYPE_CHECKING:
    from kflow.streams.processor import EngineProcessor

log = logging.getLogger("kflow.engine")

# confluent-kafka's type hints take a produced record's headers as a list[tuple[str, str | bytes | None]]
# (an invariant list: the list[tuple[str, bytes]] kflow builds does not match it, though any list of pairs
# is accepted), and give a consumed record's as that list or a dict (the consumer returns a list or None).
# The `type: ignore`s marked "headers hint" are those two; they cost nothing per command.

#: Longest a lane sleeps with nothing queued before it looks for due timers again (seconds).
IDLE_WAIT = 0.05
#: How a refusal is named in DLQ reasons, query answers and logs.
_REFUSED: dict[str, str] = {RejectCode.UNAUTHENTICATED: "Unauthenticated", RejectCode.FORBIDDEN: "Forbidden"}


@dataclass
class Batch:
    """Scratch state of one transaction; discarded on abort."""

    now: int
    polled_us: int = 0  # when the command being decided was polled (hop stamps)
    states: dict[str, JSONDict] = field(default_factory=dict)
    old: dict[str, Optional[JSONDict]] = field(default_factory=dict)
    partition_of: dict[str, int] = field(default_factory=dict)
    fired: dict[int, list[bytes]] = field(default_factory=dict)
    first_offsets: dict[int, int] = field(default_factory=dict)
    next_offsets: dict[int, int] = field(default_factory=dict)
    changelog_next: dict[int, int] = field(default_factory=dict)
    journal: dict[str, list[JournalOp]] = field(default_factory=dict)  # instance -> its journal ops, in order
    journal_records: dict[int, list[JournalRecord]] = field(default_factory=dict)  # produced, per partition
    journal_next: dict[int, int] = field(default_factory=dict)
    readers: dict[int, BatchJournal] = field(default_factory=dict)  # per partition
    cancels: list[tuple[Task, Optional[list[tuple[str, bytes]]]]] = field(default_factory=list)
    commands: int = 0
    events: int = 0
    defs_synced: bool = False
    policies_synced: bool = False  # the policies table was read to its end before a refusal
    unstamped: bool = False  # an instance started in this batch waits for its first event's offset
    decided: list[tuple[Optional[JSONDict], Any]] = field(default_factory=list)  # (state before, decision) for metrics
    hops: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # instance -> hop stamp of its state record
    audit: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, value) of the batch's audit records


def _note_first_event(batch: Batch, err: Any, msg: Message) -> None:
    """Delivery report of an instance's first event: stamp the instance with that event's offset
    (``Client.history`` reads the instance's events from there instead of the whole partition)."""
    key = msg.key()
    assert key is not None  # the engine's own event, keyed by its instance
    st = batch.states.get(key.decode())
    if err is None and st is not None:
        st.setdefault(EVENTS_OFFSET, msg.offset())


class BatchJournal:
    """The journal as ``decide`` sees it inside a batch: the partition store's committed entries,
    under the journal ops decided earlier in this batch (produced, not yet committed nor in RocksDB).
    Read only when a code workflow is rebuilt."""

    def __init__(self, store: StorePartition, pending: dict[str, list[JournalOp]]) -> None:
        self.store, self.pending = store, pending

    def read(self, instance_id: str, run: int) -> tuple[Entries, Entries]:
        inputs, commands = self.store.read_journal(instance_id, run)
        apply_to(inputs, commands, self.pending.get(instance_id, ()), instance_id, run)
        return inputs, commands


#: The public ``state`` record of an instance (the engine's whole state goes to ``engine-state``).
state_record = public_state


class Lane:
    """Runs the commit protocol for the partitions ``p`` with ``p % lanes == index``."""

    def __init__(self, proc: EngineProcessor, index: int, producer: Producer) -> None:
        self.proc, self.index, self.producer = proc, index, producer
        self.names = proc.names
        self._cond = threading.Condition()
        self._inbox: deque[tuple[Message, int]] = deque()  # (record, polled µs)
        self._busy = False
        self._stopping = False
        self.error: Optional[BaseException] = None
        self._headers_of: Optional[Message] = None  # the record whose headers _headers_read holds
        self._headers_read: Optional[list[tuple[str, bytes]]] = None
        self.thread = threading.Thread(target=self._run, name=f"kflow-lane-{index}", daemon=True)

    # -- the polling thread's side -------------------------------------------------------------
    def submit(self, msgs: list[Message], polled_us: int) -> None:
        with self._cond:
            self._inbox.extend((m, polled_us) for m in msgs)
            self._cond.notify()

    def pending(self) -> int:
        return len(self._inbox)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def wait_idle(self, stop: bool = False) -> None:
        """Block until the lane holds nothing and is not in a batch (and, with ``stop``, has exited)."""
        with self._cond:
            if stop:
                self._stopping = True
            self._cond.notify_all()
            while (self._inbox or self._busy) and self.thread.is_alive() and self.error is None:
                self._cond.wait(0.05)
        if stop:
            self.thread.join(30)

    def drop(self, partitions: set[int]) -> None:
        """Forget queued records of partitions this engine no longer owns."""
        with self._cond:
            self._inbox = deque(item for item in self._inbox if item[0].partition() not in partitions)

    def _task_topic(self, task: Task) -> str:
        """The topic of ``task``'s queue at its level; a level other than normal gets its topic on first use."""
        if task.priority is None or task.priority == NORMAL_PRIORITY:
            return self.names.tasks(task.queue)
        cfg = self.proc.config
        return ensure_task_topic(cfg.client_conf(), self.names, cfg.topic_settings, task.queue,
                                 priority=task.priority)

    # -- the lane thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._inbox and not self._stopping:
                        self._cond.wait(self._timeout())
                    if self._stopping and not self._inbox:
                        self._cond.notify_all()
                        return
                    items = self._take()
                    self._busy = True
                try:
                    self._step(items)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        except BaseException as e:  # surfaced by the polling thread, which stops the engine
            self.error = e
            with self._cond:
                self._cond.notify_all()

    def _timeout(self) -> float:
        now = self.proc.clock.now_ms()
        due = [nd for p, nd in list(self.proc.next_due.items()) if nd is not None and p % self.proc.lanes_n == self.index]
        if not due:
            return IDLE_WAIT
        return max(0.0, min(IDLE_WAIT, (min(due) - now) / 1000))

    def _take(self) -> list[tuple[Message, int]]:
        n = min(len(self._inbox), self.proc.config.max_batch)
        return [self._inbox.popleft() for _ in range(n)]

    def _step(self, items: list[tuple[Message, int]]) -> None:
        # a record fetched before its partition was revoked may still reach the lane: its next
        # owner reads it again from the committed offset, so it is dropped here
        owned, closing = self.proc.store.partitions, self.proc.closing
        items = [(m, t) for m, t in items if m.partition() in owned and m.partition() not in closing]
        msgs = [m for m, _ in items]
        now = self.proc.clock.now_ms()
        timers = self._due_timers(now)
        if not msgs and not timers:
            return
        self.process(msgs, timers, now, [t for _, t in items])

    def _due_timers(self, now: int) -> list[tuple[int, int, str, str]]:
        out = []
        store = self.proc.store
        for p, nd in list(self.proc.next_due.items()):
            if (nd is None or nd > now or p % self.proc.lanes_n != self.index or p not in store.partitions
                    or p in self.proc.closing):
                continue
            for due, iid, tid in store.get(p).due_timers(now, self.proc.config.timer_batch):
                out.append((p, due, iid, tid))
        return out

    # -- one transaction -------------------------------------------------------------------------
    def process(self, msgs: list[Message], timers: list[tuple[int, int, str, str]], now: int,
                polled_us: Optional[list[int]] = None) -> int:
        """The commit protocol, in order: (1) decide the batch and produce its outputs, (2) send
        the consumed offsets to the transaction, (3) commit, (4) write RocksDB with the changelog
        offsets, (5) produce the cancel tasks. Any failure before (3) aborts the transaction and
        rewinds the batch's partitions."""
        t0 = time.perf_counter()
        batch = Batch(now)
        proc = self.proc
        # local activities run inside this transaction: a quarter of its timeout is theirs, and
        # one run may take at most half of it (see kflow.streams.local)
        txn_ms = proc.config.transaction_timeout_ms
        self._local = LocalRuns(local_activities(proc.config.activities), now, txn_ms // 4, txn_ms // 2)
        self.producer.begin_transaction()
        try:
            with proc.decide_lock:  # (1)
                for i, m in enumerate(msgs):
                    batch.polled_us = polled_us[i] if polled_us else 0
                    self._one_record(batch, m)
                for p, due, iid, tid in timers:
                    batch.fired.setdefault(p, []).append(timer_key(due, iid, tid))
                    self._decide(batch, p, Command("FireTimer", iid, {"timer_id": tid}, f"timer:{tid}", now), None)
                    metrics.TIMER_LATENESS.observe(max(0, now - due) / 1000)
                self._stamp_events_offsets(batch)
                self._produce_states(batch)
                self._record_seen(batch)
                self._produce_journal(batch)
                self._produce_audit(batch)
            if batch.next_offsets:  # (2): what this lane consumed, not the consumer's position
                offsets = [TopicPartition(self.names.commands, p, off) for p, off in batch.next_offsets.items()]
                self.producer.send_offsets_to_transaction(offsets, proc.group_metadata)
            t1 = time.perf_counter()
            self.producer.commit_transaction()  # (3) flushes, serving the changelog delivery reports
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - t1)
        except KafkaException as e:
            self._abort(batch, e)
            return 0
        self._settle_seen(batch, committed=True)
        store = proc.store
        # (4): also partitions whose only journal records are the seen token ids, so the store
        # never skips a changelog record it reflects the offset of
        for p in set(batch.partition_of.values()) | set(batch.fired) | set(batch.journal_records):
            if p not in store.partitions:
                continue
            sp = store.get(p)
            states = {iid: st for iid, st in batch.states.items() if batch.partition_of[iid] == p}
            sp.write(states, batch.old, batch.changelog_next.get(p), batch.fired.get(p, ()),
                     batch.journal_records.get(p, ()), batch.journal_next.get(p))
            proc.next_due[p] = sp.next_due()
        for task, headers in batch.cancels:  # (5)
            proc.side_producer.produce(self._task_topic(task), encode_task(task), task.instance_id.encode(),
                                       headers=headers)  # type: ignore[arg-type]  # headers hint
        if batch.cancels:
            proc.side_producer.poll(0)
        metrics.BATCH_SIZE.observe(batch.commands)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)
        with proc.decide_lock:
            metrics.record_batch(batch.decided, now, time.perf_counter() - t0, batch.commands)
        return batch.commands

    def _one_record(self, batch: Batch, m: Message) -> None:
        err = m.error()
        if err:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err)
            return
        p, offset = m.partition(), m.offset()
        assert p is not None and offset is not None  # a consumed record without an error has both
        first = batch.first_offsets.get(p)
        if first is None:
            batch.first_offsets[p], batch.next_offsets[p] = offset, offset + 1
        elif offset >= batch.next_offsets[p]:
            batch.next_offsets[p] = offset + 1
        else:  # never expected: a partition's records reach its lane in order (EngineProcessor._route)
            log.error("%s[%d]@%d arrived after @%d in one batch: decided out of order", m.topic(), p, offset,
                      batch.next_offsets[p] - 1)
            batch.first_offsets[p] = min(first, offset)  # a rewind must still bring back everything
        try:
            cmd = decode_command(m.value(), self._headers(m))
        except DecodeError as e:
            self._dlq(m, e.reason, batch.now)
            return
        partitions = self.proc.config.partitions
        if partition_for(cmd.instance_id, partitions) != p:
            self._dlq(m, f"misrouted: key '{cmd.instance_id}' belongs to partition "
                         f"{partition_for(cmd.instance_id, partitions)}, not {p} "
                         "(produce with the murmur2 partitioner)", batch.now)
            return
        self._decide(batch, p, cmd, m)

    def _abort(self, batch: Batch, e: KafkaException) -> None:
        err = e.args[0] if e.args else None
        if isinstance(err, KafkaError) and err.fatal():
            raise KflowError(f"fatal Kafka error, this engine must restart: {err}") from e
        log.warning("transaction aborted (%s); rewinding %d partitions", err, len(batch.first_offsets))
        self._settle_seen(batch, committed=False)
        try:
            self.producer.abort_transaction(30)
        except KafkaException as e2:
            raise KflowError(f"could not abort the transaction: {e2}") from e2
        self.proc.request_rewind(self, batch.first_offsets)
        metrics.ABORTS.inc()

    # -- one command ------------------------------------------------------------------------
    def _headers(self, m: Message) -> Optional[list[tuple[str, bytes]]]:
        """``m``'s headers, read from the client once per record (each ``headers()`` call copies them,
        and a command's are asked for up to four times: decoding, the guard, definitions, tracing)."""
        if m is not self._headers_of:
            self._headers_of = m
            self._headers_read = m.headers()  # type: ignore[assignment]  # headers hint
        return self._headers_read

    def _decide(self, batch: Batch, p: int, cmd: Command, m: Optional[Message]) -> None:
        proc = self.proc
        iid = cmd.instance_id
        if iid in batch.states:
            st: Optional[JSONDict] = batch.states[iid]
        else:
            st = proc.store.get(p).get(iid)
            batch.old.setdefault(iid, st)
        check = None
        if m is not None and proc.guard is not None:  # from Kafka: anyone may have produced it
            check = self._check(batch, p, cmd, st, m)
            if not check.allowed:
                self._refuse(batch, p, cmd, st, m, check)
                return
        if cmd.type == "StartWorkflow":
            self._sync_definitions(batch, cmd, m)
            if check is not None and check.principal is not None and proc.guard is not None:
                cmd.data[TENANT] = proc.guard.starter(check.principal)[1]  # per-tenant quotas; not on the wire
        reader = batch.readers.get(p)
        if reader is None:
            reader = batch.readers[p] = BatchJournal(proc.store.get(p), batch.journal)
        t_ns = time.time_ns()
        d = decide(st, cmd, batch.now, proc.defs, reader)
        batch.commands += 1
        metrics.command(cmd.type)
        if check is not None:
            self._granted(batch, p, cmd, m, check, d)
        self._outputs(batch, p, cmd, st, d, m, t_ns)

    def _outputs(self, batch: Batch, p: int, cmd: Command, st: Optional[JSONDict], d: Decision,
                 m: Optional[Message], t_ns: int) -> None:
        """Produce what decision ``d`` of ``cmd`` outputs, in this batch's transaction."""
        proc = self.proc
        iid = cmd.instance_id
        if d.dlq_reason:
            if m is not None:
                self._dlq(m, d.dlq_reason, batch.now)
            return
        produce = self.producer.produce
        for qid, answer in d.replies:  # in this transaction: the asker sees it once the batch commits
            produce(self.names.replies, orjson.dumps({"query_id": qid, "instance_id": iid, **answer}), qid.encode())
        if not d.events:
            return
        assert d.state is not None
        batch.states[iid] = d.state
        batch.partition_of[iid] = p
        if d.state.get("kind") == schedules.KIND:  # the schedules table follows the schedule, in this transaction
            produce(self.names.schedules, schedules.table_record(d.state), d.state["spec"]["id"].encode())
        if d.journal:
            batch.journal.setdefault(iid, []).extend(d.journal)
        key = iid.encode()
        events_topic = self.names.events
        first = st is None and EVENTS_OFFSET not in d.state
        for ev in d.events:
            if first:  # the instance's first event: its offset goes into the state (see _stamp_events_offsets)
                produce(events_topic, encode_event(ev), key, partition=p, on_delivery=partial(_note_first_event, batch))
                batch.unstamped = True
                first = False
            else:
                produce(events_topic, encode_event(ev), key, partition=p)
            metrics.event(ev.type)
        batch.events += len(d.events)
        batch.decided.append((st, d))
        in_headers = self._headers(m) if m is not None else None
        headers = _tracing.engine_step(cmd.type, iid, in_headers, d.state, d.events, t_ns)
        if in_headers and _hops.asked(in_headers):
            hop = _hops.stamp("E", batch.polled_us)
            headers = [*(headers or ()), hop]
            batch.hops[iid] = hop
        local: list[Task] = []
        for task in d.tasks:
            if task.local:  # run by this engine below; never produced to a task topic
                local.append(task)
                continue
            proc.known_queue(task.queue)
            if task.kind == "cancel":
                batch.cancels.append((task, headers))
                continue
            if proc.guard is not None:  # the capability the worker returns with the attempt's reports
                task.attempt_token = proc.guard.attempt_token(task.instance_id, task.activity_id, task.attempt)
            produce(self._task_topic(task), encode_task(task), key, headers=headers)  # type: ignore[arg-type]  # headers hint
        for c in d.commands:
            self._produce_command(batch, c, headers, d.state)
        if local:  # outcomes are decided for this instance now, in this batch, after this decision's outputs
            self._local.submit(local, lambda c: self._decide(batch, p, c, None),
                               lambda c: self._produce_command(batch, c, headers, d.state))

    def _produce_command(self, batch: Batch, c: Command, headers: Optional[list[tuple[str, bytes]]],
                         state: Optional[JSONDict]) -> None:
        """Produce a command this engine decided to send (to another instance, or to itself later).

        With auth on it passes the same gate as anyone's: an activity report carries its attempt
        token, anything else a command token the engine signs on behalf of ``state``'s instance."""
        value, key = encode_command(c), c.instance_id.encode()
        guard = self.proc.guard
        if guard is not None:
            if c.type in REPORTS:
                auth = (ATTEMPT_HEADER, guard.attempt_token(c.instance_id, c.data["activity_id"],
                                                            c.data["attempt"]).encode())
            else:
                auth = (COMMAND_HEADER, guard.sign(key, value, state, batch.now / 1000))
            headers = [*(headers or ()), auth]
        self.producer.produce(self.names.commands, value, key, headers=headers)  # type: ignore[arg-type]  # headers hint

    # -- auth ---------------------------------------------------------------------------------
    def _check(self, batch: Batch, p: int, cmd: Command, st: Optional[JSONDict], m: Message) -> Check:
        """The guard's answer for a command read from Kafka. Before refusing one as forbidden, the
        policies table is read to its end (once per batch): a grant applied before the command was
        sent counts for it, whichever engine decides it."""
        proc = self.proc
        assert proc.guard is not None
        token = attempt = None
        for k, v in self._headers(m) or ():
            if k == COMMAND_HEADER and token is None:
                token = v
            elif k == ATTEMPT_HEADER and attempt is None:
                attempt = v
        check = proc.guard.check(cmd, st, token, attempt, m.key(), m.value(), batch.now / 1000,
                                 proc.seen[p].cache, defer=True)
        if check.code == RejectCode.FORBIDDEN and check.principal is not None and not batch.policies_synced:
            batch.policies_synced = True
            if proc.policies.catch_up(2):
                again = proc.guard.authorize(check.principal, cmd, st)
                check = Check(again.action, again.resource, again.principal, again.code, again.reason, check.jti,
                              check.exp)
        return check

    def _remember(self, batch: Batch, p: int, check: Check, d: Optional[Decision]) -> None:
        """Remember the command's token id in this transaction: in the state decision ``d`` writes
        (events, no DLQ: see :meth:`_outputs`), else in the partition's seen-token records."""
        if check.jti is None:
            return
        guard = self.proc.guard
        assert guard is not None
        writes = d is not None and bool(d.events) and not d.dlq_reason
        guard.remember(check, d.state if d is not None and writes else None, self.proc.seen[p].cache, batch.now / 1000)

    def _refuse(self, batch: Batch, p: int, cmd: Command, st: Optional[JSONDict], m: Message, check: Check) -> None:
        """A command the guard refused: ``CommandRejected`` on its instance (a DLQ record when there is
        none), an error answer when it asked a query, and the denial's audit record."""
        assert check.code is not None
        label = _REFUSED.get(check.code, check.code)
        reason = f"{label}: {check.reason}"
        batch.commands += 1
        self._audit(batch, p, cmd, m, check, "denied")
        qid = cmd.data.get("update_id" if cmd.type == "UpdateWorkflow" else "query_id")
        if cmd.type in ("QueryWorkflow", "QueryStatus", "UpdateWorkflow") and isinstance(qid, str):
            answer: JSONDict = {"query_id": qid, "instance_id": cmd.instance_id,
                                "error": {"type": label, "message": check.reason}}
            if cmd.type == "UpdateWorkflow":  # refused before acceptance: nothing was applied
                answer["rejected"] = True
            self.producer.produce(self.names.replies, orjson.dumps(answer), qid.encode())
        if st is None:
            self._remember(batch, p, check, None)
            self._dlq(m, reason, batch.now)
            return
        log.warning("refused %s for '%s' (%s[%d]@%d): %s", cmd.type, cmd.instance_id, m.topic(), p, m.offset(), reason)
        d = refuse(st, cmd, batch.now, check.code, check.reason)
        self._remember(batch, p, check, d)
        self._outputs(batch, p, cmd, st, d, m, time.time_ns())

    def _granted(self, batch: Batch, p: int, cmd: Command, m: Optional[Message], check: Check, d: Decision) -> None:
        """Stamp the owner and tenant of an instance a principal started; audit a mutating command."""
        guard = self.proc.guard
        assert guard is not None and m is not None
        if check.principal is not None and d.state is not None and d.events and d.events[0].type in ("WorkflowStarted", "WorkflowQueued"):
            d.state[OWNER], d.state[TENANT] = guard.starter(check.principal)
        self._remember(batch, p, check, d)
        if cmd.type not in MUTATING:
            return
        outcome: AuditOutcome = "success"
        details: dict[str, str] = {}
        if d.dlq_reason:
            outcome, details = "granted", {"result": "dead-lettered", "why": d.dlq_reason}
        elif d.events and d.events[0].type == "CommandRejected":
            ev = d.events[0].data
            outcome, details = "granted", {"result": "rejected", "rejected": ev["code"], "why": ev["reason"]}
        self._audit(batch, p, cmd, m, check, outcome, details)

    def _audit(self, batch: Batch, p: int, cmd: Command, m: Message, check: Check, outcome: AuditOutcome,
               details: Optional[dict[str, str]] = None) -> None:
        """An audit record, keyed by the command's instance, in this transaction (on the engine's one
        audit partition, see :data:`~kflow.security.guard.AUDIT_PARTITION`)."""
        guard = self.proc.guard
        assert guard is not None
        ref = f"{m.topic()}[{m.partition()}]@{m.offset()}"
        batch.audit.append((cmd.instance_id.encode(), guard.audit_value(check, cmd, outcome, batch.now, ref, details)))

    def _produce_audit(self, batch: Batch) -> None:
        """The batch's audit records, in decision order, produced last with the state records: the
        audit partition joins the transaction with the partitions the batch adds at its end."""
        produce, topic = self.producer.produce, self.names.audit
        for key, value in batch.audit:
            produce(topic, value, key, partition=AUDIT_PARTITION)

    def _record_seen(self, batch: Batch) -> None:
        """The seen-token changelog records of each partition this batch read commands of."""
        for p, first in batch.first_offsets.items():
            tokens = self.proc.seen.get(p)
            if tokens is not None:
                records = tokens.changelog(first, batch.now / 1000)
                if records:
                    batch.journal_records.setdefault(p, []).extend(records)

    def _settle_seen(self, batch: Batch, committed: bool) -> None:
        """After the transaction: its token ids count as seen (committed), or never did (aborted)."""
        for p in batch.first_offsets:
            tokens = self.proc.seen.get(p)
            if tokens is None:
                continue
            if committed:
                tokens.committed()
            else:
                tokens.aborted()

    def _sync_definitions(self, batch: Batch, cmd: Command, m: Optional[Message]) -> None:
        """Make the definitions table current enough to decide this start.

        A client that deployed puts its deploy's offset in a header: the table is read at least
        that far (read-your-deploys, no round trip when it already is). A start naming a workflow
        or version the table does not know reads the table to its high watermark, once per batch.
        """
        defs = self.proc.defs
        needed = -1
        for k, v in (self._headers(m) if m is not None else None) or []:
            if k == DEFS_OFFSET_HEADER:
                try:
                    needed = int(v)
                except (TypeError, ValueError):
                    pass
        if needed >= 0:
            defs.read_through(needed, 5)
        name: Any = cmd.data.get("workflow")  # a string: the codec checks a StartWorkflow's fields
        version = cmd.data.get("version")
        if version is None:
            version = defs.latest(name)
        if not batch.defs_synced and (version is None or defs.get(name, version) is None):
            defs.catch_up(2)
            batch.defs_synced = True

    def _stamp_events_offsets(self, batch: Batch) -> None:
        """Give each instance new in this batch the offset of its first event, before its state is produced.

        The offsets come from the events' delivery reports, so the events are flushed first; only a
        batch that starts an instance pays that round trip. The state carrying the offset is written
        in this same transaction as the events."""
        if batch.unstamped:
            self.producer.flush()  # serves the delivery reports: _note_first_event stamps the states

    def _produce_states(self, batch: Batch) -> None:
        """Per changed instance per batch (latest wins): one ``engine-state`` changelog record (the
        whole state, offsets tracked: restore and standbys read it) and one public ``state`` record."""
        def on_delivery(err: Any, msg: Message) -> None:
            if err is None:
                p, offset = msg.partition(), msg.offset()
                assert p is not None and offset is not None  # a delivered record has both
                batch.changelog_next[p] = max(batch.changelog_next.get(p, 0), offset + 1)
        produce, changelog, public = self.producer.produce, self.names.engine_state, self.names.state
        for iid, st in batch.states.items():
            hop = batch.hops.get(iid)
            key, p = iid.encode(), batch.partition_of[iid]
            produce(changelog, encode_engine_state(iid, st), key, partition=p, on_delivery=on_delivery)
            produce(public, encode_state(public_state(st)), key, partition=p, headers=[hop] if hop is not None else None)

    def _produce_journal(self, batch: Batch) -> None:
        """The journal changelog records of the batch's decisions, in order, on their instances'
        partitions; the offset after each partition's last record is what its store reflects."""
        for iid, ops in batch.journal.items():
            batch.journal_records.setdefault(batch.partition_of[iid], []).extend(journal_records(ops))

        def on_delivery(err: Any, msg: Message) -> None:
            if err is None:
                p, offset = msg.partition(), msg.offset()
                assert p is not None and offset is not None  # a delivered record has both
                batch.journal_next[p] = max(batch.journal_next.get(p, 0), offset + 1)
        produce, topic = self.producer.produce, self.names.journal
        for p, records in batch.journal_records.items():
            last = len(records) - 1
            for i, (key, value) in enumerate(records):
                produce(topic, value, key, partition=p, on_delivery=on_delivery if i == last else None)

    def _dlq(self, m: Message, reason: str, now: int) -> None:
        log.warning("dead-lettered %s[%d]@%d: %s", m.topic(), m.partition(), m.offset(), reason)
        value, key, headers = dlq_record(m, reason, now)
        self.producer.produce(self.names.dlq, value, key, headers=headers)  # type: ignore[arg-type]  # headers hint
        metrics.DLQ.labels(reason.split(" ")[0].split(":")[0][:32]).inc()
