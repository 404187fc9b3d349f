"""Migration on the real broker and engine: code workflows move by replay (what-if first), and a spec
instance with an activity in flight moves in the decision that records the activity's result."""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import kflow
from kflow.cli import app
from kflow.testing import assert_eventually
from kflow.worker import activity
from tests.integration.conftest import Stack

MODULE = "tests.integration.test_migration_safe_point"
#: Set when the gated activity may finish.
GATE = threading.Event()


@activity("mc.reserve")
def reserve(x: Any) -> str:
    return f"{x}>reserve"


@activity("mc.audit")
def audit(x: Any) -> str:
    return f"{x}>audit"


@activity("mc.charge")
def charge(x: Any) -> str:
    return f"{x}>charge"


@activity("mc.slow")
def slow(x: Any) -> dict[str, int]:
    assert GATE.wait(120), "the gate was never opened"
    return {"n": 3}


@activity("mc.tag")
def tag(x: Any) -> str:
    return f"tag:{x}"


@kflow.workflow(name="mig.code", version=1)
async def code_v1(ctx: Any, input: Any) -> Any:
    a = await ctx.activity("mc.reserve", input)
    await ctx.wait_signal("go")
    return await ctx.activity("mc.charge", a)


@kflow.workflow(name="mig.code", version=2)
async def code_v2(ctx: Any, input: Any) -> Any:
    a = await ctx.activity("mc.reserve", input)
    await ctx.wait_signal("go")
    if ctx.patched("audit"):
        a = await ctx.activity("mc.audit", a)
    return await ctx.activity("mc.charge", a)


@kflow.workflow(name="mig.code", version=3)
async def code_v3(ctx: Any, input: Any) -> Any:
    a = await ctx.activity("mc.charge", input)
    await ctx.wait_signal("go")
    return a


SPEC_V1 = {"name": "mig_pipe", "version": "1.0.0", "steps": [
    {"id": "fetch", "task": "mc.slow", "output": "f"},
    {"id": "store", "task": "mc.tag", "input": "'v1'", "output": "t"},
    {"id": "done", "succeed": "t"},
]}
SPEC_V2 = {"name": "mig_pipe", "version": "2.0.0", "steps": [
    {"id": "fetch", "task": "mc.slow", "output": "f"},
    {"id": "store", "task": "mc.tag", "input": "'v2:' + string(size)", "output": "t"},
    {"id": "done", "succeed": "t"},
]}


@pytest.fixture(scope="module")
def code_stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(kafka_bootstrap, f"ms{uuid.uuid4().hex[:8]}.", str(tmp_path_factory.mktemp("migsafe")))
    s.start_engine(workflows=MODULE)
    s.start_worker([sys.modules[__name__]])
    try:
        yield s
    finally:
        GATE.set()
        s.close()


def _cli(stack: Stack, *args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--bootstrap", stack.bootstrap, "--prefix", stack.prefix])


def _plan(tmp_path: Path, **doc: Any) -> Path:
    path = tmp_path / f"plan-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _types(stack: Stack, iid: str) -> list[str]:
    return [e.type for e in stack.client.history(iid)]


@pytest.mark.timeout(300)
def test_code_instances_what_if_then_migrate_by_replay(code_stack: Stack, tmp_path: Path) -> None:
    stack, client = code_stack, code_stack.client
    tag = f"mc{uuid.uuid4().hex[:6]}-"
    ids = [f"{tag}{i}" for i in range(3)]
    for iid in ids:
        client.start("mig.code", "o", id=iid, version=1)
    # each waits for its signal once reserve is done (a safe point)
    assert_eventually(lambda: all(_types(stack, iid).count("ActivityCompleted") == 1 for iid in ids), timeout=60)

    to2 = _plan(tmp_path, id="code-v2", workflow="mig.code", **{"from": "1"}, to=2)
    to3 = _plan(tmp_path, id="code-v3", workflow="mig.code", **{"from": "1"}, to=3)
    bad = _cli(stack, "migrate", "--plan", str(_plan(tmp_path, id="x", workflow="mig.code", **{"from": "1"}, to=2,
                                                        vars={"a": "1"})), "--where", f"id_prefix={tag}", "--dry-run")
    assert bad.exit_code == 1 and "a code workflow moves by replay" in bad.output

    dry = _cli(stack, "migrate", "--plan", str(to2), "--where", f"id_prefix={tag}", "--dry-run", "--workflows", MODULE)
    assert dry.exit_code == 0, dry.output
    for iid in ids:
        assert f"{iid}: compatible\n" in dry.output
    assert "what-if: 3 of 3 histories replay on the target unchanged" in dry.output
    divergent = _cli(stack, "migrate", "--plan", str(to3), "--where", f"id_prefix={tag}", "--dry-run",
                     "--workflows", MODULE)
    assert f"{ids[0]}: diverges at command #0: the history has activity 'mc.reserve', but the target issues " \
           "activity 'mc.charge'" in divergent.output, divergent.output
    replayed = _cli(stack, "replay", "--workflows", MODULE, "--workflow", "mig.code@3", "--where", f"id_prefix={tag}")
    assert replayed.exit_code == 1 and f"{ids[1]}: diverges at command #0" in replayed.output
    assert "WorkflowMigrated" not in _types(stack, ids[0])

    rejected = _cli(stack, "migrate", "--plan", str(to3), "--where", f"id_prefix={ids[0]}")
    assert rejected.exit_code == 1 and "rejected INVALID_STATE" in rejected.output, rejected.output
    assert client.status(ids[0])["version"] == 1

    applied = _cli(stack, "migrate", "--plan", str(to2), "--where", f"id_prefix={tag}", "--workflows", MODULE)
    assert applied.exit_code == 0, applied.output
    assert "3 applied, 0 rejected" in applied.output
    moved = [e for e in client.history(ids[1]) if e.type == "WorkflowMigrated"]
    assert len(moved) == 1 and (moved[0].data["from_version"], moved[0].data["to_version"]) == (1, 2)
    assert moved[0].data["plan_id"] == "code-v2"
    for iid in ids:
        client.signal(iid, "go", None)
    for iid in ids:  # the new code's patched branch runs after the migration
        assert client.result(iid, timeout=60) == "o>reserve>audit>charge"
        assert client.status(iid)["version"] == 2


@pytest.mark.timeout(300)
def test_a_spec_instance_with_an_activity_in_flight_moves_when_it_completes(code_stack: Stack,
                                                                             tmp_path: Path) -> None:
    stack, client = code_stack, code_stack.client
    GATE.clear()
    client.deploy(SPEC_V1)
    client.deploy(SPEC_V2)
    iid = f"mp{uuid.uuid4().hex[:6]}"
    client.start("mig_pipe", None, id=iid, version="1.0.0")
    assert_eventually(lambda: "ActivityScheduled" in _types(stack, iid), timeout=60)
    plan = _plan(tmp_path, id="pipe-v2", workflow="mig_pipe", **{"from": "^1"}, to="2.0.0",
                 vars={"size": "f.n * 10"})
    res = _cli(stack, "migrate", "--plan", str(plan), "--where", f"id_prefix={iid}")
    assert res.exit_code == 0, res.output
    assert "1 applied, 0 rejected" in res.output
    deferred = [e for e in client.history(iid) if e.type == "MigrationDeferred"]
    assert len(deferred) == 1 and "is in flight" in deferred[0].data["waiting_on"]
    state = client.status(iid)
    assert state["version"] == kflow.model.versions.version_code("1.0.0")
    assert state["internal"]["pending_migration"]["plan_id"] == "pipe-v2"
    GATE.set()
    assert client.result(iid, timeout=60) == "tag:v2:30"
    types = _types(stack, iid)
    at = types.index("WorkflowMigrated")
    assert types[at - 1] == "ActivityCompleted" and types[at + 1] == "ActivityScheduled"
    assert client.status(iid)["version"] == kflow.model.versions.version_code("2.0.0")
