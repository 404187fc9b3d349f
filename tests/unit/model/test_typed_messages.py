"""The typed command and event models agree with the Avro unions and the field lists, and round-trip."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kflow.schemas
from kflow.model import commands, events
from kflow.model.messages import (
    COMMAND_FIELDS,
    EVENT_FIELDS,
    Command,
    Event,
    RejectCode,
    field_names,
)
from kflow.schemas.codec import decode_command, decode_event, encode_command, encode_event

SCHEMAS = Path(kflow.schemas.__file__).resolve().parent
AVRO_TO_PY = {"string": str, "int": int, "long": int, "boolean": bool}

KINDS = {
    "command": (commands.COMMAND_TYPES, COMMAND_FIELDS),
    "event": (events.EVENT_TYPES, EVENT_FIELDS),
}


def _branches(kind: str) -> list[dict[str, Any]]:
    raw = json.loads((SCHEMAS / f"{kind}.avsc").read_text(encoding="utf-8"))
    body = next(f for f in raw["fields"] if f["name"] == "body")
    return list(body["type"])


def _cases() -> list[tuple[str, dict[str, Any]]]:
    return [(kind, rec) for kind in KINDS for rec in _branches(kind)]


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


@pytest.mark.parametrize(("kind", "record"), _cases(), ids=lambda x: x["name"] if isinstance(x, dict) else x)
def test_model_matches_avro_branch(kind: str, record: dict[str, Any]) -> None:
    registry, vocabulary = KINDS[kind]
    cls = registry[record["name"]]
    assert cls.__name__ == record["name"] == cls.TYPE
    payloads = {s[1:] for s in vocabulary[cls.TYPE] if s.startswith("*")}
    hints = typing.get_type_hints(cls)
    model_fields = {f.name: f for f in dataclasses.fields(cls)}
    assert list(model_fields) == [f["name"] for f in record["fields"]]
    for af in record["fields"]:
        name, avro_type = af["name"], af["type"]
        hint, mf = hints[name], model_fields[name]
        if name in payloads:
            assert avro_type == "string", f"{cls.TYPE}.{name}: payloads travel as JSON text"
            assert cls.__annotations__[name] == "JSONValue", f"{cls.TYPE}.{name} is a payload: expected JSONValue"
            assert set(typing.get_args(hint)) >= {type(None), bool, int, float, str}
            continue
        nullable = isinstance(avro_type, list)
        assert _is_optional(hint) == nullable, f"{cls.TYPE}.{name}: optionality differs from the schema"
        prim = next(t for t in avro_type if t != "null") if nullable else avro_type
        allowed = {a for a in typing.get_args(hint) if a is not type(None)} if _is_optional(hint) else {hint}
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and not nullable:
            allowed = set(typing.get_args(hint))
        assert all(isinstance(a, type) and issubclass(a, AVRO_TO_PY[prim]) for a in allowed), (
            f"{cls.TYPE}.{name}: {hint} does not fit Avro {prim}")
        if "default" in af:
            assert mf.default == af["default"], f"{cls.TYPE}.{name}: default differs from the schema"
        else:
            assert mf.default is dataclasses.MISSING, f"{cls.TYPE}.{name}: the schema has no default"


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_type_has_a_class_and_back(kind: str) -> None:
    registry, vocabulary = KINDS[kind]
    assert set(registry) == set(vocabulary) == {r["name"] for r in _branches(kind)}
    for name, spec in vocabulary.items():
        assert tuple(f.name for f in dataclasses.fields(registry[name])) == field_names(spec)
    module = commands if kind == "command" else events
    union = module.AnyCommand if kind == "command" else module.AnyEvent
    assert set(typing.get_args(union)) == set(registry.values())


def test_unknown_and_missing_fields_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"SignalWorkflow: unknown field\(s\) 'dta'"):
        Command("SignalWorkflow", "i-1", {"name": "go", "dta": 1}).typed()
    with pytest.raises(ValueError, match=r"FailActivity: missing field\(s\) 'retryable'"):
        Command("FailActivity", "i-1", {"activity_id": "a", "attempt": 1, "error_type": "E", "message": "m"}).typed()
    with pytest.raises(ValueError, match="unknown command type 'Nope'"):
        Command("Nope", "i-1", {}).typed()
    with pytest.raises(ValueError, match=r"WorkflowCompleted: unknown field\(s\) 'x'"):
        Event("WorkflowCompleted", "i-1", 1, 0, {"result": 1, "x": 2}).typed()
    with pytest.raises(ValueError, match="unknown event type 'Nope'"):
        Event("Nope", "i-1", 1, 0, {}).typed()
    with pytest.raises(TypeError):
        commands.StartWorkflow(workflow="wf", inptu={})  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="not a command model"):
        commands.command(events.WorkflowCompleted(result=1), "i-1")  # type: ignore[arg-type]


def test_models_are_frozen() -> None:
    model = commands.CancelWorkflow(reason="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.reason = "y"  # type: ignore[misc]
    ev = events.TimerFired(timer_id="t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.timer_id = "u"  # type: ignore[misc]
    assert not hasattr(model, "__dict__")  # slotted


def test_defaults_follow_the_schema() -> None:
    start = commands.StartWorkflow(workflow="wf", input={"n": 1})
    assert (start.version, start.parent_id, start.priority) == (None, None, None)
    assert commands.RetryWorkflow(input_patch=None, reason="r", by="ops").force is False
    assert events.TimerStarted(timer_id="t", due_ms=5).purpose == ""


_SAMPLE = {str: "x", int: 1, bool: True}


@pytest.mark.parametrize("type_", sorted(commands.COMMAND_TYPES))
def test_a_missing_command_payload_is_null_as_the_json_codec_reads_it(type_: str) -> None:
    cls = commands.COMMAND_TYPES[type_]
    payloads = {s[1:] for s in COMMAND_FIELDS[type_] if s.startswith("*")}
    hints = typing.get_type_hints(cls)
    others: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in payloads:
            assert f.default is None, f"{type_}.{f.name}: a payload left out is null"
        else:
            others[f.name] = None if _is_optional(hints[f.name]) else _SAMPLE[hints[f.name]]
    # a JSON command that leaves every payload out: the codec reads them as null, the model builds the same
    decoded = decode_command(json.dumps({"type": type_, "instance_id": "i-1", **others}).encode(),
                             {"content-type": "application/json"})
    assert decoded.typed() == commands.from_data(type_, others)
    assert commands.to_data(commands.from_data(type_, others)) == {**dict.fromkeys(payloads), **others}


def test_reject_code_is_the_enum() -> None:
    ev = Event("CommandRejected", "i-1", 3, 0, {"command_type": "CancelWorkflow", "code": "NOT_FOUND", "reason": "r"})
    model = ev.typed()
    assert isinstance(model, events.CommandRejected)
    assert model.code is RejectCode.NOT_FOUND
    # A code from a newer version stays the text it was.
    later = Event("CommandRejected", "i-1", 3, 0, {"command_type": "X", "code": "SOMETHING_NEW", "reason": "r"})
    assert later.typed() == events.CommandRejected(command_type="X", code="SOMETHING_NEW", reason="r")


# --------------------------------------------------------------------------- generated round trips

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_PRIM = {
    "string": st.text(max_size=10),
    "int": st.integers(-(2**31), 2**31 - 1),
    "long": st.integers(-(2**63), 2**63 - 1),
    "boolean": st.booleans(),
}


def _data_for(kind: str, record: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    vocabulary = KINDS[kind][1]
    payloads = {s[1:] for s in vocabulary[record["name"]] if s.startswith("*")}
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for af in record["fields"]:
        t = af["type"]
        if af["name"] in payloads:
            parts[af["name"]] = _json
        elif isinstance(t, list):
            parts[af["name"]] = st.none() | _PRIM[next(x for x in t if x != "null")]
        elif af["name"] == "code" and record["name"] == "CommandRejected":
            parts[af["name"]] = st.sampled_from(list(RejectCode)).map(str) | st.text(max_size=10)
        else:
            parts[af["name"]] = _PRIM[t]
    return st.fixed_dictionaries(parts)


_all_commands = st.one_of(*[
    _data_for("command", r).map(lambda d, n=r["name"]: (n, d)) for r in _branches("command")
])
_all_events = st.one_of(*[_data_for("event", r).map(lambda d, n=r["name"]: (n, d)) for r in _branches("event")])


@settings(max_examples=300, deadline=None)
@given(_all_commands)
def test_command_round_trip(case: tuple[str, dict[str, Any]]) -> None:
    type_, data = case
    cmd = Command(type_, "inst-1", data, "cid-1", 42)
    model = cmd.typed()
    assert type(model) is commands.COMMAND_TYPES[type_]
    assert commands.command(model, "inst-1", command_id="cid-1", ts=42) == cmd
    # Through the wire: encode, decode, then type.
    assert decode_command(encode_command(cmd)).typed() == model


@settings(max_examples=300, deadline=None)
@given(_all_events)
def test_event_round_trip(case: tuple[str, dict[str, Any]]) -> None:
    type_, data = case
    ev = Event(type_, "inst-1", 7, 99, data)
    model = ev.typed()
    assert type(model) is events.EVENT_TYPES[type_]
    assert events.event(model, "inst-1", seq=7, ts=99) == ev
    assert decode_event(encode_event(ev)).typed() == model


def test_decoded_command_types_precisely() -> None:
    model = commands.StartWorkflow(workflow="orders", input={"total": 12}, priority=2)
    value = encode_command(commands.command(model, "order-7", command_id="c-1", ts=5))
    decoded = decode_command(value)
    assert (decoded.type, decoded.instance_id, decoded.command_id, decoded.ts) == ("StartWorkflow", "order-7", "c-1", 5)
    assert decoded.typed() == model
    match decoded.typed():
        case commands.StartWorkflow(workflow=wf, input=payload):
            assert (wf, payload) == ("orders", {"total": 12})
        case _:
            pytest.fail("expected StartWorkflow")
