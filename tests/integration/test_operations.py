"""The engine process's operations endpoint: /healthz, /readyz and /metrics after real work."""

from __future__ import annotations

import uuid

from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.dev.procs import engine_process
from kflow.testing import assert_eventually
from tests.net import free_port, http_get


def test_engine_serves_health_readiness_and_metrics(kafka_bootstrap, tmp_path):
    prefix = f"o{uuid.uuid4().hex[:8]}."
    port = free_port()
    eng = engine_process(kafka_bootstrap, prefix, str(tmp_path / "e"), partitions=2, metrics_port=port).start()
    base = f"http://127.0.0.1:{port}"
    try:
        assert_eventually(lambda: http_get(base + "/healthz")[0] == 200, timeout=30, msg="healthz")
        assert_eventually(lambda: http_get(base + "/readyz")[0] == 200, timeout=60, msg="readyz after assignment")
        cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=2, dev_tuning=True)
        with Client(kafka_bootstrap, config=cfg) as c:
            c.deploy({"name": "ops", "version": 1, "steps": [{"id": "d", "succeed": "input * 2"}]})
            ids = [f"ops-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
            for i, iid in enumerate(ids):
                c.start("ops", i, id=iid)
            assert [c.result(iid, timeout=60) for iid in ids] == [0, 2, 4]
        _, text = http_get(base + "/metrics")
        assert 'kflow_engine_commands_total{type="StartWorkflow"} 3.0' in text
        assert 'kflow_engine_events_total{type="WorkflowCompleted"} 3.0' in text
        assert "kflow_engine_assigned_partitions 2.0" in text
        assert not any(iid in text for iid in ids), "instance ids must never be metric labels"
        assert http_get(base + "/nope")[0] == 404
    finally:
        assert eng.stop() == 0, eng.log_tail()
