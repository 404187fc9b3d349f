"""The data converter: rich Python values to JSON and back, by annotation."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kflow._worker.output import result_command
from kflow.converter import ConversionError, from_json, input_type, return_type, to_json
from kflow.model.messages import Task
from kflow.schemas.codec import decode_command
from kflow.streams.activities import build_registry


class Size(Enum):
    S = "s"
    L = "l"


@dataclass
class Line:
    sku: str
    qty: int
    size: Size = Size.S


class Order(pydantic.BaseModel):
    id: uuid.UUID
    at: datetime
    lines: list[Line]
    tags: set[str] = set()


def test_rich_values_round_trip_through_json():
    order = Order(id=uuid.uuid4(), at=datetime(2026, 12, 6, 8, 30, tzinfo=UTC),
                  lines=[Line("A-1", 2), Line("B-2", 1, Size.L)], tags={"vip"})
    data = to_json(order)
    assert data["lines"][1] == {"sku": "B-2", "qty": 1, "size": "l"} and data["id"] == str(order.id)
    assert from_json(data, Order) == order
    assert from_json(to_json([Line("x", 1)]), list[Line]) == [Line("x", 1)]


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda kids: st.lists(kids) | st.dictionaries(st.text(), kids), max_leaves=20))
def test_plain_json_passes_through_unchanged(value: Any):
    assert to_json(value) == value
    assert from_json(value, None) is value and from_json(value, Any) is value


def test_a_value_that_does_not_fit_names_where_it_came_from():
    with pytest.raises(ConversionError, match="input of activity 'charge'.*not a valid Line"):
        from_json({"sku": "A"}, Line, "input of activity 'charge'")
    with pytest.raises(ConversionError, match="cannot be turned into JSON"):
        to_json(object(), "the result")


def test_annotations_are_read_from_functions():
    def charge(line: Line) -> Order: ...

    def untyped(x): ...

    assert input_type(charge) is Line and return_type(charge) is Order
    assert input_type(untyped) is None and return_type(untyped) is None


def test_a_worker_converts_an_activity_input_and_result():
    def price(line: Line) -> dict:
        return {"total": line.qty * 2, "size": line.size}

    d = build_registry({"price": price})["default"]["price"]
    assert d.call({"sku": "A", "qty": 3, "size": "l"}) == {"total": 6, "size": Size.L}
    task = Task("i-1", "a1", 1, "price", "default", None, "wf", 0)
    value, outcome = result_command(task, d.call({"sku": "A", "qty": 3}))
    assert decode_command(value).data["result"] == {"total": 6, "size": "s"} and outcome == "completed"
    with pytest.raises(ConversionError) as e:
        d.call({"qty": "many"})
    assert e.value.type == "InvalidValue" and e.value.retryable is False


def test_a_code_workflow_names_itself_and_types_its_handle():
    import kflow
    from kflow.client import _workflow_name

    @kflow.workflow(name="conv-typed")
    async def typed(ctx, input: Order) -> list[Line]:
        return []

    @kflow.workflow(name="conv-class")
    class Typed:
        async def run(self, ctx, input) -> Order: ...

    assert _workflow_name(typed) == ("conv-typed", list[Line])
    assert _workflow_name(Typed) == ("conv-class", Order)
    assert _workflow_name("by-name") == ("by-name", None)
    with pytest.raises(TypeError, match="decorated with @kflow.workflow"):
        _workflow_name(print)
