"""Standby replicas: warm copies of the ``commands`` partitions this engine does not own.

With ``KFLOW_STANDBY_REPLICAS=N`` (N ≥ 1) one background thread tails the changelog partitions of
partitions other engines own — ``read_committed``, with its own consumer and ``assign()``, in no
group — into the same per-partition RocksDB stores an owner uses; every write is one WriteBatch
holding the records and the changelog offset they bring the store to (the apply functions of
:mod:`kflow.streams.restore`), so a standby store is always a consistent prefix of its changelog.
When the group assigns such a partition to this engine it is *promoted*: the processor takes the
store from here and :func:`~kflow.streams.restore.restore_partitions` replays only the tail between
the stored offset and the high watermark. On revoke or loss the store comes back here, kept open
and never wiped, and tailing resumes from its stored offset::

        chosen by the rule           release: assigned to this engine
    ──────────────────────► HELD ─────────────────────────────────────► OWNED (the processor's)
                            │  ▲        take_back: revoked or lost          │
                            │  └─────────────────────────────────────────────┘
                            └─► closed when no longer chosen (the files stay; a restore resumes them)

Hand-over: the tailer writes a store only while holding :attr:`StandbySet.lock`, and only when the
partition is held and its consumer assignment is current (not *stale*). ``release`` takes the same
lock, so once it returns the in-flight write has finished and no later one can start; the tailer
drops the partition from its consumer on its next round and ignores what it fetched of it before.
A store taken back is reassigned from its stored offset, never from the tailer's old position.

Which partitions: librdkafka has no custom assignor hook, so the group cannot prefer the engine
with the most caught-up copy; instead engines keep copies where the group is likely to move a
partition. After every rebalance the tailer reads the group's members and their assignments
(``describe_consumer_groups``) and applies :func:`standby_choice`: with at most N+1 members every
partition this engine does not own is kept warm (always the case for two engines); with more, each
partition gets N holders among the members that do not own it. When the members cannot be listed
(the embedded broker describes every group with none) every non-owned partition is kept warm.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional, cast

from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from kflow.config import EngineConfig
from kflow.streams import metrics
from kflow.streams.restore import apply_journal_records, apply_state_records, mark_journal, mark_state
from kflow.streams.store import StorePartition
from kflow.streams.topics import TopicNames

__all__ = ["Changelog", "Membership", "StandbyReplicas", "StandbySet", "changelogs", "read_membership",
           "standby_choice"]

log = logging.getLogger("kflow.standby")

#: Longest one poll of the tailer waits for records (also how soon it notices a hand-over when busy).
POLL_SECONDS = 0.2
#: Most records taken from the client per round.
BATCH = 5000
#: fetch.wait.max.ms of the tailer: a standby needs no low latency, and an idle fetch loop costs CPU.
FETCH_WAIT_MS = 200
#: Seconds between two exports of the standby gauges.
EXPORT_SECONDS = 1.0
#: Seconds before the membership is read again when the group was still rebalancing.
MEMBERSHIP_RETRY_SECONDS = 1.0
#: Most time one read of the group's membership may take.
DESCRIBE_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Changelog:
    """A changelog topic a standby tails into the partition stores.

    ``apply(store, msgs)`` writes records of one partition (in offset order) together with the next
    offset in one WriteBatch; ``offset(store)`` reads that offset back; ``advance(store, offset)``
    records a later one when only control records (commit markers) lay in between.
    """

    topic: str
    apply: Callable[[StorePartition, list[Message]], None]
    offset: Callable[[StorePartition], int]
    advance: Callable[[StorePartition, int], None]


def changelogs(names: TopicNames) -> list[Changelog]:
    """The changelogs a standby keeps a partition warm from, each with its apply function."""
    return [Changelog(names.engine_state, apply_state_records, StorePartition.changelog_offset, mark_state),
            Changelog(names.journal, apply_journal_records, StorePartition.journal_offset, mark_journal)]


def standby_choice(me: str, members: Iterable[str], owners: dict[int, str], partitions: int,
                   replicas: int) -> set[int]:
    """The partitions member ``me`` keeps warm.

    Each partition gets ``replicas`` holders among the members that do not own it: consecutive
    members of their sorted list, starting at the partition number, so copies spread evenly and
    every member computes the same answer from the same description. With at most ``replicas``+1
    members that is every partition ``me`` does not own.
    """
    ring = sorted(set(members))
    chosen: set[int] = set()
    for p in range(partitions):
        others = [m for m in ring if m != owners.get(p)]
        holders = {others[(p + i) % len(others)] for i in range(min(replicas, len(others)))}
        if me in holders:
            chosen.add(p)
    return chosen


class StandbySet:
    """Which partition stores the standby holds, and the only code that writes them (no Kafka here).

    ``held`` are the stores the tailer may write; ``owned`` the partitions the processor took;
    ``wanted`` what the membership rule chose; ``assigned`` what the tailer's consumer reads (kept
    by the tailer through :meth:`plan`); a *stale* partition's assignment predates a hand-over and
    must be restarted from the stored offset before any of its records is applied again.
    """

    def __init__(self, changelog_list: list[Changelog], partitions: int,
                 open_store: Callable[[int], StorePartition]) -> None:
        self.lock = threading.Lock()
        self.changelogs = {c.topic: c for c in changelog_list}
        self.held: dict[int, StorePartition] = {}
        self.owned: set[int] = set()
        self.wanted: set[int] = set(range(partitions))
        self.assigned: set[int] = set()
        self._stale: set[int] = set()
        self._open = open_store

    # -- the processor's side ----------------------------------------------------------------
    def release(self, partitions: Iterable[int]) -> dict[int, StorePartition]:
        """Hand ``partitions`` to the processor: the stores held of them, never written here again.

        Waits for a write in flight to finish (the lock); from then on the tailer drops their
        records and unassigns them on its next round."""
        ps = set(partitions)
        with self.lock:
            self.owned |= ps
            self._stale |= ps & self.assigned
            return {p: self.held.pop(p) for p in sorted(ps) if p in self.held}

    def take_back(self, stores: Iterable[StorePartition]) -> None:
        """Stores of partitions the processor no longer owns: kept warm when chosen, else closed."""
        with self.lock:
            for sp in stores:
                p = sp.partition
                self.owned.discard(p)
                if p not in self.wanted:
                    sp.close()
                    continue
                self.held[p] = sp
                if p in self.assigned:
                    self._stale.add(p)

    # -- the tailer's side ---------------------------------------------------------------------
    def choose(self, wanted: set[int]) -> None:
        with self.lock:
            self.wanted = set(wanted)

    def plan(self) -> tuple[list[TopicPartition], list[TopicPartition]]:
        """Open and close stores to match the choice; the consumer assignments to drop and to start.

        Stores are opened and closed under the lock: the processor opens a partition's store itself
        when it was not held, and two handles on one RocksDB directory must never exist."""
        with self.lock:
            target = self.wanted - self.owned
            for p in [p for p in self.held if p not in target]:
                self.held.pop(p).close()
            for p in sorted(target - self.held.keys()):
                self.held[p] = self._open(p)
            current = (self.assigned - self._stale) & self.held.keys()
            drop = self.assigned - current
            start = {p: sp for p, sp in self.held.items() if p not in current}
            self.assigned = current | start.keys()
            self._stale.clear()
            unassign = [TopicPartition(t, p) for p in sorted(drop) for t in self.changelogs]
            assign = [TopicPartition(t, p, c.offset(sp)) for p, sp in sorted(start.items())
                      for t, c in self.changelogs.items()]
        return unassign, assign

    def apply(self, msgs: list[Message]) -> int:
        """Write the records of held, current partitions to their stores; returns the records written.

        One WriteBatch per changelog partition, each under the lock (so a hand-over waits for one
        partition's write at most). Records below the stored offset were applied already."""
        groups: dict[tuple[str, int], list[Message]] = {}
        for m in msgs:
            topic, p = m.topic(), m.partition()
            if m.error() is None and topic in self.changelogs and p is not None:
                groups.setdefault((topic, p), []).append(m)
        written = 0
        for (topic, p), part in groups.items():
            with self.lock:
                sp = self.held.get(p)
                if sp is None or p in self._stale:
                    continue
                c = self.changelogs[topic]
                start = c.offset(sp)
                part = [m for m in part if cast(int, m.offset()) >= start]  # without an error: it has one
                if part:
                    c.apply(sp, part)
                    written += len(part)
        return written

    def advance(self, positions: list[TopicPartition]) -> None:
        """Record the consumer's positions as stored offsets where they passed control records only.

        Called right after :meth:`apply` of everything the consumer delivered, so every record
        below a current partition's position is in its store."""
        with self.lock:
            for tp in positions:
                sp = self.held.get(tp.partition)
                if sp is None or tp.partition in self._stale or tp.error is not None:
                    continue
                c = self.changelogs[tp.topic]
                if tp.offset > c.offset(sp):
                    c.advance(sp, tp.offset)

    def stored_offsets(self) -> dict[tuple[str, int], int]:
        """Stored offset per (changelog, partition) of the held partitions being read."""
        with self.lock:
            return {(t, p): c.offset(sp) for p, sp in self.held.items()
                    if p in self.assigned and p not in self._stale for t, c in self.changelogs.items()}

    def close_all(self) -> None:
        with self.lock:
            for sp in self.held.values():
                sp.close()
            self.held.clear()
            self.assigned.clear()


class StandbyReplicas:
    """The standby thread of one engine: follows the membership, keeps the chosen stores warm, exports lag."""

    def __init__(self, config: EngineConfig, root: str, cache_per_partition: int,
                 changelog_list: Optional[list[Changelog]] = None) -> None:
        self.config = config
        self.stores = StandbySet(changelog_list or changelogs(config.names), config.partitions, self._open)
        self.error: Optional[BaseException] = None
        self._root = root
        self._cache = cache_per_partition
        self._member = ""
        self._membership_due = threading.Event()
        self._membership_at = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._held_logged: set[int] = set()
        self._exported: set[int] = set()
        self._export_at = 0.0
        self.thread = threading.Thread(target=self._run, name="kflow-standby", daemon=True)

    # -- the processor's side ----------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop tailing and close every store still held (call after the processor left the group)."""
        self._stop.set()
        self._wake.set()
        if self.thread.is_alive():
            self.thread.join(30)
        self.stores.close_all()
        for p in self._exported:
            metrics.STANDBY_LAG.remove(str(p))
        self._exported.clear()
        metrics.STANDBY_PARTITIONS.set(0)

    def release(self, partitions: Iterable[int]) -> dict[int, StorePartition]:
        """See :meth:`StandbySet.release`."""
        out = self.stores.release(partitions)
        self._wake.set()
        return out

    def take_back(self, stores: Iterable[StorePartition]) -> None:
        """See :meth:`StandbySet.take_back`."""
        self.stores.take_back(stores)
        self._wake.set()

    def rebalanced(self, member_id: str) -> None:
        """The group assigned partitions to this engine (as ``member_id``): read the membership again."""
        self._member = member_id
        self._membership_at = 0.0
        self._membership_due.set()
        self._wake.set()

    # -- the thread ------------------------------------------------------------------------------
    def _open(self, p: int) -> StorePartition:
        # the layout of EngineStore.open (<state_dir>/state/<p>), but owned by this thread until released
        return StorePartition(os.path.join(self._root, str(p)), p, self._cache)

    def _run(self) -> None:
        # the consumer is used by this thread only: a call from another thread while this one
        # polls can block both
        consumer = Consumer(self.config.consumer_conf("kflow-standby", **{"fetch.wait.max.ms": FETCH_WAIT_MS}))
        try:
            while not self._stop.is_set():
                self._follow_membership()
                self._reconcile(consumer)
                if self.stores.assigned:
                    msgs = _drain(consumer)
                    if msgs:
                        self.stores.apply(msgs)
                    self.stores.advance(consumer.position(
                        [TopicPartition(t, p) for p in self.stores.assigned for t in self.stores.changelogs]))
                else:
                    self._wake.wait(POLL_SECONDS)
                    self._wake.clear()
                self._export(consumer)
        except BaseException as e:  # surfaced by the engine's polling thread, which stops the engine
            self.error = e
        finally:
            consumer.close()

    def _reconcile(self, consumer: Consumer) -> None:
        unassign, assign = self.stores.plan()
        if unassign:
            consumer.incremental_unassign(unassign)
        if assign:
            consumer.incremental_assign(assign)
        held = set(self.stores.held)
        if held != self._held_logged:
            log.info("standby: keeping partitions %s warm", sorted(held))
            self._held_logged = held

    def _follow_membership(self) -> None:
        if not self._membership_due.is_set() or time.monotonic() < self._membership_at:
            return
        self._membership_due.clear()
        cfg = self.config
        settled, found = read_membership(AdminClient(cfg.client_conf()), f"{cfg.names.prefix}engine",
                                         cfg.names.commands)
        if not settled:
            self._membership_at = time.monotonic() + MEMBERSHIP_RETRY_SECONDS
            self._membership_due.set()
            return
        if found is None or self._member not in found.members:
            wanted = set(range(cfg.partitions))  # members unknown: keep every non-owned partition warm
        else:
            wanted = standby_choice(self._member, found.members, found.owners, cfg.partitions, cfg.standby_replicas)
        self.stores.choose(wanted)

    def _export(self, consumer: Consumer) -> None:
        now = time.monotonic()
        if now < self._export_at:
            return
        self._export_at = now + EXPORT_SECONDS
        lag: dict[int, int] = {}
        for (t, p), stored in self.stores.stored_offsets().items():
            _low, high = consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
            if high >= 0:  # known once a fetch of the partition answered
                lag[p] = lag.get(p, 0) + max(0, high - stored)
        for p, n in lag.items():
            metrics.STANDBY_LAG.labels(str(p)).set(n)
        for p in self._exported - lag.keys():
            metrics.STANDBY_LAG.remove(str(p))
        self._exported = set(lag)
        metrics.STANDBY_PARTITIONS.set(len(self.stores.held))


@dataclass(frozen=True)
class Membership:
    """The members of the engine group and the owner of each partition of ``commands``."""

    members: list[str]
    owners: dict[int, str]


def read_membership(admin: AdminClient, group: str, topic: str) -> tuple[bool, Optional[Membership]]:
    """``(settled, membership)`` of ``group``: not settled while it rebalances; no membership when
    the broker lists no members (the embedded broker) or did not answer."""
    try:
        desc = admin.describe_consumer_groups([group], request_timeout=DESCRIBE_TIMEOUT_SECONDS)[group].result()
    except KafkaException as e:
        log.info("standby: could not read the members of group %s (%s); keeping every partition warm", group, e)
        return True, None
    if desc.state != ConsumerGroupState.STABLE:
        return False, None
    if not desc.members:
        return True, None
    owners = {tp.partition: m.member_id for m in desc.members if m.assignment is not None
              for tp in m.assignment.topic_partitions if tp.topic == topic}
    return True, Membership([m.member_id for m in desc.members], owners)


def _drain(c: Consumer) -> list[Message]:
    """Records the client has fetched: waits only until the first arrives (or ``POLL_SECONDS``)."""
    first = c.poll(POLL_SECONDS)
    if first is None:
        return []
    return [first, *c.consume(BATCH - 1, 0)]
