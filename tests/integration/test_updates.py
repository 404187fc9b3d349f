"""Workflow updates end to end on a real broker: ``Client.update`` and ``kflow update`` against an engine.

The code workflows and the activity below are hosted by this module itself (the engine imports it
with ``--workflows``), so the test and what it drives read in one place.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import kflow
from kflow.worker import activity
from tests.integration.conftest import Stack

MODULE = __name__


@activity("upd.price")
def price(items: list[Any]) -> int:
    return sum(int(i.get("qty", 1)) * 10 for i in items)


@kflow.workflow(name="upd.cart", version=1)
class UpdCart:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.paid: Any = None
        self.ctx: Any = None

    @kflow.workflow.update
    def add(self, item: Any) -> int:
        self.items.append(item)
        return len(self.items)

    @add.validator
    def check_add(self, item: Any) -> None:
        if not isinstance(item, dict) or not item.get("sku"):
            raise ValueError("an item needs a sku")

    @kflow.workflow.update
    async def checkout(self, data: Any) -> Any:
        self.paid = await self.ctx.activity("upd.price", self.items)
        return {"total": self.paid}

    @kflow.workflow.query
    def count(self) -> int:
        return len(self.items)

    async def run(self, ctx: Any, input: Any) -> Any:
        self.ctx = ctx
        await ctx.wait_condition(lambda: self.paid is not None)
        return {"skus": [i["sku"] for i in self.items], "total": self.paid}


SPEC = {
    "name": "upd.approval", "version": 1,
    "steps": [
        {"id": "ask", "output": "decision",
         "wait": {"update": "approve", "validate": "update.amount <= input.limit",
                  "reply": "{'approved': decision.amount, 'by': decision.by}"}},
        {"id": "done", "succeed": "{'approved': decision.amount}"},
    ],
}


@pytest.fixture(scope="module")
def upd_stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(kafka_bootstrap, f"u{uuid.uuid4().hex[:8]}.", str(tmp_path_factory.mktemp("updates")))
    s.start_engine(workflows=MODULE)
    s.start_worker([sys.modules[MODULE]])
    s.client.deploy(SPEC)
    try:
        yield s
    finally:
        s.close()


def uid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def accepted(c: kflow.Client, iid: str) -> list[str]:
    return [e.data["update_id"] for e in c.history(iid) if e.type == "UpdateAccepted"]


def test_code_update_is_answered_by_its_handler(upd_stack: Stack) -> None:
    c = upd_stack.client
    h = c.start("upd.cart", None, id=uid("cart"))
    assert c.update(h.id, "add", {"sku": "A", "qty": 2}) == 1
    assert h.update("add", {"sku": "B"}) == 2
    assert c.query(h.id, "count") == 2
    # an async handler: answered once the activity it awaits has run on the worker
    assert c.update(h.id, "checkout", timeout=60) == {"total": 30}
    assert h.result(timeout=60) == {"skus": ["A", "B"], "total": 30}
    types = [e.type for e in c.history(h.id)]
    assert types.count("UpdateAccepted") == 3 and types.count("UpdateCompleted") == 3


def test_rejected_update_raises_and_writes_no_history(upd_stack: Stack) -> None:
    c = upd_stack.client
    h = c.start("upd.cart", None, id=uid("rej"))
    assert c.update(h.id, "add", {"sku": "A"}) == 1
    seq = c.status(h.id)["seq"]
    with pytest.raises(kflow.UpdateRejectedError) as info:
        c.update(h.id, "add", {"qty": 3}, update_id="bad-1")
    assert (info.value.type, info.value.message, info.value.update_id) == ("ValueError", "an item needs a sku", "bad-1")
    with pytest.raises(kflow.UpdateRejectedError, match="UnknownUpdate"):
        c.update(h.id, "remove", {"sku": "A"})
    with pytest.raises(kflow.UpdateRejectedError, match="NotFound"):
        c.update(uid("ghost"), "add", {"sku": "A"})
    assert c.status(h.id)["seq"] == seq
    assert "bad-1" not in accepted(c, h.id)
    c.update(h.id, "checkout", timeout=60)
    assert h.result(timeout=60)["skus"] == ["A"]
    with pytest.raises(kflow.UpdateRejectedError, match="InvalidState") as closed:
        c.update(h.id, "add", {"sku": "B"})
    assert isinstance(closed.value, kflow.UpdateFailedError)


def test_duplicate_update_id_runs_once_and_returns_the_first_answer(upd_stack: Stack) -> None:
    c = upd_stack.client
    h = c.start("upd.cart", None, id=uid("dup"))
    assert c.update(h.id, "add", {"sku": "A"}, update_id="once") == 1
    assert c.update(h.id, "add", {"sku": "A"}, update_id="once") == 1
    assert c.update(h.id, "add", {"sku": "B"}, update_id="twice") == 2
    assert c.query(h.id, "count") == 2
    assert accepted(c, h.id) == ["once", "twice"]


def test_spec_wait_step_takes_an_update_and_replies(upd_stack: Stack) -> None:
    c = upd_stack.client
    h = c.start("upd.approval", {"limit": 100}, id=uid("appr"))
    with pytest.raises(kflow.UpdateRejectedError) as info:
        c.update(h.id, "approve", {"amount": 500, "by": "eve"})
    assert info.value.type == "UpdateRejected" and "update.amount <= input.limit" in info.value.message
    assert accepted(c, h.id) == []
    assert c.update(h.id, "approve", {"amount": 50, "by": "ann"}, update_id="ok") == {"approved": 50, "by": "ann"}
    assert h.result(timeout=60) == {"approved": 50}
    # after the instance closed, the same update id still gets its answer
    assert c.update(h.id, "approve", {"amount": 50, "by": "ann"}, update_id="ok") == {"approved": 50, "by": "ann"}


def test_async_client_update(upd_stack: Stack) -> None:
    import asyncio

    from kflow.aio import AsyncClient

    h = upd_stack.client.start("upd.cart", None, id=uid("aio"))

    async def main() -> tuple[Any, Any]:
        async with AsyncClient(upd_stack.bootstrap, topic_prefix=upd_stack.prefix) as ac:
            return await ac.update(h.id, "add", {"sku": "Z"}), await ac.handle(h.id).update("add", {"sku": "Y"})

    assert asyncio.run(main()) == (1, 2)


def test_cli_update(upd_stack: Stack) -> None:
    from typer.testing import CliRunner

    from kflow.cli import app

    c = upd_stack.client
    h = c.start("upd.cart", None, id=uid("cli"))
    common = ["--bootstrap", upd_stack.bootstrap, "--prefix", upd_stack.prefix]
    runner = CliRunner()
    for _ in range(2):  # the same --update-id twice: one item, the same answer
        out = runner.invoke(app, ["update", h.id, "add", '{"sku": "C"}', "--update-id", "cli-1", *common])
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout.strip().splitlines()[-1]) == 1
    out = runner.invoke(app, ["update", h.id, "add", '{"qty": 1}', *common])
    assert out.exit_code == 3 and "an item needs a sku" in out.output
    out = runner.invoke(app, ["update", h.id, "checkout", "--timeout", "60", *common])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"total": 10}
    ids = accepted(c, h.id)
    assert ids[0] == "cli-1" and len(ids) == 2
