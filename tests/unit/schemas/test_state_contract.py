"""The public ``state`` record is a documented contract: the schema carries no engine internals,
every field of state.avsc is in the table of docs/state-contract.md and the README's (and nothing else is), and
what the engine writes there is exactly those fields, derived from its state."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kflow.engine.core import public_state, status_record
from kflow.schemas import codec
from kflow.schemas.codec import decode_engine_state, decode_state, encode_engine_state, encode_state

DOC = Path(__file__).parents[3] / "docs" / "state-contract.md"


def schema_fields() -> list[str]:
    return [f["name"] for f in json.loads(codec.schema_text("state"))["fields"]]


def documented_fields() -> list[str]:
    """The first column of the field table under '## Fields'."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Fields", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)


def test_the_public_record_has_no_engine_internals() -> None:
    assert "internal" not in schema_fields()
    assert codec.STATE_FIELDS == tuple(schema_fields())


README = DOC.parent.parent / "README.md"


def readme_fields() -> list[str]:
    """The first column of the README's table under '### The public state record'."""
    section = README.read_text(encoding="utf-8").split("### The public state record", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)


def test_every_schema_field_is_documented_in_order_and_nothing_else() -> None:
    assert documented_fields() == schema_fields()
    assert readme_fields() == schema_fields()  # the README's short table too


def test_every_added_field_has_a_default_so_older_records_still_read() -> None:
    first = {"instance_id", "workflow", "version", "status", "seq", "started_ms", "updated_ms"}
    for f in json.loads(codec.schema_text("state"))["fields"]:
        assert f["name"] in first or "default" in f, f"state field {f['name']} needs a default"


def engine_state() -> dict:
    """An instance state as the engine keeps it: bookkeeping next to the public fields."""
    return {"id": "o-1", "workflow": "order", "version": 2, "kind": "spec", "status": "INCIDENT", "seq": 9,
            "started_ms": 10, "updated_ms": 20, "closed_ms": None, "input": {"card": "4111"},
            "vars": {"secret": "s3"}, "result": None, "error": {"type": "Declined", "message": "card declined"},
            "parent_id": "p-1", "parent_ref": "charge", "tenant": "acme", "owner": "alice", "priority": 2,
            "search": {"customer": "c-9"}, "events_offset": 17,
            "threads": {"t0": {"list": "", "idx": 1, "vars": {}}},
            "activities": {"a1": {"step": "ship", "name": "ship", "attempt": 1}},
            "timers": {"tm": {"due_ms": 99}}, "children": {},
            "incidents": {"inc-1": {"thread": "t0", "step": "charge", "activity": "a0", "name": "charge",
                                    "queue": "payments", "input": {"card": "4111"}, "priority": None, "attempts": 3,
                                    "error": {"type": "Declined", "message": "card declined"}, "role": "ops",
                                    "instructions": "call", "timeout": None, "timer": None, "raised_ms": 15}}}


def test_the_engine_writes_the_documented_fields_and_keeps_its_bookkeeping_to_itself() -> None:
    st = engine_state()
    rec = public_state(st)
    assert list(rec) == schema_fields()
    decoded = decode_state(encode_state(rec))
    assert decoded == rec
    assert (decoded["tenant"], decoded["owner"], decoded["parent_id"], decoded["kind"]) == ("acme", "alice", "p-1", "spec")
    assert (decoded["run"], decoded["priority"], decoded["format_version"]) == (1, 2, codec.STATE_FORMAT)
    assert decoded["search_attributes"] == {"customer": "c-9"}
    assert decoded["position"] == ["p::1", "s:ship"]
    assert decoded["incidents"] == {"inc-1": {"step": "charge", "activity": "a0", "name": "charge", "queue": "payments",
                                              "error": {"type": "Declined", "message": "card declined"},
                                              "role": "ops", "instructions": "call", "attempts": 3,
                                              "raised_ms": 15, "timeout": None}}
    text = encode_state(rec)
    for private in (b"4111", b"s3", b"due_ms", b"events_offset"):  # input, variables, timers, offsets
        assert private not in text
    assert decode_engine_state(encode_engine_state("o-1", st)) == ("o-1", st)


def test_the_status_answer_is_the_public_record_with_the_engine_state_beside_it() -> None:
    st = engine_state()
    answer = status_record(st)
    assert answer["internal"] is st and answer["events_offset"] == 17
    assert {k: v for k, v in answer.items() if k not in ("internal", "events_offset")} == public_state(st)


def test_a_search_attribute_names_the_tenant_when_none_was_stamped() -> None:
    st = {**engine_state(), "tenant": None, "search": {"tenant": "globex"}}
    assert public_state(st)["tenant"] == "globex"
