"""Public ``state`` records as the release before ``engine-state`` wrote them: the schema of
``kflow/schemas/previous/state.avsc`` (the engine's whole state as JSON text in ``internal``), framed as
the codec frames values (Avro single-object encoding, or Confluent framing with a registry schema id)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

import kflow.schemas

PREVIOUS_STATE_TEXT = (Path(kflow.schemas.__file__).parent / "previous" / "state.avsc").read_text(encoding="utf-8")
_SCHEMA = fastavro.parse_schema(json.loads(PREVIOUS_STATE_TEXT))
_HEADER = b"\xc3\x01" + bytes.fromhex(fingerprint(to_parsing_canonical_form(_SCHEMA), "CRC-64-AVRO"))


def encode_legacy_state(st: dict[str, Any], schema_id: Optional[int] = None) -> bytes:
    """The earlier release's ``state`` value of engine state ``st`` (its ``id``, ``workflow``, ...)."""
    err = st.get("error") or {}
    record = {"instance_id": st["id"], "workflow": st["workflow"], "version": st["version"],
              "status": str(st["status"]), "seq": st["seq"], "started_ms": st["started_ms"],
              "updated_ms": st["updated_ms"], "closed_ms": st.get("closed_ms"),
              "result": None if st.get("result") is None else json.dumps(st["result"]),
              "error_type": err.get("type"), "error_message": err.get("message"), "internal": json.dumps(st)}
    out = io.BytesIO()
    fastavro.schemaless_writer(out, _SCHEMA, record)
    header = _HEADER if schema_id is None else b"\x00" + schema_id.to_bytes(4, "big")
    return header + out.getvalue()
