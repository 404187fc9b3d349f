"""What a process hosts besides deployed definitions: its code workflows and Python migrations.

A :class:`WorkflowRegistry` is an explicit object: an engine processor, an
:class:`~kflow.engine.InMemoryDefinitions` (the test harness, the CLI's what-ifs) and the CLI's
replays are each handed one. ``@kflow.workflow`` and ``@kflow.migration`` fill
:data:`default_registry`, which is what they are handed unless told otherwise. The engine reads
the registry of the definitions view it decides against (:func:`registry_of`), like the limits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

from kflow.engine.code_machine import CodeDefinition
from kflow.model.errors import DefinitionError
from kflow.model.messages import Definition

__all__ = ["Transform", "WorkflowRegistry", "default_registry", "registry_of"]

#: A Python variable transform of a migration: ``fn(vars) -> vars`` (a dict of JSON values).
Transform = Callable[[dict[str, Any]], dict[str, Any]]


class WorkflowRegistry:
    """Code workflows by ``(name, version)`` and migration transforms by their key."""

    def __init__(self) -> None:
        self._code: dict[tuple[str, int], CodeDefinition] = {}
        #: Python variable transforms by :func:`kflow.engine.migration.transform_key`.
        self.transforms: dict[str, Transform] = {}

    # -- code workflows -------------------------------------------------------------------------
    def add(self, d: CodeDefinition) -> CodeDefinition:
        """Register code workflow ``d`` (replacing an earlier registration of its name and version)."""
        self._code[(d.name, d.version)] = d
        return d

    def get(self, name: str, version: int) -> Optional[CodeDefinition]:
        return self._code.get((name, version))

    def versions(self, name: str) -> list[int]:
        """The registered versions of code workflow ``name``, ascending."""
        return sorted(v for (n, v) in self._code if n == name)

    def definitions(self) -> list[CodeDefinition]:
        """Every registered code workflow, in registration order."""
        return list(self._code.values())

    def compile_code(self, d: Definition) -> CodeDefinition:
        """The definitions-table hook: a ``kind="code"`` record resolves to a workflow registered here.

        Raises:
            DefinitionError: no code workflow of that name and version is registered.
        """
        found = self._code.get((d.name, d.version))
        if found is None:
            raise DefinitionError(d.key, [("", "code workflow not registered in this engine (start it with "
                                               "--workflows MODULE)")])
        return found

    def __contains__(self, key: object) -> bool:
        return key in self._code

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(list(self._code))

    def __len__(self) -> int:
        return len(self._code)

    # -- migrations -----------------------------------------------------------------------------
    def add_transform(self, key: str, fn: Transform) -> None:
        """Register the Python variable transform of a migration under ``key``."""
        self.transforms[key] = fn


#: The registry ``@kflow.workflow`` and ``@kflow.migration`` fill, and every engine uses by default.
default_registry = WorkflowRegistry()


def registry_of(defs: Any) -> WorkflowRegistry:
    """The registry the definitions view ``defs`` carries (``defs.registry``), else the default one."""
    found = getattr(defs, "registry", None)
    return found if isinstance(found, WorkflowRegistry) else default_registry
