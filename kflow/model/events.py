"""Typed events: one frozen dataclass per event type, mirroring the ``body`` union of ``event.avsc``.

:class:`~kflow.model.messages.Event` carries an event as a ``type`` tag and a ``data`` dict; the
classes here give each type its own fields. A downstream consumer of the ``events`` topic gets them
with ``decode_event(value).typed()`` and matches on the class:

    >>> ev = event(ActivityCompleted(activity_id="charge", attempt=1, result={"ok": True}), "order-1", seq=4, ts=0)
    >>> match ev.typed():
    ...     case ActivityCompleted(activity_id=aid, result=result):
    ...         print(aid, result)
    charge {'ok': True}

Payload fields hold JSON values; a field that is nullable in the schema is ``Optional`` here, with
the schema's default. ``CommandRejected.code`` is a :class:`~kflow.model.messages.RejectCode`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from kflow.model.messages import Event, JSONValue, RejectCode
from kflow.model.unions import ModelUnion

__all__ = [
    "AnyEvent",
    "EVENT_TYPES",
    "event",
    "from_data",
    "to_data",
    "typed_event",
    "ActivityCompleted",
    "ActivityFailed",
    "ActivityScheduled",
    "ActivityStarted",
    "ActivityTimedOut",
    "CancelRequested",
    "ChildCompleted",
    "ChildFailed",
    "ChildStarted",
    "CommandRejected",
    "HeartbeatRecorded",
    "IncidentRaised",
    "IncidentResolved",
    "MigrationDeferred",
    "PermitDenied",
    "PermitGranted",
    "PermitIssued",
    "PermitQueued",
    "PermitRefused",
    "PermitReleased",
    "PriorityChanged",
    "ScheduleCreated",
    "ScheduleDeleted",
    "ScheduleFired",
    "SchedulePaused",
    "ScheduleRunClosed",
    "ScheduleUnpaused",
    "SignalReceived",
    "StepSkipped",
    "TimerFired",
    "TimerStarted",
    "UpdateAccepted",
    "UpdateCompleted",
    "WorkflowCancelled",
    "WorkflowCompleted",
    "WorkflowContinuedAsNew",
    "WorkflowFailed",
    "WorkflowMigrated",
    "WorkflowQueued",
    "WorkflowResumed",
    "WorkflowRetried",
    "WorkflowStarted",
    "WorkflowSuspended",
    "WorkflowTerminated",
]

_REJECT_CODES = frozenset(RejectCode)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowStarted:
    TYPE: ClassVar[str] = "WorkflowStarted"

    workflow: str
    version: int
    input: JSONValue
    parent_id: Optional[str] = None
    parent_ref: Optional[str] = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityScheduled:
    TYPE: ClassVar[str] = "ActivityScheduled"

    activity_id: str
    name: str
    queue: str
    input: JSONValue
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityCompleted:
    TYPE: ClassVar[str] = "ActivityCompleted"

    activity_id: str
    attempt: int
    result: JSONValue


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityFailed:
    TYPE: ClassVar[str] = "ActivityFailed"

    activity_id: str
    attempt: int
    error_type: str
    message: str
    retryable: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerStarted:
    TYPE: ClassVar[str] = "TimerStarted"

    timer_id: str
    due_ms: int
    purpose: str = ''


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerFired:
    TYPE: ClassVar[str] = "TimerFired"

    timer_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalReceived:
    TYPE: ClassVar[str] = "SignalReceived"

    name: str
    data: JSONValue
    signal_id: str = ''


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildStarted:
    TYPE: ClassVar[str] = "ChildStarted"

    child_id: str
    workflow: str
    version: int
    input: JSONValue


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildCompleted:
    TYPE: ClassVar[str] = "ChildCompleted"

    child_id: str
    result: JSONValue


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildFailed:
    TYPE: ClassVar[str] = "ChildFailed"

    child_id: str
    error_type: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowCompleted:
    TYPE: ClassVar[str] = "WorkflowCompleted"

    result: JSONValue


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowFailed:
    TYPE: ClassVar[str] = "WorkflowFailed"

    error_type: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowCancelled:
    TYPE: ClassVar[str] = "WorkflowCancelled"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRejected:
    TYPE: ClassVar[str] = "CommandRejected"

    command_type: str
    #: A :class:`~kflow.model.messages.RejectCode`; a code this version does not know stays a plain ``str``.
    code: RejectCode | str
    reason: str

    def __post_init__(self) -> None:
        if type(self.code) is str and self.code in _REJECT_CODES:
            object.__setattr__(self, "code", RejectCode(self.code))


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityStarted:
    TYPE: ClassVar[str] = "ActivityStarted"

    activity_id: str
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatRecorded:
    TYPE: ClassVar[str] = "HeartbeatRecorded"

    activity_id: str
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityTimedOut:
    TYPE: ClassVar[str] = "ActivityTimedOut"

    activity_id: str
    attempt: int
    kind: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequested:
    TYPE: ClassVar[str] = "CancelRequested"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowTerminated:
    TYPE: ClassVar[str] = "WorkflowTerminated"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowContinuedAsNew:
    TYPE: ClassVar[str] = "WorkflowContinuedAsNew"

    input: JSONValue
    run: int
    version: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowSuspended:
    TYPE: ClassVar[str] = "WorkflowSuspended"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowResumed:
    TYPE: ClassVar[str] = "WorkflowResumed"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowRetried:
    TYPE: ClassVar[str] = "WorkflowRetried"

    from_step: str
    input_patch: JSONValue
    reason: str
    by: str
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StepSkipped:
    """A task step whose retries were exhausted was skipped (on_failure: skip); output is its output
    (JSON).
    """

    TYPE: ClassVar[str] = "StepSkipped"

    step: str
    activity_id: str
    error_type: str
    message: str
    output: JSONValue


@dataclass(frozen=True, slots=True, kw_only=True)
class IncidentRaised:
    """A task step whose retries were exhausted waits for an operator (on_failure: incident)."""

    TYPE: ClassVar[str] = "IncidentRaised"

    incident_id: str
    step: str
    activity_id: str
    error_type: str
    message: str
    role: str
    instructions: str


@dataclass(frozen=True, slots=True, kw_only=True)
class IncidentResolved:
    TYPE: ClassVar[str] = "IncidentResolved"

    incident_id: str
    action: str
    output: JSONValue
    input_patch: JSONValue
    by: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleCreated:
    TYPE: ClassVar[str] = "ScheduleCreated"

    spec: JSONValue
    replaced: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulePaused:
    TYPE: ClassVar[str] = "SchedulePaused"

    note: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleUnpaused:
    TYPE: ClassVar[str] = "ScheduleUnpaused"

    note: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleFired:
    """What one firing did: outcome is JSON text (started, skipped, buffered, cancelled, terminated run
    ids; missed runs).
    """

    TYPE: ClassVar[str] = "ScheduleFired"

    trigger: str
    outcome: JSONValue


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleRunClosed:
    TYPE: ClassVar[str] = "ScheduleRunClosed"

    run_id: str
    status: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleDeleted:
    TYPE: ClassVar[str] = "ScheduleDeleted"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateAccepted:
    """An update passed validation; its handler (or the step waiting on it) runs. data is JSON text."""

    TYPE: ClassVar[str] = "UpdateAccepted"

    update_id: str
    name: str
    data: JSONValue


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateCompleted:
    """An accepted update's handler finished: result is JSON text; error_type and message are set (and
    result null) when it raised.
    """

    TYPE: ClassVar[str] = "UpdateCompleted"

    update_id: str
    result: JSONValue
    error_type: Optional[str] = None
    message: Optional[str] = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowQueued:
    """A start subject to quotas waits for permits (status QUEUED); limits is a JSON array of the limit
    keys it needs, asked in order.
    """

    TYPE: ClassVar[str] = "WorkflowQueued"

    workflow: str
    version: int
    input: JSONValue
    parent_id: Optional[str] = None
    parent_ref: Optional[str] = None
    limits: JSONValue
    priority: Optional[int] = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PermitGranted:
    """The holder received the permit of limit for ref (start, or <activity id>#<attempt>)."""

    TYPE: ClassVar[str] = "PermitGranted"

    limit: str
    ref: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PermitRefused:
    TYPE: ClassVar[str] = "PermitRefused"

    limit: str
    ref: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PriorityChanged:
    TYPE: ClassVar[str] = "PriorityChanged"

    priority: Optional[int] = None
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PermitQueued:
    """A limit counter queued a request (or moved it to another level)."""

    TYPE: ClassVar[str] = "PermitQueued"

    holder: str
    ref: str
    priority: Optional[int] = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PermitIssued:
    """A limit counter granted a permit."""

    TYPE: ClassVar[str] = "PermitIssued"

    holder: str
    ref: str
    priority: Optional[int] = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PermitDenied:
    """A limit counter refused a request (policy reject)."""

    TYPE: ClassVar[str] = "PermitDenied"

    holder: str
    ref: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PermitReleased:
    """A limit counter freed a permit or dropped a queued request."""

    TYPE: ClassVar[str] = "PermitReleased"

    holder: str
    ref: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowMigrated:
    """The instance moved from from_version to to_version under migration plan plan_id; step_map (JSON) is
    the position mapping applied and vars (JSON) the instance's variables after the transform.
    """

    TYPE: ClassVar[str] = "WorkflowMigrated"

    from_version: int
    to_version: int
    plan_id: str
    step_map: JSONValue
    vars: JSONValue
    reason: str
    by: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationDeferred:
    """A MigrateWorkflow (plan plan_id, to to_version) met the instance with work in flight (waiting_on
    says which): it is kept pending and applied as WorkflowMigrated, or rejected, at the next safe
    point; a later MigrateWorkflow replaces it, and closing or cancelling the instance drops it.
    step_map and vars are the plan's (JSON); transform names a registered Python migration, or is null.
    """

    TYPE: ClassVar[str] = "MigrationDeferred"

    plan_id: str
    from_range: str
    to_version: int
    step_map: JSONValue
    vars: JSONValue
    transform: Optional[str] = None
    reason: str
    by: str
    waiting_on: str

AnyEvent = Union[
    WorkflowStarted,
    ActivityScheduled,
    ActivityCompleted,
    ActivityFailed,
    TimerStarted,
    TimerFired,
    SignalReceived,
    ChildStarted,
    ChildCompleted,
    ChildFailed,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowCancelled,
    CommandRejected,
    ActivityStarted,
    HeartbeatRecorded,
    ActivityTimedOut,
    CancelRequested,
    WorkflowTerminated,
    WorkflowContinuedAsNew,
    WorkflowSuspended,
    WorkflowResumed,
    WorkflowRetried,
    StepSkipped,
    IncidentRaised,
    IncidentResolved,
    ScheduleCreated,
    SchedulePaused,
    ScheduleUnpaused,
    ScheduleFired,
    ScheduleRunClosed,
    ScheduleDeleted,
    UpdateAccepted,
    UpdateCompleted,
    WorkflowQueued,
    PermitGranted,
    PermitRefused,
    PriorityChanged,
    PermitQueued,
    PermitIssued,
    PermitDenied,
    PermitReleased,
    WorkflowMigrated,
    MigrationDeferred,
]


_UNION: ModelUnion[AnyEvent] = ModelUnion("event", AnyEvent)
#: Event type -> its class.
EVENT_TYPES: dict[str, type[AnyEvent]] = _UNION.types


#: ``from_data(type_, data)``: the model of event type ``type_`` with the fields in ``data`` (what
#: :func:`typed_event` builds from an event's ``type`` and ``data``). Raises ValueError as :func:`typed_event` does.
from_data: Callable[[str, dict[str, Any]], AnyEvent] = _UNION.build


def typed_event(ev: Event) -> AnyEvent:
    """The typed model of ``ev``, built from ``ev.data``.

    Raises:
        ValueError: the type is unknown, or ``ev.data`` has a field the type does not have or
            lacks one it requires; the message names the type and the fields.
    """
    return _UNION.build(ev.type, ev.data)


def to_data(model: AnyEvent) -> dict[str, Any]:
    """The ``data`` dict of an :class:`~kflow.model.messages.Event` carrying ``model``."""
    return _UNION.to_data(model)


def event(model: AnyEvent, instance_id: str, *, seq: int, ts: int) -> Event:
    """An :class:`~kflow.model.messages.Event` of ``instance_id`` carrying ``model`` (for tests and tools)."""
    return Event(model.TYPE, instance_id, seq, ts, to_data(model))
