"""The definition graph helpers: layout of nested steps, and step tracking from state records."""

from __future__ import annotations

from kflow.testing.harness import EngineHarness
from kflow.visibility.graph import layout, resolve_steps, step_index, succeed_steps, track_steps

SPEC = {"name": "g", "version": 1, "steps": [
    {"id": "a", "task": "work", "output": "x"},
    {"id": "fan", "parallel": [{"steps": [{"id": "b1", "task": "work"}]},
                               {"steps": [{"id": "b2", "wait": {"signal": "go"}}]}]},
    {"id": "route", "choice": [{"when": "x > 100", "goto": "big"}], "otherwise": "small"},
    {"id": "small", "succeed": "'small'"},
    {"id": "big", "fail": {"error": "TooBig"}},
]}


def test_layout_places_branches_side_by_side_and_draws_every_route():
    g = layout(SPEC)
    at = {n["id"]: n for n in g["nodes"]}
    assert set(at) == {"a", "fan", "b1", "b2", "route", "small", "big"}
    assert at["b1"]["y"] == at["b2"]["y"] and at["b2"]["x"] > at["b1"]["x"]
    assert at["route"]["y"] > at["b1"]["y"] > at["fan"]["y"] > at["a"]["y"]
    edges = {(e["source"], e["target"], e["kind"]) for e in g["edges"]}
    assert {("a", "fan", "next"), ("fan", "b1", "branch"), ("fan", "b2", "branch"), ("route", "big", "choice"),
            ("route", "small", "choice"), ("b1", "route", "join"), ("b2", "route", "join")} <= edges
    assert ("fan", "route", "next") not in edges  # the flow continues from the branches' ends
    assert not any(e[0] == "small" for e in edges)  # succeed ends the flow
    assert g["width"] >= at["b2"]["x"] + at["b2"]["w"]


def test_tracking_follows_an_instance_through_its_states():
    h = EngineHarness()
    h.deploy(SPEC)
    h.activity("work", lambda _: 7)
    index, succeeds = step_index(SPEC), succeed_steps(SPEC)
    assert index[""] == (["a", "fan", "route", "small", "big"], False)
    assert index["fan.1"] == (["b2"], True)
    h.start("g", "i1")
    tracked = track_steps({}, h.status("i1"), h.states["i1"])
    steps = resolve_steps(tracked, index, h.status("i1"), succeeds)
    assert steps["fan"] == "running" and steps["b2"] == "running"
    h.signal("i1", "go")
    tracked = track_steps(tracked, h.status("i1"), h.states["i1"])
    steps = resolve_steps(tracked, index, h.status("i1"), succeeds)
    assert h.status("i1") == "COMPLETED"
    assert steps["fan"] == "done" and steps["b2"] == "done" and "big" not in steps


def test_a_step_running_when_the_instance_fails_is_marked_failed():
    tracked = track_steps({}, "RUNNING", {"threads": {"0": {"list": "", "idx": 1}}})
    assert tracked == {"p::1": "running"}
    tracked = track_steps(tracked, "TERMINATED", {"threads": {}})
    assert resolve_steps(tracked, step_index(SPEC), "TERMINATED") == {"fan": "failed"}
