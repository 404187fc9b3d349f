"""Quotas and activity limits end to end on the real broker: an activity limit of 5 holds across three
worker processes with their own consumers, a per-tenant quota of 2 runs 2 and queues 4 (admitted as the first
complete), `kflow limits apply` refuses a bad file and applies nothing, `kflow queues` shows the
counters, and `kflow priority` records a PriorityChanged."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from kflow.cli import app
from kflow.dev.procs import worker_process
from kflow.testing import assert_eventually
from tests.integration.conftest import PARTITIONS, xfail_where_tansu_skips

SLOW = {"name": "lim_slow", "version": 1, "steps": [{"id": "call", "task": "lim.erp", "input": "input"}]}
WAIT = {"name": "lim_wait", "version": 1, "steps": [{"id": "w", "wait": {"signal": "done"}}]}


def _cli(stack: Any, *args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--bootstrap", stack.bootstrap, "--prefix", stack.prefix])


def _in_force(stack: Any, name: str) -> None:
    """Every engine of the stack has read limit ``name`` (starts decided from now on see it)."""
    assert_eventually(lambda: all(proc.quotas.get(name) is not None for proc, _ in stack.engines), timeout=30)


def _diagnosis(client: Any, ids: list[str], done: dict[str, Any], workers: list[Any]) -> str:
    """What a stalled run looked like: the limit's counter, the unfinished instances, the workers' last lines."""
    aborts = REGISTRY.get_sample_value("kflow_engine_transaction_aborts_total")
    moves = {k: REGISTRY.get_sample_value("kflow_engine_rebalances_total", {"kind": k}) for k in ("assign", "revoke")}
    lines = [f"{len(done)} of {len(ids)} finished; this test process's engines: {aborts} transactions aborted, "
             f"rebalances {moves}"]
    try:
        lines.append(f"counter: {client.limit_counters().get('limit:erp')}")
    except Exception as exc:  # the diagnosis must not hide the failure it describes
        lines.append(f"counter: unreadable ({exc})")
    for i in [i for i in ids if i not in done][:10]:
        try:
            st = client.status(i, scan=True) or {}
        except Exception as exc:
            st = {"error": str(exc)}
        internal = st.get("internal") or {}
        lines.append(f"{i}: {st.get('status')} seq={st.get('seq')} activities={internal.get('activities')} "
                     f"permits={internal.get('permits')}")
    try:
        lines.append(_permits_in_log(client))
    except Exception as exc:
        lines.append(f"commands log: unreadable ({exc})")
    for n, w in enumerate(workers):
        tail = Path(w.log_path).read_text(errors="replace").splitlines()[-15:]
        lines.append(f"worker {n} (alive={w.alive()}):\n  " + "\n  ".join(tail))
    return "\n".join(lines)


def _permits_in_log(client: Any) -> str:
    """Which holders' AcquirePermit the counter's partition of ``commands`` holds, read uncommitted and
    committed, with their offsets: tells a request missing from the log from one in it but not decided."""
    from confluent_kafka import Consumer, TopicPartition

    from kflow.schemas.codec import decode_command
    from kflow.streams.partitioner import partition_for

    topic, p = client.config.names.commands, partition_for("limit:erp", PARTITIONS)
    out = []
    for isolation in ("read_uncommitted", "read_committed"):
        c = Consumer({"bootstrap.servers": client.config.bootstrap, "group.id": f"diag-{uuid.uuid4().hex[:6]}",
                      "isolation.level": isolation, "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        try:
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            c.assign([TopicPartition(topic, p, 0)])
            seen: list[str] = []
            last = -1
            while last < high - 1:
                msgs = c.consume(500, 2)
                if not msgs:
                    break
                for m in msgs:
                    if m.error():
                        continue
                    last = m.offset()
                    cmd = decode_command(m.value(), m.headers())
                    if cmd.type == "AcquirePermit":
                        seen.append(f"{cmd.data['holder'][:8]}@{m.offset()}")
            out.append(f"{topic}[{p}] {isolation} (high {high}, read to {last}): "
                       f"{len(seen)} AcquirePermit {seen}")
        finally:
            c.close()
    return "\n".join(out)


#: Seconds without a single instance finishing after which the limit test stops waiting (a normal run
#: finishes all 30 in about 10 s).
STALL_S = 30


@pytest.mark.timeout(420)
def test_activity_limit_of_5_holds_with_3_worker_processes(engine_only_stack: Any, tmp_path: Path, monkeypatch: Any,
                                                           kafka_flavor: str, request: pytest.FixtureRequest) -> None:
    # seen about once in five parallel full runs: one to five AcquirePermit requests, committed by their
    # instances' transactions and present in the log (a fresh reader sees them), never reached the counter
    xfail_where_tansu_skips(request, kafka_flavor, "an AcquirePermit never reaches the limit's counter")
    stack = engine_only_stack
    client = stack.client
    client.deploy(SLOW)
    limits = tmp_path / "limits.yaml"
    limits.write_text("limits:\n  - {name: erp, activity: lim.erp, max_in_flight: 5}\n")
    out = _cli(stack, "limits", "apply", str(limits))
    assert out.exit_code == 0 and "erp: activity lim.erp: in flight <= 5" in out.output, out.output
    _in_force(stack, "erp")
    counter = tmp_path / "inflight.json"
    counter.write_text(json.dumps({"now": 0, "max": 0, "done": 0, "pids": []}))
    monkeypatch.setenv("KFLOW_TEST_INFLIGHT_FILE", str(counter))
    # three `kflow worker` processes, each its own consumer in the group, each able to run 10 at once
    workers = [worker_process(stack.bootstrap, stack.prefix, ["tests.integration.limit_activities"],
                              partitions=PARTITIONS, concurrency=10).start() for _ in range(3)]
    try:
        # the group is settled once the last to join has its share: no task is then handed over mid-run
        assert_eventually(lambda: all("assigned" in Path(w.log_path).read_text(errors="replace") for w in workers),
                          timeout=120, msg="the three worker processes did not all join the group")
        ids = [client.start("lim_slow", {"n": n}).id for n in range(30)]
        # waited for on the state topic (no query per check), in rounds for as long as instances keep
        # finishing (up to 300 s on a loaded machine), so a stall costs one round, not the whole budget
        done: dict[str, dict[str, Any]] = {}
        for _ in range(300 // STALL_S):
            got = client.wait_many([i for i in ids if i not in done], timeout=STALL_S)
            done.update(got)
            if len(done) == len(ids) or not got:
                break
        if len(done) != 30:  # kept in tests/artifacts/ as well: an xfail hides its message
            why = _diagnosis(client, ids, done, workers)
            out = Path(__file__).resolve().parents[1] / "artifacts"
            out.mkdir(parents=True, exist_ok=True)
            (out / f"limit-stall-{uuid.uuid4().hex[:6]}.txt").write_text(why + "\n")
            pytest.fail(why)
        assert {s["status"] for s in done.values()} == {"COMPLETED"}, done
    finally:
        for w in workers:
            w.kill()
    seen = json.loads(counter.read_text())
    assert seen["done"] == 30
    assert seen["max"] <= 5, f"{seen['max']} attempts ran at once under a limit of 5"
    assert seen["max"] >= 2  # attempts did run side by side
    assert len(seen["pids"]) >= 2, seen  # and more than one worker process ran them

    granted = REGISTRY.get_sample_value("kflow_limit_permits_total", {"key": "limit:erp", "outcome": "granted"})
    assert granted is not None and granted >= 30
    assert_eventually(lambda: REGISTRY.get_sample_value("kflow_limit_in_use", {"key": "limit:erp"}) == 0, timeout=30)

    shown = _cli(stack, "queues")
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if "erp" in line)
    assert [c.strip() for c in row.split("│")[1:8]] == ["erp", "-", "0", "5", "-", "0", "30"], row


def test_quota_of_2_per_tenant_runs_2_and_admits_the_queued_as_runs_complete(engine_only_stack: Any,
                                                                              tmp_path: Path) -> None:
    stack = engine_only_stack
    client = stack.client
    client.deploy(WAIT)
    client.apply_limits({"limits": [{"name": "per-tenant", "tenant": "*", "max_running": 2}]})
    _in_force(stack, "per-tenant")
    ids = [f"q-{uuid.uuid4().hex[:6]}-{n}" for n in range(6)]
    for i in ids:
        client.start("lim_wait", None, id=i)

    def statuses() -> list[str]:
        return [(client.status(i, timeout=30) or {}).get("status", "?") for i in ids]  # answered by a loaded engine

    def two_running() -> bool:
        now = statuses()
        assert sorted(now) == ["QUEUED"] * 4 + ["RUNNING"] * 2, dict(zip(ids, now, strict=True))
        return True

    assert_eventually(two_running, timeout=60)  # a failure names each instance's status ("?": none yet)
    # starts on other partitions reach the counter in their own order: FIFO is by arrival there
    first = [i for i, s in zip(ids, statuses(), strict=True) if s == "RUNNING"]
    queued = [i for i in ids if i not in first]
    shown = _cli(stack, "queues")
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if "per-tenant" in line)
    assert [c.strip() for c in row.split("│")[1:8]] == ["per-tenant", "default", "2", "2", "-", "4", "2"], row

    client.signal(first[0], "done")
    assert_eventually(lambda: sorted(statuses()) == ["COMPLETED"] + ["QUEUED"] * 3 + ["RUNNING"] * 2, timeout=60)
    done = {first[0]}
    while len(done) < 6:
        now = statuses()
        assert sum(s == "RUNNING" for s in now) <= 2
        running = [i for i, s in zip(ids, now, strict=True) if s == "RUNNING" and i not in done]
        if not running:
            continue
        closing = running[0]
        client.signal(closing, "done")
        done.add(closing)
        assert_eventually(lambda c=closing: (client.status(c, timeout=30) or {}).get("status") == "COMPLETED", timeout=60)
    assert_eventually(lambda: statuses() == ["COMPLETED"] * 6, timeout=60)
    history = [e.type for e in client.history(queued[0])]
    assert history[:3] == ["WorkflowQueued", "PermitGranted", "WorkflowStarted"]


def test_bad_limit_file_is_one_error_and_nothing_is_applied(engine_only_stack: Any, tmp_path: Path) -> None:
    stack = engine_only_stack
    good = tmp_path / "good.yaml"
    good.write_text("limits:\n  - {name: keep, tenant: '*', max_running: 3}\n")
    assert _cli(stack, "limits", "apply", str(good)).exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits:\n  - {name: keep, tenant: '*', max_running: -3}\n  - {name: x, activity: a, rate: fast}\n")
    out = _cli(stack, "limits", "apply", str(bad))
    assert out.exit_code != 0
    assert "max_running: expected a non-negative limit, but got -3" in out.output
    assert "rate: expected a rate such as 10/s" in out.output
    shown = _cli(stack, "limits", "show")
    assert shown.exit_code == 0 and "keep: every tenant: running <= 3; queue" in shown.output, shown.output


def test_priority_command_records_a_priority_change(engine_only_stack: Any) -> None:
    stack = engine_only_stack
    client = stack.client
    client.deploy(WAIT)
    handle = client.start("lim_wait", None)
    assert_eventually(lambda: (client.status(handle.id) or {}).get("status") == "RUNNING", timeout=30)
    out = _cli(stack, "priority", handle.id, "critical", "--reason", "escalated")
    assert out.exit_code == 0, out.output
    assert_eventually(lambda: "PriorityChanged" in [e.type for e in client.history(handle.id)], timeout=30)
    assert (client.status(handle.id) or {})["internal"]["priority"] == 1
    bad = _cli(stack, "priority", handle.id, "urgent")
    assert bad.exit_code != 0 and "unknown priority 'urgent'" in bad.output
