"""The visibility API with ``KFLOW_AUTH=on`` against a real engine, broker and store.

Callers present bearer tokens, API keys or console logins; the API filters by tenant, maps each
operation to its permission, signs each action as its caller (so the engine, which checks it
again, records the caller as the owner), and audits every action and every refusal on the
``audit`` topic, read back through ``GET /api/audit``. Attacks (forged tokens, brute-force
logins, SQL in filters, huge and deep bodies) are refused with a precise error and change
nothing else.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kflow.security.tokens import Keys, issue
from kflow.testing import assert_eventually
from tests.integration.auth_http import SecuredStack, secured_stack, token


@pytest.fixture(scope="module")
def sec(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredStack]:
    yield from secured_stack(kafka_bootstrap, tmp_path_factory.mktemp("http-auth"))


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


ALICE = bearer(token("alice", "acme", ("operator",)))
VICTOR = bearer(token("victor", "acme", ("viewer",)))
MALLORY = bearer(token("mallory", "globex", ("operator",)))
ROOT = bearer(token("root", "acme", ("system_admin",)))


@pytest.fixture(scope="module")
def http(sec: SecuredStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sec.url, timeout=30) as client:
        yield client


def start(http: httpx.Client, who: dict[str, str], note: str = "n", workflow: str = "http-wait") -> str:
    iid = f"{workflow}-{uuid.uuid4().hex[:8]}"
    r = http.post("/api/instances", json={"workflow": workflow, "input": {"note": note}, "id": iid}, headers=who)
    assert r.status_code == 202, r.text
    return iid


def running(http: httpx.Client, iid: str, who: dict[str, str] = ROOT) -> dict[str, Any]:
    def waits() -> Any:
        r = http.get(f"/api/instances/{iid}", headers=who)
        return r.status_code == 200 and r.json()["waiting_for_signals"] == ["go"] and r.json()
    return assert_eventually(waits, timeout=60, msg=f"{iid} never waited for its signal")


def audit(http: httpx.Client, **filters: Any) -> list[dict[str, Any]]:
    r = http.get("/api/audit", params={"since": str(int(time.time() * 1000) - 600_000), **filters}, headers=ROOT)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def audited(http: httpx.Client, match: Any, **filters: Any) -> dict[str, Any]:
    return assert_eventually(lambda: next((r for r in audit(http, **filters) if match(r)), None), timeout=30,
                             msg="no matching audit record")


@pytest.fixture(scope="module")
def pair(http: httpx.Client) -> dict[str, str]:
    """One waiting instance in each tenant, each started over HTTP by its tenant's operator."""
    ids = {"acme": start(http, ALICE), "globex": start(http, MALLORY)}
    for iid in ids.values():
        running(http, iid)
    return ids


def test_without_credentials_every_api_call_is_401_and_audited(http, sec):
    mark = uuid.uuid4().hex
    r = http.get("/api/instances", params={"id_prefix": mark})
    assert r.status_code == 401 and "expected credentials" in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"
    for method, path in (("post", "/api/instances"), ("get", "/api/definitions"), ("get", "/api/audit")):
        assert getattr(http, method)(path).status_code == 401
    assert http.get("/healthz").status_code == 200 and "kflow console" in http.get("/").text
    audited(http, lambda r: r["action"] == "authenticate" and r["outcome"] == "denied" and r["principal"] == ""
            and "expected credentials" in r["details"]["reason"])


def _alg_none() -> str:
    def part(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    now = int(time.time())
    return (f"{part({'alg': 'none', 'typ': 'JWT'})}."
            f"{part({'sub': 'root', 'tenant': 'acme', 'roles': ['system_admin'], 'iat': now, 'exp': now + 600, 'jti': uuid.uuid4().hex})}.")


@pytest.mark.parametrize("kind,make,message", [
    ("alg-none", _alg_none, "it names alg 'none'"),
    ("wrong-key", lambda: issue("root", "acme", ["system_admin"], 600,
                                Keys(secret=b"not-the-configured-secret-32-bytes!!")),
     "not signed by a configured key"),
    ("expired", lambda: issue("alice", "acme", ["operator"], 60, Keys(secret=b"kflow-http-auth-test-secret-at-least-32-bytes"),
                              now=time.time() - 3600), "expired"),
])
def test_forged_and_expired_tokens_are_401_with_the_reason_and_audited(http, pair, kind, make, message):
    r = http.post(f"/api/instances/{pair['acme']}/terminate", json={"reason": kind}, headers=bearer(make()))
    assert r.status_code == 401 and message in r.json()["error"], r.text
    record = audited(http, lambda x: x["action"] == "authenticate" and message in x["details"].get("reason", "")
                     and x["details"]["path"].endswith("/terminate"))
    assert record["outcome"] == "denied"
    assert http.get(f"/api/instances/{pair['acme']}", headers=ROOT).json()["status"] == "RUNNING"


def test_lists_are_filtered_to_the_callers_tenant(http, pair):
    def ids(who: dict[str, str], **params: Any) -> set[str]:
        r = http.get("/api/instances", params={"workflow": "http-wait", "limit": 1000, **params}, headers=who)
        assert r.status_code == 200, r.text
        return {x["instance_id"] for x in r.json()["items"]}

    assert pair["acme"] in ids(ALICE) and pair["globex"] not in ids(ALICE)
    assert pair["globex"] in ids(MALLORY) and pair["acme"] not in ids(MALLORY)
    assert ids(ALICE, tenant="globex") == set()  # asking for another tenant lists nothing
    assert {pair["acme"], pair["globex"]} <= ids(ROOT)  # a system_admin sees every tenant
    counts = http.get("/api/instances/counts", params={"tenant": "globex"}, headers=ALICE).json()
    assert counts["total"] == 0


def test_another_tenants_instance_cannot_be_read_or_acted_on(http, pair):
    victim = pair["globex"]
    for method, path, body in (("get", f"/api/instances/{victim}", None),
                               ("get", f"/api/instances/{victim}/history", None),
                               ("post", f"/api/instances/{victim}/cancel", {"reason": "x"}),
                               ("post", f"/api/instances/{victim}/signal", {"name": "go", "data": 1})):
        r = http.request(method.upper(), path, json=body, headers=ALICE)
        assert r.status_code == 403 and "tenant isolation" in r.json()["error"], (path, r.text)
    audited(http, lambda x: x["action"] == "cancel" and x["resource_id"] == victim and x["principal"] == "alice"
            and x["outcome"] == "denied")
    assert http.get(f"/api/instances/{victim}", headers=MALLORY).json()["status"] == "RUNNING"


def test_each_operation_needs_its_permission_and_actions_are_signed_as_the_caller(http, pair):
    iid = start(http, ALICE)
    view = running(http, iid, VICTOR)  # a viewer reads
    assert view["allowed"] == {"signal": False, "cancel": False, "terminate": False}
    assert running(http, iid, ALICE)["allowed"] == {"signal": True, "cancel": True, "terminate": True}
    assert http.get(f"/api/instances/{iid}/history", headers=VICTOR).status_code == 200
    for path, body, perm in (("signal", {"name": "go"}, "instance:Execute"), ("cancel", {}, "instance:Manage"),
                             ("terminate", {}, "instance:Manage")):
        r = http.post(f"/api/instances/{iid}/{path}", json=body, headers=VICTOR)
        assert r.status_code == 403 and perm in r.json()["error"], r.text
    r = http.post("/api/instances", json={"workflow": "http-wait"}, headers=VICTOR)
    assert r.status_code == 403 and "definition:Execute" in r.json()["error"]
    assert http.get("/api/audit", headers=VICTOR).status_code == 403

    r = http.post(f"/api/instances/{iid}/signal", json={"name": "go", "data": {"by": "alice"}}, headers=ALICE)
    assert r.status_code == 202, r.text
    done = assert_eventually(lambda: (x := http.get(f"/api/instances/{iid}", headers=ALICE).json())["status"]
                             == "COMPLETED" and x, timeout=60)
    assert done["result"] == {"by": "alice"} and done["state"]["owner"] == "alice" and done["tenant"] == "acme"
    for action in ("start", "signal"):
        audited(http, lambda x, a=action: x["action"] == a and x["principal"] == "alice" and x["outcome"] == "success"
                and (x["resource_id"] == iid or x["details"].get("instance_id") == iid), action=action)
    # alice's own tenant's audit records only
    mine = http.get("/api/audit", headers=ALICE).json()["items"]
    assert mine and all(r["tenant"] == "acme" for r in mine)


def test_an_api_key_works_and_a_wrong_one_fails(sec, http, pair):
    r = http.get("/api/instances", params={"workflow": "http-wait"}, headers={"X-API-Key": sec.api_key})
    assert r.status_code == 200 and pair["acme"] in {x["instance_id"] for x in r.json()["items"]}
    r = http.get("/api/instances", headers={"X-API-Key": sec.api_key[:-4] + "abcd"})
    assert r.status_code == 401 and "unknown or revoked" in r.json()["error"]


def test_logins_are_rate_limited_per_user_and_per_ip(sec):
    with httpx.Client(base_url=sec.url, timeout=30) as c:
        for _ in range(3):
            assert c.post("/api/login", json={"username": "mallory", "password": "guess"}).status_code == 401
        r = c.post("/api/login", json={"username": "mallory", "password": "mallory-pw"})
        assert r.status_code == 429 and "user 'mallory'" in r.json()["error"] and int(r.headers["retry-after"]) > 0
        # per IP: four times the per-user limit across names, from this client's address
        for i in range(9):
            c.post("/api/login", json={"username": f"nobody-{i}", "password": "guess"})
        r = c.post("/api/login", json={"username": "alice", "password": "alice-pw"})
        assert r.status_code == 429 and "client 127.0.0.1" in r.json()["error"]
    with httpx.Client(base_url=sec.url, timeout=30) as c:
        r = c.get("/api/audit", params={"action": "login", "outcome": "denied"}, headers=ROOT)
        codes = {x["details"].get("code") for x in r.json()["items"]}
        assert {"RateLimited", "Unauthenticated"} <= codes


@pytest.mark.parametrize("params", [
    {"status": "RUNNING' OR '1'='1"},
    {"workflow": "http-wait' OR 1=1 --"},
    {"workflow": "x'; DROP TABLE kflow_instances; --"},
    {"search": "note:n' OR '1'='1"},
    {"search": "note' OR 1=1 --:x"},
    {"id_prefix": "%' OR 1=1 --"},
    {"id_prefix": "%"},
    {"tenant": "acme' OR tenant IS NOT NULL --"},
    {"cursor": "WzEsIicgT1IgMT0xIC0tIl0"},
    {"started_after": "1; DROP TABLE kflow_instances"},
])
def test_sql_in_filter_parameters_is_inert(http, pair, params):
    r = http.get("/api/instances", params=params, headers=ALICE)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        assert r.json()["items"] == [] or all(x["tenant"] == "acme" for x in r.json()["items"])
        assert pair["globex"] not in {x["instance_id"] for x in r.json()["items"]}
        assert r.json()["items"] == [], r.json()  # nothing matches a filter of that text
    # the table is intact
    listed = http.get("/api/instances", params={"workflow": "http-wait"}, headers=ROOT).json()["items"]
    assert {pair["acme"], pair["globex"]} <= {x["instance_id"] for x in listed}


def test_a_huge_or_deeply_nested_body_is_refused_and_the_server_keeps_serving(http, pair):
    huge = b'{"workflow": "http-wait", "input": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    r = http.post("/api/instances", content=huge, headers={**ALICE, "content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    deep = b'{"workflow": "http-wait", "input": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    r = http.post("/api/instances", content=deep, headers={**ALICE, "content-type": "application/json"})
    assert r.status_code == 422 and "nested more than 64 levels" in r.json()["error"]
    audited(http, lambda x: x["outcome"] == "denied" and x["details"].get("status") == 422, action="request")
    assert http.get(f"/api/instances/{pair['acme']}", headers=ALICE).status_code == 200
    listed = http.get("/api/instances", params={"workflow": "http-wait"}, headers=ALICE).json()["items"]
    assert len(listed) >= 1 and all(x["status"] for x in listed)
