"""``kflow dlq list`` shows a dead letter's reason whole, however long, in every output form."""

from __future__ import annotations

import json
import uuid

from typer.testing import CliRunner

from kflow.cli import app
from kflow.dlq import read_dlq
from kflow.testing import assert_eventually


def _squeezed(text: str) -> str:
    return "".join(text.split())


def test_a_long_reason_is_listed_whole(stack):
    c = stack.client
    name = f"fulfilment.eu_west.priority_orders_with_customs_declarations_v{uuid.uuid4().hex[:8]}"
    iid = f"dll-{uuid.uuid4().hex[:8]}"
    c.start(name, 1, id=iid, require_deployed=False)  # the engine dead-letters a start of an unknown workflow
    rec = assert_eventually(lambda: next((r for r in read_dlq(c.config) if r.key == iid.encode()), None), timeout=30)
    assert len(rec.reason) > 100 and name in rec.reason, rec.reason

    runner = CliRunner()
    opts = ["--reason", name, "--bootstrap", stack.bootstrap, "--prefix", stack.prefix]
    table = runner.invoke(app, ["dlq", "list", *opts], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    assert max(len(line) for line in table.output.splitlines()) <= 80, table.output
    assert _squeezed(rec.reason) in _squeezed(table.output), table.output  # wrapped, never cut

    wide = runner.invoke(app, ["dlq", "list", "--wide", *opts], env={"COLUMNS": "80"})
    assert wide.exit_code == 0, wide.output
    assert any(line.startswith(rec.ref) and line.endswith(rec.reason) for line in wide.output.splitlines()), wide.output

    listed = runner.invoke(app, ["dlq", "list", "--json", *opts])
    assert [json.loads(line)["reason"] for line in listed.output.splitlines()] == [rec.reason]
