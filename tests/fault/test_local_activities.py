"""SIGKILL the engine while it runs local activities: every instance still completes exactly once.

A local activity runs inside the transaction that scheduled it, so a kill aborts that transaction
and the restarted engine decides the same commands again, running the activity again. The oracle
reads the ``events`` topic: each instance has gap-free sequence numbers, one terminal event with
the expected result, and each activity's completion recorded once; the activity log written by the
activity itself shows every step ran at least once (more than once is allowed: at-least-once).

Tansu shows records of aborted transactions to ``read_committed`` readers, and a kill inside a
transaction leaves such records behind; there the oracle keeps the last record per sequence number
(the redone transaction's, written after the kill). On Apache Kafka no sequence number may repeat.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from pathlib import Path

from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.dev.procs import engine_process
from kflow.schemas.codec import decode_event
from kflow.streams.topics import ensure_topics
from kflow.testing import assert_eventually
from tests.fault.local_flows import LOCAL3
from tests.fault.test_crash_matrix import read_all

PARTITIONS = 4
INSTANCES = 30


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_sigkill_while_local_activities_run(kafka_bootstrap, kafka_flavor, tmp_path):
    prefix = f"fl{uuid.uuid4().hex[:8]}."
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)
    log = tmp_path / "runs.log"

    def new_engine(state: str):
        return engine_process(kafka_bootstrap, prefix, str(tmp_path / state), partitions=PARTITIONS, engine_id="fl",
                              activities="tests.fault.local_flows",
                              extra_env={"KFLOW_STATIC_MEMBERSHIP": "true"}).start()

    engine = new_engine("e1")
    kills = 0
    try:
        ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)  # engines may not have yet
        with Client(kafka_bootstrap, config=cfg) as client:
            client.deploy(LOCAL3)
            warm = client.start("fl.local3", {"log": str(tmp_path / "warm.log"), "tag": "warm", "x": 0})
            assert warm.result(timeout=120) == 3, engine.log_tail()
            ids = {f"l{i}-{uuid.uuid4().hex[:4]}": i for i in range(INSTANCES)}
            for iid, x in ids.items():
                client.start("fl.local3", {"log": str(log), "tag": iid, "x": x}, id=iid)
            # kill twice while local activities are running (the log grows only while they do);
            # the second restart also loses its disk and restores from the changelog
            for state in ("e1", "e2-fresh"):
                seen = len(lines(log))
                assert_eventually(lambda seen=seen: len(lines(log)) >= seen + 6, timeout=60,
                                  msg="local activities running")
                engine.kill()
                kills += 1
                engine = new_engine(state)
            done = client.wait_many(list(ids), timeout=120)
            assert len(done) == len(ids), engine.log_tail()
    finally:
        engine.kill()
    assert kills == 2

    events = defaultdict(list)
    for m in read_all(kafka_bootstrap, f"{prefix}events"):
        ev = decode_event(m.value())
        if ev.instance_id in ids:
            events[ev.instance_id].append(ev)
    runs = Counter(lines(log))
    problems = []
    for iid, x in ids.items():
        recorded = events[iid]
        if kafka_flavor == "tansu":
            last = {ev.seq: ev for ev in recorded}  # topic order: the redone transaction's record wins
            recorded = [last[s] for s in sorted(last)]
        seqs = [ev.seq for ev in recorded]
        if seqs != list(range(1, len(seqs) + 1)):
            problems.append(f"{iid}: seqs not exactly once 1..n: {seqs}")
            continue
        terminal = [ev for ev in recorded if ev.type in ("WorkflowCompleted", "WorkflowFailed")]
        if [(ev.type, ev.data.get("result")) for ev in terminal] != [("WorkflowCompleted", x + 3)]:
            problems.append(f"{iid}: terminal events {[(ev.type, ev.data) for ev in terminal]}")
        completed = Counter(ev.data["activity_id"] for ev in recorded if ev.type == "ActivityCompleted")
        if len(completed) != 3 or any(n != 1 for n in completed.values()):
            problems.append(f"{iid}: activity completions recorded {dict(completed)}")
        for step in "abc":
            if runs[f"{iid}:{step}"] < 1:
                problems.append(f"{iid}: step {step} never ran")
    assert not problems, f"{len(problems)} of {len(ids)} instances wrong:\n" + "\n".join(problems[:20])
    # at-least-once: a killed batch's local activities ran, and ran again when it was redone
    assert sum(runs.values()) >= 3 * INSTANCES
