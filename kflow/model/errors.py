"""The kflow error hierarchy: one root and specific subclasses that carry fields."""

from __future__ import annotations


class KflowError(Exception):
    """Root of every error kflow raises on purpose."""


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


class NonRetryableError(KflowError):
    """Raised by an activity to fail its attempt without retry."""

    def __init__(self, message: str, type: str | None = None) -> None:
        self.type = type or "NonRetryableError"
        self.message = message
        super().__init__(message)


class WorkflowFailedError(KflowError):
    """Client side: the awaited workflow ended FAILED or CANCELLED."""

    def __init__(self, instance_id: str, status: str, error_type: str | None, message: str | None) -> None:
        self.instance_id, self.status, self.error_type, self.message = instance_id, status, error_type, message
        super().__init__(f"workflow {instance_id} {status.lower()}: {error_type}: {message}")
