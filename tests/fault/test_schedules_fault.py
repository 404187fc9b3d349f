"""A schedule firing every second while its engine is SIGKILLed: no run id starts twice, none is lost.

One engine process fires an every-second ``allow_all`` schedule; it is SIGKILLed twice at
arbitrary moments (inside a firing transaction or between two) and restarted with the same
identity (its transactional id fences the dead one's open transaction). The oracle reads the
``commands`` topic: every run id of the schedule was started by exactly one firing decision; the
``events`` topic: every run completed; and the scheduled seconds from the first run to the last
have no hole (the seconds the engine was down are caught up after the restart).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime

import pytest

from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.dev.failover import wait_for
from kflow.dev.procs import engine_process
from kflow.schemas.codec import decode_command, decode_event
from kflow.streams.topics import ensure_topics
from tests.fault.test_crash_matrix import read_all, tansu_gap  # noqa: F401 (a fixture)

PARTITIONS = 4
QUICK = {"name": "sched_fault_quick", "version": 1, "steps": [{"id": "s", "set": {"x": "1"}}]}


def _second(run_id: str) -> int:
    return int(datetime.fromisoformat(run_id.split(":", 1)[1].replace("Z", "+00:00")).timestamp())


def _run_events(bootstrap: str, prefix: str, sid: str) -> dict[str, list[str]]:
    """Event types per run id of schedule ``sid``, as read (read_committed) from the events topic."""
    out: dict[str, list[str]] = defaultdict(list)
    for m in read_all(bootstrap, f"{prefix}events"):
        if m.key() and m.key().decode().startswith(f"{sid}:"):
            ev = decode_event(m.value())
            out[ev.instance_id].append(ev.type)
    return out


def _open_runs(bootstrap: str, prefix: str, sid: str) -> list[str]:
    return [rid for rid, types in _run_events(bootstrap, prefix, sid).items() if "WorkflowCompleted" not in types]


@pytest.mark.fault
def test_no_run_starts_twice_across_engine_sigkills(kafka_bootstrap, tmp_path, tansu_gap):  # noqa: F811 (a fixture imported above)
    prefix = f"sf{uuid.uuid4().hex[:8]}."
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=PARTITIONS, dev_tuning=True)
    sid = "every-second"

    def engine():
        p = engine_process(kafka_bootstrap, prefix, str(tmp_path / "state"), partitions=PARTITIONS, engine_id="sf")
        p.log_path = str(tmp_path / "engine.log")
        return p.start()

    proc = engine()
    try:
        ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings)  # the engine may not have yet
        with Client(kafka_bootstrap, config=cfg) as client:
            client.deploy(QUICK)
            client.create_schedule(sid, QUICK["name"], every="1s", overlap="allow_all")

            def started() -> int:
                return (client.describe_schedule(sid) or {}).get("runs_started", 0)

            for kills in range(2):
                target = started() + 3
                wait_for(f"{target} runs before kill {kills + 1}", lambda target=target: started() >= target, 120, [proc])
                proc.kill()
                proc = engine()
            target = started() + 3
            wait_for("3 runs after the last restart", lambda: started() >= target, 120, [proc])
            client.pause_schedule(sid)
            wait_for("the schedule to pause", lambda: (client.describe_schedule(sid) or {}).get("paused"), 60, [proc])
            wait_for("every run to complete", lambda: not _open_runs(kafka_bootstrap, prefix, sid), 120, [proc])
    finally:
        proc.stop()

    # Each firing decision gives its StartWorkflow a deterministic command id (the schedule's key
    # and event sequence number), so a firing redone after an aborted transaction carries the same
    # one (as does an aborted record the embedded broker shows read_committed readers); a second
    # firing of a scheduled time would carry another.
    starts: dict[str, set[str]] = defaultdict(set)
    for m in read_all(kafka_bootstrap, f"{prefix}commands"):
        if m.key() and m.key().decode().startswith(f"{sid}:"):
            cmd = decode_command(m.value())
            if cmd.type == "StartWorkflow":
                starts[cmd.instance_id].add(cmd.command_id)
    assert starts, "the schedule started no run"
    twice = {rid: sorted(ids) for rid, ids in starts.items() if len(ids) > 1}
    assert not twice, f"run ids started by more than one firing: {twice}"
    completed = {rid for rid, types in _run_events(kafka_bootstrap, prefix, sid).items() if "WorkflowCompleted" in types}
    assert completed == set(starts), f"runs that never completed: {sorted(set(starts) - completed)}"
    seconds = sorted(_second(rid) for rid in starts)
    holes = sorted(set(range(seconds[0], seconds[-1] + 1)) - set(seconds))
    assert not holes, f"scheduled seconds without a run (not caught up): {holes}"
