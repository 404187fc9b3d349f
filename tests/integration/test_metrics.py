"""/metrics of a real engine process and a real worker process after a known workload.

The workload: three 2-step chains (completed), one non-retryable failure (failed), one activity
that fails once and is retried (completed), one instance cancelled while it waits. Every
workflow and activity counter must show exactly what that workload did, and no label value may
be an instance id.
"""

from __future__ import annotations

import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.dev.procs import engine_process, worker_process
from kflow.streams.topics import ensure_topics
from kflow.testing import assert_eventually
from tests.net import free_port, http_get

PARTITIONS = 2




def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``(sample name, labels) -> value`` of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


@pytest.fixture(scope="module")
def workload(kafka_bootstrap, tmp_path_factory):
    prefix = f"mx{uuid.uuid4().hex[:8]}."
    eport, wport = free_port(), free_port()
    state = str(tmp_path_factory.mktemp("metrics") / "e")
    eng = engine_process(kafka_bootstrap, prefix, state, partitions=PARTITIONS, metrics_port=eport).start()
    wrk = worker_process(kafka_bootstrap, prefix, ["tests.integration.flows"], partitions=PARTITIONS,
                         metrics_port=wport).start()
    ids: list[str] = []
    try:
        cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)
        ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)  # the engine may not have yet
        with Client(kafka_bootstrap, config=cfg) as c:
            c.deploy({"name": "mx.chain", "version": 1, "steps": [
                {"id": "a", "task": "t.inc", "input": "input", "output": "a"},
                {"id": "b", "task": "t.inc", "input": "a", "output": "b"},
                {"id": "done", "succeed": "b"}]})
            c.deploy({"name": "mx.fail", "version": 1, "steps": [{"id": "pay", "task": "t.declined", "input": "input"}]})
            c.deploy({"name": "mx.retry", "version": 1, "steps": [
                {"id": "call", "task": "t.flaky", "input": "input", "output": "n",
                 "retry": {"initial": "50ms", "backoff": 1.0, "max_attempts": 3}},
                {"id": "done", "succeed": "n"}]})
            c.deploy({"name": "mx.wait", "version": 1, "steps": [{"id": "w", "wait": {"signal": "never"}}]})
            chains = [f"mx-chain-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
            for i, iid in enumerate(chains):
                c.start("mx.chain", i, id=iid)
            failing, retrying, waiting = (f"mx-{k}-{uuid.uuid4().hex[:6]}" for k in ("fail", "retry", "wait"))
            c.start("mx.fail", 1, id=failing)
            c.start("mx.retry", {"key": retrying, "fail": 1}, id=retrying)
            c.start("mx.wait", None, id=waiting)
            ids = [*chains, failing, retrying, waiting]
            assert [c.result(iid, timeout=90) for iid in chains] == [2, 3, 4]
            assert c.result(retrying, timeout=60) == 2
            assert_eventually(lambda: (c.status(failing) or {}).get("status") == "FAILED", timeout=60, msg="failed")
            assert_eventually(lambda: (c.status(waiting) or {}).get("status") == "RUNNING", timeout=60, msg="waiting")
            c.cancel(waiting, "test")
            assert_eventually(lambda: (c.status(waiting) or {}).get("status") == "CANCELLED", timeout=60,
                              msg="cancelled")
        yield f"http://127.0.0.1:{eport}", f"http://127.0.0.1:{wport}", ids
    finally:
        assert wrk.stop() == 0, wrk.log_tail()
        assert eng.stop() == 0, eng.log_tail()


def test_engine_metrics_count_the_workload(workload):
    engine, _, ids = workload
    status, text = http_get(engine + "/metrics")
    assert status == 200
    found = samples(text)
    expected = {
        ("kflow_workflows_started_total", "mx.chain"): 3, ("kflow_workflows_completed_total", "mx.chain"): 3,
        ("kflow_workflows_started_total", "mx.fail"): 1, ("kflow_workflows_failed_total", "mx.fail"): 1,
        ("kflow_workflows_completed_total", "mx.retry"): 1, ("kflow_workflows_cancelled_total", "mx.wait"): 1,
    }
    for (name, wf), n in expected.items():
        assert value(found, name, workflow=wf) == n, (name, wf)
    assert value(found, "kflow_workflow_duration_seconds_count", workflow="mx.chain", status="COMPLETED") == 3
    assert value(found, "kflow_activities_scheduled_total", activity="t.inc") == 6
    assert value(found, "kflow_activities_completed_total", activity="t.inc") == 6
    assert value(found, "kflow_activities_failed_total", activity="t.declined") == 1
    assert value(found, "kflow_activities_failed_total", activity="t.flaky") == 1
    assert value(found, "kflow_activities_retried_total", activity="t.flaky") == 1
    assert value(found, "kflow_activities_scheduled_total", activity="t.flaky") == 2
    assert value(found, "kflow_engine_commands_total", type="StartWorkflow") == 6
    assert value(found, "kflow_engine_commands_total", type="CancelWorkflow") == 1
    assert value(found, "kflow_engine_assigned_partitions") == PARTITIONS
    assert (value(found, "kflow_engine_command_seconds_count") or 0) >= 6
    assert (value(found, "kflow_engine_commit_seconds_count") or 0) >= 1
    assert not any(iid in text for iid in ids), "instance ids must never be label values"

    def gauges_refreshed() -> bool:
        g = samples(http_get(engine + "/metrics")[1])
        return (all((value(g, "kflow_engine_store_bytes", partition=str(p)) or 0) > 0 for p in range(PARTITIONS))
                and (value(g, "kflow_engine_cache_hits_total") or 0) > 0
                and any(name == "kflow_consumer_lag" and dict(lbl).get("consumer") == "engine" for name, lbl in g))
    assert_eventually(gauges_refreshed, timeout=30, msg="store, cache and lag gauges refreshed")


def test_worker_metrics_count_the_workload(workload):
    _, worker, ids = workload
    status, text = http_get(worker + "/metrics")
    assert status == 200
    found = samples(text)
    assert value(found, "kflow_worker_tasks_total", queue="default", activity="t.inc", outcome="completed") == 6
    assert value(found, "kflow_worker_tasks_total", queue="default", activity="t.declined",
                 outcome="non_retryable") == 1
    assert value(found, "kflow_worker_tasks_total", queue="default", activity="t.flaky", outcome="failed") == 1
    assert value(found, "kflow_worker_tasks_total", queue="default", activity="t.flaky", outcome="completed") == 1
    assert value(found, "kflow_activity_schedule_to_start_seconds_count", activity="t.inc") == 6
    assert value(found, "kflow_activity_duration_seconds_count", activity="t.inc") == 6
    assert value(found, "kflow_worker_concurrency_limit") == 32
    assert value(found, "kflow_worker_inflight") == 0
    assert not any(iid in text for iid in ids), "instance ids must never be label values"
    assert http_get(worker + "/healthz")[0] == 200
    assert http_get(worker + "/readyz")[0] == 200
