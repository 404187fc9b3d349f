"""The pure engine: decide and evolve workflow instances. No Kafka, no RocksDB, no clock."""

from kflow.engine.code_replayer import CodeDefinition, NondeterminismError
from kflow.engine.core import INPUT_EVENTS, Decision, DeterminismError, decide, evolve, fold
from kflow.engine.definitions import CompiledSpec, DefinitionsView, InMemoryDefinitions, compile_spec
from kflow.engine.expr import ExpressionError

__all__ = ["INPUT_EVENTS", "CodeDefinition", "CompiledSpec", "Decision", "DefinitionsView", "DeterminismError", "ExpressionError",
           "InMemoryDefinitions", "NondeterminismError", "compile_spec", "decide", "evolve", "fold"]
