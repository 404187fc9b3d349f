"""Local activities end to end: a real broker and a real engine that runs the activities itself.

No worker runs in these tests, so a task produced to a task topic would never be served: every
workflow completing proves the engine ran its tasks, and every ``tasks.*`` topic is checked to
have received no record at all.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, TopicPartition

from kflow.dev.stack import bundled_spec
from kflow.model.errors import WorkflowFailedError, WorkflowNotDeployed
from kflow.testing import assert_eventually
from tests.integration.conftest import Stack

ACTIVITIES = "kflow.dev.bench_activities,tests.integration.local_flows"


@pytest.fixture(scope="module")
def local_stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(kafka_bootstrap, f"lo{uuid.uuid4().hex[:8]}.", str(tmp_path_factory.mktemp("local")))
    s.start_engine(activities=ACTIVITIES, workflows="tests.integration.local_flows")
    try:
        yield s
    finally:
        s.close()


def records_in_task_topics(s: Stack) -> dict[str, int]:
    c = Consumer({"bootstrap.servers": s.bootstrap, "group.id": uuid.uuid4().hex})
    try:
        md = c.list_topics(timeout=10)
        out = {}
        for name, topic in md.topics.items():
            if name.startswith(f"{s.prefix}tasks."):
                out[name] = sum(c.get_watermark_offsets(TopicPartition(name, p), timeout=10, cached=False)[1]
                                for p in topic.partitions)
        return out
    finally:
        c.close()


def test_chain3_local_completes_in_the_engine_and_produces_no_task(local_stack: Stack) -> None:
    client = local_stack.client
    client.deploy(bundled_spec("chain3_local.yaml"))
    ids = {f"c3-{i}-{uuid.uuid4().hex[:4]}": i for i in range(20)}
    for iid, x in ids.items():
        client.start("bench.chain3local", x, id=iid)
    for iid, x in ids.items():
        assert client.result(iid, timeout=60) == x + 3
    for iid in list(ids)[:5]:
        kinds = Counter(e.type for e in client.history(iid))
        assert kinds["ActivityScheduled"] == kinds["ActivityCompleted"] == 3, kinds
        assert kinds["WorkflowCompleted"] == 1 and kinds["TimerStarted"] == 0, kinds
    assert all(n == 0 for n in records_in_task_topics(local_stack).values()), records_in_task_topics(local_stack)


def test_local_task_naming_an_activity_the_engine_lacks_fails_clearly(local_stack: Stack) -> None:
    client = local_stack.client
    client.deploy({"name": "lo.unknown", "steps": [{"id": "a", "task": "lo.nowhere", "local": True, "input": "input",
                                                    "retry": {"initial": "100ms", "max_attempts": 5}}]})
    with pytest.raises(WorkflowFailedError) as e:
        client.start("lo.unknown", 1).result(timeout=60)
    assert e.value.error_type == "UnknownActivity"
    assert "start the engine with --activities MODULE" in str(e.value)


def test_local_retry_waits_on_the_durable_timer_then_gives_up(local_stack: Stack) -> None:
    client = local_stack.client
    client.deploy({"name": "lo.retry", "steps": [{"id": "a", "task": "lf.boom", "local": True, "input": "input",
                                                  "retry": {"initial": "200ms", "max_attempts": 3}}]})
    handle = client.start("lo.retry", 7)
    with pytest.raises(WorkflowFailedError) as e:
        handle.result(timeout=60)
    assert e.value.error_type == "RuntimeError" and "boom 7" in str(e.value)
    kinds = Counter(ev.type for ev in handle.history())
    assert kinds["ActivityScheduled"] == kinds["ActivityFailed"] == 3, kinds
    assert kinds["TimerFired"] == 2, kinds  # each retry waited out its backoff on a durable timer


def test_code_workflow_local_activities(local_stack: Stack) -> None:
    client = local_stack.client

    def deployed() -> bool:
        try:
            client.require_deployed("lf.code", None)
        except WorkflowNotDeployed:
            return False
        return True

    assert_eventually(deployed, timeout=60, msg="the engine published its hosted code workflows")
    assert client.start("lf.code", 5).result(timeout=60) == [10, 11]
    assert all(n == 0 for n in records_in_task_topics(local_stack).values())


def test_a_chain_longer_than_the_batch_budget_is_deferred_and_completes(kafka_bootstrap: str, tmp_path) -> None:
    """Eight 100 ms local steps outlast one batch's local-run budget (a quarter of a 2 s transaction
    timeout): the rest of the chain is deferred through committed ``StartActivity`` commands and
    runs in later batches, recorded as ``ActivityStarted``."""
    s = Stack(kafka_bootstrap, f"ld{uuid.uuid4().hex[:8]}.", str(tmp_path))
    try:
        s.start_engine(activities=ACTIVITIES, transaction_timeout_ms=2000)
        steps = [{"id": f"s{i}", "task": "lf.nap", "local": True, "input": "input" if i == 0 else f"s{i - 1}",
                  "output": f"s{i}"} for i in range(8)]
        s.client.deploy({"name": "ld.long", "steps": [*steps, {"id": "done", "succeed": "s7"}]})
        handle = s.client.start("ld.long", 0)
        assert handle.result(timeout=60) == 8
        kinds = Counter(ev.type for ev in handle.history())
        assert kinds["ActivityCompleted"] == 8 and kinds["ActivityStarted"] >= 1, kinds
        assert all(n == 0 for n in records_in_task_topics(s).values())
    finally:
        s.close()
