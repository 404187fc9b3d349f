"""Which read-ahead task a saturated worker starts next: level, starvation promotion and fairness key.

A worker reads up to ``read_ahead`` tasks beyond those it runs (see :mod:`kflow._worker.runner`) and
keeps them here in a :class:`ReadAhead`. Each :meth:`ReadAhead.pop` makes three choices:

1. **Promotion.** A task that has waited (since its record's timestamp, so time on the broker
   counts) ``promote_after_ms`` counts as one level more urgent, two after twice that, and so on,
   at most ``max_promotions`` levels and never above 1 (critical). Promotion changes the level the
   task is chosen at, never the topic it came from; the caller records it when the task starts.
2. **Level**, by the priority policy over the levels with tasks here (see
   :mod:`kflow._worker.priority`; tasks known to wait on the broker count towards the credit).
3. **Fairness key**, within that level: deficit round robin over the *units* with tasks there, a
   unit being a (queue, fairness key) pair. The unit at the head of the ring starts up to its
   weight of tasks in a row, then goes to the back; a unit that runs out leaves the ring, and one
   that gets work again joins at the back, so idling never banks a burst.

**The bound.** Let a task of unit ``u`` (weight ``w``) be the ``n``-th of ``u`` here at level
``L``, and let ``S`` be the largest total weight of the units with work at ``L`` while it waits.
Each round of the ring starts at most ``S`` tasks of level ``L`` and at least ``w`` of ``u``'s,
so the task starts within ``ceil(n / w) * S`` starts of level ``L`` (counted from when it was
read). Key A with 10,000 tasks here and key B with 10, weights 1: B's ten start within the next
20 starts, whatever A's backlog. What the worker has not read yet does not compete: a task
behind ``k`` tasks of its partition is read once ``k - read_ahead`` of them have started, which is
why the read-ahead window must cover the bursts it should be fair across (docs/priority.md).

Everything here is pure: time comes from a :class:`kflow.clock.Clock`, nothing touches Kafka.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kflow._worker.priority import DEFAULT_WEIGHTS, Policy, next_level, served
from kflow.clock import Clock

__all__ = ["FairnessSettings", "Picked", "ReadAhead", "Unit"]

T = TypeVar("T")

#: ``(queue, fairness key)``: what the round robin within a level takes turns between.
Unit = tuple[str, str]

_MOST_URGENT = 1
_NEVER = 2**63


@dataclass(frozen=True, slots=True)
class FairnessSettings:
    """How a worker chooses among the tasks it read ahead.

    Args:
        policy: The priority policy between levels (``weighted`` or ``strict``).
        weights: Weight per fairness key (``KFLOW_FAIRNESS_WEIGHTS``); keys not named weigh
            ``default_weight``.
        default_weight: Weight of a key ``weights`` does not name.
        promote_after_ms: Wait after which a task counts one level more urgent; 0 never promotes.
        max_promotions: Most levels a task is promoted by.
    """

    policy: Policy = "weighted"
    weights: Mapping[str, int] = field(default_factory=dict)
    default_weight: int = 1
    promote_after_ms: int = 0
    max_promotions: int = 0

    def __post_init__(self) -> None:
        bad = {k: w for k, w in self.weights.items() if not isinstance(w, int) or isinstance(w, bool) or w < 1}
        if bad:
            raise ValueError(f"fairness weights: expected integers >= 1, but got {bad!r}")
        if self.default_weight < 1 or self.promote_after_ms < 0 or self.max_promotions < 0:
            raise ValueError("fairness: expected default_weight >= 1, promote_after_ms >= 0 and max_promotions >= 0")

    def weight(self, key: str) -> int:
        """The weight of fairness key ``key``."""
        return self.weights.get(key, self.default_weight)

    def level_at(self, level: int, waited_ms: int) -> int:
        """The level a task of ``level`` counts at after waiting ``waited_ms``."""
        if self.promote_after_ms <= 0 or self.max_promotions <= 0 or waited_ms < self.promote_after_ms:
            return level
        steps = min(self.max_promotions, waited_ms // self.promote_after_ms)
        return max(_MOST_URGENT, level - steps)


@dataclass(slots=True, eq=False)
class _Entry(Generic[T]):
    item: T
    level: int  # the level of the topic it came from
    unit: Unit
    arrived_ms: int
    at: int  # the level it is chosen at now (``level`` or more urgent, once promoted)


@dataclass(frozen=True, slots=True)
class Picked(Generic[T]):
    """A task :meth:`ReadAhead.pop` chose: ``level`` is its topic's, ``served_at`` the level it was
    chosen at (more urgent if it was promoted), ``waited_ms`` its wait since its record's timestamp."""

    item: T
    level: int
    served_at: int
    unit: Unit
    waited_ms: int

    @property
    def promoted(self) -> bool:
        return self.served_at != self.level


class ReadAhead(Generic[T]):
    """The tasks a worker read and has not started, by level and unit; see the module doc."""

    def __init__(self, settings: FairnessSettings, clock: Clock,
                 level_weights: Mapping[int, int] = DEFAULT_WEIGHTS) -> None:
        self.settings = settings
        self._clock = clock
        self._level_weights = level_weights
        self._units: dict[int, dict[Unit, deque[_Entry[T]]]] = {}  # level -> unit -> its tasks, oldest first
        self._ring: dict[int, deque[Unit]] = {}  # level -> units with tasks there; the head is served
        self._streak: dict[int, int] = {}  # level -> tasks the ring's head started in its current turn
        self._count: dict[int, int] = {}  # level -> tasks chosen at that level
        self._credit: dict[int, int] = {}  # weighted policy: credit per level (kflow._worker.priority)
        self._size = 0
        self._next_due = _NEVER  # the earliest time a task here is promoted (as far as is known)

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[T]:
        for units in self._units.values():
            for entries in units.values():
                for e in entries:
                    yield e.item

    @property
    def credit(self) -> Mapping[int, int]:
        """The weighted policy's credit per level, charged as tasks start: the loop's choice of which
        level to read from the broker uses it too, so what it reads and what it starts agree."""
        return self._credit

    def counts(self) -> dict[int, int]:
        """Tasks here per level they are chosen at (promotions applied as of the last pop)."""
        return {lv: n for lv, n in self._count.items() if n > 0}

    def push(self, item: T, *, level: int, key: str = "", queue: str = "", arrived_ms: int | None = None) -> None:
        """Add a task read from a topic of ``level``; ``arrived_ms`` is its record's timestamp (default: now)."""
        arrived = self._clock.now_ms() if arrived_ms is None else arrived_ms
        e = _Entry(item, level, (queue, key), arrived, level)
        self._add(e)
        self._size += 1
        self._next_due = min(self._next_due, self._due(e))

    def pop(self, lag: Mapping[int, int] | None = None) -> Picked[T]:
        """Take the task to start next; ``lag`` counts tasks known to wait on the broker per level.

        Raises:
            IndexError: nothing is here.
        """
        if not self._size:
            raise IndexError("pop from an empty read-ahead")
        now = self._clock.now_ms()
        self._promote(now)
        waiting = self.counts()
        level = next_level(waiting, self.settings.policy, self._credit, self._level_weights)
        assert level is not None
        everywhere = dict(waiting)
        for lv, n in (lag or {}).items():
            everywhere[lv] = everywhere.get(lv, 0) + n
        self._credit = served(level, everywhere, self._credit, self._level_weights)
        entry = self._take(level)
        self._size -= 1
        return Picked(entry.item, entry.level, level, entry.unit, max(0, now - entry.arrived_ms))

    def remove(self, matches: Callable[[T], bool]) -> list[T]:
        """Take out every task ``matches`` selects (cancelled, or of a revoked partition); returns them."""
        gone: list[T] = []
        for level, units in self._units.items():
            for unit in list(units):
                keep = deque(e for e in units[unit] if not matches(e.item))
                if len(keep) == len(units[unit]):
                    continue
                gone.extend(e.item for e in units[unit] if matches(e.item))
                self._count[level] -= len(units[unit]) - len(keep)
                if keep:
                    units[unit] = keep
                else:
                    self._leave(level, unit)
        self._size -= len(gone)
        return gone

    def clear(self) -> None:
        """Forget every task (a stopping worker: they are re-delivered to the group's next owner)."""
        self._units.clear()
        self._ring.clear()
        self._streak.clear()
        self._count.clear()
        self._size = 0
        self._next_due = _NEVER

    # ------------------------------------------------------------------ internals

    def _add(self, e: _Entry[T]) -> None:
        units = self._units.setdefault(e.at, {})
        entries = units.get(e.unit)
        if entries is None:
            units[e.unit] = entries = deque()
            self._ring.setdefault(e.at, deque()).append(e.unit)  # a unit with new work joins at the back
        entries.append(e)
        self._count[e.at] = self._count.get(e.at, 0) + 1

    def _take(self, level: int) -> _Entry[T]:
        """Deficit round robin at ``level``: the ring's head starts up to its weight in a row."""
        ring, units = self._ring[level], self._units[level]
        unit = ring[0]
        entries = units[unit]
        e = entries.popleft()
        self._count[level] -= 1
        streak = self._streak.get(level, 0) + 1
        if not entries:
            self._leave(level, unit)
        elif streak >= self.settings.weight(unit[1]):
            ring.rotate(-1)
            self._streak[level] = 0
        else:
            self._streak[level] = streak
        return e

    def _leave(self, level: int, unit: Unit) -> None:
        """``unit`` has no task left at ``level``: out of the ring (its turn ends if it had it)."""
        del self._units[level][unit]
        ring = self._ring[level]
        if ring[0] == unit:
            self._streak[level] = 0
        ring.remove(unit)

    def _due(self, e: _Entry[T]) -> int:
        """When ``e`` is next promoted; never if promotion is off or it reached its last level."""
        s = self.settings
        if s.promote_after_ms <= 0 or e.at <= _MOST_URGENT or e.level - e.at >= s.max_promotions:
            return _NEVER
        return e.arrived_ms + (e.level - e.at + 1) * s.promote_after_ms

    def _promote(self, now: int) -> None:
        """Move the tasks that waited long enough to the level they now count at.

        Only each unit's oldest task is looked at, and only once one is due: tasks arrive in about
        timestamp order, so the oldest of a unit is promoted first.
        """
        s = self.settings
        if now < self._next_due:
            return
        for level in sorted(self._units):
            if level <= _MOST_URGENT:
                continue
            units = self._units[level]
            for unit in list(units):
                entries = units[unit]
                while entries:
                    head = entries[0]
                    at = s.level_at(head.level, now - head.arrived_ms)
                    if at >= level:
                        break
                    entries.popleft()
                    self._count[level] -= 1
                    head.at = at
                    self._add(head)
                if not entries:
                    self._leave(level, unit)
        self._next_due = min((self._due(entries[0]) for units in self._units.values() for entries in units.values()),
                             default=_NEVER)
