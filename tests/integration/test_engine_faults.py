"""Engine restarts and scale-out with real processes: SIGKILL mid-flight, fresh state dirs, rebalances."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from confluent_kafka import Consumer

from kflow.client import Client
from kflow.config import WorkerConfig
from kflow.dev.procs import engine_process
from kflow.model.errors import WorkflowNotDeployed
from kflow.schemas.codec import decode_event
from kflow.streams.topics import ensure_topics
from kflow.testing import assert_eventually
from kflow.worker import Worker
from tests.integration import flows

PARTITIONS = 4

SLOW_CHAIN = {"name": "slow", "version": 1, "steps": [
    {"id": "a", "task": "t.inc", "input": "input", "output": "a"},
    {"id": "nap", "sleep": "3s"},
    {"id": "w", "wait": {"signal": "go", "timeout": "1h"}, "output": "g"},
    {"id": "b", "task": "t.inc", "input": "a + g", "output": "b"},
    {"id": "fan", "foreach": "[1, 2, 3]", "as": "k", "concurrency": 2,
     "steps": [{"id": "c", "task": "t.inc", "input": "b + k", "output": "c"}], "output": "cs"},
    {"id": "done", "succeed": "cs"}]}


@pytest.fixture
def env(kafka_bootstrap, tmp_path):
    prefix = f"f{uuid.uuid4().hex[:8]}."
    kw = dict(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)
    cfg = WorkerConfig(**kw)
    ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)  # engines start later, in the tests
    client = Client(kafka_bootstrap, config=cfg)
    worker = Worker(WorkerConfig(**kw), [flows])
    procs = []

    def engine(name: str, engine_id: str, workflows: str = "", lanes: int = 1):
        p = engine_process(kafka_bootstrap, prefix, str(tmp_path / name), partitions=PARTITIONS, engine_id=engine_id,
                           workflows=workflows, extra_env={"KFLOW_LANES": str(lanes)})
        procs.append(p.start())
        return p

    yield client, worker, engine, prefix
    worker.stop()
    for p in procs:
        p.kill()
    client.close()


def deployed(client: Client, workflow: str) -> bool:
    try:
        client.require_deployed(workflow, None)
    except WorkflowNotDeployed:
        return False
    return True


def expected(i: int) -> list[int]:
    b = (i + 1) + 10 + 1
    return [b + k + 1 for k in (1, 2, 3)]


def check_histories(bootstrap: str, prefix: str, ids: list[str]) -> None:
    """Every instance: gap-free seqs from 1, exactly one terminal event, no event twice."""
    cons = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest",
                     "isolation.level": "read_committed", "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    cons.subscribe([f"{prefix}events"])
    hist: dict[str, list] = {i: [] for i in ids}

    def all_done():
        for m in cons.consume(1000, 0.2):
            if not m.error() and m.key().decode() in hist:
                hist[m.key().decode()].append(decode_event(m.value()))
        return all(any(e.type == "WorkflowCompleted" for e in evs) for evs in hist.values())
    try:
        assert_eventually(all_done, timeout=60, msg="terminal events for every instance")
    finally:
        cons.close()
    for iid, evs in hist.items():
        seqs = [e.seq for e in evs]
        assert seqs == list(range(1, len(seqs) + 1)), f"{iid}: seqs {seqs}"
        kinds = Counter(e.type for e in evs)
        assert kinds["WorkflowStarted"] == 1 and kinds["WorkflowCompleted"] == 1, f"{iid}: {kinds}"
        assert kinds["ActivityCompleted"] == kinds["ActivityScheduled"] == 5, f"{iid}: {kinds}"


@pytest.mark.parametrize("lanes", [1, 2])
def test_sigkill_engine_fresh_state_dir_completes_everything(env, kafka_bootstrap, lanes):
    """SIGKILL the engine while every instance sleeps on a durable timer (and waits on a signal
    with a 1h timeout timer after it); a new engine on an empty state directory restores every
    instance from the changelog, re-arms the timers, and completes each instance exactly once.
    With two lanes, two transactions of the engine are open side by side.

    The kill lands between transactions: killing *inside* one is the crash matrix's job, which
    needs a broker that hides aborted records from read_committed readers (Tansu does not)."""
    client, worker, engine, prefix = env
    e1 = engine("e1", "node-a", lanes=lanes)
    client.deploy(SLOW_CHAIN)
    worker.start_in_thread()
    ids = [f"r{i}-{uuid.uuid4().hex[:6]}" for i in range(24)]
    for i, iid in enumerate(ids):
        client.start("slow", i, id=iid)
    # every instance has run its first activity and is asleep on its 3 s timer (status is answered by the
    # engine, which may still be joining its group on a loaded machine: hence the longer query timeout)
    assert_eventually(lambda: all((client.status(i, timeout=30) or {}).get("seq", 0) >= 4 for i in ids), timeout=60)
    e1.kill()
    e2 = engine("e2-fresh", "node-a", lanes=lanes)  # same identity, empty state dir: restore from the changelog
    for iid in ids:
        client.signal(iid, "go", 10)  # buffered while asleep, consumed by the wait step
    for i, iid in enumerate(ids):
        assert client.result(iid, timeout=90) == expected(i), e2.log_tail()
    check_histories(kafka_bootstrap, prefix, ids)


def test_two_engines_split_partitions_and_hand_over(env, kafka_bootstrap):
    client, worker, engine, prefix = env
    e1 = engine("e1", "node-a")
    e2 = engine("e2", "node-b")
    client.deploy(SLOW_CHAIN)
    worker.start_in_thread()
    assert_eventually(lambda: "assigned partitions" in e1.log_tail() and "assigned partitions" in e2.log_tail(),
                      timeout=60, msg="both engines own partitions")
    ids = [f"s{i}-{uuid.uuid4().hex[:6]}" for i in range(24)]
    for i, iid in enumerate(ids):
        client.start("slow", i, id=iid)
    assert_eventually(lambda: all((client.status(i, timeout=30) or {}).get("seq", 0) >= 4 for i in ids[:4]), timeout=60)
    assert e2.stop() == 0, e2.log_tail()  # graceful: its partitions move to e1
    for iid in ids:
        client.signal(iid, "go", 10)
    for i, iid in enumerate(ids):
        assert client.result(iid, timeout=90) == expected(i), e1.log_tail()
    check_histories(kafka_bootstrap, prefix, ids)


def test_sigkill_engine_with_code_workflows_mid_flight(env, kafka_bootstrap):
    """The same kill for code workflows: the new process has no live coroutines, so every instance
    is restored from the changelog and rebuilt by replay, then completes exactly once."""
    from tests.integration import code_flows

    client, _worker, engine, prefix = env
    kw = dict(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)
    worker = Worker(WorkerConfig(**kw), [code_flows])
    worker.start_in_thread()
    try:
        e1 = engine("e1", "node-c", workflows="tests.integration.code_flows")
        ids = [f"c{i}-{uuid.uuid4().hex[:6]}" for i in range(16)]
        # the engine publishes its hosted code workflows on start-up; until then the client refuses
        assert_eventually(lambda: deployed(client, "code.slow"), timeout=60)
        for i, iid in enumerate(ids):
            client.start("code.slow", i, id=iid)
        # every instance ran its first activity and sleeps on its 3 s timer
        assert_eventually(lambda: all(((client.status(i, timeout=30) or {}).get("internal") or {}).get("timers") for i in ids),
                          timeout=60)
        e1.kill()
        e2 = engine("e2-fresh", "node-c", workflows="tests.integration.code_flows")
        for iid in ids:
            client.signal(iid, "go", 10)
        for i, iid in enumerate(ids):
            a = i * i
            assert client.result(iid, timeout=90) == [(a + 10 + k) ** 2 for k in (1, 2, 3)], e2.log_tail()
        for iid in ids:
            evs = client.history(iid)
            seqs = [e.seq for e in evs]
            assert seqs == list(range(1, len(seqs) + 1)), f"{iid}: seqs {seqs}"
            kinds = Counter(e.type for e in evs)
            assert kinds["WorkflowStarted"] == kinds["WorkflowCompleted"] == 1, f"{iid}: {kinds}"
            assert kinds["ActivityCompleted"] == kinds["ActivityScheduled"] == 4, f"{iid}: {kinds}"
    finally:
        worker.stop()
