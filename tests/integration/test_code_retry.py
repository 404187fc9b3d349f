"""Retry of a failed code workflow on a real broker: the engine keeps the failed run's journal (in
RocksDB and its changelog), and ``Client.retry`` resets the run to before the failure and replays it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import kflow
from kflow.model.errors import WorkflowFailedError
from kflow.testing import assert_eventually
from kflow.worker import activity
from tests.integration.conftest import Stack
from tests.integration.test_code_workflows import restart_engine

MODULE = "tests.integration.test_code_retry"

#: The "fix": while set, ``cr.charge`` fails. Counters of the calls each activity got, per input.
BROKEN = threading.Event()
CALLS: dict[str, int] = {}
_LOCK = threading.Lock()


def _count(name: str, key: Any) -> None:
    with _LOCK:
        CALLS[f"{name}:{key}"] = CALLS.get(f"{name}:{key}", 0) + 1


@activity("cr.reserve")
def reserve(order: dict[str, Any]) -> dict[str, Any]:
    _count("reserve", order["id"])
    return {"reservation": f"r-{order['id']}"}


@activity("cr.charge")
def charge(order: dict[str, Any]) -> dict[str, Any]:
    _count("charge", order["id"])
    if BROKEN.is_set():
        raise RuntimeError("card service down")
    return {"receipt": f"p-{order['id']}"}


@kflow.workflow(name="code.retry.order", version=1)
async def order(ctx: Any, input: Any) -> Any:
    r = await ctx.activity("cr.reserve", input)
    paid = await ctx.activity("cr.charge", input, retry={"max_attempts": 1})
    return {**r, **paid}


@pytest.fixture(scope="module")
def retry_stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import sys

    s = Stack(kafka_bootstrap, f"r{uuid.uuid4().hex[:8]}.", str(tmp_path_factory.mktemp("retry")))
    s.start_engine(workflows=MODULE)
    s.start_worker([sys.modules[__name__]])
    try:
        yield s
    finally:
        s.close()


def status(stack: Stack, iid: str) -> str:
    return (stack.client.status(iid) or {}).get("status", "")


def fail_then_retry(stack: Stack, restart: bool) -> None:
    c = stack.client
    key = uuid.uuid4().hex[:8]
    BROKEN.set()
    h = c.start("code.retry.order", {"id": key}, id=f"order-{key}")
    with pytest.raises(WorkflowFailedError) as ei:
        h.result(timeout=60)
    assert ei.value.error_type == "RuntimeError"
    if restart:  # the kept journal comes back from the changelog into a new engine's store
        restart_engine(stack)
    BROKEN.clear()  # the service is fixed
    c.retry(h.id, reason="card service back", by="ops")
    assert_eventually(lambda: status(stack, h.id) == "COMPLETED", timeout=60)
    # from the engine's own record: a result watcher may still hold the FAILED record of the first run
    assert c.status(h.id)["result"] == {"reservation": f"r-{key}", "receipt": f"p-{key}"}
    assert CALLS[f"reserve:{key}"] == 1 and CALLS[f"charge:{key}"] == 2  # reserve is not run again
    history = c.history(h.id)
    types = [e.type for e in history]
    assert types.index("WorkflowFailed") < types.index("WorkflowRetried") < types.index("WorkflowCompleted")
    retried = next(e.data for e in history if e.type == "WorkflowRetried")
    assert retried["by"] == "ops" and retried["reason"] == "card service back" and retried["attempt"] == 1
    assert retried["from_step"].startswith("event:")
    charges = [e.data["attempt"] for e in history if e.type == "ActivityScheduled" and e.data["name"] == "cr.charge"]
    assert charges == [1, 2]


def test_a_failed_code_workflow_is_retried_and_completes(retry_stack: Stack) -> None:
    fail_then_retry(retry_stack, restart=False)


def test_a_retry_after_an_engine_restart_replays_the_kept_journal(retry_stack: Stack) -> None:
    fail_then_retry(retry_stack, restart=True)
