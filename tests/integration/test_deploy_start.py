"""Deploying and starting against a real broker and engine.

A deployed ``name@version`` never changes: the client refuses other content before writing, and
even a record written around the client (another producer on the definitions topic) does not
change what a running instance executes. A start of a workflow that is not deployed is refused by
the client, and a start the engine dead-letters ends the handle's ``result()`` and ``kflow status``
with the engine's reason instead of a timeout or "never started".
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer
from typer.testing import CliRunner

from kflow.cli import app
from kflow.client import Client
from kflow.model.errors import DefinitionConflict, StartRejectedError, WorkflowFailedError, WorkflowNotDeployed
from kflow.model.messages import Definition
from kflow.schemas.codec import encode_definition
from kflow.testing import assert_eventually


def _waiting(name: str, outcome: str) -> dict:
    return {"name": name, "version": 1,
            "steps": [{"id": "w", "wait": {"signal": "go"}}, {"id": "d", "succeed": f"'{outcome}'"}]}


def _cli(stack, *args: str):
    return CliRunner().invoke(app, [*args, "--bootstrap", stack.bootstrap, "--prefix", stack.prefix])


def test_a_deployed_version_is_immutable_and_running_instances_keep_their_content(stack, tmp_path: Path) -> None:
    c = stack.client
    name = f"ver{uuid.uuid4().hex[:6]}"
    original, changed = _waiting(name, "original"), _waiting(name, "overwritten")
    first = c.deploy(original)
    assert first.key == f"{name}@1" and not first.unchanged
    again = c.deploy({"steps": original["steps"], "version": 1, "name": name})  # same content, other key order
    assert again.unchanged and again.deployed_ms == first.deployed_ms

    running = c.start(name, id=f"{name}-running")
    assert_eventually(lambda: (running.status() or {}).get("status") == "RUNNING", timeout=30)

    # the client refuses other content under the deployed version, before writing
    with pytest.raises(DefinitionConflict) as caught:
        c.deploy(changed)
    assert (caught.value.workflow, caught.value.version) == (name, 1)
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(changed))
    refused = _cli(stack, "deploy", str(path))
    assert refused.exit_code != 0
    assert f"{name}@1 is already deployed with different content" in refused.output
    assert f"{name}@2" in refused.output  # suggests bumping the version
    path.write_text(json.dumps(original))
    unchanged = _cli(stack, "deploy", str(path))
    assert unchanged.exit_code == 0, unchanged.output
    assert f"{name}@1 already deployed, unchanged" in unchanged.output

    # another producer overwrites the record on the topic, around the client
    rogue = Definition(name=name, version=1, kind="spec", body=changed, deployed_ms=first.deployed_ms + 1)
    producer = Producer(c.config.producer_conf())
    producer.produce(c.names.definitions, encode_definition(rogue), rogue.key.encode())
    assert producer.flush(30) == 0
    # A deploy made after the overwrite, then a start of it: the engine reads the definitions topic
    # at least up to that deploy (read-your-deploys), so it has read the overwrite too.
    marker = f"{name}-marker"
    c.deploy({"name": marker, "version": 1, "steps": [{"id": "d", "succeed": "'ok'"}]})
    assert c.start(marker).result(timeout=60) == "ok"

    running.signal("go")
    assert running.result(timeout=60) == "original"
    later = c.start(name, version=1)
    later.signal("go")
    assert later.result(timeout=60) == "original"
    assert c.definition(name, 1).body == original  # the client's view keeps the first record too


def test_starting_a_workflow_that_is_not_deployed_is_refused_by_the_client(stack) -> None:
    c = stack.client
    name = f"nope{uuid.uuid4().hex[:6]}"
    with pytest.raises(WorkflowNotDeployed) as caught:
        c.start(name, {"x": 1})
    assert (caught.value.workflow, caught.value.version, caught.value.deployed_versions) == (name, None, [])

    c.deploy({"name": name, "version": 1, "steps": [{"id": "d", "succeed": "input"}]})
    with pytest.raises(WorkflowNotDeployed) as caught:
        c.start(name, 5, version=2)
    assert caught.value.deployed_versions == [1]
    assert c.start(name, 5).result(timeout=60) == 5

    missing = _cli(stack, "start", f"{name}-missing", "--input", "1")
    assert missing.exit_code != 0
    assert f"workflow '{name}-missing' is not deployed" in missing.output
    wrong_version = _cli(stack, "start", name, "--version", "3", "--wait")
    assert wrong_version.exit_code != 0
    assert f"workflow '{name}@3' is not deployed: deployed versions of '{name}': 1" in wrong_version.output


def test_a_start_the_engine_dead_letters_ends_the_wait_with_its_reason(stack) -> None:
    c = stack.client
    name = f"late{uuid.uuid4().hex[:6]}"
    iid = f"{name}-1"
    handle = c.start(name, 1, id=iid, require_deployed=False)
    with pytest.raises(StartRejectedError) as caught:
        handle.result(timeout=60)
    assert isinstance(caught.value, WorkflowFailedError) and caught.value.instance_id == iid
    assert f"unknown workflow '{name}'" in caught.value.reason

    # a client that did not start it can still ask why the instance never ran
    with Client(stack.bootstrap, config=c.config) as other:
        assert f"unknown workflow '{name}'" in (other.start_rejection(iid) or "")

    shown = _cli(stack, "status", iid)
    assert shown.exit_code != 0
    assert f"workflow instance '{iid}' was not started: the engine rejected its start: unknown workflow" \
        in shown.output
