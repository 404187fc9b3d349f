"""The worker side of failure semantics, end to end with a real engine: cancellation, start reports, DLQ.

The engine sends a cancel task when it no longer wants a running attempt (workflow cancelled, attempt
timed out); the worker interrupts the activity (``ActivityCancelledError`` from ``heartbeat()``,
``asyncio.CancelledError`` at an ``await``), drops a queued attempt before it starts, and reports
``StartActivity`` when an attempt really starts. Tasks for activities the worker does not serve and
results Kafka rejects (too large) are dead-lettered, and the engine still learns the attempt failed.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from prometheus_client import REGISTRY

from kflow.model.errors import WorkflowFailedError
from kflow.model.messages import Task
from kflow.schemas.codec import decode_command, decode_event, decode_task, encode_task
from kflow.testing import assert_eventually
from kflow.worker import ActivityCancelledError, Worker, activity, current_task, heartbeat

Q = "wf"  # the queue of this module's main worker
Q1 = "wf1"  # served by a worker with concurrency 1
DEADLINE = 30.0

_lock = threading.Lock()
STARTED: dict[str, threading.Event] = {}  # activity key -> set when an attempt began running
STOPPED: dict[str, BaseException] = {}  # activity key -> what interrupted it
RELEASE: dict[str, threading.Event] = {}  # activity key -> set to let f.hold return
_PACE = threading.Event()  # never set: paces heartbeat loops


def event(table: dict[str, threading.Event], key: str) -> threading.Event:
    with _lock:
        return table.setdefault(key, threading.Event())


def uid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------- activities


def _beat_until_cancelled(key: str) -> str:
    """Heartbeat every 50 ms until the engine cancels the attempt (or a minute passes)."""
    event(STARTED, key).set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            heartbeat({"key": key})
            _PACE.wait(0.05)
    except ActivityCancelledError as exc:
        STOPPED[key] = exc
        raise
    return "never cancelled"


@activity("f.async_wait", queue=Q)
async def async_wait(key: str) -> str:
    event(STARTED, key).set()
    try:
        for _ in range(2):
            heartbeat({"key": key})
            await asyncio.sleep(30)
    except asyncio.CancelledError as exc:
        STOPPED[key] = exc
        raise
    return "never cancelled"


@activity("f.sync_beat", queue=Q)
def sync_beat(key: str) -> str:
    return _beat_until_cancelled(key)


@activity("f.slow_first", queue=Q)
def slow_first(key: str) -> dict[str, Any]:
    """Attempt 1 runs until cancelled (it outlives its start_to_close); later attempts return at once."""
    attempt = current_task().attempt
    if attempt == 1:
        _beat_until_cancelled(key)
    return {"attempt": attempt}


@activity("f.huge", queue=Q)
def huge(_: Any) -> str:
    return "x" * 1_200_000  # above the producer's message.max.bytes (1,000,000)


@activity("f.hold", queue=Q1)
def hold(key: str) -> str:
    event(STARTED, key).set()
    while not event(RELEASE, key).wait(0.05):
        heartbeat()
    return key


# ---------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def workers(stack: Any) -> Iterator[dict[str, Worker]]:
    main = stack.start_worker([async_wait, sync_beat, slow_first, huge])
    single = stack.start_worker([hold], concurrency=1)
    assert main.wait_assigned(DEADLINE) and single.wait_assigned(DEADLINE)
    try:
        yield {Q: main, Q1: single}
    finally:
        for e in list(RELEASE.values()):
            e.set()


def read(stack: Any, topic: str, key: str, enough: Callable[[list[Any]], bool], timeout: float = DEADLINE) -> list[Any]:
    """Records of ``key`` on ``topic`` from the beginning, once ``enough(records)`` holds."""
    c = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False,
                  "isolation.level": "read_committed"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[Any] = []

        def done() -> bool:
            out.extend(m for m in c.consume(500, 0.2) if m.error() is None and m.key() == key.encode())
            return enough(out)

        assert_eventually(done, timeout=timeout, msg=f"records of {key} on {topic}")
        return out
    finally:
        c.close()


def commands(stack: Any, key: str, enough: Callable[[list[Any]], bool]) -> list[Any]:
    return [decode_command(m.value()) for m in read(
        stack, stack.client.config.names.commands, key, lambda ms: enough([decode_command(m.value()) for m in ms]))]


def events(stack: Any, key: str, until: str) -> list[Any]:
    def done(ms: list[Any]) -> bool:
        return any(decode_event(m.value()).type == until for m in ms)

    return [decode_event(m.value()) for m in read(stack, stack.client.config.names.events, key, done)]


def dead_letters(stack: Any, key: str, n: int) -> list[Any]:
    """The dlq records of ``key`` that a worker wrote (their original topic is a task topic)."""
    def from_tasks(ms: list[Any]) -> list[Any]:
        return [m for m in ms if b".tasks." in dict(m.headers())["kflow.original.topic"]]

    return from_tasks(read(stack, stack.client.config.names.dlq, key, lambda ms: len(from_tasks(ms)) >= n))


def committed(stack: Any, group_id: str, topic: str, partition: int) -> int:
    c = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": group_id, "enable.auto.commit": False})
    try:
        [tp] = c.committed([TopicPartition(topic, partition)], timeout=10)
    finally:
        c.close()
    return tp.offset


def cancelled_count(activity_name: str) -> float:
    return REGISTRY.get_sample_value("kflow_worker_activities_cancelled_total", {"activity": activity_name}) or 0.0


def assert_reported_cancelled(stack: Any, key: str) -> None:
    """The worker reported the attempt's start (its step has a heartbeat timeout), then its
    non-retryable Cancelled failure."""
    cmds = commands(stack, key, lambda cs: any(c.type == "FailActivity" for c in cs))
    types = [c.type for c in cmds]
    assert "StartActivity" in types and types.index("StartActivity") < types.index("FailActivity"), types
    [fail] = [c for c in cmds if c.type == "FailActivity"]
    assert (fail.data["error_type"], fail.data["retryable"]) == ("Cancelled", False)
    assert fail.command_id.endswith("/1/result")


def one_task_flow(name: str, task: str, queue: str = Q, **step: Any) -> dict[str, Any]:
    return {"name": name, "version": 1, "steps": [{"id": "s", "task": task, "queue": queue, "input": "input",
                                                   "output": "r", **step}]}


# ---------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("name", ["f.async_wait", "f.sync_beat"])
def test_cancelling_a_workflow_interrupts_its_running_activity(stack: Any, workers: Any, name: str) -> None:
    c = stack.client
    flow = f"cancel-{name.split('.')[1]}"
    c.deploy(one_task_flow(flow, name, timeout={"heartbeat": "30s"}))  # a timeout counted from the start report
    key = uid(flow)
    before = cancelled_count(name)
    h = c.start(flow, key, id=key)
    assert event(STARTED, key).wait(DEADLINE), "the activity never started"
    c.cancel(key, "no longer needed")
    stopped = assert_eventually(lambda: STOPPED.get(key), timeout=DEADLINE, msg="activity saw its cancel")
    if name == "f.async_wait":  # interrupted at its `await asyncio.sleep(30)`
        assert isinstance(stopped, asyncio.CancelledError)
    else:  # learned it on its next heartbeat()
        assert isinstance(stopped, ActivityCancelledError) and stopped.attempt == 1
        assert stopped.activity_id and stopped.name == name
    with pytest.raises(WorkflowFailedError) as ei:
        h.result(timeout=DEADLINE)
    assert ei.value.status == "CANCELLED"
    assert_reported_cancelled(stack, key)
    assert cancelled_count(name) == before + 1


def test_start_to_close_counts_from_the_start_report(stack: Any, workers: Any) -> None:
    c = stack.client
    c.deploy(one_task_flow("stc", "f.slow_first", timeout={"start_to_close": "2s"},
                           retry={"initial": "100ms", "max_attempts": 3}))
    key = uid("stc")
    # Attempt 1 outlives its start_to_close: it is timed out, the worker gets its cancel (the activity
    # sees it), and attempt 2 completes the workflow.
    assert c.start("stc", key, id=key).result(timeout=DEADLINE) == {"r": {"attempt": 2}}
    stopped = assert_eventually(lambda: STOPPED.get(key), timeout=DEADLINE, msg="attempt 1 saw its cancel")
    assert isinstance(stopped, ActivityCancelledError) and stopped.attempt == 1
    evs = events(stack, key, until="WorkflowCompleted")
    started = [e for e in evs if e.type == "ActivityStarted"]
    assert [e.data["attempt"] for e in started] == [1, 2]
    [timed_out] = [e for e in evs if e.type == "ActivityTimedOut"]
    assert timed_out.data == {"activity_id": started[0].data["activity_id"], "attempt": 1, "kind": "start_to_close"}
    # The start report re-armed start_to_close: its timer is due 2 s after ActivityStarted.
    first = evs.index(started[0])
    rearmed = next(e for e in evs[first + 1:] if e.type == "TimerStarted")
    assert rearmed.data["due_ms"] == started[0].ts + 2000
    assert timed_out.ts >= rearmed.data["due_ms"]
    assert_reported_cancelled(stack, key)


def test_a_queued_attempt_that_is_cancelled_never_starts(stack: Any, workers: Any) -> None:
    c = stack.client
    c.deploy(one_task_flow("queued", "f.hold", queue=Q1))
    first, second = uid("first"), uid("second")
    before = cancelled_count("f.hold")
    h1 = c.start("queued", first, id=first)
    assert event(STARTED, first).wait(DEADLINE)
    h2 = c.start("queued", second, id=second)  # the worker's only slot is taken: this one waits
    # The engine's ActivityScheduled for the second attempt shows its task was produced.
    events(stack, second, until="ActivityScheduled")
    c.cancel(second, "changed my mind")
    with pytest.raises(WorkflowFailedError) as ei:
        h2.result(timeout=DEADLINE)
    assert ei.value.status == "CANCELLED"
    assert_eventually(lambda: cancelled_count("f.hold") == before + 1, timeout=DEADLINE, msg="cancel applied")
    event(RELEASE, first).set()
    assert h1.result(timeout=DEADLINE) == {"r": first}
    # The freed slot went to nobody: the cancelled attempt never ran.
    assert not event(STARTED, second).is_set()
    # Both task-topic records of the second instance (its task and its cancel) are committed.
    w = workers[Q1]
    topic = c.config.names.tasks(Q1)
    tasks = read(stack, topic, second, lambda ms: len(ms) >= 2)
    assert [decode_task(m.value()).kind for m in tasks] == ["run", "cancel"]
    last = tasks[-1]
    assert_eventually(lambda: committed(stack, w.group_id, topic, last.partition()) > last.offset(),
                      timeout=DEADLINE, msg="cancel offset committed")


# ---------------------------------------------------------------------------- dead-lettering


def test_task_for_an_activity_the_worker_does_not_serve_is_dead_lettered(stack: Any, workers: Any) -> None:
    names = stack.client.config.names
    topic = names.tasks(Q)
    key = uid("ghost")
    now = int(time.time() * 1000)
    ghost_cancel = Task(key, f"{key}:a0", 1, "f.sync_beat", Q, None, "none", now, kind="cancel")
    unknown = Task(key, f"{key}:a1", 1, "f.nobody", Q, {"x": 1}, "none", now)
    strange = Task(key, f"{key}:a2", 1, "f.sync_beat", Q, None, "none", now, kind="pause")
    p = Producer({"bootstrap.servers": stack.bootstrap, "partitioner": "murmur2_random"})
    for t in (ghost_cancel, unknown, strange):  # one key: one partition, in this order
        p.produce(topic, encode_task(t), key.encode())
    assert p.flush(10) == 0
    # The cancel of an attempt the worker does not have is ignored; the two others are dead-lettered.
    dlq = dead_letters(stack, key, n=2)
    assert [m.value() for m in dlq] == [encode_task(unknown), encode_task(strange)]
    h = [dict(m.headers()) for m in dlq]
    assert h[0]["kflow.reason"].decode().startswith(f"unknown activity 'f.nobody' on queue '{Q}' (registered: ")
    assert h[1]["kflow.reason"] == b"unknown task kind 'pause' (expected 'run' or 'cancel')"
    assert all(x["kflow.original.topic"] == topic.encode() for x in h)
    partition, offset = int(h[1]["kflow.original.partition"]), int(h[1]["kflow.original.offset"])
    # The engine is told the unknown activity's attempt failed for good (it has no such instance: it
    # dead-letters that command in turn); nothing was run.
    [fail] = commands(stack, key, lambda cs: any(c.type == "FailActivity" for c in cs))
    assert (fail.data["activity_id"], fail.data["error_type"], fail.data["retryable"]) == (unknown.activity_id,
                                                                                          "UnknownActivity", False)
    assert key not in STARTED
    # All three records are committed: none is retried.
    assert_eventually(lambda: committed(stack, workers[Q].group_id, topic, partition) > offset,
                      timeout=DEADLINE, msg="dead-lettered offsets committed")


def test_a_result_too_large_to_deliver_is_dead_lettered_and_fails_the_attempt(stack: Any, workers: Any) -> None:
    c = stack.client
    c.deploy(one_task_flow("huge", "f.huge"))
    key = uid("huge")
    h = c.start("huge", key, id=key)
    with pytest.raises(WorkflowFailedError) as ei:
        h.result(timeout=DEADLINE)
    assert ei.value.status == "FAILED" and ei.value.error_type == "ResultUndeliverable"
    assert "MSG_SIZE_TOO_LARGE" in ei.value.message and "CompleteActivity" in ei.value.message
    [rec] = dead_letters(stack, key, n=1)
    hs = dict(rec.headers())
    task = decode_task(rec.value())  # the original task record, unchanged
    assert (task.name, task.instance_id, task.kind) == ("f.huge", key, "run")
    assert hs["kflow.undelivered.type"] == b"CompleteActivity"
    assert hs["kflow.reason"].decode().startswith("undeliverable result: the CompleteActivity of activity 'f.huge'")
    assert b"MSG_SIZE_TOO_LARGE" in hs["kflow.reason"]
    assert "kflow.undelivered.command" not in hs  # the result itself does not fit in a record
    assert hs["kflow.original.topic"] == c.config.names.tasks(Q).encode()
    fails = [cmd for cmd in commands(stack, key, lambda cs: any(x.type == "FailActivity" for x in cs))
             if cmd.type in ("CompleteActivity", "FailActivity")]
    assert [(f.type, f.data["error_type"], f.data["retryable"]) for f in fails] == [
        ("FailActivity", "ResultUndeliverable", False)]
