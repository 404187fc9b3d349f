"""The local-activity fault test's workflow and activity: three local steps that each leave a trace.

``fl.step`` sleeps briefly (so an engine SIGKILL lands while local activities run) and appends its
tag to the file named in its input, so the test can count how often each step actually ran.
"""

from __future__ import annotations

import time

from kflow.worker import activity


@activity("fl.step")
def step(req: dict) -> int:
    time.sleep(0.05)  # the work itself: long enough that a kill lands mid-batch
    with open(req["log"], "a") as f:
        f.write(req["tag"] + "\n")
    return int(req["x"]) + 1


def _input(x: str, step_id: str) -> str:
    return f'{{"log": input.log, "tag": input.tag + ":{step_id}", "x": {x}}}'


LOCAL3 = {"name": "fl.local3", "version": 1, "steps": [
    {"id": "a", "task": "fl.step", "local": True, "input": _input("input.x", "a"), "output": "a"},
    {"id": "b", "task": "fl.step", "local": True, "input": _input("a", "b"), "output": "b"},
    {"id": "c", "task": "fl.step", "local": True, "input": _input("b", "c"), "output": "c"},
    {"id": "done", "succeed": "c"}]}
