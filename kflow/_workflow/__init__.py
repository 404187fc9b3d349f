"""Code workflows: the authoring API (``@kflow.workflow``, the context) and the workflow sandbox."""

from kflow._workflow.api import code_definitions, compile_code, definition_of, query_state, workflow
from kflow._workflow.sandbox import Sandbox, WorkflowSandboxError, sandbox_enabled
from kflow.engine.code_replayer import CACHE, CodeDefinition, NondeterminismError, WorkflowContext

__all__ = ["CACHE", "CodeDefinition", "NondeterminismError", "Sandbox", "WorkflowContext", "WorkflowSandboxError",
           "code_definitions", "compile_code", "definition_of", "query_state", "sandbox_enabled", "workflow"]
