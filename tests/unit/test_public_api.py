"""The names workflow and activity code reach for are on ``kflow`` itself, and decorators work bare."""

from __future__ import annotations

import asyncio

import pytest

import kflow
from kflow.authoring import definition_of


def test_cancellation_error_does_not_shadow_asyncios():
    assert kflow.WorkflowCancelledError is kflow.CancelledError
    assert not issubclass(kflow.WorkflowCancelledError, asyncio.CancelledError)
    assert kflow.WorkflowCancelledError().type == "Cancelled"


def test_workflow_decorator_works_bare_and_called():
    @kflow.workflow
    async def api_bare_fn(ctx, input):
        return input

    @kflow.workflow(name="api-called", version=3)
    async def api_called_fn(ctx, input):
        return input

    @kflow.workflow
    class ApiBareClass:
        async def run(self, ctx, input):
            return input

    bare, called, cls = definition_of(api_bare_fn), definition_of(api_called_fn), definition_of(ApiBareClass)
    assert (bare.name, bare.version) == ("api_bare_fn", 1)
    assert (called.name, called.version) == ("api-called", 3)
    assert (cls.name, cls.version) == ("ApiBareClass", 1)


def test_bare_decorator_still_checks_the_function():
    with pytest.raises(kflow.DefinitionError, match="async def"):
        @kflow.workflow
        def not_async(ctx, input):
            return input


# -- the authoring package and its registry ---------------------------------------------------------
def test_the_authoring_package_is_the_home_of_the_workflow_api():
    import kflow._workflow
    import kflow.authoring

    assert kflow.workflow is kflow.authoring.workflow and callable(kflow.workflow)
    assert kflow.WorkflowContext is kflow.authoring.WorkflowContext
    assert kflow.query_state is kflow.authoring.query_state
    assert callable(kflow.workflow.update) and callable(kflow.workflow.signal) and callable(kflow.workflow.query)
    assert kflow._workflow.definition_of is kflow.authoring.definition_of  # the former name still imports


def test_a_workflow_and_a_migration_register_in_the_registry_they_are_given():
    from kflow.authoring import WorkflowRegistry, default_registry
    from kflow.engine import InMemoryDefinitions
    from kflow.model.messages import Definition

    mine = WorkflowRegistry()

    @kflow.workflow(name="api-own-registry", version=2, registry=mine)
    async def own(ctx, input):
        return input

    @kflow.migration("api-own-registry", "1", "2", registry=mine)
    def move(vars):
        return vars

    assert mine.get("api-own-registry", 2) is definition_of(own) and mine.versions("api-own-registry") == [2]
    assert default_registry.get("api-own-registry", 2) is None and len(mine.transforms) == 1
    assert not set(mine.transforms) & set(default_registry.transforms)
    record = Definition(name="api-own-registry", version=2, kind="code", body={})
    assert mine.compile_code(record) is definition_of(own)
    with pytest.raises(kflow.DefinitionError, match="not registered"):
        default_registry.compile_code(record)
    assert InMemoryDefinitions(mine).registry is mine and InMemoryDefinitions().registry is default_registry


def test_each_engine_and_harness_keeps_its_own_replay_cache(tmp_path):
    from kflow.authoring import default_registry
    from kflow.config import EngineConfig
    from kflow.streams.processor import EngineProcessor
    from kflow.testing.harness import EngineHarness

    @kflow.workflow(name="api-cache", version=1)
    async def waits(ctx, input):
        return await ctx.wait_signal("go")

    a, b = EngineHarness(), EngineHarness()
    for h in (a, b):
        h.defs.add(definition_of(waits))
    a.start("api-cache", "api-cache-w1")
    assert len(a.replay_cache) == 1 and len(b.replay_cache) == 0  # a's machine is parked in a's cache only
    b.states["api-cache-w1"], b.history["api-cache-w1"] = a.states["api-cache-w1"], a.history["api-cache-w1"]
    b.signal("api-cache-w1", "go", 7)  # b has no live machine: it replays the history
    assert b.states["api-cache-w1"]["result"] == 7 and b.replay_cache.misses == 1 and len(a.replay_cache) == 1
    one = EngineProcessor(EngineConfig(state_dir=str(tmp_path / "one")))
    two = EngineProcessor(EngineConfig(state_dir=str(tmp_path / "two")))
    assert one.replay_cache is not two.replay_cache and one.registry is default_registry
