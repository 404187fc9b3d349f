"""Every topic's value schema of this release is BACKWARD compatible with the previous release's
(tests/data/schemas/previous/, the ``.avsc`` files of the last release): the new schema reads what
the old one wrote. Checked twice: with Avro's reference compatibility checker (what a registry
under BACKWARD does), and by writing generated records with the old schema and reading them with
the new one through fastavro's schema resolution and kflow's own decoders."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.utils import generate_many

from kflow.model.errors import DecodeError
from kflow.schemas import codec
from kflow.schemas.codec import decode_command, decode_definition, decode_event, decode_state, decode_task
from kflow.schemas.registry import incompatibility, previous_schemas

PREVIOUS = Path(__file__).parents[2] / "data" / "schemas" / "previous"
DECODERS = {"command": decode_command, "event": decode_event, "state": decode_state, "task": decode_task,
            "definition": decode_definition, "audit": codec.decode_audit_record}
#: Message kinds this release adds (no previous schema to be compatible with).
NEW_KINDS = {"engine_state"}
OLD_KINDS = tuple(k for k in codec.KINDS if k not in NEW_KINDS)


def previous(kind: str) -> str:
    return (PREVIOUS / f"{kind}.avsc").read_text(encoding="utf-8")


def test_the_fixtures_cover_every_message_kind() -> None:
    assert sorted(p.stem for p in PREVIOUS.glob("*.avsc")) == sorted(OLD_KINDS) == sorted(DECODERS)


def test_kflow_ships_the_previous_release_schemas_it_checks_against() -> None:
    """``kflow schemas check`` compares with the copies in the package: they are these fixtures."""
    assert previous_schemas() == {kind: previous(kind) for kind in OLD_KINDS}


def test_a_previous_release_state_record_decodes_without_its_engine_internals() -> None:
    """A format-1 state record (the engine's state inside, as ``internal``) reads with the current
    schema: its public fields as written, ``format_version`` 1, the new fields None, no ``internal``."""
    raw = json.loads(previous("state"))
    old = fastavro.parse_schema(raw)
    record = {"instance_id": "o-1", "workflow": "order", "version": 2, "status": "COMPLETED", "seq": 7,
              "started_ms": 1, "updated_ms": 5, "closed_ms": 5, "result": '{"ok": true}', "error_type": None,
              "error_message": None, "internal": '{"threads": {}, "vars": {"secret": 1}}'}
    out = BytesIO()
    fastavro.schemaless_writer(out, old, record)
    decoded = decode_state(codec.MAGIC + codec._fingerprint(raw) + out.getvalue())
    assert "internal" not in decoded and decoded["format_version"] == 1
    assert {k: decoded[k] for k in record if k not in ("internal", "result")} == \
        {k: v for k, v in record.items() if k not in ("internal", "result")}
    assert decoded["result"] == {"ok": True}
    assert all(decoded[k] is None for k in ("kind", "tenant", "owner", "parent_id", "run", "priority",
                                            "search_attributes", "incidents", "position"))


@pytest.mark.parametrize("kind", OLD_KINDS)
def test_current_schema_is_backward_compatible_with_the_previous_release(kind: str) -> None:
    assert incompatibility(codec.schema_text(kind), previous(kind)) is None


@pytest.mark.parametrize("kind", OLD_KINDS)
def test_previous_release_records_read_with_the_current_schema(kind: str) -> None:
    old = fastavro.parse_schema(json.loads(previous(kind)))
    new = fastavro.parse_schema(json.loads(codec.schema_text(kind)))
    for record in generate_many(old, 200):
        out = BytesIO()
        fastavro.schemaless_writer(out, old, record)
        out.seek(0)
        read = fastavro.schemaless_reader(out, old, new)
        assert out.tell() == len(out.getvalue())
        assert _common(read, record) == _common(record, read)


def _common(a: Any, b: Any) -> Any:
    """``a`` restricted to the fields ``b`` has too (fields added with defaults are not compared)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _common(v, b[k]) for k, v in a.items() if k in b}
    if isinstance(a, tuple) and isinstance(b, tuple):
        return (a[0], _common(a[1], b[1]))
    return a


@pytest.mark.parametrize("kind", OLD_KINDS)
def test_kflow_decodes_single_object_values_of_the_previous_release(kind: str) -> None:
    """kflow's reader recognises the previous release's fingerprint: a structurally valid old record
    either decodes or is refused for its content (e.g. a payload that is not JSON), never for its schema."""
    raw = json.loads(previous(kind))
    old = fastavro.parse_schema(raw)
    header = codec.MAGIC + codec._fingerprint(raw)
    for record in generate_many(old, 50):
        out = BytesIO()
        fastavro.schemaless_writer(out, old, record)
        try:
            DECODERS[kind](header + out.getvalue())
        except DecodeError as exc:
            assert "fingerprint" not in exc.reason and "wrong schema" not in exc.reason, exc.reason


def test_an_incompatible_change_is_detected() -> None:
    """The check itself fails when a field kflow's schema requires is missing from the old one."""
    new = json.loads(codec.schema_text("state"))
    new["fields"].append({"name": "region", "type": "string"})
    reason = incompatibility(json.dumps(new), previous("state"))
    assert reason is not None and "reader_field_missing_default_value" in reason and "region" in reason
