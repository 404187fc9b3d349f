"""The pure parts of the upgrade to the ``engine-state`` changelog: decoding the earlier release's
``state`` records (single-object and Confluent-framed) and planning what to copy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kflow.model.errors import DecodeError
from kflow.schemas import codec
from kflow.schemas.codec import decode_legacy_state, encode_state
from kflow.streams.restore import DELETED, NO_INTERNAL, UpgradeRequired, plan_engine_state_copy
from kflow.testing.harness import EngineHarness
from tests.legacy_state import PREVIOUS_STATE_TEXT, encode_legacy_state

WAIT = {"name": "up.wait", "version": 1, "steps": [{"id": "w", "wait": {"signal": "go"}}]}


@pytest.fixture
def engine_state() -> dict[str, Any]:
    h = EngineHarness()
    h.deploy(WAIT)
    h.start("up.wait", "u1", {"n": 1})
    return h.states["u1"]


@pytest.fixture
def registry_ids() -> Iterator[None]:
    yield
    codec.use_single_object()


def test_a_record_with_internal_gives_back_the_engine_state(engine_state: dict[str, Any]) -> None:
    value = encode_legacy_state(engine_state)
    assert decode_legacy_state(value) == ("u1", engine_state)
    assert codec.decode_state(value)["status"] == engine_state["status"]  # readers of the public record still read it


def test_a_confluent_framed_record_with_internal_decodes_too(engine_state: dict[str, Any], registry_ids: None) -> None:
    codec.known_schema_id(4711, "state", PREVIOUS_STATE_TEXT)
    assert decode_legacy_state(encode_legacy_state(engine_state, schema_id=4711)) == ("u1", engine_state)


def test_a_current_record_has_no_internal_and_garbage_is_an_error(engine_state: dict[str, Any]) -> None:
    current = encode_state({"instance_id": "u2", "workflow": "w", "version": 1, "status": "RUNNING", "seq": 1,
                            "started_ms": 1, "updated_ms": 1})
    assert decode_legacy_state(current) is None
    with pytest.raises(DecodeError, match="bad magic"):
        decode_legacy_state(b"\x07garbage")
    with pytest.raises(DecodeError):
        decode_legacy_state(encode_legacy_state(engine_state)[:-3])  # truncated


def test_the_plan_copies_only_what_engine_state_lacks_per_partition() -> None:
    latest = {b"a": (0, ("a", {"id": "a"})), b"b": (1, ("b", {"id": "b"})), b"c": (1, ("c", {"id": "c"})),
              b"d": (0, NO_INTERNAL), b"e": (2, DELETED), b"f": (2, ("f", {"id": "f"}))}
    writes, summary = plan_engine_state_copy(latest, present={b"c", b"f"})
    assert writes == {0: [(b"a", "a", {"id": "a"})], 1: [(b"b", "b", {"id": "b"})]}
    assert (summary.copied, summary.present, summary.without_internal, summary.deleted) == (2, 2, 1, 1)
    assert summary.by_partition == {0: 1, 1: 1}
    again, second = plan_engine_state_copy(latest, present={b"a", b"b", b"c", b"f"})
    assert again == {} and second.copied == 0 and second.present == 4


def test_the_start_up_error_names_the_command() -> None:
    err = UpgradeRequired("p.state", "p.engine-state", "u1")
    assert "kflow upgrade engine-state" in str(err) and "'u1'" in str(err) and err.instance_id == "u1"
