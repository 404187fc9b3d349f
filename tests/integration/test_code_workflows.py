"""Code workflows end to end on a real broker: engine thread hosting code, worker thread with activities."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any, Optional

import orjson
import pytest

import kflow
from kflow.config import EngineConfig
from kflow.model.errors import WorkflowFailedError
from kflow.streams.processor import EngineProcessor
from kflow.streams.restore import restore_partitions
from kflow.streams.store import EngineStore, StorePartition
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


def stop_engine(stack: Stack) -> EngineProcessor:
    """Stop the stack's engine (it finishes its open batches and closes its stores)."""
    proc, t = stack.engines.pop(0)
    proc.stop()
    t.join(30)
    return proc


def restart_engine(stack: Stack, stopped: Optional[EngineProcessor] = None) -> None:
    """Stop the engine (unless given the one already ``stopped``) and start it again under the same
    identity, on an empty state dir.

    The new engine restores its partitions from the changelogs, and with a replay cache of its own
    (empty, as in a fresh process) every instance it resumes is rebuilt by replay from its journal.
    """
    proc = stopped or stop_engine(stack)
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
    assert c.query(h.id, "stage") == "awaiting shipment"
    assert "inputs" not in c.status(h.id)["internal"]  # the history is in the journal, not the state
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
    cmds = [e.data["name"] for e in c.history(h.id) if e.type == "ActivityScheduled" and e.data["attempt"] == 1]
    assert cmds == ["co.reserve", "co.charge", "co.release"]


def test_a_new_engine_resumes_an_instance_by_replay(code_stack: Stack) -> None:
    c = code_stack.client
    h = c.start("code.order", {"sku": "C3", "qty": 1, "price": 5}, id=uid("order"))
    assert_eventually(lambda: waiting_for_signal(c, h.id), timeout=60)
    restart_engine(code_stack)
    new = code_stack.engines[-1][0]
    misses = new.replay_cache.misses
    c.signal(h.id, "ship", {"carrier": "dhl"})
    assert h.result(timeout=60)["tracking"] == "t-r-C3-dhl"
    assert new.replay_cache.misses > misses


def _data(sp: StorePartition) -> dict[bytes, Any]:
    """A store's states, timer index and journal (not its changelog offsets, which count commit markers)."""
    return {k: orjson.loads(v) if v else v for k, v in sp.db.items() if k[:2] in (b"s:", b"t:", b"j:")}


def test_a_store_restored_from_the_engine_state_and_journal_changelogs_equals_the_engine_store(
        code_stack: Stack, tmp_path: Any) -> None:
    c = code_stack.client
    done = c.start("code.order", {"sku": "E5", "qty": 1, "price": 3}, id=uid("order"))
    waiting = c.start("code.order", {"sku": "F6", "qty": 1, "price": 4}, id=uid("order"))
    looped = c.start("code.counter", {"run": 1, "runs": 3, "total": 0}, id=uid("count"))
    c.signal(done.id, "ship", {"carrier": "ups"})
    assert done.result(timeout=60)["tracking"] == "t-r-E5-ups" and looped.result(timeout=60)["run"] == 3
    assert_eventually(lambda: waiting_for_signal(c, waiting.id), timeout=60)
    proc = stop_engine(code_stack)  # nothing writes the changelogs while the stores are compared
    try:
        before, after = EngineStore(proc.config.state_dir, 0), EngineStore(str(tmp_path / "restored"), 0)
        stores = [after.open(p, 0) for p in range(proc.config.partitions)]
        stats = restore_partitions(proc.config.consumer_conf("kflow-restore"), proc.names.engine_state, stores)
        assert sum(s.journal_records for s in stats.values()) > 0
        merged: dict[bytes, Any] = {}
        for p in range(proc.config.partitions):
            expected = _data(before.open(p, 0))
            assert _data(after.get(p)) == expected, f"partition {p}: restored store differs"
            merged.update(expected)
        before.close_all()
        after.close_all()
        # a running instance has one entry per input and command; a closed one's entries were deleted
        st = merged[b"s:" + waiting.id.encode()]
        assert sum(1 for k in merged if k.startswith(b"j:" + waiting.id.encode() + b"\x00")) == (
            st["input_count"] + st["command_count"]) > 0
        assert not [k for k in merged if k.startswith((b"j:" + done.id.encode(), b"j:" + looped.id.encode()))]
    finally:
        restart_engine(code_stack, proc)
    c.signal(waiting.id, "ship", {"carrier": "dhl"})
    assert waiting.result(timeout=60)["tracking"] == "t-r-F6-dhl"


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
    # the retry backs off (1 s, doubling): on a loaded machine the instance may have been blocked long
    # enough for the next retry to be a minute away
    assert h.result(timeout=150)["tracking"] == "t-r-D4-fedex"


SPEC_CHILD = {"name": "spec.child", "version": 1,
              "steps": [{"id": "sq", "task": "co.square", "input": "input.x", "output": "y"},
                        {"id": "done", "succeed": "{'y': y}"}]}
SPEC_PARENT = {"name": "spec.parent", "version": 1,
               "steps": [{"id": "kid", "child": {"workflow": "code.fanout", "input": "input"}, "output": "squares"},
                         {"id": "done", "succeed": "squares"}]}


def test_gather_of_ten_activities(code_stack: Stack) -> None:
    h = code_stack.client.start("code.fanout", 10, id=uid("fan"))
    assert h.result(timeout=60) == [i * i for i in range(10)]
    scheduled = [e for e in code_stack.client.history(h.id) if e.type == "ActivityScheduled"]
    assert len(scheduled) == 10 and len({e.data["activity_id"] for e in scheduled}) == 10


def test_signals_before_and_after_wait_signal(code_stack: Stack) -> None:
    c = code_stack.client
    iid = uid("sig")
    h = c.start("code.signals", None, id=iid)
    c.signal(iid, "early", 1)
    assert_eventually(lambda: any(t.get("purpose") == "signal:late"
                                  for t in ((c.status(iid) or {}).get("internal") or {}).get("timers", {}).values()),
                      timeout=60)
    c.signal(iid, "late", 2)
    assert h.result(timeout=60) == [1, 2]


def test_sleep_across_an_engine_restart(code_stack: Stack) -> None:
    c = code_stack.client
    h = c.start("code.sleepy", 2, id=uid("sleep"))
    assert_eventually(lambda: ((c.status(h.id) or {}).get("internal") or {}).get("timers"), timeout=60)
    restart_engine(code_stack)
    assert h.result(timeout=60) >= 2


def test_child_workflows_in_both_directions(code_stack: Stack) -> None:
    c = code_stack.client
    c.deploy(SPEC_CHILD)
    c.deploy(SPEC_PARENT)
    h = c.start("code.parent", 7, id=uid("parent"))
    assert h.result(timeout=60) == {"spec": {"y": 49}, "code": "audited k7"}
    h2 = c.start("spec.parent", 4, id=uid("sparent"))
    assert h2.result(timeout=60) == [0, 1, 4, 9]


def test_queries_are_answered_by_the_owning_engine_without_history(code_stack: Stack) -> None:
    c = code_stack.client
    h = c.start("code.approval", {"needed": 2}, id=uid("appr"))
    c.signal(h.id, "approve", "ann")
    assert_eventually(lambda: c.query(h.id, "approvers") == ["ann"], timeout=60)
    seq = c.status(h.id)["seq"]
    assert c.query(h.id, "approvers", "by ") == ["by ann"]
    assert c.status(h.id)["seq"] == seq  # a query writes nothing
    with pytest.raises(kflow.KflowError, match="no query 'nope'"):
        c.query(h.id, "nope")
    with pytest.raises(kflow.KflowError, match="NotFound"):
        c.query("no-such-instance", "approvers")
    c.signal(h.id, "approve", "bob")
    assert h.result(timeout=60) == {"approved_by": ["ann", "bob"]}


def test_retry_backoff_is_durable_across_an_engine_restart(code_stack: Stack) -> None:
    c = code_stack.client
    key = uid("flaky")
    h = c.start("code.retrying", key, id=key)
    assert_eventually(lambda: any(t.get("purpose") == "retry" for t in
                                  ((c.status(key) or {}).get("internal") or {}).get("timers", {}).values()),
                      timeout=60)
    restart_engine(code_stack)
    assert h.result(timeout=60) == {"calls": 3}
    failed = [e.data["attempt"] for e in c.history(key) if e.type == "ActivityFailed"]
    assert failed == [1, 2]


def test_continue_as_new_keeps_the_id_and_carries_the_chain(code_stack: Stack) -> None:
    c = code_stack.client
    h = c.start("code.counter", {"run": 1, "runs": 4, "total": 0}, id=uid("count"))
    assert h.result(timeout=60) == {"total": 1 + 4 + 9 + 16, "run": 4}
    st = c.status(h.id)["internal"]
    assert [r["run"] for r in st["runs"]] == [1, 2, 3] and st["run"] == 4
    assert [e.data["run"] for e in c.history(h.id) if e.type == "WorkflowContinuedAsNew"] == [2, 3, 4]


def _shape(events: list) -> list:
    return [(e.type, e.seq, e.data) for e in events]


def test_forced_replay_gives_the_same_histories_and_results_as_the_cache(code_stack: Stack) -> None:
    c = code_stack.client
    runs: dict[str, tuple] = {}
    cache = code_stack.engines[0][0].replay_cache
    for mode, size in (("replayed", 0), ("cached", 10_000)):
        cache.clear()
        cache.max_size = size
        try:
            hits = cache.hits
            a = c.start("code.fanout", 5, id=uid(f"fan-{mode}"))
            b = c.start("code.counter", {"run": 1, "runs": 3, "total": 0}, id=uid(f"count-{mode}"))
            runs[mode] = (a.result(timeout=60), b.result(timeout=60), _shape(c.history(a.id)), _shape(c.history(b.id)))
            assert (cache.hits > hits) == (mode == "cached")
        finally:
            cache.max_size = 10_000
    assert runs["replayed"] == runs["cached"]


def test_cli_query_and_replay_of_a_live_instance(code_stack: Stack) -> None:
    from typer.testing import CliRunner

    from kflow.cli import app

    c = code_stack.client
    h = c.start("code.approval", {"needed": 2}, id=uid("cli"))
    c.signal(h.id, "approve", "cy")
    common = ["--bootstrap", code_stack.bootstrap, "--prefix", code_stack.prefix]
    assert_eventually(lambda: c.query(h.id, "approvers") == ["cy"], timeout=60)
    runner = CliRunner()
    out = runner.invoke(app, ["query", h.id, "approvers", '"to "', *common])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["to cy"]
    out = runner.invoke(app, ["replay", "--workflows", MODULE, "--instance", h.id, *common])
    assert out.exit_code == 0, out.output
    assert f"ok {h.id}" in out.output
    out = runner.invoke(app, ["replay", "--workflows", MODULE, *common])
    assert out.exit_code != 0 and "--file FILE or one or more --instance" in out.output
