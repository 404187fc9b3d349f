"""Webhook subscriptions without a broker: the file's validation, the wire form, signatures, filters and
the offset bookkeeping that makes delivery at least once."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from kflow._cli.subscriptions import app
from kflow.subscriptions import (
    PUBLIC_FIELDS,
    DeliveryLog,
    StateChange,
    Subscription,
    SubscriptionConfigError,
    _Partition,
    parse_subscriptions,
    sign,
    verify_signature,
)

ENV = {"HOOK_SECRET": "s3cret"}

VALID = """
subscriptions:
  - id: orders-done
    url: https://hooks.example.com/kflow
    secret_env: HOOK_SECRET
    filter: {workflows: [order], statuses: [COMPLETED, FAILED], tenant: acme}
    max_attempts: 7
    backoff: {initial: 250ms, max: 1m, multiplier: 3}
    timeout: 5s
  - id: everything
    url: http://127.0.0.1:9000/hook
    secret_env: HOOK_SECRET
"""


def _state(**over):
    rec = {"instance_id": "o-1", "workflow": "order", "version": 2, "status": "COMPLETED", "seq": 7,
           "started_ms": 1000, "updated_ms": 2000, "closed_ms": 2000, "result": {"total": 3},
           "error_type": None, "error_message": None, "search_attributes": {"tenant": "acme"}}
    rec.update(over)
    return rec


def test_a_valid_file_loads_with_its_durations_and_defaults():
    done, every = parse_subscriptions(VALID, ENV)
    assert done.url == "https://hooks.example.com/kflow" and done.max_attempts == 7
    assert done.filter.workflows == ("order",) and done.filter.statuses == ("COMPLETED", "FAILED")
    assert done.filter.tenant == "acme"
    assert done.backoff.initial == timedelta(milliseconds=250) and done.backoff.max == timedelta(minutes=1)
    assert done.timeout == timedelta(seconds=5)
    assert every.filter.workflows == () and every.max_attempts == 5 and every.timeout == timedelta(seconds=10)


def test_an_invalid_file_lists_every_problem_at_once():
    text = """
subscriptions:
  - id: bad
    url: ftp://files.example.com/drop
    secret_env: NOT_SET_ANYWHERE
    filter: {statuses: [COMPLETED, DONE]}
    max_attempts: 0
  - id: inline
    url: https://ok.example.com
    secret: hunter2
    secret_env: HOOK_SECRET
  - id: inline
    url: https://ok.example.com
    secret_env: HOOK_SECRET
"""
    with pytest.raises(SubscriptionConfigError) as caught:
        parse_subscriptions(text, ENV)
    problems = caught.value.problems
    expected = ["subscription 'bad': url: expected an http:// or https:// URL, but got 'ftp://files.example.com/drop'",
                "subscription 'bad': filter.statuses.1: unknown status 'DONE'",
                "subscription 'bad': secret_env: environment variable NOT_SET_ANYWHERE is not set",
                "subscription 'bad': max_attempts: Input should be greater than or equal to 1 (got 0)",
                "subscription 'inline': secret: a secret is never written in the file",
                "subscription 'inline': declared 2 times"]
    for text_ in expected:
        assert any(p.startswith(text_) for p in problems), (text_, problems)
    assert len(problems) == len(expected), problems
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("text, problem", [
    ("subscriptions: []", "declares no subscriptions"),
    ("hooks: []", "one key, 'subscriptions'"),
    ("subscriptions: [", "not valid YAML"),
    ("subscriptions: [{id: x, url: 'https://a', secret_env: HOOK_SECRET, backoff: {initial: soon}}]",
     "backoff.initial: expected a duration like '2s'"),
])
def test_malformed_files_are_refused_with_the_reason(text, problem):
    with pytest.raises(SubscriptionConfigError, match=problem):
        parse_subscriptions(text, ENV)


def test_the_wire_form_round_trips_and_names_the_secret_variable_only():
    sub = parse_subscriptions(VALID, ENV)[0]
    wire = sub.model_dump_json()
    assert Subscription.model_validate_json(wire) == sub
    doc = json.loads(wire)
    assert doc["secret_env"] == "HOOK_SECRET" and "s3cret" not in wire
    assert doc["backoff"]["initial"] == "250ms" and doc["timeout"] == "5000ms"


def test_the_signature_is_the_hex_hmac_sha256_of_the_body():
    body = b"The quick brown fox jumps over the lazy dog"
    # the published HMAC-SHA256 test value for this key and message
    assert sign(body, "key") == "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    assert verify_signature(body, "key", sign(body, "key"))
    assert not verify_signature(body + b".", "key", sign(body, "key"))
    assert not verify_signature(body, "other", sign(body, "key"))


def test_the_body_is_the_public_state_change():
    change = StateChange.from_state(_state(status="FAILED", result=None, error_type="CardDeclined",
                                           error_message="card declined"))
    body = json.loads(change.body())
    assert tuple(body) == PUBLIC_FIELDS
    assert body == {"instance_id": "o-1", "workflow": "order", "version": 2, "status": "FAILED", "seq": 7,
                    "result": None, "error": {"type": "CardDeclined", "message": "card declined"}, "updated_ms": 2000}
    assert json.loads(StateChange.from_state(_state()).body())["error"] is None
    expected = "sha256=" + hmac.new(b"s3cret", change.body(), hashlib.sha256).hexdigest()
    assert sign(change.body(), "s3cret") == expected


def test_filters_match_workflow_status_and_tenant():
    done = parse_subscriptions(VALID, ENV)[0]
    assert done.matches(StateChange.from_state(_state()))
    assert not done.matches(StateChange.from_state(_state(status="RUNNING")))
    assert not done.matches(StateChange.from_state(_state(workflow="refund")))
    assert not done.matches(StateChange.from_state(_state(search_attributes={"tenant": "globex"})))
    assert not done.matches(StateChange.from_state(_state(search_attributes=None)))
    assert done.matches(StateChange.from_state(_state(search_attributes=None, tenant="acme")))


def test_a_delivery_id_is_stable_per_change_and_subscription():
    change = StateChange.from_state(_state())
    assert change.delivery_id("a") == StateChange.from_state(_state()).delivery_id("a")
    others = {change.delivery_id("b"), StateChange.from_state(_state(seq=8)).delivery_id("a"),
              StateChange.from_state(_state(started_ms=5000)).delivery_id("a")}  # a new run of a reused id
    assert change.delivery_id("a") not in others and len(others) == 3


def test_backoff_grows_exponentially_up_to_its_bound():
    backoff = parse_subscriptions(VALID, ENV)[0].backoff
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 5, 6)] == [0.25, 0.75, 2.25, 6.75, 20.25, 60.0]
    assert backoff.delay(100) == 60.0


def test_the_committable_offset_never_passes_an_unfinished_record():
    part = _Partition(0, start=10)
    part.add(10, 2)  # two lanes
    part.add(11, 0)  # matched nothing
    part.add(12, 1)
    assert part.done == 10
    part.finish(12)  # a later record finishing first does not move the offset
    assert part.done == 10
    part.finish(10)
    assert part.done == 10  # one lane still has offset 10
    part.finish(10)
    assert part.done == 13
    part.add(13, 0)
    assert part.done == 14


def test_the_delivery_log_keeps_the_last_deliveries_newest_first():
    entries = DeliveryLog(size=3)
    for i in range(5):
        entries.add("a", {"seq": i})
    assert [e["seq"] for e in entries.entries("a")] == [4, 3, 2]
    assert entries.entries("unknown") == []


def test_apply_refuses_an_invalid_file_before_contacting_kafka(tmp_path):
    path = tmp_path / "subs.yaml"
    path.write_text("subscriptions:\n  - {id: x, url: 'mailto:ops@example.com', secret_env: UNSET_SECRET_VAR}\n")
    result = CliRunner().invoke(app, ["apply", str(path), "--bootstrap", "127.0.0.1:1"], env={"UNSET_SECRET_VAR": ""})
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid subscriptions file: "), result.output
    assert "url: expected an http:// or https:// URL" in lines[0] and "UNSET_SECRET_VAR is not set" in lines[0]
