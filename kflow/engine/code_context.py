"""What workflow code is handed: :class:`WorkflowContext` (``ctx``) and :class:`Saga`.

Every ``ctx`` method either issues a command through the deterministic machine that steps the
workflow (:mod:`kflow.engine.code_machine`) or reads something the machine derives from the
history (time, seeded randomness, the run number), so a workflow is a pure function of its
history. The classes live in the engine because the machine creates the context; the public
authoring package (:mod:`kflow.authoring`) re-exports them. The argument checks of activity
options (retry policies, timeouts, ``on_failure``) are here too, shared with the decorator.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Union

import orjson

from kflow.model.messages import JSONDict, priority_level
from kflow.model.spec import OnFailureSpec, RetrySpec, TimeoutSpec

if TYPE_CHECKING:
    from kflow.engine.code_machine import Machine

__all__ = ["ContinueAsNew", "Saga", "WorkflowContext", "activity_policy", "as_json", "on_failure_policy"]


class ContinueAsNew(BaseException):
    """Raised by ``ctx.continue_as_new``: end this run and start a fresh one under the same id."""

    def __init__(self, input_: Any) -> None:
        self.input = input_
        super().__init__("continue as new")


def as_json(value: Any, what: str) -> Any:
    """``value`` as the JSON document it becomes on the wire; raises TypeError into workflow code."""
    try:
        return orjson.loads(orjson.dumps(value))
    except TypeError as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from None


def activity_policy(retry: Any, timeouts: dict[str, Any], default_retry: Optional[JSONDict]) -> Optional[JSONDict]:
    """An activity's ``{"retry": ..., "timeout": ...}`` as validated JSON, or None for no policy.

    Each is kept as its model reads it (the fields the author set, converted: ``"3"`` attempts
    becomes ``3``), so the state holds the types :class:`~kflow.model.state.RetryPolicy` declares."""
    out: JSONDict = {}
    if isinstance(retry, RetrySpec):
        retry = retry.model_dump(mode="json", exclude_defaults=True)
    elif retry is not None and not isinstance(retry, dict):
        raise TypeError(f"retry must be a dict of retry policy fields or a RetrySpec, not {type(retry).__name__}")
    retry = default_retry if retry is None else retry
    if retry is not None:
        out["retry"] = RetrySpec.model_validate(retry).model_dump(mode="json", exclude_unset=True)
    given = {k: (v.total_seconds() if isinstance(v, timedelta) else v) for k, v in timeouts.items() if v is not None}
    if given:
        out["timeout"] = TimeoutSpec.model_validate(given).model_dump(mode="json", exclude_unset=True)
    return out or None


def on_failure_policy(value: Any) -> JSONDict:
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
        policy = activity_policy(retry, {"start_to_close": start_to_close, "schedule_to_close": schedule_to_close,
                                 "heartbeat": heartbeat}, self._m.definition.retry)
        if on_failure is not None:
            policy = {**(policy or {}), "on_failure": on_failure_policy(on_failure)}
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
        policy = activity_policy(retry, {"start_to_close": start_to_close, "schedule_to_close": schedule_to_close},
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
        raise ContinueAsNew(as_json(input, "the input of continue_as_new"))

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
        self._m.upsert_search(as_json(attributes, "search attributes"))


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

