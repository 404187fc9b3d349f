"""The audit record: its Avro schema, single-object framing and round trip."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

import kflow
from kflow.model.errors import DecodeError
from kflow.model.messages import Task
from kflow.schemas.codec import MAGIC, encode_task
from kflow.security.audit import AuditRecord, decode_audit, encode_audit
from tests.avro_reference import crc64_avro

SCHEMA_FILE = Path(kflow.__file__).parent / "schemas" / "audit.avsc"
ISSUE_FIELDS = ["id", "time", "principal", "tenant", "action", "resource_type", "resource_id", "outcome", "details",
                "source"]


def record(**over: object) -> AuditRecord:
    fields = {"id": "cmd-1/auth", "time": 1_700_000_000_000, "principal": "alice", "tenant": "acme",
              "action": "cancel", "resource_type": "instance", "resource_id": "order-42", "outcome": "denied",
              "details": {"reason": "expected instance:Manage", "command_id": "cmd-1"}, "source": "kflow-cli"}
    return AuditRecord(**{**fields, **over})


def test_schema_has_the_issue_s_fields_in_order() -> None:
    raw = json.loads(SCHEMA_FILE.read_text())
    assert [f["name"] for f in raw["fields"]] == ISSUE_FIELDS
    outcome = next(f for f in raw["fields"] if f["name"] == "outcome")
    assert outcome["type"]["symbols"] == ["granted", "denied", "success"]


def test_audit_values_use_single_object_encoding_readable_with_only_the_avsc() -> None:
    value = encode_audit(record())
    schema = fastavro.parse_schema(json.loads(SCHEMA_FILE.read_text()))
    canonical = to_parsing_canonical_form(schema).encode()
    assert value[:2] == MAGIC
    assert value[2:10] == crc64_avro(canonical).to_bytes(8, "little", signed=True)
    plain = fastavro.schemaless_reader(BytesIO(value[10:]), schema, None, True)
    assert plain["outcome"] == "denied" and json.loads(plain["details"])["command_id"] == "cmd-1"


@given(st.builds(record, principal=st.text(), tenant=st.text(), resource_id=st.text(),
                 outcome=st.sampled_from(["granted", "denied", "success"]), time=st.integers(-(2**63), 2**63 - 1),
                 details=st.dictionaries(st.text(), st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                                         | st.text() | st.lists(st.text(), max_size=3), max_size=4)))
def test_audit_records_round_trip(rec: AuditRecord) -> None:
    assert decode_audit(encode_audit(rec)) == rec


@pytest.mark.parametrize("value,reason", [
    (b"", "empty audit value"),
    (b"\xc3\x01\x00\x00", "truncated single-object header for audit"),
    (None, "empty audit value"),
])
def test_values_that_are_not_audit_records_are_refused(value: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_audit(value)


def test_another_kind_of_kflow_value_is_refused() -> None:
    task = Task("i", "a", 1, "charge", "q", {}, "order", 0)
    with pytest.raises(DecodeError, match="expected audit, got a task value"):
        decode_audit(encode_task(task))


def test_truncated_and_padded_values_are_refused() -> None:
    value = encode_audit(record())
    with pytest.raises(DecodeError, match="truncated|garbled"):
        decode_audit(value[:-5])
    with pytest.raises(DecodeError, match="trailing"):
        decode_audit(value + b"\x00")


def test_the_model_refuses_unknown_outcomes_and_fields() -> None:
    with pytest.raises(ValidationError):
        record(outcome="maybe")
    with pytest.raises(ValidationError):
        record(ip="10.0.0.1")
    with pytest.raises(ValidationError):
        record(id="")
