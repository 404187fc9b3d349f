"""Typed commands: one frozen dataclass per command type, mirroring the ``body`` union of ``command.avsc``.

:class:`~kflow.model.messages.Command` carries a command as a ``type`` tag and a ``data`` dict; the
classes here give each type its own fields, so a missing or misspelled field is a ``TypeError`` where
the command is built. Payload fields (input, results, signal data) hold JSON values and default to
null, as a JSON command that leaves one out decodes (:mod:`kflow.schemas.codec`); a field that is
nullable in the schema is ``Optional`` here, with the schema's default.

    >>> cmd = command(SignalWorkflow(name="approve", data={"ok": True}), "order-1")
    >>> cmd.type, cmd.data
    ('SignalWorkflow', {'name': 'approve', 'data': {'ok': True}})
    >>> cmd.typed()
    SignalWorkflow(name='approve', data={'ok': True})

The conversions are plain attribute copies: :func:`typed` builds the class of ``cmd.type`` from
``cmd.data`` (as :func:`kflow.schemas.codec.decode_command` leaves it), :func:`to_data` goes back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from kflow.model.messages import Command, JSONValue
from kflow.model.unions import ModelUnion

__all__ = [
    "AnyCommand",
    "COMMAND_TYPES",
    "command",
    "from_data",
    "to_data",
    "typed",
    "AcquirePermit",
    "BackfillSchedule",
    "CancelWorkflow",
    "CompleteActivity",
    "CompleteChild",
    "CreateSchedule",
    "DeleteSchedule",
    "FailActivity",
    "FailChild",
    "FireTimer",
    "GrantPermit",
    "HeartbeatActivity",
    "MigrateWorkflow",
    "PauseSchedule",
    "QueryStatus",
    "QueryWorkflow",
    "RefusePermit",
    "ReleasePermit",
    "ResolveIncident",
    "ResumeWorkflow",
    "RetryWorkflow",
    "SetPriority",
    "SignalWorkflow",
    "StartActivity",
    "StartWorkflow",
    "SuspendWorkflow",
    "TerminateWorkflow",
    "TriggerSchedule",
    "UnpauseSchedule",
    "UpdateWorkflow",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class StartWorkflow:
    TYPE: ClassVar[str] = "StartWorkflow"

    workflow: str
    version: Optional[int] = None
    input: JSONValue = None
    parent_id: Optional[str] = None
    parent_ref: Optional[str] = None
    id_reuse: Optional[str] = None
    priority: Optional[int] = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalWorkflow:
    TYPE: ClassVar[str] = "SignalWorkflow"

    name: str
    data: JSONValue = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelWorkflow:
    TYPE: ClassVar[str] = "CancelWorkflow"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CompleteActivity:
    TYPE: ClassVar[str] = "CompleteActivity"

    activity_id: str
    attempt: int
    result: JSONValue = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FailActivity:
    TYPE: ClassVar[str] = "FailActivity"

    activity_id: str
    attempt: int
    error_type: str
    message: str
    retryable: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatActivity:
    TYPE: ClassVar[str] = "HeartbeatActivity"

    activity_id: str
    attempt: int
    details: JSONValue = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FireTimer:
    TYPE: ClassVar[str] = "FireTimer"

    timer_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CompleteChild:
    TYPE: ClassVar[str] = "CompleteChild"

    child_id: str
    result: JSONValue = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FailChild:
    TYPE: ClassVar[str] = "FailChild"

    child_id: str
    error_type: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StartActivity:
    TYPE: ClassVar[str] = "StartActivity"

    activity_id: str
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TerminateWorkflow:
    TYPE: ClassVar[str] = "TerminateWorkflow"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryWorkflow:
    TYPE: ClassVar[str] = "QueryWorkflow"

    query_id: str
    name: str
    args: JSONValue = None


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryStatus:
    """Ask the owning engine for the instance's state record; answered on the replies topic, no history
    written.
    """

    TYPE: ClassVar[str] = "QueryStatus"

    query_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SuspendWorkflow:
    """Pause the instance: no new tasks, no timers fired; what arrives meanwhile is applied on resume."""

    TYPE: ClassVar[str] = "SuspendWorkflow"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeWorkflow:
    TYPE: ClassVar[str] = "ResumeWorkflow"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryWorkflow:
    """Re-open a FAILED (or, with force, CANCELLED or TERMINATED) instance: a spec instance at a top-level
    step, its variables as they were plus input_patch (a JSON object, or null); a code instance reset to
    the input before its failure, or to event N when from_step is "event:N".
    """

    TYPE: ClassVar[str] = "RetryWorkflow"

    from_step: Optional[str] = None
    input_patch: JSONValue = None
    force: bool = False
    reason: str
    by: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolveIncident:
    """Resolve an open incident of the instance: action retry (run the step again, its input merged with
    input_patch, a JSON object or null), skip (the step's output is output) or fail (fail the workflow).
    """

    TYPE: ClassVar[str] = "ResolveIncident"

    incident_id: str
    action: str
    output: JSONValue = None
    input_patch: JSONValue = None
    by: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateSchedule:
    """Create (or, with replace, replace) the schedule of the key schedule:<id>; spec is its declaration as
    JSON text.
    """

    TYPE: ClassVar[str] = "CreateSchedule"

    spec: JSONValue = None
    replace: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class PauseSchedule:
    TYPE: ClassVar[str] = "PauseSchedule"

    note: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UnpauseSchedule:
    TYPE: ClassVar[str] = "UnpauseSchedule"

    note: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TriggerSchedule:
    """Start a run now; overlap overrides the schedule's overlap policy for this run."""

    TYPE: ClassVar[str] = "TriggerSchedule"

    overlap: Optional[str] = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BackfillSchedule:
    """Start one run per scheduled time in [start_ms, end_ms)."""

    TYPE: ClassVar[str] = "BackfillSchedule"

    start_ms: int
    end_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteSchedule:
    TYPE: ClassVar[str] = "DeleteSchedule"

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateWorkflow:
    """A signal that returns a result: validated first (a rejection writes nothing), answered on the
    replies topic keyed by update_id when its handler finishes; data is JSON text. A repeated update_id
    is answered from the instance's record of it.
    """

    TYPE: ClassVar[str] = "UpdateWorkflow"

    update_id: str
    name: str
    data: JSONValue = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AcquirePermit:
    """Ask the limit counter keyed limit:<name>[:<key>] for a permit for holder (an instance id) and ref
    (start, or <activity id>#<attempt>); a repeat with another priority moves a queued request to that
    level.
    """

    TYPE: ClassVar[str] = "AcquirePermit"

    holder: str
    ref: str
    priority: Optional[int] = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleasePermit:
    """The holder's work ended: free its permit, or withdraw its queued request."""

    TYPE: ClassVar[str] = "ReleasePermit"

    holder: str
    ref: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantPermit:
    """Sent by a limit counter to the holder: the permit for ref is granted."""

    TYPE: ClassVar[str] = "GrantPermit"

    limit: str
    ref: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RefusePermit:
    """Sent by a limit counter to the holder: the request for ref is refused (policy reject)."""

    TYPE: ClassVar[str] = "RefusePermit"

    limit: str
    ref: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetPriority:
    """Change the instance's priority level (1 critical .. 5 background); work not dispatched yet moves to
    it.
    """

    TYPE: ClassVar[str] = "SetPriority"

    priority: Optional[int] = None
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrateWorkflow:
    """Move the instance to another version of its workflow at a safe point (migration plan plan_id):
    from_range must match its version; step_map (JSON object old step id -> new) maps its waiting
    positions; vars (JSON object name -> CEL) transforms its variables; transform names a registered
    Python migration, or is null.
    """

    TYPE: ClassVar[str] = "MigrateWorkflow"

    plan_id: str
    from_range: str
    to_version: int
    step_map: JSONValue = None
    vars: JSONValue = None
    transform: Optional[str] = None
    reason: str
    by: str

AnyCommand = Union[
    StartWorkflow,
    SignalWorkflow,
    CancelWorkflow,
    CompleteActivity,
    FailActivity,
    HeartbeatActivity,
    FireTimer,
    CompleteChild,
    FailChild,
    StartActivity,
    TerminateWorkflow,
    QueryWorkflow,
    QueryStatus,
    SuspendWorkflow,
    ResumeWorkflow,
    RetryWorkflow,
    ResolveIncident,
    CreateSchedule,
    PauseSchedule,
    UnpauseSchedule,
    TriggerSchedule,
    BackfillSchedule,
    DeleteSchedule,
    UpdateWorkflow,
    AcquirePermit,
    ReleasePermit,
    GrantPermit,
    RefusePermit,
    SetPriority,
    MigrateWorkflow,
]


_UNION: ModelUnion[AnyCommand] = ModelUnion("command", AnyCommand)
#: Command type -> its class.
COMMAND_TYPES: dict[str, type[AnyCommand]] = _UNION.types


#: ``from_data(type_, data)``: the model of command type ``type_`` with the fields in ``data`` (what
#: :func:`typed` builds from a command's ``type`` and ``data``). Raises ValueError as :func:`typed` does.
from_data: Callable[[str, dict[str, Any]], AnyCommand] = _UNION.build


def typed(cmd: Command) -> AnyCommand:
    """The typed model of ``cmd``, built from ``cmd.data``.

    Raises:
        ValueError: the type is unknown, or ``cmd.data`` has a field the type does not have or
            lacks one it requires; the message names the type and the fields.
    """
    return _UNION.build(cmd.type, cmd.data)


def to_data(model: AnyCommand) -> dict[str, Any]:
    """The ``data`` dict of a :class:`~kflow.model.messages.Command` carrying ``model``."""
    return _UNION.to_data(model)


def command(model: AnyCommand, instance_id: str, *, command_id: Optional[str] = None, ts: Optional[int] = None) -> Command:
    """A :class:`~kflow.model.messages.Command` for ``instance_id`` carrying ``model``.

    ``command_id`` and ``ts`` default to the empty string and 0, as on ``Command`` itself (the
    client fills them in when it sends).
    """
    return Command(model.TYPE, instance_id, to_data(model), command_id or "", ts or 0)
