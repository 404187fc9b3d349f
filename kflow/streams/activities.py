"""Declare activities and gather them into a per-queue registry, validating everything at registration.

``@activity`` attaches an :class:`ActivityDefinition` to a function and returns the function
unchanged, so it stays directly callable in unit tests. ``collect_activities`` scans modules for
decorated functions and ``build_registry`` accepts every form a :class:`~kflow.worker.Worker`
takes (modules, functions, ``{name: fn}`` or ``{queue: {name: fn}}``). Problems are collected and
reported together in one :class:`ActivityDefinitionError`, never one at a time.

The registry serves both the worker (:mod:`kflow.worker`, which exports these names) and the
engine's local activities (:mod:`kflow.streams.local`), so it lives here, below both, and needs only
:mod:`kflow.converter` and :mod:`kflow.model`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from kflow.converter import from_json, input_type
from kflow.model.errors import KflowError, ProblemsError

__all__ = [
    "ActivityDefinition",
    "ActivityDefinitionError",
    "DEFAULT_QUEUE",
    "DuplicateActivityError",
    "Registry",
    "activity",
    "build_registry",
    "collect_activities",
    "definition_of",
]

#: The queue an activity is served on when none is named.
DEFAULT_QUEUE = "default"
_ATTR = "__kflow_activity__"

F = TypeVar("F", bound=Callable[..., Any])
#: queue -> activity name -> definition.
Registry = dict[str, dict[str, "ActivityDefinition"]]


class ActivityDefinitionError(ProblemsError):
    """An activity declaration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("activity", problems)


class DuplicateActivityError(KflowError):
    """Two different functions claim the same name on one queue.

    ``duplicates`` maps ``(queue, name)`` to the qualified names of every claimant.
    """

    def __init__(self, duplicates: dict[tuple[str, str], list[str]]) -> None:
        self.duplicates = duplicates
        lines = "; ".join(
            f"'{name}' on queue '{queue}': {', '.join(owners)}" for (queue, name), owners in sorted(duplicates.items())
        )
        super().__init__(f"duplicate activity names: {lines}")


@dataclass(frozen=True, slots=True)
class ActivityDefinition:
    """What the worker needs to run one activity.

    Attributes:
        name: The activity name tasks refer to (``Task.name``).
        queue: The task queue (``tasks.<queue>`` topic) the activity is served on.
        fn: The user function; it takes the task input and returns the result. Both travel as
            JSON; with annotations they may be dataclasses, pydantic models … (:mod:`kflow.converter`).
        is_async: True if ``fn`` is a coroutine function (run on the worker's event loop).
        input_type: The annotation of ``fn``'s parameter, which the JSON input is converted to
            (None: the JSON value as it is).
    """

    name: str
    queue: str
    fn: Callable[[Any], Any]
    is_async: bool
    input_type: Any = None

    def call(self, data: Any) -> Any:
        """Call ``fn`` with the task input converted to its parameter's type."""
        arg = data if self.input_type is None else from_json(data, self.input_type, f"input of activity '{self.name}'")
        return self.fn(arg)

    @property
    def qualname(self) -> str:
        """``module.qualname`` of the function, for error messages and logs."""
        return f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', repr(self.fn))}"


def _is_async(fn: Callable[..., Any]) -> bool:
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects with an async __call__
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


def _arity_problem(fn: Callable[..., Any]) -> str | None:
    """Return why ``fn`` cannot be called with exactly one positional argument, if it cannot."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # builtins without a signature: trust the caller
    try:
        sig.bind(None)
    except TypeError:
        return f"an activity takes exactly one argument (the task input), but {sig} does not accept one"
    return None


def _validate(fn: Any, name: Any, queue: Any) -> ActivityDefinition:
    problems: list[str] = []
    if not callable(fn):
        problems.append(f"expected a function, but got {type(fn).__name__}")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"the name must be a non-empty string, but is {name!r}")
    if not isinstance(queue, str) or not queue.strip():
        problems.append(f"the queue must be a non-empty string, but is {queue!r}")
    if callable(fn):
        arity = _arity_problem(fn)
        if arity:
            problems.append(arity)
    if problems:
        raise ActivityDefinitionError(problems)
    return ActivityDefinition(name=name, queue=queue, fn=fn, is_async=_is_async(fn), input_type=input_type(fn))


def activity(name: str | None = None, queue: str = DEFAULT_QUEUE) -> Callable[[F], F]:
    """Declare a function as an activity.

    Works for plain and ``async`` functions taking one argument, the task input (a JSON value),
    and returning a JSON value. The function is returned unchanged with its definition attached.

    Example:
        >>> @activity("inventory.reserve")
        ... def reserve(order): return {"ok": True}

    Args:
        name: The activity name; defaults to the function's ``__name__``.
        queue: The task queue the activity is served on.

    Raises:
        ActivityDefinitionError: listing every problem (not callable, empty name or queue,
            wrong number of parameters).
    """
    if callable(name):  # bare ``@activity``
        fn: Any = name
        _attach(fn, _validate(fn, getattr(fn, "__name__", None), queue))
        return fn  # mypy reads this branch as unreachable (``name`` is typed ``str | None``)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ActivityDefinitionError([f"the name must be a non-empty string, but is {name!r}"])

    def decorate(fn: F) -> F:
        chosen = name if name is not None else getattr(fn, "__name__", None)
        _attach(fn, _validate(fn, chosen, queue))
        return fn

    return decorate


def _attach(fn: Any, definition: ActivityDefinition) -> None:
    try:
        setattr(fn, _ATTR, definition)
    except (AttributeError, TypeError):
        raise ActivityDefinitionError([f"cannot attach activity metadata to {fn!r}"]) from None


def definition_of(fn: Any) -> ActivityDefinition | None:
    """Return the definition attached by ``@activity``, or None for an undecorated object."""
    d = getattr(fn, _ATTR, None) if callable(fn) else None
    return d if isinstance(d, ActivityDefinition) and d.fn is fn else None


class _Collector:
    """Accumulates definitions, remembering every claimant of a (queue, name) pair."""

    def __init__(self) -> None:
        self.registry: Registry = {}
        self.claims: dict[tuple[str, str], list[ActivityDefinition]] = {}

    def add(self, d: ActivityDefinition) -> None:
        claims = self.claims.setdefault((d.queue, d.name), [])
        if any(c.fn is d.fn for c in claims):
            return  # the same function reached twice (e.g. imported into two modules)
        claims.append(d)
        self.registry.setdefault(d.queue, {})[d.name] = d

    def result(self) -> Registry:
        dups = {k: [c.qualname for c in v] for k, v in self.claims.items() if len(v) > 1}
        if dups:
            raise DuplicateActivityError(dups)
        return self.registry


def _scan(module: ModuleType, into: _Collector) -> None:
    for value in list(vars(module).values()):
        d = definition_of(value)
        if d is not None:
            into.add(d)


def _modules(module_or_modules: ModuleType | Iterable[ModuleType]) -> list[ModuleType]:
    if isinstance(module_or_modules, ModuleType):
        return [module_or_modules]
    mods = list(module_or_modules)
    bad = [repr(m) for m in mods if not isinstance(m, ModuleType)]
    if bad:
        raise ActivityDefinitionError([f"expected a module, but got {b}" for b in bad])
    return mods


def collect_activities(module_or_modules: ModuleType | Iterable[ModuleType]) -> dict[str, dict[str, Callable[..., Any]]]:
    """Find every ``@activity`` function defined or imported in the given module(s).

    Returns:
        ``{queue: {name: function}}``.

    Raises:
        DuplicateActivityError: when different functions share a name on one queue; the error
            lists every duplicate, not just the first.
    """
    c = _Collector()
    for m in _modules(module_or_modules):
        _scan(m, c)
    return {q: {n: d.fn for n, d in acts.items()} for q, acts in c.result().items()}


def _from_callable(fn: Any, name: str | None = None) -> ActivityDefinition:
    d = definition_of(fn)
    if d is None:
        return _validate(fn, name if name is not None else getattr(fn, "__name__", None), DEFAULT_QUEUE)
    if name is not None and name != d.name:
        return _validate(fn, name, d.queue)
    return d


def build_registry(spec: Any) -> Registry:
    """Normalise every accepted form of activities into ``{queue: {name: ActivityDefinition}}``.

    Accepted: a module; a function; a list mixing modules and functions (undecorated functions
    are served under their ``__name__`` on the default queue); ``{name: fn}``; or
    ``{queue: {name: fn}}`` as returned by :func:`collect_activities`.
    """
    c = _Collector()
    problems: list[str] = []
    items: Iterable[Any]
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            try:
                if isinstance(value, Mapping):
                    for name, fn in value.items():
                        d = _from_callable(fn, name)
                        c.add(d if d.queue == key else _validate(fn, name, key))
                else:
                    c.add(_from_callable(value, key))
            except ActivityDefinitionError as exc:
                problems.extend(f"{key!r}: {p}" for p in exc.problems)
        items = ()
    elif isinstance(spec, (ModuleType,)) or callable(spec):
        items = [spec]
    else:
        items = list(spec)
    for item in items:
        try:
            if isinstance(item, ModuleType):
                _scan(item, c)
            else:
                c.add(_from_callable(item))
        except ActivityDefinitionError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ActivityDefinitionError(problems)
    registry = c.result()
    if not registry:
        raise ActivityDefinitionError(["no activities given (decorate functions with @activity)"])
    return registry
