"""kflow: a Kafka-native durable workflow engine.

The public surface for applications: :class:`Client` (and :class:`AsyncClient` for asyncio) and :class:`WorkflowHandle` to deploy, start,
signal and await workflows; :func:`workflow` to write code workflows; :func:`activity` and
:func:`heartbeat` to write activities and :class:`Worker` to run them; and the errors they raise (every one a :class:`KflowError`:
:class:`ActivityError` and :class:`WorkflowCancelledError` (also named :class:`CancelledError`) inside
code workflows, :class:`WorkflowFailedError` from a handle's result (its ``cause`` the activity failure
that ended the workflow, if one did), :class:`QueryFailedError` from a query, :class:`NonRetryableError`
from activities, :class:`DeterminismError` (and its :class:`NondeterminismError`) from replay ...). Names are imported on first use,
so ``import kflow.model`` stays free of Kafka.

Example:
    >>> import kflow
    >>> with kflow.Client("localhost:9092") as client:  # doctest: +SKIP
    ...     print(client.start("order", {"sku": "A1"}).result(timeout=60))
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kflow._migration import migration
    from kflow.aio import AsyncClient
    from kflow.authoring import WorkflowContext, WorkflowSandboxError, query_state, workflow
    from kflow.client import Client, WorkflowHandle
    from kflow.engine.code_machine import NondeterminismError
    from kflow.model.errors import (
        ActivityError,
        BrokerUnavailable,
        CancelledError,
        DefinitionConflict,
        DefinitionError,
        DeterminismError,
        KflowError,
        NonRetryableError,
        ProblemsError,
        QueryFailedError,
        StartRejectedError,
        TopicConfigMismatch,
        UpdateFailedError,
        UpdateRejectedError,
        WorkflowCancelledError,
        WorkflowError,
        WorkflowFailedError,
        WorkflowNotDeployed,
    )
    from kflow.worker import ActivityCancelledError, Worker, activity, heartbeat

__all__ = [
    "ActivityCancelledError",
    "ActivityError",
    "AsyncClient",
    "BrokerUnavailable",
    "CancelledError",
    "Client",
    "DefinitionConflict",
    "DefinitionError",
    "DeterminismError",
    "KflowError",
    "NonRetryableError",
    "NondeterminismError",
    "ProblemsError",
    "QueryFailedError",
    "StartRejectedError",
    "TopicConfigMismatch",
    "UpdateFailedError",
    "UpdateRejectedError",
    "Worker",
    "WorkflowCancelledError",
    "WorkflowContext",
    "WorkflowError",
    "WorkflowFailedError",
    "WorkflowHandle",
    "WorkflowNotDeployed",
    "WorkflowSandboxError",
    "activity",
    "heartbeat",
    "migration",
    "query_state",
    "workflow",
]

__version__ = "0.1.0"

_HOME = {
    "migration": "kflow._migration",
    "AsyncClient": "kflow.aio",
    "Client": "kflow.client",
    "WorkflowHandle": "kflow.client",
    "activity": "kflow.worker",
    "ActivityCancelledError": "kflow.worker",
    "heartbeat": "kflow.worker",
    "Worker": "kflow.worker",
    "WorkflowCancelledError": "kflow.model.errors",
    "ActivityError": "kflow.model.errors",
    "BrokerUnavailable": "kflow.model.errors",
    "CancelledError": "kflow.model.errors",
    "DefinitionConflict": "kflow.model.errors",
    "DefinitionError": "kflow.model.errors",
    "DeterminismError": "kflow.model.errors",
    "KflowError": "kflow.model.errors",
    "NonRetryableError": "kflow.model.errors",
    "ProblemsError": "kflow.model.errors",
    "QueryFailedError": "kflow.model.errors",
    "StartRejectedError": "kflow.model.errors",
    "TopicConfigMismatch": "kflow.model.errors",
    "UpdateFailedError": "kflow.model.errors",
    "UpdateRejectedError": "kflow.model.errors",
    "WorkflowError": "kflow.model.errors",
    "WorkflowFailedError": "kflow.model.errors",
    "WorkflowNotDeployed": "kflow.model.errors",
    "workflow": "kflow.authoring",
    "query_state": "kflow.authoring",
    "WorkflowContext": "kflow.authoring",
    "WorkflowSandboxError": "kflow.authoring",
    "NondeterminismError": "kflow.engine.code_machine",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'kflow' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
