"""Semantic versions, migration plans, what-if replay and the MigrateWorkflow decision, on the pure engine.

Driven through :class:`~kflow.testing.harness.EngineHarness`; every applied migration is checked
against the fold property (replaying the recorded history reproduces the live state).
"""

from __future__ import annotations

from typing import Any

import pytest

import kflow
from kflow._migration import MigrationPlanError, check_plan, load_plan, plan_command
from kflow.engine import compile_spec
from kflow.engine.migration import VersionRangeError, matches, resolve_version, what_if
from kflow.engine.registry import default_registry
from kflow.model.messages import Definition, RejectCode
from kflow.model.versions import format_version, version_code, version_tuple
from kflow.testing.harness import EngineHarness

#: v1: prepare, wait for approval, then ship.
V1 = {"name": "order", "version": "1.2.0", "steps": [
    {"id": "prepare", "task": "prepare", "output": "prep"},
    {"id": "approve", "wait": {"signal": "approved"}, "output": "ok"},
    {"id": "ship", "task": "ship", "input": "{'by': 'v1'}"},
]}
#: v2: the wait is renamed, and shipping says it is v2.
V2 = {"name": "order", "version": "2.0.0", "steps": [
    {"id": "prepare", "task": "prepare", "output": "prep"},
    {"id": "approval", "wait": {"signal": "approved"}, "output": "ok"},
    {"id": "ship", "task": "ship", "input": "{'by': 'v2', 'total': total}"},
]}
#: v2.1: the same steps as v1 (ids included), a different activity after the wait.
V21 = {"name": "order", "version": "2.1.0", "steps": [
    {"id": "prepare", "task": "prepare", "output": "prep"},
    {"id": "approve", "wait": {"signal": "approved"}, "output": "ok"},
    {"id": "ship", "task": "ship_fast"},
]}
#: v3: a different first activity: replaying v1 histories diverges at once.
V3 = {"name": "order", "version": "3.0.0", "steps": [
    {"id": "check", "task": "check"},
    {"id": "approval", "wait": {"signal": "approved"}},
]}


def harness(*docs: dict[str, Any]) -> EngineHarness:
    h = EngineHarness()
    for doc in docs or (V1, V2, V21, V3):
        h.deploy(doc)
    shipped: list[Any] = []
    h.activity("prepare", lambda _: {"n": 1})
    h.activity("ship", lambda x: shipped.append(x) or "shipped")
    h.activity("ship_fast", lambda x: "fast")
    h.activity("check", lambda x: "checked")
    h.shipped = shipped  # type: ignore[attr-defined]
    return h


def migrate(h: EngineHarness, iid: str, to: str = "2.0.0", frm: str = "^1", step_map: Any = None,
            vars: Any = None, transform: Any = None) -> None:
    h.send("MigrateWorkflow", iid, plan_id="p1", from_range=frm, to_version=version_code(to),
           step_map={"approve": "approval"} if step_map is None else step_map,
           vars={"total": "prep.n * 10"} if vars is None else vars, transform=transform, reason="", by="ops")


def rejection(h: EngineHarness, iid: str) -> dict[str, Any]:
    ev = h.history[iid][-1]
    assert ev.type == "CommandRejected", h.events(iid)
    return ev.data


# -- versions ------------------------------------------------------------------------------------
def test_semver_codes_order_and_format() -> None:
    assert version_code(3) == 3 and version_code("3.0.0") == 3 and format_version(3) == "3"
    assert format_version(version_code("1.4.0")) == "1.4.0"
    assert version_tuple(version_code("1.4.2")) == (1, 4, 2) and version_tuple(7) == (7, 0, 0)
    codes = [version_code(v) for v in ("2.0.0", "1.4.0", "1.10.0", 1)]
    assert [format_version(c) for c in sorted(codes, key=version_tuple)] == ["1", "1.4.0", "1.10.0", "2"]
    for bad in ("1.4", "x", "1.2.3.4", "1.2000.0", 0):
        with pytest.raises(ValueError):
            version_code(bad)


@pytest.mark.parametrize("wanted,expected", [
    ("^1.2", "1.10.0"), ("~1.4", "1.4.2"), (">=1.2,<2", "1.10.0"), ("1.x", "1.10.0"), ("1.4.2", "1.4.2"),
    (None, "2"), ("latest", "2"), (2, "2"), ("2.0.0", "2"),
])
def test_ranges_resolve_to_the_newest_match(wanted: Any, expected: str) -> None:
    deployed = [version_code(v) for v in ("1.2.0", "1.4.2", "1.10.0", "2.0.0")]
    assert format_version(resolve_version("order", wanted, deployed)) == expected


def test_a_range_matching_nothing_or_malformed_is_one_clear_error() -> None:
    deployed = [version_code("1.2.0")]
    with pytest.raises(VersionRangeError, match=r"no deployed version of 'order' matches '\^3' \(deployed: 1.2.0\)"):
        resolve_version("order", "^3", deployed)
    with pytest.raises(VersionRangeError, match="expected a version"):
        matches("not a range", 1)


def test_definitions_keep_integer_versions_and_order_semver_ones() -> None:
    h = harness(V1, V2, {**V21, "version": 1})
    assert h.defs.latest("order") == version_code("2.0.0")
    assert [format_version(v) for v in h.defs.versions("order")] == ["1", "1.2.0", "2"]
    assert Definition("order", version_code("1.2.0"), "spec", V1).key == "order@1.2.0"
    assert Definition("order", 4, "spec", V1).key == "order@4"


def test_engine_resolves_a_range_in_a_start_and_dead_letters_one_matching_nothing() -> None:
    h = harness()
    h.start("order", "a", version="^1")  # type: ignore[arg-type]
    assert format_version(h.states["a"]["version"]) == "1.2.0"
    h.start("order", "b", version="^9")  # type: ignore[arg-type]
    assert "b" not in h.states
    assert "no deployed version of 'order' matches '^9'" in h.dlq[-1][1]


# -- plans ---------------------------------------------------------------------------------------
def versions_of(*docs: dict[str, Any]) -> dict[int, Any]:
    return {c.version: c for c in (compile_spec(d) for d in docs)}


def test_plan_validation_names_unknown_steps_in_either_version() -> None:
    plan = load_plan({"id": "p", "workflow": "order", "from": "^1", "to": "2.0.0",
                      "step_map": {"approve": "approvl", "nope": "ship"}})
    with pytest.raises(MigrationPlanError) as e:
        check_plan(plan, versions_of(V1, V2))
    assert e.value.problems == ["step_map: 'approve' -> 'approvl': 'approvl' is not a step of order@2",
                                "step_map: 'nope' is not a step of order@1.2.0"]


def test_plan_shape_errors_are_reported_together() -> None:
    with pytest.raises(MigrationPlanError) as e:
        load_plan({"id": "p", "workflow": "order", "from": "^^1", "to": "2.x", "vars": {"t": "1 +"}})
    text = str(e.value)
    assert "to: expected a version" in text and "from: expected a version" in text and "vars.t: invalid" in text
    with pytest.raises(MigrationPlanError, match="no deployed version of 'order' other than the target matches '\\^5'"):
        check_plan(load_plan({"id": "p", "workflow": "order", "from": "^5", "to": "2.0.0"}), versions_of(V1, V2))
    with pytest.raises(MigrationPlanError, match="order@9 is not deployed"):
        check_plan(load_plan({"id": "p", "workflow": "order", "from": "^1", "to": "9.0.0"}), versions_of(V1, V2))


# -- what-if -------------------------------------------------------------------------------------
def test_what_if_flags_a_divergent_history_and_a_missing_mapping() -> None:
    h = harness()
    h.start("order", "a", version="1.2.0")  # type: ignore[arg-type]
    events = h.history["a"]
    compatible = what_if(events, h.defs, version_code("2.1.0"))
    assert compatible.compatible and compatible.unmapped == [] and compatible.problems == []

    renamed = what_if(events, h.defs, version_code("2.0.0"))  # replay fine, but 'approve' has no place in 2.0.0
    assert renamed.compatible and renamed.unmapped == ["approve"]
    assert what_if(events, h.defs, version_code("2.0.0"), {"approve": "approval"}).unmapped == []

    divergent = what_if(events, h.defs, version_code("3.0.0"))
    assert not divergent.compatible
    d = divergent.divergence
    assert d is not None and d.index == 1 and d.expected[0] == "ActivityScheduled"  # type: ignore[index]
    assert d.expected[1]["name"] == "prepare" and d.got[1]["name"] == "check"  # type: ignore[index]
    assert divergent.unmapped == ["approve"]


def test_what_if_reports_a_history_longer_than_the_target_reproduces() -> None:
    h = harness()
    h.start("order", "a", version="1.2.0")  # type: ignore[arg-type]
    h.signal("a", "approved", True)
    report = what_if(h.history["a"], h.defs, version_code("2.1.0"))  # ships with ship_fast, not ship
    assert not report.compatible and report.divergence.got[1]["name"] == "ship_fast"  # type: ignore[union-attr,index]


# -- apply ---------------------------------------------------------------------------------------
def test_migration_at_a_safe_point_continues_on_the_new_version() -> None:
    h = harness()
    h.start("order", "a", version="1.2.0")  # type: ignore[arg-type]
    migrate(h, "a")
    ev = h.history["a"][-1]
    assert ev.type == "WorkflowMigrated"
    assert ev.data["from_version"] == version_code("1.2.0") and ev.data["to_version"] == version_code("2.0.0")
    assert ev.data["plan_id"] == "p1" and ev.data["vars"]["total"] == 10
    st = h.states["a"]
    assert st["version"] == version_code("2.0.0") and st["vars"]["total"] == 10
    h.signal("a", "approved", True)
    assert h.status("a") == "COMPLETED"
    assert h.shipped == [{"by": "v2", "total": 10}]  # type: ignore[attr-defined]
    assert h.reprocess() == h.states


def test_migration_with_an_activity_in_flight_is_deferred_and_applied_when_it_completes() -> None:
    h = harness()
    h.auto_run_tasks = False
    h.start("order", "a", version="1.2.0")  # type: ignore[arg-type]
    migrate(h, "a")
    ev = h.history["a"][-1]
    assert ev.type == "MigrationDeferred" and ev.data["waiting_on"] == "activity 'prepare-2' is in flight"
    assert h.states["a"]["pending_migration"]["plan_id"] == "p1"
    assert h.states["a"]["version"] == version_code("1.2.0")
    assert h.reprocess() == h.states
    h.auto_run_tasks = True
    h.drain()  # prepare completes: the thread stands before 'approve', which maps to 'approval'
    assert h.events("a")[-2:] == ["ActivityCompleted", "WorkflowMigrated"]
    st = h.states["a"]
    assert st["version"] == version_code("2.0.0") and "pending_migration" not in st
    assert st["vars"]["total"] == 10  # the transform ran over the variables at the safe point (prep.n = 1)
    h.signal("a", "approved", True)
    assert h.status("a") == "COMPLETED" and h.shipped == [{"by": "v2", "total": 10}]  # type: ignore[attr-defined]
    assert h.reprocess() == h.states


def test_a_failing_variable_transform_rejects_that_instance_only() -> None:
    h = harness()
    h.start("order", "a", version="1.2.0", input={"total": 5})  # type: ignore[arg-type]
    h.start("order", "b", version="1.2.0", input={})  # type: ignore[arg-type]
    for iid in ("a", "b"):
        migrate(h, iid, vars={"total": "input.total * 2"})
    assert h.states["a"]["version"] == version_code("2.0.0") and h.states["a"]["vars"]["total"] == 10
    data = rejection(h, "b")
    assert data["code"] == RejectCode.INVALID_INPUT and "variable 'total'" in data["reason"]
    assert h.states["b"]["version"] == version_code("1.2.0") and "total" not in h.states["b"]["vars"]
    assert h.reprocess() == h.states


def test_bad_migrations_are_rejected_with_the_reason() -> None:
    h = harness()
    h.start("order", "a", version="1.2.0")  # type: ignore[arg-type]
    migrate(h, "a", step_map={})
    assert "positions without a mapping to 2: approve" in rejection(h, "a")["reason"]
    migrate(h, "a", step_map={"approve": "nope"})
    assert "'nope' is not a step of order@2" in rejection(h, "a")["reason"]
    migrate(h, "a", frm="^2")
    assert "expected an instance on a version matching '^2', but 'a' runs order@1.2.0" in rejection(h, "a")["reason"]
    migrate(h, "a", step_map={"approve": "ship"})
    assert "(wait) maps to 'ship', a task step" in rejection(h, "a")["reason"]
    migrate(h, "a", transform="order:^1:2.0.0")
    assert "Python migration 'order:^1:2.0.0' to be registered" in rejection(h, "a")["reason"]
    assert h.states["a"]["version"] == version_code("1.2.0")
    assert "WorkflowMigrated" not in h.events("a")


def test_a_python_migration_transforms_the_variables() -> None:
    h = harness()

    @kflow.migration("order", "^1", "2.0.0")
    def add_total(vars: dict[str, Any]) -> dict[str, Any]:
        if "boom" in vars:
            raise ValueError("cannot migrate this one")
        return {**vars, "total": vars["prep"]["n"] + 41}

    try:
        plan = load_plan({"id": "p1", "workflow": "order", "from": "^1", "to": "2.0.0", "python": True,
                          "step_map": {"approve": "approval"}})
        h.start("order", "a", version="1.2.0")  # type: ignore[arg-type]
        h._cmds.append(plan_command(plan, "a", "c1"))
        h.drain()
        assert h.states["a"]["vars"]["total"] == 42
        h.signal("a", "approved", True)
        assert h.shipped == [{"by": "v2", "total": 42}]  # type: ignore[attr-defined]
        h.start("order", "b", version="1.2.0")  # type: ignore[arg-type]
        h.states["b"]["vars"]["boom"] = True
        h._cmds.append(plan_command(plan, "b", "c2"))
        h.drain()
        assert "Python transform: ValueError: cannot migrate this one" in rejection(h, "b")["reason"]
    finally:
        default_registry.transforms.pop(plan.transform, None)
