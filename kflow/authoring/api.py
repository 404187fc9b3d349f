"""The authoring API of code workflows: the ``@workflow`` decorator and its helpers.

``@kflow.workflow(name="order", version=1)`` on ``async def run(ctx, input)`` validates the function
and registers a :class:`~kflow.engine.code_machine.CodeDefinition` in a
:class:`~kflow.engine.registry.WorkflowRegistry` (the default one unless ``registry=`` names
another); an engine started with ``--workflows mod`` imports ``mod`` and hosts the workflows it
registered. The decorated function is returned unchanged (with a ``__kflow_workflow__`` attribute)
so it can still be called directly in tests.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Optional, TypeVar

from kflow.authoring.sandbox import Sandbox, sandbox_enabled
from kflow.engine.code_context import activity_policy
from kflow.engine.code_machine import CodeDefinition
from kflow.engine.code_replayer import query
from kflow.engine.registry import WorkflowRegistry, default_registry
from kflow.model.errors import DefinitionError
from kflow.model.spec import parse_duration_ms

__all__ = ["code_definitions", "definition_of", "query_state", "workflow"]

F = TypeVar("F", bound=Callable[..., Any])


def workflow(name: Any = None, version: int = 1, sandbox: Optional[bool] = None, *,
             retry: Any = None, execution_timeout: Any = None, registry: Optional[WorkflowRegistry] = None) -> Any:
    """Register an ``async def run(ctx, input)`` function as code workflow ``name@version``.

    Works bare (``@kflow.workflow``: name from the function, version 1) and called
    (``@kflow.workflow(name="greet", version=2)``), like ``@kflow.activity``.

    A class works too: it is instantiated once per run (with no arguments), its
    ``async def run(self, ctx, input)`` is the workflow, and methods decorated with
    ``@kflow.workflow.signal`` / ``@kflow.workflow.query`` handle signals and answer queries;
    ``@kflow.workflow.update`` methods handle updates (signals that return a result), each with
    an optional ``@<method>.validator`` that may reject an update before it is accepted.

    Example:
        >>> import kflow
        >>> @kflow.workflow(name="greet", version=1)
        ... async def greet(ctx, input):
        ...     return await ctx.activity("say_hello", input)
        >>> @kflow.workflow(name="approval")
        ... class Approval:
        ...     def __init__(self): self.approved = None
        ...     @kflow.workflow.signal
        ...     def decide(self, data): self.approved = data["ok"]
        ...     @kflow.workflow.query
        ...     def status(self): return self.approved
        ...     async def run(self, ctx, input):
        ...         await ctx.wait_condition(lambda: self.approved is not None)
        ...         return self.approved

    Args:
        name: The workflow name clients start; defaults to the function's name.
        version: Running instances stay on the version they started with.
        sandbox: Refuse clock, randomness, I/O and threads inside the workflow; the default is
            on unless ``KFLOW_WORKFLOW_SANDBOX=0``.
        registry: Where the workflow is registered; the default registry, which engines host
            from, unless given.

    Raises:
        DefinitionError: Every problem with the function at once (not async, wrong parameters,
            bad name or version).
    """
    if callable(name):  # used bare: the "name" is the decorated function or class
        return workflow()(name)

    def decorate(fn: F) -> F:
        wf_name = name or getattr(fn, "__name__", "")
        if inspect.isclass(fn):
            runner = _class_runner(fn, wf_name)
            decorate(runner)  # type: ignore[arg-type]
            fn.__kflow_workflow__ = runner.__kflow_workflow__  # type: ignore[attr-defined]
            return fn
        problems: list[tuple[str, str]] = []
        if not inspect.iscoroutinefunction(fn):
            problems.append(("", "a code workflow must be an 'async def' function"))
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) != 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
            problems.append(("", f"expected parameters (ctx, input), but got ({', '.join(p.name for p in params)})"))
        if not wf_name or "@" in wf_name:
            problems.append(("", f"invalid workflow name {wf_name!r}"))
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            problems.append(("", f"version must be a positive integer, not {version!r}"))
        if problems:
            raise DefinitionError(wf_name or "<unnamed>", problems)
        enabled = sandbox_enabled() if sandbox is None else sandbox
        try:
            policy = activity_policy(retry, {}, None) if retry is not None else None
            timeout_ms = parse_duration_ms(execution_timeout.total_seconds() if isinstance(execution_timeout, timedelta)
                                           else execution_timeout) if execution_timeout is not None else None
        except (ValueError, TypeError) as e:
            raise DefinitionError(wf_name, [("retry" if retry is not None else "execution_timeout", str(e))]) from None
        d = (registry if registry is not None else default_registry).add(
            CodeDefinition(name=wf_name, version=version, fn=fn, module=getattr(fn, "__module__", ""),
                           sandbox=Sandbox(enabled), retry=(policy or {}).get("retry"), execution_timeout_ms=timeout_ms))
        fn.__kflow_workflow__ = d  # type: ignore[attr-defined]
        return fn

    return decorate


_SIGNAL, _QUERY, _UPDATE, _VALIDATOR = "__kflow_signal__", "__kflow_query__", "__kflow_update__", "__kflow_validator__"


def _handler_decorator(attr: str) -> Callable[..., Any]:
    def decorator(fn: Any = None, *, name: Optional[str] = None) -> Any:
        def mark(f: Any) -> Any:
            setattr(f, attr, name or f.__name__)
            return f

        return mark(fn) if fn is not None else mark

    return decorator


def _update_decorator(fn: Any = None, *, name: Optional[str] = None) -> Any:
    """``@kflow.workflow.update`` / ``@kflow.workflow.update(name="x")`` on a workflow class's method.

    The method (plain or ``async``) runs for every accepted update and its return value answers
    the caller. ``@<method>.validator`` marks a method that checks an update's data first, on the
    workflow as it is: raising (or returning False) rejects the update, and nothing is written to
    the history. A validator must only read the workflow's variables; give it its own name.

    Example:
        >>> @kflow.workflow                              # doctest: +SKIP
        ... class Cart:
        ...     def __init__(self): self.items = []
        ...     @kflow.workflow.update
        ...     def add(self, item): self.items.append(item); return len(self.items)
        ...     @add.validator
        ...     def check_add(self, item):
        ...         if not item.get("sku"): raise ValueError("an item needs a sku")
        ...     async def run(self, ctx, input): ...
    """
    def mark(f: Any) -> Any:
        if not callable(f):
            raise TypeError(f"@workflow.update decorates a method, not {type(f).__name__}")
        setattr(f, _UPDATE, name or f.__name__)

        def validator(v: Any) -> Any:
            if not callable(v) or inspect.iscoroutinefunction(v):
                raise TypeError(f"the validator of update '{getattr(f, _UPDATE)}' must be a plain (not async) method")
            setattr(f, _VALIDATOR, v)
            return v

        f.validator = validator
        return f

    return mark(fn) if fn is not None else mark


def _class_runner(cls: type, wf_name: str) -> Callable[[Any, Any], Any]:
    """The ``async def run(ctx, input)`` that hosts one instance of a class-style workflow."""
    if not inspect.iscoroutinefunction(getattr(cls, "run", None)):
        raise DefinitionError(wf_name or cls.__name__, [("run", "a workflow class needs 'async def run(self, ctx, input)'")])
    signals = {getattr(m, _SIGNAL): n for n, m in inspect.getmembers(cls) if hasattr(m, _SIGNAL)}
    queries = {getattr(m, _QUERY): n for n, m in inspect.getmembers(cls) if hasattr(m, _QUERY)}
    updates = {getattr(m, _UPDATE): (n, getattr(m, _VALIDATOR, None)) for n, m in inspect.getmembers(cls)
               if hasattr(m, _UPDATE)}

    async def run(ctx: Any, input: Any) -> Any:
        obj = cls()
        for sig, attr in signals.items():
            ctx.set_signal_handler(sig, getattr(obj, attr))
        for q, attr in queries.items():
            ctx.set_query_handler(q, getattr(obj, attr))
        for u, (attr, check) in updates.items():
            ctx.set_update_handler(u, getattr(obj, attr), check.__get__(obj, cls) if check is not None else None)
        return await obj.run(ctx, input)

    run.__name__ = cls.__name__
    run.__qualname__ = cls.__qualname__
    run.__module__ = cls.__module__
    return run


#: ``@kflow.workflow.signal`` / ``@kflow.workflow.signal(name="x")`` on a workflow class's method.
workflow.signal = _handler_decorator(_SIGNAL)  # type: ignore[attr-defined]
#: ``@kflow.workflow.query`` / ``@kflow.workflow.query(name="x")`` on a workflow class's method.
workflow.query = _handler_decorator(_QUERY)  # type: ignore[attr-defined]
#: ``@kflow.workflow.update`` / ``@kflow.workflow.update(name="x")``, with ``@<method>.validator``.
workflow.update = _update_decorator  # type: ignore[attr-defined]


def definition_of(fn: Any) -> CodeDefinition:
    """The :class:`CodeDefinition` of a decorated workflow function (or a definition itself)."""
    if isinstance(fn, CodeDefinition):
        return fn
    d = getattr(fn, "__kflow_workflow__", None)
    if d is None:
        raise TypeError(f"{fn!r} is not a @kflow.workflow function")
    return d


def query_state(workflow_fn: Any, state: dict[str, Any], name: str, *args: Any) -> Any:
    """Answer query ``name`` of a code-workflow instance decided in this process (``kflow.testing``).

    The state record holds counts, not the history (that is the engine's journal), so this
    replays instances decided here without a journal of their own (the test harness) and states
    that predate the journal. An instance run by an engine is asked through it: ``Client.query``.

    Example:
        >>> progress = kflow.query_state(order, harness.states["o-1"], "progress")  # doctest: +SKIP

    Raises:
        KflowError: The workflow registered no such query.
        NondeterminismError: The code no longer replays the instance's history.
    """
    return query(definition_of(workflow_fn), state, name, *args)


def code_definitions(modules: str, registry: Optional[WorkflowRegistry] = None) -> list[CodeDefinition]:
    """Import the comma-separated ``modules`` and return the code workflows they registered in
    ``registry`` (the default one unless given)."""
    names = [m.strip() for m in modules.split(",") if m.strip()]
    for m in names:
        importlib.import_module(m)
    return [d for d in (registry if registry is not None else default_registry).definitions() if d.module in names]
