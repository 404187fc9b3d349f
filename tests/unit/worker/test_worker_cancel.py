"""Worker bookkeeping without a broker: start reports, cancellation of sync and async jobs, undeliverable outputs.

The executors run real threads and a real event loop; the outbox uses a real librdkafka producer,
which refuses a record above ``message.max.bytes`` at ``produce()`` without contacting any broker.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError

from kflow._worker.context import ActivityContext, bind, unbind
from kflow._worker.execution import Executors, Job
from kflow._worker.offsets import PartitionOffsets
from kflow._worker.output import Out, Outbox, Record
from kflow.model.messages import Command, Task
from kflow.streams.activities import ActivityDefinition
from kflow.worker import ActivityCancelledError, heartbeat

TIMEOUT = 10.0


def make_task(attempt: int = 1) -> Task:
    return Task("i1", "i1:a1", attempt, "t.act", "default", None, "wf", 0, report_start=True)


class Sent(list[Command]):
    """Commands an ActivityContext sent (what the outbox would produce)."""

    def __call__(self, cmd: Command) -> None:
        self.append(cmd)


def test_start_report_then_cancel_stops_heartbeats() -> None:
    sent = Sent()
    ctx = ActivityContext(make_task(attempt=2), sent)
    ctx.begin()
    [start] = sent
    assert (start.type, start.instance_id, start.command_id) == ("StartActivity", "i1", "i1:a1/2/start")
    assert start.data == {"activity_id": "i1:a1", "attempt": 2}
    token = bind(ctx)
    try:
        heartbeat({"p": 1})
        ctx.cancel()
        with pytest.raises(ActivityCancelledError) as ei:
            heartbeat({"p": 2})
    finally:
        unbind(token)
    assert [c.type for c in sent] == ["StartActivity", "HeartbeatActivity"]  # the cancelled beat was not sent
    err = ei.value
    assert (err.activity_id, err.attempt, err.name) == ("i1:a1", 2, "t.act")
    assert "cancelled by the engine" in str(err)
    with pytest.raises(ActivityCancelledError):
        ctx.begin()  # an attempt cancelled before it began does not report a start


class Reports:
    def __init__(self) -> None:
        self.outcomes: dict[int, tuple[Any, BaseException | None]] = {}

    def __call__(self, job: Job, result: Any, error: BaseException | None) -> None:
        self.outcomes[id(job)] = (result, error)


def make_job(fn: Any, sent: Sent) -> Job:
    definition = ActivityDefinition("t.act", "default", fn, asyncio.iscoroutinefunction(fn))
    return Job(definition, make_task(), "default", Record(PartitionOffsets(), 0), ActivityContext(make_task(), sent))


def test_async_activity_is_cancelled_at_its_await_and_reported() -> None:
    reports, sent = Reports(), Sent()
    entered, seen = threading.Event(), []

    async def act(_: Any) -> str:
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError as exc:
            seen.append(exc)
            raise
        return "slept"

    ex = Executors(2, has_sync=False, has_async=True, report=reports)
    try:
        job = make_job(act, sent)
        ex.start(job)
        assert entered.wait(TIMEOUT)
        ex.cancel(job)
        assert ex.next_finished(TIMEOUT) is job
        result, error = reports.outcomes[id(job)]
        assert result is None and isinstance(error, asyncio.CancelledError) and len(seen) == 1
        assert job.ctx.cancelled and [c.type for c in sent] == ["StartActivity"]
    finally:
        ex.close()


def test_shutdown_cancels_async_activities_without_reporting() -> None:
    reports, sent = Reports(), Sent()
    entered = threading.Event()

    async def act(_: Any) -> None:
        entered.set()
        await asyncio.sleep(30)

    ex = Executors(1, has_sync=False, has_async=True, report=reports)
    job = make_job(act, sent)
    ex.start(job)
    assert entered.wait(TIMEOUT)
    ex.close()
    assert ex.next_finished(TIMEOUT) is job
    assert reports.outcomes == {}  # shutdown: nothing reported, the task is re-delivered


def test_sync_activity_learns_of_its_cancel_on_its_next_heartbeat() -> None:
    reports, sent = Reports(), Sent()
    entered, go_on = threading.Event(), threading.Event()

    def act(_: Any) -> str:
        entered.set()
        assert go_on.wait(TIMEOUT)
        heartbeat()
        return "not cancelled"

    ex = Executors(1, has_sync=True, has_async=False, report=reports)
    try:
        job = make_job(act, sent)
        ex.start(job)
        assert entered.wait(TIMEOUT)
        ex.cancel(job)  # a plain function cannot be interrupted: it runs until its heartbeat
        go_on.set()
        assert ex.next_finished(TIMEOUT) is job
        _, error = reports.outcomes[id(job)]
        assert isinstance(error, ActivityCancelledError)
    finally:
        ex.close()


def test_a_job_cancelled_before_it_began_never_runs() -> None:
    reports, sent, calls = Reports(), Sent(), []
    ex = Executors(1, has_sync=True, has_async=True, report=reports)
    try:
        for fn in (lambda x: calls.append(x), _async_append(calls)):
            job = make_job(fn, sent)
            job.ctx.cancel()
            ex.start(job)
            assert ex.next_finished(TIMEOUT) is job
            assert isinstance(reports.outcomes[id(job)][1], ActivityCancelledError)
        assert calls == [] and sent == []
    finally:
        ex.close()


def _async_append(calls: list[Any]) -> Any:
    async def act(x: Any) -> None:
        calls.append(x)

    return act


# ---------------------------------------------------------------------------- undeliverable outputs


@pytest.fixture
def outbox() -> Any:
    box = Outbox({"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": 2000, "enable.idempotence": True,
                  "log_level": 0},  # no broker is needed (or there): keep its connection errors quiet
                 "commands")
    yield box
    box.producer.purge()  # what never had a broker to go to: dropped, so closing does not wait for it
    box.producer.poll(0)
    box.close(flushed=True)


def test_a_record_refused_for_good_is_replaced_by_its_fallback(outbox: Outbox) -> None:
    offsets = PartitionOffsets()
    offsets.add(0)
    record = Record(offsets, 0)
    replaced: list[tuple[Out, str]] = []

    def fallback(out: Out, reason: str) -> None:
        replaced.append((out, reason))
        outbox.produce(Out("dlq", out.key, b"small", out.record))

    big = Out("commands", b"k", b"x" * 5000, record, fallback=fallback)
    record.remaining += 1
    assert outbox.try_produce(big)  # refused by produce(): handled on the loop thread
    outbox.serve()
    [(out, reason)] = replaced
    assert out is big and reason.startswith("MSG_SIZE_TOO_LARGE")
    # The replacement is counted in its place: the task is not finished until it is delivered.
    assert record.remaining == 1 and offsets.committable is None
    # A rejection reported by the broker in a delivery report takes the same path.
    broker_side = Out("commands", b"k", b"y", record, fallback=fallback)
    record.remaining += 1
    outbox._on_delivery(broker_side, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    outbox.serve()
    assert [o for o, _ in replaced] == [big, broker_side] and record.remaining == 2


def test_without_a_fallback_or_for_a_transient_error_the_record_is_produced_again(outbox: Outbox) -> None:
    record = Record(PartitionOffsets(), 0)
    called: list[Any] = []
    transient = Out("commands", b"k", b"z", record, fallback=lambda o, r: called.append(o))
    record.remaining += 1
    outbox._on_delivery(transient, KafkaError(KafkaError._MSG_TIMED_OUT))
    outbox.serve()
    assert called == [] and record.remaining == 1 and len(outbox.producer) >= 1  # queued again
    plain = Out("dlq", b"k", b"x" * 5000, record)
    record.remaining += 1
    assert outbox.try_produce(plain)
    outbox.serve()  # refused again, and kept: never dropped without a fallback
    assert record.remaining == 2 and not outbox._failed.empty()


def test_no_start_report_when_the_task_has_no_timeouts_counted_from_it() -> None:
    sent: list = []
    t = Task("i1", "i1:a1", 1, "t.act", "default", None, "wf", 0)  # report_start defaults to False
    ctx = ActivityContext(t, sent.append)
    ctx.begin()
    assert sent == []
