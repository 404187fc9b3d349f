"""The pure engine: decide and evolve workflow instances. No Kafka, no RocksDB, no clock."""

from kflow.engine import limits as _limits  # noqa: F401  (registers the limit deciders and gates)
from kflow.engine import migration as _migration  # noqa: F401  (registers MigrateWorkflow and WorkflowMigrated)
from kflow.engine import schedules as _schedules  # noqa: F401  (registers the schedule deciders)
from kflow.engine.code_machine import CodeDefinition, NondeterminismError
from kflow.engine.core import INPUT_EVENTS, Decision, decide, evolve, fold
from kflow.engine.definitions import CompiledSpec, DefinitionsView, InMemoryDefinitions, compile_spec
from kflow.engine.expr import ExpressionError
from kflow.model.errors import DeterminismError

__all__ = ["INPUT_EVENTS", "CodeDefinition", "CompiledSpec", "Decision", "DefinitionsView", "DeterminismError", "ExpressionError",
           "InMemoryDefinitions", "NondeterminismError", "compile_spec", "decide", "evolve", "fold"]
