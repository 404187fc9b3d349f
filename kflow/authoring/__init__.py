"""The authoring API of code workflows: what workflow code and its tests import.

``@kflow.workflow`` (with ``.signal``, ``.query`` and ``.update`` for class-style workflows), the
context handed to workflow code (:class:`WorkflowContext`, :class:`Saga`), :func:`query_state`,
the sandbox, and the registry the decorator fills (:class:`WorkflowRegistry`,
:data:`default_registry`). ``import kflow`` offers the everyday names; this package is their home.

It is named ``kflow.authoring``, not ``kflow.workflow``: the attribute ``kflow.workflow`` is the
decorator itself (``@kflow.workflow``, ``@kflow.workflow.update``), and importing a submodule of
that name would replace the attribute with the module. The context classes live in the engine
(:mod:`kflow.engine.code_context`), which creates them for the workflows it steps, and are
re-exported here, so the engine never imports this package.
"""

from kflow.authoring.api import code_definitions, definition_of, query_state, workflow
from kflow.authoring.sandbox import Sandbox, WorkflowSandboxError, sandbox_enabled
from kflow.engine.code_context import Saga, WorkflowContext
from kflow.engine.code_machine import CodeDefinition, NondeterminismError
from kflow.engine.registry import WorkflowRegistry, default_registry

__all__ = ["CodeDefinition", "NondeterminismError", "Saga", "Sandbox", "WorkflowContext", "WorkflowRegistry",
           "WorkflowSandboxError", "code_definitions", "default_registry", "definition_of", "query_state",
           "sandbox_enabled", "workflow"]
