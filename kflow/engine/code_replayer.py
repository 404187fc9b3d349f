"""The code-workflow replayer: drives a Python ``async def`` workflow by deterministic replay.

A code workflow's coroutine is never run by an asyncio loop; :class:`Machine` steps it by hand.
Every ``ctx`` operation either issues a *command* (schedule an activity, start a timer, start a
child, record a side-effect value or a patch marker) or waits on a future that an *input event*
resolves. Commands become the same consequence events and state entries the spec interpreter
writes (``ActivityScheduled`` + a task, ``TimerStarted`` + ``state["timers"]``, ``ChildStarted`` +
``StartWorkflow``), so the deciders in :mod:`kflow.engine.core` handle both kinds alike.

The history of a code instance is its input events (``[type, data, ts, seq]``) and the commands
its code issued (``[kind, name, value]``). They are entries of the instance's journal
(:mod:`kflow.engine.journal`), appended by each decision; the state keeps only how many there are,
how many inputs were delivered and a digest of the inputs, so the state record does not grow with
the history. A :class:`ReplayCache` keeps live machines keyed by instance and position, so the
common case resumes a parked coroutine and reads no history. On a miss (restart, rebalance,
eviction) the run's journal is read once, the function is re-run from the start, fed the first
``delivered`` inputs, and every command it issues must equal the recorded one. A mismatch is
non-determinism: the instance becomes ``BLOCKED`` with a description, nothing else changes, and
each later input (or the replay timer the block sets) retries the replay, so deploying fixed code
resumes the instance where it stopped. A run's entries are deleted when it continues as new or
closes. A state written before the journal carries its history as lists (``inputs``,
``commands``); the first input it receives moves them into the journal.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, Optional, Union

import orjson

from kflow.engine import activity as activities
from kflow.engine import incidents
from kflow.engine.activity import LimitExceeded, limits_of
from kflow.engine.journal import COMMAND, INPUT, MEMORY, Append, Entries, Journal, Reset, apply_to
from kflow.engine.run import PRIORITY, UPDATES, Run, new_state
from kflow.model.errors import ActivityError, CancelledError, DeterminismError, KflowError, WorkflowError
from kflow.model.messages import Event, JSONDict, Status, priority_level
from kflow.model.spec import IncidentSpec, OnFailureSpec, RetrySpec, TimeoutSpec

#: Instance-state fields owned by this module (persisted names, never reused): how many inputs and
#: commands the run's journal holds, how many inputs the coroutine has been fed, a digest of the
#: inputs (so a cached machine is resumed only by the exact history it saw), the BLOCKED description.
INPUT_COUNT, COMMAND_COUNT, DELIVERED, INPUTS_DIGEST, BLOCKED_INFO = (
    "input_count", "command_count", "delivered", "inputs_digest", "blocked")
#: The history lists of states written before the journal; only read, and moved into the journal.
INPUTS, COMMANDS = "inputs", "commands"
#: Every journal field of a state, dropped when the run's journal is.
_JOURNAL_FIELDS = (INPUTS, COMMANDS, INPUT_COUNT, COMMAND_COUNT, DELIVERED, INPUTS_DIGEST)

#: Input events a code workflow reacts to; any other input event (e.g. an attempt that started or a
#: recorded heartbeat) is history for the shared deciders only and leaves the coroutine untouched.
WORKFLOW_INPUTS = frozenset({"WorkflowStarted", "ActivityCompleted", "ActivityFailed", "TimerFired",
                             "SignalReceived", "ChildCompleted", "ChildFailed", "CancelRequested",
                             "UpdateAccepted"})

#: Most runs started by ``continue_as_new`` within one decision (a loop that never awaits).
MAX_CONTINUATIONS_PER_DECISION = 10

#: Back-off of the timer that retries the replay of a BLOCKED instance: first, cap (ms).
REPLAY_RETRY_MS, REPLAY_RETRY_MAX_MS = 1_000, 300_000


class HistoryUnavailable(KflowError):
    """The history needed to replay ``instance_id`` is not there (a closed instance, or another
    process's journal)."""

    type = "HistoryUnavailable"

    def __init__(self, instance_id: str, reason: str) -> None:
        self.instance_id, self.reason = instance_id, reason
        super().__init__(f"instance {instance_id}: cannot replay its history: {reason}")


class NondeterminismError(DeterminismError):
    """Workflow code issued a different command than its history recorded at ``event_index``."""

    def __init__(self, instance_id: str, event_index: int, expected: str, actual: str) -> None:
        self.event_index = event_index
        super().__init__(instance_id, None, expected, actual,
                         f"instance {instance_id}: non-deterministic workflow code at command #{event_index}: "
                         f"history has {expected}, but the code now issues {actual}")


@dataclass
class CodeDefinition:
    """A registered code workflow; lives in the definitions table next to compiled specs.

    ``sandbox`` is a factory of context managers entered around every step of workflow code, with a
    ``paused()`` method that lifts it (for side-effect functions); None runs code unguarded.
    """

    name: str
    version: int
    fn: Callable[[Any, Any], Coroutine[Any, Any, Any]]
    kind: str = "code"
    module: str = ""
    sandbox: Any = None
    retry: Optional[JSONDict] = None  # the default retry policy of its activities
    execution_timeout_ms: Optional[int] = None


#: Code workflows registered in this process by ``@kflow.workflow`` (name, version) -> definition.
REGISTRY: dict[tuple[str, int], CodeDefinition] = {}


def register(d: CodeDefinition) -> CodeDefinition:
    REGISTRY[(d.name, d.version)] = d
    return d


# -- futures and tasks ---------------------------------------------------------------------------
class _Future:
    """A value a workflow task awaits; resolved only by the machine, in a deterministic order."""

    __slots__ = ("done", "value", "error", "callbacks")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self.callbacks: list[Callable[[], None]] = []

    def set_result(self, value: Any) -> None:
        self._finish(value, None)

    def set_error(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value: Any, error: Optional[BaseException]) -> None:
        if self.done:
            return
        self.done, self.value, self.error = True, value, error
        callbacks, self.callbacks = self.callbacks, []
        for cb in callbacks:
            cb()

    def on_done(self, cb: Callable[[], None]) -> None:
        if self.done:
            cb()
        else:
            self.callbacks.append(cb)

    def __await__(self) -> Generator[Any, None, Any]:
        while not self.done:
            yield self
        if self.error is not None:
            raise self.error
        return self.value


class _Task:
    __slots__ = ("coro", "future")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro
        self.future = _Future()


class ReplayMismatch(BaseException):
    """Raised through workflow code (a BaseException, so ``except Exception`` cannot swallow it)."""

    def __init__(self, index: int, expected: str, actual: str) -> None:
        self.index, self.expected, self.actual = index, expected, actual
        super().__init__(f"#{index}: expected {expected}, actual {actual}")


class ContinueAsNew(BaseException):
    """Raised by ``ctx.continue_as_new``: end this run and start a fresh one under the same id."""

    def __init__(self, input_: Any) -> None:
        self.input = input_
        super().__init__("continue as new")


def _describe(entry: Optional[list[Any]]) -> str:
    if entry is None:
        return "no further command"
    kind, name = entry[0], entry[1]
    return {"activity": f"activity '{name}'", "timer": f"timer ({name})", "child": f"child workflow '{name}'",
            "side_effect": "side effect", "patch": f"patch marker '{name}'"}.get(kind, f"{kind} '{name}'")


def _json(value: Any, what: str) -> Any:
    """``value`` as the JSON document it becomes on the wire; raises TypeError into workflow code."""
    try:
        return orjson.loads(orjson.dumps(value))
    except TypeError as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from None


def _policy(retry: Any, timeouts: dict[str, Any], default_retry: Optional[JSONDict]) -> Optional[JSONDict]:
    """An activity's ``{"retry": ..., "timeout": ...}`` as validated JSON, or None for no policy."""
    out: JSONDict = {}
    if isinstance(retry, RetrySpec):
        retry = retry.model_dump(mode="json", exclude_defaults=True)
    elif retry is not None and not isinstance(retry, dict):
        raise TypeError(f"retry must be a dict of retry policy fields or a RetrySpec, not {type(retry).__name__}")
    retry = default_retry if retry is None else retry
    if retry is not None:
        RetrySpec.model_validate(retry)
        out["retry"] = _json(retry, "a retry policy")
    given = {k: (v.total_seconds() if isinstance(v, timedelta) else v) for k, v in timeouts.items() if v is not None}
    if given:
        TimeoutSpec.model_validate(given)
        out["timeout"] = given
    return out or None


def _on_failure(value: Any) -> JSONDict:
    """An activity's ``on_failure`` option as validated JSON; only incidents (catch errors in code)."""
    spec = OnFailureSpec.model_validate(value)
    if spec.incident is None:
        raise ValueError("a code workflow's on_failure is 'incident' or {'incident': {...}}: to skip, catch "
                         "ActivityError where the activity is awaited")
    return {"incident": spec.incident.model_dump(mode="json", exclude_none=True)}


def _ms(duration: float | timedelta) -> int:
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    if seconds < 0:
        raise ValueError(f"expected a non-negative duration, but got {seconds}s")
    return int(seconds * 1000)


# -- the context handed to workflow code ---------------------------------------------------------
class WorkflowContext:
    """What a code workflow may do. Every method is deterministic under replay."""

    def __init__(self, machine: Machine) -> None:
        self._m = machine

    @property
    def instance_id(self) -> str:
        return self._m.instance_id

    @property
    def workflow(self) -> str:
        return self._m.definition.name

    @property
    def is_replaying(self) -> bool:
        """True while the machine is re-running recorded history (e.g. to skip logging)."""
        return not self._m.live

    def activity(self, name: str, input: Any = None, queue: str = "default", *,
                 retry: Any = None, start_to_close: Any = None, schedule_to_close: Any = None,
                 heartbeat: Any = None, priority: Optional[str] = None, on_failure: Any = None,
                 fairness_key: Optional[str] = None) -> Awaitable[Any]:
        """Schedule activity ``name`` now; await its result.

        Args:
            retry: A retry policy (``{"initial": "1s", "backoff": 2.0, "max_interval": "1m",
                "max_attempts": 5, "jitter": 0.1, "non_retryable": ["CardDeclined"]}`` or a
                ``RetrySpec``); defaults to the workflow's ``retry=``, else one attempt.
            start_to_close / schedule_to_close / heartbeat: Timeouts (seconds, ``timedelta`` or
                ``"30s"``), each a durable timer; a timeout fails the attempt with ``ActivityTimeout``.
            priority: The level its tasks are dispatched at (``"critical"`` .. ``"background"``);
                defaults to the instance's.
            on_failure: ``"incident"`` or ``{"incident": {"role": "ops", "instructions": "...",
                "timeout": "4h"}}``: once the retries are exhausted, the instance stays open with
                an incident (status INCIDENT) instead of raising here, until an operator resolves it:
                ``retry`` runs the activity again (the await goes on waiting), ``skip`` makes the
                given output its result, ``fail`` raises the activity's error here; an unresolved
                incident's ``timeout`` raises ``ActivityError(type="IncidentTimeout")`` here.
            fairness_key: The key a saturated worker shares the queue and level fairly across
                (e.g. a customer id); defaults to the instance's tenant.

        Raises:
            ActivityError: the activity failed for good; ``.type``, ``.message``, ``.attempt``.
            ValueError: ``priority`` is not one of the five levels, or ``on_failure`` is not an incident.
        """
        policy = _policy(retry, {"start_to_close": start_to_close, "schedule_to_close": schedule_to_close,
                                 "heartbeat": heartbeat}, self._m.definition.retry)
        if on_failure is not None:
            policy = {**(policy or {}), "on_failure": _on_failure(on_failure)}
        return self._m.schedule_activity(name, input, queue, policy, priority=priority_level(priority),
                                         fairness_key=None if fairness_key is None else str(fairness_key))

    def local_activity(self, name: str, input: Any = None, *, retry: Any = None,
                       start_to_close: Any = None, schedule_to_close: Any = None) -> Awaitable[Any]:
        """Run activity ``name`` inside the engine process; await its result.

        The engine (started with ``--activities MODULE``) runs the function itself and records its
        result in the same transaction as the decision that scheduled it: no task topic, no
        worker round trip. The events are those of :meth:`activity`. For short work only: the
        engine waits for it. Execution is at-least-once (an engine crash re-runs it), recording
        exactly once.

        Args:
            retry: As for :meth:`activity`; a retry after its backoff waits on a durable timer.
            start_to_close: Bounds one in-process run (seconds, ``timedelta`` or ``"2s"``); a run
                exceeding it fails the attempt with ``ActivityTimeout``.
            schedule_to_close: A durable timer spanning every attempt.

        Raises:
            ActivityError: the activity failed for good (``UnknownActivity`` when the engine does
                not have it).
        """
        policy = _policy(retry, {"start_to_close": start_to_close, "schedule_to_close": schedule_to_close},
                         self._m.definition.retry)
        return self._m.schedule_activity(name, input, "default", policy, local=True)

    def gather(self, *aws: Awaitable[Any]) -> Awaitable[list[Any]]:
        """Await several operations or coroutines concurrently; results in argument order."""
        return self._m.gather(aws)

    def sleep(self, duration: float | timedelta) -> Awaitable[None]:
        """A durable timer: seconds (float) or a ``timedelta``."""
        return self._m.start_timer(_ms(duration), "sleep")

    def wait_signal(self, name: str, timeout: float | timedelta | None = None) -> Awaitable[Any]:
        """The data of the next signal ``name`` (buffered ones first); raises ``WorkflowError(type="Timeout")``."""
        return self._m.wait_signal(name, None if timeout is None else _ms(timeout))

    def wait_condition(self, predicate: Callable[[], bool], timeout: float | timedelta | None = None) -> Awaitable[None]:
        """Wait until ``predicate()`` is true (checked after every step of the workflow, e.g. after a
        signal handler changed a variable); raises ``WorkflowError(type="Timeout")`` after ``timeout``."""
        return self._m.wait_condition(predicate, None if timeout is None else _ms(timeout))

    def child(self, workflow: str, input: Any = None, id: Optional[str] = None,
              version: Optional[int] = None) -> Awaitable[Any]:
        """Start child workflow ``workflow`` (code or spec); await its result."""
        return self._m.start_child(workflow, input, id, version)

    def now(self) -> datetime:
        """The time of the input event being processed (UTC), identical on replay."""
        return datetime.fromtimestamp(self._m.now / 1000, tz=UTC)

    def random(self) -> float:
        """A float in [0, 1) from a generator seeded by the instance; the same sequence on replay."""
        return int.from_bytes(self._m.entropy()[:8], "big") / 2**64

    def uuid4(self) -> uuid.UUID:
        """A version-4 UUID from the instance's seeded generator."""
        return uuid.UUID(bytes=self._m.entropy()[:16], version=4)

    def side_effect(self, fn: Callable[[], Any]) -> Awaitable[Any]:
        """Run ``fn`` once (outside the sandbox); its JSON result is recorded and returned on replay."""
        return self._m.side_effect(fn)

    def patched(self, change_id: str) -> bool:
        """True for instances that reached this point after the change was deployed."""
        return self._m.patched(change_id)

    def set_priority(self, level: Union[str, int], reason: str = "") -> None:
        """Change this instance's priority (``critical``..``background`` or 1..5) from here on.

        Recorded like any workflow operation: the engine applies it as ``PriorityChanged`` (the
        same as ``kflow priority ID LEVEL``), so work dispatched afterwards, and work still waiting
        for a permit, uses the new level. Raises ``ValueError`` for an unknown level.
        """
        self._m.set_priority(level, reason)

    def set_query_handler(self, name: str, fn: Callable[..., Any]) -> None:
        """Answer query ``name`` with ``fn(*args)``: a read-only view of the workflow's variables."""
        self._m.queries[name] = fn

    def set_signal_handler(self, name: str, fn: Callable[[Any], Any]) -> None:
        """Call ``fn(data)`` for every signal ``name`` (instead of buffering it for ``wait_signal``).

        ``fn`` may be a plain function or an ``async`` one (run as a workflow task).
        """
        self._m.signal_handlers[name] = fn
        for data in self._m.signal_buffer.pop(name, []):
            self._m.call_signal_handler(name, data)

    def set_update_handler(self, name: str, fn: Callable[[Any], Any],
                           validator: Optional[Callable[[Any], Any]] = None) -> None:
        """Run ``fn(data)`` for every accepted update ``name``; what it returns answers the caller.

        ``fn`` may be a plain function or an ``async`` one (run as a workflow task: it may await
        activities, timers and signals, and the caller is answered when it returns); an error it
        raises is the caller's answer (``UpdateFailedError``), not the workflow's failure.
        ``validator(data)``, if given, runs before the update is accepted, on the workflow as it
        is: raising (or returning False) rejects it and nothing is written to the history. A
        validator must only read the workflow's variables, like a query handler.
        """
        self._m.update_handlers[name] = (fn, validator)

    def saga(self) -> Saga:
        """A saga: register compensations as steps complete, run them newest first on failure.

        Example:
            >>> async with ctx.saga() as saga:  # doctest: +SKIP
            ...     await ctx.activity("payment.charge", order)
            ...     saga.add_compensation("payment.refund", order)
            ...     await ctx.activity("inventory.reserve", order)  # fails -> refund runs
        """
        return Saga(self, self._m)

    def continue_as_new(self, input: Any = None) -> NoReturn:
        """End this run and start a fresh one of the workflow (its latest version) under the same
        id, with ``input`` and an empty history. Pending activities, timers and children of this
        run are cancelled. Call it before the history limit is reached (see ``history_length``).
        """
        raise ContinueAsNew(_json(input, "the input of continue_as_new"))

    @property
    def run_number(self) -> int:
        """1 for the first run of this instance, +1 for each ``continue_as_new``."""
        return self._m.run_number

    @property
    def history_length(self) -> int:
        """Events recorded for this run so far (the history limit counts these)."""
        return self._m.history_length

    @property
    def continue_as_new_suggested(self) -> bool:
        """True once the run's history passed 80% of the engine's history limit."""
        return self._m.history_length >= 0.8 * self._m.history_limit

    def upsert_search_attributes(self, attributes: dict[str, Any]) -> None:
        """Set search attributes of this instance (visible in its state and the visibility store).

        A value of None removes the attribute.
        """
        self._m.upsert_search(_json(attributes, "search attributes"))


class Saga:
    """Compensations registered by a code workflow, run in reverse order by :meth:`compensate`.

    As an ``async with`` block it compensates when the block raises (including on cancellation)
    and re-raises the error.
    """

    def __init__(self, ctx: WorkflowContext, machine: Machine) -> None:
        self._ctx, self._machine = ctx, machine
        self._steps: list[tuple[Any, Any, dict[str, Any]]] = []
        self.errors: list[BaseException] = []

    def add_compensation(self, compensation: Any, input: Any = None, **activity_options: Any) -> None:
        """Register an undo step: an activity name (run with ``input`` and ``activity_options``
        such as ``queue=`` or ``retry=``) or a zero-argument function returning an awaitable."""
        if not (isinstance(compensation, str) or callable(compensation)):
            raise TypeError(f"a compensation is an activity name or a callable, not {type(compensation).__name__}")
        self._steps.append((compensation, input, activity_options))

    async def compensate(self) -> list[BaseException]:
        """Run the registered compensations newest first, each once; a failing one is recorded in
        :attr:`errors` and the rest still run. Returns the errors (empty when all succeeded)."""
        while self._steps:
            comp, input_, opts = self._steps.pop()
            try:
                if isinstance(comp, str):
                    await self._ctx.activity(comp, input_, **opts)
                else:
                    await comp()
            except Exception as e:  # a compensation's failure must not stop the others
                self.errors.append(e)
        self._machine.compensation_done(bool(self.errors))
        return list(self.errors)

    async def __aenter__(self) -> Saga:
        return self

    async def __aexit__(self, et: Any, exc: Any, tb: Any) -> bool:
        if isinstance(exc, Exception):
            await self.compensate()
        return False


# -- the machine ---------------------------------------------------------------------------------
class Machine:
    """One live workflow coroutine plus the futures it waits on."""

    def __init__(self, definition: CodeDefinition, instance_id: str, recorded: list[list[Any]]) -> None:
        self.definition = definition
        self.instance_id = instance_id
        self.ctx = WorkflowContext(self)
        #: replaying: the run's recorded commands, checked in order; live: where issued ones are appended
        self.recorded = recorded
        self.cursor = 0
        self.live = False
        self.run: Optional[Run] = None
        self.now = 0
        self.seed = ""
        self.draws = 0
        self.ready: deque[_Task] = deque()
        self.root: Optional[_Task] = None
        self.ops: dict[str, tuple[str, _Future]] = {}
        self.signal_waiters: dict[str, list[tuple[_Future, Optional[str]]]] = {}
        self.signal_buffer: dict[str, list[Any]] = {}
        self.patches: dict[str, bool] = {}
        self.queries: dict[str, Callable[..., Any]] = {}
        self.signal_handlers: dict[str, Callable[[Any], Any]] = {}
        self.update_handlers: dict[str, tuple[Callable[[Any], Any], Optional[Callable[[Any], Any]]]] = {}
        self.run_number = 1
        self.history_length = 0
        self.history_limit = limits_of(None).max_history_events
        self.cancelled = False
        #: set while a retry replays the kept history: the state whose tables the commands rebuild
        self.restoring: Optional[JSONDict] = None
        self.conditions: list[tuple[Callable[[], bool], _Future, Optional[str]]] = []
        sandbox = definition.sandbox
        self.sandbox_guard: Callable[[], Any] = sandbox if sandbox is not None else nullcontext
        self._pause: Callable[[], Any] = getattr(sandbox, "paused", nullcontext) if sandbox is not None else nullcontext

    # -- commands: replay checks them against history, live mode records them ------------------
    def _issue(self, kind: str, name: str, live: Callable[[], Any],
               restore: Optional[Callable[[JSONDict, Any], None]] = None) -> Any:
        n = self.cursor
        self.cursor += 1
        if not self.live:
            rec = self.recorded[n] if n < len(self.recorded) else None
            if rec is None or rec[0] != kind or (rec[1] is not None and rec[1] != name):
                raise ReplayMismatch(n, _describe(rec), _describe([kind, name]))
            if restore is not None and self.restoring is not None and not isinstance(rec[2], dict):
                restore(self.restoring, rec[2])  # a retry rebuilds the state entry the command made
            return rec[2]
        try:
            value = live()
        except LimitExceeded as e:  # recorded, so replay raises it at the same point
            value = {"$error": ["LimitExceeded", e.message]}
        self.recorded.append([kind, name, value])
        return value

    def _live_run(self) -> Run:
        if self.run is None:
            # A parked coroutine being closed (evicted, or its instance ended) runs its ``finally``
            # blocks; a ctx operation there must not do anything, so end the close quietly.
            raise GeneratorExit
        return self.run

    def schedule_activity(self, name: str, input_: Any, queue: str, policy: Optional[JSONDict] = None,
                          local: bool = False, priority: Optional[int] = None,
                          fairness_key: Optional[str] = None) -> _Future:
        input_ = _json(input_, f"the input of activity '{name}'")

        def live() -> str:
            run = self._live_run()
            aid = f"{name}-{run.next_seq()}"
            activities.schedule(run, aid, name, queue, input_, "code", name, policy, local=local, priority=priority,
                                fairness_key=fairness_key)
            return aid

        def restore(st: JSONDict, aid: str) -> None:
            act: JSONDict = {"name": name, "queue": queue, "attempt": 1, "thread": "code", "step": name,
                             "input": input_, "phase": "scheduled", "timers": {}}
            if policy is not None:
                act["policy"] = policy
            if local:
                act["local"] = True
            if priority is not None:
                act[PRIORITY] = priority
            if fairness_key is not None:
                act[activities.FAIRNESS_KEY] = fairness_key
            st["activities"][aid] = act

        aid = self._issue("activity", name, live, restore)
        fut = _Future()
        if isinstance(aid, dict):
            fut.set_error(WorkflowError(aid["$error"][1], type=aid["$error"][0]))
        else:
            self.ops[aid] = ("activity:" + name, fut)
        return fut

    def _timer(self, ms: int, purpose: str) -> str:
        def live() -> str:
            return activities.start_timer(self._live_run(), "code", self.now + ms, purpose)

        def restore(st: JSONDict, tid: str) -> None:
            st["timers"][tid] = {"due": self.now + ms, "thread": "code", "purpose": purpose}

        tid = self._issue("timer", purpose, live, restore)
        if isinstance(tid, dict):
            raise WorkflowError(tid["$error"][1], type=tid["$error"][0])
        return str(tid)

    def start_timer(self, ms: int, purpose: str) -> _Future:
        tid = self._timer(ms, purpose)
        fut = _Future()
        self.ops[tid] = ("sleep", fut)
        return fut

    def wait_signal(self, name: str, timeout_ms: Optional[int]) -> _Future:
        fut = _Future()
        buffered = self.signal_buffer.get(name)
        if buffered:
            fut.set_result(buffered.pop(0))
            return fut
        tid = self._timer(timeout_ms, f"signal:{name}") if timeout_ms is not None else None
        if tid is not None:
            self.ops[tid] = ("signal:" + name, fut)
        self.signal_waiters.setdefault(name, []).append((fut, tid))
        return fut

    def start_child(self, workflow: str, input_: Any, child_id: Optional[str], version: Optional[int]) -> _Future:
        fut = _Future()
        input_ = _json(input_, f"the input of child workflow '{workflow}'")

        def live() -> Any:
            run = self._live_run()
            v = version if version is not None else run.defs.latest(workflow)
            if v is None or run.defs.get(workflow, v) is None:
                return None
            cid = child_id or f"{self.instance_id}:{workflow}-{run.next_seq()}"
            run.emit("ChildStarted", {"child_id": cid, "workflow": workflow, "version": v, "input": input_})
            run.state["children"][cid] = {"thread": "code", "step": workflow}
            run.command("StartWorkflow", cid, {"workflow": workflow, "version": v, "input": input_,
                                               "parent_id": self.instance_id, "parent_ref": cid, "id_reuse": None,
                                               "priority": run.priority()})
            return cid

        def restore(st: JSONDict, cid: Any) -> None:
            if cid is not None:
                st["children"][cid] = {"thread": "code", "step": workflow}

        cid = self._issue("child", workflow, live, restore)
        if isinstance(cid, dict):
            fut.set_error(WorkflowError(cid["$error"][1], type=cid["$error"][0]))
        elif cid is None:
            what = workflow if version is None else f"{workflow}@{version}"
            fut.set_error(WorkflowError(f"no deployed workflow named '{what}'", type="UnknownWorkflow"))
        else:
            self.ops[cid] = ("child:" + workflow, fut)
        return fut

    def side_effect(self, fn: Callable[[], Any]) -> _Future:
        def live() -> Any:
            with self._pause():
                value = fn()
            return _json(value, "a side effect's value")

        fut = _Future()
        fut.set_result(self._issue("side_effect", "", live))
        return fut

    def set_priority(self, level: Union[str, int], reason: str) -> None:
        number = priority_level(level)
        if number is None:
            raise ValueError("a priority level is needed: critical, high, normal, low, background or 1-5")

        def live() -> Any:
            run = self._live_run()
            # Work this decision still dispatches already takes the new level; the command makes
            # it history (PriorityChanged), which sets the same level when the engine applies it.
            run.state[PRIORITY] = number
            run.command("SetPriority", self.instance_id, {"priority": number, "reason": reason or "ctx.set_priority"})
            return number

        self._issue("set_priority", str(number), live)

    def patched(self, change_id: str) -> bool:
        if change_id in self.patches:
            return self.patches[change_id]
        if self.live:
            self._issue("patch", change_id, lambda: True)
            found = True
        else:
            rec = self.recorded[self.cursor] if self.cursor < len(self.recorded) else None
            found = rec is not None and rec[0] == "patch" and rec[1] == change_id
            if found:
                self.cursor += 1
        self.patches[change_id] = found
        return found

    def wait_condition(self, predicate: Callable[[], bool], timeout_ms: Optional[int]) -> _Future:
        fut = _Future()
        if predicate():
            fut.set_result(None)
            return fut
        tid = self._timer(timeout_ms, "condition") if timeout_ms is not None else None
        if tid is not None:
            self.ops[tid] = ("condition", fut)
        self.conditions.append((predicate, fut, tid))
        return fut

    def _check_conditions(self) -> None:
        for entry in list(self.conditions):
            predicate, fut, tid = entry
            if fut.done:
                self.conditions.remove(entry)
            elif predicate():
                self.conditions.remove(entry)
                if tid is not None:
                    self.ops.pop(tid, None)
                    if self.live:
                        self._live_run().state["timers"].pop(tid, None)
                    elif self.restoring is not None:
                        self.restoring["timers"].pop(tid, None)
                fut.set_result(None)

    def call_signal_handler(self, name: str, data: Any) -> None:
        result = self.signal_handlers[name](data)
        if isinstance(result, Coroutine):
            self._spawn(result)

    def call_update_handler(self, update_id: str, name: str, data: Any) -> None:
        """Run the handler of an accepted update; its answer is recorded when it returns."""
        entry = self.update_handlers.get(name)
        if entry is None:  # validation saw one; only a handler removed since can get here
            self._update_done(update_id, {"error": {"type": "UnknownUpdate",
                                                    "message": f"no handler for update '{name}'"}})
            return
        try:
            with self.sandbox_guard():
                result = entry[0](data)
        except ContinueAsNew:
            self._update_done(update_id, {"error": {"type": "InvalidUpdateHandler", "message": (
                f"update handler '{name}' called continue_as_new; only the workflow's run may")}})
            return
        except Exception as e:  # the handler's error is the caller's answer, not the workflow's
            self._update_done(update_id, _error_answer(e))
            return
        if isinstance(result, Coroutine):
            task = _Task(result)
            self.ready.append(task)
            task.future.on_done(lambda: self._update_done(
                update_id, _error_answer(task.future.error) if task.future.error is not None
                else _result_answer(task.future.value, name)))
        else:
            self._update_done(update_id, _result_answer(result, name))

    def _update_done(self, update_id: str, answer: JSONDict) -> None:
        # Only a live machine answers: a replayed handler finished in a decision already recorded.
        if self.live and self.run is not None:
            self.run.answer_update(update_id, answer)

    def compensation_done(self, failed: bool) -> None:
        if self.live:
            self._live_run().state["compensation"] = "failed" if failed else "completed"

    def upsert_search(self, attributes: JSONDict) -> None:
        if self.live:
            search = self._live_run().state.setdefault("search", {})
            for k, v in attributes.items():
                if v is None:
                    search.pop(k, None)
                else:
                    search[k] = v

    def cancel(self) -> None:
        """Fail every pending operation with :class:`CancelledError` (in the order they were issued)."""
        self.cancelled = True
        ops, self.ops = self.ops, {}
        for _label, fut in ops.values():
            fut.set_error(CancelledError())
        conditions, self.conditions = self.conditions, []
        for _p, fut, _tid in conditions:
            fut.set_error(CancelledError())
        waiters, self.signal_waiters = self.signal_waiters, {}
        for name in waiters:
            for fut, _tid in waiters[name]:
                fut.set_error(CancelledError())

    def entropy(self) -> bytes:
        self.draws += 1
        return hashlib.sha256(f"{self.seed}|{self.draws}".encode()).digest()

    def gather(self, aws: tuple[Awaitable[Any], ...]) -> _Future:
        futures = [a if isinstance(a, _Future) else self._spawn(a) for a in aws]
        out = _Future()
        if not futures:
            out.set_result([])
            return out
        pending = [len(futures)]

        def one_done(f: _Future) -> None:
            if f.error is not None:
                out.set_error(f.error)
                return
            pending[0] -= 1
            if pending[0] == 0:
                out.set_result([x.value for x in futures])

        for f in futures:
            f.on_done(lambda f=f: one_done(f))  # type: ignore[misc]
        return out

    def _spawn(self, aw: Any) -> _Future:
        if not isinstance(aw, Coroutine):
            raise TypeError(f"ctx.gather accepts ctx operations and coroutines, not {type(aw).__name__}")
        task = _Task(aw)
        self.ready.append(task)
        return task.future

    # -- stepping --------------------------------------------------------------------------------
    def _step(self, task: _Task) -> None:
        try:
            with self.sandbox_guard():
                yielded = task.coro.send(None)
        except StopIteration as stop:
            task.future.set_result(stop.value)
            return
        except (Exception, ContinueAsNew) as e:  # the workflow's own exception decides its outcome
            task.future.set_error(e)
            return
        if not isinstance(yielded, _Future):
            task.coro.close()
            task.future.set_error(TypeError(
                f"workflow code awaited {type(yielded).__name__}; only ctx operations (and coroutines "
                "awaiting them) can be awaited in a workflow"))
            return
        yielded.on_done(lambda: self.ready.append(task))

    def _run_ready(self) -> None:
        while True:
            while self.ready:
                self._step(self.ready.popleft())
                if self.root is not None and self.root.future.done:
                    return
            if not self.conditions:
                return
            with self.sandbox_guard():
                self._check_conditions()
            if not self.ready:
                return

    def deliver(self, type_: str, data: JSONDict, ts: int, seq: int, input_: Any = None) -> None:
        """Resolve what one input event resolves, then run every task until all are blocked."""
        self.now = ts
        if type_ == "WorkflowStarted":
            self.seed = f"{self.instance_id}|{seq}"
            self.root = _Task(self.definition.fn(self.ctx, data.get("input")))
            self.ready.append(self.root)
        elif type_ in ("ActivityCompleted", "ActivityFailed", "ChildCompleted", "ChildFailed"):
            key = data.get("activity_id") or data.get("child_id")
            op = self.ops.pop(key, None) if key is not None else None
            if op is None:
                raise ReplayMismatch(self.cursor, f"a {type_} for '{key}'", "code that never scheduled it")
            label, fut = op
            if type_.endswith("Completed"):
                fut.set_result(data.get("result"))
            else:
                if type_ == "ActivityFailed":
                    fut.set_error(ActivityError(f"activity '{label[9:]}' failed: {data.get('message', '')}",
                                                type=data["error_type"], attempt=data.get("attempt", 0),
                                                activity=label[9:]))
                else:
                    fut.set_error(WorkflowError(f"child workflow {key} failed: {data.get('message', '')}",
                                                type=data["error_type"]))
        elif type_ == "TimerFired":
            op = self.ops.pop(data["timer_id"], None)
            if op is not None:
                label, fut = op
                if label == "sleep":
                    fut.set_result(None)
                elif label == "condition":
                    fut.set_error(WorkflowError("the condition did not become true in time", type="Timeout"))
                else:
                    name = label[7:]
                    waiters = self.signal_waiters.get(name, [])
                    self.signal_waiters[name] = [w for w in waiters if w[0] is not fut]
                    fut.set_error(WorkflowError(f"no signal '{name}' arrived in time", type="Timeout"))
        elif type_ == "CancelRequested":
            self.cancel()
        elif type_ == "UpdateAccepted":
            self.call_update_handler(data["update_id"], data["name"], data.get("data"))
        elif type_ == "SignalReceived" and data["name"] in self.signal_handlers:
            self.call_signal_handler(data["name"], data.get("data"))
        elif type_ == "SignalReceived":
            name = data["name"]
            queue = self.signal_waiters.get(name)
            if queue:
                fut, tid = queue.pop(0)
                if tid is not None:
                    self.ops.pop(tid, None)
                    if self.live:
                        self._live_run().state["timers"].pop(tid, None)
                    elif self.restoring is not None:
                        self.restoring["timers"].pop(tid, None)
                fut.set_result(data.get("data"))
            else:
                self.signal_buffer.setdefault(name, []).append(data.get("data"))
        self._run_ready()

    @property
    def finished(self) -> bool:
        return self.root is not None and self.root.future.done


# -- the cache of live machines ------------------------------------------------------------------
class ReplayCache:
    """A bounded LRU of live machines, keyed by instance and the exact position they reflect.

    A machine is taken out while it is used, so a stale machine (e.g. one advanced inside an
    aborted transaction) is never resumed: its key no longer matches the committed state and the
    instance is rebuilt by replay instead. A lock keeps the table consistent when several engines
    share a process (tests, the dev stack); each instance belongs to one engine at a time.
    """

    def __init__(self, max_size: int = 10_000) -> None:
        self.max_size = max_size
        self._items: OrderedDict[str, tuple[tuple[Any, ...], Machine]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def take(self, instance_id: str, key: tuple[Any, ...]) -> Optional[Machine]:
        with self._lock:
            item = self._items.pop(instance_id, None)
        if item is not None and item[0] == key:
            self.hits += 1
            return item[1]
        self.misses += 1
        return None

    def put(self, instance_id: str, key: tuple[Any, ...], machine: Machine) -> None:
        if self.max_size <= 0:
            return
        with self._lock:
            self._items[instance_id] = (key, machine)
            self._items.move_to_end(instance_id)
            while len(self._items) > self.max_size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


#: The process-wide cache; ``CACHE.max_size = 0`` disables it (every input then replays).
CACHE = ReplayCache()


def _key(seq: int, st: JSONDict) -> tuple[Any, ...]:
    """Where a machine stands: the instance's seq, its journal counts and the digest of its inputs."""
    return (seq, st[INPUT_COUNT], st[COMMAND_COUNT], st[INPUTS_DIGEST])


# -- the journal of the current run ----------------------------------------------------------------
def open_journal(st: JSONDict) -> None:
    """Start the journal counters of a new run at zero."""
    st[INPUT_COUNT], st[COMMAND_COUNT], st[DELIVERED], st[INPUTS_DIGEST] = 0, 0, 0, ""


def _digest(prev: str, entry: list[Any]) -> str:
    return hashlib.blake2b(prev.encode() + orjson.dumps(entry), digest_size=8).hexdigest()


def append_input(run: Run, entry: list[Any]) -> None:
    """Journal ``entry`` as the run's next input."""
    st = run.state
    run.journal_ops.append(Append(st["id"], st.get("run", 1), INPUT, st[INPUT_COUNT], entry))
    st[INPUT_COUNT] += 1
    st[INPUTS_DIGEST] = _digest(st[INPUTS_DIGEST], entry)


def append_commands(run: Run, entries: Entries) -> None:
    """Journal ``entries`` as the run's next commands."""
    st = run.state
    number = st.get("run", 1)
    for entry in entries:
        run.journal_ops.append(Append(st["id"], number, COMMAND, st[COMMAND_COUNT], entry))
        st[COMMAND_COUNT] += 1


def _migrate(run: Run) -> None:
    """Move the history lists of a state written before the journal into the journal (once)."""
    st = run.state
    if INPUTS not in st:
        return
    inputs, commands, delivered = st.pop(INPUTS), st.pop(COMMANDS), st[DELIVERED]
    open_journal(st)
    for entry in inputs:
        append_input(run, entry)
    append_commands(run, commands)
    st[DELIVERED] = delivered


def end_journal(run: Run) -> None:
    """The current run's history is no longer needed (it closed or continued as new): delete its
    journal entries and drop the journal fields from the state."""
    st = run.state
    if INPUT_COUNT in st:
        run.journal_ops.append(Reset(st["id"], st.get("run", 1), st[INPUT_COUNT], st[COMMAND_COUNT]))
    for name in _JOURNAL_FIELDS:
        st.pop(name, None)


def _counted(st: JSONDict, inputs: Entries, commands: Entries) -> tuple[Entries, Entries]:
    """The first entries the state counts; fewer than that means this is not the instance's journal."""
    n_inputs, n_commands = st[INPUT_COUNT], st[COMMAND_COUNT]
    if len(inputs) < n_inputs or len(commands) < n_commands:
        raise HistoryUnavailable(st["id"], f"its state counts {n_inputs} inputs and {n_commands} commands of run "
                                           f"{st.get('run', 1)}, but the journal holds {len(inputs)} and "
                                           f"{len(commands)} (ask the engine that owns it: Client.query)")
    del inputs[n_inputs:], commands[n_commands:]
    return inputs, commands


def run_history(run: Run, journaled: bool) -> tuple[Entries, Entries]:
    """The current run's inputs and commands: the journal (when entries of it were ``journaled``
    before this decision), plus what this decision appended."""
    st = run.state
    iid, number = st["id"], st.get("run", 1)
    inputs, commands = run.journal.read(iid, number) if journaled else ([], [])
    apply_to(inputs, commands, run.journal_ops, iid, number)
    return _counted(st, inputs, commands)


def history_of(state: JSONDict, journal: Optional[Journal] = None) -> tuple[Entries, Entries]:
    """The recorded (inputs, commands) of an instance's current run, read from ``journal`` (the
    process's in-memory journal by default), or from the state itself when it predates the journal.

    Raises:
        HistoryUnavailable: the instance is closed (its history is deleted at close), or the
            journal does not hold its history.
    """
    if INPUTS in state:
        return state[INPUTS], state[COMMANDS]
    if INPUT_COUNT not in state:
        raise HistoryUnavailable(state["id"], f"it is {state['status']}, and the history of a code workflow is "
                                              "kept for replay only while it runs")
    journal = journal if journal is not None else MEMORY
    return _counted(state, *journal.read(state["id"], state.get("run", 1)))


# -- the entry point called by core.evolve -------------------------------------------------------
def _passthrough(st: JSONDict, prev_key: Optional[tuple[Any, ...]]) -> None:
    """An event the coroutine does not see: keep the parked machine, re-keyed to the new position."""
    parked = CACHE.take(st["id"], prev_key) if prev_key is not None else None
    if parked is not None:
        CACHE.put(st["id"], _key(st["seq"], st), parked)


def _input_of(run: Run, ev: Event) -> Optional[list[Any]]:
    """Apply an input event's effect on the state; return what the coroutine must be fed, or None.

    Activity lifecycle events (start reports, heartbeats, retries and timeouts that lead to
    another attempt) are the engine's business, shared with spec workflows; the coroutine only
    sees an activity's final outcome.
    """
    st, d = run.state, ev.data
    if ev.type == "ActivityCompleted":
        activities.drop(run, d["activity_id"])
    elif ev.type == "ActivityFailed":
        aid = d["activity_id"]
        if aid in st["activities"] and activities.retry_or_give_up(run, aid, d["error_type"], d["retryable"]):
            return None
        if _raise_incident(run, aid, d["error_type"], d["message"]):
            return None
        activities.drop(run, aid)
    elif ev.type in ("ActivityStarted", "HeartbeatRecorded"):
        aid = d["activity_id"]
        if aid in st["activities"]:
            (activities.on_started if ev.type == "ActivityStarted" else activities.on_heartbeat)(run, aid)
        return None
    elif ev.type in ("ChildCompleted", "ChildFailed"):
        st["children"].pop(d["child_id"], None)
    elif ev.type == "TimerFired":
        timer = st["timers"].pop(d["timer_id"], None) or {}
        purpose = timer.get("purpose")
        if purpose == "replay":
            return []  # retry a blocked replay; nothing new for the coroutine
        if purpose == "retry":
            activities.on_retry_timer(run, timer["activity"])
            return None
        if purpose == "activity_timeout":
            aid = timer["activity"]
            attempt = st["activities"][aid]["attempt"]
            retrying, message = activities.on_timeout(run, aid, timer["kind"])
            if retrying or _raise_incident(run, aid, "ActivityTimeout", message):
                return None
            activities.drop(run, aid)
            return ["ActivityFailed", {"activity_id": aid, "attempt": attempt, "error_type": "ActivityTimeout",
                                       "message": message, "retryable": False}, ev.ts, ev.seq]
        if purpose == "execution":
            return ["$timeout", {}, ev.ts, ev.seq]
        if purpose == incidents.TIMER_PURPOSE:
            inc, message = incidents.timed_out(run, timer)
            return ["ActivityFailed", {"activity_id": inc["activity"], "attempt": inc["attempts"],
                                       "error_type": "IncidentTimeout", "message": message, "retryable": False},
                    ev.ts, ev.seq]
    elif ev.type == "IncidentResolved":
        return _incident_resolved(run, ev)
    elif ev.type == "CancelRequested":
        st["status"] = Status.CANCELLING
        st["cancel_reason"] = d.get("reason", "")
        for child_id in sorted(st["children"]):
            run.command("CancelWorkflow", child_id, {"reason": f"parent {st['id']} is cancelling"})
        run.cancel_activities()
        st["children"] = {}
        st["timers"] = {t: v for t, v in st["timers"].items() if v.get("purpose") == "execution"}
    elif ev.type not in WORKFLOW_INPUTS:
        return None
    return [ev.type, d, ev.ts, ev.seq]


def _raise_incident(run: Run, aid: str, error_type: str, message: str) -> bool:
    """An activity failed for good: open an incident instead when its ``on_failure`` asks for one.

    The activity leaves the activities table (a late result for it is rejected) and travels in
    the incident, so that a retry can schedule its next attempt under the same id: the workflow's
    await is not fed until the incident is resolved as skip or fail, or times out.
    """
    act = run.state["activities"].get(aid)
    spec = ((act or {}).get("policy") or {}).get("on_failure", {}).get("incident")
    if act is None or spec is None:
        return False
    activities.drop(run, aid)
    text = f"activity '{act['name']}' failed: {message}"
    incidents.open_incident(run, f"{act['name']}-{run.next_seq()}", "code", act["name"], aid, act, error_type, text,
                            IncidentSpec.model_validate(spec), record=act)
    return True


def _incident_resolved(run: Run, ev: Event) -> Optional[list[Any]]:
    """What resolving an incident feeds the workflow: nothing for a retry (the activity's next attempt
    is scheduled), the output as the activity's result for a skip, its error for a fail."""
    d = ev.data
    inc = incidents.close_incident(run, d["incident_id"])
    aid, attempt = inc["activity"], inc["attempts"]
    if d["action"] == "retry":
        activities.reopen(run, aid, inc["record"], incidents.patched_input(inc, d.get("input_patch")))
        return None
    if d["action"] == "skip":
        return ["ActivityCompleted", {"activity_id": aid, "attempt": attempt, "result": d.get("output")}, ev.ts, ev.seq]
    return ["ActivityFailed", {"activity_id": aid, "attempt": attempt, "error_type": inc["error"]["type"],
                               "message": incidents.fail_message(inc, d), "retryable": False}, ev.ts, ev.seq]


def apply_input(run: Run, ev: Event) -> None:
    """Deliver one input event to a code workflow, replaying its history first when needed."""
    st = run.state
    definition: Optional[CodeDefinition] = run.compiled
    # a new run, or one whose history was inside its state, has nothing in the journal to read
    journaled = ev.type != "WorkflowStarted" and INPUTS not in st
    if ev.type == "WorkflowStarted":
        open_journal(st)
        if definition is not None and definition.execution_timeout_ms is not None:
            activities.start_timer(run, None, run.now + definition.execution_timeout_ms, "execution")
    else:
        _migrate(run)
    # core has already stamped the state with this event's seq; the machine was parked one before.
    prev_key = _key(ev.seq - 1, st) if st[INPUT_COUNT] else None
    fed = _input_of(run, ev)
    if fed is None:
        _passthrough(st, prev_key)
        _check_history(run)
        return
    if fed and fed[0] == "$timeout":
        run.fail("WorkflowTimeout", f"the workflow did not finish within {definition.execution_timeout_ms / 1000:g}s"
                 if definition is not None and definition.execution_timeout_ms else "the workflow timed out")
        return
    if fed:
        append_input(run, fed)
    if definition is None:
        _block(run, NondeterminismError(st["id"], st[DELIVERED], f"code workflow '{st['workflow']}@{st['version']}'",
                                        "no such workflow registered in this engine"))
        return
    machine = None
    if st["status"] in Status.ACTIVE and prev_key is not None:
        machine = CACHE.take(st["id"], prev_key)
    if machine is not None:  # parked right after the previous input: only this one is new
        drive(run, machine, [fed] if fed else [])
        return
    inputs, commands = run_history(run, journaled)
    machine = _rebuild(run, definition, inputs, commands)
    if machine is not None:
        drive(run, machine, inputs[st[DELIVERED]:])


def _rebuild(run: Run, definition: CodeDefinition, inputs: Entries, commands: Entries) -> Optional[Machine]:
    """Replay the delivered inputs into a fresh machine; None (and BLOCKED) on a mismatch."""
    st = run.state
    machine = new_machine(run, definition, commands)
    try:
        for type_, data, ts, seq in inputs[:st[DELIVERED]]:
            machine.deliver(type_, data, ts, seq)
            if machine.finished:
                raise ReplayMismatch(machine.cursor, _describe(commands[machine.cursor]
                                                               if machine.cursor < len(commands) else None)
                                     + " or a wait for input", _outcome(machine))
        if machine.cursor != len(commands):
            raise ReplayMismatch(machine.cursor, _describe(commands[machine.cursor]), "no further command")
    except ReplayMismatch as m:
        _block(run, NondeterminismError(st["id"], m.index, m.expected, m.actual))
        return None
    if st["status"] == Status.BLOCKED:
        _unblock(st)
    return machine


def new_machine(run: Run, definition: CodeDefinition, commands: Entries) -> Machine:
    """A fresh machine for the run, its commands checked against the recorded ``commands``."""
    st = run.state
    machine = Machine(definition, st["id"], commands)
    machine.run_number = st.get("run", 1)
    machine.history_limit = limits_of(run.defs).max_history_events
    return machine


def drive(run: Run, machine: Machine, pending: Entries, depth: int = 0) -> None:
    """Feed the machine the inputs it has not seen, journal the commands it issues, then finish,
    continue or park it."""
    st = run.state
    issued: Entries = []
    machine.live, machine.run, machine.recorded = True, run, issued
    for type_, data, ts, seq in pending:
        machine.history_length = st["seq"] - st.get("run_seq", 0)
        machine.deliver(type_, data, ts, seq)
        if machine.finished:
            break
    st[DELIVERED] = st[INPUT_COUNT]
    append_commands(run, issued)
    machine.run = None
    if not machine.finished:
        CACHE.put(st["id"], _key(st["seq"], st), machine)
        _check_history(run)
        return
    assert machine.root is not None
    err = machine.root.future.error
    if isinstance(err, ContinueAsNew):
        if depth >= MAX_CONTINUATIONS_PER_DECISION:
            run.fail("ContinueAsNewLoop", f"continue_as_new was called {depth} times without awaiting anything")
            return
        _continue_as_new(run, err.input, depth)
    else:
        _finish(run, machine)


def _continue_as_new(run: Run, input_: Any, depth: int) -> None:
    """Close this run's pending work and start the next run of the workflow under the same id."""
    st = run.state
    name = st["workflow"]
    version = run.defs.latest(name) or st["version"]
    definition = run.defs.get(name, version)
    if getattr(definition, "kind", None) != "code":
        version, definition = st["version"], run.compiled
    for child_id in sorted(st["children"]):
        run.command("CancelWorkflow", child_id, {"reason": f"parent {st['id']} continued as new"})
    run.cancel_activities()
    run.abandon_updates(f"'{st['id']}' continued as new before the update's handler finished")
    number = st.get("run", 1) + 1
    run.emit("WorkflowContinuedAsNew", {"input": input_, "run": number, "version": version})
    end_journal(run)
    fresh = new_state(st["id"], name, version, "code", input_, run.now, st.get("parent_id"),
                      st.get("parent_ref"), st["seq"])
    fresh["run"], fresh["run_seq"] = number, st["seq"]
    fresh["runs"] = (st.get("runs") or [])[-9:] + [{"run": number - 1, "version": st["version"],
                                                      "started_ms": st["started_ms"], "input": st["input"],
                                                      "continued_with": input_}]
    for kept in ("search", PRIORITY, UPDATES):  # the next run is the same instance: same attributes, level, updates
        if kept in st:
            fresh[kept] = st[kept]
    st.clear()
    st.update(fresh)
    open_journal(st)
    started = ["WorkflowStarted", {"input": input_}, run.now, st["seq"]]
    append_input(run, started)
    run.compiled = definition
    if definition.execution_timeout_ms is not None:
        activities.start_timer(run, None, run.now + definition.execution_timeout_ms, "execution")
    drive(run, new_machine(run, definition, []), [started], depth + 1)


def _check_history(run: Run) -> None:
    """Fail a run whose history outgrew the engine's limit (it should have continued as new)."""
    st = run.state
    limit = limits_of(run.defs).max_history_events
    if st["status"] in Status.ACTIVE and st["seq"] - st.get("run_seq", 0) > limit:
        run.fail("HistoryLimitExceeded", f"expected at most {limit} events per run, but this run has "
                 f"{st['seq'] - st.get('run_seq', 0)}; call ctx.continue_as_new() before the limit")


def answer_query(definition: CodeDefinition, state: JSONDict, name: str, args: list[Any],
                 journal: Optional[Journal] = None) -> Any:
    """Answer query ``name`` from the instance's live machine (the engine's path, no history written).

    A cached machine at the instance's exact position answers at once; otherwise the instance is
    replayed from ``journal`` (and the rebuilt machine cached, so the next input does not replay again).
    """
    active = state["status"] in Status.ACTIVE
    key = _key(state["seq"], state) if active and state.get(INPUT_COUNT) else None
    machine = CACHE.take(state["id"], key) if key is not None else None
    if machine is None:
        machine = _replayed(definition, state, *history_of(state, journal))
    try:
        return _call_query(machine, definition, name, args)
    finally:
        if key is not None and not machine.finished and machine.cursor == state[COMMAND_COUNT]:
            CACHE.put(state["id"], key, machine)


def validate_update(definition: CodeDefinition, state: JSONDict, name: str, data: Any,
                    journal: Optional[Journal] = None) -> None:
    """Check update ``name`` against the instance's live machine: it has a handler, and its
    validator (if any) neither raises nor returns False. Writes nothing, like a query.

    Raises:
        WorkflowError: ``type`` ``"UnknownUpdate"`` (no handler) or ``"UpdateRejected"`` (the
            validator returned False); whatever the validator raised; a replay error.
    """
    key = _key(state["seq"], state) if state.get(INPUT_COUNT) else None
    machine = CACHE.take(state["id"], key) if key is not None else None
    if machine is None:
        machine = _replayed(definition, state, *history_of(state, journal))
    try:
        entry = machine.update_handlers.get(name)
        if entry is None:
            known = ", ".join(sorted(machine.update_handlers)) or "none"
            raise WorkflowError(f"workflow '{definition.name}' has no update '{name}' (registered: {known})",
                                type="UnknownUpdate")
        if entry[1] is not None:
            try:
                with machine.sandbox_guard():
                    verdict = entry[1](data)
            except (GeneratorExit, ReplayMismatch, ContinueAsNew):  # it issued a command: the machine is not reused
                raise WorkflowError(f"the validator of update '{name}' must only read the workflow's variables, "
                                    "not start activities, timers or other workflow operations",
                                    type="InvalidValidator") from None
            if verdict is False:
                raise WorkflowError(f"the validator of update '{name}' returned False", type="UpdateRejected")
    finally:
        if key is not None and not machine.finished and machine.cursor == state[COMMAND_COUNT]:
            CACHE.put(state["id"], key, machine)


def _error_answer(e: BaseException) -> JSONDict:
    return {"error": {"type": getattr(e, "type", None) or type(e).__name__,
                      "message": str(getattr(e, "message", None) or e)}}


def _result_answer(value: Any, name: str) -> JSONDict:
    try:
        return {"result": orjson.loads(orjson.dumps(value))}
    except TypeError as e:
        return {"error": {"type": "InvalidResult", "message": f"the result of update '{name}' is not JSON: {e}"}}


def _replayed(definition: CodeDefinition, state: JSONDict, inputs: Entries, commands: Entries) -> Machine:
    machine = Machine(definition, state["id"], commands)
    machine.run_number = state.get("run", 1)
    try:
        for type_, data, ts, seq in inputs[:state[DELIVERED]]:
            machine.deliver(type_, data, ts, seq)
            if machine.finished:
                break
    except ReplayMismatch as m:
        raise NondeterminismError(state["id"], m.index, m.expected, m.actual) from None
    return machine


def _call_query(machine: Machine, definition: CodeDefinition, name: str, args: list[Any]) -> Any:
    handler = machine.queries.get(name)
    if handler is None:
        known = ", ".join(sorted(machine.queries)) or "none"
        raise KflowError(f"workflow '{definition.name}' has no query '{name}' (registered: {known})")
    with machine.sandbox_guard():
        value = handler(*args)
    return _json(value, f"the answer to query '{name}'")


def query(definition: CodeDefinition, state: JSONDict, name: str, *args: Any,
          journal: Optional[Journal] = None) -> Any:
    """Rebuild an instance's coroutine by replay and call its query handler ``name``.

    Runs wherever the workflow's code is importable, on the ``internal`` state of the instance's
    ``state`` record and its history: ``journal`` (by default the in-memory journal of this
    process, which holds the instances decided here without a journal of their own, e.g. by the
    test harness), or the state itself when it predates the journal. It never changes the instance.
    An instance decided by an engine elsewhere is asked through that engine (``Client.query``).
    """
    return _call_query(_replayed(definition, state, *history_of(state, journal)), definition, name, list(args))


def _outcome(machine: Machine) -> str:
    assert machine.root is not None
    err = machine.root.future.error
    return "workflow completion" if err is None else f"workflow failure ({type(err).__name__}: {err})"


def _finish(run: Run, machine: Machine) -> None:
    assert machine.root is not None
    fut = machine.root.future
    if fut.error is None:
        try:
            result = orjson.loads(orjson.dumps(fut.value))
        except TypeError as e:
            run.fail("InvalidResult", f"workflow result is not JSON: {e}")
            return
        run.state.pop("cancel_reason", None)
        run.complete(result)
    elif run.state["status"] == Status.CANCELLING:
        run.close(Status.CANCELLED, "WorkflowCancelled", {"reason": run.state.pop("cancel_reason", "")})
    else:
        err = fut.error
        run.fail(getattr(err, "type", None) or type(err).__name__, str(getattr(err, "message", None) or err))


def _block(run: Run, err: NondeterminismError) -> None:
    """Park the instance: BLOCKED with a description and a timer that retries the replay."""
    st = run.state
    attempts = (st.get(BLOCKED_INFO) or {}).get("attempts", 0) + 1
    st["status"] = Status.BLOCKED
    st[BLOCKED_INFO] = {"seq": st["seq"], "index": err.event_index, "expected": err.expected,
                        "actual": err.actual, "message": str(err), "attempts": attempts}
    if not any(t.get("purpose") == "replay" for t in st["timers"].values()):
        delay = min(REPLAY_RETRY_MS * 2 ** (attempts - 1), REPLAY_RETRY_MAX_MS)
        st["timers"][f"replay-{st['seq']}"] = {"due": run.now + delay, "thread": "code", "purpose": "replay"}


def _unblock(st: JSONDict) -> None:
    st["status"] = Status.RUNNING
    st.pop(BLOCKED_INFO, None)
    for tid in [t for t, v in st["timers"].items() if v.get("purpose") == "replay"]:
        del st["timers"][tid]
