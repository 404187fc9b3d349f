"""Fairness keys on a real broker: one key's flood cannot hold back another key's few tasks.

Key A floods the queue with 2,000 tasks, then key B sends 10; a worker with two slots reads them
all into its read-ahead window (the first two tasks hold both slots until it has) and must start
B's ten within the bound docs/priority.md states: ``ceil(n / w_B) * (w_A + w_B)`` starts after they
were read, plus the starts already made. Counted in start order, never in time.
"""

from __future__ import annotations

import math
import threading
import uuid
from typing import Any

from confluent_kafka import Producer
from prometheus_client import REGISTRY

from kflow.config import WorkerConfig
from kflow.model.messages import Task
from kflow.schemas.codec import encode_task
from kflow.streams.topics import ensure_topics
from kflow.testing import assert_eventually
from kflow.worker import Worker, activity
from tests.integration.conftest import PARTITIONS

QUEUE = "fair"
FLOOD = 2_000
FEW = 10
SLOTS = 2

_order: list[str] = []  # fairness keys in the order the worker started their tasks
_lock = threading.Lock()
_release = threading.Event()  # the first tasks hold both slots until the test has seen everything read


@activity("fair.work", queue=QUEUE)
def work(x: Any) -> Any:
    with _lock:
        first = len(_order) < SLOTS
        _order.append(x["key"])
    if first:
        assert _release.wait(60), "the test never released the first tasks"
    return None


def read_ahead() -> float:
    return REGISTRY.get_sample_value("kflow_worker_read_ahead_tasks") or 0.0


def test_a_flood_of_one_key_does_not_delay_another_keys_tasks_beyond_the_bound(kafka_bootstrap: str) -> None:
    cfg = WorkerConfig(bootstrap=kafka_bootstrap, topic_prefix=f"f{uuid.uuid4().hex[:8]}.", partitions=PARTITIONS,
                       dev_tuning=True, concurrency=SLOTS, read_ahead=FLOOD + FEW)
    topic = cfg.names.tasks(QUEUE)
    ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings, queues=[QUEUE])
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    for key, n in (("A", FLOOD), ("B", FEW)):  # B's tasks are written after all of A's
        for i in range(n):
            iid = f"{key}-{i}"
            task = Task(iid, "act-1", 1, "fair.work", QUEUE, {"key": key}, "fair_flow", 0, fairness_key=key)
            producer.produce(topic, key=iid.encode(), value=encode_task(task))
        producer.flush(30)
    baseline = read_ahead()
    worker = Worker(cfg, [work])
    worker.start_in_thread()
    try:
        # Both slots are held and everything else has been read ahead: from here the start order
        # depends only on the worker's choice, not on how fast it reads.
        assert_eventually(lambda: read_ahead() - baseline == FLOOD + FEW - SLOTS, timeout=60,
                          msg="the worker never read the whole flood ahead")
        _release.set()
        assert_eventually(lambda: _order.count("B") == FEW, timeout=60, msg="key B's tasks never all started")
        with _lock:
            order = list(_order)
        # weights 1 and 1: B's ten start within ceil(10 / 1) * 2 = 20 starts of being read, and at
        # most SLOTS tasks had started before they were read (FIFO would put them after A's 2,000)
        bound = SLOTS + math.ceil(FEW / 1) * (1 + 1)
        last_b = max(i for i, k in enumerate(order) if k == "B")
        assert last_b < bound, order[:bound + 5]
        assert order[:last_b + 1].count("A") >= FEW - SLOTS  # A kept its turns meanwhile (weights 1:1)
        assert worker.error is None
    finally:
        _release.set()
        worker.stop()


def test_bench_mix_smoke_run_reports_both_levels(kafka_bootstrap: str) -> None:
    from kflow.dev.bench import run_mix

    report = run_mix(kafka_bootstrap, n=10, partitions=1)
    levels = {(r["phase"], r["level"]): r["instances"] for r in report["levels"]}
    mix_phase = report["phases"][1]["phase"]
    assert levels == {("unloaded", "critical"): 5, (mix_phase, "critical"): 2, (mix_phase, "background"): 8}
    assert all(p["failed"] == 0 and p["missed"] == 0 for p in report["phases"])
