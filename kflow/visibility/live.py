"""Change notifications from the projection to live views (server-sent events).

The projection thread calls :meth:`Changes.publish` after each committed batch; every SSE stream
polls :meth:`Changes.since` with the version it last saw. Only a bounded window of recent
versions is kept: a reader that fell further behind is told to reload everything.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Optional

__all__ = ["Changes"]


class Changes:
    """A version counter with the instance ids changed at each version (bounded)."""

    def __init__(self, window: int = 1000) -> None:
        self._lock = threading.Lock()
        self._log: deque[tuple[int, frozenset[str]]] = deque(maxlen=window)
        self.version = 0

    def publish(self, ids: set[str]) -> None:
        """Record that ``ids`` changed (called from the projection thread)."""
        with self._lock:
            self.version += 1
            self._log.append((self.version, frozenset(ids)))

    def since(self, version: int) -> tuple[int, Optional[set[str]]]:
        """The current version and the ids changed after ``version``; None means "too far behind"."""
        with self._lock:
            current = self.version
            if version >= current:
                return current, set()
            if not self._log or self._log[0][0] > version + 1:
                return current, None
            out: set[str] = set()
            for v, ids in self._log:
                if v > version:
                    out |= ids
            return current, out
