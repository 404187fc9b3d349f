#!/usr/bin/env python3
"""Run the physical-limit fold loop and ``kflow bench`` against the same broker, and print the ratio.

    python benchmarks/compare.py [--raw-limit ../shared/bench/raw_limit.py] [--bootstrap HOST:PORT]
                                 [-n 2000] [-c 64] [--partitions 4]

Without ``--bootstrap`` an embedded broker is started and shared by both runs. The ratio compares
engine commands per second (chain3 = 4 commands per workflow: start + 3 activity results) with the
bare exactly-once fold loop's messages per second on the same broker, in the same session.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from kflow.dev.bench import run_bench
from kflow.dev.broker import EmbeddedBroker


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw-limit", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "raw_limit.py"))
    ap.add_argument("--bootstrap")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("-c", type=int, default=64)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--raw-n", type=int, default=100_000)
    a = ap.parse_args()
    broker = None
    bootstrap = a.bootstrap
    if bootstrap is None:
        broker = EmbeddedBroker()
        bootstrap = broker.start()
    try:
        raw = subprocess.run([sys.executable, a.raw_limit, "--bootstrap", bootstrap, "--n", str(a.raw_n),
                              "--partitions", str(a.partitions)], check=True, capture_output=True, text=True)
        raw_report = json.loads(raw.stdout.strip().splitlines()[-1])
        report = run_bench(bootstrap, a.n, a.c, "spec", None, partitions=a.partitions)
        ratio = report["engine_commands_per_s"] / raw_report["msg_per_s"]
        print(json.dumps({"raw_limit_msg_per_s": raw_report["msg_per_s"],
                          "kflow_engine_commands_per_s": report["engine_commands_per_s"],
                          "kflow_completed_per_s": report["phases"][0]["completed_per_s"],
                          "ratio": round(ratio, 4)}))
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
