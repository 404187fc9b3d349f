"""The data converter: Python values in and out of the JSON that kflow's records carry.

Workflow inputs, activity arguments and results, signal data and query answers travel as JSON.
Users may pass and return richer values — dataclasses, pydantic models, ``datetime``, ``UUID``,
``Enum``, sets and tuples, nested in lists and dicts — and :func:`to_json` turns them into plain
JSON values; :func:`from_json` turns JSON back into the type a function declares (by its
annotation), validated by pydantic, so an activity ``def charge(order: Order) -> Receipt`` gets an
``Order`` and its ``Receipt`` is stored as JSON. An unannotated parameter (or ``Any``) gets the
JSON value as it is, which is what kflow did before.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Optional, get_type_hints

from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python

from kflow.model.errors import KflowError

__all__ = ["ConversionError", "from_json", "input_type", "return_type", "to_json"]

_PLAIN = (str, int, float, bool, type(None))


class ConversionError(KflowError):
    """A value could not be converted to or from JSON; ``where`` says whose value it was."""

    #: How a worker reports it: a bad argument or result is not fixed by retrying.
    type, retryable = "InvalidValue", False

    def __init__(self, where: str, detail: str) -> None:
        self.where, self.detail = where, detail
        self.message = f"{where}: {detail}"
        super().__init__(self.message)


def to_json(value: Any, where: str = "value") -> Any:
    """``value`` as a JSON value (dicts, lists, str, numbers, bools, None).

    Plain JSON passes through untouched (the common case costs one type check); anything else
    is converted by pydantic (dataclasses, models, datetimes, UUIDs, enums, sets, tuples).
    """
    if isinstance(value, _PLAIN):
        return value
    try:
        return to_jsonable_python(value)
    except PydanticSerializationError as e:
        raise ConversionError(where, f"cannot be turned into JSON ({type(value).__name__}): {e}") from None


def from_json(data: Any, tp: Any, where: str = "value") -> Any:
    """``data`` as an instance of ``tp`` (None, ``Any`` or an empty annotation: ``data`` unchanged)."""
    if tp is None or tp is Any or tp is inspect.Parameter.empty:
        return data
    try:
        return _adapter(tp).validate_python(data)
    except ValidationError as e:
        raise ConversionError(where, f"is not a valid {getattr(tp, '__name__', tp)}: {e}") from None


@lru_cache(maxsize=1024)
def _adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)  # noqa: B004
    try:
        return get_type_hints(target)
    except Exception:  # unresolvable forward references: treat as unannotated
        return {}


def input_type(fn: Callable[..., Any], position: int = 0) -> Optional[Any]:
    """The annotation of ``fn``'s positional parameter ``position`` (None when there is none)."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    if position >= len(params):
        return None
    return _hints(fn).get(params[position].name)


def return_type(fn: Callable[..., Any]) -> Optional[Any]:
    """``fn``'s return annotation (None when there is none)."""
    return _hints(fn).get("return")
