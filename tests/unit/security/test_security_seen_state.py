"""Replay protection kept in the instance's state, and the audit record built without its model.

A command token binds its record's key, so it can only be replayed on its own instance: when the
command's decision writes that instance's state, the guard keeps the token's id in the state
(:data:`SEEN_STATE_KEY`), which the transaction writes anyway; otherwise, or when the instance
already holds :data:`SEEN_PER_STATE` live ids, in the partition's :class:`ReplayCache` (written as
seen-token records). A check refuses an id found in either. The engine carries the ids over when a
run starts afresh under the same id. The engine's audit value is the bytes the model's encoder makes.
"""

from __future__ import annotations

from typing import Any

import pytest

import kflow
from kflow.engine import InMemoryDefinitions, compile_spec, decide
from kflow.engine.core import SEEN_TOKENS
from kflow.model.messages import Command, RejectCode, Status
from kflow.security import decode_audit, encode_audit, parse_policy
from kflow.security.audit import encode_audit_fields
from kflow.security.guard import SEEN_PER_STATE, SEEN_STATE_KEY, CommandGuard
from kflow.security.tokens import Keys, ReplayCache, sign_command

SECRET = b"s" * 32
KEYS = Keys(secret=SECRET)
NOW = 1_700_000_000.0
POLICY = parse_policy({"roles": {"starter": ["definition:Execute", "instance:Execute"]},
                       "bindings": {"acme": {"alice": ["starter"]}}})


def guard() -> CommandGuard:
    return CommandGuard(KEYS, lambda: POLICY, engine_ttl_s=7 * 86400)


def state(**extra: Any) -> dict[str, Any]:
    return {"id": "order-1", "workflow": "order", "version": 1, "status": "RUNNING", "seq": 3, "updated_ms": 0,
            "owner": "alice", "tenant": "acme", **extra}


def signal(command_id: str = "c1") -> Command:
    return Command("SignalWorkflow", "order-1", {"name": "go", "data": 1}, command_id, 0)


def token(value: bytes = b"value", ttl: float = 60, now: float = NOW) -> bytes:
    return sign_command(b"order-1", value, {"sub": "alice", "tenant": "acme"}, KEYS, ttl, now=now).encode()


def deferred(g: CommandGuard, st: dict[str, Any] | None, tok: bytes, seen: ReplayCache, *, value: bytes = b"value",
             now: float = NOW):
    return g.check(signal(), st, tok, None, b"order-1", value, now, seen, defer=True)


def test_a_deferred_check_carries_the_token_id_and_remembers_nothing_itself() -> None:
    g, seen = guard(), ReplayCache()
    got = deferred(g, state(), token(), seen)
    assert got.allowed and got.jti and got.exp == int(NOW) + 60
    assert len(seen) == 0 and seen.pending() == []


def test_an_id_kept_in_the_state_refuses_the_replay_even_with_an_empty_cache() -> None:
    """The state is what a restarted or rebalanced engine restores: no partition record is needed."""
    g, seen, tok = guard(), ReplayCache(), token()
    first = deferred(g, state(), tok, seen)
    after = state()
    g.remember(first, after, seen, NOW)
    assert after[SEEN_STATE_KEY] == {first.jti: first.exp}
    assert seen.pending() == [] and len(seen) == 0  # no seen-token record for it
    again = deferred(g, after, tok, ReplayCache(), now=NOW + 1)
    assert again.code == RejectCode.UNAUTHENTICATED and "already used" in again.reason
    # a check without defer (the old way) refuses it as well
    plain = g.check(signal(), after, tok, None, b"order-1", b"value", NOW + 1, ReplayCache())
    assert plain.code == RejectCode.UNAUTHENTICATED and "already used" in plain.reason


def test_without_a_state_write_the_id_goes_to_the_partitions_records() -> None:
    g, seen, tok = guard(), ReplayCache(), token()
    first = deferred(g, state(), tok, seen)
    g.remember(first, None, seen, NOW)
    assert [j for j, _ in seen.pending()] == [first.jti]
    again = deferred(g, state(), tok, seen, now=NOW + 1)
    assert again.code == RejectCode.UNAUTHENTICATED and "already used" in again.reason


def test_remembering_does_not_change_the_state_before_the_decision() -> None:
    g, seen = guard(), ReplayCache()
    held = {"old": NOW + 30}
    before = state(**{SEEN_STATE_KEY: held})
    after = dict(before)  # a decision's new state shares the old one's values
    g.remember(deferred(g, before, token(), seen), after, seen, NOW)
    assert held == {"old": NOW + 30} and before[SEEN_STATE_KEY] is held
    assert len(after[SEEN_STATE_KEY]) == 2


def test_expired_ids_are_pruned_and_a_full_state_sends_ids_to_the_partition() -> None:
    g, seen = guard(), ReplayCache()
    live = {f"live-{i}": NOW + 100 for i in range(SEEN_PER_STATE - 1)}
    st = state(**{SEEN_STATE_KEY: {**live, "gone": NOW - 1}})
    one, two = token(b"one"), token(b"two")
    first = deferred(g, st, one, seen, value=b"one")
    g.remember(first, st, seen, NOW)
    assert st[SEEN_STATE_KEY] == {**live, first.jti: first.exp}  # "gone" pruned, the new id kept
    assert seen.pending() == []
    second = deferred(g, st, two, seen, value=b"two")
    g.remember(second, st, seen, NOW)
    assert len(st[SEEN_STATE_KEY]) == SEEN_PER_STATE and second.jti not in st[SEEN_STATE_KEY]
    assert [j for j, _ in seen.pending()] == [second.jti]
    for tok, value in ((one, b"one"), (two, b"two")):  # each refused, from where it is kept
        again = deferred(g, st, tok, seen, value=value, now=NOW + 1)
        assert again.code == RejectCode.UNAUTHENTICATED and "already used" in again.reason


@pytest.mark.parametrize("where", ["state", "cache"])
def test_a_replayed_record_is_refused_wherever_its_id_is_kept(where: str) -> None:
    g, seen, tok = guard(), ReplayCache(), token()
    first = deferred(g, state(), tok, seen)
    after = state()
    g.remember(first, after if where == "state" else None, seen, NOW)
    seen.commit()
    got = deferred(g, after, tok, seen, now=NOW + 2)
    assert got.code == RejectCode.UNAUTHENTICATED and "already used" in got.reason


def test_the_engines_state_key_is_the_guards() -> None:
    assert SEEN_TOKENS == SEEN_STATE_KEY


# --------------------------------------------------------------------------- the engine keeps them


TASK_WF = {"name": "orders", "version": 1, "steps": [{"id": "charge", "task": "charge", "output": "r"},
                                                     {"id": "done", "succeed": "r"}]}


@kflow.workflow(name="seen.rounds", version=1)
async def rounds(ctx, n):  # type: ignore[no-untyped-def]
    await ctx.wait_signal("next")
    if n < 3:
        ctx.continue_as_new(n + 1)
    return n


def defs() -> InMemoryDefinitions:
    d = InMemoryDefinitions()
    d.add(compile_spec(TASK_WF))
    d.add(kflow.authoring.definition_of(rounds))
    return d


def start(workflow: str = "orders", **extra: Any) -> Command:
    data = {"workflow": workflow, "version": None, "input": 1, "parent_id": None, "parent_ref": None,
            "id_reuse": None, **extra}
    return Command("StartWorkflow", "i1", data, command_id="start-i1")


def test_the_ids_survive_later_decisions_and_an_id_reused_after_close() -> None:
    st = decide(None, start(), 1000, defs()).state
    assert st is not None
    st[SEEN_TOKENS] = {"j1": NOW + 60}  # as the processor's guard remembers the start's token
    aid = next(iter(st["activities"]))
    done = decide(st, Command("CompleteActivity", "i1", {"activity_id": aid, "attempt": 1, "result": 1}),
                  1001, defs()).state
    assert done is not None and done["status"] == Status.COMPLETED and done[SEEN_TOKENS] == {"j1": NOW + 60}
    again = decide(done, start(id_reuse="allow_if_closed"), 1002, defs()).state
    assert again is not None and again["status"] == Status.RUNNING and again[SEEN_TOKENS] == {"j1": NOW + 60}


def test_the_ids_survive_continue_as_new() -> None:
    st = decide(None, start("seen.rounds"), 1000, defs()).state
    assert st is not None
    st[SEEN_TOKENS] = {"j1": NOW + 60}
    nxt = decide(st, Command("SignalWorkflow", "i1", {"name": "next", "data": None}, command_id="s1"),
                 1001, defs()).state
    assert nxt is not None and nxt["run"] == 2 and nxt[SEEN_TOKENS] == {"j1": NOW + 60}


# --------------------------------------------------------------------------- the audit value


@pytest.mark.parametrize("who", [{"sub": "alice", "tenant": "acme"}, {"sub": "mallory", "tenant": "globex"}, None])
def test_the_engines_audit_value_is_the_models_encoding(who: dict[str, Any] | None) -> None:
    g = guard()
    tok = sign_command(b"order-1", b"value", who, KEYS, 60, now=NOW).encode() if who else None
    got = g.check(signal(), state(), tok, None, b"order-1", b"value", NOW, ReplayCache())
    outcome = "success" if got.allowed else "denied"
    details = {"result": "rejected", "why": "expected ..., but ..."} if got.allowed else None
    value = g.audit_value(got, signal(), outcome, 1234, "kflow.commands[1]@7", details)
    record = g.audit(got, signal(), outcome, 1234, "kflow.commands[1]@7", details)
    assert value == encode_audit(record)
    assert decode_audit(value) == record


def test_an_audit_value_with_details_that_are_not_json_is_refused() -> None:
    fields = {"id": "x", "time": 1, "principal": "", "tenant": "t", "action": "a", "resource_type": "system",
              "resource_id": "r", "outcome": "granted", "details": {"bad": object()}, "source": ""}
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        encode_audit_fields(fields)
    with pytest.raises(ValueError):
        encode_audit_fields({**fields, "details": {}, "outcome": "maybe"})
