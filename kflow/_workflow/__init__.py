"""The former home of the code-workflow authoring API, kept so that older imports keep working.

Everything here is :mod:`kflow.authoring`'s; import from there.
"""

from kflow.authoring import (
    CodeDefinition,
    NondeterminismError,
    Saga,
    Sandbox,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowSandboxError,
    code_definitions,
    default_registry,
    definition_of,
    query_state,
    sandbox_enabled,
    workflow,
)

__all__ = ["CodeDefinition", "NondeterminismError", "Saga", "Sandbox", "WorkflowContext", "WorkflowRegistry",
           "WorkflowSandboxError", "code_definitions", "default_registry", "definition_of", "query_state",
           "sandbox_enabled", "workflow"]
