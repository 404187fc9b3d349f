"""``kflow graph`` and ``kflow incidents``: the drawings of a definition and of an instance's path, and
the rows of open incidents, from the pure functions the commands print.

Instance paths come from real histories: the workflows run on the pure engine
(:class:`~kflow.testing.harness.EngineHarness`), and the step states are worked out from those
histories exactly as the command does.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from typer.testing import CliRunner

from kflow._cli.incidents import graph_text, incident_steps, open_incidents
from kflow.cli import app
from kflow.engine.core import status_record
from kflow.model.messages import Status
from kflow.testing.harness import EngineHarness
from kflow.visibility.graph import STEP_COLOURS, history_steps

ORDER = {"name": "order", "version": 1, "steps": [
    {"id": "reserve", "task": "reserve", "output": "r"},
    {"id": "route", "choice": [{"when": "r.express", "goto": "express"}], "otherwise": "charge"},
    {"id": "express", "task": "express", "goto": "done"},
    {"id": "charge", "task": "charge", "output": "c",
     "on_failure": {"incident": {"role": "ops", "instructions": "call the bank", "timeout": "1h"}},
     "catch": [{"errors": ["Fraud"], "goto": "done"}]},
    {"id": "done", "succeed": "'ok'"},
]}

FILL = {state: colours[0] for state, colours in STEP_COLOURS.items()}


def run(express: bool, charge_fails: bool = False) -> tuple[EngineHarness, dict[str, str]]:
    """One ``order`` instance o1 and its step states from its history (incidents marked)."""
    h = EngineHarness()
    h.deploy(ORDER)
    h.activity("reserve", lambda _: {"express": express})
    h.activity("express", lambda _: "fast")
    h.activity("charge", (lambda _: 1 / 0) if charge_fails else (lambda _: "paid"))
    h.start("order", "o1")
    steps = history_steps(ORDER, h.history["o1"])
    assert steps is not None
    return h, incident_steps(steps, h.states["o1"])


def dot_fills(text: str) -> dict[str, str]:
    return dict(re.findall(r'^  "(\w+)" \[label=.*fillcolor="(#\w+)"', text, re.M))


def test_dot_of_a_definition_has_every_step_and_edge_and_no_state_colours() -> None:
    text = graph_text(ORDER, "dot", title="order@1")
    assert text.startswith('digraph "order@1" {') and text.rstrip().endswith("}")
    for step in ("reserve", "route", "express", "charge", "done"):
        assert f'  "{step}" [label="{step}\\n' in text
    assert '  "reserve" -> "route";' in text
    assert '  "route" -> "express" [label="choice", style=dashed];' in text
    assert '  "route" -> "charge" [label="choice", style=dashed];' in text
    assert '  "express" -> "done" [label="goto", style=dashed];' in text
    assert '  "charge" -> "done" [label="catch", style=dashed];' in text
    assert "tooltip" not in text  # no instance: no states


def test_mermaid_of_a_definition() -> None:
    text = graph_text(ORDER, "mermaid")
    lines = text.splitlines()
    assert lines[0] == "flowchart TD"
    assert '  n0["reserve<br/>task reserve"]' in lines
    assert "  n0 --> n1" in lines
    assert "  n1 -. choice .-> n2" in lines and "  n3 -. catch .-> n4" in lines
    assert not any(line.strip().startswith("class") for line in lines)


def test_dot_of_an_instance_path_colours_each_step_by_what_it_did() -> None:
    h, steps = run(express=False)
    assert h.status("o1") == Status.COMPLETED
    fills = dot_fills(graph_text(ORDER, "dot", steps))
    assert fills == {"reserve": FILL["done"], "route": FILL["done"], "express": FILL["pending"],
                     "charge": FILL["done"], "done": FILL["done"]}


def test_mermaid_of_an_instance_with_an_open_incident() -> None:
    h, steps = run(express=False, charge_fails=True)
    assert h.status("o1") == Status.INCIDENT
    assert steps["charge"] == "incident"
    lines = graph_text(ORDER, "mermaid", steps).splitlines()
    assert f"  classDef incident fill:{FILL['incident']},stroke:{STEP_COLOURS['incident'][1]};" in lines
    assert "  class n3 incident;" in lines  # charge
    assert "  class n0,n1 done;" in lines
    assert "  class n2,n4 pending;" in lines


def test_the_express_path_leaves_charge_pending() -> None:
    _, steps = run(express=True)
    fills = dot_fills(graph_text(ORDER, "dot", steps))
    assert fills["express"] == FILL["done"] and fills["charge"] == FILL["pending"]


def test_svg_is_well_formed_with_one_box_per_step() -> None:
    _, steps = run(express=False, charge_fails=True)
    root = ET.fromstring(graph_text(ORDER, "svg", steps, title="order@1 o1 (INCIDENT)"))
    ns = "{http://www.w3.org/2000/svg}"
    rects = root.findall(f".//{ns}rect")
    assert len(rects) == 5
    assert FILL["incident"] in {r.get("fill") for r in rects}


def test_unknown_format_is_an_error_before_anything_connects() -> None:
    result = CliRunner().invoke(app, ["graph", "order", "--format", "png", "--bootstrap", "127.0.0.1:1"],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 2  # a choice: refused before the command runs
    assert "Invalid value for '--format'" in result.stderr and "'png' is not one of" in result.stderr
    assert "'dot', 'mermaid', 'svg'" in result.stderr
    with pytest.raises(ValueError, match="unknown format 'png'"):
        graph_text(ORDER, "png")


@pytest.mark.parametrize("args", [["graph", "--help"], ["incidents", "--help"], ["incident", "resolve", "--help"]])
def test_help_teaches_with_an_example(args: list[str]) -> None:
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Example: kflow " + " ".join(args[:-1]) in result.output


@pytest.mark.parametrize(("args", "expected"), [
    ([], "error: give exactly one of --retry, --skip and --fail (got none)"),
    (["--retry", "--skip"], "error: give exactly one of --retry, --skip and --fail (got --retry, --skip)"),
    (["--skip", "--input-patch", "{}"], "error: --input-patch takes a JSON object, and goes with --retry only"),
    (["--retry", "--input-patch", "[1]"], "error: --input-patch takes a JSON object, and goes with --retry only"),
    (["--fail", "--output", "1"], "error: --output goes with --skip only"),
])
def test_bad_resolve_options_are_one_error_and_nothing_is_sent(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(app, ["incident", "resolve", "o1", "charge-9", *args, "--bootstrap", "127.0.0.1:1"])
    assert result.exit_code == 1
    assert result.stderr.strip() == expected


def test_open_incidents_rows_filter_by_workflow_and_role() -> None:
    h, _ = run(express=False, charge_fails=True)
    h.deploy({"name": "other", "steps": [{"id": "x", "task": "x", "on_failure": {"incident": {"role": "dev"}}}]})
    h.start("other", "x1")
    records: list[dict[str, Any]] = [status_record(st) for st in h.states.values()]
    rows = open_incidents(records)
    assert [(r["instance_id"], r["step"], r["role"]) for r in rows] == [("o1", "charge", "ops"), ("x1", "x", "dev")]
    o1 = rows[0]
    assert o1["incident_id"] in h.states["o1"]["incidents"]
    assert o1["status"] == Status.INCIDENT and o1["error_type"] == "ZeroDivisionError"
    assert o1["instructions"] == "call the bank"
    assert [r["instance_id"] for r in open_incidents(records, role="dev")] == ["x1"]
    assert [r["instance_id"] for r in open_incidents(records, workflow="order")] == ["o1"]
    assert open_incidents(records, workflow="order", role="dev") == []
