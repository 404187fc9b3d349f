"""Workers with overlapping queue sets share each queue's tasks: every activity runs once.

One worker serves ``db`` and ``default``, another only ``default``. Both join the group of
``default`` (``<prefix>worker.default``), so each task of ``default`` goes to exactly one of
them, and the results of both complete the workflows.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from kflow.testing import assert_eventually
from kflow.worker import worker_group
from tests.integration.conftest import PARTITIONS, Stack

N = 24
DEADLINE = 90.0


@pytest.fixture
def stack(engine_only_stack: Stack) -> Stack:
    return engine_only_stack


def counting(tag: str, calls: Counter[str], lock: threading.Lock) -> Callable[[Any], Any]:
    """The ``default`` activity of worker ``tag``: counts its runs per instance, says who ran it."""

    def count(order: Any) -> Any:
        with lock:
            calls[order["id"]] += 1
        return {"by": tag, "id": order["id"]}

    return count


def committed(stack: Stack, group: str, topic: str) -> dict[int, int]:
    """``{partition: committed offset}`` of ``group`` on ``topic``."""
    c = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return {tp.partition: tp.offset for tp in c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)],
                                                              timeout=10)}
    finally:
        c.close()


def task_ends(stack: Stack, topic: str) -> dict[int, int]:
    """``{partition: offset after its last task}`` (transaction markers take offsets too)."""
    c = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"ends-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "isolation.level": "read_committed"})
    tps = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)]
    ends: dict[int, int] = {}
    try:
        c.assign(tps)
        highs = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)}

        def read_to_the_end() -> bool:
            for m in c.consume(500, 0.2):
                if m.error() is None:
                    ends[m.partition()] = m.offset() + 1
            positions = c.position([TopicPartition(topic, p) for p in range(PARTITIONS)])
            return all(highs[tp.partition] == 0 or tp.offset >= highs[tp.partition] for tp in positions)

        assert_eventually(read_to_the_end, timeout=DEADLINE, msg=f"{topic} read to its end")
        return ends
    finally:
        c.close()


def test_workers_with_overlapping_queue_sets_run_each_task_once(stack: Stack) -> None:
    calls: Counter[str] = Counter()
    lock = threading.Lock()
    only_default = stack.start_worker({"default": {"q.count": counting("B", calls, lock)}})
    assert only_default.wait_assigned(60), "the default-only worker got no assignment"
    both = stack.start_worker({"db": {"q.lookup": lambda order: {**order, "found": True}},
                               "default": {"q.count": counting("A", calls, lock)}})
    assert both.wait_assigned(60), "the db+default worker's consumers got no assignment"
    assert both.group_ids == {"db": worker_group(stack.prefix, "db"), "default": worker_group(stack.prefix, "default")}
    assert only_default.group_id == worker_group(stack.prefix, "default")

    c = stack.client
    c.deploy({"name": "overlap", "version": 1, "steps": [
        {"id": "lookup", "task": "q.lookup", "queue": "db", "input": "input", "output": "order"},
        {"id": "count", "task": "q.count", "input": "order", "output": "counted"},
        {"id": "done", "succeed": "counted"},
    ]})
    ids = [f"ov-{i}-{uuid.uuid4().hex[:6]}" for i in range(N)]
    for iid in ids:
        c.start("overlap", {"id": iid}, id=iid)
    states = c.wait_many(ids, timeout=DEADLINE)
    assert sorted(states) == sorted(ids), f"unfinished: {sorted(set(ids) - set(states))}"
    assert {s["status"] for s in states.values()} == {"COMPLETED"}

    # Every task of `default` is behind the shared group's committed offsets: nothing more will run.
    topic = both.config.names.tasks("default")
    ends = task_ends(stack, topic)
    assert len(ends) > 1, f"tasks on one partition only: {ends}"
    group = worker_group(stack.prefix, "default")
    assert_eventually(lambda: all(committed(stack, group, topic).get(p, -1) >= end for p, end in ends.items()),
                      timeout=DEADLINE, msg="the default group committed every task")

    assert sorted(calls) == sorted(ids)
    assert {iid: n for iid, n in calls.items() if n != 1} == {}, "an activity ran more than once"
    by = Counter(s["result"]["by"] for s in states.values())
    assert set(by) == {"A", "B"}, f"both workers' results complete workflows, got {dict(by)}"
    assert all(s["result"]["id"] == iid for iid, s in states.items())
