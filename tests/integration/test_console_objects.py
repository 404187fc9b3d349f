"""Schedules, incidents and limits through the visibility API, on the real broker, engine and server.

A schedule's and a limit counter's records share the ``state`` topic with the instances but are not
instances: they stay out of ``/api/instances``, its counts and ``/api/stats``, and are served by
``/api/schedules`` (with next runs, pause/unpause/trigger) and ``/api/limits`` (in use, allowed,
queued by level). An incident is listed by ``/api/incidents`` and resolved through
``POST /api/instances/{id}/incidents/{incident_id}``. A store written by an older release (schedule
rows folded as instances) is split on open, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kflow.testing import assert_eventually
from kflow.visibility.store import InstanceFilter, Record, VisibilityStore, instances
from kflow.worker import activity
from tests.integration.conftest import visibility_server
from tests.services import http_service  # noqa: F401

HOSTILE = "<img src=x onerror=alert(1)>"
WAIT = {"name": "cobj_wait", "version": 1, "steps": [{"id": "w", "wait": {"signal": "done"}}]}
#: Instance key -> whether ``cobj.charge`` fails for it.
BROKEN: dict[str, bool] = {}
_lock = threading.Lock()


@activity("cobj.charge")
def charge(req: dict[str, Any]) -> dict[str, Any]:
    with _lock:
        broken = BROKEN.get(req["key"], False)
    if broken:
        raise RuntimeError(f"card service down {HOSTILE}")
    return {"paid": True, "card": req.get("card")}


ORDER = {"name": "cobj_order", "version": 1, "steps": [
    {"id": "charge", "task": "cobj.charge", "input": "input", "output": "c",
     "retry": {"initial": "100ms", "max_attempts": 2},
     "on_failure": {"incident": {"role": "ops", "instructions": f"restart the card service {HOSTILE}"}}},
]}


@pytest.fixture
def server(engine_only_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with visibility_server(engine_only_stack, tmp_path_factory, "cobj") as vis:
        yield vis


@pytest.fixture
def api(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def _ok(res: httpx.Response) -> Any:
    assert res.status_code in (200, 202), res.text
    return res.json()


def _schedule(http: httpx.Client, sid: str) -> Any:
    return next((i for i in _ok(http.get("/api/schedules"))["items"] if i["id"] == sid), None)


def test_a_schedule_is_not_an_instance_and_is_listed_paused_and_triggered(engine_only_stack: Any, server: Any,
                                                                          api: httpx.Client) -> None:
    stack, http = engine_only_stack, api
    stack.client.deploy(WAIT)
    sid = f"cs-{uuid.uuid4().hex[:6]}"
    stack.client.create_schedule(sid, "cobj_wait", cron="0 9 * * 1-5", timezone="Europe/Berlin")
    plain = f"plain-{uuid.uuid4().hex[:6]}"
    stack.client.start("cobj_wait", None, id=plain)

    # the projection has folded both: the instance is listed, the schedule is not
    assert_eventually(lambda: [o["id"] for o in server.store.objects("schedule")] == [f"schedule:{sid}"], timeout=30)
    assert_eventually(lambda: [i["instance_id"] for i in _ok(http.get("/api/instances"))["items"]] == [plain],
                      timeout=30)
    item = assert_eventually(lambda: _schedule(http, sid), timeout=30)
    listed = _ok(http.get("/api/instances", params={"limit": 1000}))["items"]
    assert all(not i["instance_id"].startswith("schedule:") for i in listed)
    assert _ok(http.get("/api/instances", params={"id_prefix": "schedule:"}))["items"] == []
    counts = _ok(http.get("/api/instances/counts"))
    assert counts["total"] == 1 and counts["counts"]["RUNNING"] == 1 and counts["counts"]["SUSPENDED"] == 0
    assert _ok(http.get("/api/stats"))["instances"] == 1
    assert http.get(f"/api/instances/schedule:{sid}").status_code == 404

    # its own endpoint: the declaration and the next runs (09:00 in Berlin is 07:00 or 08:00 UTC)
    assert item["spec"]["cron"] == "0 9 * * 1-5" and item["spec"]["timezone"] == "Europe/Berlin"
    assert len(item["next_runs"]) == 5 and all(r[11:19] in ("07:00:00", "08:00:00") for r in item["next_runs"])
    assert item["paused"] is False
    assert _ok(http.get("/api/schedules"))["allowed"] == {"pause": True, "unpause": True, "trigger": True}

    # pause with a note (kept as given), and the paused schedule has no next runs
    _ok(http.post(f"/api/schedules/{sid}/pause", json={"note": HOSTILE}))
    paused = assert_eventually(lambda: (lambda s: s if s and s["paused"] else None)(_schedule(http, sid)), timeout=30)
    assert paused["note"] == HOSTILE and paused["next_runs"] == []
    # while paused it is still not an instance (its status is SUSPENDED on the state topic)
    assert _ok(http.get("/api/instances/counts"))["counts"]["SUSPENDED"] == 0
    _ok(http.post(f"/api/schedules/{sid}/unpause", json={"note": "back"}))
    assert_eventually(lambda: (lambda s: s is not None and not s["paused"])(_schedule(http, sid)), timeout=30)

    # trigger starts a run now: a real instance <id>:<time>, listed, its parent the schedule
    _ok(http.post(f"/api/schedules/{sid}/trigger", json={}))
    runs = assert_eventually(lambda: _ok(http.get("/api/instances", params={"id_prefix": f"{sid}:"}))["items"],
                             timeout=30)
    assert runs[0]["workflow"] == "cobj_wait" and runs[0]["parent_id"] == f"schedule:{sid}"
    assert_eventually(lambda: _ok(http.get("/api/instances/counts"))["total"] == 2, timeout=30)

    # bad input is one precise error and sends nothing
    missing = http.post("/api/schedules/nope/pause", json={})
    assert missing.status_code == 404 and missing.json()["error"] == "no schedule 'nope'"
    bad = http.post(f"/api/schedules/{sid}/trigger", json={"overlap": "sometimes"})
    assert bad.status_code == 400 and "unknown overlap policy 'sometimes'" in bad.json()["error"]


def test_an_incident_is_listed_and_resolved_through_the_api(engine_only_stack: Any, api: httpx.Client) -> None:
    stack, http = engine_only_stack, api
    stack.start_worker([sys.modules[__name__]])
    stack.client.deploy(ORDER)
    iid = f"ci-{uuid.uuid4().hex[:6]}"
    BROKEN[iid] = True
    stack.client.start("cobj_order", {"key": iid}, id=iid)

    def listed() -> Any:
        return [r for r in _ok(http.get("/api/incidents"))["items"] if r["instance_id"] == iid]

    (row,) = assert_eventually(listed, timeout=60)
    assert (row["step"], row["role"], row["error_type"], row["activity"]) == ("charge", "ops", "RuntimeError",
                                                                             "cobj.charge")
    assert row["message"].endswith(f"failed: card service down {HOSTILE}")
    assert row["instructions"] == f"restart the card service {HOSTILE}" and row["allowed"] is True
    assert [r["incident_id"] for r in _ok(http.get("/api/incidents", params={"role": "ops"}))["items"]
            if r["instance_id"] == iid] == [row["incident_id"]]
    assert [r for r in _ok(http.get("/api/incidents", params={"role": "dba"}))["items"] if r["instance_id"] == iid] == []
    assert _ok(http.get("/api/instances/counts"))["counts"]["INCIDENT"] == 1

    url = f"/api/instances/{iid}/incidents/{row['incident_id']}"
    nope = http.post(f"/api/instances/{iid}/incidents/nope", json={"action": "retry"})
    assert nope.status_code == 404
    assert nope.json()["error"] == f"instance '{iid}' (INCIDENT) has no open incident 'nope' (open: {row['incident_id']})"
    bad = http.post(url, json={"action": "skip", "input_patch": {"card": "x"}})
    assert bad.status_code == 400 and "only for action 'retry'" in bad.json()["error"]
    assert http.post(url, json={"action": "ignore"}).status_code == 400

    BROKEN[iid] = False  # fixed: retry with a patched input
    _ok(http.post(url, json={"action": "retry", "input_patch": {"card": "tok_2"}, "reason": "service restarted"}))
    done = assert_eventually(lambda: (lambda d: d if d["status"] == "COMPLETED" else None)(
        _ok(http.get(f"/api/instances/{iid}"))), timeout=60)
    assert done["variables"]["c"] == {"paid": True, "card": "tok_2"}
    assert listed() == []
    resolved = [e["data"] for e in _ok(http.get(f"/api/instances/{iid}/history"))["items"]
                if e["type"] == "IncidentResolved"]
    assert [(r["action"], r["by"], r["reason"]) for r in resolved] == [("retry", "console", "service restarted")]


def test_limits_show_in_use_allowed_and_queued_starts(engine_only_stack: Any, server: Any,
                                                      api: httpx.Client) -> None:
    stack, http = engine_only_stack, api
    client = stack.client
    client.deploy(WAIT)
    client.apply_limits({"limits": [{"name": "cobj-tenants", "tenant": "*", "max_running": 2}]})
    assert_eventually(lambda: all(proc.quotas.get("cobj-tenants") is not None for proc, _ in stack.engines),
                      timeout=30)
    ids = [f"cq-{uuid.uuid4().hex[:6]}-{n}" for n in range(5)]
    for i in ids:
        client.start("cobj_wait", None, id=i)

    def counter() -> Any:
        data = _ok(http.get("/api/limits"))
        row = next((r for r in data["items"] if r["key"] == "limit:cobj-tenants:default"), None)
        return (row, data) if row is not None and row["queued"] == 3 and row["in_use"] == 2 else None

    row, data = assert_eventually(counter, timeout=60)
    assert [o["id"] for o in server.store.objects("limit")] == ["limit:cobj-tenants:default"]
    assert (row["limit"], row["key_part"], row["allowed"], row["queued_starts"], row["queued_activities"]) == (
        "cobj-tenants", "default", 2, 3, 0)
    assert {lv["name"]: lv["starts"] for lv in data["levels"]} == {
        "critical": 0, "high": 0, "normal": 3, "low": 0, "background": 0}
    # the counter is not an instance; the queued starts are
    counts = _ok(http.get("/api/instances/counts"))
    assert counts["total"] == 5 and counts["counts"]["QUEUED"] == 3 and counts["counts"]["RUNNING"] == 2
    assert _ok(http.get("/api/instances", params={"id_prefix": "limit:"}))["items"] == []

    # a run completes: one queued start is admitted
    running = [i["instance_id"] for i in _ok(http.get("/api/instances", params={"status": "RUNNING"}))["items"]]
    client.signal(running[0], "done")
    assert_eventually(lambda: (lambda r: r is not None and (r["in_use"], r["queued"]) == (2, 2))(
        next((r for r in _ok(http.get("/api/limits"))["items"] if r["key"] == "limit:cobj-tenants:default"), None)),
        timeout=60)


def test_subscriptions_list_the_delivery_log_of_every_delivery_process(
        engine_only_stack: Any, server: Any, api: httpx.Client, http_service: Any,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    from kflow.config import KafkaConfig, VisibilityConfig
    from kflow.subscriptions import SubscriptionRunner, apply_subscriptions, parse_subscriptions, serve_operations
    from kflow.visibility.server import VisibilityServer

    stack = engine_only_stack
    monkeypatch.setenv("KFLOW_TEST_COBJ_SECRET", "s3cret")
    kafka = stack.kafka_config(KafkaConfig)
    failures = {"left": 1}

    def hook(_service: Any, _seen: Any) -> tuple[int, Any]:
        if failures["left"]:
            failures["left"] -= 1
            return 500, {"error": "not yet"}
        return 200, {"ok": True}

    http_service.routes["/cobj-hook"] = hook
    sid = f"cobj-{uuid.uuid4().hex[:6]}"
    apply_subscriptions(kafka, parse_subscriptions(
        f"subscriptions:\n  - {{id: {sid}, url: '{http_service.url}/cobj-hook', secret_env: KFLOW_TEST_COBJ_SECRET, "
        "filter: {statuses: [COMPLETED]}, backoff: {initial: 10ms, max: 40ms}}\n"))

    # without a delivery process named, the declarations are listed from the topic, with no deliveries
    plain = assert_eventually(lambda: (lambda d: d if d["items"] else None)(_ok(api.get("/api/subscriptions"))),
                              timeout=30)
    assert [i["id"] for i in plain["items"]] == [sid] and plain["deliveries"] is False
    assert plain["items"][0]["deliveries"] == [] and plain["items"][0]["filter"]["statuses"] == ["COMPLETED"]

    runner = SubscriptionRunner(kafka, group_id=f"{stack.prefix}subs-{uuid.uuid4().hex[:6]}")
    runner.start()
    ops = None
    try:
        assert runner.ready(60)
        assert_eventually(lambda: sid in runner.subscriptions, timeout=30)
        ops = serve_operations(runner, 0, host="127.0.0.1")
        url = f"http://127.0.0.1:{ops.server_address[1]}"
        cfg = stack.kafka_config(VisibilityConfig, state_dir=str(tmp_path_factory.mktemp("cobj-subs")),
                                 visibility_port=0, visibility_group=f"cobj-subs-{uuid.uuid4().hex[:6]}",
                                 subscriptions_url=f"{url}, http://127.0.0.1:9/")
        vis = VisibilityServer(cfg)
        vis.start()
        try:
            stack.client.deploy(WAIT)
            iid = f"cs-{uuid.uuid4().hex[:6]}"
            stack.client.start("cobj_wait", None, id=iid)
            stack.client.signal(iid, "done")
            with httpx.Client(base_url=vis.url, timeout=30) as http:
                def delivered() -> Any:
                    data = _ok(http.get("/api/subscriptions"))
                    (item,) = data["items"]
                    return (data, item) if item["deliveries"] else None

                data, item = assert_eventually(delivered, timeout=60)
        finally:
            vis.close()
    finally:
        if ops is not None:
            ops.shutdown()
        runner.stop()
    assert data["deliveries"] is True and item["id"] == sid
    (entry,) = item["deliveries"]
    assert (entry["instance_id"], entry["status"], entry["outcome"], entry["http_status"], entry["attempts"]) == (
        iid, "COMPLETED", "delivered", 200, 2)
    # the process that does not answer is named, not hidden
    assert [(s["url"], s["ok"]) for s in data["sources"]] == [(url, True), ("http://127.0.0.1:9", False)]


def _pg_or_sqlite(kind: str, tmp_path: Any) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
    else:
        from tests.integration.test_visibility_projection import _pg_url

        yield from _pg_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    yield from _pg_or_sqlite(request.param, tmp_path)


def _state(key: str, kind: str) -> dict[str, Any]:
    return {"instance_id": key, "workflow": "w", "version": 1, "status": "RUNNING", "seq": 3, "started_ms": 10,
            "updated_ms": 12, "closed_ms": None, "result": None, "error_type": None, "error_message": None,
            "internal": {"id": key, "kind": kind, "search": {}, "limit": "q", "queue": [], "held": {}}}


def test_rows_an_older_release_folded_as_instances_move_out_once(store_url: str) -> None:
    store = VisibilityStore(store_url)
    try:
        store.apply([Record("state", "i1", _state("i1", "spec")), Record("state", "limit:q:t1", _state("limit:q:t1", "limit")),
                     Record("state", "schedule:s", _state("schedule:s", "schedule"))], {})
        assert [r["instance_id"] for r in store.list_instances(InstanceFilter()).items] == ["i1"]
        assert [o["id"] for o in store.objects("limit")] == ["limit:q:t1"]
        # as an older release left it: the objects among the instances, and no record of the split
        with store.engine.begin() as conn:
            for key, kind in (("limit:q:t1", "limit"), ("schedule:s", "schedule")):
                conn.execute(instances.insert().values(
                    instance_id=key, workflow="w", version=1, kind=kind, status="RUNNING", seq=3, started_ms=10,
                    updated_ms=12, search="{}", steps="{}", state=f'{{"internal": {{"id": "{key}", "kind": "{kind}"}}}}'))
            conn.execute(sa.text("DELETE FROM kflow_objects"))
            conn.execute(sa.text("DELETE FROM kflow_meta"))
        assert store.total() == 3
    finally:
        store.close()
    reopened = VisibilityStore(store_url)
    try:
        assert reopened.total() == 1 and reopened.counts(InstanceFilter())["RUNNING"] == 1
        assert [o["id"] for o in reopened.objects("schedule")] == ["schedule:s"]
        assert [o["id"] for o in reopened.objects("limit")] == ["limit:q:t1"]
        # a tombstone removes an object too
        assert reopened.apply([Record("state", "schedule:s", None)], {}) == {"schedule:s"}
        assert reopened.objects("schedule") == []
    finally:
        reopened.close()


# -- with auth on ----------------------------------------------------------------------------------

STUCK = {"name": "cobj_stuck", "version": 1, "steps": [
    {"id": "call", "task": "cobj.nobody", "input": "input", "timeout": {"start_to_close": "200ms"},
     "retry": {"max_attempts": 1}, "on_failure": {"incident": {"role": "ops", "instructions": "call someone"}}},
]}


@pytest.fixture(scope="module")
def sec(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.integration.auth_http import secured_stack

    yield from secured_stack(kafka_bootstrap, tmp_path_factory.mktemp("cobj-auth"))


def test_with_auth_on_incidents_need_the_steps_role_and_schedule_actions_need_system_admin(sec: Any) -> None:
    from tests.integration.auth_http import token

    def bearer(principal: str, tenant: str, *roles: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token(principal, tenant, roles)}"}

    alice, mallory = bearer("alice", "acme", "operator"), bearer("mallory", "globex", "operator")
    root, victor = bearer("root", "acme", "system_admin"), bearer("victor", "acme", "viewer")
    sec.admin.deploy(STUCK)
    with httpx.Client(base_url=sec.url, timeout=30) as http:
        assert_eventually(lambda: http.get("/api/definitions/cobj_stuck", headers=root).status_code == 200, timeout=30)
        iid = f"stuck-{uuid.uuid4().hex[:6]}"
        _ok(http.post("/api/instances", json={"workflow": "cobj_stuck", "input": {}, "id": iid}, headers=alice))

        def listed(who: dict[str, str]) -> Any:
            return [r for r in _ok(http.get("/api/incidents", headers=who))["items"] if r["instance_id"] == iid]

        (row,) = assert_eventually(lambda: listed(alice), timeout=60)
        assert row["role"] == "ops" and row["instructions"] == "call someone" and row["tenant"] == "acme"
        assert row["allowed"] is False  # an operator without the step's role
        assert [r["allowed"] for r in listed(root)] == [True]
        assert listed(mallory) == []  # another tenant's incidents are not listed

        url = f"/api/instances/{iid}/incidents/{row['incident_id']}"
        denied = http.post(url, json={"action": "fail"}, headers=alice)
        assert denied.status_code == 403 and "expected role 'ops'" in denied.json()["error"]
        assert http.post(url, json={"action": "fail"}, headers=mallory).status_code == 403
        _ok(http.post(url, json={"action": "fail", "reason": "gave up"}, headers=root))
        assert_eventually(lambda: _ok(http.get(f"/api/instances/{iid}", headers=root))["status"] == "FAILED",
                          timeout=60)

        # schedules: listing needs definition:View, acting system:Admin (as the engine checks it)
        assert _ok(http.get("/api/schedules", headers=alice))["allowed"] == dict.fromkeys(
            ("pause", "unpause", "trigger"), False)
        refused = http.post("/api/schedules/any/pause", json={"note": "x"}, headers=alice)
        assert refused.status_code == 403
        assert http.post("/api/schedules/any/pause", json={}, headers=root).status_code == 404
        # limits are listed for any tenant member (filtered to its tenant); subscriptions need system:View
        assert http.get("/api/limits", headers=alice).status_code == 200
        assert http.get("/api/subscriptions", headers=victor).status_code == 403
