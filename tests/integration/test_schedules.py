"""Schedules end to end on the real broker: the engine fires an every-second schedule with
deterministic run ids, pause stops it, trigger starts a run now, and the CLI refuses bad input."""

from __future__ import annotations

import re
import uuid
from typing import Any

from typer.testing import CliRunner

from kflow._cli import schedules as schedule_cli
from kflow.testing import assert_eventually

QUICK = {"name": "sched_quick", "version": 1, "steps": [{"id": "s", "set": {"x": "1"}}]}
RUN_ID = re.compile(r"^(?P<sid>[\w.-]+):\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _cli(stack: Any, *args: str) -> Any:
    return CliRunner().invoke(schedule_cli.app, [*args, "--bootstrap", stack.bootstrap, "--prefix", stack.prefix])


def _record(stack: Any, sid: str) -> dict[str, Any]:
    return stack.client.describe_schedule(sid) or {}


def _started(stack: Any, sid: str) -> int:
    return _record(stack, sid).get("runs_started", 0)


def _runs(record: dict[str, Any]) -> list[str]:
    return [r for action in record.get("recent", []) for r in action.get("started", [])]


def test_every_second_schedule_starts_runs_with_deterministic_ids_pause_and_trigger(engine_only_stack: Any) -> None:
    stack = engine_only_stack
    client = stack.client
    client.deploy(QUICK)
    sid, witness = f"tick-{uuid.uuid4().hex[:6]}", f"witness-{uuid.uuid4().hex[:6]}"
    out = _cli(stack, "create", sid, "--workflow", "sched_quick", "--every", "1s", "--overlap", "allow_all")
    assert out.exit_code == 0 and f"created schedule {sid}; next runs: " in out.output, out.output
    client.create_schedule(witness, "sched_quick", every="1s", overlap="allow_all")

    # the engine starts a run per second; each id is <schedule>:<whole UTC second> and completes
    rec = assert_eventually(lambda: (r := _record(stack, sid)).get("runs_started", 0) >= 3 and _runs(r) and r,
                            timeout=60)
    runs = _runs(rec)
    assert runs and all(RUN_ID.match(r) and RUN_ID.match(r)["sid"] == sid for r in runs)
    assert len(set(runs)) == len(runs)
    state = assert_eventually(lambda: (s := client.status(runs[0])) and s["status"] == "COMPLETED" and s, timeout=30)
    assert state["internal"]["parent_id"] == f"schedule:{sid}"

    # pause: the schedule fires no more while the witness goes on firing
    assert _cli(stack, "pause", sid, "--note", "maintenance").exit_code == 0
    assert_eventually(lambda: _record(stack, sid).get("paused") is True, timeout=30)
    paused = _record(stack, sid)
    assert paused["note"] == "maintenance" and paused["next_runs"] == []
    before, seen = paused["runs_started"], _started(stack, witness)
    assert_eventually(lambda: _started(stack, witness) >= seen + 3, timeout=60)
    assert _started(stack, sid) == before

    # trigger now starts one run even while paused
    assert _cli(stack, "trigger", sid).exit_code == 0
    rec = assert_eventually(lambda: (r := _record(stack, sid)).get("runs_started") == before + 1 and r, timeout=30)
    (manual,) = _runs(rec)[-1:]
    assert_eventually(lambda: (client.status(manual) or {}).get("status") == "COMPLETED", timeout=30)

    listed = _cli(stack, "list")
    assert listed.exit_code == 0 and sid in listed.output and "paused (maintenance)" in listed.output

    # unpause: it fires again; delete: it is gone from the table
    assert _cli(stack, "unpause", sid).exit_code == 0
    assert_eventually(lambda: _started(stack, sid) >= before + 3, timeout=60)
    assert _cli(stack, "delete", sid).exit_code == 0
    client.delete_schedule(witness)
    assert_eventually(lambda: sid not in client.schedules() and witness not in client.schedules(), timeout=30)


def test_bad_cron_or_time_zone_is_one_error_and_nothing_is_applied(engine_only_stack: Any) -> None:
    stack = engine_only_stack
    sid = f"bad-{uuid.uuid4().hex[:6]}"
    out = _cli(stack, "create", sid, "--workflow", "sched_quick", "--cron", "0 25 * * *", "--tz", "Europe/Nowhere")
    assert out.exit_code == 1
    assert "cron: '0 25 * * *' is not a valid cron expression" in out.output
    assert "timezone: expected an IANA time zone" in out.output
    out = _cli(stack, "trigger", sid)
    assert out.exit_code == 1 and f"no schedule '{sid}'" in out.output
    assert sid not in stack.client.schedules()


def test_the_api_lists_schedules_with_their_next_runs(engine_only_stack: Any, tmp_path_factory: Any) -> None:
    import httpx

    from tests.integration.conftest import visibility_server

    stack = engine_only_stack
    stack.client.deploy(QUICK)
    sid = f"api-{uuid.uuid4().hex[:6]}"
    stack.client.create_schedule(sid, "sched_quick", cron="0 9 * * 1-5", timezone="America/New_York")
    assert_eventually(lambda: sid in stack.client.schedules(), timeout=30)
    with visibility_server(stack, tmp_path_factory, "sched-api") as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        res = http.get("/api/schedules", params={"next": 3})
        assert res.status_code == 200, res.text
        (item,) = [i for i in res.json()["items"] if i["id"] == sid]
        assert item["spec"]["cron"] == "0 9 * * 1-5" and item["paused"] is False
        # 09:00 in New York is 13:00 or 14:00 UTC, on weekdays
        assert len(item["next_runs"]) == 3 and all(r[11:19] in ("13:00:00", "14:00:00") for r in item["next_runs"])
        assert http.get("/api/schedules", params={"next": 1000}).status_code == 400
