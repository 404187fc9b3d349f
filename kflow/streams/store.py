"""RocksDB state for the engine: one rocksdict database per assigned partition of ``commands``.

Layout of a partition store (key prefixes are persisted names; never reuse them):

* ``s:<instance>`` → orjson state of one instance;
* ``t:<due ms, 8 bytes big-endian><instance>\\x00<timer id>`` → empty: the due-date index of
  durable timers, scanned in key order up to *now*;
* ``j:<instance>\\x00<run>\\x00<i|c><index, 4 bytes big-endian>`` → orjson of one journal entry of
  a code workflow's run (``i``: an input event, ``c``: a command; see :mod:`kflow.engine.journal`);
  the key without ``j:`` is the record key on the ``journal`` changelog;
* ``m:changelog`` → the next offset of the ``state`` changelog partition this store reflects;
* ``m:journal`` → the next offset of the ``journal`` changelog partition this store reflects.

The changelog offsets are written in the same WriteBatch as the data they describe, so a store is
always a consistent prefix of both changelogs. A store is only opened for an assigned partition;
using a partition that is not open is an error, never a silent create.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any, Optional, cast

import orjson
from rocksdict import Options, Rdict, WriteBatch

from kflow.engine.journal import COMMAND, INPUT, Append, Entries, JournalOp, put
from kflow.model.errors import KflowError

log = logging.getLogger("kflow.store")

STATE_PREFIX = b"s:"
TIMER_PREFIX = b"t:"
JOURNAL_PREFIX = b"j:"
CHANGELOG_KEY = b"m:changelog"
JOURNAL_CHANGELOG_KEY = b"m:journal"
FORMAT_KEY = b"m:format"
FORMAT_VERSION = b"1"
_DUE = struct.Struct(">Q")
_INDEX = struct.Struct(">I")

#: What a scan of a partition store yields: its databases are raw (bytes keys and values), which
#: rocksdict's type hints (any key type) do not tell apart.
RawItems = Iterator[tuple[bytes, bytes]]
RawKeys = Iterator[bytes]

#: A record of the ``journal`` changelog: key (a journal key without ``j:``) and value (None: a tombstone).
JournalRecord = tuple[bytes, Optional[bytes]]


class PartitionNotAssigned(KflowError):
    def __init__(self, partition: int) -> None:
        super().__init__(f"partition {partition} is not assigned to this engine")


def timer_key(due_ms: int, instance_id: str, timer_id: str) -> bytes:
    return TIMER_PREFIX + _DUE.pack(max(due_ms, 0)) + instance_id.encode() + b"\x00" + timer_id.encode()


def journal_run_key(instance_id: str, run: int) -> bytes:
    """The common beginning of the journal keys of one run of an instance."""
    return instance_id.encode() + b"\x00" + str(run).encode() + b"\x00"


def journal_key(instance_id: str, run: int, kind: str, index: int) -> bytes:
    """The ``journal`` changelog key of one entry (the store key is ``j:`` + this)."""
    return journal_run_key(instance_id, run) + kind.encode() + _INDEX.pack(index)


def journal_records(ops: list[JournalOp]) -> list[JournalRecord]:
    """The ``journal`` changelog records of a decision's journal ops, in order: one per appended
    entry, and a tombstone per entry of a run that was reset (its counts say which keys exist)."""
    out: list[JournalRecord] = []
    for op in ops:
        if isinstance(op, Append):
            out.append((journal_key(op.instance_id, op.run, op.kind, op.index), orjson.dumps(op.entry)))
            continue
        for kind, n in ((INPUT, op.inputs), (COMMAND, op.commands)):
            out.extend((journal_key(op.instance_id, op.run, kind, i), None) for i in range(n))
    return out


def parse_timer_key(key: bytes) -> tuple[int, str, str]:
    due = _DUE.unpack_from(key, len(TIMER_PREFIX))[0]
    rest = key[len(TIMER_PREFIX) + 8:]
    iid, _, tid = rest.partition(b"\x00")
    return due, iid.decode(), tid.decode()


class StorePartition:
    """The RocksDB store of one partition plus its write-through LRU cache of hot states."""

    def __init__(self, path: str, partition: int, cache_size: int) -> None:
        os.makedirs(path, exist_ok=True)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self.db = Rdict(path, opts)
        self.partition = partition
        self.path = path
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self.hits = 0
        self.misses = 0
        if self.db.get(FORMAT_KEY) is None:
            self.db[FORMAT_KEY] = FORMAT_VERSION

    # -- reads ----------------------------------------------------------------------------
    def get(self, instance_id: str) -> Optional[dict[str, Any]]:
        st: Optional[dict[str, Any]] = self._cache.get(instance_id)
        if st is not None:
            self._cache.move_to_end(instance_id)
            self.hits += 1
            return st
        self.misses += 1
        raw = self.db.get(STATE_PREFIX + instance_id.encode())
        if raw is None:
            return None
        st = orjson.loads(raw)
        self._remember(instance_id, st)
        return st

    def changelog_offset(self) -> int:
        raw = self.db.get(CHANGELOG_KEY)
        return int(raw) if raw is not None else 0

    def journal_offset(self) -> int:
        raw = self.db.get(JOURNAL_CHANGELOG_KEY)
        return int(raw) if raw is not None else 0

    def read_journal(self, instance_id: str, run: int) -> tuple[Entries, Entries]:
        """The (inputs, commands) of one run of a code workflow, in index order: one range scan."""
        prefix = JOURNAL_PREFIX + journal_run_key(instance_id, run)
        inputs: Entries = []
        commands: Entries = []
        for key, raw in cast(RawItems, self.db.items(from_key=prefix)):
            if not key.startswith(prefix):
                break
            kind = key[len(prefix):len(prefix) + 1].decode()
            index = _INDEX.unpack_from(key, len(prefix) + 1)[0]
            put(inputs if kind == INPUT else commands, index, orjson.loads(raw))
        return inputs, commands

    def due_timers(self, now_ms: int, limit: int) -> list[tuple[int, str, str]]:
        """Timers due at or before ``now_ms``, earliest first, at most ``limit``."""
        out: list[tuple[int, str, str]] = []
        bound = TIMER_PREFIX + _DUE.pack(now_ms) + b"\xff"
        for key in cast(RawKeys, self.db.keys(from_key=TIMER_PREFIX)):
            if not key.startswith(TIMER_PREFIX) or key > bound or len(out) >= limit:
                break
            out.append(parse_timer_key(key))
        return out

    def next_due(self) -> Optional[int]:
        for key in cast(RawKeys, self.db.keys(from_key=TIMER_PREFIX)):
            if key.startswith(TIMER_PREFIX):
                return parse_timer_key(key)[0]
            break
        return None

    def iter_states(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, raw in cast(RawItems, self.db.items(from_key=STATE_PREFIX)):
            if not key.startswith(STATE_PREFIX):
                break
            yield key[len(STATE_PREFIX):].decode(), orjson.loads(raw)

    # -- writes (after the Kafka transaction committed) ---------------------------------------
    def write(self, states: dict[str, dict[str, Any]], old: dict[str, Optional[dict[str, Any]]],
              changelog_next: Optional[int], fired: Any = (), journal: Iterable[JournalRecord] = (),
              journal_next: Optional[int] = None) -> None:
        """Persist committed states, re-index their timers, apply journal records and advance the
        changelog offsets, atomically.

        ``fired`` are timer index keys that were fired in this batch and are dropped unconditionally;
        ``journal`` are records of the ``journal`` changelog, in offset order.
        """
        wb = WriteBatch(raw_mode=True)
        for key, value in journal:
            if value is None:
                wb.delete(JOURNAL_PREFIX + key)
            else:
                wb.put(JOURNAL_PREFIX + key, value)
        for key in fired:
            wb.delete(key)
        for iid, st in states.items():
            prev = old.get(iid)
            if prev:
                for tid, t in prev.get("timers", {}).items():
                    if tid not in st.get("timers", {}):
                        wb.delete(timer_key(t["due"], iid, tid))
            for tid, t in st.get("timers", {}).items():
                wb.put(timer_key(t["due"], iid, tid), b"")
            wb.put(STATE_PREFIX + iid.encode(), orjson.dumps(st))
            self._remember(iid, st)
        if changelog_next is not None:
            wb.put(CHANGELOG_KEY, str(changelog_next).encode())
        if journal_next is not None:
            wb.put(JOURNAL_CHANGELOG_KEY, str(journal_next).encode())
        self.db.write(wb)

    def _remember(self, iid: str, st: dict[str, Any]) -> None:
        if self._cache_size <= 0:
            return
        self._cache[iid] = st
        self._cache.move_to_end(iid)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def drop_cache(self) -> None:
        self._cache.clear()

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._cache.clear()
        self.db.close()


class EngineStore:
    """All partition stores of this engine under ``<state_dir>/state/<partition>``."""

    def __init__(self, state_dir: str, cache_size: int) -> None:
        self.root = os.path.join(state_dir, "state")
        self.cache_size = cache_size
        self.partitions: dict[int, StorePartition] = {}

    def open(self, partition: int, per_partition_cache: int) -> StorePartition:
        if partition not in self.partitions:
            self.partitions[partition] = StorePartition(os.path.join(self.root, str(partition)), partition,
                                                        per_partition_cache)
        return self.partitions[partition]

    def get(self, partition: int) -> StorePartition:
        try:
            return self.partitions[partition]
        except KeyError:
            raise PartitionNotAssigned(partition) from None

    def close(self, partition: int) -> None:
        sp = self.partitions.pop(partition, None)
        if sp is not None:
            sp.close()

    def close_all(self) -> None:
        for p in list(self.partitions):
            self.close(p)

    def wipe(self, partition: int) -> None:
        """Delete a partition's store (used when it is found inconsistent); it is rebuilt by restore."""
        self.close(partition)
        shutil.rmtree(os.path.join(self.root, str(partition)), ignore_errors=True)
