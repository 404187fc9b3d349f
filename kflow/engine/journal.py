"""The journal of code workflows: each instance's inputs and commands, kept outside its state.

A code workflow is rebuilt by replaying what it was fed (inputs: ``[type, data, ts, seq]``) and
checking what it issued (commands: ``[kind, name, value]``). Both grow with the run's history, so
they are append-only entries keyed by (instance, run, kind, index) and the instance state keeps
only their counts: the state record written on every step stays the same size whatever the
history. A decision lists what it did to the journal as data, in order: :class:`Append` for each
new entry, :class:`Reset` for a run whose entries are no longer needed (it continued as new or
closed). Whoever persists decisions applies them: the Kafka processor in a changelogged RocksDB
store (:mod:`kflow.streams.store`), ``fold``, tests and the harness in an :class:`InMemoryJournal`.

Only a rebuild (a restart, an eviction from the cache of live workflows, a rebalance) reads the
journal, once per rebuild; the live path resumes a parked coroutine and reads nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, Union

#: Entry kinds (persisted in journal keys; never reuse a letter).
INPUT, COMMAND = "i", "c"

Entries = list[list[Any]]


@dataclass(frozen=True, slots=True)
class Append:
    """Entry ``index`` (0-based, per kind) of one run of an instance."""

    instance_id: str
    run: int
    kind: str  # INPUT or COMMAND
    index: int
    entry: list[Any]


@dataclass(frozen=True, slots=True)
class Reset:
    """Delete one run's entries: its first ``inputs`` inputs and first ``commands`` commands (all it has)."""

    instance_id: str
    run: int
    inputs: int
    commands: int


JournalOp = Union[Append, Reset]


class Journal(Protocol):
    """Read side of a journal, as the engine sees it while deciding."""

    def read(self, instance_id: str, run: int) -> tuple[Entries, Entries]:
        """The (inputs, commands) of one run, in index order. The caller may change the lists."""
        ...


class EmptyJournal:
    """A journal with nothing in it: for callers whose instances never need a rebuild."""

    def read(self, instance_id: str, run: int) -> tuple[Entries, Entries]:
        return [], []


def put(entries: Entries, index: int, entry: list[Any]) -> None:
    """Write ``entry`` at ``index`` of a run's list: append, or overwrite (a re-decided step)."""
    if index < len(entries):
        entries[index] = entry
    elif index == len(entries):
        entries.append(entry)
    else:
        raise AssertionError(f"journal entry {index} written after only {len(entries)} entries")


def apply_to(inputs: Entries, commands: Entries, ops: Iterable[JournalOp], instance_id: str, run: int) -> None:
    """Apply the ``ops`` that concern (``instance_id``, ``run``) to its entry lists, in order."""
    for op in ops:
        if op.instance_id != instance_id or op.run != run:
            continue
        if isinstance(op, Reset):
            inputs.clear()
            commands.clear()
        else:
            put(inputs if op.kind == INPUT else commands, op.index, op.entry)


class InMemoryJournal:
    """A journal in a dict, for ``fold``, tests and the in-memory harness."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, int], tuple[Entries, Entries]] = {}

    def read(self, instance_id: str, run: int) -> tuple[Entries, Entries]:
        inputs, commands = self._runs.get((instance_id, run), ([], []))
        return list(inputs), list(commands)

    def apply(self, ops: Iterable[JournalOp]) -> None:
        for op in ops:
            key = (op.instance_id, op.run)
            if isinstance(op, Reset):
                self._runs.pop(key, None)
                continue
            inputs, commands = self._runs.setdefault(key, ([], []))
            put(inputs if op.kind == INPUT else commands, op.index, op.entry)

    def runs(self, instance_id: str) -> list[int]:
        """The runs of ``instance_id`` that have entries."""
        return sorted(r for (iid, r) in self._runs if iid == instance_id)

    def clear(self) -> None:
        self._runs.clear()


#: The journal of callers that keep none of their own (``decide`` without a journal, e.g. the test
#: harness): those decisions are applied to it.
MEMORY = InMemoryJournal()
