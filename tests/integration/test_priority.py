"""Dispatch by priority on a real broker: a saturated worker serves critical work before a background backlog."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from kflow._worker import runner
from kflow.testing import assert_eventually
from kflow.worker import activity
from tests.integration.conftest import PARTITIONS, Stack

QUEUE = "prio"
BACKLOG = 12
CRITICAL = 3

_order: list[str] = []  # tags in the order the worker ran them (concurrency 1: one at a time)
_lock = threading.Lock()
_release = threading.Event()  # the first task to run holds the worker's only slot until set


@activity("prio.work", queue=QUEUE)
def work(x: Any) -> Any:
    with _lock:
        first = not _order
        _order.append(x["tag"])
    if first:
        assert _release.wait(60), "the test never released the first task"
    return x["tag"]


def committed_records(stack: Stack, topic: str, want: int) -> int:
    """How many committed records ``topic`` holds, reading until ``want`` are seen or it is quiet."""
    c = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:6]}",
                  "isolation.level": "read_committed", "enable.auto.commit": False})
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        seen = 0
        while seen < want:
            msgs = c.consume(want - seen, 2.0)
            if not msgs:
                break
            seen += sum(1 for m in msgs if m.error() is None)
        return seen
    finally:
        c.close()


def test_critical_work_started_after_a_background_backlog_runs_first(engine_only_stack: Stack,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A full worker does not read on here: the critical tasks then arrive behind the backlog in the
    # consumer's fetch queue, which a first-in first-out worker would run before them.
    monkeypatch.setattr(runner, "_FULL_GRACE", 3600.0)
    stack = engine_only_stack
    c = stack.client
    c.deploy({"name": "prio_job", "version": 1, "steps": [{"id": "w", "task": "prio.work", "queue": QUEUE,
                                                           "input": "input"}]})
    stack.start_worker([work], concurrency=1)
    handles = [c.start("prio_job", {"tag": f"b{i}"}, priority="background") for i in range(BACKLOG)]
    assert_eventually(lambda: len(_order) == 1, msg="the first background task never started")
    handles += [c.start("prio_job", {"tag": f"c{i}"}, priority="critical") for i in range(CRITICAL)]
    assert_eventually(lambda: committed_records(stack, f"{stack.prefix}tasks.{QUEUE}.p1", CRITICAL) == CRITICAL,
                      msg="the critical tasks never reached their topic")
    assert committed_records(stack, f"{stack.prefix}tasks.{QUEUE}", 1) == 0  # nothing went to the normal topic
    _release.set()
    for h in handles:
        h.result(timeout=60)  # every instance completes
    # The worker had one slot and one queued background task when the critical work arrived: the
    # critical tasks run right after those two, ahead of the rest of the backlog, which still all runs.
    last_critical = max(_order.index(f"c{i}") for i in range(CRITICAL))
    assert last_critical <= 2 + CRITICAL, _order
    assert len(_order) == BACKLOG + CRITICAL
