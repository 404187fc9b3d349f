"""The compiled Avro codec writes exactly fastavro's bytes and reads back exactly what fastavro reads.

fastavro is the reference: for every schema in kflow/schemas (and every record of the command and
event ``body`` unions) random valid records must encode to the bytes ``schemaless_writer`` produces
and decode, from those bytes, to what ``schemaless_reader`` returns with ``return_record_name``.
The strategies are derived from the parsed schemas themselves, so a field added to an ``.avsc``
file is covered without touching this file.
"""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kflow.schemas
from kflow.schemas.fastcodec import CODECS, _read_long, compile_schema

SCHEMA_DIR = Path(kflow.schemas.__file__).parent
KINDS = ("command", "event", "task", "state", "engine_state", "definition", "audit")
SCHEMAS = {k: fastavro.parse_schema(json.loads((SCHEMA_DIR / f"{k}.avsc").read_text())) for k in KINDS}
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
#: Where the zig-zag varint of an int grows by a byte.
VARINT_EDGES = [0, 1, -1, *(v for k in range(1, 5) for e in (2 ** (7 * k - 1),) for v in (e - 1, e, -e, -e - 1))]


def _body_branches(schema: dict[str, Any]) -> list[str]:
    body = next((f["type"] for f in schema["fields"] if f["name"] == "body"), None)
    return [b["name"] for b in body] if isinstance(body, list) else []


#: (kind, record of the body union or None): every kind, and every command and event type.
CASES = [(k, b) for k in KINDS for b in (_body_branches(SCHEMAS[k]) or [None])]
CASE_IDS = [f"{k}-{b.split('.')[-1]}" if b else k for k, b in CASES]


def type_of(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    return schema["type"] if isinstance(schema, dict) else schema


def values(schema: Any, branch: str | None = None) -> st.SearchStrategy[Any]:
    """Valid values of ``schema``; a union of records is drawn in tuple notation (only ``branch`` if given)."""
    typ = type_of(schema)
    if typ == "string":
        return st.text(max_size=80)  # up to 320 UTF-8 bytes: one- and two-byte length prefixes
    if typ in ("int", "long"):
        lo, hi = INT32 if typ == "int" else INT64
        return st.sampled_from([lo, hi, *VARINT_EDGES]) | st.integers(lo, hi)
    if typ == "boolean":
        return st.booleans()
    if typ == "null":
        return st.none()
    if typ == "enum":
        return st.sampled_from(schema["symbols"])
    if typ == "record":
        required = {f["name"]: values(f["type"], branch) for f in schema["fields"] if "default" not in f}
        optional = {f["name"]: values(f["type"], branch) for f in schema["fields"] if "default" in f}
        return st.fixed_dictionaries(required, optional=optional)  # absent optional fields take their default
    assert typ == "union"
    if all(type_of(b) == "record" for b in schema):
        return st.one_of([st.tuples(st.just(b["name"]), values(b)) for b in schema if branch in (None, b["name"])])
    return st.one_of([values(b) for b in schema])


def fastavro_write(kind: str, record: Any) -> bytes:
    buf = BytesIO()
    fastavro.schemaless_writer(buf, SCHEMAS[kind], record)
    return buf.getvalue()


def fastavro_read(kind: str, payload: bytes) -> tuple[Any, int]:
    buf = BytesIO(payload)
    return fastavro.schemaless_reader(buf, SCHEMAS[kind], None, True), buf.tell()


def codec(kind: str) -> Any:
    return CODECS[SCHEMAS[kind]["name"]]


def same(ours: Any, theirs: Any) -> bool:
    """Equal, with the same types and key order (``==`` alone takes True for 1 and a list for a tuple)."""
    return ours == theirs and repr(ours) == repr(theirs)


# --------------------------------------------------------------------------- the same bytes, both ways


def test_every_schema_file_is_compiled_and_tested() -> None:
    files = {p.stem: fastavro.parse_schema(json.loads(p.read_text()))["name"] for p in SCHEMA_DIR.glob("*.avsc")}
    assert sorted(files) == sorted(KINDS)
    assert sorted(CODECS) == sorted(files.values())


@pytest.mark.parametrize(("kind", "branch"), CASES, ids=CASE_IDS)
@settings(max_examples=40)  # per case; the cases share the same field code
@given(data=st.data())
def test_encodes_exactly_the_bytes_fastavro_writes(kind: str, branch: str | None, data: st.DataObject) -> None:
    record = data.draw(values(SCHEMAS[kind], branch))
    assert codec(kind).encode(record) == fastavro_write(kind, record)


@pytest.mark.parametrize(("kind", "branch"), CASES, ids=CASE_IDS)
@settings(max_examples=40)  # per case; the cases share the same field code
@given(data=st.data(), prefix=st.binary(max_size=12))
def test_decodes_exactly_what_fastavro_reads(kind: str, branch: str | None, data: st.DataObject,
                                             prefix: bytes) -> None:
    payload = fastavro_write(kind, data.draw(values(SCHEMAS[kind], branch)))
    theirs, end = fastavro_read(kind, payload)
    ours, pos = codec(kind).decode(prefix + payload, len(prefix))
    assert same(ours, theirs)
    assert pos == len(prefix) + end == len(prefix) + len(payload)


@pytest.mark.parametrize(("kind", "branch"), CASES, ids=CASE_IDS)
@settings(max_examples=10)
@given(data=st.data())
def test_every_truncation_is_an_eof_error(kind: str, branch: str | None, data: st.DataObject) -> None:
    payload = fastavro_write(kind, data.draw(values(SCHEMAS[kind], branch)))
    for end in range(len(payload)):
        with pytest.raises(EOFError):
            codec(kind).decode(payload[:end], 0)


@pytest.mark.parametrize("kind", KINDS)
@given(payload=st.binary(max_size=80))
def test_random_bytes_decode_like_fastavro_or_raise(kind: str, payload: bytes) -> None:
    """What the compiled decoder accepts, fastavro reads the same; the rest raises a decoding error."""
    try:
        ours, pos = codec(kind).decode(payload, 0)
    except (EOFError, ValueError):  # UnicodeDecodeError is a ValueError
        return
    theirs, end = fastavro_read(kind, payload)
    assert same(ours, theirs) and pos == end


def test_a_memoryview_decodes_like_bytes() -> None:
    record = {"name": "wf", "version": 1, "kind": "spec", "body": "{}", "deployed_ms": 5}
    payload = fastavro_write("definition", record)
    assert codec("definition").decode(memoryview(payload), 0) == (record, len(payload))


# --------------------------------------------------------------------------- defaults and new fields


def test_absent_fields_with_defaults_are_written_as_their_defaults() -> None:
    task = {"instance_id": "i", "activity_id": "a", "attempt": 1, "name": "n", "queue": "q", "input": "null",
            "workflow": "w", "scheduled_ms": 5}
    payload = codec("task").encode(task)
    assert payload == fastavro_write("task", task)
    decoded, _ = codec("task").decode(payload, 0)
    assert decoded["kind"] == "run" and decoded["report_start"] is False


def test_a_field_appended_to_a_schema_is_compiled_with_it() -> None:
    raw = json.loads((SCHEMA_DIR / "definition.avsc").read_text())
    raw["fields"].append({"name": "owner", "type": ["null", "string"], "default": None})
    raw["fields"].append({"name": "tier", "type": "int", "default": 3})
    compiled, parsed = compile_schema(raw), fastavro.parse_schema(raw)
    for extra in ({}, {"owner": "ops"}, {"owner": "ops", "tier": -7}):
        record = {"name": "wf", "version": 1, "kind": "spec", "body": "{}", "deployed_ms": 5, **extra}
        buf = BytesIO()
        fastavro.schemaless_writer(buf, parsed, record)
        assert compiled.encode(record) == buf.getvalue()
        decoded, _ = compiled.decode(buf.getvalue(), 0)
        assert decoded == {"owner": None, "tier": 3, **record}


# --------------------------------------------------------------------------- invalid values


def bad_values(schema: Any) -> list[Any]:
    """Values that do not fit ``schema`` (several of them fastavro would write anyway)."""
    typ = type_of(schema)
    if typ == "string":
        return [None, 1, b"x", True, "\ud800"]  # a lone surrogate has no UTF-8 encoding
    if typ in ("int", "long"):
        lo, hi = INT32 if typ == "int" else INT64
        return [None, "1", 1.0, 1.5, True, lo - 1, hi + 1]  # fastavro writes 1.0, 1.5 and True as 1
    if typ == "boolean":
        return [None, 0, 1, "true"]  # fastavro writes None and 0 as false
    if typ == "enum":
        return ["unknown", None, 0]
    assert typ == "union"
    if all(type_of(b) == "record" for b in schema):
        name = schema[0]["name"]
        return [None, {}, (name,), [name, {}], ("kflow.Unknown", {}), (name.split(".")[-1], {}), (name, None)]
    return [v for b in schema if type_of(b) != "null" for v in bad_values(b) if v is not None]


def field_cases() -> list[tuple[str, str | None, str, Any]]:
    """(kind, body record, field, bad value) for every field of every record, the body's own fields too
    (the fields around the body are tried once per kind)."""
    out = []
    for kind, branch in CASES:
        first = branch is None or branch == _body_branches(SCHEMAS[kind])[0]
        for f in SCHEMAS[kind]["fields"]:
            if f["name"] == "body" and branch is not None:
                record = next(b for b in f["type"] if b["name"] == branch)
                out += [(kind, branch, f"body.{bf['name']}", v) for bf in record["fields"] for v in bad_values(bf["type"])]
            if first:
                out += [(kind, branch, f["name"], v) for v in bad_values(f["type"])]
    return out


FIELD_CASES = field_cases()


@pytest.mark.parametrize(("kind", "branch", "field", "bad"), FIELD_CASES,
                         ids=[f"{k}-{(b or '').split('.')[-1]}-{f}-{v!r}" for k, b, f, v in FIELD_CASES])
def test_a_value_that_does_not_fit_its_field_raises(kind: str, branch: str | None, field: str, bad: Any) -> None:
    record = base_record(kind, branch)
    if field.startswith("body."):
        name, body = record["body"]
        record["body"] = (name, {**body, field[5:]: bad})
    else:
        record[field] = bad
    with pytest.raises((TypeError, ValueError), match=field.split(".")[-1]):  # the message names the field
        codec(kind).encode(record)


def base_record(kind: str, branch: str | None) -> dict[str, Any]:
    """A valid record of ``kind`` with every field present: strings "s", numbers 1, the first enum symbol."""

    def fill(schema: Any) -> Any:
        typ = type_of(schema)
        if typ == "record":
            return {f["name"]: fill(f["type"]) for f in schema["fields"]}
        if typ == "union":
            if type_of(schema[0]) == "record":
                chosen = next(b for b in schema if b["name"] == branch)
                return (chosen["name"], fill(chosen))
            return fill(schema[1])
        if typ == "enum":
            return schema["symbols"][0]
        return {"string": "s", "int": 1, "long": 1, "boolean": True}[typ]

    record = fill(SCHEMAS[kind])
    codec(kind).encode(record)  # valid as it is
    return record


@pytest.mark.parametrize(("kind", "branch"), CASES, ids=CASE_IDS)
def test_a_missing_field_without_default_raises(kind: str, branch: str | None) -> None:
    schema = SCHEMAS[kind]
    for f in schema["fields"]:
        if "default" in f:
            continue
        record = base_record(kind, branch)
        del record[f["name"]]
        with pytest.raises(ValueError, match=f"field '{f['name']}': no value and no default"):
            codec(kind).encode(record)


def test_a_record_that_is_not_a_mapping_raises() -> None:
    with pytest.raises(TypeError, match="must be a mapping"):
        codec("task").encode(["i", "a"])
    with pytest.raises(TypeError, match="must be a mapping"):
        codec("command").encode({**base_record("command", "kflow.CancelWorkflow"),
                                 "body": ("kflow.CancelWorkflow", "stop")})


# --------------------------------------------------------------------------- malformed input


EVENT_TYPES = len(_body_branches(SCHEMAS["event"]))
MALFORMED = {
    "a union index past the last record": ("event", b"\x02\x02i\x02\x02" + bytes([2 * EVENT_TYPES])),
    "a negative union index": ("event", b"\x02\x02i\x02\x02\x01"),
    "an optional field's branch 2": ("state", b"\x02i\x02w\x02\x02s\x02\x02\x02\x04"),
    "an optional field's branch -1": ("state", b"\x02i\x02w\x02\x02s\x02\x02\x02\x01"),
    "an enum index past the symbols": ("audit", b"\x00\x02" + b"\x00" * 5 + b"\x06"),
    "a negative string length": ("definition", b"\x01"),
    "a boolean byte 2": ("task", b"\x00\x00\x02" + b"\x00" * 4 + b"\x02\x00\x02"),
    "an int beyond 32 bits": ("definition", b"\x00\x80\x80\x80\x80\x10"),
    "an int varint whose 10th byte goes on": ("definition", b"\x00" + b"\xff" * 10),
    "a length varint whose 10th byte goes on": ("definition", b"\xff" * 10),
}


@pytest.mark.parametrize(("kind", "payload"), MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_payloads_raise_value_errors(kind: str, payload: bytes) -> None:
    with pytest.raises(ValueError):
        codec(kind).decode(payload, 0)


@pytest.mark.parametrize("value", [*INT64, *VARINT_EDGES, 2**56, -(2**56) - 1])
def test_the_varint_reader_takes_every_long(value: int) -> None:
    """Lengths, union and enum indexes go through ``_read_long``; fields of type long are read inline."""
    buf = BytesIO()
    fastavro.schemaless_writer(buf, "long", value)
    assert _read_long(buf.getvalue(), 0) == (value, len(buf.getvalue()))


def test_invalid_utf8_is_a_unicode_decode_error() -> None:
    with pytest.raises(UnicodeDecodeError):
        codec("definition").decode(b"\x04\xff\xfe", 0)


# --------------------------------------------------------------------------- what is not compiled


def record_with(field_type: Any) -> dict[str, Any]:
    return {"type": "record", "name": "R", "namespace": "t", "fields": [{"name": "f", "type": field_type}]}


@pytest.mark.parametrize(
    "schema",
    [
        record_with("float"),
        record_with("double"),
        record_with("bytes"),
        record_with("null"),
        record_with({"type": "array", "items": "string"}),
        record_with({"type": "map", "values": "string"}),
        record_with({"type": "fixed", "name": "F", "size": 4}),
        record_with({"type": "long", "logicalType": "timestamp-millis"}),
        record_with(["string", "null"]),
        record_with(["null", "string", "int"]),
        record_with(["null", {"type": "record", "name": "X", "fields": []}]),
        record_with(["null", {"type": "enum", "name": "E", "symbols": ["a"]}]),
        {"type": "record", "name": "R", "fields": [
            {"name": "a", "type": {"type": "record", "name": "A", "fields": []}}, {"name": "b", "type": "A"}]},
        {"type": "enum", "name": "E", "symbols": ["a"]},
    ],
    ids=lambda s: json.dumps(s["fields"][-1]["type"] if "fields" in s else s["type"]),
)
def test_unsupported_schemas_fail_when_compiled(schema: dict[str, Any]) -> None:
    with pytest.raises(RuntimeError, match="unsupported|only record schemas"):
        compile_schema(schema)


def test_a_default_that_does_not_fit_its_field_fails_when_compiled() -> None:
    schema = {"type": "record", "name": "R", "fields": [{"name": "f", "type": "int", "default": 2**40}]}
    with pytest.raises(RuntimeError, match="default of field 'f'"):
        compile_schema(schema)
