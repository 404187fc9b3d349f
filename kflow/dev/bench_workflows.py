"""The code-workflow form of the ``bench.chain3`` workload, hosted by the engine in ``kflow bench --style code``."""

from __future__ import annotations

from typing import Any

import kflow

__all__ = ["chain3"]


@kflow.workflow(name="bench.chain3code", version=1)
async def chain3(ctx: Any, input: int) -> int:
    """Three sequential ``bench.inc`` activities, like the spec workflow ``bench.chain3``."""
    x = input
    for _ in range(3):
        x = await ctx.activity("bench.inc", x, queue="bench")
    return x
