"""The wire codec: Avro single-object values round-trip, JSON commands validate, bad input is a DecodeError."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
from fastavro.schema import to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

import kflow.schemas
from kflow.model.errors import DecodeError
from kflow.model.messages import COMMAND_FIELDS, EVENT_FIELDS, Command, Definition, Event, Task, field_names
from kflow.schemas.codec import (
    JSON_HEADER,
    decode_command,
    decode_definition,
    decode_engine_state,
    decode_event,
    decode_state,
    decode_task,
    encode_command,
    encode_definition,
    encode_engine_state,
    encode_event,
    encode_state,
    encode_task,
)
from tests.avro_reference import crc64_avro

SCHEMA_DIR = Path(kflow.schemas.__file__).parent
MAGIC = b"\xc3\x01"
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(max_size=20)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def raw_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())


def field_strategy(typ: str, spec: str) -> st.SearchStrategy[Any]:
    """Values per the wire contract: which fields are payloads, ints, optional, and so on."""
    name = spec.lstrip("*")
    if spec.startswith("*"):
        return JSON_VALUES
    if name == "version":
        return st.none() | INT32 if typ == "StartWorkflow" else INT32
    if name in ("attempt", "run", "from_version", "to_version"):
        return INT32
    if name in ("retryable", "force", "replace", "replaced"):
        return st.booleans()
    if name in ("due_ms", "start_ms", "end_ms"):
        return INT64
    if name in ("parent_id", "parent_ref", "id_reuse") or (name, typ) in (("overlap", "TriggerSchedule"),
                                                                        ("transform", "MigrateWorkflow")) \
            or (typ == "UpdateCompleted" and name in ("error_type", "message")):
        return st.none() | TEXT
    if name == "priority":
        return st.none() | st.integers(1, 5)
    return TEXT


def data_strategy(typ: str, specs: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({s.lstrip("*"): field_strategy(typ, s) for s in specs})


def valid_command(typ: str = "StartWorkflow") -> Command:
    data = {
        "StartWorkflow": {"workflow": "order", "version": 2, "input": {"n": 1}, "parent_id": None,
                          "parent_ref": None, "id_reuse": "reject"},
        "FailActivity": {"activity_id": "a1", "attempt": 3, "error_type": "Boom", "message": "m", "retryable": True},
    }[typ]
    return Command(typ, "order-1", data, "cmd-1", 1_700_000_000_000)


def valid_event() -> Event:
    data = {"activity_id": "a1", "name": "charge", "queue": "payments", "input": {"amount": 10}, "attempt": 1}
    return Event("ActivityScheduled", "order-1", 7, 1_700_000_000_000, data)


def zigzag(n: int) -> bytes:
    """Avro's variable-length zig-zag encoding of a long (written here independently of fastavro)."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z & ~0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def avro_string(s: str) -> bytes:
    raw = s.encode()
    return zigzag(len(raw)) + raw


def header_of(value: bytes) -> bytes:
    return value[:10]


# --------------------------------------------------------------------------- schemas and framing


@pytest.mark.parametrize(("name", "vocabulary"), [("command", COMMAND_FIELDS), ("event", EVENT_FIELDS)])
def test_body_unions_mirror_the_vocabulary(name: str, vocabulary: dict[str, tuple[str, ...]]) -> None:
    schema = raw_schema(name)
    assert schema["namespace"] == "kflow"
    fields = {f["name"]: f for f in schema["fields"]}
    assert fields["format"] == {"name": "format", "type": "int", "default": 1}
    union = fields["body"]["type"]
    assert [r["name"] for r in union] == list(vocabulary)
    for record in union:
        assert tuple(f["name"] for f in record["fields"]) == field_names(vocabulary[record["name"]])
        for f in record["fields"]:
            if f"*{f['name']}" in vocabulary[record["name"]]:
                assert f["type"] == "string", f"payload {record['name']}.{f['name']} must be JSON text"


def test_every_schema_parses_and_has_the_documented_fields() -> None:
    expected = {
        "command": ["format", "command_id", "instance_id", "ts", "body"],
        "event": ["format", "instance_id", "seq", "ts", "body"],
        "state": ["instance_id", "workflow", "version", "status", "seq", "started_ms", "updated_ms",
                  "closed_ms", "result", "error_type", "error_message", "format_version", "kind", "tenant", "owner",
                  "parent_id", "run", "priority", "search_attributes", "incidents", "position"],
        "engine_state": ["instance_id", "format_version", "state"],
        "task": ["instance_id", "activity_id", "attempt", "name", "queue", "input", "workflow", "scheduled_ms", "kind", "report_start",
                 "attempt_token", "priority", "fairness_key"],
        "definition": ["name", "version", "kind", "body", "deployed_ms"],
    }
    for name, fields in expected.items():
        schema = raw_schema(name)
        fastavro.parse_schema(schema)
        assert [f["name"] for f in schema["fields"]] == fields


def test_reference_fingerprint_matches_published_avro_vectors() -> None:
    # share/test/data/schema-tests.txt in the Avro project
    assert crc64_avro(b'"null"') == 7195948357588979594
    assert crc64_avro(b'"int"') == 8247732601305521295
    assert crc64_avro(b'"string"') == -8142146995180207161


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("command", lambda: encode_command(valid_command())),
        ("event", lambda: encode_event(valid_event())),
        ("task", lambda: encode_task(Task("i", "a", 1, "n", "q", None, "w", 5))),
        ("definition", lambda: encode_definition(Definition("wf", 1, "spec", {"steps": []}, 9))),
        ("state", lambda: encode_state(state_record())),
    ],
)
def test_values_use_single_object_encoding(name: str, value: Any) -> None:
    encoded = value()
    canonical = to_parsing_canonical_form(fastavro.parse_schema(raw_schema(name))).encode()
    assert encoded[:2] == MAGIC
    assert encoded[2:10] == crc64_avro(canonical).to_bytes(8, "little", signed=True)


def test_a_consumer_with_only_the_avsc_file_can_read_an_event() -> None:
    value = encode_event(valid_event())
    record = fastavro.schemaless_reader(BytesIO(value[10:]), fastavro.parse_schema(raw_schema("event")), None, True)
    assert record["instance_id"] == "order-1" and record["seq"] == 7 and record["format"] == 1
    name, body = record["body"]
    assert name == "kflow.ActivityScheduled"
    assert orjson.loads(body["input"]) == {"amount": 10}


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("typ", list(COMMAND_FIELDS))
@settings(max_examples=50)  # per type; the types share one code path
@given(data=st.data())
def test_every_command_type_round_trips(typ: str, data: st.DataObject) -> None:
    cmd = Command(typ, data.draw(TEXT.filter(bool)), data.draw(data_strategy(typ, COMMAND_FIELDS[typ])),
                  data.draw(TEXT), data.draw(INT64))
    assert decode_command(encode_command(cmd)) == cmd


@pytest.mark.parametrize("typ", list(EVENT_FIELDS))
@settings(max_examples=50)  # per type; the types share one code path
@given(data=st.data())
def test_every_event_type_round_trips(typ: str, data: st.DataObject) -> None:
    fields = data.draw(data_strategy(typ, EVENT_FIELDS[typ]))
    ev = Event(typ, data.draw(TEXT), data.draw(INT64), data.draw(INT64), fields)
    assert decode_event(encode_event(ev)) == ev


def test_absent_optional_and_payload_fields_decode_as_null() -> None:
    cmd = Command("StartWorkflow", "o-1", {"workflow": "order"})
    assert decode_command(encode_command(cmd)).data == {
        "workflow": "order", "version": None, "input": None, "parent_id": None, "parent_ref": None, "id_reuse": None,
        "priority": None,
    }


@given(
    t=st.builds(Task, TEXT, TEXT, INT32, TEXT, TEXT, JSON_VALUES, TEXT, INT64),
)
def test_task_round_trips(t: Task) -> None:
    assert decode_task(encode_task(t)) == t


@given(d=st.builds(Definition, TEXT, INT32, st.sampled_from(["spec", "code"]),
                   st.dictionaries(TEXT, JSON_VALUES, max_size=4), INT64))
def test_definition_round_trips(d: Definition) -> None:
    assert decode_definition(encode_definition(d)) == d


def state_record(**overrides: Any) -> dict[str, Any]:
    rec = {
        "instance_id": "order-1", "workflow": "order", "version": 3, "status": "COMPLETED", "seq": 12,
        "started_ms": 1, "updated_ms": 2, "closed_ms": 3, "result": {"ok": True}, "error_type": None,
        "error_message": None, "format_version": 2, "kind": "spec", "tenant": "acme", "owner": "alice",
        "parent_id": None, "run": 1, "priority": None, "search_attributes": {"customer": "c1"}, "incidents": None,
        "position": ["s:charge"],
    }
    rec.update(overrides)
    return rec


@given(
    result=JSON_VALUES,
    search=st.none() | st.dictionaries(TEXT, JSON_VALUES, min_size=1, max_size=4),
    closed=st.none() | INT64,
    error=st.none() | TEXT,
)
def test_state_round_trips(result: Any, search: dict[str, Any] | None, closed: int | None, error: str | None) -> None:
    rec = state_record(result=result, search_attributes=search, closed_ms=closed, error_type=error, error_message=error)
    assert decode_state(encode_state(rec)) == rec


def test_state_optional_fields_may_be_absent() -> None:
    rec = state_record()
    optional = ("closed_ms", "result", "error_type", "error_message", "format_version", "kind", "tenant", "owner",
                "parent_id", "run", "priority", "search_attributes", "incidents", "position")
    for key in optional:
        del rec[key]
    decoded = decode_state(encode_state(rec))
    assert decoded["format_version"] == 2 and all(decoded[k] is None for k in optional if k != "format_version")


@given(state=st.dictionaries(TEXT, JSON_VALUES, max_size=4))
def test_engine_state_round_trips(state: dict[str, Any]) -> None:
    assert decode_engine_state(encode_engine_state("order-1", state)) == ("order-1", state)


# --------------------------------------------------------------------------- JSON commands


def as_json_document(cmd: Command, nested: bool) -> bytes:
    doc: dict[str, Any] = {"type": cmd.type, "instance_id": cmd.instance_id, "command_id": cmd.command_id, "ts": cmd.ts}
    if nested:
        doc["data"] = cmd.data
    else:
        doc.update(cmd.data)
    return orjson.dumps(doc)


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "under-data"])
@pytest.mark.parametrize("typ", list(COMMAND_FIELDS))
@settings(max_examples=50)  # per type; the types share one code path
@given(data=st.data())
def test_json_commands_decode_like_avro_ones(typ: str, nested: bool, data: st.DataObject) -> None:
    cmd = Command(typ, data.draw(TEXT.filter(bool)), data.draw(data_strategy(typ, COMMAND_FIELDS[typ])),
                  data.draw(TEXT), data.draw(INT64))
    assert decode_command(as_json_document(cmd, nested), [JSON_HEADER]) == cmd


@pytest.mark.parametrize(
    "headers",
    [
        [JSON_HEADER],
        [("trace", b"x"), ("Content-Type", b"application/json; charset=utf-8")],
        {"content-type": "application/json"},
        {"content-type": b"application/json"},
    ],
)
def test_json_header_variants_select_the_json_path(headers: Any) -> None:
    value = b'{"type":"StartWorkflow","instance_id":"o-1","workflow":"order","input":{"n":1}}'
    cmd = decode_command(value, headers)
    assert cmd == Command("StartWorkflow", "o-1", {"workflow": "order", "version": None, "input": {"n": 1},
                                                   "parent_id": None, "parent_ref": None, "id_reuse": None,
                                                   "priority": None})


def test_signal_data_at_top_level_is_the_payload() -> None:
    value = b'{"type":"SignalWorkflow","instance_id":"o-1","name":"approve","data":{"name":"x"}}'
    assert decode_command(value, [JSON_HEADER]).data == {"name": "approve", "data": {"name": "x"}}


def test_without_the_json_header_a_json_value_is_not_avro() -> None:
    value = b'{"type":"StartWorkflow","instance_id":"o-1","workflow":"order"}'
    for headers in (None, [], [("content-type", b"application/avro")]):
        with pytest.raises(DecodeError, match="bad magic"):
            decode_command(value, headers)


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be an object, got array"),
        (b'{"instance_id":"o","workflow":"w"}', "needs a string 'type'"),
        (b'{"type":"Launch","instance_id":"o"}', "unknown command type 'Launch'"),
        (b'{"type":"CancelWorkflow","reason":"r"}', "'instance_id' must be string, got null"),
        (b'{"type":"CancelWorkflow","instance_id":"","reason":"r"}', "'instance_id' is empty"),
        (b'{"type":"CancelWorkflow","instance_id":7,"reason":"r"}', "'instance_id' must be string"),
        (b'{"type":"CancelWorkflow","instance_id":"o","command_id":5,"reason":"r"}', "'command_id' must be string"),
        (b'{"type":"CancelWorkflow","instance_id":"o","ts":"now","reason":"r"}', "'ts' must be long"),
        (b'{"type":"CancelWorkflow","instance_id":"o"}', "missing field 'reason'"),
        (b'{"type":"StartWorkflow","instance_id":"o","input":{}}', "missing field 'workflow'"),
        (b'{"type":"StartWorkflow","instance_id":"o","data":{"input":{}}}', "missing field 'workflow'"),
        (b'{"type":"StartWorkflow","instance_id":"o","workflow":7}', "'workflow' must be string, got int 7"),
        (b'{"type":"StartWorkflow","instance_id":"o","workflow":"w","version":"2"}', "'version' must be int or null"),
        (b'{"type":"StartWorkflow","instance_id":"o","workflow":"w","version":1.0}', "'version' must be int or null"),
        (b'{"type":"StartWorkflow","instance_id":"o","workflow":"w","parent_id":1}',
         "'parent_id' must be string or null"),
        (b'{"type":"StartWorkflow","instance_id":"o","workflow":"w","inputs":{}}', "unknown field(s) 'inputs'"),
        (b'{"type":"StartWorkflow","instance_id":"o","data":{"workflow":"w"},"x":1}', "unknown field(s) 'x'"),
        (b'{"type":"FailActivity","instance_id":"o","activity_id":"a","attempt":true,"error_type":"E",'
         b'"message":"m","retryable":true}', "'attempt' must be int, got boolean"),
        (b'{"type":"FailActivity","instance_id":"o","activity_id":"a","attempt":2147483648,"error_type":"E",'
         b'"message":"m","retryable":true}', "'attempt' must be int, got int 2147483648 (out of range)"),
        (b'{"type":"FailActivity","instance_id":"o","activity_id":"a","attempt":1,"error_type":"E",'
         b'"message":"m","retryable":"yes"}', "'retryable' must be boolean, got string"),
        (b'{"type":"FailActivity","instance_id":"o","activity_id":"a","attempt":1,"error_type":"E",'
         b'"message":"m"}', "missing field 'retryable'"),
    ],
)
def test_invalid_json_commands_are_decode_errors(doc: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_command(doc, [JSON_HEADER])
    assert reason in info.value.reason


# --------------------------------------------------------------------------- undecodable Avro


DECODERS = [decode_command, decode_event, decode_task, decode_definition, decode_state]


@pytest.mark.parametrize("decode", DECODERS)
def test_empty_value_is_a_decode_error(decode: Any) -> None:
    for value in (b"", None):
        with pytest.raises(DecodeError, match="empty"):
            decode(value)


@pytest.mark.parametrize("decode", DECODERS)
@given(value=st.binary(max_size=64))
def test_random_bytes_never_escape_as_anything_but_decode_error(decode: Any, value: bytes) -> None:
    try:
        decode(value)
    except DecodeError as exc:
        assert exc.reason
    else:
        pytest.fail("random bytes decoded")  # no 10-byte header matches by chance


ENCODED = {
    "command": (decode_command, lambda: encode_command(valid_command("FailActivity"))),
    "event": (decode_event, lambda: encode_event(valid_event())),
    "task": (decode_task, lambda: encode_task(Task("i", "a", 1, "n", "q", {"x": [1, 2]}, "w", 5))),
    "definition": (decode_definition, lambda: encode_definition(Definition("wf", 1, "spec", {"steps": []}, 9))),
    "state": (decode_state, lambda: encode_state(state_record())),
}


@pytest.mark.parametrize("kind", list(ENCODED))
@given(payload=st.binary(max_size=64))
def test_random_payload_behind_a_valid_header_is_a_decode_error_or_a_value(kind: str, payload: bytes) -> None:
    decode, encode = ENCODED[kind]
    try:
        decode(header_of(encode()) + payload)
    except DecodeError as exc:
        assert exc.reason
    # some byte strings are valid Avro for a schema; decoding them is fine, crashing is not


@pytest.mark.parametrize("kind", list(ENCODED))
def test_every_truncation_is_a_decode_error(kind: str) -> None:
    decode, encode = ENCODED[kind]
    value = encode()
    for end in range(1, len(value)):
        with pytest.raises(DecodeError) as info:
            decode(value[:end])
        assert "truncated" in info.value.reason, (end, info.value.reason)


@pytest.mark.parametrize("kind", list(ENCODED))
def test_trailing_bytes_are_a_decode_error(kind: str) -> None:
    decode, encode = ENCODED[kind]
    with pytest.raises(DecodeError, match="1 trailing byte"):
        decode(encode() + b"\x00")


def test_wrong_magic_is_a_decode_error() -> None:
    value = encode_event(valid_event())
    with pytest.raises(DecodeError, match="bad magic 0000"):
        decode_event(b"\x00\x00" + value[2:])
    with pytest.raises(DecodeError, match="bad magic"):
        decode_event(b"\x00" + value)  # Confluent wire format starts with a zero byte


def test_unknown_fingerprint_is_a_decode_error() -> None:
    value = encode_event(valid_event())
    with pytest.raises(DecodeError, match="unknown schema fingerprint 0102030405060708"):
        decode_event(MAGIC + bytes(range(1, 9)) + value[10:])


def test_a_value_of_another_kind_is_named_in_the_error() -> None:
    with pytest.raises(DecodeError, match="expected event, got a command"):
        decode_event(encode_command(valid_command()))
    with pytest.raises(DecodeError, match="expected command, got a state"):
        decode_command(encode_state(state_record()))


def test_unknown_union_branch_is_a_decode_error() -> None:
    header = header_of(encode_event(valid_event()))
    branch = zigzag(len(EVENT_FIELDS))  # one past the last event type
    body = zigzag(1) + avro_string("order-1") + zigzag(1) + zigzag(5) + branch + avro_string("t")
    with pytest.raises(DecodeError, match="garbled Avro event"):
        decode_event(header + body)


def test_invalid_utf8_is_a_decode_error() -> None:
    header = header_of(encode_event(valid_event()))
    body = zigzag(1) + zigzag(2) + b"\xff\xfe" + zigzag(1) + zigzag(5) + zigzag(10) + avro_string("t")
    with pytest.raises(DecodeError, match="invalid UTF-8"):
        decode_event(header + body)


def write_raw(name: str, record: dict[str, Any], header_from: bytes) -> bytes:
    buf = BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(raw_schema(name)), record)
    return header_of(header_from) + buf.getvalue()


def test_a_payload_that_is_not_json_is_a_decode_error() -> None:
    record = {"format": 1, "instance_id": "o", "seq": 1, "ts": 2,
              "body": ("kflow.SignalReceived", {"name": "n", "data": "{not json"})}
    with pytest.raises(DecodeError, match="SignalReceived: field 'data' is not valid JSON"):
        decode_event(write_raw("event", record, encode_event(valid_event())))


def test_a_definition_body_must_be_a_json_object() -> None:
    record = {"name": "wf", "version": 1, "kind": "spec", "body": "[1]", "deployed_ms": 0}
    with pytest.raises(DecodeError, match="must be a JSON object"):
        decode_definition(write_raw("definition", record, encode_definition(Definition("wf", 1, "spec", {}))))


def test_a_newer_format_is_a_decode_error() -> None:
    record = {"format": 2, "command_id": "c", "instance_id": "o", "ts": 0,
              "body": ("kflow.CancelWorkflow", {"reason": "r"})}
    with pytest.raises(DecodeError, match="format 2 is newer"):
        decode_command(write_raw("command", record, encode_command(valid_command())))


def test_an_avro_command_without_instance_id_is_a_decode_error() -> None:
    record = {"format": 1, "command_id": "c", "instance_id": "", "ts": 0,
              "body": ("kflow.CancelWorkflow", {"reason": "r"})}
    with pytest.raises(DecodeError, match="'instance_id' is empty"):
        decode_command(write_raw("command", record, encode_command(valid_command())))


# --------------------------------------------------------------------------- what cannot be encoded


@pytest.mark.parametrize(
    ("typ", "data", "message"),
    [
        ("StartWorkflow", {"input": 1}, "missing field 'workflow'"),
        ("StartWorkflow", {"workflow": 7}, "field 'workflow' must be string, got int 7"),
        ("StartWorkflow", {"workflow": "w", "version": 1.5}, "field 'version' must be int or null, got float"),
        ("StartWorkflow", {"workflow": "w", "version": 2**31}, "(out of range)"),
        ("StartWorkflow", {"workflow": "w", "parent_id": 5}, "field 'parent_id' must be string or null"),
        ("StartWorkflow", {"workflow": "w", "inputs": {}}, "unknown field(s) 'inputs'"),
        ("StartWorkflow", {"workflow": "w", "input": {1, 2}}, "not JSON-serialisable"),
        ("FailActivity", {"activity_id": "a", "attempt": 1, "error_type": "E", "message": "m", "retryable": None},
         "field 'retryable' must be boolean, got null"),
        ("FailActivity", {"activity_id": "a", "attempt": True, "error_type": "E", "message": "m", "retryable": True},
         "field 'attempt' must be int, got boolean"),
        ("Launch", {}, "unknown command type 'Launch'"),
    ],
)
def test_invalid_commands_are_not_encoded(typ: str, data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        encode_command(Command(typ, "o", data))
    assert message in str(info.value)


def test_invalid_events_tasks_and_states_are_not_encoded() -> None:
    with pytest.raises(ValueError, match="'seq' and 'ts' must be int"):
        encode_event(Event("TimerFired", "o", 1.0, 0, {"timer_id": "t"}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="field 'due_ms' must be long, got string"):
        encode_event(Event("TimerStarted", "o", 1, 0, {"timer_id": "t", "due_ms": "soon"}))
    with pytest.raises(ValueError, match="unknown event type"):
        encode_event(Event("Happened", "o", 1, 0, {}))
    with pytest.raises(ValueError, match="'attempt' must be int"):
        encode_task(Task("i", "a", 2**40, "n", "q", None, "w", 0))
    with pytest.raises(ValueError, match="missing field"):
        encode_state({k: v for k, v in state_record().items() if k != "status"})
    with pytest.raises(ValueError, match="unknown field"):
        encode_state(state_record(extra=1))
    with pytest.raises(ValueError, match="unknown field"):
        encode_state(state_record(internal={}))
    with pytest.raises(ValueError, match="field 'run' must be int"):
        encode_state(state_record(run="1"))
    with pytest.raises(ValueError, match="engine state must be a dict"):
        encode_engine_state("i", [1])  # type: ignore[arg-type]


@settings(max_examples=50)
@given(value=st.binary(min_size=1, max_size=200))
def test_json_path_never_raises_anything_but_decode_error(value: bytes) -> None:
    try:
        decode_command(value, [JSON_HEADER])
    except DecodeError as exc:
        assert exc.reason
