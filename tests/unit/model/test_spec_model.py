"""Spec definition validation: every structural or expression problem is a DefinitionError naming the step."""

from __future__ import annotations

from typing import Any

import pytest

from kflow.engine import compile_spec
from kflow.model.errors import DefinitionError
from kflow.model.spec import parse_duration_ms, parse_spec


def doc(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": "orders", "version": 1, "steps": list(steps)}


def problems_of(document: dict[str, Any]) -> DefinitionError:
    with pytest.raises(DefinitionError) as info:
        compile_spec(document)
    err = info.value
    assert err.workflow == "orders"
    assert str(err).startswith("invalid definition 'orders'")
    return err


def assert_names(err: DefinitionError, step_id: str, *fragments: str) -> None:
    """The message names the step and the problem, and so does the structured ``problems`` list."""
    assert f"step '{step_id}'" in str(err), str(err)
    matching = [msg for sid, msg in err.problems if sid == step_id]
    assert matching, err.problems
    for fragment in fragments:
        assert fragment in str(err), (fragment, str(err))
        assert any(fragment in msg for msg in matching), (fragment, matching)


def test_a_valid_definition_compiles() -> None:
    c = compile_spec(doc(
        {"id": "charge", "task": "charge", "queue": "payments", "input": "input.amount", "output": "r"},
        {"id": "route", "choice": [{"when": "r > 1", "goto": "fan"}], "otherwise": "done"},
        {"id": "fan", "parallel": [{"steps": [{"id": "b1", "sleep": "1s"}]},
                                   {"steps": [{"id": "b2", "wait": {"signal": "go", "timeout": "5m"}}]}]},
        {"id": "each", "foreach": "[1, 2]", "as": "x", "concurrency": 1, "steps": [{"id": "inner", "set": {"y": "x"}}]},
        {"id": "kid", "child": {"workflow": "other", "input": "input"}},
        {"id": "done", "succeed": None},
    ))
    assert (c.name, c.version) == ("orders", 1)
    assert c.where["b2"] == ("fan.1", 0)
    assert c.where["inner"] == ("each", 0)
    assert [s.kind for s in c.lists[""]] == ["task", "choice", "parallel", "foreach", "child", "succeed"]


def test_unknown_key() -> None:
    err = problems_of(doc({"id": "charge", "task": "charge", "retries": 3}))
    assert_names(err, "charge", "retries", "Extra inputs are not permitted")


def test_unknown_key_in_a_nested_step_names_the_inner_step() -> None:
    err = problems_of(doc({"id": "fan", "parallel": [{"steps": [{"id": "inner", "sleep": "1s", "colour": "red"}]}]}))
    assert_names(err, "inner", "colour")


def test_two_kinds_on_one_step() -> None:
    err = problems_of(doc({"id": "both", "task": "charge", "sleep": "1s"}))
    assert_names(err, "both", "exactly one step kind", "task, sleep")


def test_no_kind() -> None:
    err = problems_of(doc({"id": "empty", "output": "x"}))
    assert_names(err, "empty", "the step has none")


def test_duplicate_ids_in_one_list() -> None:
    err = problems_of(doc({"id": "a", "set": {"x": "1"}}, {"id": "a", "set": {"y": "2"}}))
    assert_names(err, "a", "duplicate step id")


@pytest.mark.parametrize("steps", [
    [{"id": "a", "set": {"x": "1"}}, {"id": "fan", "parallel": [{"steps": [{"id": "a", "sleep": "1s"}]}]}],
    [{"id": "fan", "parallel": [{"steps": [{"id": "a", "sleep": "1s"}]}, {"steps": [{"id": "a", "sleep": "2s"}]}]}],
    [{"id": "each", "foreach": "[1]", "steps": [{"id": "a", "set": {"x": "1"}}]}, {"id": "a", "set": {"y": "1"}}],
    [{"id": "each", "foreach": "[1]", "steps": [{"id": "each", "set": {"x": "1"}}]}],
], ids=["top-and-branch", "two-branches", "body-and-top", "body-reuses-parent"])
def test_duplicate_ids_across_nested_lists(steps: list[dict[str, Any]]) -> None:
    err = problems_of(doc(*steps))
    dup = [sid for sid, msg in err.problems if "duplicate step id" in msg]
    assert len(dup) == 1, err.problems
    assert_names(err, dup[0], "duplicate step id")


@pytest.mark.parametrize(("steps", "bad_step", "target"), [
    ([{"id": "jump", "choice": [{"when": "true", "goto": "inner"}]},
      {"id": "fan", "parallel": [{"steps": [{"id": "inner", "sleep": "1s"}]}]}], "jump", "inner"),
    ([{"id": "top", "set": {"x": "1"}},
      {"id": "fan", "parallel": [{"steps": [{"id": "inner", "set": {"y": "1"}, "goto": "top"}]}]}], "inner", "top"),
    ([{"id": "top", "set": {"x": "1"}},
      {"id": "each", "foreach": "[1]", "steps": [{"id": "b", "choice": [{"when": "true", "goto": "b"}],
                                                  "otherwise": "top"}]}], "b", "top"),
    ([{"id": "jump", "set": {"x": "1"}, "goto": "nowhere"}], "jump", "nowhere"),
], ids=["into-branch", "out-of-branch", "otherwise-out-of-body", "missing"])
def test_goto_must_target_a_step_of_the_same_list(steps: list[dict[str, Any]], bad_step: str, target: str) -> None:
    err = problems_of(doc(*steps))
    assert_names(err, bad_step, f"goto target '{target}'", "same list")


@pytest.mark.parametrize("step", [
    {"id": "nap", "sleep": "soon"},
    {"id": "nap", "sleep": "-5s"},
    {"id": "nap", "sleep": -1},
    {"id": "nap", "sleep": "5 weeks"},
    {"id": "nap", "wait": {"signal": "go", "timeout": "later"}},
], ids=["word", "negative-text", "negative-number", "unknown-unit", "wait-timeout"])
def test_bad_duration(step: dict[str, Any]) -> None:
    err = problems_of(doc(step))
    assert_names(err, "nap", "duration")


@pytest.mark.parametrize("step", [
    {"id": "s", "set": {"x": "1 +"}},
    {"id": "s", "task": "t", "input": "{'a': }"},
    {"id": "s", "choice": [{"when": "input.n >", "goto": "s"}]},
    {"id": "s", "foreach": "[1, 2", "steps": [{"id": "b", "set": {"x": "1"}}]},
    {"id": "s", "succeed": "(("},
    {"id": "s", "fail": {"error": "E", "message": "'unterminated"}},
    {"id": "s", "child": {"workflow": "w", "input": "a b"}},
    {"id": "s", "child": {"workflow": "w", "id": "1 +"}},
], ids=["set", "task-input", "when", "foreach", "succeed", "fail-message", "child-input", "child-id"])
def test_bad_cel_syntax(step: dict[str, Any]) -> None:
    err = problems_of(doc(step))
    assert_names(err, "s", "invalid expression")


def test_bad_cel_inside_a_branch_names_the_inner_step() -> None:
    err = problems_of(doc({"id": "fan", "parallel": [{"steps": [{"id": "deep", "set": {"x": "))"}}]}]}))
    assert_names(err, "deep", "invalid expression")


def test_every_problem_is_reported_at_once() -> None:
    err = problems_of(doc({"id": "one", "task": "t", "sleep": "1s"}, {"id": "two", "sleep": "soon"},
                          {"id": "three", "set": {"x": "1"}, "goto": "nowhere"}))
    assert {sid for sid, _ in err.problems} == {"one", "two", "three"}


def test_structural_checks_live_in_the_model_without_the_engine() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_spec(doc({"id": "both", "task": "t", "sleep": "1s"}))
    assert "step 'both'" in str(info.value)
    # expressions are only checked by the engine's compiler
    assert parse_spec(doc({"id": "s", "set": {"x": "1 +"}})).steps[0].id == "s"


def test_other_structural_problems() -> None:
    err = problems_of(doc(
        {"id": "each", "foreach": "[1]", "steps": [], "concurrency": -1},
        {"id": "fan", "parallel": []},
        {"id": "pick", "choice": []},
        {"id": "plain", "set": {"input": "1"}, "otherwise": "pick"},
        {"id": "bad-id", "sleep": "1s"},
    ))
    assert_names(err, "each", "non-empty 'steps'", "concurrency must be >= 0")
    assert_names(err, "fan", "at least one branch")
    assert_names(err, "pick", "at least one rule")
    assert_names(err, "plain", "'otherwise' is only allowed on a choice step", "other than 'input'")
    assert_names(err, "bad-id", "identifiers")


def test_not_a_mapping_and_empty_steps() -> None:
    with pytest.raises(DefinitionError):
        compile_spec(["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(DefinitionError) as info:
        compile_spec({"name": "orders", "steps": []})
    assert "at least one step" in str(info.value)


@pytest.mark.parametrize(("text", "ms"), [("250ms", 250), ("2s", 2000), ("5m", 300_000), ("1h", 3_600_000),
                                          ("1d", 86_400_000), ("1.5s", 1500), (3, 3000), ("7", 7000)])
def test_parse_duration_ms(text: Any, ms: int) -> None:
    assert parse_duration_ms(text) == ms


def test_parse_duration_rejects_bool() -> None:
    with pytest.raises(ValueError):
        parse_duration_ms(True)
