"""The audit record: one line of who did what to which resource, and whether it was allowed.

Records travel on the ``audit`` topic (key = resource id) as Avro, framed like every other kflow
value by :mod:`kflow.schemas.codec`: single-object encoding (``C3 01``, the CRC-64-AVRO
fingerprint of ``kflow/schemas/audit.avsc``, the schemaless payload), so any consumer holding the
``.avsc`` file can read them, or the Confluent wire format with a Schema Registry configured. ``details`` is a JSON object carried as JSON text, like workflow payloads.
Records are written with the compiled encoder of :mod:`kflow.schemas.fastcodec` (the engine writes
one per audited command, from a plain dict: :func:`encode_audit_fields`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import fastavro
import orjson
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from kflow.model.errors import DecodeError
from kflow.schemas.codec import decode_audit_record, encode_audit_record

__all__ = ["AUDIT_SCHEMA", "AuditOutcome", "AuditRecord", "decode_audit", "encode_audit", "encode_audit_fields"]

#: ``granted``/``denied``: an authorization decision; ``success``: a mutating operation that completed.
AuditOutcome = Literal["granted", "denied", "success"]

_RAW_SCHEMA: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "schemas" / "audit.avsc").read_text(encoding="utf-8"))
#: The parsed Avro schema of audit records.
AUDIT_SCHEMA = fastavro.parse_schema(_RAW_SCHEMA)
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1


class AuditRecord(BaseModel):
    """One audited operation or denial."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, description="Unique id of the record (derived from the command id where there is one).")
    time: int = Field(ge=_LONG_MIN, le=_LONG_MAX, description="When, in epoch milliseconds.")
    principal: str = Field(description="Who acted; empty when no valid token named anyone.")
    tenant: str = Field(description="The tenant the operation was in.")
    action: str = Field(description="The operation (an ACTIONS name such as start, cancel, dlq_replay).")
    resource_type: str = Field(description="definition, instance, activity or system.")
    resource_id: str = Field(description="The resource's id: definition name, instance id, ...")
    outcome: AuditOutcome = Field(description="granted, denied or success.")
    details: dict[str, JsonValue] = Field(default_factory=dict, description="Anything else worth keeping: the "
                                          "reason of a denial, the command id, the rule that allowed it.")
    source: str = Field("", description="IP and user agent of an HTTP request, or the Kafka client id of a command.")


def encode_audit(record: AuditRecord) -> bytes:
    """An audit record as an Avro single-object value.

    Raises:
        ValueError: ``details`` is not JSON-serialisable.
    """
    return encode_audit_fields(record.model_dump())


def encode_audit_fields(fields: dict[str, Any]) -> bytes:
    """The value :func:`encode_audit` makes of the record with these fields (``details`` a dict),
    without building the model: the caller vouches for what the model checks (a non-empty ``id``).

    Raises:
        ValueError: ``details`` is not JSON-serialisable, ``outcome`` is not an :data:`AuditOutcome`,
            or ``time`` is out of range.
        TypeError: a field of the wrong type.
    """
    try:
        details = orjson.dumps(fields["details"]).decode()
    except TypeError as exc:
        raise ValueError(f"cannot encode audit record {fields.get('id')!r}: details are not JSON-serialisable: "
                         f"{exc}") from exc
    return encode_audit_record({**fields, "details": details})


def decode_audit(value: bytes) -> AuditRecord:
    """Read an audit record value.

    Raises:
        DecodeError: not an audit record, truncated or garbled, or fields that do not validate.
    """
    data = decode_audit_record(value)  # single-object or Confluent framing, as the codec reads every kind
    try:
        data["details"] = orjson.loads(data["details"])
        return AuditRecord.model_validate(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"audit record: 'details' is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise DecodeError(f"audit record does not validate: {' '.join(str(exc).split())}") from None
