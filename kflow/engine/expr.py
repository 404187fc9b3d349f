"""CEL expressions for spec workflows: compiled once per source string, evaluated over JSON scopes.

CEL (the Common Expression Language) is side-effect free and terminates, so it is safe to run on
the engine's hot path; nothing here uses ``eval``. Programs are cached by source text, so every
definition's expressions compile exactly once per process.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import cel


class ExpressionError(Exception):
    """An expression failed to compile or to evaluate; ``source`` is the expression text."""

    def __init__(self, source: str, detail: str) -> None:
        self.source, self.detail = source, detail
        super().__init__(f"expression {source!r}: {detail}")


@lru_cache(maxsize=4096)
def compile_expr(source: str) -> Any:
    """Compile ``source`` (cached); raise :class:`ExpressionError` on a syntax error."""
    try:
        return cel.compile(source)
    except (ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExpressionError(source, first) from None


def evaluate(source: str, scope: Mapping[str, Any]) -> Any:
    """Evaluate ``source`` against ``scope``; unknown names and type errors raise ExpressionError."""
    program = compile_expr(source)
    try:
        return _to_json(program.execute(dict(scope)))
    except KeyError as e:
        raise ExpressionError(source, f"unknown name {e.args[0]!r}") from None
    except Exception as e:  # the CEL runtime raises several builtin types for evaluation errors
        raise ExpressionError(source, f"{type(e).__name__}: {e}") from None


def _to_json(value: Any) -> Any:
    """Normalise CEL results to JSON-compatible Python values (tuples to lists, bytes to str)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
