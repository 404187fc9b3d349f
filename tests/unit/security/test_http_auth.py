"""HTTP authentication pieces and the API's auth decisions, on a real store and a real ASGI app.

The credentials (bearer tokens with HS256 and with RS256 from a JWKS file, API keys, console
logins and their sessions), the login rate limit, the body limits and the CSRF check are checked
here against the FastAPI application over a SQLite store; the audit records go to a list. The
same paths against a real broker and engine are in ``tests/integration/test_http_auth.py``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kflow._cli.security import token_app
from kflow.security.audit import AuditRecord
from kflow.security.http import (
    CSRF_HEADER,
    SESSION_COOKIE,
    ApiKeyFile,
    AuthFileError,
    HttpAuth,
    LoginLimiter,
    RateLimited,
    Sessions,
    UserFile,
    hash_password,
    mint_api_key,
)
from kflow.security.httplimits import json_depth
from kflow.security.policy import parse_policy
from kflow.security.principal import AuthError, Principal
from kflow.security.tokens import Keys, issue
from kflow.visibility.access import Access
from kflow.visibility.api import create_app
from kflow.visibility.store import VisibilityStore

SECRET = b"http-auth-unit-test-secret-32-bytes!!"
OTHER = b"some-other-secret-nobody-configured!!"
KEYS = Keys(secret=SECRET)
NOW = 1_700_000_000.0
POLICY = parse_policy({"roles": {"viewer": ["instance:View", "definition:View"],
                                 "operator": ["instance:View", "instance:Manage", "instance:Execute",
                                              "definition:View", "definition:Execute", "system:View"]}})


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {"alice": hash_password("alice-pw"), "bob": hash_password("bob-pw")}


@pytest.fixture
def files(tmp_path: Path, hashes: dict[str, str]) -> dict[str, Any]:
    users = tmp_path / "users.yaml"
    users.write_text(yaml.safe_dump({"users": [
        {"username": "alice", "password_hash": hashes["alice"], "tenant": "acme", "roles": ["operator"]},
        {"username": "bob", "password_hash": hashes["bob"], "tenant": "acme", "roles": ["viewer"]}]}))
    key, entry = mint_api_key("ci", "acme", ["operator"])
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"api_keys": [entry]}))
    return {"users": users, "keys": keys, "key": key}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(files: dict[str, Any]) -> HttpAuth:
    return HttpAuth(KEYS, users=UserFile(files["users"]), api_keys=ApiKeyFile(files["keys"]),
                    sessions=Sessions(SECRET, 3600), limiter=LoginLimiter(3, 5))


@pytest.fixture
def app(tmp_path: Path, auth: HttpAuth, clock: Clock) -> tuple[TestClient, list[AuditRecord]]:
    trail: list[AuditRecord] = []
    store = VisibilityStore(f"sqlite:///{tmp_path / 'vis.db'}")
    access = Access(auth, policy=lambda: POLICY, audit=trail.append, clock=clock)
    application = create_app(store, None, access=access, max_body_bytes=64 * 1024)
    with TestClient(application, base_url="http://testserver") as client:
        yield client, trail
    store.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def alg_none(principal: str = "root") -> str:
    def part(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({'sub': principal, 'tenant': 'acme', 'roles': ['system_admin'], 'iat': int(NOW), 'exp': int(NOW) + 600, 'jti': 'x'})}."


# --------------------------------------------------------------------------- the pieces


def test_users_file_verifies_passwords_and_lists_every_problem(files, tmp_path):
    users = UserFile(files["users"])
    assert users.verify("alice", "alice-pw") == Principal("alice", "acme", frozenset({"operator"}))
    assert users.verify("alice", "wrong") is None and users.verify("nobody", "alice-pw") is None
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"users": [{"username": "x", "password_hash": "plain"}, {"password_hash": "$argon2id$"}],
                                   "extra": 1}))
    with pytest.raises(AuthFileError) as e:
        UserFile(bad)
    text = str(e.value)
    assert "users.0.password_hash" in text and "users.1.username" in text and "extra" in text


def test_api_keys_are_stored_hashed_and_a_wrong_key_fails(files):
    keys = ApiKeyFile(files["keys"])
    assert files["key"] not in files["keys"].read_text()
    assert keys.verify(files["key"]).name == "ci"
    prefix, kid, _secret = files["key"].split("_", 2)
    for wrong in (f"{prefix}_{kid}_not-the-secret", f"{prefix}_ffffffffffffffff_x", "plainly-wrong"):
        with pytest.raises(AuthError) as e:
            keys.verify(wrong)
        assert e.value.code == "Unauthenticated"


def test_login_limiter_counts_failures_per_user_and_per_ip_in_a_window():
    lim = LoginLimiter(per_user=3, per_ip=5, window_s=100)
    for i in range(3):
        lim.check("alice", "10.0.0.1", NOW + i)
        lim.failed("alice", "10.0.0.1", NOW + i)
    with pytest.raises(RateLimited) as e:
        lim.check("alice", "10.0.0.9", NOW + 3)  # per user, from any IP
    assert e.value.retry_after_s == 97
    lim.check("bob", "10.0.0.1", NOW + 3)  # the IP has attempts left
    for i in range(2):
        lim.failed(f"u{i}", "10.0.0.1", NOW + 4)
    with pytest.raises(RateLimited, match="client 10.0.0.1"):
        lim.check("carol", "10.0.0.1", NOW + 5)
    lim.check("alice", "10.0.0.9", NOW + 101)  # the window passed


def test_sessions_refuse_forged_expired_and_principal_tokens():
    s = Sessions(SECRET, 60)
    cookie, csrf = s.issue(Principal("alice", "acme", frozenset({"operator"})), NOW)
    who, again = s.verify(cookie, NOW + 1)
    assert who.name == "alice" and again == csrf
    with pytest.raises(AuthError, match="expired"):
        s.verify(cookie, NOW + 60)
    with pytest.raises(AuthError, match="not one"):
        Sessions(OTHER, 60).verify(cookie, NOW)
    with pytest.raises(AuthError, match="not one"):  # a principal token is no session
        s.verify(issue("alice", "acme", (), 60, KEYS, now=NOW), NOW)


def test_json_depth_counts_only_brackets_outside_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{"}]}', 10) == 3
    assert json_depth(b"[" * 10_000 + b"]" * 10_000, 64) == 65  # stops counting past the limit
    assert json_depth(b'"\\"[[["', 10) == 0


def test_hash_password_and_apikey_commands():
    out = CliRunner().invoke(token_app, ["hash-password", "--password", "pw"])
    assert out.exit_code == 0 and out.output.startswith("$argon2id$")
    out = CliRunner().invoke(token_app, ["apikey", "--principal", "ci", "--tenant", "acme", "--roles", "operator"])
    assert out.exit_code == 0, out.output
    key = out.output.split("key: ", 1)[1].split()[0]
    entry = yaml.safe_load(out.output.split("(under api_keys:):\n", 1)[1])[0]
    assert entry["principal"] == "ci" and entry["hash"].startswith("sha256:") and key not in str(entry)


# --------------------------------------------------------------------------- the API


def test_no_credentials_is_401_and_audited(app):
    client, trail = app
    r = client.get("/api/instances")
    assert r.status_code == 401 and "expected credentials" in r.json()["error"]
    assert trail[-1].outcome == "denied" and trail[-1].action == "authenticate"
    assert client.get("/healthz").status_code == 200  # operations stay open


@pytest.mark.parametrize("token,message", [
    (alg_none(), "it names alg 'none'"),
    (issue("alice", "acme", ["operator"], 600, Keys(secret=OTHER), now=NOW), "not signed by a configured key"),
    (issue("alice", "acme", ["operator"], 600, KEYS, now=NOW - 3600), "expired"),
    ("garbage", "malformed token"),
])
def test_bad_bearer_tokens_are_401_with_the_reason_and_audited(app, token, message):
    client, trail = app
    r = client.get("/api/instances", headers=bearer(token))
    assert r.status_code == 401 and message in r.json()["error"], r.text
    assert trail[-1].outcome == "denied" and message in trail[-1].details["reason"]


def test_audience_and_issuer_are_checked_when_configured(tmp_path, clock):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key())), "kid": "k1", "use": "sig"}
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    keys = Keys.from_values(None, str(jwks), None)
    auth = HttpAuth(keys, users=None, api_keys=None, sessions=Sessions(None, 60), limiter=LoginLimiter(3, 5),
                    audience="kflow", issuer="https://idp.example")

    def token(**extra: Any) -> str:
        claims = {"sub": "alice", "tenant": "acme", "roles": [], "iat": int(NOW), "exp": int(NOW) + 600, "jti": "j",
                  **extra}
        return jwt.encode(claims, private, algorithm="RS256", headers={"kid": "k1"})

    ok = auth.authenticate({"authorization": f"Bearer {token(aud='kflow', iss='https://idp.example')}"}, {}, NOW)
    assert ok.principal.name == "alice" and ok.method == "bearer"
    for bad, message in ((token(aud="other", iss="https://idp.example"), "expected audience 'kflow'"),
                         (token(aud="kflow", iss="https://evil.example"), "expected issuer"),
                         (token(iss="https://idp.example"), "'aud' claim")):
        with pytest.raises(AuthError, match=message):
            auth.authenticate({"authorization": f"Bearer {bad}"}, {}, NOW)


def test_permissions_map_to_operations(app):
    client, trail = app
    viewer = bearer(issue("bob", "acme", ["viewer"], 600, KEYS, now=NOW))
    assert client.get("/api/instances", headers=viewer).status_code == 200
    r = client.post("/api/instances", json={"workflow": "w"}, headers=viewer)
    assert r.status_code == 403 and "definition:Execute" in r.json()["error"]
    assert trail[-1].action == "start" and trail[-1].outcome == "denied" and trail[-1].principal == "bob"
    nobody = bearer(issue("eve", "acme", [], 600, KEYS, now=NOW))
    assert client.get("/api/instances", headers=nobody).status_code == 403
    assert client.get("/api/audit", headers=viewer).status_code == 403  # system:View


def test_api_key_works_and_a_wrong_one_fails(app, files):
    client, trail = app
    assert client.get("/api/instances", headers={"X-API-Key": files["key"]}).status_code == 200
    r = client.get("/api/instances", headers={"X-API-Key": files["key"][:-2] + "xx"})
    assert r.status_code == 401 and "unknown or revoked" in r.json()["error"]
    assert trail[-1].outcome == "denied"


def test_login_sets_a_strict_http_only_cookie_and_posts_need_the_csrf_token(app):
    client, trail = app
    r = client.post("/api/login", json={"username": "alice", "password": "alice-pw"})
    assert r.status_code == 200, r.text
    set_cookie = r.headers["set-cookie"]
    assert f"{SESSION_COOKIE}=" in set_cookie and "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie
    csrf = r.json()["csrf"]
    me = client.get("/api/session").json()
    assert me["principal"] == "alice" and me["csrf"] == csrf
    r = client.post("/api/instances/x/cancel", json={})
    assert r.status_code == 403 and "CSRF" in r.json()["error"] and trail[-1].action == "csrf"
    r = client.post("/api/instances/x/cancel", json={}, headers={CSRF_HEADER: "wrong"})
    assert r.status_code == 403 and "it is wrong" in r.json()["error"]
    r = client.post("/api/instances/x/cancel", json={}, headers={CSRF_HEADER: csrf})
    assert r.status_code == 404  # past authentication and CSRF: the instance does not exist
    client.post("/api/logout")
    assert client.get("/api/session").status_code == 401


def test_login_is_rate_limited_per_user(app):
    client, trail = app
    for _ in range(3):
        assert client.post("/api/login", json={"username": "bob", "password": "x"}).status_code == 401
    r = client.post("/api/login", json={"username": "bob", "password": "bob-pw"})  # right, but too late
    assert r.status_code == 429 and "too many failed logins for user 'bob'" in r.json()["error"]
    assert int(r.headers["retry-after"]) > 0
    assert trail[-1].action == "login" and trail[-1].details["code"] == "RateLimited"


def test_huge_and_deep_bodies_are_refused_before_parsing(app):
    client, trail = app
    token = bearer(issue("alice", "acme", ["operator"], 600, KEYS, now=NOW))
    r = client.post("/api/instances", content=b"{" + b" " * 100_000 + b"}", headers={**token,
                                                                                     "content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    assert trail[-1].details["status"] == 413
    deep = b'{"workflow": "w", "input": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    r = client.post("/api/instances", content=deep, headers={**token, "content-type": "application/json"})
    assert r.status_code == 422 and "nested more than 64" in r.json()["error"]
    assert client.get("/api/instances", headers=token).status_code == 200  # still serving


def test_auth_off_needs_no_credentials(tmp_path):
    store = VisibilityStore(f"sqlite:///{tmp_path / 'vis.db'}")
    with TestClient(create_app(store, None)) as client:
        assert client.get("/api/instances").status_code == 200
        assert client.get("/api/session").json()["auth"] is False
        assert client.post("/api/login", json={"username": "a", "password": "b"}).status_code == 404
    store.close()
