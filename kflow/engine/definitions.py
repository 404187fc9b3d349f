"""Compiled definitions and the read-only view of deployed ones the engine decides against.

``compile_spec`` validates a spec document (structure via :mod:`kflow.model.spec`, then every CEL
expression) and flattens its nested step lists into a lookup table so the interpreter can address
any step by ``(list key, index)``. List keys: ``""`` for the top level, ``"<step>.<i>"`` for branch
``i`` of a parallel step, ``"<step>"`` for a foreach body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from kflow.engine.expr import ExpressionError, compile_expr
from kflow.model.errors import DefinitionError
from kflow.model.messages import Definition
from kflow.model.spec import Step, WorkflowSpec, parse_duration_ms, parse_spec


@dataclass
class CompiledSpec:
    """A validated spec workflow, flattened for the interpreter."""

    name: str
    version: int
    spec: WorkflowSpec
    lists: dict[str, list[Step]] = field(default_factory=dict)
    where: dict[str, tuple[str, int]] = field(default_factory=dict)
    kind: str = "spec"

    def index_of(self, list_key: str, step_id: str) -> int:
        return self.where[step_id][1]


def _expressions(step: Step) -> list[str]:
    exprs = [e for e in (step.input, step.foreach, step.succeed) if e]
    exprs += [r.when for r in step.choice or []]
    exprs += list((step.set or {}).values())
    exprs += list((step.search or {}).values())
    if step.child:
        exprs += [e for e in (step.child.input, step.child.id) if e]
    if step.fail and step.fail.message:
        exprs.append(step.fail.message)
    if step.compensate and step.compensate.input:
        exprs.append(step.compensate.input)
    return exprs


def _flatten(c: CompiledSpec, key: str, steps: list[Step], problems: list[tuple[str, str]]) -> None:
    c.lists[key] = steps
    for i, s in enumerate(steps):
        c.where[s.id] = (key, i)
        for src in _expressions(s):
            try:
                compile_expr(src)
            except ExpressionError as e:
                problems.append((s.id, f"invalid expression {src!r}: {e.detail}"))
        if s.wait and s.wait.timeout is not None:
            parse_duration_ms(s.wait.timeout)
        for bi, b in enumerate(s.parallel or []):
            _flatten(c, f"{s.id}.{bi}", b.steps, problems)
        if s.foreach is not None and s.steps:
            _flatten(c, s.id, s.steps, problems)


def compile_spec(doc: dict[str, Any]) -> CompiledSpec:
    """Validate and compile a spec document; raise :class:`DefinitionError` naming each bad step."""
    spec = parse_spec(doc)
    c = CompiledSpec(name=spec.name, version=spec.version, spec=spec)
    problems: list[tuple[str, str]] = []
    _flatten(c, "", spec.steps, problems)
    if problems:
        raise DefinitionError(spec.name, problems)
    return c


class DefinitionsView(Protocol):
    """Read-only access to deployed definitions (a global table on every engine)."""

    def get(self, name: str, version: int) -> Optional[Any]: ...

    def latest(self, name: str) -> Optional[int]: ...


class InMemoryDefinitions:
    """A dict-backed :class:`DefinitionsView`; the engine's global table feeds one of these."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, int], Any] = {}
        self._latest: dict[str, int] = {}

    def add(self, compiled: Any) -> None:
        self._by_key[(compiled.name, compiled.version)] = compiled
        if compiled.version >= self._latest.get(compiled.name, 0):
            self._latest[compiled.name] = compiled.version

    def add_definition(self, d: Definition) -> Any:
        """Compile and add a deployed definition record (spec kind); returns the compiled form."""
        compiled = compile_spec(d.body)
        self.add(compiled)
        return compiled

    def get(self, name: str, version: int) -> Optional[Any]:
        return self._by_key.get((name, version))

    def latest(self, name: str) -> Optional[int]:
        return self._latest.get(name)

    def __len__(self) -> int:
        return len(self._by_key)
