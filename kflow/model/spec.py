"""Spec workflow definitions: the pydantic models of the YAML/JSON format and their structural checks.

A definition is a name, a version and a list of steps; each step has an ``id`` and exactly one
kind key (``task``, ``choice``, ``parallel``, ``foreach``, ``wait``, ``sleep``, ``child``, ``set``,
``succeed``, ``fail``). Structural problems (unknown keys, two kinds on one step, duplicate ids,
``goto`` targets outside the step's list, bad durations) are collected and reported together as a
:class:`~kflow.model.errors.DefinitionError` naming each step. Expressions are checked by the
engine, which compiles them.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kflow.model.errors import DefinitionError

STEP_KINDS = ("task", "choice", "parallel", "foreach", "wait", "sleep", "child", "set", "succeed", "fail")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1000}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_duration_ms(value: Union[str, int, float]) -> int:
    """Parse ``2s``, ``5m``, ``1h``, ``250ms``, ``1d`` or a number of seconds into milliseconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '2s', '5m', '1h', but got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"expected a non-negative duration, but got {value!r}")
        return int(value * 1000)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"expected a duration like '2s', '5m', '1h', but got {value!r}")
    return int(float(m.group(1)) * _UNITS_MS[m.group(2)])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class ChoiceRule(_Strict):
    """One branch of a ``choice``: the first rule whose ``when`` is true wins."""

    when: str
    goto: str


class Branch(_Strict):
    """One branch of a ``parallel`` step."""

    steps: list["Step"]


class WaitSpec(_Strict):
    """Wait for a signal by name; the signal's data becomes the step output."""

    signal: str
    timeout: Optional[Union[str, int, float]] = None

    @field_validator("timeout")
    @classmethod
    def _dur(cls, v: Any) -> Any:
        if v is not None:
            parse_duration_ms(v)
        return v


class ChildSpec(_Strict):
    """Start a child workflow and wait for its result."""

    workflow: str
    version: Optional[int] = None
    input: Optional[str] = None
    id: Optional[str] = None  # CEL expression for the child's instance id


class FailSpec(_Strict):
    """End the workflow as FAILED with an error type and a CEL message."""

    error: str
    message: Optional[str] = None


class Step(_Strict):
    """A step: an ``id`` plus exactly one kind key and the options that kind accepts."""

    id: str
    task: Optional[str] = None
    queue: str = "default"
    input: Optional[str] = None
    output: Optional[str] = None
    choice: Optional[list[ChoiceRule]] = None
    otherwise: Optional[str] = None
    parallel: Optional[list[Branch]] = None
    foreach: Optional[str] = None
    as_: str = Field(default="item", alias="as")
    concurrency: int = 0
    steps: Optional[list["Step"]] = None
    wait: Optional[WaitSpec] = None
    sleep: Optional[Union[str, int, float]] = None
    child: Optional[ChildSpec] = None
    set: Optional[dict[str, str]] = None
    succeed: Optional[str] = Field(default=None)
    fail: Optional[FailSpec] = None
    goto: Optional[str] = None

    @property
    def kind(self) -> str:
        kinds = [k for k in STEP_KINDS if getattr(self, k) is not None or (k == "succeed" and "succeed" in self.model_fields_set)]
        return kinds[0] if kinds else ""


Branch.model_rebuild()


class WorkflowSpec(_Strict):
    """A whole spec workflow definition."""

    name: str
    version: int = 1
    description: Optional[str] = None
    steps: list[Step]


def _step_problems(step: Step, path: str) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    kinds = [k for k in STEP_KINDS if getattr(step, k) is not None or (k == "succeed" and "succeed" in step.model_fields_set)]
    if not kinds:
        problems.append((step.id, f"expected one of {', '.join(STEP_KINDS)}, but the step has none"))
    elif len(kinds) > 1:
        problems.append((step.id, f"expected exactly one step kind, but found {', '.join(kinds)}"))
    if not _IDENT.match(step.id):
        problems.append((step.id, "step ids must be identifiers (letters, digits, underscore)"))
    if step.output is not None and not _IDENT.match(step.output):
        problems.append((step.id, f"output '{step.output}' must be an identifier usable in expressions"))
    kind = kinds[0] if len(kinds) == 1 else ""
    if kind == "foreach":
        if not step.steps:
            problems.append((step.id, "foreach needs a non-empty 'steps' list"))
        if step.concurrency < 0:
            problems.append((step.id, f"concurrency must be >= 0, but is {step.concurrency}"))
        if not _IDENT.match(step.as_):
            problems.append((step.id, f"'as: {step.as_}' must be an identifier"))
    elif step.steps is not None:
        problems.append((step.id, "'steps' is only allowed on a foreach step"))
    if kind == "parallel" and not step.parallel:
        problems.append((step.id, "parallel needs at least one branch"))
    if kind == "choice" and not step.choice:
        problems.append((step.id, "choice needs at least one rule"))
    if kind != "choice" and step.otherwise is not None:
        problems.append((step.id, "'otherwise' is only allowed on a choice step"))
    if kind == "sleep":
        try:
            parse_duration_ms(step.sleep)  # type: ignore[arg-type]
        except ValueError as e:
            problems.append((step.id, str(e)))
    if kind == "set":
        for name in step.set or {}:
            if not _IDENT.match(name) or name == "input":
                problems.append((step.id, f"variable name '{name}' must be an identifier other than 'input'"))
    return problems


def _check_lists(steps: list[Step], seen: dict[str, str], problems: list[tuple[str, str]], path: str) -> None:
    local = {s.id for s in steps}
    for s in steps:
        if s.id in seen:
            problems.append((s.id, f"duplicate step id (also used in {seen[s.id] or 'the top-level list'})"))
        seen[s.id] = path
        problems.extend(_step_problems(s, path))
        targets = [r.goto for r in s.choice or []] + [t for t in (s.otherwise, s.goto) if t]
        for t in targets:
            if t not in local:
                problems.append((s.id, f"goto target '{t}' is not a step of the same list"))
        for i, b in enumerate(s.parallel or []):
            _check_lists(b.steps, seen, problems, f"{s.id}.{i}")
        if s.steps:
            _check_lists(s.steps, seen, problems, s.id)


def parse_spec(doc: dict[str, Any]) -> WorkflowSpec:
    """Validate a definition document; raise :class:`DefinitionError` listing every problem."""
    name = str(doc.get("name", "?")) if isinstance(doc, dict) else "?"
    if not isinstance(doc, dict):
        raise DefinitionError(name, [("", f"expected a mapping with name, version and steps, but got {type(doc).__name__}")])
    try:
        spec = WorkflowSpec.model_validate(doc)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = err["loc"]
            step_id = _step_id_at(doc, loc)
            where = ".".join(str(p) for p in loc)
            problems.append((step_id, f"{where}: {err['msg']}"))
        raise DefinitionError(name, problems) from None
    problems: list[tuple[str, str]] = []
    if not spec.steps:
        problems.append(("", "a workflow needs at least one step"))
    if spec.version < 1:
        problems.append(("", f"version must be >= 1, but is {spec.version}"))
    _check_lists(spec.steps, {}, problems, "")
    if problems:
        raise DefinitionError(spec.name, problems)
    return spec


def _step_id_at(doc: Any, loc: tuple[Any, ...]) -> str:
    """Best-effort: the id of the innermost step on a pydantic error location."""
    node, found = doc, ""
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
        if isinstance(node, dict) and isinstance(node.get("id"), str):
            found = node["id"]
    return found
