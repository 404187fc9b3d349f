"""Schedules through the pure engine with a manual clock: fire times across DST, jitter, overlap
policies, catch-up after downtime, backfill, pause, trigger, delete and bad declarations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from kflow.engine import decide
from kflow.engine.schedules import (
    ScheduleSpec,
    ScheduleSpecError,
    backfill_times,
    iso,
    jitter_ms,
    key_of,
    next_runs,
    overlap_action,
    run_id,
)
from kflow.model.messages import Command
from kflow.testing.harness import EngineHarness, ManualClock

JOB = {"name": "job", "version": 1, "steps": [{"id": "w", "wait": {"signal": "done"}}]}
QUICK = {"name": "quick", "version": 1, "steps": [{"id": "s", "set": {"x": "1"}}]}


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def isos(times: list[int]) -> list[str]:
    return [iso(t) for t in times]


def harness(at: str) -> EngineHarness:
    h = EngineHarness(ManualClock(ms(at)))
    h.deploy(JOB)
    h.deploy(QUICK)
    return h


def create(h: EngineHarness, sid: str = "s", workflow: str = "job", replace: bool = False, **kw: Any) -> None:
    spec = ScheduleSpec.build(sid, workflow, **kw)
    h.send("CreateSchedule", key_of(sid), spec=spec.to_dict(), replace=replace)


def runs(h: EngineHarness, sid: str = "s") -> list[str]:
    """Run ids the schedule started, in start order (the instances that exist)."""
    return [iid for iid in h.states if iid.startswith(f"{sid}:")]


def sched(h: EngineHarness, sid: str = "s") -> dict[str, Any]:
    return h.states[key_of(sid)]


def finish(h: EngineHarness, rid: str) -> None:
    h.signal(rid, "done")
    assert h.status(rid) == "COMPLETED"


# -- fire times ---------------------------------------------------------------------------------
def test_cron_in_a_time_zone_fires_at_local_wall_time() -> None:
    spec = ScheduleSpec.build("s", "job", cron="0 9 * * 1-5", timezone="America/New_York")
    # Friday 2026-01-09 and Monday 2026-01-12, 09:00 EST = 14:00 UTC; the weekend is skipped
    assert isos(next_runs(spec, ms("2026-01-09T12:00:00Z"), 2)) == ["2026-01-09T14:00:00Z", "2026-01-12T14:00:00Z"]


def test_spring_forward_skipped_wall_time_fires_once_shifted_berlin() -> None:
    spec = ScheduleSpec.build("s", "job", cron="30 2 * * *", timezone="Europe/Berlin")
    # 2026-03-29 02:30 does not exist in Berlin: it fires once at 03:30 CEST (01:30Z)
    assert isos(next_runs(spec, ms("2026-03-28T00:00:00Z"), 3)) == [
        "2026-03-28T01:30:00Z", "2026-03-29T01:30:00Z", "2026-03-30T00:30:00Z"]


def test_spring_forward_every_half_hour_never_fires_an_instant_twice_new_york() -> None:
    spec = ScheduleSpec.build("s", "job", cron="*/30 * * * *", timezone="America/New_York")
    # 2026-03-08: 02:00 and 02:30 EST do not exist; they map to 03:00 and 03:30 EDT, which are
    # scheduled anyway: each instant fires once
    got = isos(next_runs(spec, ms("2026-03-08T06:00:00Z"), 5))  # 01:00 EST
    assert got == ["2026-03-08T06:00:00Z", "2026-03-08T06:30:00Z", "2026-03-08T07:00:00Z",
                   "2026-03-08T07:30:00Z", "2026-03-08T08:00:00Z"]
    assert len(set(got)) == len(got)


def test_fall_back_repeated_hour_fires_once_berlin() -> None:
    spec = ScheduleSpec.build("s", "job", cron="30 2 * * *", timezone="Europe/Berlin")
    # 2026-10-25 02:30 happens twice (CEST, then CET): it fires once, at the first (00:30Z)
    assert isos(next_runs(spec, ms("2026-10-24T12:00:00Z"), 2)) == ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]


def test_fall_back_hourly_fires_each_wall_time_once_new_york() -> None:
    spec = ScheduleSpec.build("s", "job", cron="0 * * * *", timezone="America/New_York")
    # 2026-11-01: 01:00 EDT (05:00Z), then 01:00 EST (06:00Z) is the same wall time: not again
    got = isos(next_runs(spec, ms("2026-11-01T04:30:00Z"), 3))
    assert got == ["2026-11-01T05:00:00Z", "2026-11-01T07:00:00Z", "2026-11-01T08:00:00Z"]


def test_dst_through_the_engine_spring_forward_starts_one_run() -> None:
    h = harness("2026-03-28T12:00:00Z")
    create(h, workflow="quick", cron="30 2 * * *", timezone="Europe/Berlin")
    for _ in range(24 * 6):  # to noon on 2026-03-29, ten minutes at a time
        h.advance(600)
    assert runs(h) == ["s:2026-03-29T01:30:00Z"]
    assert h.status("s:2026-03-29T01:30:00Z") == "COMPLETED"
    assert iso(sched(h)["next_ms"]) == "2026-03-30T00:30:00Z"


def test_intervals_count_from_start_or_the_epoch() -> None:
    spec = ScheduleSpec.build("s", "job", every="1h")
    assert isos(next_runs(spec, ms("2026-01-01T10:20:00Z"), 2)) == ["2026-01-01T11:00:00Z", "2026-01-01T12:00:00Z"]
    spec = ScheduleSpec.build("s", "job", every="1h", start="2026-01-01T10:15:00Z", end="2026-01-01T12:15:00Z")
    assert isos(next_runs(spec, ms("2026-01-01T00:00:00Z"), 5)) == [
        "2026-01-01T10:15:00Z", "2026-01-01T11:15:00Z", "2026-01-01T12:15:00Z"]


def test_jitter_is_deterministic_and_bounded() -> None:
    offsets = [jitter_ms("s", t, 30_000) for t in range(0, 3_600_000 * 50, 3_600_000)]
    assert offsets == [jitter_ms("s", t, 30_000) for t in range(0, 3_600_000 * 50, 3_600_000)]
    assert all(0 <= o < 30_000 for o in offsets) and len(set(offsets)) > 40
    assert jitter_ms("other", 0, 30_000) != jitter_ms("s", 0, 30_000) or jitter_ms("other", 1, 30_000) != jitter_ms("s", 1, 30_000)
    assert jitter_ms("s", 5, 0) == 0


def test_jitter_delays_the_run_but_not_its_id() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, workflow="quick", every="1h", jitter="10m")
    delay = jitter_ms("s", ms("2026-01-01T01:00:00Z"), 600_000)
    assert delay > 0
    h.advance(3600 + delay / 1000 - 1)
    assert runs(h) == []
    h.advance(1)
    assert runs(h) == ["s:2026-01-01T01:00:00Z"]


def test_run_ids_are_deterministic() -> None:
    assert run_id("nightly", ms("2026-03-29T01:00:00Z")) == "nightly:2026-03-29T01:00:00Z"
    assert run_id("n", ms("2026-03-29T01:00:00.250Z")) == "n:2026-03-29T01:00:00.250Z"


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, problem", [
    ({"cron": "61 * * * *"}, "cron: '61 * * * *' is not a valid cron expression"),
    ({"cron": "0 0 * * * *"}, "cron: expected 5 fields"),
    ({"cron": "0 0 30 2 *"}, "never fires"),
    ({"cron": "@sometimes"}, "unknown alias"),
    ({"cron": "0 * * * *", "timezone": "Europe/Atlantis"}, "timezone: expected an IANA time zone"),
    ({"every": "soon"}, "every: expected a duration"),
    ({"cron": "0 * * * *", "every": "1h"}, "exactly one of cron and every"),
    ({"every": "1h", "overlap": "queue"}, "overlap: expected one of skip, buffer_one"),
    ({"every": "1h", "start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "end after the start"),
    ({"every": "1h", "start": "2026-01-02T00:00:00"}, "with a time zone"),
])
def test_bad_declarations_are_one_clear_error(kw: dict[str, Any], problem: str) -> None:
    with pytest.raises(ScheduleSpecError) as e:
        ScheduleSpec.build("s", "job", **kw)
    assert problem in str(e.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ScheduleSpecError) as e:
        ScheduleSpec.build("bad id", "job", cron="nope", timezone="Nowhere/Land")
    assert len(e.value.problems) == 3 and str(e.value).startswith("invalid schedule 'bad id': ")


def test_a_bad_declaration_sent_anyway_applies_nothing() -> None:
    h = harness("2026-01-01T00:00:00Z")
    bad = {**ScheduleSpec.build("s", "job", every="1h").to_dict(), "cron": "0 * * * *", "timezone": "Mars/Olympus"}
    h.send("CreateSchedule", key_of("s"), spec=bad, replace=False)
    assert key_of("s") not in h.states
    (cmd, reason), = h.dlq
    assert "timezone" in reason and "exactly one of cron and every" in reason
    create(h, every="1h")
    h.send("CreateSchedule", key_of("s"), spec={**bad, "every_ms": None, "cron": "99 * * * *"}, replace=True)
    assert h.events(key_of("s"))[-1] == "CommandRejected"
    assert sched(h)["spec"]["every_ms"] == 3_600_000  # the old declaration stays


# -- the engine: firing, pause, trigger, delete ---------------------------------------------------
def test_fires_each_scheduled_time_once_with_its_id_and_arms_the_next() -> None:
    h = harness("2026-01-01T00:00:30Z")
    create(h, workflow="quick", every="1m")
    assert iso(sched(h)["next_ms"]) == "2026-01-01T00:01:00Z"
    h.advance(30)
    h.advance(60)
    assert runs(h) == ["s:2026-01-01T00:01:00Z", "s:2026-01-01T00:02:00Z"]
    assert h.states["s:2026-01-01T00:01:00Z"]["parent_id"] == "schedule:s"
    assert h.events(key_of("s")).count("ScheduleRunClosed") == 2


def test_a_refired_timer_starts_nothing_twice() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, every="1m")
    before = dict(sched(h))
    tid = next(iter(before["timers"]))
    h.advance(60)
    assert runs(h) == ["s:2026-01-01T00:01:00Z"]
    # the same timer delivered again (a redelivery after a crash): it is no longer armed
    h.send("FireTimer", key_of("s"), timer_id=tid)
    assert runs(h) == ["s:2026-01-01T00:01:00Z"]
    # and deciding the original timer again from the old state yields the same run id
    d = decide(before, Command("FireTimer", key_of("s"), {"timer_id": tid}), ms("2026-01-01T00:01:00Z"), h.defs)
    assert [c.instance_id for c in d.commands] == ["s:2026-01-01T00:01:00Z"]


def test_pause_stops_runs_and_unpause_resumes_from_now_without_catching_up() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, workflow="quick", every="1m")
    h.send("PauseSchedule", key_of("s"), note="maintenance window")
    assert sched(h)["paused"] and sched(h)["note"] == "maintenance window" and sched(h)["timers"] == {}
    h.advance(600)
    assert runs(h) == []
    h.send("PauseSchedule", key_of("s"), note="again")
    assert h.events(key_of("s"))[-1] == "CommandRejected"
    h.send("UnpauseSchedule", key_of("s"), note="done")
    h.advance(60)
    assert runs(h) == ["s:2026-01-01T00:11:00Z"]


def test_trigger_now_starts_a_run_at_now() -> None:
    h = harness("2026-01-01T00:00:10Z")
    create(h, cron="0 0 1 1 *")
    h.send("TriggerSchedule", key_of("s"), overlap=None)
    assert runs(h) == ["s:2026-01-01T00:00:10Z"]
    h.send("TriggerSchedule", key_of("s"), overlap=None)  # the first still runs: skip
    assert runs(h) == ["s:2026-01-01T00:00:10Z"]
    h.send("TriggerSchedule", key_of("s"), overlap="allow_all")  # same instant, same id: refused
    assert runs(h) == ["s:2026-01-01T00:00:10Z"]
    assert h.events("s:2026-01-01T00:00:10Z")[-1] == "CommandRejected"
    h.clock.advance(1)
    h.send("TriggerSchedule", key_of("s"), overlap="allow_all")
    assert runs(h) == ["s:2026-01-01T00:00:10Z", "s:2026-01-01T00:00:11Z"]


def test_delete_stops_the_schedule_and_a_new_one_may_take_its_name() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, workflow="quick", every="1m")
    h.send("DeleteSchedule", key_of("s"), reason="retired")
    h.advance(300)
    assert runs(h) == []
    h.send("TriggerSchedule", key_of("s"), overlap=None)
    assert h.events(key_of("s"))[-1] == "CommandRejected"
    create(h, workflow="quick", every="1m")
    h.advance(60)
    assert runs(h) == ["s:2026-01-01T00:06:00Z"]


def test_creating_an_existing_schedule_is_refused_unless_replaced() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, every="1m")
    create(h, every="1h")
    assert h.events(key_of("s"))[-1] == "CommandRejected"
    create(h, every="1h", replace=True)
    assert iso(sched(h)["next_ms"]) == "2026-01-01T01:00:00Z"


def test_workflow_commands_to_a_schedule_are_rejected() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, every="1m")
    h.send("CancelWorkflow", key_of("s"), reason="x")
    assert "is a schedule" in h.history[key_of("s")][-1].data["reason"]


def test_end_date_stops_firing() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, workflow="quick", every="1m", end="2026-01-01T00:02:00Z")
    for _ in range(10):
        h.advance(60)
    assert runs(h) == ["s:2026-01-01T00:01:00Z", "s:2026-01-01T00:02:00Z"]
    assert sched(h)["next_ms"] is None and sched(h)["timers"] == {}


# -- overlap policies ------------------------------------------------------------------------------
def test_overlap_action_table() -> None:
    assert overlap_action("skip", running=False, buffered=False) == "start"
    assert overlap_action("skip", running=True, buffered=False) == "skip"
    assert overlap_action("allow_all", running=True, buffered=True) == "start"
    assert overlap_action("buffer_one", running=True, buffered=False) == "buffer"
    assert overlap_action("buffer_one", running=True, buffered=True) == "skip"
    assert overlap_action("cancel_other", running=True, buffered=False) == "cancel"
    assert overlap_action("terminate_other", running=True, buffered=True) == "terminate"


def test_overlap_skip() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, every="1m", overlap="skip")
    h.advance(60)
    h.advance(60)
    assert runs(h) == ["s:2026-01-01T00:01:00Z"]
    assert sched(h)["recent"][-1]["skipped"] == ["s:2026-01-01T00:02:00Z"]
    finish(h, "s:2026-01-01T00:01:00Z")
    h.advance(60)
    assert runs(h)[-1] == "s:2026-01-01T00:03:00Z"


def test_overlap_buffer_one_starts_one_buffered_run_when_the_open_one_closes() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, every="1m", overlap="buffer_one")
    h.advance(60)
    h.advance(60)
    h.advance(60)  # 00:02 is buffered, 00:03 skipped (one buffer)
    assert runs(h) == ["s:2026-01-01T00:01:00Z"]
    assert sched(h)["buffered"]["run_id"] == "s:2026-01-01T00:02:00Z"
    finish(h, "s:2026-01-01T00:01:00Z")
    assert runs(h) == ["s:2026-01-01T00:01:00Z", "s:2026-01-01T00:02:00Z"]
    assert sched(h)["buffered"] is None and sched(h)["running"] == ["s:2026-01-01T00:02:00Z"]


def test_overlap_allow_all() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, every="1m", overlap="allow_all")
    for _ in range(3):
        h.advance(60)
    assert len(runs(h)) == 3 and all(h.status(r) == "RUNNING" for r in runs(h))
    assert len(sched(h)["running"]) == 3


@pytest.mark.parametrize("policy, closed", [("cancel_other", "CANCELLED"), ("terminate_other", "TERMINATED")])
def test_overlap_stops_the_open_run_then_starts_the_new_one(policy: str, closed: str) -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, every="1m", overlap=policy)
    h.advance(60)
    h.advance(60)
    first, second = "s:2026-01-01T00:01:00Z", "s:2026-01-01T00:02:00Z"
    assert h.status(first) == closed
    assert runs(h) == [first, second] and h.status(second) == "RUNNING"
    assert sched(h)["running"] == [second] and sched(h)["buffered"] is None


# -- catch-up ---------------------------------------------------------------------------------------
def test_catch_up_after_an_hour_down_fires_the_runs_within_the_window() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, workflow="quick", every="10m", catchup_window="25m", overlap="allow_all")
    h.advance(3600 + 5)  # the engine was down; its timer fires once, an hour late
    # runs due at 00:10 .. 01:00: those within 25 minutes of 01:00:05 (00:40, 00:50, 01:00) start
    assert runs(h) == ["s:2026-01-01T00:40:00Z", "s:2026-01-01T00:50:00Z", "s:2026-01-01T01:00:00Z"]
    fired = [e for e in h.history[key_of("s")] if e.type == "ScheduleFired"][0]
    assert fired.data["outcome"]["missed"] == 3  # 00:10, 00:20, 00:30
    assert iso(sched(h)["next_ms"]) == "2026-01-01T01:10:00Z"


def test_catch_up_with_skip_starts_only_one_missed_run() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, every="10m", catchup_window="1h", overlap="skip")
    h.advance(3600 + 5)
    assert runs(h) == ["s:2026-01-01T00:10:00Z"]
    fired = [e for e in h.history[key_of("s")] if e.type == "ScheduleFired"][0]
    assert len(fired.data["outcome"]["skipped"]) == 5


def test_catch_up_window_zero_skips_every_missed_run_but_tolerates_ten_seconds() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, workflow="quick", every="10m", catchup_window="0s")
    h.advance(3600 + 30)
    assert runs(h) == []
    h.advance(570 + 9)  # 9 s late: a timer firing late is not a missed run
    assert runs(h) == ["s:2026-01-01T01:10:00Z"]


def test_a_long_catch_up_is_bounded_per_transaction() -> None:
    h = harness("2026-01-01T00:00:00Z")
    create(h, workflow="quick", every="1s", catchup_window="1h", overlap="allow_all")
    h.advance(3600)
    assert len(runs(h)) == 3600 and len(set(runs(h))) == 3600
    fires = [e for e in h.history[key_of("s")] if e.type == "ScheduleFired"]
    assert max(len(e.data["outcome"]["started"]) for e in fires) == 100


# -- backfill -----------------------------------------------------------------------------------------
def test_backfill_starts_each_scheduled_time_of_the_range_once() -> None:
    h = harness("2026-01-02T00:00:00Z")
    create(h, workflow="quick", cron="0 6 * * *", timezone="Europe/Berlin")
    h.send("BackfillSchedule", key_of("s"), start_ms=ms("2025-12-29T00:00:00Z"), end_ms=ms("2026-01-01T05:00:00Z"))
    assert runs(h) == ["s:2025-12-29T05:00:00Z", "s:2025-12-30T05:00:00Z", "s:2025-12-31T05:00:00Z"]
    assert all(h.status(r) == "COMPLETED" for r in runs(h))
    # the same range again starts nothing new: the ids exist
    h.send("BackfillSchedule", key_of("s"), start_ms=ms("2025-12-28T00:00:00Z"), end_ms=ms("2026-01-01T06:00:00Z"))
    assert sorted(runs(h)) == ["s:2025-12-28T05:00:00Z", "s:2025-12-29T05:00:00Z", "s:2025-12-30T05:00:00Z",
                               "s:2025-12-31T05:00:00Z", "s:2026-01-01T05:00:00Z"]
    assert h.events("s:2025-12-29T05:00:00Z")[-1] == "CommandRejected"


def test_backfill_rejects_a_too_large_or_empty_range() -> None:
    spec = ScheduleSpec.build("s", "job", every="1s")
    with pytest.raises(ValueError, match="at most 1000 runs"):
        backfill_times(spec, 0, 2_000_000)
    h = harness("2026-01-02T00:00:00Z")
    create(h, every="1s")
    h.send("BackfillSchedule", key_of("s"), start_ms=0, end_ms=2_000_000)
    assert "at most 1000 runs" in h.history[key_of("s")][-1].data["reason"]
    h.send("BackfillSchedule", key_of("s"), start_ms=5, end_ms=5)
    assert h.history[key_of("s")][-1].data["code"] == "INVALID_INPUT"
