"""The heartbeat timeout on a real engine and worker: it fires a whole timeout after the last heartbeat.

An activity heartbeats a few times, early in its heartbeat timeout, then goes silent (the worker's
automatic heartbeats are turned off). The recorded history shows the attempt timing out exactly
one timeout after its last recorded heartbeat, and the activity's own record of when it sent
its last heartbeat agrees to within the engine's heartbeat resolution and timer lateness.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from kflow.engine.activity import HEARTBEAT_RESOLUTION
from kflow.model.errors import WorkflowFailedError
from kflow.testing import assert_eventually
from kflow.worker import heartbeat
from tests.integration.conftest import Stack

TIMEOUT_MS = 2_000
BEATS = 3
GAP = 0.3  # seconds between the activity's heartbeats: all before half the timeout
LATENESS_MS = 1_500  # most a timer may fire after its due time here (poll, batch, commit)


@pytest.fixture
def stack(engine_only_stack: Stack) -> Stack:
    return engine_only_stack


def test_heartbeat_timeout_fires_a_whole_timeout_after_the_last_heartbeat(stack: Stack) -> None:
    sent_ms: list[int] = []

    async def beats(_: Any) -> str:
        for _ in range(BEATS):
            await asyncio.sleep(GAP)
            heartbeat({"n": len(sent_ms)})
            sent_ms.append(int(time.time() * 1000))
        await asyncio.sleep(120)  # silent until the engine cancels the attempt
        return "never"

    # automatic heartbeats every 60 s: only the activity's own heartbeats reach the engine
    worker = stack.start_worker({"default": {"hb.beats": beats}}, heartbeat_interval_ms=60_000)
    assert worker.wait_assigned(60)
    c = stack.client
    c.deploy({"name": "hb", "version": 1, "steps": [
        {"id": "a", "task": "hb.beats", "timeout": {"heartbeat": f"{TIMEOUT_MS}ms"}}]})
    iid = f"hb-{uuid.uuid4().hex[:8]}"
    with pytest.raises(WorkflowFailedError) as ei:
        c.start("hb", None, id=iid).result(timeout=60)
    assert ei.value.error_type == "ActivityTimeout" and "heartbeat timeout" in ei.value.message
    assert len(sent_ms) == BEATS

    history = assert_eventually(lambda: (h := c.history(iid)) and any(e.type == "WorkflowFailed" for e in h) and h,
                                timeout=30)
    [started] = [e for e in history if e.type == "ActivityStarted"]
    recorded = [e for e in history if e.type == "HeartbeatRecorded"]
    [timed_out] = [e for e in history if e.type == "ActivityTimedOut"]
    assert timed_out.data["kind"] == "heartbeat"
    assert recorded, "no heartbeat was recorded"
    # All heartbeats came before half the timeout, yet the attempt lived a whole timeout past the last one.
    assert sent_ms[-1] - started.ts < TIMEOUT_MS / 2
    silence = timed_out.ts - recorded[-1].ts
    assert TIMEOUT_MS <= silence <= TIMEOUT_MS + LATENESS_MS, f"timed out {silence} ms after the last recorded heartbeat"
    resolution = TIMEOUT_MS // HEARTBEAT_RESOLUTION
    assert recorded[-1].ts >= sent_ms[-1] - resolution  # the last heartbeat sent is the one recorded (to the resolution)
    assert timed_out.ts >= sent_ms[-1] + TIMEOUT_MS - resolution
