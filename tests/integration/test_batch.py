"""Batch operations on the real broker, engine and visibility server: a batch cancel, a batch with a
closed instance in it, the HTTP API, and a batch killed with SIGKILL and continued, which must signal
every instance exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from kflow.batch import BatchLog
from kflow.cli import app
from kflow.testing import assert_eventually
from kflow.visibility.server import VisibilityServer
from tests.integration.conftest import visibility_server

#: Waits for a signal, then for another that never comes: the instance stays open, so a second
#: delivery of the first signal would be recorded (and counted) rather than rejected.
PARKED = {"name": "batch_parked", "version": 1, "steps": [
    {"id": "first", "wait": {"signal": "ping"}, "output": "p"},
    {"id": "second", "wait": {"signal": "never"}, "output": "q"},
    {"id": "done", "succeed": "p"},
]}
#: Completes on its first signal.
ONE_SHOT = {"name": "batch_one_shot", "version": 1, "steps": [
    {"id": "wait", "wait": {"signal": "go"}, "output": "g"},
    {"id": "done", "succeed": "g"},
]}


@pytest.fixture(scope="module")
def vis(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VisibilityServer]:
    stack.client.deploy(PARKED)
    stack.client.deploy(ONE_SHOT)
    with visibility_server(stack, tmp_path_factory, "batch") as server:
        yield server


def _cli(stack: Any, *args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--bootstrap", stack.bootstrap, "--prefix", stack.prefix])


def _start(stack: Any, workflow: str, n: int) -> tuple[str, list[str]]:
    tag = f"bt{uuid.uuid4().hex[:6]}-"
    ids = [f"{tag}{i:03d}" for i in range(n)]
    for iid in ids:
        stack.client.start(workflow, {"n": 1}, id=iid)
    return tag, ids


def _status(stack: Any, iid: str) -> str:
    st = stack.client.status(iid)
    return st["status"] if st else "MISSING"


def _visible(vis: VisibilityServer, ids: list[str], status: str) -> None:
    def seen() -> bool:
        with httpx.Client(base_url=vis.url, timeout=10) as http:
            return all(http.get(f"/api/instances/{i}").json().get("status") == status for i in ids)

    assert_eventually(seen, timeout=60, msg=f"instances not {status} in the visibility store")


def _batch_of(stack: Any, tag: str) -> Any:
    """The header of the batch whose query names ``tag`` (the test's own instances)."""
    log = BatchLog(stack.kafka_config(type(stack.client.config)))
    try:
        return next((h for h in log.headers() if tag in h["where"]), None)
    finally:
        log.close()


def _types(stack: Any, iid: str) -> list[str]:
    return [e.type for e in stack.client.history(iid)]


def test_batch_cancel_of_every_instance_a_query_selects(stack, vis):
    tag, ids = _start(stack, "batch_parked", 6)
    _, others = _start(stack, "batch_parked", 2)  # not selected: another id prefix
    _visible(vis, ids + others, "RUNNING")
    res = _cli(stack, "batch", "cancel", "--where", f"id_prefix={tag} AND workflow=batch_parked AND status=RUNNING",
               "--reason", "recall", "--api", vis.url, "--rate", "100/s")
    assert res.exit_code == 0, res.output
    assert "COMPLETED: cancel of 6 instance(s)" in res.output and "6 applied, 0 rejected" in res.output
    for iid in ids:
        assert_eventually(lambda iid=iid: _status(stack, iid) == "CANCELLED", timeout=30)
        cancelled = [e for e in stack.client.history(iid) if e.type == "WorkflowCancelled"]
        assert len(cancelled) == 1 and cancelled[0].data["reason"].endswith(": recall")
    assert all(_status(stack, iid) == "RUNNING" for iid in others)
    header = _batch_of(stack, tag)
    assert header["status"] == "COMPLETED" and header["counts"]["applied"] == 6 and header["total"] == 6
    report = _cli(stack, "batch", "report", header["id"], "--format", "json")
    assert report.exit_code == 0 and report.output.count('"result": "applied"') == 6


def test_a_closed_instance_gets_its_own_error_and_the_rest_are_applied(stack, vis):
    tag, ids = _start(stack, "batch_one_shot", 3)
    _visible(vis, ids, "RUNNING")
    closed = ids[1]
    stack.client.signal(closed, "go", "now")
    _visible(vis, [closed], "COMPLETED")
    res = _cli(stack, "batch", "suspend", "--where", f"id_prefix={tag}", "--api", vis.url)
    assert res.exit_code == 1  # not every instance was applied
    assert "2 applied, 1 rejected" in res.output
    assert (f"{closed}: rejected INVALID_STATE: expected an open instance to suspend, but '{closed}' is closed "
            f"(COMPLETED)") in res.output
    assert "error: 1 of 3 instance(s) were not applied" in res.output
    assert [_status(stack, i) for i in ids] == ["SUSPENDED", "COMPLETED", "SUSPENDED"]
    assert "WorkflowSuspended" not in _types(stack, closed)
    header = _batch_of(stack, tag)
    report = _cli(stack, "batch", "report", header["id"], "--only", "rejected", "--format", "json")
    assert report.exit_code == 0 and report.output.count("instance_id") == 1 and closed in report.output


def test_bad_input_creates_no_batch(stack, vis):
    tag = f"bt{uuid.uuid4().hex[:6]}-"
    res = _cli(stack, "batch", "resume", "--where", f"id_prefix={tag}", "--api", vis.url)
    assert res.exit_code == 1 and f"error: no instance matches 'id_prefix={tag}': no batch was created" in res.output
    res = _cli(stack, "batch", "signal", "--where", f"id_prefix={tag} AND stauts=RUNNING", "--name", "x")
    assert res.exit_code == 1 and "unknown field 'stauts'" in res.output
    assert _batch_of(stack, tag) is None


def test_the_http_api_creates_runs_and_reports_a_batch(stack, vis):
    tag, ids = _start(stack, "batch_one_shot", 3)
    _visible(vis, ids, "RUNNING")
    with httpx.Client(base_url=vis.url, timeout=30) as http:
        bad = http.post("/api/batches", json={"operation": "signal", "where": f"id_prefix={tag}"})
        assert bad.status_code == 400 and "needs the signal name" in bad.json()["error"]
        bad = http.post("/api/batches", json={"operation": "migrate", "where": f"id_prefix={tag}"})
        assert bad.status_code == 400 and "needs its migration plan" in bad.json()["error"]
        bad = http.post("/api/batches", json={"operation": "cancel", "where": "workfow=x"})
        assert bad.status_code == 400 and "unknown field 'workfow'" in bad.json()["error"]
        r = http.post("/api/batches", json={"operation": "signal", "where": f"id_prefix={tag} AND status=RUNNING",
                                            "signal": "go", "data": {"by": "api"}, "rate": "20/s"})
        assert r.status_code == 202, r.text
        created = r.json()
        assert created["total"] == 3 and created["operation"] == "signal"
        got = assert_eventually(lambda: (b := http.get(f"/api/batches/{created['id']}").json())["status"]
                                == "COMPLETED" and b, timeout=60)
        assert got["counts"]["applied"] == 3 and {i["instance_id"] for i in got["instances"]} == set(ids)
        assert created["id"] in {b["id"] for b in http.get("/api/batches").json()["items"]}
        assert http.get("/api/batches/b-nope").status_code == 404
    for iid in ids:
        assert stack.client.result(iid, timeout=30) == {"by": "api"}


def test_a_batch_killed_midway_and_continued_signals_every_instance_exactly_once(stack, vis, tmp_path):
    tag, ids = _start(stack, "batch_parked", 40)
    for iid in ids:
        assert_eventually(lambda iid=iid: _status(stack, iid) == "RUNNING", timeout=30)
    env = {**os.environ, "KFLOW_BOOTSTRAP": stack.bootstrap, "KFLOW_TOPIC_PREFIX": stack.prefix}
    env.pop("KFLOW_API", None)
    out = open(tmp_path / "batch.out", "wb")
    # no --api: the query is resolved from the state topic, the other way of selecting
    proc = subprocess.Popen([sys.executable, "-m", "kflow", "batch", "signal", "--where", f"id_prefix={tag}",
                             "--name", "ping", "--data", '"once"', "--rate", "10/s", "--checkpoint-every", "3"],
                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        header = assert_eventually(
            lambda: (h := _batch_of(stack, tag)) is not None and h["counts"].get("applied", 0) >= 6 and h,
            timeout=60, interval=0.02, msg=f"progress of the batch ({(tmp_path / 'batch.out').read_text()!r})")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
    killed = _batch_of(stack, tag)
    assert killed["status"] == "RUNNING" and killed["counts"]["pending"] > 0, killed  # it really was cut short
    res = _cli(stack, "batch", "continue", header["id"], "--rate", "50/s")
    assert res.exit_code == 0, res.output + (tmp_path / "batch.out").read_text()
    assert "COMPLETED: signal of 40 instance(s)" in res.output and "40 applied" in res.output
    for iid in ids:
        pings = [e for e in stack.client.history(iid) if e.type == "SignalReceived" and e.data["name"] == "ping"]
        assert len(pings) == 1, (iid, pings)
        assert pings[0].data["signal_id"] == f"{header['id']}:{iid}"
    final = _batch_of(stack, tag)
    assert final["status"] == "COMPLETED" and final["runs"] == 2 and final["counts"]["applied"] == 40


class _Crash(BaseException):
    """Stands for the process dying: nothing in the runner catches it."""


class _DyingLog(BatchLog):
    """A batches log whose process dies at its second checkpoint: after every command was sent and
    answered, before any outcome was recorded — the widest window a crash can leave."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.checkpoints = 0

    def checkpoint(self, record: Any, chunks: Any = ()) -> None:
        self.checkpoints += 1
        if self.checkpoints >= 2:
            raise _Crash()
        super().checkpoint(record, chunks)


@pytest.mark.parametrize("operation,args,applied_event", [
    ("signal", {"name": "ping", "data": 1}, "SignalReceived"),
    ("cancel", {"reason": "recall"}, "WorkflowCancelled"),
])
def test_commands_sent_but_not_recorded_before_a_crash_are_applied_once(stack, vis, operation, args, applied_event):
    from kflow.batch import BatchRunner, new_batch, parse_where, select_from_state

    tag, ids = _start(stack, "batch_parked", 5)
    for iid in ids:
        assert_eventually(lambda iid=iid: _status(stack, iid) == "RUNNING", timeout=30)
    where = parse_where(f"id_prefix={tag}")
    config = stack.client.config
    dying = _DyingLog(config)
    rec = new_batch(dying, operation, where, select_from_state(config, where), args, 1000.0, "test")
    assert len(rec.ids) == 5
    runner = BatchRunner(stack.client, dying, checkpoint_every=len(ids))
    with pytest.raises(_Crash):
        runner.run(rec.id)
    for iid in ids:  # every command went out and was applied, but the batch recorded none of it
        assert_eventually(lambda iid=iid: applied_event in _types(stack, iid), timeout=30)
    log = BatchLog(config)
    assert log.load(rec.id).outcomes == {} and log.load(rec.id).header["status"] == "RUNNING"
    done = BatchRunner(stack.client, log).run(rec.id)  # the continue: all five are sent again
    log.close()
    dying.close()
    assert done.header["status"] == "COMPLETED" and done.header["runs"] == 2
    assert all(o.result == "applied" and o.earlier for o in done.outcomes.values()), done.outcomes
    for iid in ids:
        assert _types(stack, iid).count(applied_event) == 1


def test_dry_run_list_status_stop_and_continue(stack, vis):
    from kflow.batch import BatchRunner, new_batch, parse_where

    tag, ids = _start(stack, "batch_parked", 8)
    for iid in ids:
        assert_eventually(lambda iid=iid: _status(stack, iid) == "RUNNING", timeout=30)
    dry = _cli(stack, "batch", "terminate", "--where", f"id_prefix={tag}", "--dry-run")
    assert dry.exit_code == 0 and f"8 instance(s) match 'id_prefix={tag}'" in dry.output
    assert _batch_of(stack, tag) is None and all(_status(stack, i) == "RUNNING" for i in ids)

    config = stack.client.config
    log = BatchLog(config)
    rec = new_batch(log, "signal", parse_where(f"id_prefix={tag}"), ids, {"name": "ping"}, 4.0, "test")
    listed = _cli(stack, "batch", "list")
    assert listed.exit_code == 0 and f"{rec.id}  CREATED" in listed.output
    asked: list[int] = []

    def stop_after_two(r: Any) -> None:  # `kflow batch stop` from another terminal, mid-run
        if r.counts()["applied"] >= 2 and not asked:
            asked.append(1)
            assert _cli(stack, "batch", "stop", rec.id).exit_code == 0

    done = BatchRunner(stack.client, log, on_progress=stop_after_two).run(rec.id)
    log.close()
    applied = [i for i in ids if done.outcomes.get(i) is not None]
    assert done.header["status"] == "CANCELLED" and 2 <= len(applied) < len(ids)
    unsent = [i for i in ids if i not in applied]
    assert all("SignalReceived" not in _types(stack, i) for i in unsent)
    status = _cli(stack, "batch", "status", rec.id)
    assert status.exit_code == 0 and f"batch {rec.id} CANCELLED: signal of 8 instance(s)" in status.output
    again = _cli(stack, "batch", "continue", rec.id)
    assert again.exit_code == 1 and f"batch {rec.id} is CANCELLED: there is nothing to continue" in again.output
    assert _cli(stack, "batch", "status", "b-nope").output.strip().endswith("no batch with id 'b-nope' "
                                                                           "(kflow batch list shows them)")
