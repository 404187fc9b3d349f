"""Every process that produces commands signs them as its own principal, on the real broker.

An engine with ``KFLOW_AUTH=on`` (the :class:`AuthStack` of ``test_security``) reads commands
from a Kafka trigger runner and from ``kflow dlq replay``: the trigger signs with its own
``KFLOW_TOKEN`` and the audit trail names it; a trigger without a token cannot start (auth on) or
is refused by the engine (auth off on its side), with an audit record; a principal without the
grant is forbidden. ``kflow dlq replay`` needs system:Admin, checked before anything is sent, and
the command it re-signs then runs. A command signed by the stdlib-only recipe of
docs/security.md ("Signing from another language") is accepted as well.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from typer.testing import CliRunner

from kflow.cli import app
from kflow.config import TriggerConfig
from kflow.connectors.triggers import TriggerRunner, load_triggers
from kflow.dlq import read_dlq
from kflow.schemas.codec import JSON_HEADER
from kflow.security.tokens import COMMAND_HEADER, KeyConfigError
from kflow.testing import assert_eventually
from tests.integration.test_security import PARTITIONS, SECRET, AuthStack, audits, token, uid, waiting

ROOT = Path(__file__).resolve().parents[2]

POLICY = """\
roles:
  starter: [definition:Execute, instance:Execute, instance:View]
  trigger: [definition:Execute, instance:Execute]
bindings:
  acme: {alice: [starter], orders-trigger: [trigger]}
"""

WAITS = {"name": "proc-wait", "version": 1, "steps": [
    {"id": "w", "wait": {"signal": "paid", "timeout": "1h"}, "output": "paid"},
    {"id": "done", "succeed": "paid"}]}

TRIGGERS = """
triggers:
  - name: order-created
    source: {{kafka: {{topic: {topic}}}}}
    when: "message.type == 'created'"
    action: start
    workflow: proc-wait
    id: "'order-' + message.order_id"
  - name: order-paid
    source: {{kafka: {{topic: {topic}}}}}
    when: "message.type == 'paid'"
    action: signal
    instance: "'order-' + message.order_id"
    signal: paid
    input: "message.amount"
"""


@pytest.fixture(scope="module")
def auth(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthStack]:
    s = AuthStack(kafka_bootstrap, f"sp{uuid.uuid4().hex[:8]}.", tmp_path_factory.mktemp("procs"))
    try:
        s.start_engine()
        s.apply_policy(POLICY, tmp_path_factory.mktemp("policy"))
        s.client("root").deploy(WAITS)
        yield s
    finally:
        s.close()


class Source:
    """A fresh source topic and a trigger runner on it, configured as ``config``."""

    def __init__(self, s: AuthStack, config: TriggerConfig) -> None:
        self.topic = f"{s.prefix}orders-{uuid.uuid4().hex[:6]}"
        admin = AdminClient({"bootstrap.servers": s.bootstrap})
        for f in admin.create_topics([NewTopic(self.topic, num_partitions=1, replication_factor=1)]).values():
            f.result(30)
        self.runner = TriggerRunner(load_triggers(TRIGGERS.format(topic=self.topic)), config,
                                    group_id=f"{s.prefix}trg-{uuid.uuid4().hex[:6]}")
        self.producer = Producer({"bootstrap.servers": s.bootstrap})

    def __enter__(self) -> Source:
        self.runner.start()
        assert self.runner.ready(30), "the trigger consumer never got its partition"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.runner.stop()

    def send(self, message: dict[str, Any]) -> None:
        self.producer.produce(self.topic, orjson.dumps(message), str(message["order_id"]).encode())
        assert self.producer.flush(10) == 0


def trigger_config(s: AuthStack, **kw: Any) -> TriggerConfig:
    settings = {"bootstrap": s.bootstrap, "topic_prefix": s.prefix, "partitions": PARTITIONS, "dev_tuning": True,
                "auth": True, "jwt_secret": SECRET, **kw}
    return TriggerConfig(**settings)


def dlq_reasons(s: AuthStack, iid: str) -> list[str]:
    return [r.reason for r in read_dlq(s.config(), limit=100_000) if r.key == iid.encode()]


# --------------------------------------------------------------------------- triggers


def test_a_kafka_trigger_signs_as_its_own_principal_and_the_audit_trail_names_it(auth: AuthStack) -> None:
    alice = auth.client("alice")
    oid = uuid.uuid4().hex[:8]
    iid = f"order-{oid}"
    with Source(auth, trigger_config(auth, token=token("orders-trigger"))) as source:
        source.send({"type": "created", "order_id": oid})
        waiting(alice, iid)
        source.send({"type": "paid", "order_id": oid, "amount": 12.5})
        assert alice.result(iid, timeout=60) == 12.5
    state = auth.client("root").status(iid)
    assert state is not None and (state["internal"]["owner"], state["internal"]["tenant"]) == ("orders-trigger", "acme")
    trail = [(r.principal, r.tenant, r.action, r.outcome) for r in audits(auth, iid)]
    assert trail == [("orders-trigger", "acme", "start", "success"), ("orders-trigger", "acme", "signal", "success")]


def test_a_trigger_without_a_token_cannot_start_with_auth_on(auth: AuthStack) -> None:
    with pytest.raises(KeyConfigError, match="KFLOW_TOKEN"):
        Source(auth, trigger_config(auth))


def test_an_unsigned_trigger_is_refused_by_the_engine_with_an_audit_record(auth: AuthStack) -> None:
    oid = uuid.uuid4().hex[:8]
    iid = f"order-{oid}"
    unsigned = trigger_config(auth, auth=False, jwt_secret=None)  # a runner that does not know auth is on
    with Source(auth, unsigned) as source:
        source.send({"type": "created", "order_id": oid})
        reasons = assert_eventually(lambda: dlq_reasons(auth, iid), timeout=30)
    assert reasons[0].startswith("Unauthenticated: expected a signed token")
    denied = assert_eventually(lambda: audits(auth, iid), timeout=30)
    assert [(r.principal, r.action, r.outcome) for r in denied] == [("", "start", "denied")]
    assert auth.client("root").status(iid) is None


def test_a_trigger_principal_without_the_grant_is_forbidden(auth: AuthStack) -> None:
    oid = uuid.uuid4().hex[:8]
    iid = f"order-{oid}"
    with Source(auth, trigger_config(auth, token=token("stray-trigger"))) as source:  # bound to no role
        source.send({"type": "created", "order_id": oid})
        reasons = assert_eventually(lambda: dlq_reasons(auth, iid), timeout=30)
    assert reasons[0].startswith("Forbidden:")
    denied = assert_eventually(lambda: audits(auth, iid), timeout=30)
    assert [(r.principal, r.action, r.outcome) for r in denied] == [("stray-trigger", "start", "denied")]


# --------------------------------------------------------------------------- kflow dlq replay


def test_dlq_replay_needs_system_admin_and_the_command_it_re_signs_runs(auth: AuthStack) -> None:
    alice, root = auth.client("alice"), auth.client("root")
    name = f"late{uuid.uuid4().hex[:6]}"
    iid = uid("late")
    alice.start(name, "x", id=iid, require_deployed=False)  # not deployed yet: dead-lettered
    dead = assert_eventually(lambda: next((r for r in read_dlq(auth.config(), limit=100_000)
                                           if r.key == iid.encode()), None), timeout=30)
    assert f"unknown workflow '{name}'" in dead.reason
    root.deploy({"name": name, "version": 1, "steps": [{"id": "done", "succeed": "input"}]})
    opts = ["dlq", "replay", "--ref", dead.ref, "--bootstrap", auth.bootstrap, "--prefix", auth.prefix]
    env = {"KFLOW_AUTH": "on", "KFLOW_JWT_SECRET": SECRET}

    unsigned = CliRunner().invoke(app, opts, env={**env, "KFLOW_TOKEN": None})
    assert unsigned.exit_code == 1 and "set KFLOW_TOKEN" in unsigned.output, unsigned.output
    refused = CliRunner().invoke(app, opts, env={**env, "KFLOW_TOKEN": token("alice")})
    assert refused.exit_code == 1, refused.output
    assert "error: Forbidden: replaying dead letters needs role system_admin" in refused.output
    assert "'alice' of tenant 'acme' cannot act on system 'dlq'" in refused.output

    replayed = CliRunner().invoke(app, opts, env={**env, "KFLOW_TOKEN": auth.admin_token})
    assert replayed.exit_code == 0 and "replayed 1 message" in replayed.output, replayed.output
    assert root.result(iid, timeout=60) == "x"
    # only the operator's re-signed start ran (alice's refused replay sent nothing), on the record
    started = [(r.principal, r.outcome) for r in audits(auth, iid) if r.action == "start"]
    assert started == [("alice", "granted"), ("root", "success")]
    replays = [(r.principal, r.outcome) for r in _replay_audits(auth)]
    assert replays[-2:] == [("alice", "denied"), ("root", "success")]


def _replay_audits(s: AuthStack) -> list[Any]:
    from kflow.visibility.audit_log import read_audit

    return [r for r in read_audit(s.config()) if r.action == "dlq_replay"]


# --------------------------------------------------------------------------- any language


def _doc_recipe() -> str:
    """The shell recipe of docs/security.md that signs a JSON command with openssl."""
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    found = re.search(r"```bash\n(# sign a JSON command.*?)```", text, re.S)
    assert found, "docs/security.md lost its shell signing recipe"
    return found.group(1)


def test_a_command_signed_by_the_shell_recipe_of_the_docs_is_accepted(auth: AuthStack, tmp_path: Path) -> None:
    alice = auth.client("alice")
    handle = alice.start("proc-wait", None, id=uid("shell"))
    waiting(alice, handle.id)
    value = orjson.dumps({"type": "SignalWorkflow", "instance_id": handle.id, "command_id": uuid.uuid4().hex,
                          "name": "paid", "data": "by shell"})
    (tmp_path / "value.json").write_bytes(value)
    script = _doc_recipe().split("kcat ", 1)[0] + 'printf "%s" "$TOKEN"\n'
    env = {"KEY": handle.id, "SUB": "alice", "TENANT": "acme", "KFLOW_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    auth.raw(handle.id, value, [JSON_HEADER, (COMMAND_HEADER, out.stdout.encode())])
    assert handle.result(timeout=30) == "by shell"
