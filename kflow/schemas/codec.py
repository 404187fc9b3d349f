"""Turn kflow messages into Kafka record values and back, and nothing else.

Every value is Avro (the ``.avsc`` files next to this module, parsed once with fastavro) in Avro
single-object encoding: ``C3 01``, the 8-byte little-endian CRC-64-AVRO fingerprint of the
schema's Parsing Canonical Form, then the schemaless Avro payload, so any consumer holding the
``.avsc`` files can decode it. Workflow payloads (input, results, signal data, state internals)
travel as JSON text inside Avro ``string`` fields; this module does that conversion with orjson.
Commands may also arrive as JSON (header ``content-type: application/json``) and are validated
exactly like Avro ones. With a Confluent Schema Registry in use (:mod:`kflow.schemas.registry` calls
:func:`use_registry`) values are written with Confluent framing instead (``00``, the 4-byte big-endian
schema id, the same Avro payload); readers accept both framings at any time. Anything that cannot be decoded raises :class:`DecodeError` with a
precise reason; anything that cannot be encoded raises :class:`ValueError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclasses_field
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import orjson
from fastavro.schema import fingerprint, to_parsing_canonical_form

from kflow.model.errors import DecodeError
from kflow.model.messages import COMMAND_FIELDS, EVENT_FIELDS, Command, Definition, Event, Task
from kflow.model.state import STATE_FORMAT_VERSION
from kflow.schemas.fastcodec import CODECS

__all__ = [
    "JSON_HEADER",
    "MAGIC",
    "FORMAT",
    "encode_command",
    "decode_command",
    "encode_event",
    "decode_event",
    "encode_task",
    "decode_task",
    "encode_definition",
    "decode_definition",
    "encode_state",
    "decode_state",
    "encode_engine_state",
    "decode_engine_state",
    "encode_audit_record",
    "decode_audit_record",
    "decode_legacy_state",
    "STATE_FIELDS",
    "STATE_FORMAT",
    "KINDS",
    "schema_text",
    "use_registry",
    "use_single_object",
]

#: The Kafka header that marks a command value as JSON instead of Avro.
JSON_HEADER: tuple[str, bytes] = ("content-type", b"application/json")
#: Avro single-object encoding marker.
MAGIC = b"\xc3\x01"
#: Envelope format written into the ``format`` field of commands and events.
FORMAT = 1

_HEADER_LEN = len(MAGIC) + 8
_NAMESPACE = "kflow."
_INT_RANGE = (-(2**31), 2**31 - 1)
_LONG_RANGE = (-(2**63), 2**63 - 1)
_STATE_FIELDS = (
    "instance_id", "workflow", "version", "status", "seq", "started_ms", "updated_ms",
    "closed_ms", "result", "error_type", "error_message", "format_version", "kind", "tenant", "owner",
    "parent_id", "run", "priority", "search_attributes", "incidents", "position",
)  # fmt: skip
#: The fields of the public ``state`` record, in schema order (docs/state-contract.md).
STATE_FIELDS = _STATE_FIELDS
_STATE_NAMES = frozenset(_STATE_FIELDS)
_STATE_REQUIRED = ("instance_id", "workflow", "version", "status", "seq", "started_ms", "updated_ms")
#: State fields carried as JSON text in Avro and as JSON values in memory.
_STATE_JSON = ("result", "search_attributes", "incidents", "position")
#: ``format_version`` of the public state records this release writes: 1 = written before the field
#: existed (and with the engine's state inside), 2 = the stable record of state.avsc as it is now.
STATE_FORMAT = 2
#: ``format_version`` of the engine-state records this release writes: the format of the instance
#: state they carry (:data:`kflow.model.state.STATE_FORMAT_VERSION`, with the model it versions).
ENGINE_STATE_FORMAT = STATE_FORMAT_VERSION

_reader = fastavro.schemaless_reader
#: Avro encoders and decoders compiled from the ``.avsc`` files, by schema full name (see fastcodec).
_codecs = CODECS
_dumps = orjson.dumps
_loads = orjson.loads


# --------------------------------------------------------------------------- schemas


@dataclass(frozen=True, slots=True)
class _Kind:
    """One message kind: its parsed schema and the single-object header that names it."""

    label: str
    schema: dict[str, Any]
    header: bytes
    #: Fingerprints of this schema's earlier versions -> the writer schema to resolve their records
    #: with, or None when they read with this schema as they are (see _earlier_versions).
    earlier: Mapping[bytes, dict[str, Any] | None] = dataclasses_field(default_factory=dict)

    @property
    def fingerprint(self) -> bytes:
        """The 8 fingerprint bytes after the magic."""
        return self.header[len(MAGIC) :]


def _load_raw(name: str) -> dict[str, Any]:
    """Read one ``.avsc`` file from this package."""
    path = Path(__file__).with_name(f"{name}.avsc")
    return json.loads(path.read_text(encoding="utf-8"))


def _fingerprint(raw: dict[str, Any]) -> bytes:
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(fastavro.parse_schema(raw)), "CRC-64-AVRO"))


def _earlier_versions(raw: dict[str, Any]) -> dict[bytes, dict[str, Any] | None]:
    """The earlier versions of schema ``raw`` a reader still accepts: fingerprint -> writer schema.

    Two kinds of change are made, and each leaves its earlier versions recognisable:

    * new command and event types are only ever appended to the end of the ``body`` union, so an
      earlier version is ``raw`` with the union cut short; its records (whose branch indexes all
      exist, with the same layout) read with the current schema as they are (None);
    * new fields of the other records are only ever appended with a default, so an earlier version
      is ``raw`` without some of its trailing defaulted fields; its records are resolved from that
      writer schema, the missing fields taking their defaults. This holds for the records of the
      ``body`` union too (e.g. ``priority`` on StartWorkflow), with the union cut short or not.
    """
    fields = raw.get("fields", [])
    out: dict[bytes, dict[str, Any] | None] = {}
    body = next((f for f in fields if f["name"] == "body"), None)
    if body is not None and isinstance(body["type"], list):
        for k in range(1, len(body["type"]) + 1):
            cut = {**raw, "fields": [{**f, "type": f["type"][:k]} if f is body else f for f in fields]}
            if k < len(body["type"]):
                out[_fingerprint(cut)] = None
            for older in _shorter_branches(cut):
                out[_fingerprint(older)] = fastavro.parse_schema(older)  # type: ignore[assignment]
    n = len(fields)
    while n > 0 and "default" in fields[n - 1]:
        n -= 1
        older = {**raw, "fields": fields[:n]}
        writer: dict[str, Any] = fastavro.parse_schema(older)  # type: ignore[assignment]  # a record schema parses to a dict
        out[_fingerprint(older)] = writer
    return out


#: Body records that gained defaulted fields -> their field count in the oldest version still read
#: (StartWorkflow before ``priority``). Only these are shortened when listing earlier versions, so
#: the list stays small.
_BRANCH_FIELDS_AT_RELEASE = {"StartWorkflow": 6}


def _shorter_branches(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """``raw`` with one body record cut back to each of its earlier lengths (appended fields removed)."""
    fields = raw["fields"]
    body = next(f for f in fields if f["name"] == "body")
    out = []
    for i, branch in enumerate(body["type"]):
        first = _BRANCH_FIELDS_AT_RELEASE.get(branch.get("name", "")) if isinstance(branch, dict) else None
        if first is None:
            continue
        for n in range(first, len(branch["fields"])):
            short = {**branch, "fields": branch["fields"][:n]}
            union = [*body["type"][:i], short, *body["type"][i + 1:]]
            out.append({**raw, "fields": [{**f, "type": union} if f is body else f for f in fields]})
    return out


def _load_kind(name: str) -> _Kind:
    """Parse a schema once and compute its single-object header."""
    raw = _load_raw(name)
    earlier = _earlier_versions(raw)
    if name == "state":
        earlier.update(_state_format_1(raw))
    return _Kind(name, fastavro.parse_schema(raw), MAGIC + _fingerprint(raw), earlier)


def _state_format_1(raw: dict[str, Any]) -> dict[bytes, dict[str, Any] | None]:
    """The state schema of format 1 (the eleven public fields, then the engine's state as the
    required string ``internal``), whose records still read: the reader drops ``internal``."""
    first = [f for f in raw["fields"] if f["name"] in _STATE_FIELDS[:11]]
    old = {**raw, "fields": [*first, {"name": "internal", "type": "string"}]}
    writer: dict[str, Any] = fastavro.parse_schema(old)  # type: ignore[assignment]  # a record schema parses to a dict
    return {_fingerprint(old): writer}


_COMMAND = _load_kind("command")
_EVENT = _load_kind("event")
_STATE = _load_kind("state")
_TASK = _load_kind("task")
_DEFINITION = _load_kind("definition")
_ENGINE_STATE = _load_kind("engine_state")
_AUDIT = _load_kind("audit")
_ALL_KINDS = (_COMMAND, _EVENT, _STATE, _TASK, _DEFINITION, _ENGINE_STATE, _AUDIT)
_BY_FINGERPRINT = {k.fingerprint: k for k in _ALL_KINDS}
_BY_LABEL = {k.label: k for k in _ALL_KINDS}
#: The message kinds, by the name of their ``.avsc`` file.
KINDS = tuple(_BY_LABEL)


def schema_text(label: str) -> str:
    """The ``.avsc`` text of message kind ``label`` (one of :data:`KINDS`), as shipped."""
    return Path(__file__).with_name(f"{label}.avsc").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- field checks


_PY_TYPES = {"int": int, "long": int, "boolean": bool, "string": str}
_RANGES = {"int": _INT_RANGE, "long": _LONG_RANGE}


@dataclass(frozen=True, slots=True)
class _Field:
    """One data field of a command or event type, as the schema and the vocabulary define it."""

    name: str
    avro_type: str  # the non-null primitive
    payload: bool  # JSON document carried as JSON text
    optional: bool  # Avro union with null, default null
    pytype: type
    lo: int
    hi: int

    def accepts(self, value: Any) -> bool:
        """True if ``value`` is a valid in-memory value for this field."""
        if self.payload:
            return True
        if value is None:
            return self.optional
        return type(value) is self.pytype and (self.pytype is not int or self.lo <= value <= self.hi)


def _make_field(avro_field: dict[str, Any], payload: bool) -> _Field:
    t = avro_field["type"]
    optional = isinstance(t, list)
    prim = next(x for x in t if x != "null") if optional else t
    if prim not in _PY_TYPES:
        raise RuntimeError(f"unsupported Avro type {prim!r} in field {avro_field['name']!r}")
    lo, hi = _RANGES.get(prim, (0, 1))
    return _Field(avro_field["name"], prim, payload, optional, _PY_TYPES[prim], lo, hi)


@dataclass(frozen=True, slots=True)
class _Body:
    """A command or event type: the record inside the ``body`` union and its conversions."""

    type: str
    record: str  # fully qualified Avro record name, for tuple notation
    fields: tuple[_Field, ...]
    order: tuple[str, ...]
    names: frozenset[str]
    payloads: tuple[str, ...]
    scalars: tuple[_Field, ...]  # int/long/boolean fields fastavro would silently coerce

    def to_avro(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """Build the Avro body record from a ``data`` dict (payloads become JSON text)."""
        out = dict(data)
        get = out.get
        for name in self.payloads:
            out[name] = _dumps(get(name)).decode()
        for f in self.scalars:
            value = get(f.name)
            if type(value) is not f.pytype or not f.lo <= value <= f.hi:
                if not f.accepts(value):
                    raise ValueError(_field_problem(self, f, data))
        if out.keys() != self.names:
            self._check_names(out)
        return out

    def _check_names(self, out: dict[str, Any]) -> None:
        """Reject unknown fields and missing required ones (optional ones may be absent)."""
        unknown = out.keys() - self.names
        if unknown:
            raise ValueError(f"{self.type}: unknown field(s) {_quoted(unknown)}")
        for f in self.fields:
            if f.name not in out and not f.optional:
                raise ValueError(f"{self.type}: missing field '{f.name}'")

    def problem(self, data: Mapping[str, Any]) -> str | None:
        """Name the first field of ``data`` that does not fit this type, if any."""
        for f in self.fields:
            if not f.accepts(data.get(f.name)) or (f.name not in data and not (f.payload or f.optional)):
                return _field_problem(self, f, data)
        return None

    def from_avro(self, body: dict[str, Any]) -> dict[str, Any]:
        """Turn a decoded Avro body record into a ``data`` dict (JSON text becomes values)."""
        for name in self.payloads:
            try:
                body[name] = _loads(body[name])
            except orjson.JSONDecodeError as exc:
                raise DecodeError(f"{self.type}: field '{name}' is not valid JSON: {exc}") from None
        return body

    def from_json(self, doc: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Validate a JSON-decoded field mapping; raise DecodeError naming the first problem."""
        unknown = doc.keys() - self.names
        if unknown:
            raise DecodeError(f"{self.type}: unknown field(s) {_quoted(unknown)} in {where}")
        data: dict[str, Any] = {}
        for f in self.fields:
            if f.name not in doc and not (f.payload or f.optional):
                raise DecodeError(f"{self.type}: missing field '{f.name}'")
            value = doc.get(f.name)
            if not f.accepts(value):
                raise DecodeError(_field_problem(self, f, doc))
            data[f.name] = value
        return data


def _field_problem(body: _Body, f: _Field, data: Mapping[str, Any]) -> str:
    """Describe why ``data[f.name]`` does not fit field ``f``."""
    if f.name not in data:
        return f"{body.type}: missing field '{f.name}'"
    value = data[f.name]
    want = f"{f.avro_type} or null" if f.optional else f.avro_type
    why = " (out of range)" if type(value) is int and f.avro_type in ("int", "long") else ""
    return f"{body.type}: field '{f.name}' must be {want}, got {_describe(value)}{why}"


_KIND_NAMES = {type(None): "null", bool: "boolean", float: "float", str: "string", list: "array", dict: "object"}


def _describe(value: Any) -> str:
    """Name a value's kind for error messages (an int is shown with its value)."""
    if type(value) is int:
        return f"int {value}"
    return _KIND_NAMES.get(type(value), type(value).__name__)


def _quoted(names: Any) -> str:
    return ", ".join(f"'{n}'" for n in sorted(map(str, names)))


def _body(typ: str, spec: tuple[str, ...], record: dict[str, Any], label: str) -> _Body:
    """Describe one command or event type from its Avro record and its vocabulary entry."""
    payload = {s[1:] for s in spec if s.startswith("*")}
    fields = tuple(_make_field(af, af["name"] in payload) for af in record["fields"])
    order = tuple(f.name for f in fields)
    if order != tuple(s.lstrip("*") for s in spec):
        raise RuntimeError(f"{label}.avsc fields of {typ} differ from the vocabulary")
    scalars = tuple(f for f in fields if f.avro_type != "string" and not f.payload)
    payloads = tuple(f.name for f in fields if f.payload)
    return _Body(typ, _NAMESPACE + typ, fields, order, frozenset(order), payloads, scalars)


def _bodies(kind: _Kind, vocabulary: dict[str, tuple[str, ...]]) -> dict[str, _Body]:
    """Build the per-type tables from the union in ``kind``'s schema and the vocabulary."""
    raw = _load_raw(kind.label)
    union = next(f["type"] for f in raw["fields"] if f["name"] == "body")
    records = {r["name"]: r for r in union}
    if set(records) != set(vocabulary):
        raise RuntimeError(f"{kind.label}.avsc body types differ from the vocabulary")
    return {typ: _body(typ, spec, records[typ], kind.label) for typ, spec in vocabulary.items()}


_COMMAND_BODIES = _bodies(_COMMAND, COMMAND_FIELDS)
_EVENT_BODIES = _bodies(_EVENT, EVENT_FIELDS)
_COMMAND_BY_RECORD = {b.record: b for b in _COMMAND_BODIES.values()}
_EVENT_BY_RECORD = {b.record: b for b in _EVENT_BODIES.values()}


# --------------------------------------------------------------------------- framing

#: Confluent framing: this byte, then the schema id as a 4-byte big-endian int.
CONFLUENT_MAGIC = 0
_FRAMED_LEN = 5
#: What the values of each kind start with: the single-object header, or the Confluent framing of
#: the kind's registered schema id while a registry is in use.
_prefix: dict[str, bytes] = {k.label: k.header for k in _BY_LABEL.values()}
#: Registry schema id -> (kind label, writer schema to resolve with, or None for the current schema).
_framed: dict[int, tuple[str, dict[str, Any] | None]] = {}
#: Looks up an id this process has not seen (set by :func:`use_registry`); raises DecodeError when
#: the registry does not know it or it is not a kflow schema.
_resolve_id: Callable[[int], tuple[str, str]] | None = None
_MAX_FRAMED_IDS = 1024  # schema ids remembered; a reader meets a handful (one per schema version)


def use_registry(ids: Mapping[str, int], resolve: Callable[[int], tuple[str, str]] | None = None) -> None:
    """Write Confluent-framed values from now on, in this process.

    Args:
        ids: Message kind (``command``, ``event``, ``state``, ``task``, ``definition``) -> the
            registry's id of the current schema of that kind. Kinds left out keep their framing.
        resolve: Called with a schema id met while reading that is not known yet; returns the kind
            label and the schema text the registry holds for that id.
    """
    global _resolve_id
    for label, schema_id in ids.items():
        known_schema_id(schema_id, label, None)
        _prefix[label] = bytes([CONFLUENT_MAGIC]) + schema_id.to_bytes(4, "big")
    if resolve is not None:
        _resolve_id = resolve


def known_schema_id(schema_id: int, label: str, schema: str | None) -> None:
    """Remember that registry id ``schema_id`` is a version of kind ``label``'s schema (None: the current one)."""
    if label not in _BY_LABEL:
        raise ValueError(f"unknown message kind {label!r} (known: {', '.join(KINDS)})")
    writer = None
    if schema is not None:
        raw = json.loads(schema)
        if _fingerprint(raw) != _BY_LABEL[label].fingerprint:
            writer = fastavro.parse_schema(raw)
    if len(_framed) >= _MAX_FRAMED_IDS:
        _framed.pop(next(iter(_framed)))
    _framed[schema_id] = (label, writer)


def use_single_object() -> None:
    """Go back to writing Avro single-object values and forget every registry schema id."""
    global _resolve_id
    _prefix.update({k.label: k.header for k in _BY_LABEL.values()})
    _framed.clear()
    _resolve_id = None


def _framed_writer(kind: _Kind, value: bytes) -> dict[str, Any] | None:
    """The writer schema of a Confluent-framed value of ``kind`` (None: the current schema)."""
    if len(value) < _FRAMED_LEN:
        raise DecodeError(f"truncated Schema Registry header for {kind.label} ({len(value)} of {_FRAMED_LEN} bytes)")
    schema_id = int.from_bytes(value[1:_FRAMED_LEN], "big")
    entry = _framed.get(schema_id)
    if entry is None:
        if _resolve_id is None:
            raise DecodeError(_header_problem(kind, value))
        label, text = _resolve_id(schema_id)
        known_schema_id(schema_id, label, text)
        entry = _framed[schema_id]
    if entry[0] != kind.label:
        raise DecodeError(f"wrong schema: expected {kind.label}, got a {entry[0]} value (Schema Registry id {schema_id})")
    return entry[1]


def _write(kind: _Kind, record: dict[str, Any], what: str = "") -> bytes:
    """Serialise ``record`` with ``kind``'s schema behind its framing (single-object or Confluent)."""
    try:
        return _prefix[kind.label] + _codecs[kind.schema["name"]].encode(record)
    except (TypeError, ValueError) as exc:
        label = f"{kind.label} {what}".rstrip()
        raise ValueError(f"cannot encode {label}: {exc}") from exc


def _write_body(kind: _Kind, record: dict[str, Any], body: _Body, data: Mapping[str, Any]) -> bytes:
    """Like :func:`_write`, but name the offending data field when the body does not fit."""
    try:
        return _write(kind, record, body.type)
    except ValueError:
        problem = body.problem(data)
        if problem is None:
            raise
        raise ValueError(problem) from None


def _read(kind: _Kind, value: bytes | None) -> dict[str, Any]:
    """Check the framing (single-object or Confluent) and read one Avro record of ``kind``."""
    writer = None
    start = _HEADER_LEN
    if not value or value[:_HEADER_LEN] != kind.header:
        if value and value[0] == CONFLUENT_MAGIC:
            writer, start = _framed_writer(kind, value), _FRAMED_LEN
        elif not value or value[: len(MAGIC)] != MAGIC or bytes(value[len(MAGIC) : _HEADER_LEN]) not in kind.earlier:
            raise DecodeError(_header_problem(kind, value))
        else:
            writer = kind.earlier[bytes(value[len(MAGIC) : _HEADER_LEN])]
    buf = None
    try:
        if writer is None:
            record, end = _codecs[kind.schema["name"]].decode(value, start)
        else:  # an earlier version: fastavro resolves its records against this schema
            buf = BytesIO(value)
            buf.seek(start)
            record, end = _reader(buf, writer, kind.schema, True), buf.tell()
    except EOFError:
        raise DecodeError(f"truncated Avro {kind.label} payload") from None
    except UnicodeDecodeError:
        raise DecodeError(f"garbled Avro {kind.label} payload: invalid UTF-8 in a string") from None
    except Exception as exc:  # fastavro reports garbage through many exception types
        if buf is not None and buf.tell() >= len(value):  # ran out of input, e.g. inside a varint
            raise DecodeError(f"truncated Avro {kind.label} payload") from None
        raise DecodeError(f"garbled Avro {kind.label} payload: {type(exc).__name__}: {exc}") from None
    extra = len(value) - end
    if extra:
        raise DecodeError(f"garbled Avro {kind.label} payload: {extra} trailing byte(s)")
    return record


def _header_problem(kind: _Kind, value: bytes | None) -> str:
    """Explain why ``value`` does not start with ``kind``'s single-object header."""
    if not value:
        return f"empty {kind.label} value"
    if value[0] == CONFLUENT_MAGIC and len(value) >= _FRAMED_LEN:
        schema_id = int.from_bytes(value[1:_FRAMED_LEN], "big")
        return (f"not a kflow {kind.label}: bad magic {bytes(value[:2]).hex()} (expected {MAGIC.hex()}); a Confluent "
                f"Schema Registry value (id {schema_id})? this process has no registry (KFLOW_SCHEMA_REGISTRY_URL)")
    if not MAGIC.startswith(bytes(value[:2])):
        return f"not a kflow {kind.label}: bad magic {bytes(value[:2]).hex()} (expected {MAGIC.hex()})"
    if len(value) < _HEADER_LEN:
        return f"truncated single-object header for {kind.label} ({len(value)} of {_HEADER_LEN} bytes)"
    fp = bytes(value[2:_HEADER_LEN])
    other = _BY_FINGERPRINT.get(fp)
    if other is not None:
        return f"wrong schema: expected {kind.label}, got a {other.label} value (fingerprint {fp.hex()})"
    return f"unknown schema fingerprint {fp.hex()} for {kind.label} (expected {kind.fingerprint.hex()})"


def _parse_json(text: str, where: str) -> Any:
    try:
        return _loads(text)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"{where} is not valid JSON: {exc}") from None


def _json_text(value: Any, where: str) -> str:
    try:
        return _dumps(value).decode()
    except TypeError as exc:
        raise ValueError(f"{where} is not JSON-serialisable: {exc}") from exc


def _newer_format(kind: _Kind, record: dict[str, Any]) -> DecodeError:
    return DecodeError(f"{kind.label} format {record['format']} is newer than this kflow ({FORMAT})")


def _check_long(what: str, name: str, value: Any) -> None:
    if type(value) is not int or not _LONG_RANGE[0] <= value <= _LONG_RANGE[1]:
        raise ValueError(f"{what}: field '{name}' must be long, got {_describe(value)}")


# --------------------------------------------------------------------------- commands


def _avro_body(bodies: dict[str, _Body], what: str, type_: str, data: Mapping[str, Any]) -> tuple[_Body, dict[str, Any]]:
    """The union branch for ``type_`` and ``data`` converted to it; ValueError names the problem."""
    body = bodies.get(type_)
    if body is None:
        raise ValueError(f"unknown {what} type {type_!r}")
    try:
        return body, body.to_avro(data)
    except TypeError as exc:
        raise ValueError(f"{type_}: payload is not JSON-serialisable: {exc}") from exc


def encode_command(cmd: Command) -> bytes:
    """Encode a command as an Avro single-object value."""
    if type(cmd.ts) is not int:
        raise ValueError(f"{cmd.type}: 'ts' must be int, got {_describe(cmd.ts)}")
    body, avro_body = _avro_body(_COMMAND_BODIES, "command", cmd.type, cmd.data)
    record = {
        "format": FORMAT,
        "command_id": cmd.command_id,
        "instance_id": cmd.instance_id,
        "ts": cmd.ts,
        "body": (body.record, avro_body),
    }
    return _write_body(_COMMAND, record, body, cmd.data)


def decode_command(
    value: bytes | None, headers: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None
) -> Command:
    """Decode a command value; JSON when ``headers`` say ``content-type: application/json``."""
    if headers and _is_json(headers):
        return _command_from_json(value)
    record = _read(_COMMAND, value)
    if record["format"] > FORMAT:
        raise _newer_format(_COMMAND, record)
    name, avro_body = record["body"]
    body = _COMMAND_BY_RECORD[name]
    _check_instance_id(record["instance_id"])
    return Command(body.type, record["instance_id"], body.from_avro(avro_body), record["command_id"], record["ts"])


def _is_json(headers: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> bool:
    """True if the headers carry ``content-type: application/json`` (any case, any parameters)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    for key, raw in items:
        if key.lower() != "content-type" or raw is None:
            continue
        text = raw.decode("latin-1") if isinstance(raw, (bytes, bytearray)) else str(raw)
        return text.split(";", 1)[0].strip().lower() == "application/json"
    return False


def _check_instance_id(instance_id: Any) -> None:
    if type(instance_id) is not str:
        raise DecodeError(f"'instance_id' must be string, got {_describe(instance_id)}")
    if not instance_id:
        raise DecodeError("'instance_id' is empty")


_JSON_ENVELOPE = frozenset({"type", "instance_id", "command_id", "ts"})


def _command_from_json(value: bytes | None) -> Command:
    """Validate and convert a JSON command document."""
    if not value:
        raise DecodeError("empty JSON command value")
    doc = _parse_json(value, "JSON command")
    if not isinstance(doc, dict):
        raise DecodeError(f"JSON command must be an object, got {_describe(doc)}")
    typ = doc.get("type")
    if type(typ) is not str:
        raise DecodeError("JSON command needs a string 'type'")
    body = _COMMAND_BODIES.get(typ)
    if body is None:
        raise DecodeError(f"unknown command type {typ!r} (known: {', '.join(COMMAND_FIELDS)})")
    _check_instance_id(doc.get("instance_id"))
    command_id = doc.get("command_id", "")
    if type(command_id) is not str:
        raise DecodeError(f"'command_id' must be string, got {_describe(command_id)}")
    ts = doc.get("ts", 0)
    if type(ts) is not int or not _LONG_RANGE[0] <= ts <= _LONG_RANGE[1]:
        raise DecodeError(f"'ts' must be long (epoch ms), got {_describe(ts)}")
    fields, where = _json_fields(body, doc)
    return Command(typ, doc["instance_id"], body.from_json(fields, where), command_id, ts)


def _json_fields(body: _Body, doc: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Pick the type fields: under ``data`` when none of them is at the top level, else top level."""
    nested = doc.get("data")
    top = doc.keys() - _JSON_ENVELOPE
    if isinstance(nested, dict) and not (top - {"data"}) & body.names:
        if top - {"data"}:
            raise DecodeError(f"{body.type}: unknown field(s) {_quoted(top - {'data'})} at top level")
        return nested, "'data'"
    return {k: doc[k] for k in top}, "the command"


# --------------------------------------------------------------------------- events


def encode_event(ev: Event) -> bytes:
    """Encode an event as an Avro single-object value."""
    if type(ev.seq) is not int or type(ev.ts) is not int:
        raise ValueError(f"{ev.type}: 'seq' and 'ts' must be int, got {_describe(ev.seq)}, {_describe(ev.ts)}")
    body, avro_body = _avro_body(_EVENT_BODIES, "event", ev.type, ev.data)
    record = {
        "format": FORMAT,
        "instance_id": ev.instance_id,
        "seq": ev.seq,
        "ts": ev.ts,
        "body": (body.record, avro_body),
    }
    return _write_body(_EVENT, record, body, ev.data)


def decode_event(value: bytes) -> Event:
    """Decode an Avro single-object event value."""
    record = _read(_EVENT, value)
    if record["format"] > FORMAT:
        raise _newer_format(_EVENT, record)
    name, avro_body = record["body"]
    body = _EVENT_BY_RECORD[name]
    return Event(body.type, record["instance_id"], record["seq"], record["ts"], body.from_avro(avro_body))


# --------------------------------------------------------------------------- tasks and definitions


def encode_task(t: Task) -> bytes:
    """Encode an activity task as an Avro single-object value."""
    if type(t.attempt) is not int or not _INT_RANGE[0] <= t.attempt <= _INT_RANGE[1]:
        raise ValueError(f"task: field 'attempt' must be int, got {_describe(t.attempt)}")
    _check_long("task", "scheduled_ms", t.scheduled_ms)
    record = {
        "instance_id": t.instance_id,
        "activity_id": t.activity_id,
        "attempt": t.attempt,
        "name": t.name,
        "queue": t.queue,
        "input": _json_text(t.input, "task input"),
        "workflow": t.workflow,
        "scheduled_ms": t.scheduled_ms,
        "kind": t.kind,
        "report_start": t.report_start,
        "attempt_token": t.attempt_token,
        "priority": t.priority,
        "fairness_key": t.fairness_key,
    }
    return _write(_TASK, record)


def decode_task(value: bytes) -> Task:
    """Decode an Avro single-object task value."""
    record = _read(_TASK, value)
    record["input"] = _parse_json(record["input"], "task input")
    return Task(**record)


def encode_definition(d: Definition) -> bytes:
    """Encode a workflow definition as an Avro single-object value."""
    if type(d.version) is not int or not _INT_RANGE[0] <= d.version <= _INT_RANGE[1]:
        raise ValueError(f"definition: field 'version' must be int, got {_describe(d.version)}")
    if not isinstance(d.body, dict):
        raise ValueError(f"definition: 'body' must be a JSON object, got {type(d.body).__name__}")
    _check_long("definition", "deployed_ms", d.deployed_ms)
    record = {
        "name": d.name,
        "version": d.version,
        "kind": d.kind,
        "body": _json_text(d.body, "definition body"),
        "deployed_ms": d.deployed_ms,
    }
    return _write(_DEFINITION, record)


def decode_definition(value: bytes) -> Definition:
    """Decode an Avro single-object definition value."""
    record = _read(_DEFINITION, value)
    body = _parse_json(record["body"], "definition body")
    if not isinstance(body, dict):
        raise DecodeError(f"definition body must be a JSON object, got {_describe(body)}")
    record["body"] = body
    return Definition(**record)


# --------------------------------------------------------------------------- state


def encode_state(rec: Mapping[str, Any]) -> bytes:
    """Encode a public state record; its JSON fields (``result``, ``search_attributes``,
    ``incidents``, ``position``) are JSON values, None for absent. Optional fields may be left out.

    The compiled encoder checks every type as it writes (the engine writes one record per changed
    instance per transaction, so the checks are not repeated); :func:`_check_state` runs only to
    name the problem of a record that does not fit."""
    record = dict(rec)
    if record.keys() - _STATE_NAMES:
        _check_state(rec)
    try:
        for name in _STATE_JSON:
            value = record.get(name)
            if value is not None:
                record[name] = _dumps(value).decode()
    except TypeError as exc:
        raise ValueError(f"state {name} is not JSON-serialisable: {exc}") from exc
    if record.get("format_version") is None:
        record["format_version"] = STATE_FORMAT
    try:
        return _write(_STATE, record)
    except ValueError:
        _check_state(rec)
        raise


def _check_state(rec: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``rec`` has only State fields, the required ones, with the right basic types."""
    unknown = rec.keys() - _STATE_NAMES
    if unknown:
        raise ValueError(f"state: unknown field(s) {_quoted(unknown)}")
    missing = [f for f in _STATE_REQUIRED if f not in rec]
    if missing:
        raise ValueError(f"state: missing field(s) {_quoted(missing)}")
    for name in ("seq", "started_ms", "updated_ms"):
        _check_long("state", name, rec[name])
    if rec.get("closed_ms") is not None:
        _check_long("state", "closed_ms", rec["closed_ms"])
    for name in ("version", "run", "priority", "format_version"):
        value = rec.get(name)
        if (value is not None or name == "version") and (type(value) is not int
                                                          or not _INT_RANGE[0] <= value <= _INT_RANGE[1]):
            raise ValueError(f"state: field '{name}' must be int, got {_describe(value)}")


def decode_state(value: bytes | None) -> dict[str, Any]:
    """Decode a public state value into a dict; its JSON fields come back as values (None when absent).

    Records of format 1 (written before ``format_version``) decode too, with the fields they lack
    at their defaults (``format_version`` 1, the others None)."""
    record = _read(_STATE, value)
    for name in _STATE_JSON:
        if record[name] is not None:
            record[name] = _parse_json(record[name], f"state {name}")
    return record


def encode_audit_record(record: dict[str, Any]) -> bytes:
    """Frame and encode an audit record (``details`` already JSON text): see :mod:`kflow.security.audit`."""
    return _write(_AUDIT, record)


def decode_audit_record(value: bytes | None) -> dict[str, Any]:
    """Check the framing (single-object or Confluent) and read one audit record (``details`` as JSON text)."""
    return _read(_AUDIT, value)


def encode_engine_state(instance_id: str, state: Mapping[str, Any]) -> bytes:
    """Encode the engine's whole state of one instance for the ``engine-state`` changelog."""
    if not isinstance(state, dict):
        raise ValueError(f"engine state must be a dict, got {_describe(state)}")
    return _write(_ENGINE_STATE, {"instance_id": instance_id, "format_version": ENGINE_STATE_FORMAT,
                                  "state": _json_text(state, "engine state")})


def decode_engine_state(value: bytes | None) -> tuple[str, dict[str, Any]]:
    """Decode an ``engine-state`` value into (instance id, the engine's state dict)."""
    record = _read(_ENGINE_STATE, value)
    if record["format_version"] > ENGINE_STATE_FORMAT:
        raise DecodeError(f"engine state format {record['format_version']} is newer than this kflow "
                          f"({ENGINE_STATE_FORMAT})")
    state = _parse_json(record["state"], "engine state")
    if not isinstance(state, dict):
        raise DecodeError(f"engine state must be a JSON object, got {_describe(state)}")
    return record["instance_id"], state


def _legacy_writer(value: bytes | None) -> dict[str, Any] | None:
    """The writer schema of a state value when it is one with ``internal`` (format 1), else None."""
    if value and value[0] == CONFLUENT_MAGIC:
        writer = _framed_writer(_STATE, value)
    elif value and value[: len(MAGIC)] == MAGIC and len(value) >= _HEADER_LEN:
        writer = _STATE.earlier.get(bytes(value[len(MAGIC) : _HEADER_LEN]))
    else:
        return None
    if writer is None or not any(f["name"] == "internal" for f in writer.get("fields", ())):
        return None
    return writer


def decode_legacy_state(value: bytes | None) -> tuple[str, dict[str, Any]] | None:
    """(instance id, the engine's state) of a public state value written with the ``internal`` field
    (format 1, schemas/previous/state.avsc; single-object or Confluent-framed), or None for a value
    without it. Used to carry that state over to the ``engine-state`` changelog on upgrade.

    Raises:
        DecodeError: the value is not a state record, or its ``internal`` is not a JSON object.
    """
    writer = _legacy_writer(value)
    if writer is None:
        _read(_STATE, value)  # a current record, or DecodeError naming what it is instead
        return None
    assert value is not None
    start = _FRAMED_LEN if value[0] == CONFLUENT_MAGIC else _HEADER_LEN
    buf = BytesIO(value)
    buf.seek(start)
    try:
        record = _reader(buf, writer, writer, True)
    except Exception as exc:  # fastavro reports garbage through many exception types
        raise DecodeError(f"garbled Avro state payload: {type(exc).__name__}: {exc}") from None
    internal = _parse_json(record["internal"], "state internal")
    if not isinstance(internal, dict):
        raise DecodeError(f"state internal must be a JSON object, got {_describe(internal)}")
    return record["instance_id"], internal
