"""Compile a parsed Avro schema into a specialised encoder and decoder, and nothing else.

fastavro interprets the schema on every call (union tuple notation, named-type lookups, option
handling), which costs several microseconds per record even for a five-field command; kflow writes
several records per command. Here each record schema is walked once into a *plan*: a tuple with
one step per field saying how to write or read it. The record's closure runs through its plan in
one loop, writing strings, ints, longs, booleans and their nullable forms inline (a Python call per
field costs as much as the encoding itself) and calling a nested closure only for enums, records
and unions of records. The bytes are the Avro binary encoding exactly as the specification (and
fastavro) writes it: zig-zag varints for int and long, length-prefixed UTF-8 strings, one byte per
boolean, the branch index before a union value, the symbol index for an enum, record fields in
schema order, and a field's default when the record does not have the field.

Only the shapes kflow's schemas use are compiled: a record whose fields are boolean, int, long,
string, ``["null", X]`` of one of those, enum, record, or a union of records written in fastavro's
tuple notation ``("kflow.Name", {...})`` (decoded back to that tuple, as ``schemaless_reader`` does
with ``return_record_name=True``). Anything else raises :class:`RuntimeError` when the schema is
compiled, so an unsupported schema fails at import instead of producing wrong bytes.

Encoding is stricter than fastavro, never looser: a value of the wrong type raises
:class:`TypeError` (fastavro writes ``None`` as ``false`` and ``1.5`` as ``1``); an int outside its 32
or 64 bits, an unknown enum symbol or union branch and a missing field without a default raise
:class:`ValueError`. Decoding raises :class:`EOFError` when the input ends inside a value,
:class:`UnicodeDecodeError` on invalid UTF-8 and :class:`ValueError` on anything else malformed (a
union index out of range, a negative length, a varint that does not fit its type or goes on past ten
bytes, a boolean byte other than 0 and 1): what it accepts, fastavro reads the same way.

:data:`CODECS` holds the codecs of every ``.avsc`` file next to this module, compiled at import and
keyed by the schema's full name (``kflow.Command``), so a field added to a schema file is picked up
without touching this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import fastavro

__all__ = ["CODECS", "Codec", "compile_schema"]

#: Appends the Avro encoding of one value to the buffer.
Encoder = Callable[[bytearray, Any], None]
#: Reads one value from ``buf`` at ``pos``; returns it and the position after it.
Decoder = Callable[[bytes, int], tuple[Any, int]]


class Codec(NamedTuple):
    """The compiled functions of one record schema."""

    #: The record's full name, e.g. ``kflow.Command``.
    name: str
    #: ``encode(record) -> bytes``: the schemaless Avro payload of ``record``.
    encode: Callable[[Any], bytes]
    #: ``decode(buf, pos) -> (record, pos)``: one record read from ``buf`` at ``pos``.
    decode: Callable[[bytes, int], tuple[Any, int]]


_INT = (-(2**31), 2**31 - 1)
_LONG = (-(2**63), 2**63 - 1)

# Plan step operations. A nullable primitive (union ["null", X]) is _NULLABLE + X's operation.
_STRING, _INTEGER, _BOOLEAN, _CALL, _NULLABLE = 0, 1, 2, 3, 4
_PRIMITIVE_OPS = {"string": _STRING, "int": _INTEGER, "long": _INTEGER, "boolean": _BOOLEAN}
_RANGES = {"int": _INT, "long": _LONG}


def compile_schema(schema: dict[str, Any]) -> Codec:
    """Compile a record ``schema`` (raw or as ``fastavro.parse_schema`` returns it) into a :class:`Codec`."""
    parsed = fastavro.parse_schema(schema)
    if not isinstance(parsed, dict) or _type_of(parsed) != "record":
        raise RuntimeError(f"only record schemas are compiled, not {_type_of(parsed)!r}")
    encode_record = _record_encoder(parsed, "")
    decode_record = _record_decoder(parsed, "")

    def encode(record: Any) -> bytes:
        out = bytearray()
        encode_record(out, record)
        return bytes(out)

    def decode(buf: bytes, pos: int) -> tuple[Any, int]:
        if type(buf) is not bytes:
            buf = bytes(buf)
        try:
            return decode_record(buf, pos)
        except IndexError:  # only reading a byte past the end raises it: indexes into tables are checked
            raise EOFError(f"{parsed['name']}: the input ends inside a value") from None

    return Codec(parsed["name"], encode, decode)


# --------------------------------------------------------------------------- schema shapes


def _type_of(schema: Any) -> str:
    """The Avro type of a schema node: a primitive name, ``record``, ``enum`` or ``union``."""
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        if "logicalType" in schema:
            raise RuntimeError(f"unsupported Avro logical type {schema['logicalType']!r}")
        inner = schema["type"]
        return inner if isinstance(inner, str) else repr(inner)  # a nested type object is not compiled
    return str(schema)


def _path(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _field_op(schema: Any, where: str) -> tuple[int, str, tuple[int, int]]:
    """How a field of type ``schema`` is written and read: its operation, what its values must
    be (for error messages) and its integer range; ``_CALL`` for the shapes with their own closure."""
    typ = _type_of(schema)
    if typ in _PRIMITIVE_OPS:
        return _PRIMITIVE_OPS[typ], typ, _RANGES.get(typ, _LONG)
    if typ in ("record", "enum"):
        return _CALL, typ, _LONG
    if typ == "union":
        types = [_type_of(b) for b in schema]
        if types and all(t == "record" for t in types):
            return _CALL, "union", _LONG
        if len(types) == 2 and types[0] == "null" and types[1] in _PRIMITIVE_OPS:
            return _NULLABLE + _PRIMITIVE_OPS[types[1]], f"{types[1]} or null", _RANGES.get(types[1], _LONG)
    raise RuntimeError(f"unsupported Avro type {_describe_schema(schema)} of field '{where}' (compiled: boolean, "
                       "int, long, string, [\"null\", one of those], enum, record, union of records)")


def _describe_schema(schema: Any) -> str:
    if isinstance(schema, list):
        return "[" + ", ".join(_describe_schema(b) for b in schema) + "]"
    if isinstance(schema, dict):
        return repr(schema.get("name", schema["type"]))
    return repr(schema)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------- encoding


def _record_encoder(schema: dict[str, Any], where: str) -> Encoder:
    """Encode a record by running through its plan: ``(name, op, lo, hi, call, default)`` per field;
    ``default`` holds the encoded default (None when the field has none)."""
    plan: list[tuple[str, int, int, int, Any, bytes | None]] = []
    wants = {}
    for f in schema["fields"]:
        path = _path(where, f["name"])
        op, wants[f["name"]], (lo, hi) = _field_op(f["type"], path)
        call = _nested_encoder(f["type"], path) if op == _CALL else None
        default = _encoded_default(f, where) if "default" in f else None
        plan.append((f["name"], op, lo, hi, call, default))
    steps = tuple(plan)
    what = f"record '{where}'" if where else f"record {_short(schema['name'])}"

    def encode_record(out: bytearray, record: Any) -> None:
        if type(record) is not dict and not isinstance(record, Mapping):
            raise TypeError(f"{what} must be a mapping, got {_kind(record)}")
        append = out.append
        for name, op, lo, hi, call, default in steps:
            try:
                value = record[name]
            except KeyError:
                if default is None:
                    raise ValueError(f"field '{_path(where, name)}': no value and no default") from None
                out += default
                continue
            if op >= _NULLABLE:  # ["null", X]: branch 0 is null, branch 1 is X
                if value is None:
                    append(0)
                    continue
                append(2)
                op -= _NULLABLE
            if op == _STRING:
                if type(value) is not str and not isinstance(value, str):
                    raise _mismatch(where, name, wants[name], value)
                try:
                    raw = value.encode()
                except UnicodeEncodeError as exc:  # a lone surrogate
                    raise ValueError(f"field '{_path(where, name)}' has no UTF-8 encoding: {exc}") from None
                n = len(raw)
                if n < 64:  # the zig-zag varint of 0..63 is one byte
                    append(n << 1)
                else:
                    _put_long(out, n)
                out += raw
            elif op == _INTEGER:
                if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
                    raise _mismatch(where, name, wants[name], value)
                if 0 <= value < 64:
                    append(value << 1)
                elif lo <= value <= hi:
                    n = (value << 1) ^ (value >> 63)
                    while n > 0x7F:
                        append(n & 0x7F | 0x80)
                        n >>= 7
                    append(n)
                else:
                    raise _mismatch(where, name, wants[name], value)
            elif op == _BOOLEAN:
                if value is True:
                    append(1)
                elif value is False:
                    append(0)
                else:
                    raise _mismatch(where, name, wants[name], value)
            else:
                call(out, value)

    return encode_record


def _mismatch(where: str, name: str, want: str, value: Any) -> Exception:
    """The error for a value that does not fit its field: TypeError, or ValueError for an int out of range."""
    if type(value) is int:
        return ValueError(f"field '{_path(where, name)}' must be {want}, got {value} (out of range)")
    return TypeError(f"field '{_path(where, name)}' must be {want}, got {_kind(value)}")


def _put_long(out: bytearray, value: int) -> None:
    """Append the zig-zag varint of a long already known to be in range."""
    n = (value << 1) ^ (value >> 63)
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)


def _encoded_default(field: dict[str, Any], where: str) -> bytes:
    """The bytes of a field's default, written whenever a record lacks the field."""
    alone = {"name": "default", "fields": [{"name": field["name"], "type": field["type"]}]}
    out = bytearray()
    try:
        _record_encoder(alone, where)(out, {field["name"]: field["default"]})
    except (TypeError, ValueError) as exc:
        raise RuntimeError(f"the default of field '{_path(where, field['name'])}' does not fit its type: {exc}") from None
    return bytes(out)


def _nested_encoder(schema: Any, where: str) -> Encoder:
    typ = _type_of(schema)
    if typ == "record":
        return _record_encoder(schema, where)
    if typ == "enum":
        return _enum_encoder(schema["symbols"], where)
    return _records_union_encoder(schema, where)


def _enum_encoder(symbols: list[str], where: str) -> Encoder:
    index = {s: _varint(i) for i, s in enumerate(symbols)}

    def encode_enum(out: bytearray, value: Any) -> None:
        head = index.get(value) if type(value) is str else None
        if head is None:
            raise ValueError(f"field '{where}' must be one of {symbols}, got {value!r}")
        out += head

    return encode_enum


def _records_union_encoder(branches: list[dict[str, Any]], where: str) -> Encoder:
    """A union of records, given in tuple notation ``(full record name, record)``."""
    table = {b["name"]: (_varint(i), _record_encoder(b, f"{where}[{_short(b['name'])}]"))
             for i, b in enumerate(branches)}

    def encode_branch(out: bytearray, value: Any) -> None:
        if type(value) is not tuple or len(value) != 2:
            raise TypeError(f"field '{where}' must be a (record name, record) tuple, got {_kind(value)}")
        name, record = value
        branch = table.get(name) if type(name) is str else None
        if branch is None:
            raise ValueError(f"field '{where}': {name!r} is not one of the union's records")
        out += branch[0]
        branch[1](out, record)

    return encode_branch


def _varint(value: int) -> bytes:
    out = bytearray()
    _put_long(out, value)
    return bytes(out)


# --------------------------------------------------------------------------- decoding


def _record_decoder(schema: dict[str, Any], where: str) -> Decoder:
    """Decode a record by running through its plan: ``(name, op, lo, hi, call)`` per field."""
    plan: list[tuple[str, int, int, int, Any]] = []
    for f in schema["fields"]:
        path = _path(where, f["name"])
        op, _, (lo, hi) = _field_op(f["type"], path)
        call = _nested_decoder(f["type"], path) if op == _CALL else None
        plan.append((f["name"], op, lo, hi, call))
    steps = tuple(plan)

    def decode_record(buf: bytes, pos: int) -> tuple[dict[str, Any], int]:
        record: dict[str, Any] = {}
        size = len(buf)
        for name, op, lo, hi, call in steps:
            if op >= _NULLABLE:
                b = buf[pos]
                pos += 1
                if b == 0:
                    record[name] = None
                    continue
                if b != 2:
                    raise ValueError(f"field '{_path(where, name)}': union branch byte {b} is neither 0 nor 2")
                op -= _NULLABLE
            if op == _STRING:
                n = buf[pos]
                if n < 0x80:
                    n = (n >> 1) ^ -(n & 1)
                    pos += 1
                else:
                    n, pos = _read_long(buf, pos)
                end = pos + n
                if end > size or n < 0:
                    raise _bad_length(where, name, n)
                record[name] = buf[pos:end].decode()
                pos = end
            elif op == _INTEGER:
                b = buf[pos]
                pos += 1
                if b < 0x80:
                    record[name] = (b >> 1) ^ -(b & 1)
                    continue
                n = b & 0x7F
                shift = 7
                while True:  # _read_long inlined: timestamps take six bytes
                    b = buf[pos]
                    pos += 1
                    n |= (b & 0x7F) << shift
                    if b < 0x80:
                        break
                    shift += 7
                    if shift > 63:
                        raise ValueError(f"field '{_path(where, name)}': a varint longer than 10 bytes")
                value = (n >> 1) ^ -(n & 1)
                if not lo <= value <= hi:
                    raise ValueError(f"field '{_path(where, name)}': {value} is out of range")
                record[name] = value
            elif op == _BOOLEAN:
                b = buf[pos]
                if b > 1:
                    raise ValueError(f"field '{_path(where, name)}': boolean byte {b} is neither 0 nor 1")
                record[name] = b == 1
                pos += 1
            else:
                record[name], pos = call(buf, pos)
        return record, pos

    return decode_record


def _bad_length(where: str, name: str, n: int) -> Exception:
    """A negative string length is malformed input; one running past the end, a truncated input."""
    if n < 0:
        return ValueError(f"field '{_path(where, name)}': negative string length {n}")
    return EOFError(f"field '{_path(where, name)}': a string of {n} bytes runs past the end of the input")


def _read_long(buf: bytes, pos: int) -> tuple[int, int]:
    """One zig-zag varint at ``pos``: the long and the position after it."""
    n = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")
    value = (n >> 1) ^ -(n & 1)
    if not _LONG[0] <= value <= _LONG[1]:
        raise ValueError(f"varint {value} does not fit a long")
    return value, pos


def _nested_decoder(schema: Any, where: str) -> Decoder:
    typ = _type_of(schema)
    if typ == "record":
        return _record_decoder(schema, where)
    if typ == "enum":
        return _enum_decoder(schema["symbols"], where)
    return _records_union_decoder(schema, where)


def _index(buf: bytes, pos: int, count: int, where: str) -> tuple[int, int]:
    """A union branch or enum symbol index, checked against ``count``."""
    index, pos = _read_long(buf, pos)
    if not 0 <= index < count:
        raise ValueError(f"field '{where}': index {index} is not below {count}")
    return index, pos


def _enum_decoder(symbols: list[str], where: str) -> Decoder:
    table = tuple(symbols)

    def decode_enum(buf: bytes, pos: int) -> tuple[str, int]:
        index, pos = _index(buf, pos, len(table), where)
        return table[index], pos

    return decode_enum


def _records_union_decoder(branches: list[dict[str, Any]], where: str) -> Decoder:
    table = tuple((b["name"], _record_decoder(b, f"{where}[{_short(b['name'])}]")) for b in branches)
    by_byte = {2 * i: branch for i, branch in enumerate(table) if 2 * i < 0x80}  # one-byte branch indexes

    def decode_branch(buf: bytes, pos: int) -> tuple[tuple[str, dict[str, Any]], int]:
        branch = by_byte.get(buf[pos])
        if branch is None:
            index, pos = _index(buf, pos, len(table), where)
            branch = table[index]
        else:
            pos += 1
        name, decode = branch
        record, pos = decode(buf, pos)
        return (name, record), pos

    return decode_branch


# --------------------------------------------------------------------------- this package's schemas


def _compile_package_schemas() -> dict[str, Codec]:
    """Compile every ``.avsc`` file next to this module, keyed by the schema's full name."""
    out = {}
    for path in sorted(Path(__file__).parent.glob("*.avsc")):
        codec = compile_schema(json.loads(path.read_text(encoding="utf-8")))
        out[codec.name] = codec
    return out


#: The codec of each of kflow's schemas, by full name (``kflow.Command``, ``kflow.Task``, ...).
CODECS: dict[str, Codec] = _compile_package_schemas()
