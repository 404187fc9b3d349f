"""The activity of the ``bench.chain3`` benchmark workload: a trivial increment on the ``bench`` queue."""

from __future__ import annotations

from kflow.worker import activity

__all__ = ["inc"]


@activity("bench.inc", queue="bench")
def inc(x: int) -> int:
    """Return ``x + 1``; as cheap as an activity gets, so benchmarks measure kflow itself."""
    return x + 1
