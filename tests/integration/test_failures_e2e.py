"""Failure semantics end to end: retries with durable backoff timers, and saga compensation."""

from __future__ import annotations

import uuid

import pytest

from kflow.model.errors import WorkflowFailedError
from tests.integration import flows


def uid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def test_retry_then_success(stack):
    c = stack.client
    c.deploy({"name": "retrying", "version": 1, "steps": [
        {"id": "call", "task": "t.flaky", "input": "input", "output": "attempts",
         "retry": {"initial": "100ms", "backoff": 2.0, "max_attempts": 5}}]})
    key = uid("k")
    assert c.start("retrying", {"key": key, "fail": 2}, id=uid("retry")).result(timeout=60) == {"attempts": 3}
    assert flows.FLAKY[key] == 3


def test_saga_compensates_in_reverse_order(stack):
    c = stack.client
    c.deploy({"name": "trip", "version": 1, "steps": [
        {"id": "flight", "task": "t.book", "input": "{'key': input, 'what': 'flight'}", "output": "flight",
         "compensate": {"task": "t.unbook", "input": "flight"}},
        {"id": "hotel", "task": "t.book", "input": "{'key': input, 'what': 'hotel'}", "output": "hotel",
         "compensate": {"task": "t.unbook", "input": "hotel"}},
        {"id": "car", "task": "t.refuse", "input": "input"}]})
    key = uid("trip")
    h = c.start("trip", key, id=key)
    with pytest.raises(WorkflowFailedError) as ei:
        h.result(timeout=60)
    assert ei.value.error_type == "SoldOut"
    assert flows.UNDONE[key] == ["hotel", "flight"]
    assert c.status(key)["internal"]["compensation"] == "completed"
