"""Helpers for testing code that runs on kflow, used by kflow's own test suite as well.

Tests must never sleep to wait for an effect; they poll for it with `assert_eventually`, which
fails with the last observation when the effect does not show up in time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

__all__ = ["assert_eventually", "replay"]

T = TypeVar("T")


def assert_eventually(
    fn: Callable[[], T],
    timeout: float | timedelta = 30.0,
    interval: float = 0.05,
    msg: str = "",
) -> T:
    """Call ``fn`` until it returns a truthy value without raising `AssertionError`.

    ``fn`` may either return a condition or assert inside; both styles work. Any exception other
    than `AssertionError` propagates at once, since it is a bug rather than "not yet".

    Example:
        >>> records = assert_eventually(lambda: collector.poll() or None, timeout=10)  # doctest: +SKIP

    Args:
        fn: The probe. Called at least once, even with a zero timeout.
        timeout: How long to keep trying, in seconds or as a `timedelta`.
        interval: Pause between attempts, in seconds.
        msg: Describes the awaited condition in the failure message.

    Returns:
        The first truthy value ``fn`` returned.

    Raises:
        AssertionError: ``fn`` did not succeed in time; the message names the last failed
            assertion or the last falsy value, and the last `AssertionError` is the cause.
    """
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    deadline = time.monotonic() + seconds
    attempts = 0
    last_error: AssertionError | None = None
    last_value: object = None
    while True:
        attempts += 1
        try:
            value = fn()
        except AssertionError as exc:
            last_error, last_value = exc, None
        else:
            if value:
                return value
            last_error, last_value = None, value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    name = getattr(fn, "__name__", "<lambda>")
    what = msg or ("condition" if name == "<lambda>" else f"{name}()")
    last = f"last error: {last_error}" if last_error is not None else f"last value: {last_value!r}"
    raise AssertionError(f"waited {seconds:g}s ({attempts} attempts) for {what}; {last}") from last_error


def __getattr__(name: str) -> object:
    # ``replay`` pulls in the code-workflow machinery; import it on first use only.
    if name == "replay":
        from kflow.testing._replay import replay

        return replay
    raise AttributeError(f"module 'kflow.testing' has no attribute {name!r}")
