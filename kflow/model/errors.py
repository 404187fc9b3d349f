"""The kflow error hierarchy: one root and specific subclasses that carry fields."""

from __future__ import annotations

from typing import Any


class KflowError(Exception):
    """Root of every error kflow raises on purpose."""


class ProblemsError(KflowError):
    """A declaration (limits, schedule, subscriptions, policy, activity, auth file) that cannot be
    applied: ``problems`` lists every reason at once, and nothing of it was applied."""

    def __init__(self, what: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"invalid {what}: " + "; ".join(problems))


class DefinitionError(KflowError):
    """A workflow definition does not validate; ``problems`` lists ``(step_id, message)``."""

    def __init__(self, workflow: str, problems: list[tuple[str, str]]) -> None:
        self.workflow = workflow
        self.problems = problems
        lines = "; ".join(f"step '{s}': {m}" if s else m for s, m in problems)
        super().__init__(f"invalid definition '{workflow}': {lines}")


class DecodeError(KflowError):
    """A message could not be decoded or validated; ``reason`` goes into the DLQ headers."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class TopicConfigMismatch(KflowError):
    """An existing topic's configuration differs from what kflow requires."""

    def __init__(self, topic: str, key: str, expected: object, actual: object) -> None:
        self.topic, self.key, self.expected, self.actual = topic, key, expected, actual
        super().__init__(
            f"topic '{topic}': expected {key}={expected}, but the broker has {key}={actual}; "
            "delete the topic or point kflow at another prefix (KFLOW_TOPIC_PREFIX)"
        )


class BrokerUnavailable(KflowError):
    """The Kafka bootstrap servers could not be reached in time."""

    def __init__(self, bootstrap: str, detail: str = "") -> None:
        self.bootstrap = bootstrap
        super().__init__(f"cannot reach Kafka at {bootstrap}" + (f": {detail}" if detail else ""))


class WorkflowError(KflowError):
    """Raised by a workflow (or reported for one) with an error type and message."""

    def __init__(self, message: str, type: str | None = None) -> None:
        self.type = type or self.__class__.__name__
        self.message = message
        super().__init__(message)


class ActivityError(WorkflowError):
    """Raised inside a code workflow when an activity fails for good (after its retries).

    Attributes:
        type: The activity's error type (``ActivityTimeout`` for timeouts, ``Cancelled`` ...).
        message: The error message.
        attempt: The attempt that failed last.
        activity: The activity's name.
    """

    def __init__(self, message: str, type: str, attempt: int = 0, activity: str = "") -> None:
        super().__init__(message, type=type)
        self.attempt = attempt
        self.activity = activity


class CancelledError(WorkflowError):
    """Raised inside a code workflow at every pending ``await`` when the instance is cancelled.

    Catch it (or use ``try/finally``) to clean up; re-raising it (or any error) ends the instance
    CANCELLED, returning normally completes it.
    """

    def __init__(self, message: str = "the workflow was cancelled") -> None:
        super().__init__(message, type="Cancelled")


#: :class:`CancelledError` under a name that does not shadow :class:`asyncio.CancelledError`.
WorkflowCancelledError = CancelledError


class NonRetryableError(KflowError):
    """Raised by an activity to fail its attempt without retry."""

    def __init__(self, message: str, type: str | None = None) -> None:
        self.type = type or "NonRetryableError"
        self.message = message
        super().__init__(message)


class WorkflowFailedError(KflowError):
    """Client side: the awaited workflow ended FAILED, CANCELLED or TERMINATED.

    Raised by ``WorkflowHandle.result()`` and ``Client.result()``; ``kflow result`` prints it and
    exits 1. Decide on the fields, not on the message text.

    Attributes:
        instance_id: The instance that ended.
        status: How it ended: ``"FAILED"``, ``"CANCELLED"`` or ``"TERMINATED"``.
        error_type: The error type it ended with: what a ``fail`` step or an uncaught activity
            error named (``"CardDeclined"``, ``"ActivityTimeout"``), ``"WorkflowTimeout"`` for an
            execution timeout, ``"Cancelled"`` or ``"Terminated"``; None if the state carries none.
        message: The error message (for a cancel or terminate, the reason given); may be None.
        cause: When an activity's failure ended the workflow (nothing caught it), that failure as
            an :class:`ActivityError` (``type``, the activity's own ``message``, ``activity``);
            None for any other ending.

    Example:
        >>> try:  # doctest: +SKIP
        ...     handle.result(timeout=60)
        ... except kflow.WorkflowFailedError as e:
        ...     if e.status == "FAILED" and e.error_type == "CardDeclined":
        ...         notify_customer(e.instance_id, e.message)
    """

    def __init__(self, instance_id: str, status: str, error_type: str | None, message: str | None,
                 cause: ActivityError | None = None) -> None:
        self.instance_id, self.status, self.error_type, self.message = instance_id, status, error_type, message
        self.cause = cause
        super().__init__(f"workflow {instance_id} {status.lower()}: {error_type}: {message}")


class QueryFailedError(KflowError):
    """Client side: the engine answered a query with an error instead of a result.

    Attributes:
        type: What went wrong: ``"NotFound"`` (no such instance), ``"UnknownQuery"``,
            ``"InvalidQuery"``, ``"UnknownWorkflow"``, ``"HistoryUnavailable"``, or the type of the
            error the query handler raised.
        message: The engine's message.
        instance_id: The instance asked.
        query: The query's name.
    """

    def __init__(self, type: str, message: str, instance_id: str = "", query: str = "") -> None:
        self.type, self.message, self.instance_id, self.query = type, message, instance_id, query
        super().__init__(f"query '{query}' on {instance_id} failed: {type}: {message}")


class UpdateFailedError(KflowError):
    """Client side: the engine answered an update with an error instead of a result.

    Attributes:
        type: What went wrong: the type of the error the update handler raised, ``"NotFound"``
            (no such instance), ``"WorkflowClosed"`` (it closed before the handler finished), …
        message: The engine's message.
        instance_id: The instance updated.
        update: The update's name.
        update_id: The update's id (sending it again returns the same answer).
    """

    def __init__(self, type: str, message: str, instance_id: str = "", update: str = "", update_id: str = "") -> None:
        self.type, self.message, self.instance_id, self.update, self.update_id = type, message, instance_id, update, update_id
        super().__init__(f"update '{update}' on {instance_id} failed: {type}: {message}")


class UpdateRejectedError(UpdateFailedError):
    """Client side: the update was refused before it was accepted, so it left no history.

    Its validator raised (``type`` is the raised error's type), the instance does not exist or is
    closed, no handler or waiting step takes the update's name, or its data is too large.
    """

    def __init__(self, type: str, message: str, instance_id: str = "", update: str = "", update_id: str = "") -> None:
        super().__init__(type, message, instance_id, update, update_id)
        self.args = (f"update '{update}' on {instance_id} rejected: {type}: {message}",)


class DeterminismError(KflowError):
    """Replaying an instance's history did not reproduce it: the code or definition changed under it.

    The engine raises it when folding recorded events produces other events than recorded
    (``seq`` is the event's sequence number); its subclass ``NondeterminismError`` when workflow
    code issues another command than its history recorded (``seq`` is None there: the position
    is the command's index, ``event_index``). Catch this class for both.

    Attributes:
        instance_id: The instance whose history was replayed.
        seq: Sequence number of the first event that differs, or None (see above).
        expected: What the history holds there.
        actual: What the replay produced instead.
    """

    def __init__(self, instance_id: str, seq: int | None, expected: Any, actual: Any,
                 message: str | None = None) -> None:
        self.instance_id, self.seq, self.expected, self.actual = instance_id, seq, expected, actual
        super().__init__(message or f"instance {instance_id}: at event #{seq} history has {expected}, "
                                    f"but replay produced {actual}")


class DefinitionConflict(KflowError):
    """``name@version`` is already deployed with different content; a deployed version is immutable.

    Attributes:
        workflow: The definition's name.
        version: The version that is taken.
        existing_fingerprint: Content fingerprint of the deployed definition (the one that counts).
        new_fingerprint: Content fingerprint of the refused one.
    """

    def __init__(self, workflow: str, version: int, existing_fingerprint: str, new_fingerprint: str) -> None:
        self.workflow, self.version = workflow, version
        self.existing_fingerprint, self.new_fingerprint = existing_fingerprint, new_fingerprint
        super().__init__(
            f"{workflow}@{version} is already deployed with different content (deployed {existing_fingerprint[:12]}, "
            f"new {new_fingerprint[:12]}); a deployed version never changes, so running instances keep it: "
            f"deploy the change as {workflow}@{version + 1} (or the next free version)")


class WorkflowNotDeployed(KflowError):
    """A start names a workflow (or version) the definitions topic does not hold.

    Attributes:
        workflow: The name asked for.
        version: The version asked for, or None for "the latest".
        deployed_versions: The versions of ``workflow`` that are deployed (empty if none).
    """

    def __init__(self, workflow: str, version: int | None, deployed_versions: list[int]) -> None:
        self.workflow, self.version, self.deployed_versions = workflow, version, list(deployed_versions)
        what = workflow if version is None else f"{workflow}@{version}"
        if deployed_versions:
            have = ", ".join(str(v) for v in deployed_versions)
            hint = f"deployed versions of '{workflow}': {have}"
        else:
            hint = (f"deploy it first (kflow deploy FILE), or start an engine hosting code workflow '{workflow}' "
                    f"(--workflows MODULE)")
        super().__init__(f"workflow '{what}' is not deployed: {hint}")


class StartRejectedError(WorkflowFailedError):
    """Client side: the engine refused a ``StartWorkflow`` (it was dead-lettered), so no instance ran.

    Attributes:
        instance_id: The id the start asked for.
        reason: The engine's reason, e.g. ``unknown workflow 'order': deploy it first``.
    """

    def __init__(self, instance_id: str, reason: str) -> None:
        self.reason = reason
        super().__init__(instance_id, "REJECTED", "StartRejected", reason)
        self.args = (f"workflow {instance_id} was not started: the engine rejected its start: {reason}",)

    def __str__(self) -> str:
        return str(self.args[0])
