"""The engine's state of one workflow instance, declared: every key, its type, and when it is there.

The engine keeps each instance's state as a plain JSON object (``new_state`` in
:mod:`kflow.engine.run` creates it, the engine modules change it in place, ``decide`` returns it) and
persists it, as JSON text, on the ``engine-state`` changelog
(:func:`kflow.schemas.codec.encode_engine_state`, whose record carries :data:`STATE_FORMAT_VERSION`).
:class:`InstanceState` declares that object: the keys every state has (``Required``) and the keys
only some states have (``NotRequired``: a suspended instance, a code run, an open incident ...),
with the shape of the entries of its tables. It describes the data; the engine still works on plain
dicts (``JSONDict``). ``tests/unit/model/test_state_model.py`` drives the engine through its
paths and checks every state it writes against this declaration, extra keys refused, so a key
the engine starts writing must be declared here first.

Values are as the JSON holds them: a state read back from the changelog (or copied by the engine,
which copies through JSON) has lists where a tuple was written and plain strings where a
:class:`~kflow.model.messages.Status` member was (they compare equal). Payloads (inputs, results,
variables, signal data) are any JSON value.

Limit counters (``kind`` ``limit``, :mod:`kflow.engine.limits`) and schedules (``kind``
``schedule``, :mod:`kflow.engine.schedules`) share the state store and changelog with instances,
but their states have other shapes and are not declared here.
"""

# No ``from __future__ import annotations``: on Python 3.11 a TypedDict only sees ``Required`` and
# ``NotRequired`` in evaluated annotations (postponed ones make every key required at runtime).

from typing import Literal, NotRequired, TypedDict, Union

from kflow.model.messages import JSONValue, Status

__all__ = [
    "INSTANCE_KINDS",
    "STATE_FORMAT_VERSION",
    "ActivityPolicy",
    "ActivityRecord",
    "ActivityTimers",
    "ActivityWait",
    "Admission",
    "BlockedInfo",
    "ChildRecord",
    "ChildWait",
    "Closing",
    "ClosingCancelled",
    "ClosingFailed",
    "Compensation",
    "CompensationError",
    "Duration",
    "ErrorInfo",
    "HeldEvent",
    "Incident",
    "IncidentPolicy",
    "IncidentWait",
    "InstanceKind",
    "InstanceState",
    "JoinWait",
    "OnFailurePolicy",
    "PendingMigration",
    "PermitRequest",
    "PriorityLevel",
    "QueuedSignal",
    "RetryPolicy",
    "RunSummary",
    "SignalData",
    "SignalWait",
    "Suspension",
    "ThreadState",
    "ThreadWait",
    "TimeoutKind",
    "TimeoutPolicy",
    "TimerRecord",
    "TimerWait",
    "UpdateAnswer",
    "UpdateFailure",
    "UpdateRecord",
    "UpdateResult",
    "UpdateWait",
]

#: ``format_version`` of the ``engine-state`` records this release writes: the shape
#: :class:`InstanceState` declares. ``decode_engine_state`` refuses a record of a newer format (a
#: rolled-back engine must not misread a state it does not know). Raise it when a state written by
#: this release would be misread by the previous one: a key renamed, removed or given another type
#: or meaning, or a new key that the previous release must not ignore. A new ``NotRequired`` key
#: the previous release may safely ignore (it keeps and copies keys it does not know) needs none.
#: The codec's ``ENGINE_STATE_FORMAT`` is this number (the model is the lowest layer: it owns it).
STATE_FORMAT_VERSION = 1

#: The ``kind`` of a workflow instance's state: a spec (YAML/JSON) workflow or a code workflow.
InstanceKind = Literal["spec", "code"]
#: The kinds :class:`InstanceState` declares (limit counters and schedules have other kinds).
INSTANCE_KINDS: frozenset[str] = frozenset({"spec", "code"})
#: A priority level: 1 critical, 2 high, 3 normal, 4 low, 5 background
#: (:data:`~kflow.model.messages.PRIORITIES`).
PriorityLevel = Literal[1, 2, 3, 4, 5]
#: The timeouts of an activity attempt, each a durable timer (:data:`kflow.engine.activity.TIMEOUT_KINDS`).
TimeoutKind = Literal["schedule_to_close", "start_to_close", "heartbeat"]
#: A duration as a spec or a code workflow gives it: ``"30s"``, ``"5m"``, or a number of seconds.
Duration = Union[str, int, float]


class ErrorInfo(TypedDict):
    """An error as the state keeps it (a closed instance's, an incident's, a compensation's)."""

    type: str
    """The error type (``ActivityError``, ``Timeout``, ``Cancelled`` ...)."""
    message: str
    """What went wrong."""


# -- threads (spec workflows) ----------------------------------------------------------------------
class ActivityWait(TypedDict):
    """A thread blocked on the activity of its task step."""

    k: Literal["activity"]
    """The kind of wait."""
    id: str
    """The activity id (a key of ``activities``)."""


class TimerWait(TypedDict):
    """A thread blocked on the timer of its ``sleep`` step."""

    k: Literal["timer"]
    """The kind of wait."""
    id: str
    """The timer id (a key of ``timers``)."""


class ChildWait(TypedDict):
    """A thread blocked on the child workflow its ``child`` step started."""

    k: Literal["child"]
    """The kind of wait."""
    id: str
    """The child's instance id (a key of ``children``)."""


class IncidentWait(TypedDict):
    """A thread whose task step's failure opened an incident, waiting for it to be resolved."""

    k: Literal["incident"]
    """The kind of wait."""
    id: str
    """The incident id (a key of ``incidents``)."""


class SignalWait(TypedDict):
    """A thread blocked on a ``wait: {signal}`` step."""

    k: Literal["signal"]
    """The kind of wait."""
    name: str
    """The signal it waits for."""
    timer: str | None
    """The timer of the step's ``timeout`` (purpose ``wait_timeout``); None without one."""


class UpdateWait(TypedDict):
    """A thread blocked on a ``wait: {update}`` step."""

    k: Literal["update"]
    """The kind of wait."""
    name: str
    """The update it waits for."""
    timer: str | None
    """The timer of the step's ``timeout`` (purpose ``wait_timeout``); None without one."""


class JoinWait(TypedDict):
    """A ``parallel`` or ``foreach`` step waiting for the child threads of its branches or items."""

    k: Literal["join"]
    """The kind of wait."""
    results: list[JSONValue]
    """The ``last`` value of each branch or item, by slot; None until that one finished."""
    pending: int
    """How many branches or items have not finished yet."""
    items: list[JSONValue] | None
    """A ``foreach`` step's items; None for ``parallel``."""
    next: int
    """The slot of the next item a ``foreach`` starts (its ``concurrency`` bounds the running ones)."""


#: What a blocked thread waits for (``ThreadState.wait``), told apart by ``k``.
ThreadWait = Union[ActivityWait, TimerWait, ChildWait, IncidentWait, SignalWait, UpdateWait, JoinWait]


class ThreadState(TypedDict):
    """One thread of a spec workflow (``threads``): where it stands in a list of steps."""

    list: str
    """The steps list it walks: ``""`` for the top level, ``<step id>.<branch>`` for a ``parallel``
    branch, ``<step id>`` for a ``foreach`` item."""
    idx: int
    """The index of its current step in that list (the list's length: finished)."""
    vars: dict[str, JSONValue]
    """Its local variables (a ``foreach`` item's ``as`` name; a branch's outputs); the root's are
    in the state's ``vars``."""
    parent: str | None
    """The thread id of the ``parallel``/``foreach`` step that started it; None for the root."""
    slot: int
    """Its branch or item index in the parent's ``JoinWait.results``."""
    wait: ThreadWait | None
    """What it is blocked on; None while it can run."""
    last: JSONValue
    """The output of its last step (a branch's result)."""


# -- activities ------------------------------------------------------------------------------------
class ActivityTimers(TypedDict, total=False):
    """The timer ids of an activity's armed timeouts and retry backoff (keys of ``timers``)."""

    schedule_to_close: str
    """Spans every attempt."""
    start_to_close: str
    """Bounds the current attempt."""
    heartbeat: str
    """Fires when the current attempt was silent for its heartbeat timeout."""
    retry: str
    """The backoff before the next attempt (phase ``backoff``)."""


class RetryPolicy(TypedDict, total=False):
    """A code workflow activity's retry policy, as given (:class:`~kflow.model.spec.RetrySpec` fields)."""

    initial: Duration
    """The first backoff."""
    backoff: float
    """The factor each next backoff grows by."""
    max_interval: Duration | None
    """The longest backoff (None: 100 times ``initial``)."""
    max_attempts: int
    """The most attempts (0: no bound)."""
    jitter: float
    """The random (deterministic per attempt) share a backoff varies by, 0 to 1."""
    non_retryable: list[str]
    """Error types that are never retried."""


class TimeoutPolicy(TypedDict, total=False):
    """A code workflow activity's timeouts, as given (:class:`~kflow.model.spec.TimeoutSpec` fields)."""

    schedule_to_close: Duration
    """Spans every attempt."""
    start_to_close: Duration
    """Bounds one attempt from its start."""
    heartbeat: Duration
    """The longest silence between an attempt's heartbeats."""


class IncidentPolicy(TypedDict, total=False):
    """An ``on_failure`` incident, as :class:`~kflow.model.spec.IncidentSpec` dumps it (no None values)."""

    role: str
    """Who may resolve it with auth on (besides ``system_admin``)."""
    instructions: str
    """What the operator is shown."""
    timeout: Duration
    """How long it may stay open before it fails the workflow."""


class OnFailurePolicy(TypedDict):
    """A code workflow activity's ``on_failure``: only incidents (code catches errors itself)."""

    incident: IncidentPolicy
    """The incident its final failure opens."""


class ActivityPolicy(TypedDict, total=False):
    """A code workflow activity's own policies (a spec activity takes them from its step)."""

    retry: RetryPolicy
    """Its retry policy (the workflow's default when it gave none)."""
    timeout: TimeoutPolicy
    """Its timeouts."""
    on_failure: OnFailurePolicy
    """An incident instead of an error once its retries are exhausted."""


class ActivityRecord(TypedDict):
    """A pending activity (``activities``), from its first schedule until its final outcome."""

    name: str
    """The activity type its tasks name."""
    queue: str
    """The task queue its tasks go to."""
    attempt: int
    """The current attempt, from 1 (a code retry's reset goes on above the old attempts)."""
    thread: str | None
    """The spec thread blocked on it, ``"code"`` for a code workflow's, None for a saga's compensation."""
    step: str
    """The spec step id (``compensate:<step id>`` for a compensation), or a code activity's name."""
    input: JSONValue
    """The input of its attempts."""
    phase: Literal["scheduled", "started", "backoff"]
    """``scheduled`` (task sent), ``started`` (the worker reported it), ``backoff`` (waiting out the
    retry delay before the next attempt)."""
    timers: ActivityTimers
    """Its armed timers, by what they are for."""
    policy: NotRequired[ActivityPolicy]
    """A code workflow activity's retry policy, timeouts and ``on_failure``; absent without any."""
    local: NotRequired[bool]
    """True for a local activity (run by the engine process); absent otherwise."""
    priority: NotRequired[PriorityLevel]
    """Its own priority level (the step's or the call's); absent: the instance's."""
    fairness: NotRequired[str]
    """Its fairness key (the step's ``fairness_key`` evaluated when scheduled); absent: the tenant's."""
    hb: NotRequired[int]
    """Its heartbeat timeout, ms; absent without one."""
    beat: NotRequired[int]
    """When the current attempt's last recorded heartbeat arrived, epoch ms; absent before the first."""
    base: NotRequired[int]
    """A code workflow activity reopened under its id (its incident resolved by retry, a retry of the
    closed run): the attempt it was reopened after; its retry policy counts attempts from there."""
    timed_out: NotRequired[bool]
    """True while the backoff follows an attempt that timed out (its late result is ``STALE``)."""
    waiting_permit: NotRequired[bool]
    """True while the current attempt's task is held for the permits of an activity limit."""


class TimerRecord(TypedDict):
    """A durable timer (``timers``): the processor's timer index fires it as ``FireTimer`` when due."""

    due: int
    """When it fires, epoch ms."""
    thread: str | None
    """The spec thread it belongs to, ``"code"`` for a code workflow's, None for the engine's own
    (execution timeout, a compensation's timeouts)."""
    purpose: str
    """What firing means: ``sleep``, ``wait_timeout``, ``execution``, ``retry``, ``activity_timeout``,
    ``incident``, ``replay`` (a blocked code run retries its replay); a code workflow's own timers
    carry its name of them (``sleep``, ``signal:<name>``, ``condition``)."""
    activity: NotRequired[str]
    """The activity of a ``retry`` or ``activity_timeout`` timer."""
    kind: NotRequired[TimeoutKind]
    """Which timeout an ``activity_timeout`` timer is."""
    incident: NotRequired[str]
    """The incident of an ``incident`` timer (its timeout)."""


class ChildRecord(TypedDict):
    """A running child workflow (``children``, keyed by its instance id)."""

    thread: str
    """The spec thread blocked on it, or ``"code"``."""
    step: str
    """The spec step that started it, or the child's workflow name (code)."""


# -- suspension, queued starts, updates ------------------------------------------------------------
class HeldEvent(TypedDict):
    """An input event a suspended instance recorded but applies only when it is resumed."""

    type: Literal["ActivityCompleted", "ActivityFailed", "TimerFired", "SignalReceived", "ChildCompleted",
                  "ChildFailed"]
    """The event type (:data:`kflow.engine.core.HELD_INPUTS`)."""
    seq: int
    """The event's ``seq``."""
    ts: int
    """The event's ``ts``, epoch ms."""
    data: dict[str, JSONValue]
    """The event's data."""
    timer: NotRequired[TimerRecord]
    """A fired timer, out of ``timers`` until the resume puts it back; only on ``TimerFired``."""


class Suspension(TypedDict):
    """Why and from what an instance is suspended, and what it holds for its resume."""

    status: Status
    """The status it resumes to."""
    reason: str
    """The operator's reason (``""`` when none was given)."""
    held: list[HeldEvent]
    """The input events it received while suspended, in arrival order."""


class SignalData(TypedDict):
    """The data of a ``SignalReceived`` event."""

    name: str
    """The signal's name."""
    data: JSONValue
    """Its payload."""
    signal_id: str
    """The command id of the ``SignalWorkflow`` (``""`` when it had none)."""


class QueuedSignal(TypedDict):
    """A signal a QUEUED instance received: applied, in arrival order, once it is admitted."""

    seq: int
    """The ``SignalReceived`` event's ``seq``."""
    ts: int
    """Its ``ts``, epoch ms."""
    data: SignalData
    """Its data."""


class UpdateResult(TypedDict):
    """An update's handler returned ``result``."""

    result: JSONValue
    """What the handler (or a spec step's ``reply``) returned."""


class UpdateFailure(TypedDict):
    """An update's handler raised (or the instance closed before it finished)."""

    error: ErrorInfo
    """The error its caller is answered with."""


#: The answer of an update, as its caller is sent it.
UpdateAnswer = Union[UpdateResult, UpdateFailure]


class UpdateRecord(TypedDict):
    """A recent update (``updates``, keyed by update id, oldest first)."""

    name: str
    """The update's name."""
    answer: UpdateAnswer | None
    """Its answer; None while its handler (or waiting step) has not answered yet."""


# -- incidents, sagas, migrations -----------------------------------------------------------------
class Incident(TypedDict):
    """An open incident (``incidents``, keyed by incident id): an activity waits for an operator."""

    thread: str
    """The spec thread blocked on it, or ``"code"``."""
    step: str
    """The spec step, or the code activity's name."""
    activity: str
    """The activity id whose retries ran out."""
    name: str
    """The activity type (a retry schedules it again)."""
    queue: str
    """Its task queue."""
    input: JSONValue
    """Its input (a retry's ``input_patch`` updates it)."""
    priority: PriorityLevel | None
    """Its own priority level; None: the instance's."""
    attempts: int
    """The attempts it had."""
    error: ErrorInfo
    """Its final error."""
    role: str | None
    """Who may resolve it with auth on; None: only ``system_admin``."""
    instructions: str
    """What the operator is shown."""
    timeout: Duration | None
    """How long it may stay open before it fails the workflow; None: no bound."""
    timer: str | None
    """Its timeout timer (purpose ``incident``); None without a timeout."""
    raised_ms: int
    """When it was raised, epoch ms."""
    record: NotRequired[ActivityRecord]
    """A code workflow's activity record, out of ``activities``: a retry reopens it under its id."""


class ClosingFailed(TypedDict):
    """The ``WorkflowFailed`` data a failing saga closes with."""

    error_type: str
    """The error that failed the workflow."""
    message: str
    """Its message."""


class ClosingCancelled(TypedDict):
    """The ``WorkflowCancelled`` data a cancelled saga closes with."""

    reason: str
    """The cancel's reason."""


class Closing(TypedDict):
    """The terminal event a spec saga emits once its compensations ran."""

    status: Status
    """``FAILED`` or ``CANCELLED``."""
    event: Literal["WorkflowFailed", "WorkflowCancelled"]
    """The event it closes with."""
    data: ClosingFailed | ClosingCancelled
    """That event's data."""


class Compensation(TypedDict):
    """A completed spec step's compensation, recorded to be run if the workflow fails or is cancelled."""

    step: str
    """The step it undoes."""
    task: str
    """The compensation's activity type."""
    queue: str
    """Its task queue."""
    input: JSONValue
    """Its input, evaluated when the step completed."""


class CompensationError(TypedDict):
    """A compensation that failed for good (the saga goes on with the next one)."""

    step: str
    """The step whose compensation failed."""
    type: str
    """The error type."""
    message: str
    """Its message."""


class PendingMigration(TypedDict):
    """A migration deferred until the instance reaches a safe point (``MigrationDeferred``)."""

    plan_id: str
    """The migration plan's id."""
    from_range: str
    """The versions it applies to (a version range)."""
    to_version: int
    """The version it moves the instance to."""
    step_map: dict[str, str]
    """Old step id -> new step id (spec workflows)."""
    vars: dict[str, str]
    """Variable -> CEL expression of its new value (spec workflows)."""
    transform: str | None
    """A registered Python migration (``@kflow.migration``) of the variables; None without one."""
    reason: str
    """Why (``""`` when none was given)."""
    by: str
    """Who asked for it (``""`` when unknown)."""
    waiting_on: str
    """What was in flight when it was deferred, ``; ``-separated."""
    seq: int
    """The ``seq`` of its ``MigrationDeferred`` event."""


# -- code runs, quotas -------------------------------------------------------------------------------
class RunSummary(TypedDict):
    """An earlier run of a code instance that continued as new (``runs``, the last ten)."""

    run: int
    """Its run number."""
    version: int
    """The version it ran."""
    started_ms: int
    """When it started, epoch ms."""
    input: JSONValue
    """Its input."""
    continued_with: JSONValue
    """The input it continued as new with (the next run's input)."""


class BlockedInfo(TypedDict):
    """Why a code instance is BLOCKED: its code no longer replays its history."""

    seq: int
    """The instance's ``seq`` when the replay failed."""
    index: int
    """The index of the first command the code does not reproduce."""
    expected: str
    """The command the history has there."""
    actual: str
    """What the code issues instead."""
    message: str
    """The whole description."""
    attempts: int
    """How many replays failed in a row (the backoff of the ``replay`` timer grows with it)."""


class Admission(TypedDict):
    """A start subject to quotas: the limits it needs a permit of, in order, and how far it got."""

    limits: list[str]
    """The keys of the limit counters (``limit:<name>[:<key>]``)."""
    granted: int
    """How many of them granted their permit."""
    queued_ms: int
    """When it was queued, epoch ms."""
    admitted_ms: NotRequired[int]
    """When the last permit was granted and it started, epoch ms; absent while QUEUED."""


class PermitRequest(TypedDict):
    """The permits an activity attempt subject to activity limits holds or waits for."""

    limits: list[str]
    """The keys of the limit counters, in the order they are asked."""
    granted: int
    """How many of them granted their permit."""


# -- the instance ----------------------------------------------------------------------------------
class InstanceState(TypedDict):
    """The engine's whole state of one workflow instance (``kind`` ``spec`` or ``code``)."""

    # what new_state creates, on every state
    id: str
    """The instance id (the Kafka key of its commands, events and state)."""
    workflow: str
    """The workflow (definition) name."""
    version: int
    """The definition version it runs (a ``MAJOR.MINOR.PATCH`` version as its version code)."""
    kind: InstanceKind
    """``spec`` or ``code``: which interpreter runs it."""
    status: Status
    """Its status (``RUNNING`` ... ``TERMINATED``)."""
    seq: int
    """The ``seq`` of its last event; carried over when the id is reused."""
    started_ms: int
    """When the current run started (a queued start: when it was admitted), epoch ms."""
    updated_ms: int
    """When its last event was recorded, epoch ms."""
    closed_ms: int | None
    """When it closed, epoch ms; None while open."""
    input: JSONValue
    """Its input (a retry's ``input_patch`` may replace it)."""
    vars: dict[str, JSONValue]
    """A spec workflow's variables (step outputs, ``set``); always empty for code."""
    result: JSONValue
    """Its result once COMPLETED; None otherwise."""
    error: ErrorInfo | None
    """Why it ended other than COMPLETED, or the newest open incident's error; None otherwise."""
    parent_id: str | None
    """The parent instance of a child workflow (``schedule:<id>`` for a scheduled run); None otherwise."""
    parent_ref: str | None
    """The child id its parent knows it by; None for a top-level instance."""
    threads: dict[str, ThreadState]
    """A spec workflow's threads, by thread id; empty for code and once closed."""
    next_tid: int
    """The id of the next thread a spec workflow starts."""
    activities: dict[str, ActivityRecord]
    """Its pending activities, by activity id."""
    timers: dict[str, TimerRecord]
    """Its pending durable timers, by timer id."""
    children: dict[str, ChildRecord]
    """Its running child workflows, by child instance id."""
    signals: dict[str, list[JSONValue]]
    """Signals a spec workflow received while no step waited for them, by name, oldest first."""

    # stamped by the processor (and carried over when a run starts afresh under the same id)
    events_offset: NotRequired[int]
    """An offset of its ``events`` partition at or before its first event; stamped after the first
    event was produced."""
    owner: NotRequired[str]
    """The principal that started it; with auth on only."""
    tenant: NotRequired[str]
    """The tenant it belongs to; with auth on only."""
    seen_tokens: NotRequired[dict[str, int]]
    """The command token ids it accepted with auth on -> their expiry, epoch seconds."""

    # the lifecycle of an instance
    priority: NotRequired[PriorityLevel]
    """Its priority level (from its start, its definition's default, ``SetPriority``); absent: normal."""
    signal_ids: NotRequired[list[str]]
    """The command ids of its most recent signals (redeliveries are rejected); absent before one
    with an id."""
    suspended: NotRequired[Suspension]
    """Present while SUSPENDED."""
    queued_signals: NotRequired[list[QueuedSignal]]
    """Signals received while QUEUED; present until it is admitted (or closes)."""
    admission: NotRequired[Admission]
    """The permits of a start subject to quotas; present from ``WorkflowQueued`` until it closes."""
    permits: NotRequired[dict[str, PermitRequest]]
    """The permits of its activity attempts subject to limits, by ``<activity id>#<attempt>``;
    present while any is held or waited for."""
    updates: NotRequired[dict[str, UpdateRecord]]
    """Its recent updates by update id, oldest first (the answered ones bounded); present from the
    first accepted update."""
    incidents: NotRequired[dict[str, Incident]]
    """Its open incidents by incident id; present (and the status INCIDENT) while any is open."""
    pending_migration: NotRequired[PendingMigration]
    """A migration waiting for a safe point; present until it is applied, rejected or dropped."""
    search: NotRequired[dict[str, JSONValue]]
    """Its search attributes; present from the first upsert."""
    ended: NotRequired[dict[str, list[int | bool]]]
    """Recently ended activities, by activity id -> ``[last attempt, its result was recorded]`` (the
    most recent, bounded); tells a late result (``STALE``) from a redelivery (``DUPLICATE``). Absent
    when there are none and once closed."""
    stopped_at: NotRequired[int]
    """The index of the top-level step a spec instance stood at when it closed other than COMPLETED
    (where a retry re-opens it by default)."""
    retries: NotRequired[int]
    """How many times it was retried (``WorkflowRetried.attempt``); absent before the first."""

    # sagas
    compensations: NotRequired[list[Compensation]]
    """The compensations of a spec workflow's completed steps, oldest first; present from the first."""
    compensation: NotRequired[Literal["running", "completed", "failed"]]
    """Whether its compensations are running, all completed, or some failed; present once they ran."""
    compensation_errors: NotRequired[list[CompensationError]]
    """The compensations that failed for good; present from the first."""
    closing: NotRequired[Closing]
    """The terminal event a spec saga closes with; present while it compensates (COMPENSATING,
    CANCELLING)."""

    # code runs
    run: NotRequired[int]
    """The run number, from 1 (absent: 1); continue-as-new starts the next."""
    run_seq: NotRequired[int]
    """The ``seq`` the current run started after (continue-as-new); absent for the first run."""
    runs: NotRequired[list[RunSummary]]
    """The last ten runs that continued as new, oldest first."""
    input_count: NotRequired[int]
    """How many inputs the current run's journal holds; present while a code run's history is kept
    (open, or closed other than COMPLETED for a retry)."""
    command_count: NotRequired[int]
    """How many commands the current run's journal holds; present with ``input_count``."""
    delivered: NotRequired[int]
    """How many of those inputs the workflow code has been fed; present with ``input_count``."""
    inputs_digest: NotRequired[str]
    """A digest of those inputs (a cached machine resumes only on the exact history it saw);
    present with ``input_count``."""
    blocked: NotRequired[BlockedInfo]
    """Present while BLOCKED (its code does not replay its history)."""
    cancel_reason: NotRequired[str]
    """The reason of a cancel whose cleanup the code is running (CANCELLING)."""
    reset_attempts: NotRequired[dict[str, int]]
    """A closed code run's activities -> the highest attempt each reached (a retry goes on above it)."""
    inputs: NotRequired[list[list[JSONValue]]]
    """Legacy: the run's inputs (``[type, data, ts, seq]``) in a state written before the journal;
    moved into the journal by its first input. Never written now."""
    commands: NotRequired[list[list[JSONValue]]]
    """Legacy: the commands (``[kind, name, value]``) its code issued, with ``inputs``. Never written now."""
