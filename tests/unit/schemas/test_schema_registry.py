"""Confluent Schema Registry framing against confluent-kafka's own client and its in-process ``mock://`` registry:
what kflow writes is read by the stock AvroDeserializer, what the stock AvroSerializer writes is read by kflow,
plain single-object values keep decoding, and an incompatible registered schema stops registration whole."""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from typer.testing import CliRunner

from kflow.cli import app
from kflow.config import KafkaConfig
from kflow.model.errors import DecodeError
from kflow.model.messages import Command, Definition, Event, Task
from kflow.schemas import codec, registry
from kflow.schemas.codec import (
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
from kflow.schemas.registry import SchemaIncompatibleError, activate, client_for, subject
from kflow.security.audit import AuditRecord, decode_audit, encode_audit_fields
from kflow.streams.topics import TopicNames

PREVIOUS = Path(__file__).parents[2] / "data" / "schemas" / "previous"
NAMES = TopicNames("sr.")
SINGLE_OBJECT = b"\xc3\x01"

COMMAND = Command("StartWorkflow", "order-1", {"workflow": "order", "version": 2, "input": {"n": 1}, "parent_id": None,
                                               "parent_ref": None, "id_reuse": "reject", "priority": None},
                  "cmd-1", 1_700_000_000_000)
EVENT = Event("ActivityScheduled", "order-1", 7, 1_700_000_000_000,
              {"activity_id": "a1", "name": "charge", "queue": "payments", "input": {"amount": 10}, "attempt": 1})
STATE = {"instance_id": "order-1", "workflow": "order", "version": 3, "status": "COMPLETED", "seq": 12,
         "started_ms": 1, "updated_ms": 2, "closed_ms": 3, "result": {"ok": True}, "error_type": None,
         "error_message": None, "format_version": 2, "kind": "spec", "tenant": None, "owner": None, "parent_id": None,
         "run": 1, "priority": None, "search_attributes": {"customer": "c1"}, "incidents": None, "position": []}
ENGINE_STATE = ("order-1", {"id": "order-1", "steps": {"a": 1}})
AUDIT = AuditRecord(id="au-1", time=1_700_000_000_000, principal="alice", tenant="acme", action="instance:cancel",
                    resource_type="instance", resource_id="order-1", outcome="granted", details={"rule": "owner"},
                    source="kafka:client-1")
TASK = Task("order-1", "a1", 1, "charge", "payments", {"amount": 10}, "order", 5)
DEFINITION = Definition("order", 2, "spec", {"steps": []}, 9)

#: kind -> (topic, encode(), decode, what the decoded value must equal)
KINDS: dict[str, tuple[str, Any, Any, Any]] = {
    "command": (NAMES.commands, lambda: encode_command(COMMAND), decode_command, COMMAND),
    "event": (NAMES.events, lambda: encode_event(EVENT), decode_event, EVENT),
    "state": (NAMES.state, lambda: encode_state(STATE), decode_state, STATE),
    "task": (NAMES.tasks("default"), lambda: encode_task(TASK), decode_task, TASK),
    "definition": (NAMES.definitions, lambda: encode_definition(DEFINITION), decode_definition, DEFINITION),
    "engine_state": (NAMES.engine_state, lambda: encode_engine_state(*ENGINE_STATE), decode_engine_state, ENGINE_STATE),
    "audit": (NAMES.audit, lambda: encode_audit_fields(AUDIT.model_dump()), decode_audit, AUDIT),
}


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    """Every test starts and ends with single-object framing and no registry client."""
    registry.reset()
    yield
    registry.reset()


def url(request: pytest.FixtureRequest) -> str:
    """A registry of this test's own (one mock registry per URL and process)."""
    return "mock://" + "".join(c if c.isalnum() else "-" for c in request.node.name)


def framed_id(value: bytes) -> int:
    assert value[0] == 0, f"not Confluent-framed: {value[:5].hex()}"
    return int.from_bytes(value[1:5], "big")


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_through_the_registry(kind: str, request: pytest.FixtureRequest) -> None:
    topic, encode, decode, expected = KINDS[kind]
    activate(url(request), NAMES)
    value = encode()
    client = client_for(url(request))
    registered = client.get_latest_version(subject(topic))
    assert framed_id(value) == registered.schema_id
    assert json.loads(registered.schema.schema_str) == json.loads(codec.schema_text(kind))
    assert decode(value) == expected
    # the stock deserializer of confluent-kafka reads it with nothing but the registry
    stock = AvroDeserializer(client)(value, SerializationContext(topic, MessageField.VALUE))
    assert stock == fastavro.schemaless_reader(_payload(value), fastavro.parse_schema(json.loads(codec.schema_text(kind))))
    assert stock[{"command": "command_id", "event": "seq", "state": "status", "task": "activity_id",
                  "definition": "name", "engine_state": "instance_id", "audit": "principal"}[kind]] == {
        "command": "cmd-1", "event": 7, "state": "COMPLETED", "task": "a1", "definition": "order",
        "engine_state": "order-1", "audit": "alice"}[kind]


def _payload(value: bytes) -> BytesIO:
    return BytesIO(value[5:])


def test_every_kflow_topic_gets_a_topic_name_subject(request: pytest.FixtureRequest) -> None:
    activate(url(request), NAMES, [NAMES.tasks("payments"), NAMES.tasks("payments", 1), NAMES.journal, NAMES.dlq])
    subjects = set(client_for(url(request)).get_subjects())
    assert subjects == {"sr.commands-value", "sr.events-value", "sr.state-value", "sr.engine-state-value",
                        "sr.definitions-value", "sr.audit-value", "sr.tasks.default-value", "sr.tasks.payments-value", "sr.tasks.payments.p1-value"}


def test_a_stock_serializer_record_is_read_by_kflow(request: pytest.FixtureRequest) -> None:
    activate(url(request), NAMES)
    client = client_for(url(request))
    serializer = AvroSerializer(client, codec.schema_text("event"), conf={"auto.register.schemas": True})
    record = {"format": 1, "instance_id": "order-1", "seq": 7, "ts": 1_700_000_000_000,
              "body": ("kflow.ActivityScheduled", {"activity_id": "a1", "name": "charge", "queue": "payments",
                                                    "input": '{"amount":10}', "attempt": 1})}
    value = serializer(record, SerializationContext(NAMES.events, MessageField.VALUE))
    assert decode_event(value) == EVENT


@pytest.mark.parametrize("kind", list(KINDS))
def test_plain_single_object_records_still_decode(kind: str, request: pytest.FixtureRequest) -> None:
    _, encode, decode, expected = KINDS[kind]
    plain = encode()
    assert plain[:2] == SINGLE_OBJECT
    activate(url(request), NAMES)
    assert encode()[0] == 0
    assert decode(plain) == expected


def test_without_a_registry_values_stay_single_object() -> None:
    for _, encode, _, _ in KINDS.values():
        assert encode()[:2] == SINGLE_OBJECT


def test_a_previous_release_record_resolves_through_the_registry(request: pytest.FixtureRequest) -> None:
    """A reader meets an id it never registered (an older kflow wrote it): it fetches the schema once and
    resolves the record against the current one."""
    activate(url(request), NAMES)
    previous = (PREVIOUS / "command.avsc").read_text(encoding="utf-8")
    old_id = client_for(url(request)).register_schema("elsewhere-value", Schema(previous, "AVRO"))
    body = {k: v for k, v in COMMAND.data.items() if k != "priority"} | {"input": '{"n":1}'}
    out = BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(json.loads(previous)),
                               {"format": 1, "command_id": "cmd-1", "instance_id": "order-1",
                                "ts": 1_700_000_000_000, "body": ("kflow.StartWorkflow", body)})
    value = b"\x00" + old_id.to_bytes(4, "big") + out.getvalue()
    assert decode_command(value) == COMMAND


def test_an_unknown_schema_id_is_a_decode_error(request: pytest.FixtureRequest) -> None:
    activate(url(request), NAMES)
    value = b"\x00" + (999_999).to_bytes(4, "big") + encode_command(COMMAND)[5:]
    with pytest.raises(DecodeError, match=r"unknown Schema Registry id 999999: the registry at mock://.* does not have it"):
        decode_command(value)


def test_an_id_of_another_kind_is_a_decode_error(request: pytest.FixtureRequest) -> None:
    activate(url(request), NAMES)
    event_value = encode_event(EVENT)
    with pytest.raises(DecodeError, match=r"wrong schema: expected command, got a event value \(Schema Registry id"):
        decode_command(event_value)


def test_an_id_of_a_foreign_schema_is_a_decode_error(request: pytest.FixtureRequest) -> None:
    activate(url(request), NAMES)
    foreign = json.dumps({"type": "record", "name": "Order", "namespace": "shop", "fields": [{"name": "n", "type": "int"}]})
    foreign_id = client_for(url(request)).register_schema("shop.orders-value", Schema(foreign, "AVRO"))
    with pytest.raises(DecodeError, match=r"is the schema of 'shop.Order', not one of kflow's"):
        decode_command(b"\x00" + foreign_id.to_bytes(4, "big") + b"\x02")


def test_a_framed_value_without_a_registry_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match=r"a Confluent Schema Registry value \(id 7\)\? this process has no registry"):
        decode_state(b"\x00\x00\x00\x00\x07" + b"\x00" * 8)


def test_an_incompatible_registered_schema_is_one_error_and_nothing_is_registered(request: pytest.FixtureRequest) -> None:
    """The state subject already holds a version whose records lack ``workflow`` (no default in kflow's schema):
    kflow's schema cannot read them, so registration stops before registering anything and values stay plain."""
    client = client_for(url(request))
    older = json.loads(codec.schema_text("state"))
    older["fields"] = [f for f in older["fields"] if f["name"] != "workflow"]
    client.register_schema(NAMES.state + "-value", Schema(json.dumps(older), "AVRO"))
    with pytest.raises(SchemaIncompatibleError) as caught:
        activate(url(request), NAMES)
    err = caught.value
    assert (err.topic, err.subject) == ("sr.state", "sr.state-value")
    assert "reader_field_missing_default_value" in err.reason and "workflow" in err.reason
    assert "topic 'sr.state'" in str(err) and "nothing was registered or produced" in str(err)
    assert client.get_subjects() == ["sr.state-value"]
    assert encode_command(COMMAND)[:2] == SINGLE_OBJECT


def test_a_compatible_older_version_gets_a_new_version(request: pytest.FixtureRequest) -> None:
    client = client_for(url(request))
    client.register_schema(NAMES.commands + "-value", Schema((PREVIOUS / "command.avsc").read_text(), "AVRO"))
    activate(url(request), NAMES)
    versions = client.get_versions(NAMES.commands + "-value")
    assert len(versions) == (1 if (PREVIOUS / "command.avsc").read_text() == codec.schema_text("command") else 2)
    assert framed_id(encode_command(COMMAND)) == client.get_latest_version(NAMES.commands + "-value").schema_id


def test_a_producer_config_registers_and_frames(request: pytest.FixtureRequest) -> None:
    config = KafkaConfig(schema_registry_url=url(request), topic_prefix="sr.")
    config.producer_conf()
    assert framed_id(encode_command(COMMAND)) == client_for(url(request)).get_latest_version("sr.commands-value").schema_id


def test_a_producer_config_with_an_incompatible_subject_fails(request: pytest.FixtureRequest) -> None:
    client = client_for(url(request))
    wrong = json.loads(codec.schema_text("command"))
    next(f for f in wrong["fields"] if f["name"] == "ts")["type"] = "string"
    client.register_schema("sr.commands-value", Schema(json.dumps(wrong), "AVRO"))
    with pytest.raises(SchemaIncompatibleError, match=r"topic 'sr.commands'.*subject 'sr.commands-value'.*type_mismatch"):
        KafkaConfig(schema_registry_url=url(request), topic_prefix="sr.").producer_conf()


def test_the_registry_url_is_validated() -> None:
    with pytest.raises(ValueError, match="expected http\\(s\\)://host\\[:port\\] or mock://name, but got 'registry:8081'"):
        KafkaConfig(schema_registry_url="registry:8081")
    assert KafkaConfig(schema_registry_url="https://sr.example:8081").topic_settings.schema_registry_url == \
        "https://sr.example:8081"


def test_schemas_check_passes_when_every_registered_schema_is_compatible(request: pytest.FixtureRequest) -> None:
    activate(url(request), NAMES, [NAMES.tasks("payments")])
    result = CliRunner().invoke(app, ["schemas", "check", "--registry", url(request), "--prefix", "sr."])
    assert result.exit_code == 0, result.output
    for topic in (NAMES.commands, NAMES.events, NAMES.state, NAMES.engine_state, NAMES.tasks("payments")):
        assert f"ok           {topic}-value: BACKWARD compatible with registry version 1" in result.output
    assert f"ok           {NAMES.state}-value: BACKWARD compatible with the previous release" in result.output
    assert "INCOMPATIBLE" not in result.output


def test_schemas_check_exits_1_naming_each_incompatible_subject(request: pytest.FixtureRequest) -> None:
    """A registered state version without ``workflow``: kflow's schema cannot read its records."""
    older = json.loads(codec.schema_text("state"))
    older["fields"] = [f for f in older["fields"] if f["name"] != "workflow"]
    client = client_for(url(request))
    client.register_schema(NAMES.state + "-value", Schema(json.dumps(older), "AVRO"))
    result = CliRunner().invoke(app, ["schemas", "check", "--registry", url(request), "--prefix", "sr."])
    assert result.exit_code == 1
    bad = [line for line in result.output.splitlines() if line.startswith("INCOMPATIBLE")]
    assert len(bad) == 1 and bad[0].startswith("INCOMPATIBLE sr.state-value: against registry version 1")
    assert "reader_field_missing_default_value" in bad[0] and "workflow" in bad[0]
    assert "1 incompatible schema(s)" in result.output
    assert client.get_subjects() == ["sr.state-value"]  # nothing registered


def test_schemas_check_compares_with_the_previous_release_without_a_registry(tmp_path: Path) -> None:
    """A previous-release state schema with a field the current one requires and cannot default: exit 1."""
    older = json.loads((PREVIOUS / "state.avsc").read_text(encoding="utf-8"))
    older["fields"] = [f for f in older["fields"] if f["name"] != "status"]
    (tmp_path / "state.avsc").write_text(json.dumps(older), encoding="utf-8")
    result = CliRunner().invoke(app, ["schemas", "check", "--previous", str(tmp_path)],
                                env={"KFLOW_SCHEMA_REGISTRY_URL": ""})
    assert result.exit_code == 1
    assert "INCOMPATIBLE kflow.state-value: against the previous release" in result.output and "status" in result.output
    assert "new          kflow.commands-value: the previous release had no command schema" in result.output
