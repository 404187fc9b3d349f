"""A deployed ``name@version`` is immutable in the engine's definitions table.

The table keeps the first content per key: the same content again is a no-op, other content is
refused with :class:`DefinitionConflict` (fields, not just a message), and an instance already
running on the version finishes on the content it started on.
"""

from __future__ import annotations

import pytest

from kflow.engine import InMemoryDefinitions, compile_spec
from kflow.engine.definitions import definition_fingerprint
from kflow.model.errors import DefinitionConflict, DefinitionError, KflowError
from kflow.model.messages import Definition
from kflow.testing.harness import EngineHarness

V1 = {"name": "ver", "version": 1,
      "steps": [{"id": "w", "wait": {"signal": "go"}}, {"id": "d", "succeed": "'original'"}]}
V1_CHANGED = {"name": "ver", "version": 1,
              "steps": [{"id": "w", "wait": {"signal": "go"}}, {"id": "d", "succeed": "'overwritten'"}]}


def _record(body: dict) -> Definition:
    return Definition(name=body["name"], version=body["version"], kind="spec", body=body, deployed_ms=1)


def test_fingerprint_ignores_key_order_but_not_content() -> None:
    reordered = {"steps": V1["steps"], "version": 1, "name": "ver"}
    assert definition_fingerprint("spec", reordered) == definition_fingerprint("spec", V1)
    assert definition_fingerprint("spec", V1_CHANGED) != definition_fingerprint("spec", V1)
    assert definition_fingerprint("code", V1) != definition_fingerprint("spec", V1)
    assert compile_spec(V1).fingerprint == definition_fingerprint("spec", V1)


def test_same_content_again_is_a_no_op() -> None:
    table = InMemoryDefinitions()
    assert table.add_definition(_record(V1)) is not None
    first = table.get("ver", 1)
    assert table.add(compile_spec({"steps": V1["steps"], "name": "ver", "version": 1})) is False
    assert table.get("ver", 1) is first


def test_other_content_under_a_deployed_version_is_refused_and_the_first_kept() -> None:
    table = InMemoryDefinitions()
    table.add_definition(_record(V1))
    first = table.get("ver", 1)
    with pytest.raises(DefinitionConflict) as caught:
        table.add_definition(_record(V1_CHANGED))
    err = caught.value
    assert isinstance(err, KflowError)
    assert (err.workflow, err.version) == ("ver", 1)
    assert err.existing_fingerprint == definition_fingerprint("spec", V1)
    assert err.new_fingerprint == definition_fingerprint("spec", V1_CHANGED)
    assert "ver@1" in str(err) and "ver@2" in str(err)  # names the version and suggests the next one
    assert table.get("ver", 1) is first and table.latest("ver") == 1


def test_a_record_whose_key_disagrees_with_its_body_is_refused() -> None:
    table = InMemoryDefinitions()
    table.add_definition(_record(V1))
    sneaky = Definition(name="ver", version=2, kind="spec", body=V1_CHANGED, deployed_ms=1)
    with pytest.raises(DefinitionError, match="ver@2"):
        table.add_definition(sneaky)
    assert table.get("ver", 2) is None
    assert table.get("ver", 1).fingerprint == definition_fingerprint("spec", V1)


def test_a_running_instance_finishes_on_the_content_it_started_on() -> None:
    h = EngineHarness()
    h.deploy(V1)
    h.start("ver", "i1")
    assert h.status("i1") == "RUNNING"
    with pytest.raises(DefinitionConflict):
        h.deploy(V1_CHANGED)
    h.signal("i1", "go")
    assert h.result("i1") == "original"
    h.start("ver", "i2")  # new starts get the first content too
    h.signal("i2", "go")
    assert h.result("i2") == "original"
    assert h.reprocess() == h.states


def test_new_versions_are_still_deployable() -> None:
    table = InMemoryDefinitions()
    table.add_definition(_record(V1))
    assert table.add(compile_spec({**V1_CHANGED, "version": 2})) is True
    assert table.latest("ver") == 2
