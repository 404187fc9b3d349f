"""Code workflows end to end on a real broker: engine thread hosting code, worker thread with activities."""

from __future__ import annotations

import threading
import uuid
from typing import Iterator

import pytest

import kflow
from kflow.config import EngineConfig
from kflow.engine import code_replayer
from kflow.model.errors import WorkflowFailedError
from kflow.streams.processor import EngineProcessor
from kflow.testing import assert_eventually
from tests.integration.conftest import Stack

MODULE = "tests.integration.code_flows"


@pytest.fixture(scope="module")
def code_stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from tests.integration import code_flows

    s = Stack(kafka_bootstrap, f"c{uuid.uuid4().hex[:8]}.", str(tmp_path_factory.mktemp("code")))
    s.start_engine(workflows=MODULE)
    s.start_worker([code_flows])
    try:
        yield s
    finally:
        s.close()


def restart_engine(stack: Stack) -> None:
    """Stop the engine and start it again under the same identity, on an empty state dir.

    The new engine restores its partitions from the changelog, and with the replay cache cleared
    (as in a fresh process) every instance it resumes is rebuilt by replay.
    """
    proc, t = stack.engines.pop(0)
    proc.stop()
    t.join(30)
    code_replayer.CACHE.clear()
    cfg = stack.kafka_config(EngineConfig, state_dir=f"{stack.state_root}/r{uuid.uuid4().hex[:6]}",
                             engine_id=proc.config.engine_id, workflows=MODULE)
    new = EngineProcessor(cfg)
    thread = threading.Thread(target=new.run, name="engine", daemon=True)
    thread.start()
    assert new.ready.wait(60), "restarted engine did not get partitions within 60s"
    stack.engines.append((new, thread))


def uid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def waiting_for_signal(c, iid: str) -> bool:
    st = c.status(iid) or {}
    return st.get("status") == "RUNNING" and any(
        t.get("purpose") == "signal:ship" for t in (st.get("internal") or {}).get("timers", {}).values())


def test_order_saga_with_activities_signal_timer_and_child(code_stack: Stack) -> None:
    c = code_stack.client
    h = c.start("code.order", {"sku": "A1", "qty": 2, "price": 10}, id=uid("order"))
    assert_eventually(lambda: waiting_for_signal(c, h.id), timeout=60)
    from tests.integration import code_flows

    assert kflow.query_state(code_flows.order, c.status(h.id)["internal"], "stage") == "awaiting shipment"
    c.signal(h.id, "ship", {"carrier": "ups"})
    res = h.result(timeout=60)
    assert res["receipt"] == "p-20" and res["tracking"] == "t-r-A1-ups" and res["audit"] == "audited A1"
    assert uuid.UUID(res["id"]).version == 4
    st = c.status(h.id)
    assert st["internal"]["kind"] == "code"


def test_failed_payment_compensates_and_fails_with_the_workflow_error(code_stack: Stack) -> None:
    c = code_stack.client
    h = c.start("code.order", {"sku": "B2", "qty": 100, "price": 50}, id=uid("order"))
    with pytest.raises(WorkflowFailedError) as ei:
        h.result(timeout=60)
    assert ei.value.error_type == "PaymentFailed" and "card declined" in (ei.value.message or "")
    cmds = [x[1] for x in c.status(h.id)["internal"]["commands"]]
    assert cmds == ["co.reserve", "co.charge", "co.release"]


def test_a_new_engine_resumes_an_instance_by_replay(code_stack: Stack) -> None:
    c = code_stack.client
    h = c.start("code.order", {"sku": "C3", "qty": 1, "price": 5}, id=uid("order"))
    assert_eventually(lambda: waiting_for_signal(c, h.id), timeout=60)
    misses = code_replayer.CACHE.misses
    restart_engine(code_stack)
    c.signal(h.id, "ship", {"carrier": "dhl"})
    assert h.result(timeout=60)["tracking"] == "t-r-C3-dhl"
    assert code_replayer.CACHE.misses > misses


async def _order_renamed(ctx, input):
    await ctx.activity("co.reserve_v2", input)  # a different first command than history recorded
    return None


def test_changed_code_blocks_the_instance_until_fixed_code_is_deployed(code_stack: Stack) -> None:
    from tests.integration import code_flows

    c = code_stack.client
    h = c.start("code.order", {"sku": "D4", "qty": 1, "price": 7}, id=uid("order"))
    assert_eventually(lambda: waiting_for_signal(c, h.id), timeout=60)
    definition = code_flows.order.__kflow_workflow__
    good = definition.fn

    definition.fn = _order_renamed
    try:
        restart_engine(code_stack)
        c.signal(h.id, "ship", {"carrier": "fedex"})
        st = assert_eventually(lambda: (s := c.status(h.id)) and s["status"] == "BLOCKED" and s, timeout=60)
        blocked = st["internal"]["blocked"]
        assert (blocked["expected"], blocked["actual"]) == ("activity 'co.reserve'", "activity 'co.reserve_v2'")
    finally:
        definition.fn = good
    restart_engine(code_stack)  # the fix: the replay timer retries and the recorded signal is delivered
    assert h.result(timeout=60)["tracking"] == "t-r-D4-fedex"
