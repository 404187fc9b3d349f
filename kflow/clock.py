"""Where kflow's processes get the time: the :class:`Clock` protocol and the wall clock behind it.

The engine core never reads a clock: ``decide`` takes ``now`` as an argument. The processes that
call it ask a ``Clock`` instead of ``time.time()``, so a test can drive them with a clock that only
moves when told to (:class:`kflow.testing.harness.ManualClock`) and skip time instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """A source of the current time in epoch milliseconds, the engine's unit of time."""

    def now_ms(self) -> int:
        """The current time, in milliseconds since the epoch."""
        ...


class SystemClock:
    """The wall clock."""

    def now_ms(self) -> int:
        return int(time.time() * 1000)
