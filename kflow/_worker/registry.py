"""The activity registry, as the worker imports it; defined in :mod:`kflow.streams.activities`.

The worker and the engine's local activities share one registry, so it lives in the lower
``streams`` layer; this module keeps the names importable from ``kflow._worker.registry``.
"""

from __future__ import annotations

from kflow.streams.activities import (
    DEFAULT_QUEUE,
    ActivityDefinition,
    ActivityDefinitionError,
    DuplicateActivityError,
    Registry,
    activity,
    build_registry,
    collect_activities,
    definition_of,
)

__all__ = [
    "ActivityDefinition",
    "ActivityDefinitionError",
    "DEFAULT_QUEUE",
    "DuplicateActivityError",
    "Registry",
    "activity",
    "build_registry",
    "collect_activities",
    "definition_of",
]
