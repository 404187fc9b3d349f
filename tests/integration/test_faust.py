"""Faust downstream of kflow: the SLA example app on a real run, and kflow.faust's models on real records.

The example runs as users run it (``python examples/faust_sla/app.py worker``) in a subprocess
against the session broker, over the topics of an engine and a worker in this process. It must
count the open instances per workflow, alert once on the instance that outlives its SLA while it
waits for a signal, keep its table across a restart, and count instances out as signals complete
them. Its fold of one state change is a pure function, checked here without a broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from faust.exceptions import ValueDecodeError
from faust.serializers.registry import Registry

from examples.faust_sla.app import OpenInstance, track_step
from kflow.faust import EVENT_CODEC, STATE_CODEC, HistoryEvent, StateChange
from kflow.schemas.codec import decode_event, decode_state
from kflow.testing import assert_eventually
from tests.integration.conftest import PARTITIONS, Stack
from tests.net import free_port, http_get

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "faust_sla" / "app.py"

#: Waits for a signal from its first step: open for as long as the test wants, and its only
#: record while it waits is the one its start wrote, so only the timer can see it overdue.
SLOW = {"name": "sla-slow", "version": 1, "steps": [
    {"id": "gate", "wait": {"signal": "go"}},
    {"id": "done", "succeed": "input + 1"}]}
#: Runs an activity, then waits, under an SLA it never reaches.
CALM = {"name": "sla-calm", "version": 1, "steps": [
    {"id": "inc", "task": "t.inc", "input": "input", "output": "n"},
    {"id": "gate", "wait": {"signal": "go"}},
    {"id": "done", "succeed": "n"}]}
SLAS = {SLOW["name"]: "1s", CALM["name"]: "1h"}


class Watchdog:
    """The example app in a subprocess, and the test's views of it: its web page and its alerts."""

    def __init__(self, stack: Stack, cwd: Path, app_id: str, alerts_topic: str, log: Path) -> None:
        self.port, self.log = free_port(), log
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "KFLOW_BOOTSTRAP": stack.bootstrap, "KFLOW_TOPIC_PREFIX": stack.prefix,
               "KFLOW_PARTITIONS": str(PARTITIONS), "KFLOW_DEV_TUNING": "true",
               "KFLOW_SLA_APP_ID": app_id, "KFLOW_SLA_BY_WORKFLOW": json.dumps(SLAS),
               "KFLOW_SLA_ALERTS_TOPIC": alerts_topic, "KFLOW_SLA_CHECK_EVERY": "200ms",
               "KFLOW_SLA_WEB_PORT": str(self.port)}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(APP), "worker", "-l", "info"], cwd=cwd, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def open_counts(self) -> dict[str, int] | None:
        """The app's open instances per workflow (GET /open/), or None until it has read its table back."""
        self.check_alive()
        status, body = http_get(f"http://127.0.0.1:{self.port}/open/")
        return json.loads(body) if status == 200 else None

    def stop(self) -> int:
        """SIGTERM, as a process manager stops it; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the Faust worker ignored SIGTERM:\n{self.tail()}") from None
        return self.proc.returncode

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the Faust worker exited with {self.proc.returncode}:\n{self.tail()}")


class Deployment:
    """One app id and its alerts topic; watchdogs started on it share their table and offsets."""

    def __init__(self, stack: Stack, cwd: Path) -> None:
        self.stack, self.cwd = stack, cwd
        self.app_id = f"sla-{uuid.uuid4().hex[:8]}"
        self.alerts_topic = f"{stack.prefix}sla-alerts"
        _create_topics(stack.bootstrap, [NewTopic(self.alerts_topic, 1, 1, config={"cleanup.policy": "delete"})])
        self.watchdogs: list[Watchdog] = []
        self._alerts = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"{self.app_id}-reader",
                                 "enable.auto.commit": False})
        self._alerts.assign([TopicPartition(self.alerts_topic, 0, OFFSET_BEGINNING)])
        self.alerts: list[dict[str, Any]] = []

    def start(self) -> Watchdog:
        log = self.cwd / f"faust-{len(self.watchdogs)}.log"
        self.watchdogs.append(Watchdog(self.stack, self.cwd, self.app_id, self.alerts_topic, log))
        return self.watchdogs[-1]

    def read_alerts(self) -> list[dict[str, Any]]:
        """Every alert record so far, with its key."""
        for dog in self.watchdogs:
            if dog.proc.returncode is None:
                dog.check_alive()
        for msg in self._alerts.consume(100, timeout=0.2):
            assert msg.error() is None, msg.error()
            self.alerts.append({"key": msg.key().decode(), **json.loads(msg.value())})
        return self.alerts

    def alerts_for(self, instance_id: str) -> Callable[[], list[dict[str, Any]]]:
        return lambda: [a for a in self.read_alerts() if a["key"] == instance_id]

    def close(self) -> None:
        for dog in self.watchdogs:
            dog.stop()
        self._alerts.close()


def _create_topics(bootstrap: str, topics: list[NewTopic]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # held until the futures resolve
    for future in admin.create_topics(topics, request_timeout=15).values():
        future.result()


def _counts(dog: Watchdog, expected: dict[str, int]) -> Callable[[], bool]:
    def probe() -> bool:
        got = dog.open_counts()
        assert got == expected, f"open counts {got}, expecting {expected}\n{dog.tail()}"
        return True
    return probe


@pytest.fixture
def deployment(engine_only_stack: Stack, tmp_path: Path) -> Iterator[Deployment]:
    from tests.integration import flows

    engine_only_stack.start_worker([flows])
    dep = Deployment(engine_only_stack, tmp_path)
    try:
        yield dep
    finally:
        dep.close()


def test_the_sla_example_counts_open_instances_and_alerts_once_on_a_breach(engine_only_stack: Stack,
                                                                           deployment: Deployment) -> None:
    client = engine_only_stack.client
    client.deploy(SLOW)
    client.deploy(CALM)
    # Runs start once the app serves its counts, i.e. has its partitions and its table: Faust
    # can drop a record fetched while a worker resumes after recovery (see the example's README).
    dog = deployment.start()
    assert_eventually(_counts(dog, {}), timeout=90)
    slow = client.start(SLOW["name"], 1, id=f"slow-{uuid.uuid4().hex[:6]}")
    calm = client.start(CALM["name"], 1, id=f"calm-{uuid.uuid4().hex[:6]}")
    assert_eventually(_counts(dog, {SLOW["name"]: 1, CALM["name"]: 1}), timeout=30)

    (alert,) = assert_eventually(deployment.alerts_for(slow.id), timeout=30, msg=f"an alert for {slow.id}")
    assert alert["instance_id"] == slow.id and alert["workflow"] == SLOW["name"] and alert["source"] == "timer"
    assert alert["sla_ms"] == 1000 and alert["open_ms"] > 1000

    # A restarted app reads its table back from its changelog: the counts stand, and the alerted
    # mark too. The sweep that alerts on a second slow instance walks the whole table, so had the
    # mark been lost it would have alerted on the first one again.
    assert dog.stop() == 0, dog.tail()
    dog = deployment.start()
    assert_eventually(_counts(dog, {SLOW["name"]: 1, CALM["name"]: 1}), timeout=90)
    slow2 = client.start(SLOW["name"], 2, id=f"slow-{uuid.uuid4().hex[:6]}")
    assert_eventually(deployment.alerts_for(slow2.id), timeout=30, msg=f"an alert for {slow2.id} after the restart")
    assert_eventually(_counts(dog, {SLOW["name"]: 2, CALM["name"]: 1}), timeout=30)
    assert sorted(a["key"] for a in deployment.read_alerts()) == sorted([slow.id, slow2.id]), \
        "one alert per overdue instance, none for the calm one"

    for handle, expected in ((slow, 2), (slow2, 3), (calm, 2)):
        client.signal(handle.id, "go")
        assert handle.result(timeout=60) == expected
    assert_eventually(_counts(dog, {}), timeout=30)
    assert dog.stop() == 0, dog.tail()


def _records(bootstrap: str, topic: str, key: str, until: Callable[[list[bytes]], bool]) -> list[bytes]:
    """The values of ``key``'s records on ``topic``, read from the beginning until ``until`` holds."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False})
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    values: list[bytes] = []

    def more() -> bool:
        values.extend(m.value() for m in consumer.consume(500, timeout=0.2)
                      if m.error() is None and m.key() == key.encode())
        return until(values)

    try:
        assert_eventually(more, timeout=30, msg=f"records of {key} on {topic}")
    finally:
        consumer.close()
    return values


def test_the_models_read_a_real_runs_state_and_events(engine_only_stack: Stack) -> None:
    client, names = engine_only_stack.client, engine_only_stack.client.names
    client.deploy(SLOW)
    run = client.start(SLOW["name"], 41, id=f"models-{uuid.uuid4().hex[:6]}")
    assert_eventually(lambda: (client.status(run.id) or {}).get("status") == "RUNNING", timeout=30)
    client.signal(run.id, "go", {"by": "ann"})
    assert run.result(timeout=60) == 42

    states = _records(engine_only_stack.bootstrap, names.state, run.id,
                      lambda vs: any(decode_state(v)["status"] == "COMPLETED" for v in vs))
    changes = [StateChange.loads(v) for v in states]  # the model names its codec: no serializer given
    assert [c.status for c in changes][-1] == "COMPLETED" and all(c.instance_id == run.id for c in changes)
    last, raw = changes[-1], decode_state(states[-1])
    assert last.closed and not changes[0].closed
    assert last.asdict() == raw  # every public field, as written
    assert "internal" not in raw and last.kind == "spec" and last.format_version == 2
    assert last.result == 42 and last.closed_ms is not None and last.workflow == SLOW["name"]

    values = _records(engine_only_stack.bootstrap, names.events, run.id,
                      lambda vs: any(decode_event(v).type == "WorkflowCompleted" for v in vs))
    events = [HistoryEvent.loads(v) for v in values]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "WorkflowStarted" and events[0].data["input"] == 41
    assert {"type": "SignalReceived", "name": "go", "data": {"by": "ann"}}.items() <= \
        {"type": events[1].type, **events[1].data}.items()
    assert events[-1].type == "WorkflowCompleted" and events[-1].data == {"result": 42}

    # a Faust table of these models writes its changelog with the same codecs and reads it back
    registry = Registry()
    assert registry.loads_value(StateChange, registry.dumps_value(StateChange, last), serializer=STATE_CODEC) == last
    for ev in events:
        assert registry.loads_value(HistoryEvent, registry.dumps_value(HistoryEvent, ev), serializer=EVENT_CODEC) == ev
    with pytest.raises(ValueDecodeError, match="wrong schema: expected state, got a event value"):
        registry.loads_value(StateChange, values[0], serializer=STATE_CODEC)


# -- the example's fold of one state change, without a broker ----------------------------------------------------


def _change(status: str, updated_ms: int, started_ms: int = 1_000) -> StateChange:
    return StateChange(instance_id="i-1", workflow="order", version=1, status=status, seq=1,
                       started_ms=started_ms, updated_ms=updated_ms)


def test_a_state_change_that_shows_a_breach_alerts_once() -> None:
    inst, breached = track_step(None, _change("RUNNING", 1_500), sla_ms=1_000)
    assert inst == OpenInstance(workflow="order", started_ms=1_000) and not breached
    assert track_step(inst, _change("RUNNING", 1_500), sla_ms=1_000) == (inst, False)  # a redelivery
    inst, breached = track_step(inst, _change("RUNNING", 2_001), sla_ms=1_000)
    assert inst is not None and inst.alerted and breached
    assert track_step(inst, _change("BLOCKED", 9_000), sla_ms=1_000) == (inst, False)
    assert track_step(inst, _change("COMPLETED", 9_500), sla_ms=1_000) == (None, False)


def test_closed_or_unwatched_instances_raise_no_alert() -> None:
    assert track_step(None, _change("FAILED", 5_000), sla_ms=1_000) == (None, False)
    inst, breached = track_step(None, _change("RUNNING", 99_000), sla_ms=None)
    assert inst is not None and not inst.alerted and not breached
