"""Authenticated commands on the real broker: engines with ``KFLOW_AUTH=on`` verify every command.

One stack (an engine with auth on and a worker) serves most tests; the policy is applied with
``kflow policy apply`` as a system_admin. Signed commands come from the client (``KFLOW_TOKEN``)
and from a plain confluent-kafka producer; forged ones are produced raw. Two tests run their own
engines: a policy change applied live to two engines, and a replay refused after the partition
moved to an engine restored from the changelogs.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from typer.testing import CliRunner

from kflow._cli.security import audit_app, policy_app
from kflow.client import Client
from kflow.config import EngineConfig, KafkaConfig, WorkerConfig
from kflow.dlq import read_dlq
from kflow.model.errors import StartRejectedError, UpdateRejectedError
from kflow.model.messages import Command, Task
from kflow.schemas.codec import decode_command, encode_command, encode_task
from kflow.security.tokens import (
    ATTEMPT_HEADER,
    COMMAND_HEADER,
    Keys,
    attempt_token,
    issue,
    progress_token,
    sign_command,
)
from kflow.streams.partitioner import partition_for
from kflow.streams.processor import EngineProcessor
from kflow.streams.topics import ensure_topics
from kflow.testing import assert_eventually
from kflow.visibility.audit_log import read_audit
from kflow.worker import Worker, activity, heartbeat

SECRET = "kflow-test-secret-of-at-least-32-bytes"
OTHER_SECRET = "another-secret-nobody-configured-32b!!"
PARTITIONS = 4
KEYS = Keys(secret=SECRET.encode())

POLICY = """\
roles:
  starter: [definition:Execute, instance:Execute, instance:View]
bindings:
  acme: {alice: [starter]}
  globex: {mallory: [starter]}
"""

#: Released by a test to let ``sec.gated`` return (a result the test can race forged results against).
GATE = threading.Event()


@activity("sec.double", queue="sec")
def double(x: int) -> int:
    return x * 2


@activity("sec.gated", queue="sec")
def gated(x: int) -> int:
    assert GATE.wait(60), "the test never released sec.gated"
    return x + 100


@activity("sec.beating", queue="sec")
def beating(x: int) -> int:
    heartbeat({"at": x})
    return x


WAITS = {"name": "sec-wait", "version": 1, "steps": [
    {"id": "w", "wait": {"signal": "go", "timeout": "1h"}, "output": "got"},
    {"id": "done", "succeed": "got"}]}
PARENT = {"name": "sec-parent", "version": 1, "steps": [
    {"id": "nap", "sleep": "200ms"},
    {"id": "d", "task": "sec.double", "queue": "sec", "input": "input", "output": "twice"},
    {"id": "kid", "child": {"workflow": "sec-leaf", "input": "twice"}, "output": "leaf"},
    {"id": "w", "wait": {"signal": "go", "timeout": "1h"}, "output": "got"},
    {"id": "done", "succeed": "{'twice': twice, 'leaf': leaf, 'got': got}"}]}
LEAF = {"name": "sec-leaf", "version": 1, "steps": [
    {"id": "d", "task": "sec.double", "queue": "sec", "input": "input", "output": "r"},
    {"id": "done", "succeed": "r"}]}
GATED = {"name": "sec-gated", "version": 1, "steps": [
    {"id": "g", "task": "sec.gated", "queue": "sec", "input": "input", "output": "r"},
    {"id": "done", "succeed": "r"}]}


def uid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def token(principal: str, tenant: str = "acme", roles: tuple[str, ...] = ()) -> str:
    return issue(principal, tenant, roles, 3600, KEYS)


class AuthStack:
    """Engines with auth on, a worker, and clients signing as various principals, on one topic prefix."""

    def __init__(self, bootstrap: str, prefix: str, state_root: Path) -> None:
        self.bootstrap, self.prefix, self.state_root = bootstrap, prefix, state_root
        self.engines: list[tuple[EngineProcessor, threading.Thread]] = []
        self.workers: list[Worker] = []
        self.clients: list[Client] = []
        self.admin_token = token("root", "acme", ("system_admin",))
        self.producer: Producer | None = None

    def config(self, cls: Any = KafkaConfig, **kw: Any) -> Any:
        return cls(bootstrap=self.bootstrap, topic_prefix=self.prefix, partitions=PARTITIONS, dev_tuning=True,
                   auth=True, jwt_secret=SECRET, **kw)

    def start_engine(self, state_dir: str | None = None) -> EngineProcessor:
        cfg = self.config(EngineConfig, state_dir=state_dir or str(self.state_root / f"e{len(self.engines)}"),
                          engine_id=uuid.uuid4().hex[:8])
        proc = EngineProcessor(cfg)
        t = threading.Thread(target=proc.run, name="engine", daemon=True)
        t.start()
        assert proc.ready.wait(60), "engine did not get partitions within 60s"
        self.engines.append((proc, t))
        return proc

    def stop_engine(self, proc: EngineProcessor) -> None:
        for i, (p, t) in enumerate(self.engines):
            if p is proc:
                p.stop()
                t.join(30)
                del self.engines[i]
                return

    def start_worker(self) -> Worker:
        import sys

        w = Worker(self.config(WorkerConfig), [sys.modules[__name__]])
        w.start_in_thread()
        self.workers.append(w)
        return w

    def client(self, principal: str, tenant: str = "acme", roles: tuple[str, ...] = ()) -> Client:
        tok = self.admin_token if principal == "root" else token(principal, tenant, roles)
        c = Client(config=self.config(token=tok))
        self.clients.append(c)
        return c

    def apply_policy(self, text: str, tmp: Path) -> int:
        """``kflow policy apply`` as the system_admin; returns the record's offset."""
        path = tmp / f"policy-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(text)
        env = {"KFLOW_JWT_SECRET": SECRET, "KFLOW_TOKEN": self.admin_token, "KFLOW_AUTH": "on"}
        result = CliRunner().invoke(policy_app, ["apply", str(path), "--bootstrap", self.bootstrap,
                                                 "--prefix", self.prefix], env=env)
        assert result.exit_code == 0, result.output
        return int(result.output.rsplit("offset ", 1)[1])

    def raw(self, key: str, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        """Produce a record to the commands topic as any producer could."""
        if self.producer is None:
            self.producer = Producer(self.config().producer_conf())
        self.producer.produce(f"{self.prefix}commands", value, key.encode(), headers=headers)
        assert self.producer.flush(10) == 0

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        for proc, t in self.engines:
            proc.stop()
            t.join(30)
        for c in self.clients:
            c.close()


@pytest.fixture(scope="module")
def auth(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthStack]:
    s = AuthStack(kafka_bootstrap, f"s{uuid.uuid4().hex[:8]}.", tmp_path_factory.mktemp("auth"))
    try:
        s.start_engine()
        s.start_worker()
        s.apply_policy(POLICY, tmp_path_factory.mktemp("policy"))
        root = s.client("root")
        for spec in (WAITS, PARENT, LEAF, GATED):
            root.deploy(spec)
        yield s
    finally:
        s.close()


def signed(command: Command, principal: str = "alice", tenant: str = "acme", *, keys: Keys = KEYS,
           now: float | None = None, ttl: float = 300) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A command's value and a header signed the way any producer can (claims, not a principal token)."""
    value = encode_command(command)
    header = sign_command(command.instance_id.encode(), value, {"sub": principal, "tenant": tenant}, keys, ttl, now=now)
    return value, [(COMMAND_HEADER, header.encode())]


def signal(iid: str, data: Any = "x", command_id: str | None = None) -> Command:
    return Command("SignalWorkflow", iid, {"name": "go", "data": data}, command_id or uuid.uuid4().hex,
                   int(time.time() * 1000))


def rejections(c: Client, iid: str) -> list[dict[str, Any]]:
    return [e.data for e in c.history(iid) if e.type == "CommandRejected"]


def waiting(c: Client, iid: str) -> None:
    """Wait until instance ``iid`` waits for a signal."""
    def waits() -> bool:
        threads = ((c.status(iid) or {}).get("internal") or {}).get("threads") or {}
        return any((t.get("wait") or {}).get("k") == "signal" for t in threads.values())

    assert_eventually(waits, timeout=60, msg=f"{iid} never waited for its signal")


def audits(s: AuthStack, iid: str) -> list[Any]:
    records = read_audit(s.config())
    return [r for r in records if r.details.get("instance_id") == iid]


def dead_letters(s: AuthStack, iid: str) -> list[str]:
    return [r.reason for r in read_dlq(s.config(), limit=10_000) if r.key == iid.encode()]


def alg_none(command: Command) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A token that names ``alg: none`` and carries no signature, otherwise perfectly formed."""
    value = encode_command(command)
    good = sign_command(command.instance_id.encode(), value, {"sub": "root", "tenant": "acme",
                                                              "roles": ["system_admin"]}, KEYS, 300)
    claims = good.split(".")[1]
    head = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(b"=").decode()
    return value, [(COMMAND_HEADER, f"{head}.{claims}.".encode())]


# --------------------------------------------------------------------------- signed commands succeed


def test_signed_commands_from_the_client_run_workflows_with_children_timers_and_signals(auth: AuthStack) -> None:
    alice = auth.client("alice")
    handle = alice.start("sec-parent", 4, id=uid("parent"))
    waiting(alice, handle.id)
    alice.signal(handle.id, "go", "yes")
    assert handle.result(timeout=60) == {"twice": 8, "leaf": 16, "got": "yes"}
    state = alice.status(handle.id)
    assert state is not None and (state["internal"]["owner"], state["internal"]["tenant"]) == ("alice", "acme")
    child = next(iter(e.data["child_id"] for e in alice.history(handle.id) if e.type == "ChildStarted"))
    kid = alice.status(child)
    assert kid is not None and kid["status"] == "COMPLETED"
    # the engine started the child on alice's behalf: hers, in her tenant
    assert (kid["internal"]["owner"], kid["internal"]["tenant"]) == ("alice", "acme")
    assert not rejections(alice, handle.id)


def test_a_raw_confluent_kafka_producer_that_signs_its_records_is_accepted(auth: AuthStack) -> None:
    alice = auth.client("alice")
    iid = uid("raw")
    start = Command("StartWorkflow", iid, {"workflow": "sec-wait", "version": None, "input": None, "parent_id": None,
                                           "parent_ref": None, "id_reuse": None}, uuid.uuid4().hex, 0)
    value = encode_command(start)
    # a producer holding a principal token and the key: sign_command verifies the token first
    header = sign_command(iid.encode(), value, token("alice"), KEYS, 300)
    auth.raw(iid, value, [(COMMAND_HEADER, header.encode())])
    waiting(alice, iid)
    auth.raw(iid, *signed(signal(iid, "raw")))
    assert alice.result(iid, timeout=30) == "raw"


# --------------------------------------------------------------------------- forged commands are refused


def test_unsigned_expired_tampered_replayed_wrong_key_and_alg_none_signals_are_refused(auth: AuthStack) -> None:
    alice = auth.client("alice")
    handle = alice.start("sec-wait", None, id=uid("forged"))
    iid = handle.id
    waiting(alice, iid)
    auth.raw(iid, encode_command(signal(iid, "unsigned")))
    auth.raw(iid, *signed(signal(iid, "expired"), now=time.time() - 3600, ttl=60))
    value, headers = signed(signal(iid, "original"))
    auth.raw(iid, encode_command(signal(iid, "tampered")), headers)  # another value under the same token
    auth.raw(iid, *signed(signal(iid, "wrong key"), keys=Keys(secret=OTHER_SECRET.encode())))
    auth.raw(iid, *alg_none(signal(iid, "alg none")))
    replayed = signed(signal(iid, "replayed"))
    auth.raw(iid, *replayed)  # accepted: the workflow completes with it
    auth.raw(iid, *replayed)  # the same record again: refused
    assert handle.result(timeout=30) == "replayed"
    got = assert_eventually(lambda: (lambda r: r if len(r) == 6 else None)(rejections(alice, iid)), timeout=30)
    assert {r["code"] for r in got} == {"UNAUTHENTICATED"}
    reasons = [r["reason"] for r in got]
    assert "there is none" in reasons[0]  # unsigned
    assert "expired" in reasons[1]
    assert "key or value was changed" in reasons[2]
    assert "not signed by a configured key" in reasons[3]
    assert "'none'" in reasons[4]
    assert "already used" in reasons[5]
    denied = [r for r in audits(auth, iid) if r.outcome == "denied"]
    assert [r.details["reason"] for r in denied] == reasons
    assert all(r.principal == "" and r.action == "signal" and r.resource_id == iid for r in denied)


def test_refused_commands_without_an_instance_go_to_the_dlq_with_the_reason(auth: AuthStack) -> None:
    alice = auth.client("alice")
    unsigned, forged = uid("nobody"), uid("nobody")
    start = Command("StartWorkflow", unsigned, {"workflow": "sec-wait", "version": None, "input": None,
                                                "parent_id": None, "parent_ref": None, "id_reuse": None},
                    uuid.uuid4().hex, 0)
    auth.raw(unsigned, encode_command(start))
    auth.raw(forged, *alg_none(signal(forged)))
    assert_eventually(lambda: any(r.startswith("Unauthenticated: expected a signed token")
                                  for r in dead_letters(auth, unsigned)), timeout=30)
    assert_eventually(lambda: any(r.startswith("Unauthenticated:") and "'none'" in r
                                  for r in dead_letters(auth, forged)), timeout=30)
    assert alice.status(unsigned) is None  # nothing started
    assert [r.outcome for r in audits(auth, unsigned)] == ["denied"]


def test_a_principal_without_a_grant_is_forbidden_and_told_so(auth: AuthStack) -> None:
    carol = auth.client("carol")  # in acme, bound to no role
    with pytest.raises(StartRejectedError, match="Forbidden"):
        carol.start("sec-wait", None, id=uid("carol")).result(timeout=30)


def test_a_signal_across_tenants_is_refused(auth: AuthStack) -> None:
    alice, mallory = auth.client("alice"), auth.client("mallory", "globex")
    handle = alice.start("sec-wait", None, id=uid("tenant"))
    waiting(alice, handle.id)
    mallory.signal(handle.id, "go", "from globex")  # mallory may signal, but only in globex
    got = assert_eventually(lambda: rejections(alice, handle.id), timeout=30)
    assert got[0]["code"] == "FORBIDDEN" and "tenant isolation" in got[0]["reason"]
    alice.signal(handle.id, "go", "from acme")
    assert handle.result(timeout=30) == "from acme"
    denied = [r for r in audits(auth, handle.id) if r.outcome == "denied"]
    assert [(r.principal, r.tenant) for r in denied] == [("mallory", "globex")]


def test_an_update_across_tenants_is_answered_with_the_refusal_and_applies_nothing(auth: AuthStack) -> None:
    alice, mallory = auth.client("alice"), auth.client("mallory", "globex")
    handle = alice.start("sec-wait", None, id=uid("upd"))
    waiting(alice, handle.id)
    before = [e.type for e in alice.history(handle.id)]
    with pytest.raises(UpdateRejectedError) as refused:  # answered at once, not left to time out
        mallory.update(handle.id, "go", "from globex", timeout=30)
    assert refused.value.type == "Forbidden" and "tenant isolation" in refused.value.message
    assert [e.type for e in alice.history(handle.id)] == before + ["CommandRejected"]
    alice.signal(handle.id, "go", "from acme")
    assert handle.result(timeout=30) == "from acme"


# --------------------------------------------------------------------------- activity results


def test_results_without_or_with_another_attempts_token_are_refused_and_the_real_one_counts(auth: AuthStack) -> None:
    alice = auth.client("alice")
    GATE.clear()
    handle = alice.start("sec-gated", 1, id=uid("gated"))
    scheduled = assert_eventually(
        lambda: next((e for e in alice.history(handle.id) if e.type == "ActivityScheduled"), None), timeout=30)
    aid, attempt = scheduled.data["activity_id"], scheduled.data["attempt"]

    def forged(attempt_header: bytes | None = None, command_token: bool = False) -> None:
        cmd = Command("CompleteActivity", handle.id, {"activity_id": aid, "attempt": attempt, "result": -1},
                      uuid.uuid4().hex, 0)
        value = encode_command(cmd)
        headers = [(ATTEMPT_HEADER, attempt_header)] if attempt_header else []
        if command_token:
            claims = {"sub": "root", "tenant": "acme", "roles": ["system_admin"]}
            headers.append((COMMAND_HEADER, sign_command(handle.id.encode(), value, claims, KEYS, 300).encode()))
        auth.raw(handle.id, value, headers or None)

    forged()
    forged(attempt_token(SECRET.encode(), handle.id, aid, attempt + 1).encode())
    forged(command_token=True)  # even a system_admin's command token does not stand in for the attempt's
    # what a reader of the commands topic sees on this attempt's heartbeats does not end it either
    forged(progress_token(attempt_token(SECRET.encode(), handle.id, aid, attempt)).encode())
    got = assert_eventually(lambda: (lambda r: r if len(r) == 4 else None)(rejections(alice, handle.id)), timeout=30)
    assert [r["code"] for r in got] == ["UNAUTHENTICATED"] * 4
    assert "there is none" in got[0]["reason"] and "another attempt" in got[1]["reason"]
    assert "progress token" in got[3]["reason"]
    GATE.set()
    assert handle.result(timeout=30) == 101
    assert [r.action for r in audits(auth, handle.id) if r.outcome == "denied"] == ["complete_activity"] * 4


def test_the_worker_returns_the_attempt_token_with_its_result_and_the_progress_token_before(auth: AuthStack) -> None:
    iid = uid("beat")
    task = Task(iid, f"{iid}:a1", 1, "sec.beating", "sec", 7, "wf", int(time.time() * 1000), report_start=True,
                attempt_token="the-token")
    cfg = auth.config(WorkerConfig)
    ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings, queues=["sec"])
    p = partition_for(iid.encode(), PARTITIONS)
    reader = Consumer({**cfg.consumer_conf(f"read-{uid('g')}"), "isolation.level": "read_uncommitted"})
    reader.assign([TopicPartition(cfg.names.commands, p, OFFSET_BEGINNING)])
    producer = Producer(cfg.producer_conf())
    producer.produce(cfg.names.tasks("sec"), encode_task(task), iid.encode())
    producer.flush(10)
    seen: dict[str, list[tuple[str, bytes]]] = {}

    def reports() -> bool:
        for m in reader.consume(100, 0.2):
            if m.error() is None and m.key() == iid.encode():
                seen[decode_command(m.value()).type] = list(m.headers() or [])
        return {"StartActivity", "HeartbeatActivity", "CompleteActivity"} <= set(seen)

    try:
        assert_eventually(reports, timeout=30)
    finally:
        reader.close()
    # the result returns the attempt token; start and heartbeat reports only its progress token
    assert (ATTEMPT_HEADER, b"the-token") in seen["CompleteActivity"]
    for kind in ("StartActivity", "HeartbeatActivity"):
        assert (ATTEMPT_HEADER, progress_token("the-token").encode()) in seen[kind], kind
        assert all(v != b"the-token" for _, v in seen[kind]), kind


# --------------------------------------------------------------------------- the audit trail


def test_the_audit_trail_of_a_scripted_session_is_complete_and_in_order(auth: AuthStack, tmp_path: Path) -> None:
    alice, mallory = auth.client("alice"), auth.client("mallory", "globex")
    handle = alice.start("sec-wait", None, id=uid("session"))
    iid = handle.id
    waiting(alice, iid)
    alice.signal(iid, "nudge", 1)  # not the awaited signal: recorded, the workflow keeps waiting
    assert alice.status(iid)["status"] == "RUNNING"  # a read: not audited when granted
    mallory.cancel(iid, "not mine")
    assert_eventually(lambda: rejections(alice, iid), timeout=30)
    alice.cancel(iid, "done with it")
    assert_eventually(lambda: alice.status(iid)["status"] == "CANCELLED", timeout=30)
    trail = [(r.principal, r.action, r.outcome) for r in audits(auth, iid)]
    assert trail == [("alice", "start", "success"), ("alice", "signal", "success"),
                     ("mallory", "cancel", "denied"), ("alice", "cancel", "success")]
    start = audits(auth, iid)[0]
    assert (start.resource_type, start.resource_id, start.tenant) == ("definition", "sec-wait", "acme")
    # the CLI lists the same records, filtered
    result = CliRunner().invoke(audit_app, ["list", "--principal", "mallory", "--outcome", "denied", "--since", "1h",
                                            "--json", "--bootstrap", auth.bootstrap, "--prefix", auth.prefix])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert any(r["resource_id"] == iid and r["action"] == "cancel" and "tenant isolation" in r["details"]["reason"]
               for r in lines)
    assert all(r["principal"] == "mallory" and r["outcome"] == "denied" for r in lines)


def test_only_limits_a_system_admin_signed_count_with_auth_on(auth: AuthStack) -> None:
    """A limits record counts on an engine with auth on only when signed by a system_admin: an
    unsigned one produced raw and one signed by a principal without the right are ignored (and the
    latter is refused at once, audited); the engine and ``read_limits`` agree."""
    from kflow.model.errors import KflowError
    from kflow.streams.limits import publish_limits, read_limits

    engine = auth.engines[0][0]
    name = uid("lim").replace("-", "_")
    held = {"limits": [{"name": name, "workflow": "sec-none", "max_running": 3}]}
    offset, _ = publish_limits(auth.config(token=auth.admin_token), held, "test")
    assert_eventually(lambda: engine.quotas.catch_up(5) and engine.quotas.offset == offset, timeout=30,
                      msg="the engine did not take the signed limits")

    if auth.producer is None:
        auth.producer = Producer(auth.config().producer_conf())
    auth.producer.produce(f"{auth.prefix}limits", b'{"limits": []}', b"limits")  # unsigned: lifts nothing
    assert auth.producer.flush(10) == 0
    with pytest.raises(KflowError, match="Forbidden: applying limits needs role system_admin"):
        publish_limits(auth.config(token=token("alice", roles=("starter",))), {"limits": []}, "test")

    assert engine.quotas.catch_up(10)
    assert engine.quotas.offset == offset and [s.name for s in engine.quotas.for_start("sec-none", "acme")] == [name]
    shown = read_limits(auth.config(token=auth.admin_token))
    try:
        assert shown.offset == offset
    finally:
        shown.close()
    applied = [(r.principal, r.outcome) for r in read_audit(auth.config()) if r.action == "limits_apply"]
    assert ("root", "success") in applied and ("alice", "denied") in applied


def test_the_policy_and_audit_topics_exist_with_their_configs(auth: AuthStack) -> None:
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    admin = AdminClient({"bootstrap.servers": auth.bootstrap})
    meta = admin.list_topics(timeout=10)
    assert len(meta.topics[f"{auth.prefix}policies"].partitions) == 1
    assert len(meta.topics[f"{auth.prefix}audit"].partitions) == PARTITIONS
    for topic, policy in ((f"{auth.prefix}policies", "compact"), (f"{auth.prefix}audit", "delete")):
        res = ConfigResource(ResourceType.TOPIC, topic)
        configs = admin.describe_configs([res])[res].result(10)
        assert configs["cleanup.policy"].value == policy


# --------------------------------------------------------------------------- stacks of their own


def test_a_policy_change_takes_effect_live_on_two_engines(kafka_bootstrap: str, tmp_path: Path) -> None:
    s = AuthStack(kafka_bootstrap, f"p{uuid.uuid4().hex[:8]}.", tmp_path)
    try:
        first = s.start_engine()
        s.apply_policy(POLICY, tmp_path)
        s.client("root").deploy(WAITS)
        second = s.start_engine()
        assert_eventually(lambda: first.store.partitions and second.store.partitions
                          and len(first.store.partitions) + len(second.store.partitions) == PARTITIONS, timeout=60,
                          msg="the two engines never split the partitions")
        bob = s.client("bob")  # in acme, bound to no role yet
        ids = [_id_on(set(e.store.partitions)) for e in (first, second)]
        for iid in ids:
            with pytest.raises(StartRejectedError, match="Forbidden"):
                bob.start("sec-wait", None, id=iid).result(timeout=30)
        offset = s.apply_policy(POLICY.replace("alice: [starter]", "alice: [starter], bob: [starter]"), tmp_path)
        assert_eventually(lambda: first.policies.offset == offset and second.policies.offset == offset, timeout=30,
                          msg="an engine did not pick up the new policy")
        for engine in (first, second):
            handle = bob.start("sec-wait", None, id=_id_on(set(engine.store.partitions)))
            waiting(bob, handle.id)
            bob.signal(handle.id, "go", "granted")
            assert handle.result(timeout=30) == "granted"
        applied = [r for r in read_audit(s.config()) if r.action == "policy_apply"]
        assert [(r.principal, r.outcome, r.resource_id) for r in applied] == [("root", "success", "policy")] * 2
    finally:
        s.close()


def _id_on(partitions: set[int]) -> str:
    """A fresh instance id whose partition is one of ``partitions``."""
    while True:
        iid = uid("on")
        if partition_for(iid.encode(), PARTITIONS) in partitions:
            return iid


def test_a_replay_is_refused_by_an_engine_restored_from_the_changelogs(kafka_bootstrap: str, tmp_path: Path) -> None:
    s = AuthStack(kafka_bootstrap, f"r{uuid.uuid4().hex[:8]}.", tmp_path)
    try:
        engine = s.start_engine()
        s.apply_policy(POLICY, tmp_path)
        alice = s.client("alice")
        s.client("root").deploy(WAITS)
        handle = alice.start("sec-wait", None, id=uid("replay"))
        waiting(alice, handle.id)
        # a status query writes no state: its token id goes to the partition's seen-token records;
        # the signal's goes into the instance's state. Both come back from the changelogs.
        ask = signed(Command("QueryStatus", handle.id, {"query_id": uuid.uuid4().hex}, uuid.uuid4().hex, 0))
        s.raw(handle.id, *ask)
        nudge = Command("SignalWorkflow", handle.id, {"name": "nudge", "data": 1}, uuid.uuid4().hex, 0)
        record = signed(nudge)
        s.raw(handle.id, *record)  # decided after the query (one partition, in order)
        assert_eventually(lambda: any(e.type == "SignalReceived" for e in alice.history(handle.id)), timeout=30)
        assert rejections(alice, handle.id) == []
        s.stop_engine(engine)
        s.start_engine(str(tmp_path / "fresh"))  # an empty state dir: everything comes from the changelogs
        s.raw(handle.id, *record)
        s.raw(handle.id, *ask)

        def both_refused() -> list[dict[str, Any]]:
            found = rejections(alice, handle.id)
            assert len(found) == 2, found
            return found
        got = assert_eventually(both_refused, timeout=60)
        assert [r["command_type"] for r in got] == ["SignalWorkflow", "QueryStatus"]
        assert all(r["code"] == "UNAUTHENTICATED" and "already used" in r["reason"] for r in got)
        alice.signal(handle.id, "go", "after restart")
        assert handle.result(timeout=30) == "after restart"
    finally:
        s.close()
