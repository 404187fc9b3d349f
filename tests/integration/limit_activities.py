"""The activity of the fleet-wide limit test, run by separate ``kflow worker`` processes.

Each attempt counts itself in and out of a JSON counter file shared by every process
(``KFLOW_TEST_INFLIGHT_FILE``) under an exclusive ``flock``, recording the most that ever ran at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from typing import Any

from kflow.worker import activity


def _bump(now: int, done: int) -> None:
    with open(os.environ["KFLOW_TEST_INFLIGHT_FILE"], "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        c = json.load(f)
        c["now"] += now
        c["done"] += done
        c["max"] = max(c["max"], c["now"])
        c["pids"] = sorted(set(c["pids"]) | {os.getpid()})
        f.seek(0)
        f.truncate()
        json.dump(c, f)


@activity("lim.erp")
def erp(order: Any) -> Any:
    _bump(+1, 0)
    time.sleep(0.15)  # the call's own duration: attempts must overlap for a limit to matter
    _bump(-1, 1)
    return order
