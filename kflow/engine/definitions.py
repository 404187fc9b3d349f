"""Compiled definitions and the read-only view of deployed ones the engine decides against.

``compile_spec`` validates a spec document (structure via :mod:`kflow.model.spec`, then every CEL
expression) and flattens its nested step lists into a lookup table so the interpreter can address
any step by ``(list key, index)``. List keys: ``""`` for the top level, ``"<step>.<i>"`` for branch
``i`` of a parallel step, ``"<step>"`` for a foreach body.

A deployed ``name@version`` is immutable: :class:`InMemoryDefinitions` keeps the first content it
sees per key (compared by :func:`definition_fingerprint`), so a later record with other content
under the same key, however it reached the table, cannot change what running instances execute.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from kflow.engine.code_cache import ReplayCache
from kflow.engine.expr import ExpressionError, compile_expr
from kflow.engine.registry import WorkflowRegistry, default_registry
from kflow.model.errors import DefinitionConflict, DefinitionError
from kflow.model.messages import Definition
from kflow.model.spec import Step, WorkflowSpec, parse_duration_ms, parse_spec
from kflow.model.versions import version_tuple


@dataclass
class CompiledSpec:
    """A validated spec workflow, flattened for the interpreter."""

    name: str
    version: int
    spec: WorkflowSpec
    lists: dict[str, list[Step]] = field(default_factory=dict)
    where: dict[str, tuple[str, int]] = field(default_factory=dict)
    kind: str = "spec"
    fingerprint: str = ""  # definition_fingerprint("spec", document); "" when compiled from no document

    def index_of(self, list_key: str, step_id: str) -> int:
        return self.where[step_id][1]


def definition_fingerprint(kind: str, body: Any) -> str:
    """SHA-256 (hex) of a definition's content: its kind and body as canonical JSON.

    Key order and YAML formatting do not matter; any change of a value, step or expression does.
    """
    canonical = json.dumps({"kind": kind, "body": body}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _expressions(step: Step) -> list[str]:
    exprs = [e for e in (step.input, step.foreach, step.succeed, step.fairness_key) if e]
    exprs += [r.when for r in step.choice or []]
    exprs += list((step.set or {}).values())
    exprs += list((step.search or {}).values())
    if step.child:
        exprs += [e for e in (step.child.input, step.child.id) if e]
    if step.wait:
        exprs += [e for e in (step.wait.reply, step.wait.validate_) if e]
    if step.fail and step.fail.message:
        exprs.append(step.fail.message)
    if step.compensate and step.compensate.input:
        exprs.append(step.compensate.input)
    if step.on_failure and step.on_failure.skip and step.on_failure.skip.output:
        exprs.append(step.on_failure.skip.output)
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
    c = CompiledSpec(name=spec.name, version=spec.version, spec=spec, fingerprint=definition_fingerprint("spec", doc))
    problems: list[tuple[str, str]] = []
    _flatten(c, "", spec.steps, problems)
    if problems:
        raise DefinitionError(spec.name, problems)
    return c


class DefinitionsView(Protocol):
    """Read-only access to deployed definitions (a global table on every engine)."""

    def get(self, name: str, version: int) -> Optional[Any]: ...

    def latest(self, name: str) -> Optional[int]: ...


def fingerprint_of(compiled: Any) -> str:
    """The content fingerprint a compiled definition carries; "" when it has none (code workflows)."""
    return str(getattr(compiled, "fingerprint", "") or "")


class InMemoryDefinitions:
    """A dict-backed :class:`DefinitionsView`; the engine's global table feeds one of these.

    Invariant: once ``name@version`` is in the table, its content never changes. Adding the same
    content again is a no-op; adding other content under that key raises
    :class:`~kflow.model.errors.DefinitionConflict` and leaves the table as it was. Definitions
    without a fingerprint (code workflows, which the hosting process supplies) replace their entry.

    Args:
        registry: The code workflows and migration transforms of whoever decides against this
            table (default: :data:`~kflow.engine.registry.default_registry`, which the decorators fill).
        replay_cache: The live code-workflow machines of whoever decides against this table; a
            fresh cache of its own by default (an engine processor passes the one it owns).
    """

    def __init__(self, registry: Optional[WorkflowRegistry] = None, replay_cache: Optional[ReplayCache] = None) -> None:
        self._by_key: dict[tuple[str, int], Any] = {}
        self._latest: dict[str, int] = {}
        self.registry = registry if registry is not None else default_registry
        self.replay_cache = replay_cache if replay_cache is not None else ReplayCache()

    def add(self, compiled: Any) -> bool:
        """Add a compiled definition; True if the table changed, False if it already held this content.

        Raises:
            DefinitionConflict: ``name@version`` holds other content; the table keeps it.
        """
        key = (compiled.name, compiled.version)
        existing = self._by_key.get(key)
        if existing is compiled:
            return False
        if existing is not None:
            old, new = fingerprint_of(existing), fingerprint_of(compiled)
            if old and old == new:
                return False
            if old or new:
                raise DefinitionConflict(compiled.name, compiled.version, old or "(no fingerprint)",
                                         new or "(no fingerprint)")
        self._by_key[key] = compiled
        if version_tuple(compiled.version) >= version_tuple(self._latest.get(compiled.name, 0)):
            self._latest[compiled.name] = compiled.version
        return True

    def add_definition(self, d: Definition) -> Any:
        """Compile and add a deployed definition record (spec kind); returns the compiled form.

        Raises:
            DefinitionError: the record's body does not compile.
            DefinitionConflict: the record's key is taken by other content (the table keeps that).
        """
        compiled = compile_spec(d.body)
        if (compiled.name, compiled.version) != (d.name, d.version):
            raise DefinitionError(d.key, [("", f"expected a body named {d.key}, but the body says "
                                               f"{compiled.name}@{compiled.version}")])
        self.add(compiled)
        return compiled

    def get(self, name: str, version: int) -> Optional[Any]:
        return self._by_key.get((name, version))

    def latest(self, name: str) -> Optional[int]:
        return self._latest.get(name)

    def versions(self, name: str) -> list[int]:
        """Every version of ``name`` in the table, in semantic order (oldest first)."""
        return sorted((v for (n, v) in self._by_key if n == name), key=version_tuple)

    def __len__(self) -> int:
        return len(self._by_key)
