"""Read connector declarations from YAML and the small template language their operations use.

A connectors file has one top-level key, ``connectors``: a list of ``{name, type, queue,
settings, operations}``. ``${VAR}`` and ``${VAR:-default}`` in settings are resolved from the
environment; settings whose key looks secret (``password``, ``token``, ``secret``, ``*_key``...)
and every value that came from the environment are recorded in :attr:`ConnectorSpec.secrets`,
their values wrapped in :class:`Secret` (whose ``repr`` is ``'***'``) and scrubbed from every
message the connectors log or report (:func:`scrub`).

Operations are written with two kinds of CEL-based fields: an **expression** (:class:`Expr`) is one
CEL expression over the operation's variables (``input`` and, depending on the field, ``response``,
``callback_url``...); a **template** (:class:`Template`) is text where each ``{...}`` is a CEL
expression whose value is inserted (``"/orders/{input.id}"``; ``{{`` and ``}}`` are literal braces).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import orjson
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from kflow.connectors.base import ConnectorConfigError, ConnectorError, ConnectorSpec, connector_types, unknown_type
from kflow.engine.expr import ExpressionError, compile_expr, evaluate
from kflow.model.spec import parse_duration_ms

__all__ = [
    "Duration",
    "Expr",
    "Secret",
    "Template",
    "load_connectors",
    "parse_settings",
    "redacted",
    "scrub",
    "secret_values",
]

#: ``${VAR}`` or ``${VAR:-default}``.
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
#: Setting keys whose values are secrets (matched on ``_``-separated words of the lower-cased key).
_SECRET_WORDS = frozenset({"password", "passwd", "pass", "token", "secret", "key", "apikey", "credential",
                           "credentials", "bearer", "authorization"})
REDACTED = "***"

#: Seconds, written as a number of seconds or a duration string (``250ms``, ``30s``, ``5m``, ``1h``).
Duration = Annotated[float, BeforeValidator(lambda v: parse_duration_ms(v) / 1000)]


class Secret(str):
    """A setting value that must never be shown: ``repr`` is ``'***'``; ``str`` is the value itself."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(REDACTED)


def _looks_secret(key: str) -> bool:
    words = set(re.split(r"[_\-.]", key.lower()))
    return bool(words & _SECRET_WORDS) or key.lower() in ("api_key", "apikey")


class _Declaration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
    type: str
    queue: str = Field("default", min_length=1)
    settings: dict[str, Any] = Field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = Field(default_factory=dict)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connectors: list[_Declaration]


def _where(loc: Iterable[Any]) -> str:
    return ".".join(str(p) for p in loc)


def _validation_problems(exc: ValidationError, names: list[Any] | None = None) -> list[str]:
    out = []
    for e in exc.errors():
        loc: list[Any] = list(e["loc"])
        if names is not None and len(loc) >= 2 and loc[0] == "connectors" and isinstance(loc[1], int):
            who = names[loc[1]] if loc[1] < len(names) and names[loc[1]] else f"#{loc[1] + 1}"
            loc = [f"connector '{who}'"] + loc[2:]
        out.append(f"{_where(loc)}: {e['msg']}")
    return out


def _resolve(value: Any, path: str, connector: str, env: Mapping[str, str], secrets: set[str]) -> Any:
    """Resolve ``${VAR}`` references in ``value`` (recursively); record secret paths in ``secrets``."""
    if isinstance(value, dict):
        return {k: _resolve(v, f"{path}.{k}" if path else str(k), connector, env, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, f"{path}[{i}]", connector, env, secrets) for i, v in enumerate(value)]
    names = [p.split("[", 1)[0] for p in path.split(".")]
    key = names[-1]
    # ``api_key: {header: X-Key, value: ...}``: the value of a secret-looking parent is secret too
    secret = _looks_secret(key) or (key == "value" and len(names) > 1 and _looks_secret(names[-2]))
    if isinstance(value, str) and "${" in value:
        def sub(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var in env:
                return env[var]
            if default is not None:
                return default
            raise ConnectorConfigError(
                f"connector '{connector}': setting '{path}' refers to ${{{var}}}, but the environment "
                f"variable {var} is not set (set it, or give a default: ${{{var}:-value}})")

        value = _ENV_REF.sub(sub, value)
        secret = True
    if secret and value is not None and not isinstance(value, (dict, list)):
        secrets.add(path)
        return Secret(str(value))
    return value


def _read(path_or_text: str | Path) -> tuple[str, str]:
    """``(text, source name)`` of a file path or of YAML text given directly."""
    if isinstance(path_or_text, Path):
        return path_or_text.read_text(), str(path_or_text)
    if "\n" not in path_or_text and not path_or_text.lstrip().startswith(("connectors:", "{")):
        p = Path(path_or_text)
        return p.read_text(), str(p)  # FileNotFoundError names the path
    return path_or_text, "<text>"


def load_connectors(path_or_text: str | Path, env: Mapping[str, str] | None = None) -> list[ConnectorSpec]:
    """Read and validate a connectors file (a path, or the YAML text itself).

    Args:
        path_or_text: A file path, or YAML text with a top-level ``connectors:`` list.
        env: Where ``${VAR}`` references are looked up; defaults to ``os.environ``.

    Returns:
        One :class:`ConnectorSpec` per declaration, settings resolved, secrets recorded.

    Raises:
        ConnectorConfigError: listing every problem: bad YAML or shape, an unknown ``type``
            (naming the known ones), a duplicate ``name``, a missing environment variable.
        FileNotFoundError: the file does not exist.
    """
    text, source = _read(path_or_text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConnectorConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or "connectors" not in data:
        raise ConnectorConfigError(f"{source}: expected a mapping with a top-level 'connectors:' list")
    raw = data.get("connectors")
    names = [c.get("name") if isinstance(c, dict) else None for c in raw] if isinstance(raw, list) else None
    try:
        parsed = _File.model_validate(data)
    except ValidationError as e:
        raise ConnectorConfigError(f"{source}: invalid connectors: " + "; ".join(_validation_problems(e, names))) from None
    env = os.environ if env is None else env
    known = connector_types()
    problems: list[str] = []
    specs: list[ConnectorSpec] = []
    seen: set[str] = set()
    for d in parsed.connectors:
        if d.name in seen:
            problems.append(f"duplicate connector name '{d.name}'")
            continue
        seen.add(d.name)
        if d.type not in known:
            problems.append(unknown_type(d.name, d.type, known))
            continue
        secrets: set[str] = set()
        try:
            settings = _resolve(d.settings, "", d.name, env, secrets)
        except ConnectorConfigError as e:
            problems.append(str(e))
            continue
        specs.append(ConnectorSpec(name=d.name, type=d.type, queue=d.queue, settings=settings,
                                   operations=d.operations, secrets=frozenset(secrets)))
    if problems:
        raise ConnectorConfigError(f"{source}: " + "; ".join(problems))
    return specs


# -- secrets ------------------------------------------------------------------------------


def _walk(value: Any, path: str = "") -> Iterable[tuple[str, Any]]:
    """``(path, value)`` of every leaf setting, paths spelt as :attr:`ConnectorSpec.secrets` spells them."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, value


def secret_values(spec: ConnectorSpec) -> list[str]:
    """The secret setting values of ``spec`` (longest first, so scrubbing never leaves a piece)."""
    values = {str(v) for p, v in _walk(spec.settings) if p in spec.secrets and v is not None and str(v)}
    return sorted(values, key=len, reverse=True)


def scrub(text: str, spec: ConnectorSpec | Iterable[str]) -> str:
    """``text`` with every secret value of ``spec`` replaced by ``***``."""
    values = secret_values(spec) if isinstance(spec, ConnectorSpec) else sorted(spec, key=len, reverse=True)
    for v in values:
        if len(v) >= 3:
            text = text.replace(v, REDACTED)
    return text


def redacted(spec: ConnectorSpec) -> dict[str, Any]:
    """The settings of ``spec`` with every secret replaced by ``***`` (for logs and ``kflow connect``)."""

    def walk(value: Any, path: str) -> Any:
        if path in spec.secrets:
            return REDACTED
        if isinstance(value, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    return walk(spec.settings, "")  # type: ignore[no-any-return]


def parse_settings(model: type[BaseModel], data: Any, spec: ConnectorSpec, what: str = "settings") -> Any:
    """Validate ``data`` with ``model``; a problem is a :class:`ConnectorConfigError` naming the field."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as e:
        problems = "; ".join(f"{_where(x['loc']) or '(root)'}: {x['msg']}" for x in e.errors())
        raise ConnectorConfigError(scrub(f"connector '{spec.name}' ({spec.type}): {what}: {problems}", spec)) from None


# -- expressions and templates -------------------------------------------------------------


class Expr:
    """One CEL expression, compiled when declared; :meth:`value` raises a non-retryable ``ExpressionError``."""

    __slots__ = ("source", "where")

    def __init__(self, source: Any, where: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ConnectorConfigError(f"{where}: expected a CEL expression (a non-empty string), but got {source!r}")
        self.source, self.where = source, where
        try:
            compile_expr(source)
        except ExpressionError as e:
            raise ConnectorConfigError(f"{where}: {e}") from None

    def value(self, scope: Mapping[str, Any]) -> Any:
        try:
            return evaluate(self.source, scope)
        except ExpressionError as e:
            raise ConnectorError("ExpressionError", f"{self.where}: {e}", retryable=False) from None

    def __repr__(self) -> str:
        return f"Expr({self.source!r})"


def _split_template(text: str, where: str) -> list[str | Expr]:
    """Split ``text`` into literal parts and ``{expression}`` parts (quotes and nesting respected)."""
    parts: list[str | Expr] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "{}" and i + 1 < n and text[i + 1] == ch:
            buf.append(ch)
            i += 2
            continue
        if ch == "}":
            raise ConnectorConfigError(f"{where}: unmatched '}}' at position {i} of {text!r} (write '}}}}' for a literal brace)")
        if ch != "{":
            buf.append(ch)
            i += 1
            continue
        depth, j, quote = 1, i + 1, ""
        while j < n and depth:
            c = text[j]
            if quote:
                if c == "\\":
                    j += 1
                elif c == quote:
                    quote = ""
            elif c in "'\"":
                quote = c
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            j += 1
        if depth:
            raise ConnectorConfigError(f"{where}: unclosed '{{' at position {i} of {text!r} (write '{{{{' for a literal brace)")
        if buf:
            parts.append("".join(buf))
            buf = []
        parts.append(Expr(text[i + 1 : j - 1], where))
        i = j
    if buf:
        parts.append("".join(buf))
    return parts


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


class Template:
    """Text with ``{CEL}`` interpolations, e.g. ``"/orders/{input.id}"``; a plain string is a constant."""

    __slots__ = ("parts", "source")

    def __init__(self, source: Any, where: str) -> None:
        if not isinstance(source, (str, int, float)) or isinstance(source, bool):
            raise ConnectorConfigError(f"{where}: expected a text template, but got {source!r}")
        self.source = str(source)
        self.parts = _split_template(self.source, where)

    def render(self, scope: Mapping[str, Any]) -> str:
        return "".join(p if isinstance(p, str) else _text(p.value(scope)) for p in self.parts)

    def __repr__(self) -> str:
        return f"Template({self.source!r})"
