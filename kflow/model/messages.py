"""Commands, events, tasks and definition records as plain typed data: the engine's vocabulary.

Commands are imperative (``StartWorkflow``); events are past tense (``WorkflowStarted``). Both are
small slotted dataclasses carrying a ``type`` tag and a ``data`` dict of type-specific fields whose
payload values (input, results, signal data) are JSON documents. The field lists per type live in
:data:`COMMAND_FIELDS` and :data:`EVENT_FIELDS`; the Avro schemas in ``kflow/schemas`` mirror them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum, nonmember
from typing import TYPE_CHECKING, Any, Optional, Union

from kflow.model.versions import format_version

if TYPE_CHECKING:
    from kflow.model.commands import AnyCommand
    from kflow.model.events import AnyEvent

JSONValue = Union[None, bool, int, float, str, list["JSONValue"], dict[str, "JSONValue"]]
JSONDict = dict[str, Any]

#: Command type -> required data fields. Payload fields (JSON documents) are marked with ``*``.
COMMAND_FIELDS: dict[str, tuple[str, ...]] = {
    "StartWorkflow": ("workflow", "version", "*input", "parent_id", "parent_ref", "id_reuse", "priority"),
    "SignalWorkflow": ("name", "*data"),
    "CancelWorkflow": ("reason",),
    "CompleteActivity": ("activity_id", "attempt", "*result"),
    "FailActivity": ("activity_id", "attempt", "error_type", "message", "retryable"),
    "HeartbeatActivity": ("activity_id", "attempt", "*details"),
    "FireTimer": ("timer_id",),
    "CompleteChild": ("child_id", "*result"),
    "FailChild": ("child_id", "error_type", "message"),
    "StartActivity": ("activity_id", "attempt"),
    "TerminateWorkflow": ("reason",),
    "QueryWorkflow": ("query_id", "name", "*args"),
    "QueryStatus": ("query_id",),
    "SuspendWorkflow": ("reason",),
    "ResumeWorkflow": ("reason",),
    "RetryWorkflow": ("from_step", "*input_patch", "force", "reason", "by"),
    "ResolveIncident": ("incident_id", "action", "*output", "*input_patch", "by", "reason"),
    "CreateSchedule": ("*spec", "replace"),
    "PauseSchedule": ("note",),
    "UnpauseSchedule": ("note",),
    "TriggerSchedule": ("overlap",),
    "BackfillSchedule": ("start_ms", "end_ms"),
    "DeleteSchedule": ("reason",),
    "UpdateWorkflow": ("update_id", "name", "*data"),
    "AcquirePermit": ("holder", "ref", "priority"),
    "ReleasePermit": ("holder", "ref"),
    "GrantPermit": ("limit", "ref"),
    "RefusePermit": ("limit", "ref", "reason"),
    "SetPriority": ("priority", "reason"),
    "MigrateWorkflow": ("plan_id", "from_range", "to_version", "*step_map", "*vars", "transform", "reason", "by"),
}

#: Event type -> data fields. Payload fields (JSON documents) are marked with ``*``.
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "WorkflowStarted": ("workflow", "version", "*input", "parent_id", "parent_ref"),
    "ActivityScheduled": ("activity_id", "name", "queue", "*input", "attempt"),
    "ActivityCompleted": ("activity_id", "attempt", "*result"),
    "ActivityFailed": ("activity_id", "attempt", "error_type", "message", "retryable"),
    "TimerStarted": ("timer_id", "due_ms", "purpose"),
    "TimerFired": ("timer_id",),
    "SignalReceived": ("name", "*data", "signal_id"),
    "ChildStarted": ("child_id", "workflow", "version", "*input"),
    "ChildCompleted": ("child_id", "*result"),
    "ChildFailed": ("child_id", "error_type", "message"),
    "WorkflowCompleted": ("*result",),
    "WorkflowFailed": ("error_type", "message"),
    "WorkflowCancelled": ("reason",),
    "CommandRejected": ("command_type", "code", "reason"),
    "ActivityStarted": ("activity_id", "attempt"),
    "HeartbeatRecorded": ("activity_id", "attempt"),
    "ActivityTimedOut": ("activity_id", "attempt", "kind"),
    "CancelRequested": ("reason",),
    "WorkflowTerminated": ("reason",),
    "WorkflowContinuedAsNew": ("*input", "run", "version"),
    "WorkflowSuspended": ("reason",),
    "WorkflowResumed": ("reason",),
    "WorkflowRetried": ("from_step", "*input_patch", "reason", "by", "attempt"),
    "StepSkipped": ("step", "activity_id", "error_type", "message", "*output"),
    "IncidentRaised": ("incident_id", "step", "activity_id", "error_type", "message", "role", "instructions"),
    "IncidentResolved": ("incident_id", "action", "*output", "*input_patch", "by", "reason"),
    "ScheduleCreated": ("*spec", "replaced"),
    "SchedulePaused": ("note",),
    "ScheduleUnpaused": ("note",),
    "ScheduleFired": ("trigger", "*outcome"),
    "ScheduleRunClosed": ("run_id", "status"),
    "ScheduleDeleted": ("reason",),
    "UpdateAccepted": ("update_id", "name", "*data"),
    "UpdateCompleted": ("update_id", "*result", "error_type", "message"),
    "WorkflowQueued": ("workflow", "version", "*input", "parent_id", "parent_ref", "*limits", "priority"),
    "PermitGranted": ("limit", "ref"),
    "PermitRefused": ("limit", "ref", "reason"),
    "PriorityChanged": ("priority", "reason"),
    "PermitQueued": ("holder", "ref", "priority"),
    "PermitIssued": ("holder", "ref", "priority"),
    "PermitDenied": ("holder", "ref", "reason"),
    "PermitReleased": ("holder", "ref"),
    "WorkflowMigrated": ("from_version", "to_version", "plan_id", "*step_map", "*vars", "reason", "by"),
    "MigrationDeferred": ("plan_id", "from_range", "to_version", "*step_map", "*vars", "transform", "reason", "by",
                          "waiting_on"),
}

#: How an operator resolves an incident (``ResolveIncident.action``): run the step again, skip it
#: with a given output, or fail the workflow.
INCIDENT_ACTIONS = ("retry", "skip", "fail")

COMMAND_TYPES = frozenset(COMMAND_FIELDS)

#: Priority levels by name; the number is what commands, state and tasks carry (1 is served first).
PRIORITIES: dict[str, int] = {"critical": 1, "high": 2, "normal": 3, "low": 4, "background": 5}
NORMAL_PRIORITY = PRIORITIES["normal"]


def priority_level(value: Union[str, int, None]) -> Optional[int]:
    """The level number of a priority given by name or number; None stays None (inherit).

    Raises:
        ValueError: not one of the five levels; the message lists them.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in PRIORITIES:
        return PRIORITIES[value.strip().lower()]
    if type(value) is int and value in PRIORITIES.values():
        return value
    raise ValueError(f"unknown priority {value!r}: expected one of {', '.join(PRIORITIES)} (or 1-5)")

#: Header on StartWorkflow: the definitions-topic offset of the starting client's last deploy.
DEFS_OFFSET_HEADER = "kflow.definitions.offset"
EVENT_TYPES = frozenset(EVENT_FIELDS)


def field_names(spec: tuple[str, ...]) -> tuple[str, ...]:
    """Strip the payload marker from a field list."""
    return tuple(f.lstrip("*") for f in spec)


@dataclass(slots=True)
class Command:
    """An imperative request addressed to one workflow instance (the Kafka key)."""

    type: str
    instance_id: str
    data: JSONDict = field(default_factory=dict)
    command_id: str = ""
    ts: int = 0  # producer wall time in ms; informational only, the engine uses its own clock

    def typed(self) -> AnyCommand:
        """This command as its typed model (:mod:`kflow.model.commands`); ValueError if ``data`` does not fit."""
        from kflow.model.commands import typed

        return typed(self)


@dataclass(slots=True)
class Event:
    """A fact the engine recorded for one instance; ``seq`` is gap-free per instance from 1."""

    type: str
    instance_id: str
    seq: int
    ts: int
    data: JSONDict = field(default_factory=dict)

    def typed(self) -> AnyEvent:
        """This event as its typed model (:mod:`kflow.model.events`); ValueError if ``data`` does not fit."""
        from kflow.model.events import typed_event

        return typed_event(self)


@dataclass(slots=True)
class Task:
    """One attempt of one activity, sent to the workers of ``queue``."""

    instance_id: str
    activity_id: str
    attempt: int
    name: str
    queue: str
    input: JSONValue
    workflow: str
    scheduled_ms: int
    kind: str = "run"  # "run": execute this attempt; "cancel": stop it if it is running
    report_start: bool = False  # the worker reports StartActivity (the attempt has start-to-close/heartbeat timeouts)
    #: A local activity: the engine runs it itself, inside the transaction that scheduled it. Local
    #: tasks never reach a task topic, so these two fields are not part of the wire format.
    local: bool = False
    start_to_close_ms: Optional[int] = None  # a local attempt's in-process time bound (None: the engine's default)
    #: With auth on: the attempt's capability token, which the worker returns with every report
    #: of the attempt (header ``kflow.attempt``); None otherwise.
    attempt_token: Optional[str] = None
    #: The attempt's priority level (1 critical .. 5 background); None is ``normal`` (3).
    priority: Optional[int] = None
    #: The key workers share the queue and level across fairly (the step's ``fairness_key``, else the
    #: instance's tenant); None is the empty key.
    fairness_key: Optional[str] = None


@dataclass(slots=True)
class Definition:
    """A deployed workflow definition, keyed ``name@version`` on the definitions topic."""

    name: str
    version: int
    kind: str  # "spec" or "code"
    body: JSONDict
    deployed_ms: int = 0

    @property
    def key(self) -> str:
        return f"{self.name}@{format_version(self.version)}"


class RejectCode(StrEnum):
    """Codes carried by ``CommandRejected``; persisted strings, never reused.

    A ``StrEnum``: every member is the ``str`` it names, so records, JSON and comparisons with
    decoded strings see exactly the persisted text.
    """

    NOT_FOUND = "NOT_FOUND"
    INVALID_STATE = "INVALID_STATE"
    DUPLICATE = "DUPLICATE"
    UNKNOWN_WORKFLOW = "UNKNOWN_WORKFLOW"
    INVALID_INPUT = "INVALID_INPUT"
    STALE = "STALE"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    #: No valid proof of who sent the command (token missing, expired, tampered, replayed, wrong
    #: key), or an activity result without its attempt's token.
    UNAUTHENTICATED = "UNAUTHENTICATED"
    #: The sender is known but the policy does not allow it the command.
    FORBIDDEN = "FORBIDDEN"


class Status(StrEnum):
    """Instance statuses as they appear in the state record.

    A ``StrEnum``, so a decoded state's plain ``"RUNNING"`` and ``Status.RUNNING`` compare (and
    hash) equal. ``TERMINAL`` and ``ACTIVE`` are frozensets of status strings, not members.
    """

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TERMINATED = "TERMINATED"
    BLOCKED = "BLOCKED"
    #: Failing, but running its saga compensations before ``WorkflowFailed``.
    COMPENSATING = "COMPENSATING"
    #: Cancel requested; running its saga compensations before ``WorkflowCancelled``.
    CANCELLING = "CANCELLING"
    #: Paused by an operator: open, but dispatches no tasks and fires no timers; the activity
    #: results, timers and signals that arrive are recorded and applied on resume.
    SUSPENDED = "SUSPENDED"
    #: Open, with at least one step whose retries are exhausted waiting for an operator to resolve
    #: its incident (``on_failure: {incident: ...}``); the rest of the workflow goes on.
    INCIDENT = "INCIDENT"
    #: Started, but waiting for a quota (max running instances, starts per second) to admit it.
    QUEUED = "QUEUED"

    #: Statuses an instance never leaves.
    TERMINAL = nonmember(frozenset({"COMPLETED", "FAILED", "CANCELLED", "TERMINATED"}))
    #: Statuses in which activity results and timers are still accepted (a suspended instance
    #: accepts them too: it records them and applies them on resume).
    ACTIVE = nonmember(frozenset({"RUNNING", "BLOCKED", "COMPENSATING", "CANCELLING", "SUSPENDED", "INCIDENT",
                                  "QUEUED"}))
