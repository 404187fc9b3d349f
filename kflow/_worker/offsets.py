"""Per-partition offset tracking: which offset may be committed when tasks finish out of order.

A worker runs many tasks of one partition at once and they finish in any order. Committing the
offset of a task that finished while an earlier one still runs would lose the earlier task on a
crash, so only the contiguous prefix of finished offsets counts: the committable offset is
``last + 1`` where ``last`` ends the run of finished offsets starting at the oldest one received.
"""

from __future__ import annotations

from collections import deque

__all__ = ["PartitionOffsets"]


class PartitionOffsets:
    """Offsets of one assigned partition, received in increasing order and finished in any order.

    One instance lives exactly as long as one assignment of the partition; a task that finishes
    after its partition was revoked holds a stale instance and its ``finish`` changes nothing the
    worker will commit.
    """

    __slots__ = ("_pending", "_done", "_last_added", "committable", "committed")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # received, not yet part of the finished prefix
        self._done: set[int] = set()  # finished offsets still behind an unfinished one
        self._last_added = -1
        self.committable: int | None = None  # next offset to consume, per the finished prefix
        self.committed: int | None = None  # the committable offset last sent to the broker

    def add(self, offset: int) -> bool:
        """Record a received offset; returns False (and records nothing) for a repeat."""
        if offset <= self._last_added:
            return False
        self._pending.append(offset)
        self._last_added = offset
        return True

    def finish(self, offset: int) -> None:
        """Mark ``offset`` finished and extend the committable prefix as far as it now goes."""
        self._done.add(offset)
        pending, done = self._pending, self._done
        while pending and pending[0] in done:
            first = pending.popleft()
            done.discard(first)
            self.committable = first + 1

    @property
    def dirty(self) -> bool:
        """True if the committable offset moved since the last commit."""
        return self.committable is not None and self.committable != self.committed

    @property
    def in_progress(self) -> int:
        """Offsets received but not yet in the finished prefix."""
        return len(self._pending)
