"""The names workflow and activity code reach for are on ``kflow`` itself, and decorators work bare."""

from __future__ import annotations

import asyncio

import pytest

import kflow
from kflow._workflow import definition_of


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
