"""The engine's gate, the replay cache's transactions, the command signer, and the task's attempt token on the wire.

The guard is tested purely: commands, states and headers in, a :class:`Check` out. What the lane
does with the answer (events, DLQ, audit) is tested on the real broker in
``tests/integration/test_security.py``.
"""

from __future__ import annotations

import base64
import json
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

import kflow.schemas
from kflow.engine.core import OWNER, TENANT, refuse
from kflow.model.messages import Command, RejectCode, Task
from kflow.schemas.codec import MAGIC, decode_task, encode_task
from kflow.security.guard import ENGINE_PRINCIPAL, SEEN_KEY_PREFIX, SEEN_PER_RECORD, CommandGuard, SeenTokens
from kflow.security.policy import Policy, parse_policy
from kflow.security.principal import AuthError, Principal
from kflow.security.tokens import (
    CommandSigner,
    KeyConfigError,
    Keys,
    ReplayCache,
    attempt_token,
    issue,
    progress_token,
    sign_command,
)

SECRET = b"s" * 32
KEYS = Keys(secret=SECRET)
NOW = 1_700_000_000.0
POLICY = parse_policy({"roles": {"starter": ["definition:Execute", "instance:Execute"]},
                       "bindings": {"acme": {"alice": ["starter"]}, "globex": {"mallory": ["starter"]}}})


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KFLOW_AUTH", "KFLOW_JWT_SECRET", "KFLOW_JWKS_FILE", "KFLOW_SIGNING_KEY", "KFLOW_TOKEN",
                 "KFLOW_TOPIC_PREFIX", "KFLOW_DEV_TUNING"):
        monkeypatch.delenv(name, raising=False)


def guard(policy: Policy = POLICY) -> CommandGuard:
    return CommandGuard(KEYS, lambda: policy, engine_ttl_s=7 * 86400)


def state(iid: str = "order-1", owner: str | None = "alice", tenant: str | None = "acme") -> dict[str, Any]:
    st: dict[str, Any] = {"id": iid, "workflow": "order", "version": 1, "status": "RUNNING", "seq": 3,
                          "updated_ms": 0}
    if owner is not None:
        st[OWNER] = owner
    if tenant is not None:
        st[TENANT] = tenant
    return st


def signal(iid: str = "order-1") -> Command:
    return Command("SignalWorkflow", iid, {"name": "go", "data": 1}, "c1", 0)


def check(cmd: Command, st: dict[str, Any] | None, who: dict[str, Any] | None, *, g: CommandGuard | None = None,
          seen: ReplayCache | None = None, value: bytes = b"value", keys: Keys = KEYS, now: float = NOW):
    token = sign_command(cmd.instance_id.encode(), value, who, keys, 60, now=NOW).encode() if who else None
    return (g or guard()).check(cmd, st, token, None, cmd.instance_id.encode(), value, now, seen or ReplayCache())


# --------------------------------------------------------------------------- workflow commands


def test_a_granted_signal_names_its_principal_and_rule() -> None:
    got = check(signal(), state(), {"sub": "alice", "tenant": "acme"})
    assert got.allowed and got.principal == Principal("alice", "acme")
    assert (got.action, got.resource.type, got.resource.id, got.resource.owner) == ("signal", "instance", "order-1",
                                                                                     "alice")


def test_the_owner_may_cancel_without_any_role() -> None:
    got = check(Command("CancelWorkflow", "order-1", {"reason": ""}), state(owner="dora"), {"sub": "dora", "tenant": "acme"})
    assert got.allowed and "owns" in got.reason


def test_a_priority_change_needs_manage_rights_like_a_suspend() -> None:
    change = Command("SetPriority", "order-1", {"priority": 1})
    owner = check(change, state(owner="dora"), {"sub": "dora", "tenant": "acme"})
    assert owner.allowed and owner.action == "set_priority"
    starter = check(change, state(owner="dora"), {"sub": "alice", "tenant": "acme"})  # may signal, not manage
    assert not starter.allowed and starter.action == "set_priority"


@pytest.mark.parametrize(("who", "why"), [
    (None, "there is none"),
    ({"sub": "alice", "tenant": "acme", "roles": ["system_admin"]}, None),  # a valid token: the control
])
def test_an_unsigned_command_is_unauthenticated(who: dict[str, Any] | None, why: str | None) -> None:
    got = check(signal(), state(), who)
    if why is None:
        assert got.allowed
    else:
        assert got.code == RejectCode.UNAUTHENTICATED and why in got.reason and got.principal is None


def test_expired_tampered_and_wrong_key_tokens_are_unauthenticated() -> None:
    alice = {"sub": "alice", "tenant": "acme"}
    assert "expired" in check(signal(), state(), alice, now=NOW + 61).reason
    token = sign_command(b"order-1", b"value", alice, KEYS, 60, now=NOW).encode()
    tampered = guard().check(signal(), state(), token, None, b"order-1", b"other value", NOW, ReplayCache())
    assert tampered.code == RejectCode.UNAUTHENTICATED and "changed" in tampered.reason
    wrong = check(signal(), state(), alice, keys=Keys(secret=b"w" * 32))
    assert wrong.code == RejectCode.UNAUTHENTICATED and "not signed by a configured key" in wrong.reason


def test_alg_none_is_unauthenticated() -> None:
    good = sign_command(b"order-1", b"value", {"sub": "root", "tenant": "acme", "roles": ["system_admin"]}, KEYS, 60,
                        now=NOW)
    head = base64.urlsafe_b64encode(json.dumps({"alg": "none"}).encode()).rstrip(b"=").decode()
    forged = f"{head}.{good.split('.')[1]}.".encode()
    got = guard().check(signal(), state(), forged, None, b"order-1", b"value", NOW, ReplayCache())
    assert got.code == RejectCode.UNAUTHENTICATED and "'none'" in got.reason


def test_a_replayed_token_is_unauthenticated() -> None:
    seen = ReplayCache()
    token = sign_command(b"order-1", b"value", {"sub": "alice", "tenant": "acme"}, KEYS, 60, now=NOW).encode()
    g = guard()
    assert g.check(signal(), state(), token, None, b"order-1", b"value", NOW, seen).allowed
    again = g.check(signal(), state(), token, None, b"order-1", b"value", NOW + 1, seen)
    assert again.code == RejectCode.UNAUTHENTICATED and "already used" in again.reason


def test_tenant_isolation_forbids_a_signal_from_another_tenant() -> None:
    got = check(signal(), state(), {"sub": "mallory", "tenant": "globex"})
    assert got.code == RejectCode.FORBIDDEN and "tenant isolation" in got.reason
    assert got.principal == Principal("mallory", "globex")


def test_a_start_is_checked_on_the_definition_in_the_senders_tenant() -> None:
    start = Command("StartWorkflow", "new-1", {"workflow": "order"})
    assert check(start, None, {"sub": "mallory", "tenant": "globex"}).allowed
    carol = check(start, None, {"sub": "carol", "tenant": "acme"})
    assert carol.code == RejectCode.FORBIDDEN and "definition 'order'" in carol.reason
    # an id taken in another tenant is not theirs to restart
    taken = check(start, state("new-1"), {"sub": "mallory", "tenant": "globex"})
    assert taken.code == RejectCode.FORBIDDEN and "tenant isolation" in taken.reason


def test_instances_started_with_auth_off_are_in_the_default_tenant() -> None:
    legacy = state(owner=None, tenant=None)
    assert check(signal(), legacy, {"sub": "alice", "tenant": "acme"}).code == RejectCode.FORBIDDEN
    assert check(signal(), legacy, {"sub": "ops", "tenant": "default", "roles": ["system_admin"]}).allowed


def test_the_engines_own_commands_need_system_admin() -> None:
    fire = Command("FireTimer", "order-1", {"timer_id": "t1"})
    forged = check(fire, state(), {"sub": "alice", "tenant": "acme"})
    assert forged.code == RejectCode.FORBIDDEN and forged.resource.type == "system"
    g = guard()
    value = b"fail child"
    token = g.sign(b"order-1", value, state(), NOW)
    got = g.check(Command("FailChild", "order-1", {"child_id": "c"}), state(), token, None, b"order-1", value, NOW,
                  ReplayCache())
    assert got.allowed and got.principal is not None and got.principal.name == ENGINE_PRINCIPAL


def test_the_engines_own_token_ids_are_not_remembered() -> None:
    """They live as long as a command may wait in the topic; a replayed engine record is left to the
    engine's deduplication, so the partition's cache and changelog do not grow with them."""
    g, seen = guard(), ReplayCache()
    token = g.sign(b"order-1", b"cancel child", state(), NOW)
    cmd = Command("CancelWorkflow", "order-1", {"reason": "parent cancelled"})
    for _ in range(2):
        assert g.check(cmd, state(), token, None, b"order-1", b"cancel child", NOW, seen).allowed
    assert len(seen) == 0 and seen.pending() == []


def test_a_child_started_by_the_engine_belongs_to_its_parents_owner_and_tenant() -> None:
    g = guard()
    start = Command("StartWorkflow", "order-1:kid", {"workflow": "order"})
    token = g.sign(b"order-1:kid", b"start", state(owner="alice", tenant="acme"), NOW)
    got = g.check(start, None, token, None, b"order-1:kid", b"start", NOW, ReplayCache())
    assert got.allowed and got.principal is not None
    assert g.starter(got.principal) == ("alice", "acme")


def test_only_a_system_admin_may_start_on_behalf_of_someone_else() -> None:
    g = guard()
    assert g.starter(Principal("eve", "acme", frozenset(), on_behalf_of="alice")) == ("eve", "acme")
    assert g.starter(Principal("alice", "acme")) == ("alice", "acme")


def test_a_guard_needs_the_hs256_secret() -> None:
    with pytest.raises(KeyConfigError, match="KFLOW_JWT_SECRET"):
        CommandGuard(Keys(), lambda: POLICY, 60)


# --------------------------------------------------------------------------- activity reports


@pytest.mark.parametrize("kind", ["CompleteActivity", "FailActivity", "HeartbeatActivity", "StartActivity"])
def test_reports_are_checked_by_their_attempt_token(kind: str) -> None:
    g = guard()
    cmd = Command(kind, "order-1", {"activity_id": "a1", "attempt": 2})
    right = attempt_token(SECRET, "order-1", "a1", 2).encode()
    other = attempt_token(SECRET, "order-1", "a1", 1).encode()
    assert g.check(cmd, state(), None, right, None, None, NOW, ReplayCache()).allowed
    missing = g.check(cmd, state(), None, None, None, None, NOW, ReplayCache())
    assert missing.code == RejectCode.UNAUTHENTICATED and "there is none" in missing.reason
    stale = g.check(cmd, state(), None, other, None, None, NOW, ReplayCache())
    assert stale.code == RejectCode.UNAUTHENTICATED and "another attempt" in stale.reason
    # a command token, even a system_admin's, is no substitute
    admin = sign_command(b"order-1", b"v", {"sub": "root", "tenant": "acme", "roles": ["system_admin"]}, KEYS, 60,
                         now=NOW).encode()
    assert not g.check(cmd, state(), admin, None, b"order-1", b"v", NOW, ReplayCache()).allowed


@pytest.mark.parametrize("kind", ["HeartbeatActivity", "StartActivity"])
def test_start_and_heartbeat_reports_take_the_progress_token(kind: str) -> None:
    g = guard()
    cmd = Command(kind, "order-1", {"activity_id": "a1", "attempt": 2})
    progress = progress_token(attempt_token(SECRET, "order-1", "a1", 2)).encode()
    assert g.check(cmd, state(), None, progress, None, None, NOW, ReplayCache()).reason == (
        "the progress token of the attempt it reports on")
    other = progress_token(attempt_token(SECRET, "order-1", "a1", 1)).encode()
    assert g.check(cmd, state(), None, other, None, None, NOW, ReplayCache()).code == RejectCode.UNAUTHENTICATED


@pytest.mark.parametrize("kind", ["CompleteActivity", "FailActivity"])
def test_a_progress_token_read_off_a_heartbeat_cannot_end_the_attempt(kind: str) -> None:
    cmd = Command(kind, "order-1", {"activity_id": "a1", "attempt": 2})
    progress = progress_token(attempt_token(SECRET, "order-1", "a1", 2)).encode()
    got = guard().check(cmd, state(), None, progress, None, None, NOW, ReplayCache())
    assert got.code == RejectCode.UNAUTHENTICATED and "its progress token" in got.reason


def test_a_progress_token_does_not_reveal_its_attempt_token() -> None:
    token = attempt_token(SECRET, "order-1", "a1", 2)
    assert progress_token(token) != token and progress_token(token.encode()) == progress_token(token)
    assert progress_token(token) != progress_token(attempt_token(SECRET, "order-1", "a1", 3))


def test_an_audit_record_names_who_what_and_why() -> None:
    got = check(signal(), state(), {"sub": "mallory", "tenant": "globex"})
    record = CommandGuard.audit(got, signal(), "denied", 1234, "kflow.commands[1]@7")
    assert (record.principal, record.tenant, record.action, record.resource_type, record.resource_id, record.outcome) \
        == ("mallory", "globex", "signal", "instance", "order-1", "denied")
    assert record.details["code"] == "FORBIDDEN" and "tenant isolation" in record.details["reason"]
    assert record.id == "kflow.commands[1]@7" and record.source == "kafka:kflow.commands[1]@7"


def test_refuse_appends_a_rejection_to_the_instance() -> None:
    st = state()
    d = refuse(st, signal(), 99, RejectCode.FORBIDDEN, "expected a grant, but none")
    assert [e.type for e in d.events] == ["CommandRejected"]
    assert d.events[0].data == {"command_type": "SignalWorkflow", "code": "FORBIDDEN", "reason": "expected a grant, but none"}
    assert d.state is not None and d.state["seq"] == 4 and st["seq"] == 3


# --------------------------------------------------------------------------- the replay cache's transactions


def test_rolled_back_ids_can_be_used_again_and_committed_ones_cannot() -> None:
    cache = ReplayCache()
    cache.add("a", NOW + 60, NOW)
    cache.rollback()
    cache.add("a", NOW + 60, NOW)  # the aborted batch is read again: the same token passes
    cache.commit()
    cache.rollback()  # nothing pending: nothing forgotten
    with pytest.raises(AuthError, match="already used"):
        cache.add("a", NOW + 60, NOW)


def test_loaded_ids_count_as_seen_and_expired_ones_are_skipped() -> None:
    cache = ReplayCache()
    cache.load([("old", NOW - 1), ("live", NOW + 60)], NOW)
    assert "live" in cache and "old" not in cache and cache.pending() == []
    with pytest.raises(AuthError):
        cache.add("live", NOW + 60, NOW)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from("abcdef"), st.integers(5, 40), min_size=1),
       st.lists(st.tuples(st.sampled_from("abcdef"), st.booleans()), max_size=30))
def test_a_full_cache_still_refuses_every_replay(lifetimes: dict[str, int], ops: list[tuple[str, bool]]) -> None:
    """Whatever is added, committed or rolled back, a token committed once and not expired is refused
    (a token's id and expiry come together: a replay brings the same expiry)."""
    cache = ReplayCache(capacity=2)
    committed: set[str] = set()
    now = NOW
    for jti, commit in ops:
        if jti not in lifetimes:
            continue
        now += 1
        exp = NOW + lifetimes[jti] * 2
        try:
            cache.add(jti, exp, now)
        except AuthError:
            continue  # a replay, or a token the full cache can no longer vouch for: failing closed is fine
        assert not (jti in committed and exp > now), f"{jti} replayed"
        if commit:
            cache.commit()
            committed.add(jti)
        else:
            cache.rollback()


# --------------------------------------------------------------------------- seen tokens across restarts


def test_seen_tokens_are_written_per_batch_and_reloaded_after_a_restart() -> None:
    tokens = SeenTokens(1000)
    tokens.cache.add("j1", NOW + 60, NOW)
    tokens.cache.add("j2", NOW + 30, NOW)
    records = tokens.changelog(41, NOW)
    key = SEEN_KEY_PREFIX + (41).to_bytes(8, "big") + (0).to_bytes(4, "big")
    assert records == [(key, orjson.dumps([["j1", NOW + 60], ["j2", NOW + 30]]))]
    tokens.committed()
    restarted = SeenTokens(1000)
    restarted.load(records, NOW + 10)  # what a restored store holds
    with pytest.raises(AuthError, match="already used"):
        restarted.cache.add("j1", NOW + 60, NOW + 10)


def test_an_aborted_batch_writes_nothing_that_counts() -> None:
    tokens = SeenTokens(1000)
    tokens.cache.add("j1", NOW + 60, NOW)
    assert tokens.changelog(5, NOW)
    tokens.aborted()
    tokens.cache.add("j1", NOW + 60, NOW)  # the batch is read again
    assert tokens.changelog(5, NOW)[0][0].startswith(SEEN_KEY_PREFIX + (5).to_bytes(8, "big"))


def test_a_large_batch_is_written_in_records_of_bounded_size() -> None:
    tokens = SeenTokens(100_000)
    for i in range(2 * SEEN_PER_RECORD + 1):
        tokens.cache.add(f"j{i}", NOW + 60, NOW)
    records = tokens.changelog(7, NOW)
    assert [len(orjson.loads(v)) for _, v in records] == [SEEN_PER_RECORD, SEEN_PER_RECORD, 1]
    assert len({k for k, _ in records}) == 3 and all(len(v) < 500_000 for _, v in records)
    tokens.committed()
    restarted = SeenTokens(100_000)
    restarted.load(records, NOW)
    assert len(restarted.cache) == 2 * SEEN_PER_RECORD + 1


def test_records_whose_tokens_all_expired_are_tombstoned_once_committed() -> None:
    tokens = SeenTokens(1000)
    tokens.cache.add("j1", NOW + 60, NOW)
    key = tokens.changelog(1, NOW)[0][0]
    tokens.committed()
    assert tokens.changelog(2, NOW + 59) == []
    assert tokens.changelog(2, NOW + 60) == [(key, None)]
    tokens.aborted()  # the tombstone was not written: it is due again
    assert tokens.changelog(3, NOW + 61) == [(key, None)]
    tokens.committed()
    assert tokens.changelog(4, NOW + 62) == []


# --------------------------------------------------------------------------- the command signer


def test_the_signer_verifies_the_principal_token_once_and_never_outlives_it() -> None:
    tok = issue("alice", "acme", ["starter"], 100, KEYS, now=NOW)
    signer = CommandSigner(tok, KEYS, ttl_s=600)
    name, header = signer.header(b"order-1", b"value", now=NOW + 10)
    claims = json.loads(base64.urlsafe_b64decode(header.split(b".")[1] + b"=="))
    assert name == "kflow.auth" and claims["sub"] == "alice" and claims["exp"] == NOW + 100
    assert signer.principal(NOW) == Principal("alice", "acme", frozenset({"starter"}))
    with pytest.raises(AuthError, match="KFLOW_TOKEN .* expired"):
        signer.header(b"order-1", b"value", now=NOW + 100)


def test_the_signer_refuses_a_token_of_other_keys() -> None:
    tok = issue("alice", "acme", [], 100, Keys(secret=b"x" * 32), now=NOW)
    with pytest.raises(AuthError, match="not signed by a configured key"):
        CommandSigner(tok, KEYS, 600).header(b"k", b"v", now=NOW)


# --------------------------------------------------------------------------- the task on the wire


def test_the_attempt_token_round_trips_on_the_task() -> None:
    t = Task("order-1", "a1", 2, "charge", "payments", {"n": 1}, "order", 5, attempt_token="tok")
    assert decode_task(encode_task(t)).attempt_token == "tok"


def test_a_task_written_with_the_previous_schema_still_decodes() -> None:
    """Workers upgraded before the engines (or tasks still in the topic) keep working: the field
    is appended with a default, and the previous schema's fingerprint is still recognised."""
    raw = json.loads((Path(kflow.schemas.__file__).parent / "task.avsc").read_text())
    names = [f["name"] for f in raw["fields"]]
    previous = {**raw, "fields": raw["fields"][:names.index("attempt_token")]}  # before it (and what came after)
    parsed = fastavro.parse_schema(previous)
    buf = BytesIO()
    buf.write(MAGIC + bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")))
    fastavro.schemaless_writer(buf, parsed, {"instance_id": "order-1", "activity_id": "a1", "attempt": 1,
                                             "name": "charge", "queue": "q", "input": "[1]", "workflow": "order",
                                             "scheduled_ms": 5, "kind": "run", "report_start": True})
    t = decode_task(buf.getvalue())
    assert (t.input, t.report_start, t.attempt_token) == ([1], True, None)


# --------------------------------------------------------------------------- the engine's start-up


def test_an_engine_without_auth_outside_dev_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kflow.config import EngineConfig
    from kflow.streams.processor import EngineProcessor

    proc = EngineProcessor(EngineConfig(state_dir=str(tmp_path), auth=False, dev_tuning=False))
    with caplog.at_level("WARNING", logger="kflow.engine"):
        proc._setup_auth()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("auth is off: anyone who can write to kflow.commands")
    caplog.clear()
    quiet = EngineProcessor(EngineConfig(state_dir=str(tmp_path), auth=False, dev_tuning=True))
    with caplog.at_level("WARNING", logger="kflow.engine"):
        quiet._setup_auth()
    assert not caplog.records and quiet.guard is None


def test_an_engine_with_auth_on_needs_its_secret_before_it_connects(tmp_path: Path) -> None:
    from kflow.config import EngineConfig
    from kflow.streams.processor import EngineProcessor

    proc = EngineProcessor(EngineConfig(state_dir=str(tmp_path), auth=True, bootstrap="127.0.0.1:1"))
    with pytest.raises(KeyConfigError, match="KFLOW_JWT_SECRET"):
        proc._setup_auth()


# --------------------------------------------------------------------------- the CLI, before it reaches Kafka


def test_policy_apply_refuses_an_invalid_file_before_producing_anything(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kflow._cli.security import audit_app, policy_app

    bad = tmp_path / "policy.yaml"
    bad.write_text("roles:\n  ops: [instance:Fly]\nbindings:\n  acme: {bob: [nobody]}\n")
    result = CliRunner().invoke(policy_app, ["apply", str(bad), "--bootstrap", "127.0.0.1:1"])
    assert result.exit_code == 1
    assert "unknown verb or operation 'Fly'" in result.stderr and "unknown role 'nobody'" in result.stderr
    wrong = CliRunner().invoke(audit_app, ["list", "--outcome", "maybe", "--bootstrap", "127.0.0.1:1"],
                               env={"COLUMNS": "250"})
    assert wrong.exit_code == 2 and "Invalid value for '--outcome'" in wrong.stderr
    assert "'maybe' is not one of" in wrong.stderr


def test_a_new_policy_voids_the_verdicts_the_guard_kept() -> None:
    """The guard keeps verdicts per policy: a grant or a revocation counts from the next command."""
    in_force = [parse_policy({"roles": {}, "bindings": {}})]
    g = CommandGuard(KEYS, lambda: in_force[0], engine_ttl_s=7 * 86400)
    who = {"sub": "alice", "tenant": "acme"}
    st = state(owner="dora")
    assert check(signal(), st, who, g=g).code == RejectCode.FORBIDDEN
    assert check(signal(), st, who, g=g).code == RejectCode.FORBIDDEN  # the kept verdict
    in_force[0] = POLICY  # alice becomes a starter: instance:Execute
    assert check(signal(), st, who, g=g).allowed
    in_force[0] = parse_policy({"roles": {}, "bindings": {}})
    assert check(signal(), st, who, g=g).code == RejectCode.FORBIDDEN


def test_kept_verdicts_are_per_principal_and_resource() -> None:
    g = guard()
    assert check(signal(), state(owner="dora"), {"sub": "alice", "tenant": "acme"}, g=g).allowed
    assert check(signal(), state(owner="dora"), {"sub": "bob", "tenant": "acme"}, g=g).code == RejectCode.FORBIDDEN
    assert check(signal(), state(owner="dora", tenant="globex"), {"sub": "alice", "tenant": "acme"},
                 g=g).code == RejectCode.FORBIDDEN
    assert check(Command("CancelWorkflow", "order-1", {"reason": ""}), state(owner="dora"),
                 {"sub": "alice", "tenant": "acme"}, g=g).code == RejectCode.FORBIDDEN
