"""Dataclasses and pydantic models end to end: client input → activity argument → result → typed handle."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pydantic

from kflow.worker import activity


@dataclass
class Line:
    sku: str
    qty: int
    price: float


class Order(pydantic.BaseModel):
    order_id: str
    lines: list[Line]


class Receipt(pydantic.BaseModel):
    order_id: str
    total: float
    skus: list[str]


@activity("conv.price")
def price(order: Order) -> Receipt:
    assert isinstance(order, Order) and isinstance(order.lines[0], Line)  # converted, not a dict
    return Receipt(order_id=order.order_id, total=sum(ln.qty * ln.price for ln in order.lines),
                   skus=[ln.sku for ln in order.lines])


def test_models_travel_as_json_and_come_back_typed(engine_only_stack):
    stack = engine_only_stack
    stack.start_worker([price])
    c = stack.client
    c.deploy({"name": "conv.order", "version": 1, "steps": [
        {"id": "p", "task": "conv.price", "input": "input", "output": "r"},
        {"id": "done", "succeed": "r"}]})
    order = Order(order_id=f"o-{uuid.uuid4().hex[:6]}", lines=[Line("A-1", 2, 9.5), Line("B-2", 1, 1.0)])
    h = c.start("conv.order", order)
    receipt = h.result(timeout=60, type=Receipt)
    assert receipt == Receipt(order_id=order.order_id, total=20.0, skus=["A-1", "B-2"])
    assert c.result(h.id, timeout=10) == {"order_id": order.order_id, "total": 20.0, "skus": ["A-1", "B-2"]}
    assert c.status(h.id)["internal"]["input"] == order.model_dump(mode="json")  # the record holds plain JSON
