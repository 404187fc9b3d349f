"""An engine SIGKILLed while it migrates waiting instances: each ends migrated or untouched, never half.

One engine process holds 400 instances waiting on a signal (version 1.0.1). Twenty are sent
``MigrateWorkflow`` to 2.0.0; once the first ``WorkflowMigrated`` is visible the other 380 are sent
and the engine is SIGKILLed as soon as the broker has them (while it decides them), then restarted with the same identity (its transactional id fences
the dead one's open transaction). The oracle reads the ``events`` and ``state`` topics: every
instance has at most one ``WorkflowMigrated``, its sequence numbers have no gap, and its last state
record equals the fold of its events, so the version and the variables of the state agree with
whether the event is there. Then every instance is signalled and must complete on the path of the
version its state names.
"""

from __future__ import annotations

import uuid
from collections import defaultdict

import pytest

from kflow._migration import load_plan, plan_command
from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.dev.failover import wait_for
from kflow.dev.procs import engine_process
from kflow.engine import InMemoryDefinitions, compile_spec, fold
from kflow.engine.core import EVENTS_OFFSET
from kflow.model.versions import version_code
from kflow.schemas.codec import decode_engine_state, decode_event
from kflow.streams.topics import ensure_topics
from tests.fault.test_crash_matrix import read_all, tansu_gap  # noqa: F401 (a fixture)

PARTITIONS = 4
N = 400
V1 = {"name": "mig_fault", "version": "1.0.1", "steps": [
    {"id": "hold", "wait": {"signal": "go"}},
    {"id": "done", "succeed": "'v1'"},
]}
V2 = {"name": "mig_fault", "version": "2.0.0", "steps": [
    {"id": "held", "wait": {"signal": "go"}},
    {"id": "done", "succeed": "'v2:' + string(n)"},
]}
PLAN = {"id": "fault-v2", "workflow": "mig_fault", "from": "^1", "to": "2.0.0", "step_map": {"hold": "held"},
        "vars": {"n": "input.n + 1"}}


def _events(bootstrap: str, prefix: str, tag: str) -> dict[str, list]:
    """Events per instance of ``tag``, one per sequence number (a seq seen again after an abort: the later one)."""
    by_seq: dict[str, dict[int, object]] = defaultdict(dict)
    for m in read_all(bootstrap, f"{prefix}events"):
        if m.key() and m.key().decode().startswith(tag):
            ev = decode_event(m.value())
            by_seq[ev.instance_id][ev.seq] = ev
    return {iid: [evs[s] for s in sorted(evs)] for iid, evs in by_seq.items()}


def _migrated(bootstrap: str, prefix: str, tag: str) -> int:
    return sum(1 for evs in _events(bootstrap, prefix, tag).values() for e in evs if e.type == "WorkflowMigrated")


@pytest.mark.fault
def test_a_killed_engine_leaves_every_instance_migrated_or_untouched(kafka_bootstrap, tmp_path, tansu_gap):  # noqa: F811 (a fixture imported above)
    prefix = f"mf{uuid.uuid4().hex[:8]}."
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)
    tag = "mf-"
    ids = [f"{tag}{i:04d}" for i in range(N)]

    def engine():
        p = engine_process(kafka_bootstrap, prefix, str(tmp_path / "state"), partitions=PARTITIONS, engine_id="mf")
        p.log_path = str(tmp_path / "engine.log")
        return p.start()

    proc = engine()
    try:
        ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)
        with Client(kafka_bootstrap, config=cfg) as client:
            client.deploy(V1)
            client.deploy(V2)
            for i, iid in enumerate(ids):
                client.start("mig_fault", {"n": i}, id=iid, version="1.0.1", confirm=False)
            client.flush(60)
            wait_for("every instance to start", lambda: all(
                len(evs) >= 1 for evs in _events(kafka_bootstrap, prefix, tag).values())
                and len(_events(kafka_bootstrap, prefix, tag)) == N, 180, [proc])
            plan = load_plan(PLAN)
            first, rest = ids[:20], ids[20:]
            for iid in first:
                client.send_command(plan_command(plan, iid, f"mig:{iid}"), confirm=False)
            client.flush(60)
            wait_for("the first migration", lambda: _migrated(kafka_bootstrap, prefix, tag) > 0, 120, [proc])
            for iid in rest:  # the engine is deciding these when it is killed
                client.send_command(plan_command(plan, iid, f"mig:{iid}"), confirm=False)
            client.flush(60)
            proc.kill()
            proc = engine()
            wait_for("every migration command to be decided", lambda: _migrated(kafka_bootstrap, prefix, tag) == N,
                     180, [proc])

            defs = InMemoryDefinitions()
            defs.add(compile_spec(V1))
            defs.add(compile_spec(V2))
            events = _events(kafka_bootstrap, prefix, tag)
            last_state = {}
            for m in read_all(kafka_bootstrap, f"{prefix}engine-state"):
                if m.key() and m.key().decode().startswith(tag):
                    iid_, internal = decode_engine_state(m.value())
                    last_state[iid_] = {"internal": internal}
            problems = []
            for i, iid in enumerate(ids):
                evs = events[iid]
                if [e.seq for e in evs] != list(range(1, len(evs) + 1)):
                    problems.append(f"{iid}: sequence numbers {[e.seq for e in evs]}")
                moves = [e for e in evs if e.type == "WorkflowMigrated"]
                if len(moves) > 1:
                    problems.append(f"{iid}: migrated {len(moves)} times")
                folded = fold(evs, defs)
                st = last_state[iid]["internal"]
                if {k: v for k, v in st.items() if k != EVENTS_OFFSET} != folded:  # an offset, not folded
                    problems.append(f"{iid}: the state record differs from the fold of its events")
                migrated = bool(moves)
                if (st["version"] == version_code("2.0.0")) != migrated or (st["vars"].get("n") == i + 1) != migrated:
                    problems.append(f"{iid}: version {st['version']} and vars {st['vars']} disagree with "
                                    f"{'a' if migrated else 'no'} WorkflowMigrated")
            assert not problems, "\n".join(problems[:20])

            for iid in ids:
                client.signal(iid, "go", None)
            done = client.wait_many(ids, timeout=180)
            assert len(done) == N
            assert {iid: s["result"] for iid, s in done.items()} == {iid: f"v2:{i + 1}" for i, iid in enumerate(ids)}
    finally:
        proc.stop()
