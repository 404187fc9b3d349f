"""The activity of ``kflow bench --mix``: an increment that takes a fixed time, on the ``benchmix`` queue.

The mix measures dispatch under overload, so its worker must be the bottleneck: each task takes
:data:`WORK_MS` of the worker's slots (a sleep stands in for real work).
"""

from __future__ import annotations

import time

from kflow.worker import activity

__all__ = ["WORK_MS", "slow_inc"]

#: Milliseconds one ``bench.slow_inc`` task holds its slot.
WORK_MS = 20


@activity("bench.slow_inc", queue="benchmix")
def slow_inc(x: int) -> int:
    """Return ``x + 1`` after :data:`WORK_MS` milliseconds."""
    time.sleep(WORK_MS / 1000)
    return x + 1
