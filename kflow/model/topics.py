"""The names of kflow's Kafka topics under one prefix, and the settings they are created with.

:class:`TopicNames` derives every topic name from one prefix (``kflow.`` by default) so several
environments can share a cluster, and checks that the prefix and queue names make legal Kafka topic
names. A queue has one task topic per priority level: ``tasks.<queue>`` (normal) and
``tasks.<queue>.p<level>`` (1, 2, 4, 5). :class:`TopicSettings` holds the partition count,
replication, retention and size limits, and the Schema Registry URL that :mod:`kflow.streams.topics`
creates and checks the topics with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kflow.model.messages import NORMAL_PRIORITY, PRIORITIES

__all__ = ["TopicNames", "TopicSettings"]

_DAY_MS = 24 * 60 * 60 * 1000
_LEGAL_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_NAME = 249


@dataclass(frozen=True, slots=True)
class TopicNames:
    """The names of kflow's topics under one prefix."""

    prefix: str = "kflow."

    def __post_init__(self) -> None:
        if self.prefix and not _LEGAL_NAME.match(self.prefix):
            raise ValueError(f"topic prefix {self.prefix!r} may only use letters, digits, '.', '_' and '-'")

    @property
    def commands(self) -> str:
        return f"{self.prefix}commands"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def state(self) -> str:
        return f"{self.prefix}state"

    @property
    def engine_state(self) -> str:
        """Changelog of the engine's state store: the engine's whole state of each instance (key =
        instance id), written in the same transaction as the public ``state`` record; what restore
        and standby replicas read. kflow's own format, not a contract for downstream consumers."""
        return f"{self.prefix}engine-state"

    @property
    def journal(self) -> str:
        """Changelog of the engine's journal store: the history of each run of a code workflow,
        one record per entry (key = instance, run, kind and index; see :mod:`kflow.streams.store`)."""
        return f"{self.prefix}journal"

    @property
    def definitions(self) -> str:
        return f"{self.prefix}definitions"

    @property
    def policies(self) -> str:
        """The policy in force (key ``policy``), read by every engine as a global table."""
        return f"{self.prefix}policies"

    @property
    def limits(self) -> str:
        """The declared quotas and activity limits (key ``limits``), read by every engine as a global table."""
        return f"{self.prefix}limits"

    @property
    def schedules(self) -> str:
        """The schedules table (key = schedule id, value = JSON, a tombstone deletes), written by the
        engine that owns each schedule's key in the transaction that changed it; read as a table."""
        return f"{self.prefix}schedules"

    @property
    def batches(self) -> str:
        """Batch operations (key = batch id, or ``<batch id>/<part>``, value = JSON; see :mod:`kflow.batch.log`),
        written by the process running each batch; read as a table."""
        return f"{self.prefix}batches"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}dlq"

    @property
    def audit(self) -> str:
        """The audit trail: who did what, granted or denied (key = the instance id the command addressed)."""
        return f"{self.prefix}audit"

    @property
    def replies(self) -> str:
        """Answers to queries (key = query id), written by the engine that owns the instance."""
        return f"{self.prefix}replies"

    def tasks(self, queue: str, priority: int | None = None) -> str:
        """The task topic of ``queue`` at a priority level: ``tasks.<queue>`` for normal (3, or None),
        ``tasks.<queue>.p<level>`` for the others, so normal work stays where it always was."""
        name = f"{self.prefix}tasks.{queue}"
        if not queue or not _LEGAL_NAME.match(queue) or len(name) + 3 > _MAX_NAME:
            raise ValueError(f"queue {queue!r} does not make a legal topic name ({name!r})")
        if priority is None or priority == NORMAL_PRIORITY:
            return name
        if priority not in PRIORITIES.values():
            raise ValueError(f"unknown priority {priority!r}: expected a level from 1 to 5")
        return f"{name}.p{priority}"


@dataclass(frozen=True, slots=True)
class TopicSettings:
    """How kflow's topics are created."""

    partitions: int = 8
    replication: int = 1
    events_retention_ms: int = 7 * _DAY_MS
    commands_retention_ms: int = 7 * _DAY_MS
    max_message_bytes: int = 1_048_576
    audit_retention_ms: int = 365 * _DAY_MS
    schema_registry_url: str = ""  # Confluent Schema Registry of the value schemas; "" = none

