"""``kflow status``: the step tree of a finished instance, read from Kafka and through the API.

The engine and worker run for real on the test broker; the CLI reads the state, definitions and
events topics (or asks a real visibility server) and must draw each step as what really happened.
"""

from __future__ import annotations

import json
import re
import uuid

import httpx
from typer.testing import CliRunner

from kflow.cli import app
from kflow.testing import assert_eventually
from tests.integration.conftest import visibility_server

ORDER = {"name": "status_cli_order", "version": 1, "steps": [
    {"id": "reserve", "task": "t.reserve", "input": "input", "output": "r"},
    {"id": "note", "set": {"sku": "r.sku"}},
    {"id": "route", "choice": [{"when": "r.ok", "goto": "ship"}], "otherwise": "reject"},
    {"id": "reject", "fail": {"error": "OutOfStock"}},
    {"id": "ship", "task": "t.echo", "input": "sku", "output": "shipped"},
    {"id": "done", "succeed": "shipped"},
]}

PAY = {"name": "status_cli_pay", "version": 1, "steps": [
    {"id": "charge", "task": "t.declined", "catch": [{"errors": ["CardDeclined"], "goto": "apologise", "output": "e"}]},
    {"id": "paid", "succeed": "'paid'"},
    {"id": "apologise", "succeed": "e.type"},
]}


def _tree(output: str) -> dict[str, str]:
    """Step id -> state word from the drawn tree (``✔ reserve  task t.reserve  done``)."""
    return {m["step"]: m["state"] for m in re.finditer(r"[✔▶✖·] (?P<step>\w+) .*?(?P<state>pending|running|done|failed)\s*$",
                                                         output, re.M)}


def _status(stack, iid: str, api: str = "") -> str:
    out = CliRunner().invoke(app, ["status", iid, "--bootstrap", stack.bootstrap, "--prefix", stack.prefix],
                             env={"KFLOW_API": api})
    assert out.exit_code == 0, out.output
    return out.output


def test_status_from_kafka_draws_what_a_completed_instance_did(stack):
    stack.client.deploy(ORDER)
    iid = f"sc-{uuid.uuid4().hex[:6]}"
    assert stack.client.start("status_cli_order", {"sku": "A1", "qty": 2}, id=iid).result(timeout=60) == "A1"
    output = _status(stack, iid)
    assert "COMPLETED" in output
    assert _tree(output) == {"reserve": "done", "note": "done", "route": "done", "reject": "pending",
                             "ship": "done", "done": "done"}, output
    assert "✔ ship" in output and "· reject" in output


def test_status_from_kafka_draws_a_caught_failure_and_its_handler(stack):
    stack.client.deploy(PAY)
    iid = f"sp-{uuid.uuid4().hex[:6]}"
    assert stack.client.start("status_cli_pay", None, id=iid).result(timeout=60) == "CardDeclined"
    assert _tree(_status(stack, iid)) == {"charge": "failed", "paid": "pending", "apologise": "done"}


def test_status_through_the_api_draws_a_caught_failure_and_its_handler(stack, tmp_path_factory):
    stack.client.deploy(PAY)
    iid = f"sa-{uuid.uuid4().hex[:6]}"
    assert stack.client.start("status_cli_pay", None, id=iid).result(timeout=60) == "CardDeclined"
    with visibility_server(stack, tmp_path_factory, "status-cli") as vis:
        def projected() -> dict:
            res = httpx.get(f"{vis.url}/api/instances/{iid}", timeout=10)
            assert res.status_code == 200 and res.json()["status"] == "COMPLETED", res.text
            # the state and events topics are folded independently: wait for both
            assert res.json()["steps"] == {"charge": "failed", "apologise": "done"}, res.json()["steps"]
            return res.json()

        assert_eventually(projected, timeout=60)
        assert _tree(_status(stack, iid, api=vis.url)) == {"charge": "failed", "paid": "pending", "apologise": "done"}


def test_list_where_selects_what_a_batch_with_the_same_query_would(stack):
    c = stack.client
    c.deploy(ORDER)
    c.deploy(PAY)
    tag = uuid.uuid4().hex[:6]
    orders = [c.start("status_cli_order", {"sku": f"S{n}", "ok": True}, id=f"lw-{tag}-o{n}") for n in range(2)]
    pay = c.start("status_cli_pay", {}, id=f"lw-{tag}-p0")
    assert len(c.wait_many([h.id for h in [*orders, pay]], timeout=60)) == 3  # closed, however they ended
    opts = ["--bootstrap", stack.bootstrap, "--prefix", stack.prefix, "--json"]
    out = CliRunner().invoke(app, ["list", "--where", f"workflow=status_cli_order AND id_prefix=lw-{tag}", *opts],
                             env={"KFLOW_API": ""})
    assert out.exit_code == 0, out.output
    listed = sorted(json.loads(line)["instance_id"] for line in out.output.splitlines() if line.strip())
    assert listed == sorted(h.id for h in orders)
    bad = CliRunner().invoke(app, ["list", "--where", "colour=red", *opts], env={"KFLOW_API": ""})
    assert bad.exit_code != 0 and "--where:" in bad.output and "colour" in bad.output, bad.output
