"""Quotas survive an engine SIGKILL and the rebalance that follows: no over-admission, no lost queued start.

Two engine processes share the partitions; a per-tenant quota of 3 governs 12 starts of a workflow
that waits for a signal. While permits are being granted and released (three runs just signalled to
complete), the engine owning some partitions is SIGKILLed and its identity restarted on a fresh
state directory (it restores from the changelogs). The oracle reads the counter's own history from
the ``events`` topic (+1 per ``PermitIssued``, -1 per ``PermitReleased`` of a held permit) and the
instances' histories: at no point were more than 3 permits out, every start was admitted exactly
once (one ``WorkflowStarted``) and completed.
"""

from __future__ import annotations

import uuid

import pytest

from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.dev.failover import LogWatch, wait_for
from kflow.dev.procs import engine_process
from kflow.schemas.codec import decode_event
from kflow.streams.topics import ensure_topics
from tests.fault.test_crash_matrix import read_all, tansu_gap  # noqa: F401 (a fixture)

PARTITIONS = 4
WAIT = {"name": "lf_wait", "version": 1, "steps": [{"id": "w", "wait": {"signal": "done"}}]}
QUOTA = 3
STARTS = 12


@pytest.mark.fault
def test_quota_survives_engine_sigkill_and_rebalance(kafka_bootstrap, tmp_path, tansu_gap):  # noqa: F811 (a fixture imported above)
    prefix = f"lf{uuid.uuid4().hex[:8]}."
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)

    def engine(identity: str, state: str):
        p = engine_process(kafka_bootstrap, prefix, str(tmp_path / state), partitions=PARTITIONS, engine_id=identity)
        p.log_path = str(tmp_path / f"{state}.log")
        return p.start()

    ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)
    survivor, victim = engine("la", "a"), engine("lb", "b")
    procs = [survivor, victim]
    wa, wb = LogWatch(survivor), LogWatch(victim)
    ids = [f"lf-{n}-{uuid.uuid4().hex[:4]}" for n in range(STARTS)]
    try:
        with Client(kafka_bootstrap, config=cfg) as client:
            client.deploy(WAIT)
            client.apply_limits({"limits": [{"name": "tq", "tenant": "*", "max_running": QUOTA}]})
            wait_for("both engines to own partitions", lambda: wa.owning() and wb.owning(), 120, procs)
            # the limits table is read at start-up and polled: a start before it would not be queued
            probe = client.start("lf_wait", None, id=f"probe-{uuid.uuid4().hex[:4]}")
            wait_for("the quota to govern starts", lambda: (client.status(probe.id) or {}).get("status") == "RUNNING"
                     and next(e.type for e in client.history(probe.id)) == "WorkflowQueued", 60, procs)
            client.signal(probe.id, "done")
            wait_for("the probe to complete", lambda: (client.status(probe.id) or {}).get("status") == "COMPLETED",
                     60, procs)

            for i in ids:
                client.start("lf_wait", None, id=i)

            def status(i: str) -> str:
                try:
                    return (client.status(i, timeout=5) or {}).get("status", "?")
                except TimeoutError:  # its partition is between owners: no engine answers yet
                    return "?"

            def statuses() -> list[str]:
                return [status(i) for i in ids]

            wait_for(f"{QUOTA} running and the rest queued",
                     lambda: sorted(statuses()) == ["QUEUED"] * (STARTS - QUOTA) + ["RUNNING"] * QUOTA, 60, procs)
            running = [i for i, s in zip(ids, statuses(), strict=True) if s == "RUNNING"]
            for i in running:  # releases and grants are in flight when the engine dies
                client.signal(i, "done")
            victim.kill()
            procs.remove(victim)
            procs.append(engine("lb", "b-replacement"))  # the dead identity fences its open transaction

            done: set[str] = set(running)
            while len(done) < STARTS:
                now = statuses()
                assert sum(s == "RUNNING" for s in now) <= QUOTA, now
                ready = [i for i, s in zip(ids, now, strict=True) if s == "RUNNING" and i not in done]
                if ready:
                    client.signal(ready[0], "done")
                    done.add(ready[0])
                else:
                    wait_for("a queued start to be admitted", lambda: any(
                        s == "RUNNING" and i not in done for i, s in zip(ids, statuses(), strict=True)), 180, procs)
            wait_for("every start to complete", lambda: statuses() == ["COMPLETED"] * STARTS, 180, procs)

        oracle(kafka_bootstrap, prefix, ids)
    finally:
        for p in procs:
            p.kill()
        victim.kill()


def oracle(bootstrap: str, prefix: str, ids: list[str]) -> None:
    """From the events topic: permits out never exceeded the quota, each start was admitted once."""
    by_key: dict[str, list] = {}
    for m in read_all(bootstrap, f"{prefix}events"):
        ev = decode_event(m.value())
        by_key.setdefault(ev.instance_id, []).append(ev)
    counter = sorted(by_key["limit:tq:default"], key=lambda e: e.seq)
    assert [e.seq for e in counter] == list(range(1, len(counter) + 1)), "the counter's history has gaps or repeats"
    held: set[str] = set()
    peak = 0
    for ev in counter:
        hid = f"{ev.data['holder']}|{ev.data['ref']}"
        if ev.type == "PermitIssued":
            assert hid not in held, f"{hid} granted twice"
            held.add(hid)
            peak = max(peak, len(held))
        elif ev.type == "PermitReleased":
            held.discard(hid)
    assert peak <= QUOTA, f"{peak} permits out at once under a quota of {QUOTA}"
    assert not held, f"permits never released: {sorted(held)}"
    for i in ids:
        types = [e.type for e in sorted(by_key[i], key=lambda e: e.seq)]
        assert types.count("WorkflowStarted") == 1 and types[0] == "WorkflowQueued", (i, types)
        assert types[-1] == "WorkflowCompleted", (i, types)
