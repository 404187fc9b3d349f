"""Dead letters end to end: a start for an undeployed workflow is dead-lettered, listed, and
replayed after the definition is deployed — and then completes."""

from __future__ import annotations

import json
import uuid

from typer.testing import CliRunner

from kflow.cli import app
from kflow.dlq import read_dlq
from kflow.testing import assert_eventually
from tests.integration.flows import chain


def test_dead_letter_list_and_replay_after_fix(stack):
    c = stack.client
    name = f"late{uuid.uuid4().hex[:6]}"
    iid = f"dl-{uuid.uuid4().hex[:8]}"
    c.start(name, 1, id=iid, require_deployed=False)  # the engine has not seen it: it dead-letters the start
    rec = assert_eventually(lambda: next((r for r in read_dlq(c.config) if r.key == iid.encode()), None), timeout=30)
    assert f"unknown workflow '{name}'" in rec.reason
    assert rec.original_topic == c.config.names.commands and rec.original_offset >= 0

    runner = CliRunner()
    opts = ["--bootstrap", stack.bootstrap, "--prefix", stack.prefix]
    listed = runner.invoke(app, ["dlq", "list", "--json", "--reason", name, *opts])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.splitlines() if line.startswith("{")]
    assert [r["key"] for r in rows] == [iid]

    c.deploy(chain(name, 1))
    replayed = runner.invoke(app, ["dlq", "replay", "--ref", rows[0]["ref"], *opts])
    assert replayed.exit_code == 0, replayed.output
    assert "replayed 1 message" in replayed.output
    assert c.result(iid, timeout=60) == 2


def test_replay_rejects_bad_refs(stack):
    runner = CliRunner()
    opts = ["--bootstrap", stack.bootstrap, "--prefix", stack.prefix]
    bad = runner.invoke(app, ["dlq", "replay", "--ref", "zero:1", *opts])
    assert bad.exit_code != 0 and "PARTITION:OFFSET" in bad.output
    missing = runner.invoke(app, ["dlq", "replay", "--ref", "0:999999", *opts])
    assert missing.exit_code != 0 and "no dlq record at 0:999999" in missing.output
