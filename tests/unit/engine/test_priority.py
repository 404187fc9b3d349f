"""Priority levels: parsing, the worker's selection policy, topic names, wire compatibility, engine plumbing."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form
from hypothesis import given
from hypothesis import strategies as st

import kflow
import kflow.authoring
import kflow.schemas
from kflow._worker.priority import DEFAULT_WEIGHTS, next_level, served
from kflow.model.errors import DefinitionError
from kflow.model.messages import PRIORITIES, Command, Task, priority_level
from kflow.model.spec import WorkflowSpec
from kflow.schemas.codec import decode_command, decode_task, encode_command, encode_task
from kflow.streams.topics import TopicNames, TopicSettings, level_topics, topic_specs
from kflow.testing.harness import EngineHarness

LEVELS = sorted(PRIORITIES.values())
SCHEMAS = kflow.schemas.__path__[0]


# -- levels ------------------------------------------------------------------------------------------
def test_levels_parse_by_name_or_number_and_none_inherits() -> None:
    assert [priority_level(n) for n in ("critical", "high", "normal", "low", "background")] == [1, 2, 3, 4, 5]
    assert priority_level(" High ") == 2
    assert priority_level(4) == 4
    assert priority_level(None) is None


@pytest.mark.parametrize("bad", ["urgent", "", 0, 6, True, 2.0])
def test_an_unknown_level_is_one_clear_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="unknown priority .*critical, high, normal, low, background"):
        priority_level(bad)


def test_spec_priorities_are_validated_and_stored_as_levels() -> None:
    spec = WorkflowSpec.model_validate({"name": "w", "priority": "high",
                                        "steps": [{"id": "s", "task": "t", "priority": "background"}]})
    assert (spec.priority, spec.steps[0].priority) == (2, 5)
    with pytest.raises(ValueError, match="unknown priority 'urgent'"):
        WorkflowSpec.model_validate({"name": "w", "priority": "urgent", "steps": [{"id": "s", "task": "t"}]})


# -- selection policy ----------------------------------------------------------------------------------
def serve(waiting: dict[int, int], policy: str, n: int) -> list[int]:
    """Serve ``n`` tasks from levels that never run dry; the levels served, in order."""
    credit: dict[int, int] = {}
    out = []
    for _ in range(n):
        level = next_level(waiting, policy, credit)  # type: ignore[arg-type]
        assert level is not None
        credit = served(level, waiting, credit)
        out.append(level)
    return out


def test_nothing_waiting_serves_nothing() -> None:
    assert next_level({}, "weighted", {}) is None
    assert next_level({1: 0, 5: 0}, "strict", {}) is None


def test_strict_always_serves_the_most_urgent_level_with_work() -> None:
    assert set(serve({1: 3, 2: 1, 5: 100}, "strict", 50)) == {1}
    assert set(serve({2: 1, 5: 100}, "strict", 50)) == {2}


def test_weighted_serves_every_level_in_proportion_to_its_weight() -> None:
    total = sum(DEFAULT_WEIGHTS.values())
    counts = Counter(serve({level: 1_000 for level in LEVELS}, "weighted", total * 3))
    assert counts == {level: 3 * w for level, w in DEFAULT_WEIGHTS.items()}


def test_weighted_serves_critical_before_a_background_backlog() -> None:
    assert serve({1: 3, 5: 1_000}, "weighted", 3) == [1, 1, 1]


def test_asking_twice_without_serving_gives_the_same_level() -> None:
    credit = {1: -50, 5: 40}
    assert next_level({1: 1, 5: 1}, "weighted", credit) == next_level({1: 1, 5: 1}, "weighted", credit)


@given(ready=st.sets(st.sampled_from(LEVELS), min_size=1), n=st.integers(1, 400))
def test_weighted_never_starves_a_level_with_work(ready: set[int], n: int) -> None:
    """Each level with work is served at least once in every 2 * ceil(W / w) consecutive starts."""
    order = serve({level: 10**6 for level in ready}, "weighted", n)
    total = sum(DEFAULT_WEIGHTS[level] for level in ready)
    for level in ready:
        bound = 2 * math.ceil(total / DEFAULT_WEIGHTS[level])
        positions = [-1, *(i for i, lv in enumerate(order) if lv == level), len(order)]
        longest = max(b - a - 1 for a, b in itertools.pairwise(positions))  # starts in a row without it
        assert longest < bound, (level, order)


def test_an_idle_level_banks_no_credit() -> None:
    """Background alone for a long time, then critical work: critical is served first at once."""
    credit: dict[int, int] = {}
    for _ in range(500):
        credit = served(5, {5: 1}, credit)
    assert next_level({1: 1, 5: 1}, "weighted", credit) == 1


# -- topics ------------------------------------------------------------------------------------------
def test_normal_work_keeps_its_topic_and_other_levels_get_their_own() -> None:
    names = TopicNames("kflow.")
    assert names.tasks("pay") == names.tasks("pay", 3) == "kflow.tasks.pay"
    assert names.tasks("pay", 1) == "kflow.tasks.pay.p1"
    assert level_topics("kflow.tasks.pay") == {"kflow.tasks.pay.p1": 1, "kflow.tasks.pay.p2": 2, "kflow.tasks.pay": 3,
                                               "kflow.tasks.pay.p4": 4, "kflow.tasks.pay.p5": 5}
    with pytest.raises(ValueError, match="unknown priority"):
        names.tasks("pay", 7)
    specs = {s.name for s in topic_specs(names, TopicSettings(), ["pay"])}
    assert set(level_topics("kflow.tasks.pay")) <= specs


# -- wire compatibility -----------------------------------------------------------------------------
def previous(name: str, drop: Any) -> tuple[dict[str, Any], bytes]:
    """The schema as it was before ``priority`` (dropped by ``drop``) and its single-object header."""
    raw = json.loads(Path(SCHEMAS, f"{name}.avsc").read_text())
    drop(raw)
    canonical = to_parsing_canonical_form(fastavro.parse_schema(raw))
    return raw, b"\xc3\x01" + bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))


def without_field(fields: list[dict[str, Any]]) -> None:
    assert fields[-1]["name"] == "priority"
    fields.pop()


def written(raw: dict[str, Any], header: bytes, record: dict[str, Any]) -> bytes:
    buf = BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(raw), record)
    return header + buf.getvalue()


def test_a_start_written_before_priorities_still_reads() -> None:
    def drop(raw: dict[str, Any]) -> None:
        body = next(f for f in raw["fields"] if f["name"] == "body")
        without_field(next(b for b in body["type"] if b["name"] == "StartWorkflow")["fields"])

    raw, header = previous("command", drop)
    record = {"format": 1, "command_id": "c1", "instance_id": "o-1", "ts": 5,
              "body": ("kflow.StartWorkflow", {"workflow": "order", "version": None, "input": "{}", "parent_id": None,
                                               "parent_ref": None, "id_reuse": None})}
    cmd = decode_command(written(raw, header, record))
    assert cmd.data["workflow"] == "order" and cmd.data["priority"] is None


def test_a_task_written_before_priorities_still_reads() -> None:
    def drop(raw: dict[str, Any]) -> None:
        del raw["fields"][[f["name"] for f in raw["fields"]].index("priority") + 1:]  # fields appended later
        without_field(raw["fields"])

    raw, header = previous("task", drop)
    record = {"instance_id": "o-1", "activity_id": "a", "attempt": 1, "name": "n", "queue": "q", "input": "1",
              "workflow": "w", "scheduled_ms": 7, "kind": "run", "report_start": False, "attempt_token": None}
    task = decode_task(written(raw, header, record))
    assert (task.name, task.priority) == ("n", None)


def test_priority_round_trips_on_starts_and_tasks() -> None:
    cmd = Command("StartWorkflow", "o-1", {"workflow": "w", "priority": 1})
    assert decode_command(encode_command(cmd)).data["priority"] == 1
    task = Task("o-1", "a", 1, "n", "q", None, "w", 0, priority=5)
    assert decode_task(encode_task(task)).priority == 5


# -- engine ------------------------------------------------------------------------------------------
def harness(*docs: dict[str, Any]) -> EngineHarness:
    h = EngineHarness()
    for doc in docs:
        h.deploy(doc)
    h.activity("t", lambda x: x)
    h.auto_run_tasks = False
    return h


TWO_TASKS = {"name": "w", "steps": [{"id": "a", "task": "t"}, {"id": "b", "task": "t", "priority": "low"}]}


def test_a_start_level_is_recorded_and_its_tasks_inherit_it_unless_a_step_overrides() -> None:
    h = harness(TWO_TASKS)
    h.send("StartWorkflow", "i1", workflow="w", priority=1)
    assert h.states["i1"]["priority"] == 1
    first = h.pending_tasks.popleft()
    assert first.priority == 1
    h.run_task(first)
    h.drain()
    assert h.pending_tasks.popleft().priority == 4


def test_without_a_level_tasks_stay_normal_and_the_definition_default_applies() -> None:
    h = harness(TWO_TASKS, {"name": "d", "priority": "background", "steps": [{"id": "a", "task": "t"}]})
    h.start("w", "i1")
    assert h.pending_tasks.popleft().priority is None
    assert "priority" not in h.states["i1"]
    h.start("d", "i2")
    assert h.pending_tasks.popleft().priority == 5


def test_children_inherit_the_parent_level() -> None:
    h = harness({"name": "kid", "steps": [{"id": "a", "task": "t"}]},
                {"name": "parent", "steps": [{"id": "c", "child": {"workflow": "kid", "id": "'k1'"}}]})
    h.send("StartWorkflow", "p1", workflow="parent", priority=2)
    assert h.states["k1"]["priority"] == 2
    assert h.pending_tasks.popleft().priority == 2


def test_an_out_of_range_level_on_the_wire_is_dead_lettered() -> None:
    h = harness(TWO_TASKS)
    h.send("StartWorkflow", "i1", workflow="w", priority=9)
    assert "i1" not in h.states
    assert "unknown priority 9" in h.dlq[0][1]


def test_a_bad_level_in_a_definition_is_a_definition_error() -> None:
    h = EngineHarness()
    with pytest.raises((DefinitionError, ValueError), match="unknown priority"):
        h.deploy({"name": "w", "steps": [{"id": "a", "task": "t", "priority": "asap"}]})


@kflow.workflow(name="prio.code", version=1)
async def code_flow(ctx: Any, input: Any) -> Any:
    await ctx.activity("t", 1)
    return await ctx.activity("t", 2, priority="background")


def test_code_activities_inherit_the_instance_level_unless_the_call_sets_one() -> None:
    h = EngineHarness()
    h.defs.add(kflow.authoring.definition_of(code_flow))
    h.activity("t", lambda x: x)
    h.auto_run_tasks = False
    h.send("StartWorkflow", "i1", workflow="prio.code", priority=2)
    first = h.pending_tasks.popleft()
    assert first.priority == 2
    h.run_task(first)
    h.drain()
    assert h.pending_tasks.popleft().priority == 5


def test_a_code_activity_with_an_unknown_level_fails_the_workflow_clearly() -> None:
    h = EngineHarness()
    h.defs.add(kflow.authoring.definition_of(bad_level))
    h.start("prio.bad", "i1")
    assert h.status("i1") == "FAILED"
    assert "unknown priority 'asap'" in h.states["i1"]["error"]["message"]


@kflow.workflow(name="prio.bad", version=1)
async def bad_level(ctx: Any, input: Any) -> Any:
    return await ctx.activity("t", 1, priority="asap")
