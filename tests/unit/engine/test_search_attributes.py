"""``search:`` on spec steps: CEL values merged into the instance state's ``search`` dict."""

from __future__ import annotations

import pytest

from kflow.engine import compile_spec
from kflow.model.errors import DefinitionError
from kflow.testing.harness import EngineHarness

WF = {"name": "searchable", "version": 1, "steps": [
    {"id": "tag", "set": {"n": "input.n"}, "search": {"customer": "input.customer", "tier": "'basic'"}},
    {"id": "charge", "task": "charge", "output": "r", "search": {"tier": "input.n > 5 ? 'gold' : 'silver'"}},
    {"id": "wait_ok", "wait": {"signal": "ok"}, "search": {"customer": "null", "stage": "'waiting'"}},
]}


def test_search_values_merge_into_state_as_steps_run() -> None:
    h = EngineHarness()
    h.deploy(WF)
    h.activity("charge", lambda x: {"ok": True})
    h.start("searchable", "s1", {"customer": "acme", "n": 9})
    st = h.states["s1"]
    # later steps overwrite earlier values, null removes an attribute
    assert st["search"] == {"tier": "gold", "stage": "waiting"}
    assert h.status("s1") == "RUNNING"
    h.signal("s1", "ok", 1)
    assert h.status("s1") == "COMPLETED"
    assert h.states["s1"]["search"] == {"tier": "gold", "stage": "waiting"}
    # folding the history reproduces the same search dict
    assert h.reprocess()["s1"]["search"] == h.states["s1"]["search"]


def test_search_is_absent_without_search_steps() -> None:
    h = EngineHarness()
    h.deploy({"name": "plain", "version": 1, "steps": [{"id": "s", "set": {"a": "1"}}]})
    h.start("plain", "p1")
    assert h.status("p1") == "COMPLETED"
    assert "search" not in h.states["p1"]


def test_bad_search_expression_fails_the_workflow_with_the_step_named() -> None:
    h = EngineHarness()
    h.deploy({"name": "bad", "version": 1, "steps": [{"id": "s", "set": {"a": "1"}, "search": {"x": "input.nope"}}]})
    h.start("bad", "b1", {})
    assert h.status("b1") == "FAILED"
    assert "step 's'" in h.states["b1"]["error"]["message"]


def test_search_names_and_syntax_are_checked_at_deploy() -> None:
    with pytest.raises(DefinitionError, match="search attribute name 'bad-name'"):
        compile_spec({"name": "x", "version": 1,
                      "steps": [{"id": "s", "set": {"a": "1"}, "search": {"bad-name": "1"}}]})
    with pytest.raises(DefinitionError, match="invalid expression"):
        compile_spec({"name": "x", "version": 1, "steps": [{"id": "s", "set": {"a": "1"}, "search": {"ok": "1 +"}}]})
