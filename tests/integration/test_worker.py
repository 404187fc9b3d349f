"""The activity worker against a real broker: results, failures, DLQ, concurrency, commits, heartbeats.

Tasks are produced straight onto ``tasks.<queue>`` with the codec, and the worker's output is read
back from the commands and dlq topics, so these tests need no engine.
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

from kflow.config import WorkerConfig
from kflow.model.errors import NonRetryableError
from kflow.model.messages import Command, Task
from kflow.schemas.codec import decode_command, encode_task
from kflow.streams.topics import ensure_topics
from kflow.testing import assert_eventually
from kflow.worker import (
    ActivityDefinitionError,
    DuplicateActivityError,
    NotInActivityError,
    Worker,
    activity,
    collect_activities,
    current_task,
    heartbeat,
)

DEADLINE = 30.0


# ---------------------------------------------------------------------------- helpers


def make_config(bootstrap: str, prefix: str, **kw: Any) -> WorkerConfig:
    kw.setdefault("partitions", 2)
    return WorkerConfig(bootstrap=bootstrap, topic_prefix=prefix, dev_tuning=True, **kw)


def task(name: str, input: Any = None, queue: str = "default", instance_id: str | None = None) -> Task:
    iid = instance_id or f"wf-{uuid.uuid4().hex[:8]}"
    return Task(instance_id=iid, activity_id=f"{iid}:a1", attempt=1, name=name, queue=queue, input=input,
                workflow="test", scheduled_ms=int(time.time() * 1000))


class Topics:
    """Produce tasks and read back what the worker wrote, for one topic prefix."""

    def __init__(self, cfg: WorkerConfig, queues: list[str]) -> None:
        self.cfg = cfg
        ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings, queues=queues)
        self.producer = Producer(cfg.producer_conf())
        self._readers: list[Reader] = []

    def produce(self, *tasks: Task, queue: str = "default") -> None:
        for t in tasks:
            self.producer.produce(self.cfg.names.tasks(queue), encode_task(t), t.instance_id.encode())
        assert self.producer.flush(10) == 0

    def produce_raw(self, value: bytes, key: bytes, queue: str = "default") -> None:
        self.producer.produce(self.cfg.names.tasks(queue), value, key)
        assert self.producer.flush(10) == 0

    def reader(self, topic: str) -> Reader:
        r = Reader(self.cfg, topic)
        self._readers.append(r)
        return r

    def close(self) -> None:
        for r in self._readers:
            r.close()
        self.producer.close()


class Reader:
    """Reads every record of one topic from the beginning (assigned, no group)."""

    def __init__(self, cfg: WorkerConfig, topic: str) -> None:
        self.consumer = Consumer({"bootstrap.servers": cfg.bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False, "isolation.level": "read_committed"})
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.records: list[Any] = []

    def poll(self) -> list[Any]:
        for m in self.consumer.consume(500, 0.1):
            assert m.error() is None, m.error()
            self.records.append(m)
        return self.records

    def close(self) -> None:
        self.consumer.close()


class Commands:
    """Decoded commands from the commands topic."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader

    def all(self) -> list[Command]:
        out = []
        for m in self.reader.poll():
            cmd = decode_command(m.value())
            assert m.key().decode() == cmd.instance_id
            out.append(cmd)
        return out

    def wait(self, pred: Callable[[Command], bool], n: int = 1, timeout: float = DEADLINE) -> list[Command]:
        def enough() -> list[Command] | None:
            found = [c for c in self.all() if pred(c)]
            return found if len(found) >= n else None

        return assert_eventually(enough, timeout=timeout, msg=f"{n} matching command(s)")

    def result_for(self, t: Task, timeout: float = DEADLINE) -> Command:
        kinds = ("CompleteActivity", "FailActivity")
        [cmd] = self.wait(lambda c: c.type in kinds and c.data["activity_id"] == t.activity_id, timeout=timeout)
        assert cmd.instance_id == t.instance_id and cmd.data["attempt"] == t.attempt
        return cmd


class Gate:
    """Lets a test hold activities inside their run and count how many run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: dict[Any, threading.Event] = {}
        self.running: set[Any] = set()
        self.max_running = 0

    def event(self, key: Any) -> threading.Event:
        with self.lock:
            return self.events.setdefault(key, threading.Event())

    def hold(self, key: Any, timeout: float = 60) -> None:
        with self.lock:
            self.running.add(key)
            self.max_running = max(self.max_running, len(self.running))
        try:
            assert self.event(key).wait(timeout), f"gate {key!r} never opened"
        finally:
            with self.lock:
                self.running.discard(key)

    def release(self, key: Any) -> None:
        self.event(key).set()

    def release_all(self) -> None:
        with self.lock:
            keys = list(self.events)
        for k in keys:
            self.events[k].set()


def committed(cfg: WorkerConfig, group_id: str, topic: str, partition: int = 0) -> int | None:
    """The group's committed offset of one partition, read without joining the group."""
    c = Consumer({"bootstrap.servers": cfg.bootstrap, "group.id": group_id, "enable.auto.commit": False})
    try:
        [tp] = c.committed([TopicPartition(topic, partition)], timeout=10)
    finally:
        c.close()
    return tp.offset if tp.offset >= 0 else None


# ---------------------------------------------------------------------------- activities under test

GATE = Gate()


@activity("t.inc")
def inc(x: int) -> int:
    return x + 1


@activity("t.echo")
async def echo(x: Any) -> Any:
    await asyncio.sleep(0)
    return {"echo": x, "task": current_task().activity_id}


@activity("t.declined")
def declined(_: Any) -> None:
    raise NonRetryableError("card declined", type="CardDeclined")


@activity("t.flaky")
def flaky(_: Any) -> None:
    raise ValueError("boom")


@activity("t.bad_result")
def bad_result(_: Any) -> Any:
    return {"an object": object()}  # no JSON form, even through the data converter


@activity("t.hold")
def hold(key: Any) -> Any:
    GATE.hold(key)
    return key


@activity("t.beat")
def beat(key: Any) -> Any:
    heartbeat({"progress": key})
    GATE.hold(key)
    return "done"


@activity("t.upper", queue="other")
async def upper(s: str) -> str:
    return s.upper()


@pytest.fixture
def gate() -> Iterator[Gate]:
    global GATE
    GATE = Gate()
    try:
        yield GATE
    finally:
        GATE.release_all()


@pytest.fixture
def running() -> Iterator[Callable[..., Worker]]:
    """Start workers in threads; they are stopped (and their errors raised) at teardown."""
    started: list[Worker] = []

    def start(cfg: WorkerConfig, activities: Any, **kw: Any) -> Worker:
        w = Worker(cfg, activities, **kw)
        w.start_in_thread()
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(timeout=60)


# ---------------------------------------------------------------------------- registration (no broker)


def test_activity_decorator_validates_and_keeps_the_function() -> None:
    assert inc(1) == 2
    with pytest.raises(ActivityDefinitionError) as ei:
        activity("")(lambda x: x)
    assert "non-empty" in str(ei.value)
    with pytest.raises(ActivityDefinitionError) as ei:
        activity("x", queue="")(lambda a, b: a)
    assert len(ei.value.problems) == 2  # empty queue and wrong arity, reported together
    with pytest.raises(ActivityDefinitionError):
        activity("x")(42)  # type: ignore[arg-type]

    @activity
    def bare(x: Any) -> Any:
        return x

    assert collect_activities([]) == {}
    assert Worker(WorkerConfig(), [bare]).activities == {"default": ["bare"]}


def test_collect_activities_lists_every_duplicate() -> None:
    import types

    m1, m2 = types.ModuleType("m1"), types.ModuleType("m2")
    m1.a = activity("dup.a")(lambda x: 1)
    m1.b = activity("dup.b")(lambda x: 1)
    m2.a = activity("dup.a")(lambda x: 2)
    m2.b = activity("dup.b")(lambda x: 2)
    m2.c = activity("dup.a", queue="q2")(lambda x: 3)  # same name, other queue: fine
    m2.same = m1.a  # the same function reached twice: fine
    with pytest.raises(DuplicateActivityError) as ei:
        collect_activities([m1, m2])
    assert set(ei.value.duplicates) == {("default", "dup.a"), ("default", "dup.b")}
    assert "dup.a" in str(ei.value) and "dup.b" in str(ei.value)
    del m2.a, m2.b
    found = collect_activities([m1, m2])
    assert set(found["default"]) == {"dup.a", "dup.b"} and set(found["q2"]) == {"dup.a"}


def test_heartbeat_outside_an_activity_is_an_error() -> None:
    with pytest.raises(NotInActivityError):
        heartbeat()
    with pytest.raises(NotInActivityError):
        current_task()


# ---------------------------------------------------------------------------- against the broker


def test_sync_and_async_results_on_two_queues(kafka_bootstrap: str, topic_prefix: str, running: Any) -> None:
    cfg = make_config(kafka_bootstrap, topic_prefix)
    io = Topics(cfg, ["default", "other"])
    try:
        cmds = Commands(io.reader(cfg.names.commands))
        w = running(cfg, [inc, echo, upper])
        assert w.group_ids == {"default": f"{topic_prefix}worker.default", "other": f"{topic_prefix}worker.other"}
        ts = [task("t.inc", i) for i in range(5)]
        te = task("t.echo", {"k": [1, 2]})
        tu = task("t.upper", "abc", queue="other")
        io.produce(*ts, te)
        io.produce(tu, queue="other")
        for i, t in enumerate(ts):
            cmd = cmds.result_for(t)
            assert cmd.type == "CompleteActivity" and cmd.data["result"] == i + 1
        assert cmds.result_for(te).data["result"] == {"echo": {"k": [1, 2]}, "task": te.activity_id}
        assert cmds.result_for(tu).data["result"] == "ABC"
    finally:
        io.close()


def test_failures_are_reported_with_retryability(kafka_bootstrap: str, topic_prefix: str, running: Any) -> None:
    cfg = make_config(kafka_bootstrap, topic_prefix)
    io = Topics(cfg, ["default"])
    try:
        cmds = Commands(io.reader(cfg.names.commands))
        running(cfg, [declined, flaky, bad_result])
        td, tf, tb = task("t.declined"), task("t.flaky"), task("t.bad_result")
        io.produce(td, tf, tb)
        d = cmds.result_for(td)
        assert d.type == "FailActivity"
        assert (d.data["error_type"], d.data["message"], d.data["retryable"]) == ("CardDeclined", "card declined", False)
        f = cmds.result_for(tf)
        assert (f.data["error_type"], f.data["message"], f.data["retryable"]) == ("ValueError", "boom", True)
        b = cmds.result_for(tb)
        assert b.type == "FailActivity" and b.data["error_type"] == "InvalidResult" and not b.data["retryable"]
    finally:
        io.close()


def test_unknown_activity_and_garbage_go_to_the_dlq(kafka_bootstrap: str, topic_prefix: str, running: Any) -> None:
    cfg = make_config(kafka_bootstrap, topic_prefix, partitions=1)
    io = Topics(cfg, ["default"])
    try:
        cmds = Commands(io.reader(cfg.names.commands))
        dlq = io.reader(cfg.names.dlq)
        w = running(cfg, [inc])
        tu = task("t.nobody")
        io.produce_raw(b"not avro", tu.instance_id.encode())
        io.produce(tu)
        fail = cmds.result_for(tu)
        assert fail.type == "FailActivity" and fail.data["error_type"] == "UnknownActivity"
        assert fail.data["retryable"] is False and "t.nobody" in fail.data["message"]
        records = assert_eventually(lambda: dlq.poll() if len(dlq.poll()) >= 2 else None, timeout=DEADLINE)
        garbage, unknown = records
        for rec, offset in ((garbage, 0), (unknown, 1)):
            h = dict(rec.headers())
            assert h["kflow.original.topic"] == cfg.names.tasks("default").encode()
            assert h["kflow.original.partition"] == b"0" and h["kflow.original.offset"] == str(offset).encode()
            assert int(h["kflow.time"]) > 0 and rec.key() == tu.instance_id.encode()
        assert dict(garbage.headers())["kflow.reason"].startswith(b"undecodable task")
        assert b"unknown activity 't.nobody'" in dict(unknown.headers())["kflow.reason"]
        assert garbage.value() == b"not avro" and unknown.value() == encode_task(tu)
        # The garbage record produced no command: only the UnknownActivity failure is there.
        assert [c.type for c in cmds.all()] == ["FailActivity"]
        topic = cfg.names.tasks("default")
        assert_eventually(lambda: committed(cfg, w.group_id, topic) == 2, timeout=DEADLINE)
    finally:
        io.close()


def test_in_flight_limit_is_respected(kafka_bootstrap: str, topic_prefix: str, running: Any, gate: Gate) -> None:
    cfg = make_config(kafka_bootstrap, topic_prefix, concurrency=2)
    io = Topics(cfg, ["default"])
    try:
        cmds = Commands(io.reader(cfg.names.commands))
        running(cfg, [hold])
        ts = [task("t.hold", i) for i in range(6)]
        io.produce(*ts)
        done: set[int] = set()
        for _ in range(len(ts)):
            # Wait until the worker has filled every slot it may (two, or what is left).
            want = min(2, len(ts) - len(done))
            assert_eventually(lambda want=want: len(gate.running) == want, timeout=DEADLINE, msg=f"{want} running")
            assert gate.max_running <= 2
            key = sorted(gate.running)[0]
            gate.release(key)
            done.add(key)
            cmds.result_for(ts[key])
        assert gate.max_running == 2 and done == set(range(6))
    finally:
        io.close()


def test_commits_only_the_contiguous_prefix(kafka_bootstrap: str, topic_prefix: str, running: Any, gate: Gate) -> None:
    cfg = make_config(kafka_bootstrap, topic_prefix, partitions=1, concurrency=4)
    io = Topics(cfg, ["default"])
    topic = cfg.names.tasks("default")
    try:
        cmds = Commands(io.reader(cfg.names.commands))
        w = running(cfg, [inc, hold])
        first = task("t.inc", 1)
        io.produce(first)  # offset 0
        cmds.result_for(first)
        assert_eventually(lambda: committed(cfg, w.group_id, topic) == 1, timeout=DEADLINE)
        t1, t2 = task("t.hold", "one"), task("t.hold", "two")
        io.produce(t1, t2)  # offsets 1 and 2
        assert_eventually(lambda: gate.running == {"one", "two"}, timeout=DEADLINE)
        gate.release("two")
        cmds.result_for(t2)
        # Task 2 is done but task 1 runs: for several commit intervals the offset stays at 1.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert committed(cfg, w.group_id, topic) == 1
        gate.release("one")
        cmds.result_for(t1)
        assert_eventually(lambda: committed(cfg, w.group_id, topic) == 3, timeout=DEADLINE)
    finally:
        io.close()


def test_heartbeats_manual_and_automatic(kafka_bootstrap: str, topic_prefix: str, running: Any, gate: Gate) -> None:
    cfg = make_config(kafka_bootstrap, topic_prefix, heartbeat_interval_ms=200)
    io = Topics(cfg, ["default"])
    try:
        cmds = Commands(io.reader(cfg.names.commands))
        running(cfg, [beat])
        t = task("t.beat", 7)
        io.produce(t)

        def beats_of(c: Command) -> bool:
            return c.type == "HeartbeatActivity" and c.data["activity_id"] == t.activity_id

        # The manual heartbeat, then automatic ones repeating its details while the activity waits.
        hbs = cmds.wait(beats_of, n=3)
        assert all(h.data["details"] == {"progress": 7} and h.data["attempt"] == 1 for h in hbs)
        assert len({h.command_id for h in hbs}) == len(hbs)
        gate.release(7)
        assert cmds.result_for(t).data["result"] == "done"
    finally:
        io.close()


def test_graceful_stop_finishes_in_flight_work(kafka_bootstrap: str, topic_prefix: str, gate: Gate) -> None:
    cfg = make_config(kafka_bootstrap, topic_prefix, partitions=1)
    io = Topics(cfg, ["default"])
    topic = cfg.names.tasks("default")
    try:
        cmds = Commands(io.reader(cfg.names.commands))
        w = Worker(cfg, [hold])
        w.start_in_thread()
        t = task("t.hold", "slow")
        io.produce(t)
        assert_eventually(lambda: gate.running == {"slow"}, timeout=DEADLINE)
        stopper = threading.Thread(target=w.stop, kwargs={"timeout": 60})
        stopper.start()
        gate.release("slow")
        stopper.join(60)
        assert not stopper.is_alive()
        assert cmds.result_for(t).data["result"] == "slow"
        assert committed(cfg, w.group_id, topic) == 1
    finally:
        io.close()


def test_partitions_move_between_workers_without_losing_tasks(
    kafka_bootstrap: str, topic_prefix: str, running: Any
) -> None:
    cfg = make_config(kafka_bootstrap, topic_prefix, partitions=4)
    io = Topics(cfg, ["default"])
    topic = cfg.names.tasks("default")
    try:
        cmds = Commands(io.reader(cfg.names.commands))
        produced: list[Task] = []

        def round_trip(n: int) -> None:
            batch = [task("t.inc", len(produced) + i) for i in range(n)]
            produced.extend(batch)
            io.produce(*batch)
            for t in batch:
                assert cmds.result_for(t).data["result"] == t.input + 1

        first = running(cfg, [inc])
        round_trip(20)
        second = running(cfg, [inc])  # joins the group: the partitions are split
        assert second.group_id == first.group_id
        assert second.wait_assigned(DEADLINE)
        round_trip(20)
        first.stop(timeout=60)  # leaves the group: the second worker owns every partition
        round_trip(20)

        def all_committed() -> bool:
            return sum(committed(cfg, first.group_id, topic, p) or 0 for p in range(4)) == len(produced)

        assert_eventually(all_committed, timeout=DEADLINE, msg="every task's offset committed")
    finally:
        io.close()
