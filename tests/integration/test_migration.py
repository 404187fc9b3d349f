"""Migration on the real broker and engine: 1,000 instances waiting on a signal move to version 2.0.0
through `kflow migrate --where`, then complete on the new version's path; the what-if and a range
start run against the same stack."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kflow.batch import parse_where, select_from_state
from kflow.cli import app
from kflow.engine.migration import VersionRangeError
from kflow.model.versions import version_code
from kflow.testing import assert_eventually

V1 = {"name": "mig_order", "version": "1.2.0", "steps": [
    {"id": "approve", "wait": {"signal": "go"}, "output": "g"},
    {"id": "done", "succeed": "'v1'"},
]}
V2 = {"name": "mig_order", "version": "2.0.0", "steps": [
    {"id": "approval", "wait": {"signal": "go"}, "output": "g"},
    {"id": "done", "succeed": "'v2:' + string(total)"},
]}
N = 1000


def _cli(stack: Any, *args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--bootstrap", stack.bootstrap, "--prefix", stack.prefix])


def _plan(tmp_path: Path, **over: Any) -> Path:
    doc = {"id": "to-v2", "workflow": "mig_order", "from": "^1", "to": "2.0.0",
           "step_map": {"approve": "approval"}, "vars": {"total": "size(input.items)"}, **over}
    path = tmp_path / f"plan-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _running(stack: Any, tag: str) -> int:
    return len(select_from_state(stack.client.config, parse_where(f"id_prefix={tag} AND status=RUNNING")))


@pytest.mark.timeout(600)
def test_a_thousand_waiting_instances_migrate_and_complete_on_the_new_version(engine_only_stack: Any,
                                                                               tmp_path: Path) -> None:
    stack = engine_only_stack
    client = stack.client
    client.deploy(V1)
    client.deploy(V2)
    with pytest.raises(VersionRangeError, match="no deployed version of 'mig_order' matches '\\^3'"):
        client.start("mig_order", {"items": [1]}, version="^3")
    tag = f"mg{uuid.uuid4().hex[:6]}-"
    ids = [f"{tag}{i:04d}" for i in range(N)]
    for iid in ids:
        client.start("mig_order", {"items": [1, 2, 3]}, id=iid, version="^1", confirm=False)
    client.flush(60)
    assert_eventually(lambda: _running(stack, tag) == N, timeout=180, msg="instances not all RUNNING")

    plan = _plan(tmp_path)
    bad = _cli(stack, "migrate", "--plan", str(_plan(tmp_path, step_map={"approve": "aproval"})),
               "--where", f"id_prefix={tag}", "--dry-run")
    assert bad.exit_code == 1 and "'aproval' is not a step of mig_order@2" in bad.output

    dry = _cli(stack, "migrate", "--plan", str(plan), "--where", f"id_prefix={tag}", "--dry-run")
    assert dry.exit_code == 0, dry.output
    # a wait records no consequence: 2.0.0 reproduces the history (50 instances are listed, in scan order)
    assert re.search(rf"^{tag}\d{{4}}: compatible$", dry.output, re.M), dry.output
    assert "what-if: 1000 of 1000 histories replay on the target unchanged; 1000 have every position mapped" in dry.output
    unmapped = _cli(stack, "migrate", "--plan", str(_plan(tmp_path, step_map={})), "--where", f"id_prefix={tag}",
                    "--dry-run")
    assert re.search(rf"^{tag}\d{{4}}: compatible; positions without a mapping: approve$", unmapped.output, re.M)
    assert "WorkflowMigrated" not in [e.type for e in client.history(ids[0])]

    res = _cli(stack, "migrate", "--plan", str(plan), "--where", f"id_prefix={tag} AND status=RUNNING",
               "--rate", "5000/s", "--answer-timeout", "120")
    assert res.exit_code == 0, res.output
    assert f"COMPLETED: migrate of {N} instance(s)" in res.output and f"{N} applied, 0 rejected" in res.output

    migrated = [e for e in client.history(ids[7]) if e.type == "WorkflowMigrated"]
    assert len(migrated) == 1 and migrated[0].data["plan_id"] == "to-v2"
    assert migrated[0].data["from_version"] == version_code("1.2.0")
    assert migrated[0].data["to_version"] == version_code("2.0.0")

    sig = _cli(stack, "batch", "signal", "--where", f"id_prefix={tag}", "--name", "go", "--rate", "5000/s",
               "--answer-timeout", "120")
    assert sig.exit_code == 0, sig.output
    done = client.wait_many(ids, timeout=180)
    assert len(done) == N
    assert {s["status"] for s in done.values()} == {"COMPLETED"}
    assert {s["result"] for s in done.values()} == {"v2:3"}
    assert {s["version"] for s in done.values()} == {version_code("2.0.0")}


def test_replay_definition_reports_divergence_and_a_rejected_migration_keeps_the_old_version(
        engine_only_stack: Any, tmp_path: Path) -> None:
    stack = engine_only_stack
    client = stack.client
    client.deploy(V1)
    client.deploy(V2)
    tag = f"mr{uuid.uuid4().hex[:6]}-"
    client.start("mig_order", {"items": []}, id=f"{tag}a", version="1.2.0")
    client.start("mig_order", {"nope": 1}, id=f"{tag}b", version="1.2.0")  # size(input.items) fails on it
    assert_eventually(lambda: _running(stack, tag) == 2, timeout=60)

    target = tmp_path / "v3.yaml"
    target.write_text(yaml.safe_dump({"name": "mig_order", "version": "3.0.0", "steps": [
        {"id": "first", "task": "check"}, {"id": "approve", "wait": {"signal": "go"}}]}))
    rep = _cli(stack, "replay", "--definition", str(target), "--where", f"id_prefix={tag}")
    assert rep.exit_code == 1
    assert f"{tag}a: diverges at event #1" in rep.output and "ActivityScheduled" in rep.output

    res = _cli(stack, "migrate", "--plan", str(_plan(tmp_path)), "--where", f"id_prefix={tag}")
    assert res.exit_code == 1
    assert "1 applied, 1 rejected" in res.output
    assert f"{tag}b: rejected INVALID_INPUT" in res.output and "variable 'total'" in res.output
    assert client.status(f"{tag}a")["version"] == version_code("2.0.0")
    assert client.status(f"{tag}b")["version"] == version_code("1.2.0")
    client.signal(f"{tag}b", "go", True)
    assert client.result(f"{tag}b", timeout=60) == "v1"
