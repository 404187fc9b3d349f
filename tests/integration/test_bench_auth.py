"""``kflow bench --auth --rounds 2`` on the real broker: every run completes, only the auth-on runs audit.

A smoke run with a tiny count; it asserts on outcomes (no failed or missed instance, every start of
the auth run authorized for the bench principal and audited), never on timings.
"""

from __future__ import annotations

import uuid

from kflow.config import KafkaConfig
from kflow.dev.bench import AUTH_PRINCIPAL, run_auth
from kflow.visibility.audit_log import read_audit


def test_bench_auth_runs_rounds_of_auth_off_and_on(kafka_bootstrap: str) -> None:
    prefix = f"ba{uuid.uuid4().hex[:6]}."
    report = run_auth(kafka_bootstrap, n=20, concurrency=8, prefix=prefix, latency_seconds=0.2, partitions=1, rounds=2)

    assert [report[run]["auth"] for run in ("off", "on")] == [False, True]
    # two rounds, the second in the other order, and the median over them
    assert [r["order"] for r in report["rounds"]] == ["round 1 (off → on)", "round 2 (on → off)"]
    losses = sorted(r["comparison"][0]["throughput_loss_pct"] for r in report["rounds"])
    assert report["median"]["throughput_loss_pct"] == round(sum(losses) / 2, 3)
    for run in ("off", "on"):
        phases = report[run]["phases"]
        assert [p["phase"] for p in phases] == ["throughput", "latency@50/s"]
        assert [(p["instances"], p["failed"], p["missed"]) for p in phases] == [(20, 0, 0), (10, 0, 0)], run
    assert [r["phase"] for r in report["comparison"]] == ["throughput", "latency@50/s"]
    # CPU per workflow of each process in the throughput phase, their total, and the relative cost
    for run in ("off", "on"):
        busy = report[run]["throughput_cpu_ms_per_workflow"]
        assert busy["engine"] > 0 and busy["worker"] > 0
        assert busy["total"] == round(sum(v for k, v in busy.items() if k != "total"), 3)
    off, on = (report[run]["throughput_cpu_ms_per_workflow"]["total"] for run in ("off", "on"))
    assert report["throughput_cpu_cost_pct"] == round((on / off - 1) * 100, 1)

    # every start of the auth run passed the guard as the bench principal: the warm start, the 20 of
    # the warm-up, the 20 of the throughput phase and the 10 of the latency phase
    on = read_audit(KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=f"{prefix}r0authon."))
    starts = [r for r in on if r.action == "start"]
    assert len(starts) == 51
    assert {(r.principal, r.outcome) for r in starts} == {(AUTH_PRINCIPAL, "success")}
    assert not [r for r in on if r.outcome == "denied"]
    # the baseline's engine ran with auth off: it audits nothing
    assert read_audit(KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=f"{prefix}r0authoff.")) == []
    assert len([r for r in read_audit(KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=f"{prefix}r1authon."))
                if r.action == "start"]) == 51
