"""Fairness keys, starvation promotion and the read-ahead choice of a saturated worker (pure, manual clock)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

import kflow
from kflow._worker.fairness import FairnessSettings, Picked, ReadAhead
from kflow.config import WorkerConfig
from kflow.model.messages import Task
from kflow.schemas.codec import decode_task, encode_task
from kflow.testing.harness import EngineHarness, ManualClock


def read_ahead(policy: str = "weighted", **kw: Any) -> tuple[ReadAhead[str], ManualClock]:
    clock = ManualClock()
    return ReadAhead(FairnessSettings(policy=policy, **kw), clock), clock  # type: ignore[arg-type]


def drain(ra: ReadAhead[str], n: int | None = None) -> list[str]:
    return [ra.pop().item for _ in range(len(ra) if n is None else n)]


def flood(ra: ReadAhead[str], key: str, n: int, level: int = 3, queue: str = "q") -> None:
    for i in range(n):
        ra.push(f"{key}{i}", level=level, key=key, queue=queue)


# -- weighted round robin across keys ----------------------------------------------------------------
def test_keys_take_turns_by_weight_and_each_keeps_its_own_order() -> None:
    ra, _ = read_ahead(weights={"gold": 3})
    flood(ra, "gold", 9)
    flood(ra, "free", 3)
    order = drain(ra)
    assert [t.rstrip("0123456789") for t in order] == ["gold"] * 3 + ["free"] + ["gold"] * 3 + ["free"] + \
        ["gold"] * 3 + ["free"]
    assert [t for t in order if t.startswith("gold")] == [f"gold{i}" for i in range(9)]


def test_queues_are_units_of_their_own_and_a_key_that_runs_out_leaves_the_ring() -> None:
    ra, _ = read_ahead()
    flood(ra, "a", 4, queue="q1")
    flood(ra, "a", 1, queue="q2")
    assert drain(ra, 3) == ["a0", "a0", "a1"]  # (q1, a), (q2, a), then q1 alone
    flood(ra, "b", 2, queue="q1")  # new work joins the ring behind q1's a
    assert drain(ra) == ["a2", "b0", "a3", "b1"]


def test_an_idle_key_banks_no_burst() -> None:
    ra, _ = read_ahead()
    flood(ra, "a", 3)
    assert drain(ra, 3) == ["a0", "a1", "a2"]
    flood(ra, "a", 2)
    flood(ra, "b", 2)
    assert drain(ra) == ["a0", "b0", "a1", "b1"]


# -- the stated bound ----------------------------------------------------------------------------------
def bound(n: int, weight: int, total_weight: int) -> int:
    """Docs/priority.md: the n-th task of a key of weight w starts within ceil(n / w) * S starts of its level."""
    return math.ceil(n / weight) * total_weight


@pytest.mark.parametrize("weights", [{}, {"B": 2}, {"A": 5}])
def test_a_flood_of_10000_cannot_hold_back_another_keys_10_beyond_the_bound(weights: dict[str, int]) -> None:
    ra, _ = read_ahead(weights=weights)
    flood(ra, "A", 10_000)
    assert drain(ra, 7) == [f"A{i}" for i in range(7)]  # A is in the middle of its turn when B arrives
    flood(ra, "B", 10)
    settings = ra.settings
    limit = bound(10, settings.weight("B"), settings.weight("A") + settings.weight("B"))
    order = drain(ra, limit)
    assert [t for t in order if t.startswith("B")] == [f"B{i}" for i in range(10)], (limit, order)
    # and A was not starved meanwhile: it got its weight's share of those starts
    assert sum(t.startswith("A") for t in order) >= limit - 10
    assert len(ra) == 10_000 - 7 - (limit - 10)


def test_the_bound_is_tight_for_equal_weights() -> None:
    ra, _ = read_ahead()
    flood(ra, "A", 10_000)
    flood(ra, "B", 10)
    order = drain(ra, 20)
    assert order[-1] == "B9"  # B's last task is the 20th start: ceil(10 / 1) * 2


# -- levels --------------------------------------------------------------------------------------------
def test_with_the_weighted_policy_every_level_progresses_under_saturation() -> None:
    ra, _ = read_ahead()
    for level in (1, 3, 5):
        for i in range(500):
            ra.push(f"{level}.{i}", level=level)
    first = drain(ra, 175)  # the total weight of levels 1, 3 and 5
    per_level = {lv: sum(t.startswith(f"{lv}.") for t in first) for lv in (1, 3, 5)}
    assert per_level == {1: 140, 3: 28, 5: 7}  # 100 : 20 : 5


def test_the_strict_policy_serves_the_most_urgent_level_first_and_keys_within_it() -> None:
    ra, _ = read_ahead("strict")
    flood(ra, "A", 3, level=5)
    flood(ra, "A", 3, level=1)
    flood(ra, "B", 1, level=1)
    assert drain(ra) == ["A0", "B0", "A1", "A2", "A0", "A1", "A2"]


def test_tasks_waiting_on_the_broker_earn_their_level_credit() -> None:
    ra, _ = read_ahead()
    flood(ra, "x", 10, level=5)
    ra.push("critical", level=1)
    first = ra.pop(lag={5: 1000})
    assert first.item == "critical" and first.level == 1
    assert ra.credit[5] > 0  # background owed its turn, though only one level was here


# -- promotion -----------------------------------------------------------------------------------------
def test_a_task_waiting_longer_than_promote_after_is_chosen_one_level_up() -> None:
    ra, clock = read_ahead("strict", promote_after_ms=1_000, max_promotions=2)
    ra.push("old", level=5, arrived_ms=clock.now_ms())
    for i in range(3):
        ra.push(f"low{i}", level=4, arrived_ms=clock.now_ms())
    first = ra.pop()
    assert (first.item, first.promoted) == ("low0", False)
    clock.advance(0.999)
    assert ra.pop().item == "low1"  # not yet: 999 ms
    clock.advance(0.001)
    picked: Picked[str] = ra.pop()  # both now count as one level up; the promoted old one at 4, low2 at 3
    assert picked.item == "low2" and (picked.level, picked.served_at) == (4, 3) and picked.promoted
    picked = ra.pop()
    assert picked.item == "old" and (picked.level, picked.served_at, picked.waited_ms) == (5, 4, 1000)


def test_promotion_counts_time_on_the_broker_from_the_record_timestamp() -> None:
    ra, clock = read_ahead("strict", promote_after_ms=1_000, max_promotions=3)
    ra.push("fresh", level=4, arrived_ms=clock.now_ms())
    ra.push("stale", level=5, arrived_ms=clock.now_ms() - 2_500)  # written 2.5 s ago: two periods
    picked = ra.pop()
    assert (picked.item, picked.level, picked.served_at, picked.waited_ms) == ("stale", 5, 3, 2_500)
    assert ra.pop().item == "fresh"


def test_max_promotions_caps_how_far_a_task_rises() -> None:
    ra, clock = read_ahead("strict", promote_after_ms=1_000, max_promotions=2)
    ra.push("bg", level=5, arrived_ms=clock.now_ms())
    ra.push("normal", level=3, arrived_ms=clock.now_ms())
    clock.advance(3600)
    order = [ra.pop() for _ in range(2)]
    assert [(p.item, p.served_at) for p in order] == [("normal", 1), ("bg", 3)]
    s = FairnessSettings(promote_after_ms=1_000, max_promotions=4)
    assert [s.level_at(2, ms) for ms in (0, 999, 1_000, 5_000, 10**9)] == [2, 2, 1, 1, 1]  # never above critical
    assert FairnessSettings(promote_after_ms=0, max_promotions=4).level_at(5, 10**9) == 5
    assert FairnessSettings(promote_after_ms=10, max_promotions=0).level_at(5, 10**9) == 5


# -- removal -------------------------------------------------------------------------------------------
def test_removed_tasks_leave_and_the_ring_stays_consistent() -> None:
    ra, _ = read_ahead()
    flood(ra, "A", 3)
    flood(ra, "B", 3)
    assert ra.pop().item == "A0"
    assert ra.remove(lambda t: t.startswith("A")) == ["A1", "A2"]
    assert len(ra) == 3 and sorted(ra) == ["B0", "B1", "B2"]
    assert drain(ra) == ["B0", "B1", "B2"]
    with pytest.raises(IndexError):
        ra.pop()
    flood(ra, "C", 2)
    ra.clear()
    assert len(ra) == 0 and not ra and ra.counts() == {}


# -- settings ------------------------------------------------------------------------------------------
def test_bad_weights_are_one_precise_error() -> None:
    with pytest.raises(ValueError, match="expected integers >= 1"):
        FairnessSettings(weights={"a": 0})
    with pytest.raises(ValidationError, match="expected integer weights >= 1"):
        WorkerConfig(fairness_weights={"a": 2, "b": 0})


def test_worker_settings_read_weights_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFLOW_FAIRNESS_WEIGHTS", '{"gold": 4}')
    monkeypatch.setenv("KFLOW_PROMOTE_AFTER_MS", "30000")
    monkeypatch.setenv("KFLOW_MAX_PROMOTIONS", "1")
    monkeypatch.setenv("KFLOW_READ_AHEAD", "50")
    cfg = WorkerConfig()
    assert (cfg.fairness_weights, cfg.promote_after_ms, cfg.max_promotions, cfg.read_ahead) == ({"gold": 4}, 30000, 1, 50)


# -- the key on the task -------------------------------------------------------------------------------
def test_the_key_round_trips_on_the_task_record() -> None:
    task = Task("o-1", "a", 1, "n", "q", None, "w", 0, fairness_key="acme")
    assert decode_task(encode_task(task)).fairness_key == "acme"
    assert decode_task(encode_task(Task("o-1", "a", 1, "n", "q", None, "w", 0))).fairness_key is None


def harness(*docs: dict[str, Any]) -> EngineHarness:
    h = EngineHarness()
    for doc in docs:
        h.deploy(doc)
    h.activity("t", lambda x: x)
    h.auto_run_tasks = False
    return h


def test_a_step_fairness_key_is_evaluated_and_rides_every_attempt() -> None:
    h = harness({"name": "w", "steps": [{"id": "a", "task": "t", "input": "input", "fairness_key": "input.customer",
                                         "retry": {"max_attempts": 2, "initial": "1s"}},
                                        {"id": "b", "task": "t", "fairness_key": "'gold'"}]})
    h.start("w", "i1", {"customer": "c-42"})
    first = h.pending_tasks.popleft()
    assert first.fairness_key == "c-42"
    h.send("FailActivity", "i1", activity_id=first.activity_id, attempt=1, error_type="Boom", message="x",
           retryable=True)
    h.advance(2)
    retry = h.pending_tasks.popleft()
    assert (retry.attempt, retry.fairness_key) == (2, "c-42")
    h.run_task(retry)
    h.drain()
    assert h.pending_tasks.popleft().fairness_key == "gold"  # a quoted CEL string is a literal key


def test_without_a_step_key_the_tenant_is_the_key() -> None:
    h = harness({"name": "w", "steps": [{"id": "a", "task": "t"}, {"id": "b", "task": "t"}]})
    h.start("w", "i0")
    assert h.pending_tasks.popleft().fairness_key is None  # auth off: the empty key
    # auth on: the processor puts the verified tenant on the start and stamps it on the first state
    h.send("StartWorkflow", "i1", workflow="w", tenant="acme")
    first = h.pending_tasks.popleft()
    assert first.fairness_key == "acme"
    h.states["i1"]["tenant"] = "acme"
    h.run_task(first)
    h.drain()
    assert h.pending_tasks.popleft().fairness_key == "acme"


def test_a_key_that_is_not_a_string_fails_the_instance_with_the_reason() -> None:
    h = harness({"name": "w", "steps": [{"id": "a", "task": "t", "fairness_key": "[1, 2]"}]})
    h.start("w", "i1")
    assert h.status("i1") == "FAILED"
    assert "fairness_key: expected a string or number" in h.states["i1"]["error"]["message"]


def test_fairness_key_is_only_allowed_on_task_steps() -> None:
    with pytest.raises(Exception, match="'fairness_key' is only allowed on a task step"):
        harness({"name": "w", "steps": [{"id": "s", "sleep": "1s", "fairness_key": "'x'"}]})


@kflow.workflow(name="fair.code", version=1)
async def code_flow(ctx: Any, input: Any) -> Any:
    await ctx.activity("t", 1, fairness_key=input["customer"])
    return await ctx.activity("t", 2)


def test_code_activities_take_the_key_of_the_call() -> None:
    h = EngineHarness()
    h.defs.add(kflow.authoring.definition_of(code_flow))
    h.activity("t", lambda x: x)
    h.auto_run_tasks = False
    h.start("fair.code", "i1", {"customer": "c-7"})
    first = h.pending_tasks.popleft()
    assert first.fairness_key == "c-7"
    h.run_task(first)
    h.drain()
    assert h.pending_tasks.popleft().fairness_key is None


# -- kflow bench --mix ---------------------------------------------------------------------------------
def test_bench_mix_passes_its_options_and_refuses_other_workloads(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from typer.testing import CliRunner

    from kflow.cli import app

    calls: list[tuple[Any, ...]] = []

    def fake_run_mix(bootstrap: Any, n: int, prefix: Any, rate: Any = None, partitions: int = 4,
                     json_out: Any = None) -> None:
        calls.append((bootstrap, n, prefix, rate, partitions, json_out))

    monkeypatch.setitem(sys.modules, "kflow.dev.bench", types.SimpleNamespace(run_mix=fake_run_mix))
    runner = CliRunner()
    assert runner.invoke(app, ["bench", "--mix"]).exit_code == 0
    assert runner.invoke(app, ["bench", "--mix", "-n", "30", "--rate", "12.5", "--partitions", "2",
                               "--json", "out.json"]).exit_code == 0
    assert calls == [(None, 2000, None, None, 4, None), (None, 30, None, 12.5, 2, "out.json")]
    refused = runner.invoke(app, ["bench", "--mix", "--curve"])
    assert refused.exit_code != 0 and "--mix runs its own spec workload" in refused.output
    assert len(calls) == 2
    assert "--mix" in runner.invoke(app, ["bench", "--help"]).output


def test_the_mix_is_one_fifth_critical() -> None:
    from kflow.dev.bench import BACKGROUND, CRITICAL, mix_level

    levels = [mix_level(v) for v in range(100)]
    assert levels.count(CRITICAL) == 20 and levels.count(BACKGROUND) == 80


# -- recording -----------------------------------------------------------------------------------------
def test_a_promoted_start_is_counted_and_logged_and_queue_wait_is_per_level_and_key(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from kflow._worker import metrics
    from kflow._worker.runner import Loop

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    monkeypatch.setattr(metrics, "_key_labels", set())
    monkeypatch.setattr(metrics, "MAX_KEY_LABELS", 1)
    task = Task("o-1", "a-1", 2, "n", "fq", None, "w", 0)
    job = SimpleNamespace(queue="fq", task=task)
    before = sample("kflow_worker_task_promotions_total", queue="fq", from_level="5", to_level="4")
    waits = sample("kflow_worker_queue_wait_seconds_count", queue="fq", level="5", key="acme")
    with caplog.at_level("INFO", logger="kflow.worker"):
        Loop._started(None, job, Picked(job, 5, 4, ("fq", "acme"), 61_000))  # type: ignore[arg-type]
    assert sample("kflow_worker_task_promotions_total", queue="fq", from_level="5", to_level="4") == before + 1
    assert sample("kflow_worker_queue_wait_seconds_count", queue="fq", level="5", key="acme") == waits + 1
    assert "promoted from level 5 to 4 after waiting 61000 ms" in caplog.text
    others = sample("kflow_worker_queue_wait_seconds_count", queue="fq", level="3", key=metrics.OTHER_KEYS)
    Loop._started(None, job, Picked(job, 3, 3, ("fq", "zeta"), 5))  # type: ignore[arg-type]
    assert sample("kflow_worker_queue_wait_seconds_count", queue="fq", level="3", key=metrics.OTHER_KEYS) == others + 1
    assert sample("kflow_worker_task_promotions_total", queue="fq", from_level="3", to_level="3") == 0


def test_a_bad_fairness_key_expression_is_refused_at_deploy() -> None:
    from kflow.model.errors import DefinitionError
    from kflow.testing.harness import EngineHarness

    h = EngineHarness()
    with pytest.raises(DefinitionError, match="invalid expression"):
        h.deploy({"name": "x", "steps": [{"id": "a", "task": "t", "fairness_key": "input.customer +"}]})
    h.deploy({"name": "y", "steps": [{"id": "a", "task": "t", "fairness_key": "input.customer"}]})  # the control
