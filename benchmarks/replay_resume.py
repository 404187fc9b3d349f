#!/usr/bin/env python3
"""Time to resume open code-workflow instances after a restart (replay) versus with a warm cache.

    python benchmarks/replay_resume.py [-n 10000] [--steps 3]

Starts ``n`` instances of a code workflow that runs ``steps`` activities and then waits for a
signal, all through the pure engine (no broker: this isolates the replay cost, the part a restart
adds). Then it signals every instance twice over: once with the live-object cache warm (the
common case), once with it cleared, as after an engine restart, a rebalance or an eviction, so
each instance is rebuilt by replaying its history before the signal is delivered. It prints both
times and the cost per instance.
"""

from __future__ import annotations

import argparse
import time

import kflow
from kflow.authoring import definition_of
from kflow.testing.harness import EngineHarness


@kflow.workflow(name="bench.resume", version=1, sandbox=True)
async def resume(ctx, input):
    total = 0
    for i in range(input["steps"]):
        total += await ctx.activity("bench.add", i)
    approved = await ctx.wait_signal("go")
    return {"total": total, "approved": approved}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10_000, help="open instances")
    ap.add_argument("--steps", type=int, default=3, help="activities each instance ran before waiting")
    args = ap.parse_args()

    results = {}
    for mode in ("warm cache", "after restart (replay)"):
        h = EngineHarness()
        h.defs.add(definition_of(resume))
        h.activity("bench.add", lambda x: x + 1)
        cache = h.replay_cache
        cache.max_size = args.n + 10
        t0 = time.perf_counter()
        for i in range(args.n):
            h.start("bench.resume", f"r{i}", {"steps": args.steps})
        started = time.perf_counter() - t0
        if mode.startswith("after"):
            cache.clear()  # what a fresh engine process starts with
        misses = cache.misses
        t0 = time.perf_counter()
        for i in range(args.n):
            h.signal(f"r{i}", "go", True)
        elapsed = time.perf_counter() - t0
        replays = cache.misses - misses
        done = sum(1 for s in h.states.values() if s["status"] == "COMPLETED")
        assert done == args.n, f"only {done} of {args.n} completed"
        results[mode] = elapsed
        print(f"{mode:>24}: resumed {args.n} instances in {elapsed:.2f}s "
              f"({elapsed / args.n * 1e6:.0f} us each, {replays} replays); starting them took {started:.2f}s")
    extra = results["after restart (replay)"] - results["warm cache"]
    print(f"replay adds {extra:.2f}s for {args.n} instances ({extra / args.n * 1e6:.0f} us per instance "
          f"of {args.steps} activities + 1 signal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
