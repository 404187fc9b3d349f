"""Everything a worker writes (results, DLQ records, start reports, heartbeats), through one idempotent producer.

A consumed task counts as finished only once every record produced on its behalf is confirmed
delivered, so each output carries its :class:`Record` and the delivery report (served on the
worker loop's thread by :meth:`Outbox.serve` and :meth:`Outbox.flush`) counts it down. A record
whose delivery failed is produced again rather than dropped: an offset is never committed past a
result that did not reach Kafka. The exception is a record the cluster will never accept as it
is (:data:`REJECTED`, e.g. ``MSG_SIZE_TOO_LARGE``): when its :class:`Out` names a ``fallback``,
the fallback's records take its place (for a result: the task to the DLQ and a small
``ResultUndeliverable`` failure); without one it is produced again, like any other failure.
"""

from __future__ import annotations

import logging
import queue
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from kflow._worker import metrics
from kflow._worker.offsets import PartitionOffsets
from kflow.converter import ConversionError, to_json
from kflow.dlq import dlq_record
from kflow.model.errors import NonRetryableError
from kflow.model.messages import Command, Task
from kflow.schemas.codec import encode_command
from kflow.security.tokens import ATTEMPT_HEADER, progress_token

__all__ = ["REJECTED", "Out", "Outbox", "Record", "attempt_headers", "fail_command", "now_ms",
           "progress_headers", "result_command"]

log = logging.getLogger("kflow.worker")

_MAX_MESSAGE_CHARS = 4000  # failure messages are cut to this length
_FULL_QUEUE_WAIT = 0.05  # seconds to serve delivery reports when the producer queue is full

#: Errors saying the cluster will never accept a record as it is (as opposed to cluster trouble an
#: operator can fix, such as timeouts, unavailable leaders or missing ACLs, which are retried).
REJECTED = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,  # raised by produce() above message.max.bytes, or by the broker
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,  # CORRUPT_MESSAGE
    KafkaError.POLICY_VIOLATION,
    KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
    KafkaError._BAD_MSG,
})


def now_ms() -> int:
    return int(time.time() * 1000)


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 1] + "…"


def weak_callback(method: Callable[..., None]) -> Callable[..., None]:
    """Wrap a bound method so a librdkafka client holding it does not keep its owner alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        target = ref()
        if target is not None:
            target(*args)

    return call


@dataclass(slots=True, eq=False)
class Record:
    """One consumed task record and the outputs still awaiting delivery before it counts as finished."""

    offsets: PartitionOffsets
    offset: int
    remaining: int = 0


@dataclass(slots=True, eq=False)
class Out:
    """One record to produce on behalf of a consumed record."""

    topic: str
    key: bytes | None
    value: bytes
    record: Record
    headers: list[tuple[str, bytes]] | None = None
    #: Called on the loop thread with ``(out, reason)`` instead of producing ``out`` again when the
    #: cluster rejects it for good (:data:`REJECTED`); it produces the records that replace it.
    fallback: Callable[[Out, str], None] | None = None


def attempt_headers(task: Task) -> list[tuple[str, bytes]]:
    """The headers of the result of ``task``'s attempt: its attempt token, returned to the engine
    (which, with auth on, refuses a result without it); none when the task carries no token."""
    return [(ATTEMPT_HEADER, task.attempt_token.encode())] if task.attempt_token else []


def progress_headers(task: Task) -> list[tuple[str, bytes]]:
    """The headers of the start and heartbeat reports of ``task``'s attempt: its progress token, which
    the engine accepts for them and a reader of the commands topic cannot turn into a result."""
    return [(ATTEMPT_HEADER, progress_token(task.attempt_token).encode())] if task.attempt_token else []


def fail_command(task: Task, error_type: str, message: str, retryable: bool) -> bytes:
    """Encode the ``FailActivity`` command of one attempt."""
    data = {"activity_id": task.activity_id, "attempt": task.attempt, "error_type": error_type,
            "message": _cut(message), "retryable": retryable}
    cmd = Command("FailActivity", task.instance_id, data, f"{task.activity_id}/{task.attempt}/result", now_ms())
    return encode_command(cmd)


def result_command(task: Task, result: Any = None, error: BaseException | None = None) -> tuple[bytes, str]:
    """Encode the command reporting one attempt's outcome; returns ``(value, outcome label)``.

    A result is ``CompleteActivity``; :class:`NonRetryableError` is a non-retryable
    ``FailActivity`` of its ``type``; an exception carrying a string ``type`` and a boolean
    ``retryable`` (a connector's ``ConnectorError``) is reported with exactly those; any other
    exception is a retryable one named after its class; a result that is not JSON-serialisable
    is a non-retryable ``InvalidResult``.
    """
    if error is None:
        try:
            result = to_json(result, f"the result of activity '{task.name}'")
        except ConversionError as exc:
            return fail_command(task, "InvalidResult", str(exc), False), metrics.Outcome.INVALID_RESULT
        data = {"activity_id": task.activity_id, "attempt": task.attempt, "result": result}
        cmd = Command("CompleteActivity", task.instance_id, data, f"{task.activity_id}/{task.attempt}/result", now_ms())
        try:
            return encode_command(cmd), metrics.Outcome.COMPLETED
        except ValueError as exc:
            why = f"activity '{task.name}' returned a value that is not JSON-serialisable: {exc}"
            return fail_command(task, "InvalidResult", why, False), metrics.Outcome.INVALID_RESULT
    if isinstance(error, NonRetryableError):
        return fail_command(task, str(error.type), str(error.message), False), metrics.Outcome.NON_RETRYABLE
    typed, retryable = getattr(error, "type", None), getattr(error, "retryable", None)
    if isinstance(typed, str) and typed and isinstance(retryable, bool):  # e.g. a ConnectorError
        message = str(getattr(error, "message", None) or error)
        outcome = metrics.Outcome.FAILED if retryable else metrics.Outcome.NON_RETRYABLE
        return fail_command(task, typed, message, retryable), outcome
    return fail_command(task, type(error).__name__, str(error) or repr(error), True), metrics.Outcome.FAILED


def dead_letter_headers(msg: Message, reason: str) -> list[tuple[str, bytes]]:
    """The headers of the DLQ record of task record ``msg`` (:func:`kflow.dlq.dlq_record`'s, stamped now);
    its key and value are the task record's own."""
    return dlq_record(msg, reason, now_ms())[2]


class Outbox:
    """The worker's idempotent producer and the delivery bookkeeping of its records.

    ``try_produce`` and ``notify`` may be called from any thread; everything else runs on the
    worker loop's thread, which is also where delivery reports are served.
    """

    def __init__(self, producer_conf: dict[str, Any], commands_topic: str) -> None:
        self.commands_topic = commands_topic
        self.producer = Producer({**producer_conf, "error_cb": weak_callback(self._on_error)})
        #: Most bytes one record may take (librdkafka's ``message.max.bytes``).
        self.max_message_bytes = int(producer_conf.get("message.max.bytes", 1_000_000))
        # Outputs whose produce() or delivery failed, with the error; the loop thread handles them.
        self._failed: queue.SimpleQueue[tuple[Out, KafkaError]] = queue.SimpleQueue()
        self._fatal: KafkaException | None = None
        self._closed = False

    # -- any thread -----------------------------------------------------------------------

    def try_produce(self, out: Out) -> bool:
        """Hand ``out`` to the producer; False when the producer queue is full.

        A record ``produce()`` refuses (e.g. larger than ``message.max.bytes``) is handled like a
        failed delivery, on the loop thread.
        """
        if self._closed:
            log.debug("worker stopped: output to %s dropped (its task is re-delivered)", out.topic)
            return True
        try:
            self.producer.produce(
                out.topic, out.value, out.key, headers=out.headers,
                on_delivery=lambda err, _msg, out=out: self._on_delivery(out, err),  # type: ignore[misc]
            )
        except BufferError:
            return False
        except KafkaException as exc:
            self._failed.put((out, exc.args[0]))
        return True

    def notify(self, cmd: Command, headers: list[tuple[str, bytes]] | None = None) -> None:
        """Produce a ``StartActivity`` or heartbeat command (fire and forget: a lost one is logged).

        Raises:
            ValueError: the heartbeat details are not JSON-serialisable.
        """
        value = encode_command(cmd)
        if self._closed:
            return
        what = f"{cmd.type} of activity {cmd.data.get('activity_id')}"
        try:
            self.producer.produce(self.commands_topic, value, cmd.instance_id.encode(), headers=headers,
                                  on_delivery=lambda err, _msg: _on_notified(err, what))
        except BufferError:
            log.warning("producer queue full: %s dropped", what)
        except KafkaException as exc:
            log.warning("%s not produced: %s", what, exc.args[0])

    # -- worker loop thread ---------------------------------------------------------------

    def produce(self, out: Out, counted: bool = False) -> None:
        """Produce ``out``, serving delivery reports while the producer queue is full.

        Args:
            out: The record.
            counted: True if ``out`` is already counted in its record's ``remaining``.
        """
        if not counted:
            out.record.remaining += 1
        while not self.try_produce(out):
            self.producer.poll(_FULL_QUEUE_WAIT)

    def serve(self, timeout: float = 0) -> None:
        """Serve delivery reports and produce again what failed; raise a fatal producer error."""
        self.producer.poll(timeout)
        self._check()

    def flush(self, deadline: float) -> bool:
        """Deliver everything outstanding before ``deadline`` (monotonic); True if nothing is left."""
        while True:
            left = self.producer.flush(max(0.0, min(1.0, deadline - time.monotonic())))
            self._check()
            if left == 0 and self._failed.empty() and len(self.producer) == 0:
                return True
            if time.monotonic() >= deadline:
                return False

    def close(self, flushed: bool) -> None:
        """Stop producing; a flushed producer is closed now, an unflushed one when collected."""
        self._closed = True
        if flushed:
            self.producer.close()

    def _check(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        failed = []
        while not self._failed.empty():  # only what failed so far: a repeat failure waits for the next call
            failed.append(self._failed.get_nowait())
        for out, err in failed:
            if err.fatal():
                raise KafkaException(err)
            if err.code() in REJECTED and out.fallback is not None:
                # Its replacements are counted in its record before it is, so the record's
                # outputs never all look delivered in between.
                out.fallback(out, f"{err.name()}: {err.str()}")
                self._delivered(out)
            else:
                log.error("delivery to %s failed, producing again: %s", out.topic, err)
                self.produce(out, counted=True)

    def _delivered(self, out: Out) -> None:
        out.record.remaining -= 1
        if out.record.remaining == 0:
            out.record.offsets.finish(out.record.offset)

    def _on_delivery(self, out: Out, err: KafkaError | None) -> None:
        if err is None:
            self._delivered(out)
        elif err.fatal():
            self._fatal = KafkaException(err)
        else:
            self._failed.put((out, err))

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = KafkaException(err)
            log.error("fatal producer error: %s", err)
        else:
            log.debug("producer: %s", err)


def _on_notified(err: KafkaError | None, what: str) -> None:
    if err is not None:
        log.warning("%s not delivered: %s", what, err)
