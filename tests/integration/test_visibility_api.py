"""The visibility HTTP API against a real engine, worker and broker: every endpoint, its error
cases, the live stream, and the CLI commands that read through the API or straight from Kafka."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from kflow.cli import app
from kflow.testing import assert_eventually
from kflow.visibility.server import VisibilityServer
from tests.integration.conftest import visibility_server

WF = {"name": "vis_api", "version": 1, "steps": [
    {"id": "tag", "set": {"n": "input.n"}, "search": {"customer": "input.customer"}},
    {"id": "charge", "task": "t.inc", "input": "input.n", "output": "r"},
    {"id": "approve", "wait": {"signal": "approve"}, "output": "decision", "search": {"stage": "'approval'"}},
    {"id": "done", "succeed": "{'r': r, 'decision': decision}"},
]}


@pytest.fixture(scope="module")
def vis(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VisibilityServer]:
    with visibility_server(stack, tmp_path_factory, "vis") as server:
        yield server


@pytest.fixture(scope="module")
def http(vis: VisibilityServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vis.url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def running(stack: Any, http: httpx.Client) -> dict[str, str]:
    """Three instances parked on their approval step: customer -> id."""
    stack.client.deploy(WF)
    tag = uuid.uuid4().hex[:6]
    ids = {f"a1-{tag}": "acme", f"g-{tag}": "globex", f"a2-{tag}": "acme"}
    for i, (iid, customer) in enumerate(ids.items()):
        stack.client.start("vis_api", {"customer": customer, "n": i}, id=iid)

    def parked() -> bool:
        for iid in ids:
            r = http.get(f"/api/instances/{iid}")
            if r.status_code != 200 or r.json()["steps"].get("approve") != "running":
                return False
        return True

    assert_eventually(parked, timeout=60)
    return ids


def _get(http: httpx.Client, path: str, **params: Any) -> Any:
    r = http.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_list_filters_counts_and_pages(http, running):
    ids = set(running)
    listed = _get(http, "/api/instances", workflow="vis_api")
    assert ids <= {r["instance_id"] for r in listed["items"]}
    acme = {r["instance_id"] for r in _get(http, "/api/instances", workflow="vis_api", search="customer:acme")["items"]}
    assert acme == {i for i, c in running.items() if c == "acme"}
    both = _get(http, "/api/instances", search=["customer:acme", "stage:approval"], status="RUNNING")["items"]
    assert {r["instance_id"] for r in both} >= acme
    assert _get(http, "/api/instances", workflow="vis_api", status="COMPLETED,FAILED",
                search="customer:globex")["items"] == []
    assert _get(http, "/api/instances", workflow="vis_api", started_after=str(int(time.time() * 1000) + 3_600_000))[
        "items"] == []
    assert ids <= {r["instance_id"] for r in _get(http, "/api/instances", workflow="vis_api",
                                                    started_after="2020-01-01T00:00:00Z",
                                                    started_before="2999-01-01T00:00:00")["items"]}
    # cursor pages: one row each, no repeats, the last page has no cursor
    seen, cursor = [], None
    for _ in range(10):
        page = _get(http, "/api/instances", **{"workflow": "vis_api", "search": "customer:acme", "limit": 1,
                                                **({"cursor": cursor} if cursor else {})})
        seen += [r["instance_id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(acme)
    counts = _get(http, "/api/instances/counts", workflow="vis_api", search="customer:acme")
    assert counts["counts"]["RUNNING"] >= 2 and counts["total"] == sum(counts["counts"].values())


def test_get_instance_and_paged_history(http, running):
    iid = next(i for i, c in running.items() if c == "globex")
    inst = _get(http, f"/api/instances/{iid}")
    assert inst["status"] == "RUNNING" and inst["workflow"] == "vis_api" and inst["version"] == 1
    assert inst["variables"]["n"] == 1 and inst["variables"]["r"] == 2
    assert inst["waiting_for_signals"] == ["approve"]
    assert inst["search"] == {"customer": "globex", "stage": "approval"}
    assert inst["pending_activities"] == [] and inst["children"] == []
    assert inst["steps"] == {"tag": "done", "charge": "done", "approve": "running"}
    assert [n["id"] for n in inst["graph"]["nodes"]] == ["tag", "charge", "approve", "done"]
    first = _get(http, f"/api/instances/{iid}/history", limit=2)
    assert [e["seq"] for e in first["items"]] == [1, 2] and first["next_after_seq"] == 2
    rest = _get(http, f"/api/instances/{iid}/history", after_seq=2, limit=100)
    types = [e["type"] for e in first["items"] + rest["items"]]
    assert types[0] == "WorkflowStarted" and "ActivityCompleted" in types and rest["next_after_seq"] is None
    assert first["items"][0]["data"]["input"] == {"customer": "globex", "n": 1}


def test_actions_start_signal_cancel_terminate(http, running):
    iid = next(i for i, c in running.items() if c == "globex")
    r = http.post(f"/api/instances/{iid}/signal", json={"name": "approve", "data": {"by": "ann"}})
    assert r.status_code == 202, r.text
    done = assert_eventually(lambda: (x := _get(http, f"/api/instances/{iid}"))["status"] == "COMPLETED" and x,
                             timeout=30)
    assert done["result"] == {"r": 2, "decision": {"by": "ann"}}
    assert done["steps"]["done"] == "done" and done["closed_ms"] is not None

    new_id = f"api-{uuid.uuid4().hex[:6]}"
    r = http.post("/api/instances", json={"workflow": "vis_api", "input": {"customer": "x", "n": 5}, "id": new_id})
    assert r.status_code == 202 and r.json()["id"] == new_id
    assert_eventually(lambda: http.get(f"/api/instances/{new_id}").status_code == 200, timeout=30)
    assert http.post(f"/api/instances/{new_id}/cancel", json={"reason": "no"}).status_code == 202
    assert_eventually(lambda: _get(http, f"/api/instances/{new_id}")["status"] == "CANCELLED", timeout=30)

    victim = next(i for i, c in running.items() if i.startswith("a2-"))
    assert http.post(f"/api/instances/{victim}/terminate").status_code == 202
    term = assert_eventually(lambda: (x := _get(http, f"/api/instances/{victim}"))["status"] == "TERMINATED" and x,
                             timeout=30)
    assert term["error_type"] == "Terminated" and term["steps"]["approve"] == "failed"


@pytest.mark.parametrize("method,path,body,status,message", [
    ("get", "/api/instances/nope-404", None, 404, "no workflow instance with id 'nope-404'"),
    ("get", "/api/instances/nope-404/history", None, 404, "no workflow instance"),
    ("post", "/api/instances/nope-404/signal", {"name": "x"}, 404, "no workflow instance"),
    ("post", "/api/instances/nope-404/cancel", {}, 404, "no workflow instance"),
    ("post", "/api/instances/nope-404/terminate", {}, 404, "no workflow instance"),
    ("get", "/api/definitions/nope", None, 404, "no deployed workflow named 'nope'"),
    ("get", "/api/definitions/vis_api/99", None, 404, "no deployed workflow named 'vis_api@99'"),
    ("post", "/api/instances", {"workflow": "nope"}, 404, "no deployed workflow named 'nope'"),
    ("post", "/api/instances", {"workflow": "vis_api", "id_reuse": "sometimes"}, 400, "id_reuse must be one of"),
    ("post", "/api/instances", {"input": 1}, 400, "workflow: Field required"),
    ("get", "/api/instances?status=SLEEPING", None, 400, "unknown status SLEEPING"),
    ("get", "/api/instances?started_after=yesterday", None, 400, "started_after must be epoch milliseconds or an ISO"),
    ("get", "/api/instances?cursor=garbage", None, 400, "cursor 'garbage' is not valid"),
    ("get", "/api/instances?search=customer", None, 400, "search filters are name:value"),
    ("get", "/api/instances?limit=0", None, 400, "limit"),
    ("get", "/api/instances?version=abc", None, 400, "version"),
    ("get", "/api/nothing-here", None, 404, "no such endpoint"),
])
def test_errors_are_json_with_the_right_status(http, running, method, path, body, status, message):
    if method == "get":
        r = http.get(path)
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message in r.json()["error"] and r.json()["status"] == status


def test_signal_without_name_is_a_400(http, running):
    iid = next(iter(running))
    r = http.post(f"/api/instances/{iid}/signal", json={"data": 1})
    assert r.status_code == 400 and "name" in r.json()["error"]


def test_definitions_and_versions(stack, http, running):
    stack.client.deploy({**WF, "version": 2, "steps": [{"id": "only", "succeed": "'v2'"}]})
    assert_eventually(lambda: 2 in next((d["versions"] for d in _get(http, "/api/definitions")["items"]
                                         if d["name"] == "vis_api"), []), timeout=30)
    latest = _get(http, "/api/definitions/vis_api")
    assert latest["version"] == 2 and latest["versions"] == [1, 2] and latest["kind"] == "spec"
    v1 = _get(http, "/api/definitions/vis_api/1")
    assert v1["body"]["steps"][0]["id"] == "tag"
    assert {e["kind"] for e in v1["graph"]["edges"]} == {"next"}
    assert [n["id"] for n in v1["graph"]["nodes"]] == ["tag", "charge", "approve", "done"]


def test_live_stream_reports_changed_instances(stack, vis, http, running):
    iid = f"sse-{uuid.uuid4().hex[:6]}"
    got: list[dict[str, Any]] = []
    opened = threading.Event()

    def listen() -> None:
        with httpx.Client(base_url=vis.url, timeout=30) as c, c.stream("GET", "/api/stream",
                                                                       params={"instance": iid}) as res:
            opened.set()
            for line in res.iter_lines():
                if line.startswith("data:"):
                    got.append(orjson.loads(line[5:]))
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert opened.wait(10)
    stack.client.start("vis_api", {"customer": "sse", "n": 1}, id=iid)
    t.join(30)
    assert got and (got[0]["ids"] is None or iid in got[0]["ids"])


def test_operations_endpoints(http, running):
    metrics = http.get("/metrics").text
    assert 'kflow_visibility_records_total{topic=' in metrics and "kflow_visibility_lag" in metrics
    assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/api/instances", "/api/instances/{instance_id}", "/api/instances/{instance_id}/history",
            "/api/definitions", "/api/instances/{instance_id}/signal"} <= set(paths)
    assert _get(http, "/api/stats")["instances"] >= 3
    assert "kflow console" in http.get("/").text


def test_cli_reads_through_the_api_and_from_kafka(stack, vis, running):
    runner = CliRunner()
    iid = next(i for i, c in running.items() if i.startswith("a1-"))
    env = {"KFLOW_API": vis.url}
    out = runner.invoke(app, ["list", "--workflow", "vis_api", "--search", "customer:acme", "--json"], env=env)
    assert out.exit_code == 0, out.output
    assert iid in out.output and "globex" not in out.output
    out = runner.invoke(app, ["history", iid], env=env)
    assert out.exit_code == 0 and "WorkflowStarted" in out.output and "ActivityCompleted" in out.output
    out = runner.invoke(app, ["status", iid], env=env)
    assert out.exit_code == 0, out.output
    assert "approve" in out.output and "running" in out.output and "✔ charge" in out.output
    out = runner.invoke(app, ["watch", "--count", "1", "--workflow", "vis_api"], env=env)
    assert out.exit_code == 0 and "RUNNING" in out.output
    out = runner.invoke(app, ["status", "nope-404"], env=env)
    assert out.exit_code != 0 and "no state for workflow instance 'nope-404'" in out.output

    kafka = ["--bootstrap", stack.bootstrap, "--prefix", stack.prefix]
    plain = {"KFLOW_API": ""}
    out = runner.invoke(app, ["list", "--search", "customer:acme", "--json", *kafka], env=plain)
    assert out.exit_code == 0, out.output
    assert iid in out.output and "globex" not in out.output
    out = runner.invoke(app, ["history", iid, "--json", *kafka], env=plain)
    assert out.exit_code == 0 and orjson.loads(out.output.splitlines()[0])["type"] == "WorkflowStarted"
    out = runner.invoke(app, ["status", iid, *kafka], env=plain)
    assert out.exit_code == 0 and "approve" in out.output and "running" in out.output
