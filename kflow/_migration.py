"""Migration plans: the YAML that says how running instances move to another workflow version.

A plan names a workflow, the versions it moves instances from (a range) and the version it moves
them to, where each waiting position goes (``step_map: {old_id: new_id}``; a step whose id exists
in the target maps to itself) and how variables change (``vars: {name: CEL}``, evaluated over the
variables before the move), optionally with a Python function registered by
:func:`migration` for the same workflow and versions. :func:`check_plan` validates a plan against
the deployed definitions and reports every problem in one :class:`MigrationPlanError`;
:func:`plan_command` builds the ``MigrateWorkflow`` command one instance gets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kflow.engine.definitions import CompiledSpec
from kflow.engine.expr import ExpressionError, compile_expr
from kflow.engine.migration import VersionRangeError, matches, step_map_problems, transform_key
from kflow.engine.registry import WorkflowRegistry, default_registry
from kflow.model.errors import KflowError
from kflow.model.messages import Command
from kflow.model.versions import format_version, version_code

__all__ = ["MigrationPlan", "MigrationPlanError", "check_plan", "load_plan", "migration", "plan_command"]

F = TypeVar("F", bound=Callable[..., Any])


class MigrationPlanError(KflowError):
    """A migration plan is invalid; ``problems`` lists every reason."""

    def __init__(self, plan: str, problems: Sequence[str]) -> None:
        self.plan, self.problems = plan, list(problems)
        super().__init__(f"migration plan '{plan}' is invalid:\n" + "\n".join(f"  - {p}" for p in self.problems))


class MigrationPlan(BaseModel):
    """One migration plan (``kflow migrate --plan FILE``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    #: Recorded in every ``WorkflowMigrated`` event the plan causes.
    id: str
    #: The workflow whose instances move.
    workflow: str
    #: Versions instances move from: exact (``1.2.0``) or a range (``^1``, ``~1.4``, ``>=1.2,<2``).
    from_: str = Field(alias="from")
    #: The exact version they move to (deployed as a spec workflow).
    to: Union[int, str]
    #: Old step id -> new step id, for waiting positions whose step is renamed or replaced.
    step_map: dict[str, str] = Field(default_factory=dict)
    #: Variable name -> CEL over the variables before the move (and ``input``, ``vars``).
    vars: dict[str, str] = Field(default_factory=dict)
    #: Also run the Python function registered with ``@kflow.migration(workflow, from, to)`` (in the
    #: engine); an engine without it rejects the migration.
    python: bool = False

    @field_validator("from_", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) else v

    @property
    def to_version(self) -> int:
        return version_code(self.to)

    @property
    def transform(self) -> str:
        return transform_key(self.workflow, self.from_, self.to_version)


def load_plan(source: Union[str, Path, Mapping[str, Any]]) -> MigrationPlan:
    """Read a plan from a YAML/JSON file (or a dict) and check its shape.

    Raises:
        MigrationPlanError: not a mapping, unknown or missing keys, a bad version or range.
        OSError: the file cannot be read.
    """
    if isinstance(source, Mapping):
        doc: Any = dict(source)
        name = str(doc.get("id", "?"))
    else:
        path = Path(source)
        name = path.name
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise MigrationPlanError(name, [f"not valid YAML/JSON: {e}"]) from None
    if not isinstance(doc, dict):
        raise MigrationPlanError(name, ["expected a mapping with id, workflow, from, to, step_map, vars"])
    try:
        plan = MigrationPlan.model_validate(doc)
    except ValidationError as e:
        raise MigrationPlanError(str(doc.get("id", name)),
                                 [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]) from None
    problems = []
    try:
        _ = plan.to_version  # evaluated for the ValueError of an unparseable version
    except ValueError as e:
        problems.append(f"to: {e}")
    try:
        matches(plan.from_, 1)
    except VersionRangeError as e:
        problems.append(f"from: {e}")
    for name_, src in sorted(plan.vars.items()):
        try:
            compile_expr(src)
        except ExpressionError as e:
            problems.append(f"vars.{name_}: invalid expression {src!r}: {e.detail}")
    if problems:
        raise MigrationPlanError(plan.id, problems)
    return plan


def check_plan(plan: MigrationPlan, versions: Mapping[int, Optional[CompiledSpec]]) -> list[CompiledSpec]:
    """Validate ``plan`` against the deployed versions of its workflow; the source versions it covers.

    Args:
        versions: Every deployed version of ``plan.workflow`` -> its compiled spec (None: a code workflow).
            A plan whose target is a code workflow covers code versions and gives no step_map, vars or
            python (it returns no specs).

    Raises:
        MigrationPlanError: no deployed version matches ``from``, ``to`` is not deployed as a spec
            workflow, or a ``step_map`` id is unknown in the source versions or the target.
    """
    problems: list[str] = []
    if plan.to_version in versions and versions[plan.to_version] is None:
        return _check_code_plan(plan, versions)
    olds = [c for v, c in versions.items() if c is not None and v != plan.to_version and matches(plan.from_, v)]
    if not olds:
        known = ", ".join(format_version(v) for v in versions) or "none"
        problems.append(f"from: no deployed version of '{plan.workflow}' other than the target matches "
                        f"'{plan.from_}' (deployed: {known})")
    new = versions.get(plan.to_version)
    if new is None:
        problems.append(f"to: {plan.workflow}@{format_version(plan.to_version)} is not deployed as a spec workflow")
    elif olds:
        problems += step_map_problems(plan.step_map, olds, new)
    if problems:
        raise MigrationPlanError(plan.id, problems)
    return olds


def _check_code_plan(plan: MigrationPlan, versions: Mapping[int, Optional[CompiledSpec]]) -> list[CompiledSpec]:
    """A plan whose target is a code workflow: it names source versions, and nothing to map or transform."""
    problems = []
    if not any(c is None and v != plan.to_version and matches(plan.from_, v) for v, c in versions.items()):
        known = ", ".join(format_version(v) for v, c in versions.items() if c is None) or "none"
        problems.append(f"from: no version of code workflow '{plan.workflow}' other than the target matches "
                        f"'{plan.from_}' (known: {known})")
    given = [k for k, v in (("step_map", plan.step_map), ("vars", plan.vars), ("python", plan.python)) if v]
    if given:
        problems.append(f"{', '.join(given)}: a code workflow moves by replay (its new code must reproduce each "
                        "instance's history), so a plan for it has no step_map, vars or python")
    if problems:
        raise MigrationPlanError(plan.id, problems)
    return []


def plan_command(plan: MigrationPlan, instance_id: str, command_id: str, reason: str = "", by: str = "") -> Command:
    """The ``MigrateWorkflow`` command ``plan`` sends to ``instance_id``."""
    transform = plan.transform if plan.python else None
    return Command("MigrateWorkflow", instance_id,
                   {"plan_id": plan.id, "from_range": plan.from_, "to_version": plan.to_version,
                    "step_map": dict(plan.step_map), "vars": dict(plan.vars), "transform": transform,
                    "reason": reason, "by": by}, command_id=command_id)


def migration(workflow: str, from_: str, to: Union[int, str], *,
              registry: Optional[WorkflowRegistry] = None) -> Callable[[F], F]:
    """Register a Python function that transforms an instance's variables when it migrates.

    The function gets the variables (after the plan's CEL ``vars``) as a dict and returns the new
    dict. It runs in the engine that decides the migration, so the module defining it must be
    imported there (like hosted code workflows); a plan for ``(workflow, from, to)`` then uses it.
    An exception it raises rejects the migration of that instance only. It is kept in ``registry``
    (the default one, which engines use unless given another).

    Example:
        >>> @kflow.migration("order", "1.x", "2.0.0")  # doctest: +SKIP
        ... def split_name(vars):
        ...     first, _, last = vars.pop("name", "").partition(" ")
        ...     return {**vars, "first": first, "last": last}
    """
    code = version_code(to)
    matches(from_, 1)  # a malformed range fails at registration

    def register(fn: F) -> F:
        (registry if registry is not None else default_registry).add_transform(transform_key(workflow, from_, code), fn)
        return fn

    return register
