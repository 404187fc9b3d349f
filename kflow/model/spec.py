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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kflow.model.errors import DefinitionError
from kflow.model.messages import priority_level
from kflow.model.versions import version_code

STEP_KINDS = ("task", "choice", "parallel", "foreach", "wait", "sleep", "child", "set", "succeed", "fail")
#: Step kinds whose errors a ``catch`` list can route.
CATCHABLE_KINDS = ("task", "child", "wait", "parallel", "foreach")
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

    steps: list[Step]


class WaitSpec(_Strict):
    """Wait for a signal, or an update, by name; its data becomes the step output.

    With ``update:`` the step waits for an update (a signal that returns a result): an update of
    that name is rejected while no thread waits on it, or when ``validate`` (CEL over the
    thread's variables and ``update``, the update's data) is false; accepted, the step completes
    with the data as its output and ``reply`` (CEL over the same variables, the output included)
    answers the caller (null without one).
    """

    signal: Optional[str] = None
    update: Optional[str] = None
    reply: Optional[str] = None
    validate_: Optional[str] = Field(default=None, alias="validate")
    timeout: Optional[Union[str, int, float]] = None

    @model_validator(mode="after")
    def _one_name(self) -> WaitSpec:
        if (self.signal is None) == (self.update is None):
            raise ValueError("expected exactly one of 'signal' or 'update' (the name to wait for)")
        if self.signal is not None and (self.reply is not None or self.validate_ is not None):
            raise ValueError("'reply' and 'validate' are only allowed when waiting for an 'update'")
        return self

    @field_validator("timeout")
    @classmethod
    def _dur(cls, v: Any) -> Any:
        if v is not None:
            parse_duration_ms(v)
        return v


class ChildSpec(_Strict):
    """Start a child workflow and wait for its result."""

    workflow: str
    version: Optional[int] = None  # an integer or "MAJOR.MINOR.PATCH" (stored as its version code)
    input: Optional[str] = None
    id: Optional[str] = None  # CEL expression for the child's instance id

    @field_validator("version", mode="before")
    @classmethod
    def _semver(cls, v: Any) -> Any:
        return _version_field(v)


def _version_field(v: Any) -> Any:
    """A ``MAJOR.MINOR.PATCH`` text becomes its version code (:mod:`kflow.model.versions`); ints pass as-is."""
    return version_code(v) if isinstance(v, str) else v


class FailSpec(_Strict):
    """End the workflow as FAILED with an error type and a CEL message."""

    error: str
    message: Optional[str] = None


def _duration_field(v: Any) -> Any:
    if v is not None:
        parse_duration_ms(v)
    return v


class RetrySpec(_Strict):
    """How a failed activity attempt is retried.

    Attempt ``n`` (from 1) waits ``min(initial * backoff ** (n - 1), max_interval)`` before attempt
    ``n + 1``, spread by ``± jitter`` (a fraction) derived deterministically from the instance id,
    activity id and attempt. ``max_attempts`` counts every attempt including the first; 0 means
    unlimited. Errors whose type is in ``non_retryable`` (or reported ``retryable: false``) fail at
    once. With no policy on the step nor on the workflow an activity gets exactly one attempt.
    """

    initial: Union[str, int, float] = "1s"
    backoff: float = Field(default=2.0, ge=1.0)
    max_interval: Optional[Union[str, int, float]] = None  # default: 100 x initial
    max_attempts: int = Field(default=3, ge=0)
    jitter: float = Field(default=0.0, ge=0.0, le=1.0)
    non_retryable: list[str] = Field(default_factory=list)

    @field_validator("initial", "max_interval")
    @classmethod
    def _dur(cls, v: Any) -> Any:
        return _duration_field(v)


class TimeoutSpec(_Strict):
    """Activity timeouts, each a durable timer: ``schedule_to_close`` spans every attempt from the
    first schedule; ``start_to_close`` bounds one attempt from the worker's start report (or from its
    schedule when none arrives); ``heartbeat`` is the longest gap allowed between heartbeats."""

    schedule_to_close: Optional[Union[str, int, float]] = None
    start_to_close: Optional[Union[str, int, float]] = None
    heartbeat: Optional[Union[str, int, float]] = None

    @field_validator("schedule_to_close", "start_to_close", "heartbeat")
    @classmethod
    def _dur(cls, v: Any) -> Any:
        return _duration_field(v)


class CompensateSpec(_Strict):
    """The activity that undoes a completed task step; ``input`` is evaluated when the step completes."""

    task: str
    input: Optional[str] = None
    queue: str = "default"
    retry: Optional[RetrySpec] = None
    timeout: Optional[TimeoutSpec] = None


class CatchRule(_Strict):
    """Route matching errors of a step to ``goto``; ``{type, message}`` is stored in ``output``."""

    errors: list[str] = Field(default_factory=lambda: ["*"])
    goto: str
    output: Optional[str] = None

    def matches(self, error_type: str) -> bool:
        return not self.errors or "*" in self.errors or error_type in self.errors


class SkipSpec(_Strict):
    """Skip the step: ``output`` (CEL, with the step's error as ``error``: ``{type, message}``) is its output."""

    output: Optional[str] = None


class IncidentSpec(_Strict):
    """Keep the instance open with an incident until an operator resolves it (or ``timeout`` fails it).

    ``role`` is who may resolve it when auth is on (besides ``system_admin``); ``instructions`` are
    shown to the operator; ``timeout``, a duration, fails the workflow when nobody resolved it by then.
    """

    role: Optional[str] = None
    instructions: str = ""
    timeout: Optional[Union[str, int, float]] = None

    @field_validator("timeout")
    @classmethod
    def _dur(cls, v: Any) -> Any:
        return _duration_field(v)


class OnFailureSpec(_Strict):
    """What a task step does once its retries are exhausted and no ``catch`` route took the error:
    ``skip`` (written ``on_failure: skip``, or ``{skip: {output: EXPR}}``) or ``incident``."""

    skip: Optional[SkipSpec] = None
    incident: Optional[IncidentSpec] = None

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, v: Any) -> Any:
        if v in ("skip", "incident"):
            return {v: {}}
        if isinstance(v, str):
            raise ValueError(f"expected 'skip', 'incident' or a mapping with one of them, but got {v!r}")
        if isinstance(v, dict):
            return {k: ({} if body is None else body) if k in ("skip", "incident") else body for k, body in v.items()}
        return v

    @model_validator(mode="after")
    def _one(self) -> OnFailureSpec:
        if (self.skip is None) == (self.incident is None):
            raise ValueError("expected exactly one of 'skip' or 'incident'")
        return self


class WorkflowTimeouts(_Strict):
    """Workflow-level timeouts: ``execution`` fails the instance with ``WorkflowTimeout``."""

    execution: Optional[Union[str, int, float]] = None

    @field_validator("execution")
    @classmethod
    def _dur(cls, v: Any) -> Any:
        return _duration_field(v)


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
    steps: Optional[list[Step]] = None
    wait: Optional[WaitSpec] = None
    sleep: Optional[Union[str, int, float]] = None
    child: Optional[ChildSpec] = None
    set: Optional[dict[str, str]] = None
    succeed: Optional[str] = Field(default=None)
    fail: Optional[FailSpec] = None
    goto: Optional[str] = None
    retry: Optional[RetrySpec] = None
    timeout: Optional[TimeoutSpec] = None
    compensate: Optional[CompensateSpec] = None
    catch: Optional[list[CatchRule]] = None
    #: What happens once the task's retries are exhausted and no ``catch`` route took the error.
    on_failure: Optional[OnFailureSpec] = None
    #: Run the task inside the engine process (``kflow engine --activities MODULE``) and record its
    #: result in the same transaction as the decision that scheduled it: for short work only.
    local: bool = False
    #: Search attributes set when the step runs: attribute name -> CEL expression. The values are
    #: merged into the instance's ``search`` dict (carried in the state record) for the read side.
    search: Optional[dict[str, str]] = None
    #: Priority of this task step's activities (a level name), instead of the instance's.
    priority: Optional[int] = None
    #: CEL expression (e.g. ``input.customer``, or a quoted literal ``"'gold'"``) naming the fairness
    #: key of this task step's activities: a saturated worker shares a queue and level across keys
    #: in weighted round robin. Default: the instance's tenant.
    fairness_key: Optional[str] = None

    @field_validator("priority", mode="before")
    @classmethod
    def _level(cls, v: Any) -> Optional[int]:
        return priority_level(v)

    @property
    def kind(self) -> str:
        kinds = [k for k in STEP_KINDS if getattr(self, k) is not None or (k == "succeed" and "succeed" in self.model_fields_set)]
        return kinds[0] if kinds else ""


Branch.model_rebuild()


class WorkflowSpec(_Strict):
    """A whole spec workflow definition."""

    name: str
    #: An integer (kept as-is; ``N`` compares as ``N.0.0``) or a semantic version ``"1.4.0"``, stored
    #: as its version code (see :mod:`kflow.model.versions`).
    version: int = 1
    description: Optional[str] = None
    steps: list[Step]
    retry: Optional[RetrySpec] = None  # default policy for task steps without their own
    timeout: Optional[WorkflowTimeouts] = None
    #: Priority of instances started without one (a level name; stored as its number 1-5).
    priority: Optional[int] = None

    @field_validator("priority", mode="before")
    @classmethod
    def _level(cls, v: Any) -> Optional[int]:
        return priority_level(v)

    @field_validator("version", mode="before")
    @classmethod
    def _semver(cls, v: Any) -> Any:
        return _version_field(v)


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
    if kind != "task":
        for opt in ("retry", "timeout", "compensate", "on_failure", "fairness_key"):
            if getattr(step, opt) is not None:
                problems.append((step.id, f"'{opt}' is only allowed on a task step"))
    if step.local and kind != "task":
        problems.append((step.id, "'local' is only allowed on a task step"))
    if step.local and step.timeout is not None and step.timeout.heartbeat is not None:
        problems.append((step.id, "a local task cannot heartbeat: drop 'timeout.heartbeat' (local tasks are "
                                  "bounded by 'timeout.start_to_close') or run it on a worker"))
    if step.catch is not None and kind not in CATCHABLE_KINDS:
        problems.append((step.id, f"'catch' is only allowed on {', '.join(CATCHABLE_KINDS)} steps"))
    for rule in step.catch or []:
        if rule.output is not None and not _IDENT.match(rule.output):
            problems.append((step.id, f"catch output '{rule.output}' must be an identifier usable in expressions"))
    for name in step.search or {}:
        if not _IDENT.match(name):
            problems.append((step.id, f"search attribute name '{name}' must be an identifier"))
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
        targets += [r.goto for r in s.catch or []]
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
        problems: list[tuple[str, str]] = []
        for err in e.errors():
            loc = err["loc"]
            step_id = _step_id_at(doc, loc)
            where = ".".join(str(p) for p in loc)
            problems.append((step_id, f"{where}: {err['msg']}"))
        raise DefinitionError(name, problems) from None
    problems = []
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
