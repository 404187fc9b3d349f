"""The cache of live workflow machines, so the common step resumes a parked coroutine.

A :class:`ReplayCache` keeps machines keyed by instance and the exact position they reflect
(:func:`~kflow.engine.code_journal.position_key`). On a hit, only the new input is fed; on a miss
(restart, rebalance, eviction) the run is rebuilt by replay from its journal. The cache belongs to
whoever decides: each engine processor owns one, an :class:`~kflow.engine.InMemoryDefinitions`
(the test harness, the CLI's what-ifs) has its own, and the engine reads it from the definitions
view it decides against (:func:`cache_of`), like the limits.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from kflow.engine.code_machine import Machine

__all__ = ["ReplayCache", "cache_of"]


class ReplayCache:
    """A bounded LRU of live machines, keyed by instance and the exact position they reflect.

    ``max_size = 0`` disables it (every input then replays). A machine is taken out while it is
    used, so a stale machine (e.g. one advanced inside an aborted transaction) is never resumed:
    its key no longer matches the committed state and the instance is rebuilt by replay instead. A
    lock keeps the table consistent when the lanes of one engine (or several callers sharing a
    definitions view) use it from different threads; each instance belongs to one engine at a time.
    """

    def __init__(self, max_size: int = 10_000) -> None:
        self.max_size = max_size
        self._items: OrderedDict[str, tuple[tuple[Any, ...], Machine]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def take(self, instance_id: str, key: tuple[Any, ...]) -> Optional[Machine]:
        with self._lock:
            item = self._items.pop(instance_id, None)
        if item is not None and item[0] == key:
            self.hits += 1
            return item[1]
        self.misses += 1
        return None

    def put(self, instance_id: str, key: tuple[Any, ...], machine: Machine) -> None:
        if self.max_size <= 0:
            return
        with self._lock:
            self._items[instance_id] = (key, machine)
            self._items.move_to_end(instance_id)
            while len(self._items) > self.max_size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


#: What a definitions view without a cache of its own gets: caches nothing, so every input replays.
_NO_CACHE = ReplayCache(max_size=0)


def cache_of(defs: Any) -> ReplayCache:
    """The cache of live machines the definitions view ``defs`` carries (``defs.replay_cache``)."""
    try:  # once per input of a code workflow: one attribute read
        cache: ReplayCache = defs.replay_cache
    except AttributeError:
        return _NO_CACHE
    return cache
