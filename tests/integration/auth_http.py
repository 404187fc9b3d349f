"""A secured deployment for the HTTP auth tests: an engine and a visibility server with ``KFLOW_AUTH=on``.

The policy is applied as a system_admin; console users (argon2 hashes) and an API key are in
files the server reads; workflows are deployed by the admin. The API's and console's tests share it.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from kflow.client import Client
from kflow.config import EngineConfig, KafkaConfig, VisibilityConfig
from kflow.security.http import hash_password, mint_api_key
from kflow.security.policy import parse_policy
from kflow.security.tokens import Keys, issue
from kflow.streams.policies import publish_policy
from kflow.streams.processor import EngineProcessor
from kflow.testing import assert_eventually
from kflow.visibility.server import VisibilityServer

SECRET = "kflow-http-auth-test-secret-at-least-32-bytes"
KEYS = Keys(secret=SECRET.encode())
PARTITIONS = 2
POLICY = {
    "roles": {
        "viewer": ["instance:View", "definition:View"],
        "operator": ["instance:View", "instance:Execute", "instance:Manage", "definition:View", "definition:Execute",
                     "system:View"],
    },
}
PASSWORDS = {"alice": "alice-pw", "victor": "victor-pw", "mallory": "mallory-pw"}
USERS = [("alice", "acme", ["operator"]), ("victor", "acme", ["viewer"]), ("mallory", "globex", ["operator"])]
WAITS = {"name": "http-wait", "version": 1, "steps": [
    {"id": "tag", "set": {"n": "1"}, "search": {"note": "input.note"}},
    {"id": "w", "wait": {"signal": "go", "timeout": "1h"}, "output": "got"},
    {"id": "done", "succeed": "got"}]}
FAILS = {"name": "http-fail", "version": 1, "steps": [
    {"id": "tag", "set": {"n": "1"}, "search": {"note": "input.note"}},
    {"id": "boom", "fail": {"error": "Boom", "message": "input.note"}}]}


def token(principal: str, tenant: str = "acme", roles: tuple[str, ...] = (), ttl: float = 3600) -> str:
    return issue(principal, tenant, roles, ttl, KEYS)


class SecuredStack:
    """Engine + visibility server with auth on, on one topic prefix."""

    def __init__(self, bootstrap: str, root: Path) -> None:
        self.bootstrap, self.root = bootstrap, root
        self.prefix = f"h{uuid.uuid4().hex[:8]}."
        self.admin_token = token("root", "acme", ("system_admin",))
        self.engine: EngineProcessor | None = None
        self.thread: threading.Thread | None = None
        self.server: VisibilityServer | None = None
        self.admin: Client | None = None
        users = root / "users.yaml"
        users.write_text(yaml.safe_dump({"users": [
            {"username": n, "password_hash": hash_password(PASSWORDS[n]), "tenant": t, "roles": r}
            for n, t, r in USERS]}))
        self.api_key, entry = mint_api_key("ci", "acme", ["operator"])
        keys = root / "keys.yaml"
        keys.write_text(yaml.safe_dump({"api_keys": [entry]}))
        self.users_file, self.keys_file = users, keys

    def config(self, cls: Any = KafkaConfig, **kw: Any) -> Any:
        return cls(bootstrap=self.bootstrap, topic_prefix=self.prefix, partitions=PARTITIONS, dev_tuning=True,
                   auth=True, jwt_secret=SECRET, **kw)

    def start(self) -> None:
        self.engine = EngineProcessor(self.config(EngineConfig, state_dir=str(self.root / "engine"),
                                                  engine_id=uuid.uuid4().hex[:8]))
        self.thread = threading.Thread(target=self.engine.run, name="engine", daemon=True)
        self.thread.start()
        assert self.engine.ready.wait(60), "engine did not get partitions within 60s"
        publish_policy(self.config(token=self.admin_token), parse_policy(POLICY), "test")
        self.admin = Client(config=self.config(token=self.admin_token))
        for spec in (WAITS, FAILS):
            self.admin.deploy(spec)
        self.server = VisibilityServer(self.config(
            VisibilityConfig, state_dir=str(self.root / "vis"), visibility_port=0,
            visibility_group=f"vis-{uuid.uuid4().hex[:6]}", users_file=str(self.users_file),
            api_keys_file=str(self.keys_file), login_max_failures=3))
        self.server.start()
        store = self.server.store
        assert_eventually(lambda: all(store.definition(d["name"]) for d in (WAITS, FAILS)), timeout=60,
                          msg="the projection never folded the definitions")

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.engine is not None:
            self.engine.stop()
            assert self.thread is not None
            self.thread.join(30)
        if self.admin is not None:
            self.admin.close()


def secured_stack(bootstrap: str, root: Path) -> Iterator[SecuredStack]:
    s = SecuredStack(bootstrap, root)
    try:
        s.start()
        yield s
    finally:
        s.close()
