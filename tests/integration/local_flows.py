"""A code workflow with local activities and their functions, for the local-activity integration test.

An engine started with ``activities="tests.integration.local_flows"`` runs these functions itself;
no worker serves them.
"""

from __future__ import annotations

import time

import kflow
from kflow.worker import activity


@activity("lf.double")
def double(x: int) -> int:
    return 2 * x


@activity("lf.boom")
def boom(x: object) -> None:
    raise RuntimeError(f"boom {x}")


@activity("lf.nap")
def nap(x: int) -> int:
    time.sleep(0.1)  # the work itself: eight of these outlast a batch's local-run budget
    return x + 1


@kflow.workflow(name="lf.code", version=1)
async def code_chain(ctx, input):
    a = await ctx.local_activity("lf.double", input, start_to_close=5)
    b = await ctx.local_activity("bench.inc", a)
    return [a, b]
