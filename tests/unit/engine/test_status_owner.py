"""``QueryStatus`` decided by the pure engine: the owner's answer, and where the history starts.

The engine answers a status query from the state it decides on, as a reply (never an event), with
the public state-record fields plus ``events_offset``; an unknown id is a clear "not found" answer,
not a dead letter. ``events_offset`` (stamped by the processor) survives every later decision,
including an id reused after close.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

import kflow
from kflow.engine import InMemoryDefinitions, compile_spec, decide
from kflow.engine.core import EVENTS_OFFSET, status_record
from kflow.model.messages import Command, JSONDict, Status
from kflow.schemas.codec import MAGIC, decode_command, encode_command
from kflow.streams.processor import state_record

NOW = 1_700_000_000_000

TASK_WF = {"name": "orders", "version": 1, "steps": [
    {"id": "charge", "task": "charge", "output": "r"},
    {"id": "done", "succeed": "r"},
]}
FAIL_WF = {"name": "broken", "version": 1, "steps": [{"id": "no", "fail": {"error": "OutOfStock"}}]}


@kflow.workflow(name="so.rounds", version=1)
async def rounds(ctx, n):  # type: ignore[no-untyped-def]
    await ctx.wait_signal("next")
    if n < 3:
        ctx.continue_as_new(n + 1)
    return n


def defs() -> InMemoryDefinitions:
    d = InMemoryDefinitions()
    for doc in (TASK_WF, FAIL_WF):
        d.add(compile_spec(doc))
    d.add(kflow.authoring.definition_of(rounds))
    return d


def start(iid: str = "i1", workflow: str = "orders", **extra: Any) -> Command:
    data = {"workflow": workflow, "version": None, "input": {"n": 1}, "parent_id": None, "parent_ref": None,
            "id_reuse": None, **extra}
    return Command("StartWorkflow", iid, data, command_id=f"start-{iid}")


def ask(state: JSONDict | None, iid: str = "i1", qid: str = "q1") -> tuple[JSONDict, Any]:
    """Decide a QueryStatus; returns the answer and the decision (checked to write nothing)."""
    d = decide(state, Command("QueryStatus", iid, {"query_id": qid}, command_id=qid), NOW + 50, defs())
    assert d.events == [] and d.tasks == [] and d.commands == [] and d.dlq_reason is None
    assert d.state is state  # nothing changes, not even updated_ms
    assert [q for q, _ in d.replies] == [qid]
    return d.replies[0][1], d


def running() -> JSONDict:
    d = decide(None, start(), NOW, defs())
    assert d.state is not None and d.state["status"] == Status.RUNNING
    return d.state


def test_unknown_id_is_a_not_found_answer_not_a_dead_letter() -> None:
    answer, _ = ask(None, "nobody")
    assert answer == {"error": {"type": "NotFound", "message": "no instance 'nobody'"}}


def test_running_instance_answers_its_state_record() -> None:
    st = running()
    answer, _ = ask(st)
    rec = answer["result"]
    assert (rec["instance_id"], rec["workflow"], rec["version"], rec["status"]) == ("i1", "orders", 1, "RUNNING")
    assert rec["seq"] == st["seq"] >= 2  # WorkflowStarted, ActivityScheduled
    assert (rec["started_ms"], rec["updated_ms"], rec["closed_ms"], rec["result"]) == (NOW, NOW, None, None)
    assert (rec["error_type"], rec["error_message"]) == (None, None)
    assert rec["internal"] == st and [a["name"] for a in rec["internal"]["activities"].values()] == ["charge"]
    assert rec["events_offset"] is None  # the pure engine never stamps an offset


def test_completed_instance_answers_its_result() -> None:
    st = running()
    aid = next(iter(st["activities"]))
    done = decide(st, Command("CompleteActivity", "i1", {"activity_id": aid, "attempt": 1, "result": "ok"}),
                  NOW + 10, defs()).state
    assert done is not None and done["status"] == Status.COMPLETED
    rec = ask(done)[0]["result"]
    assert (rec["status"], rec["result"], rec["closed_ms"], rec["seq"]) == ("COMPLETED", "ok", NOW + 10, done["seq"])


def test_failed_instance_answers_its_error() -> None:
    st = decide(None, start(workflow="broken"), NOW, defs()).state
    rec = ask(st)[0]["result"]
    assert (rec["status"], rec["error_type"]) == (Status.FAILED, "OutOfStock")


def test_the_answer_has_every_field_of_the_public_state_record() -> None:
    st = running()
    st[EVENTS_OFFSET] = 1234
    rec = status_record(st)
    assert {k: v for k, v in rec.items() if k not in ("events_offset", "internal")} == state_record(st)
    assert rec["events_offset"] == 1234 and rec["internal"] == st


def test_events_offset_survives_later_decisions_and_an_id_reused_after_close() -> None:
    st = running()
    st[EVENTS_OFFSET] = 77  # as the processor stamps it from the first event's delivery report
    aid = next(iter(st["activities"]))
    done = decide(st, Command("CompleteActivity", "i1", {"activity_id": aid, "attempt": 1, "result": 1}),
                  NOW + 1, defs()).state
    assert done is not None and done[EVENTS_OFFSET] == 77
    again = decide(done, start(id_reuse="allow_if_closed"), NOW + 2, defs()).state
    assert again is not None and again["status"] == Status.RUNNING and again["seq"] > done["seq"]
    # the history of the id (both runs) still starts at the first run's first event
    assert again[EVENTS_OFFSET] == 77
    assert ask(again)[0]["result"]["events_offset"] == 77


def test_query_status_round_trips_through_the_avro_codec() -> None:
    cmd = Command("QueryStatus", "i1", {"query_id": "q-7"}, command_id="c1", ts=5)
    back = decode_command(encode_command(cmd))
    assert (back.type, back.instance_id, back.data) == ("QueryStatus", "i1", {"query_id": "q-7"})


def test_events_offset_survives_continue_as_new() -> None:
    st = decide(None, start(workflow="so.rounds", input=1), NOW, defs()).state
    assert st is not None
    st[EVENTS_OFFSET] = 9
    nxt = decide(st, Command("SignalWorkflow", "i1", {"name": "next", "data": None}, command_id="s1"),
                 NOW + 1, defs()).state
    assert nxt is not None and nxt["run"] == 2 and nxt["status"] == Status.RUNNING
    assert nxt[EVENTS_OFFSET] == 9  # every run's events are the id's history, from the first run's start


def test_commands_written_with_the_schema_before_query_status_still_decode() -> None:
    """The new branch is appended last, and the codec reads the earlier schema's records."""
    raw = json.loads((Path(kflow.__file__).parent / "schemas" / "command.avsc").read_text())
    body = next(f for f in raw["fields"] if f["name"] == "body")
    names = [b["name"] for b in body["type"]]
    body["type"] = body["type"][:names.index("QueryStatus")]  # the command schema before QueryStatus
    old = fastavro.parse_schema(raw)
    header = MAGIC + bytes.fromhex(fingerprint(to_parsing_canonical_form(old), "CRC-64-AVRO"))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old, {"format": 1, "command_id": "c1", "instance_id": "i1", "ts": 5, "body": (
        "kflow.SignalWorkflow", {"name": "go", "data": "[1]"})})
    cmd = decode_command(header + buf.getvalue())
    assert (cmd.type, cmd.instance_id, cmd.data, cmd.command_id) == ("SignalWorkflow", "i1",
                                                                    {"name": "go", "data": [1]}, "c1")
