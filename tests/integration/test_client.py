"""The client against a real broker: what it produces, and how it reads the state topic back.

The engine is not involved: tests write the state records themselves (as the engine would, with
``encode_state``) and check that ``status(scan=True)``/``result``/``wait_many`` see them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from kflow.client import Client
from kflow.config import KafkaConfig
from kflow.model.errors import BrokerUnavailable, DefinitionError, WorkflowFailedError
from kflow.model.messages import Status
from kflow.schemas.codec import decode_command, decode_definition, encode_engine_state, encode_state
from kflow.streams.partitioner import partition_for
from kflow.streams.topics import ensure_topics
from kflow.testing import assert_eventually

PARTITIONS = 4
SPEC = {"name": "greet", "version": 3, "steps": [
    {"id": "hello", "task": "t.hello", "input": "input", "output": "greeting"},
    {"id": "done", "succeed": "greeting"},
]}


@pytest.fixture
def config(kafka_bootstrap: str, topic_prefix: str) -> KafkaConfig:
    """Topics created as an engine (or ``kflow topics ensure``) would: these tests run the client alone."""
    cfg = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, partitions=PARTITIONS, dev_tuning=True)
    ensure_topics(cfg.client_conf(), cfg.names, cfg.topic_settings, queues=["default"])
    return cfg


@pytest.fixture
def client(config: KafkaConfig) -> Iterator[Client]:
    with Client(config=config) as c:
        yield c


@pytest.fixture
def producer(config: KafkaConfig) -> Iterator[Producer]:
    p = Producer(config.producer_conf(acks="all", **{"client.id": "test-producer"}))
    yield p
    p.flush(10)
    if hasattr(p, "close"):  # confluent-kafka >= 2.13; older ones free it on garbage collection
        p.close()


def _state(iid: str, status: str, seq: int, *, result: Any = None, error: tuple[str, str] | None = None) -> dict:
    now = int(time.time() * 1000)
    return {"instance_id": iid, "workflow": "greet", "version": 3, "status": status, "seq": seq,
            "started_ms": now - 100, "updated_ms": now, "closed_ms": now if status in Status.TERMINAL else None,
            "result": result, "error_type": error[0] if error else None,
            "error_message": error[1] if error else None}


def _engine_state(st: dict) -> bytes:
    """The ``engine-state`` record the engine writes beside the public record ``st``."""
    error = {"type": st["error_type"], "message": st["error_message"]} if st["error_type"] else None
    return encode_engine_state(st["instance_id"], {
        "id": st["instance_id"], "error": error, "threads": {},
        **{k: st[k] for k in ("workflow", "version", "status", "seq", "started_ms", "updated_ms", "closed_ms", "result")}})


def _write_states(producer: Producer, topic: str, *states: dict) -> None:
    """Each of ``states`` to the public ``topic`` and its engine state to ``engine-state``, as the engine does."""
    engine_topic = topic.removesuffix("state") + "engine-state"
    for st in states:
        producer.produce(topic, encode_state(st), st["instance_id"].encode())
        producer.produce(engine_topic, _engine_state(st), st["instance_id"].encode())
    assert producer.flush(10) == 0


def _read_all(config: KafkaConfig, topic: str, expected: int, timeout: float = 20) -> list:
    """Every record of ``topic`` (all partitions, from the beginning) once ``expected`` arrived."""
    consumer = Consumer(config.consumer_conf(f"test-{uuid.uuid4().hex}"))
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    records: list = []
    try:
        def enough() -> bool:
            for msg in consumer.consume(100, 0.2):
                assert msg.error() is None, msg.error()
                records.append(msg)
            return len(records) >= expected
        assert_eventually(enough, timeout=timeout, msg=f"{expected} record(s) on {topic}")
    finally:
        consumer.close()
    return records


# --------------------------------------------------------------------------- producing


def test_deploy_publishes_the_definition(client: Client, config: KafkaConfig, tmp_path: Path) -> None:
    definition = client.deploy(SPEC)
    assert definition.key == "greet@3" and definition.kind == "spec" and definition.body == SPEC

    path = tmp_path / "greet.yaml"
    path.write_text("name: greet\nversion: 4\nsteps:\n  - id: done\n    succeed: input\n")
    assert client.deploy(path).key == "greet@4"

    records = _read_all(config, client.names.definitions, 2)
    assert [m.key() for m in records] == [b"greet@3", b"greet@4"]
    first = decode_definition(records[0].value())
    assert (first.name, first.version, first.kind, first.body) == ("greet", 3, "spec", SPEC)
    assert first.deployed_ms > 0
    assert decode_definition(records[1].value()).body["steps"] == [{"id": "done", "succeed": "input"}]


def test_deploy_validates_before_connecting() -> None:
    bad = {"name": "bad", "version": 1, "steps": [{"id": "nap", "sleep": "forever"}]}
    with Client("127.0.0.1:1") as unreachable:
        with pytest.raises(DefinitionError, match="nap"):
            unreachable.deploy(bad)


def test_start_produces_start_workflow_on_the_id_partition(client: Client, config: KafkaConfig) -> None:
    # no engine and no deploy here: the client's deployed-check is off, the command is what is tested
    handle = client.start("greet", {"name": "ada"}, id="order-1", version=3, id_reuse="allow_if_closed",
                          require_deployed=False)
    generated = client.start("greet", require_deployed=False)
    assert handle.id == "order-1"
    assert len(generated.id) == 32 and int(generated.id, 16) >= 0

    records = {m.key(): m for m in _read_all(config, client.names.commands, 2)}
    msg = records[b"order-1"]
    assert msg.partition() == partition_for("order-1", PARTITIONS)
    cmd = decode_command(msg.value())
    assert (cmd.type, cmd.instance_id) == ("StartWorkflow", "order-1")
    assert cmd.data == {"workflow": "greet", "version": 3, "input": {"name": "ada"}, "parent_id": None,
                        "parent_ref": None, "id_reuse": "allow_if_closed", "priority": None}
    assert cmd.command_id and cmd.ts > 0

    other = records[generated.id.encode()]
    assert other.partition() == partition_for(generated.id, PARTITIONS)
    assert decode_command(other.value()).data["version"] is None


def test_signal_and_cancel_produce_commands(client: Client, config: KafkaConfig) -> None:
    handle = client.handle("order-2")
    client.signal("order-2", "approval", {"by": "alice"})
    handle.signal("nudge")
    handle.cancel("customer withdrew")

    records = _read_all(config, client.names.commands, 3)
    assert {m.partition() for m in records} == {partition_for("order-2", PARTITIONS)}
    cmds = [decode_command(m.value()) for m in records]
    assert [(c.type, c.instance_id, c.data) for c in cmds] == [
        ("SignalWorkflow", "order-2", {"name": "approval", "data": {"by": "alice"}}),
        ("SignalWorkflow", "order-2", {"name": "nudge", "data": None}),
        ("CancelWorkflow", "order-2", {"reason": "customer withdrew"}),
    ]
    assert len({c.command_id for c in cmds}) == 3


def test_start_rejects_an_unknown_id_reuse_policy(client: Client) -> None:
    with pytest.raises(ValueError, match="id_reuse"):
        client.start("greet", id="x", id_reuse="sometimes")


# --------------------------------------------------------------------------- reading state


def test_status_returns_the_latest_record_for_the_id(client: Client, producer: Producer) -> None:
    topic = client.names.state
    assert client.status("a", scan=True) is None
    _write_states(producer, topic,
                  _state("a", Status.RUNNING, 1), _state("b", Status.RUNNING, 1),
                  _state("a", Status.RUNNING, 2), _state("a", Status.COMPLETED, 3, result={"ok": True}),
                  _state("b", Status.RUNNING, 2))
    st = client.status("a", scan=True)
    assert st is not None
    assert (st["instance_id"], st["status"], st["seq"], st["result"]) == ("a", "COMPLETED", 3, {"ok": True})
    assert st["workflow"] == "greet" and st["version"] == 3 and st["internal"]["seq"] == 3
    assert st["events_offset"] is None  # a state record without one
    assert client.status("b", scan=True)["seq"] == 2  # type: ignore[index]
    assert client.status("never", scan=True) is None
    assert client.handle("a").status(scan=True) == st


def test_status_reads_transactional_records(client: Client, config: KafkaConfig) -> None:
    """The engine writes state in transactions; the scan must end at the commit marker."""
    topic = client.names.state
    client.status("warm-up", scan=True)  # creates the topics
    tx = Producer(config.producer_conf(**{"transactional.id": f"test-{uuid.uuid4().hex}"}))
    tx.init_transactions(20)
    tx.begin_transaction()
    for st in (_state("t1", Status.RUNNING, 1), _state("t1", Status.FAILED, 2, error=("Boom", "it broke"))):
        tx.produce(topic, encode_state(st), b"t1")
        tx.produce(client.names.engine_state, _engine_state(st), b"t1")
    tx.commit_transaction(20)
    started = time.monotonic()
    st = client.status("t1", scan=True)
    assert st is not None and st["status"] == "FAILED" and st["seq"] == 2
    assert time.monotonic() - started < 10
    with pytest.raises(WorkflowFailedError, match="it broke"):
        client.result("t1", timeout=5)


def _produce_when_waiting(client: Client, producer: Producer, iid: str, *states: dict) -> threading.Thread:
    """Write ``states`` from another thread once a caller waits for ``iid``."""
    errors: list[BaseException] = []

    def later() -> None:
        try:
            assert_eventually(lambda: client.watcher().is_waiting(iid), timeout=20, msg=f"a waiter for {iid}")
            _write_states(producer, client.names.state, *states)
        except BaseException as exc:  # surfaced by the join below
            errors.append(exc)

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    thread.errors = errors  # type: ignore[attr-defined]
    return thread


def _join(thread: threading.Thread) -> None:
    thread.join(20)
    assert not thread.is_alive()
    assert not thread.errors, thread.errors  # type: ignore[attr-defined]


def test_result_returns_once_a_terminal_record_arrives(client: Client, producer: Producer) -> None:
    handle = client.start("greet", {"name": "ada"}, require_deployed=False)
    thread = _produce_when_waiting(client, producer, handle.id, _state(handle.id, Status.RUNNING, 1),
                                   _state(handle.id, Status.COMPLETED, 5, result="hello ada"))
    assert handle.result(timeout=30) == "hello ada"
    _join(thread)
    # Remembered by the watcher: asking again answers at once.
    assert client.result(handle.id, timeout=0.5) == "hello ada"


def test_result_that_arrived_before_the_call_is_not_missed(client: Client, producer: Producer) -> None:
    handle = client.start("greet", require_deployed=False)
    _write_states(producer, client.names.state, _state(handle.id, Status.COMPLETED, 2, result="early"))
    assert_eventually(lambda: client.watcher().terminal(handle.id), timeout=20, msg="the watcher saw the result")
    assert handle.result(timeout=1) == "early"


def test_result_for_an_id_started_elsewhere(client: Client, producer: Producer) -> None:
    done = _state("elsewhere", Status.COMPLETED, 2, result=[1, 2])
    thread = _produce_when_waiting(client, producer, "elsewhere", done)
    assert client.result("elsewhere", timeout=30) == [1, 2]
    _join(thread)


def test_result_of_an_instance_that_finished_before_the_client_existed(config: KafkaConfig, producer: Producer) -> None:
    with Client(config=config) as first:
        first.status("x", scan=True)  # creates the topics
    _write_states(producer, config.names.state, _state("old", Status.COMPLETED, 4, result={"n": 4}))
    with Client(config=config) as fresh:
        assert fresh.result("old", timeout=10) == {"n": 4}


@pytest.mark.parametrize("status", [Status.FAILED, Status.CANCELLED])
def test_result_raises_when_the_workflow_did_not_complete(client: Client, producer: Producer, status: str) -> None:
    handle = client.start("greet", require_deployed=False)
    thread = _produce_when_waiting(client, producer, handle.id,
                                   _state(handle.id, status, 3, error=("CardDeclined", "card declined")))
    with pytest.raises(WorkflowFailedError) as info:
        handle.result(timeout=30)
    _join(thread)
    err = info.value
    assert (err.instance_id, err.status, err.error_type, err.message) == (handle.id, status, "CardDeclined",
                                                                        "card declined")


def test_result_times_out_when_nothing_comes(client: Client, producer: Producer) -> None:
    handle = client.start("greet", require_deployed=False)
    _write_states(producer, client.names.state, _state(handle.id, Status.RUNNING, 1))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=handle.id):
        handle.result(timeout=1.0)
    assert 0.9 <= time.monotonic() - started < 10
    assert not client.watcher().is_waiting(handle.id)


def test_wait_many(client: Client, producer: Producer) -> None:
    _write_states(producer, client.names.state, _state("done-before", Status.COMPLETED, 2, result=0))
    handles = [client.start("greet", i, confirm=False, require_deployed=False) for i in range(20)]
    client.flush()
    ids = [h.id for h in handles]
    finished = [_state(i, Status.COMPLETED, 2, result=n) for n, i in enumerate(ids[:19])]
    thread = _produce_when_waiting(client, producer, ids[0], *finished)
    states = client.wait_many([*ids, "done-before"], timeout=3)
    _join(thread)
    assert set(states) == {*ids[:19], "done-before"}
    assert [states[i]["result"] for i in ids[:19]] == list(range(19))


def test_unreachable_broker_fails_fast() -> None:
    started = time.monotonic()
    with Client("127.0.0.1:1", connect_timeout=2) as unreachable:
        with pytest.raises(BrokerUnavailable, match="127.0.0.1:1"):
            unreachable.start("greet")
        with pytest.raises(BrokerUnavailable):
            unreachable.status("x")
    assert time.monotonic() - started < 10


# --------------------------------------------------------------------------- the CLI over a real broker


def test_cli_round_trip(config: KafkaConfig, producer: Producer, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kflow.cli import app

    runner = CliRunner()
    conn = ["--bootstrap", config.bootstrap, "--prefix", config.topic_prefix]
    spec = tmp_path / "greet.yaml"
    spec.write_text("name: greet\nversion: 2\nsteps:\n  - id: done\n    succeed: input\n")

    deployed = runner.invoke(app, ["deploy", str(spec), *conn])
    assert deployed.exit_code == 0, deployed.output
    assert deployed.stdout.strip() == "deployed greet@2"

    started = runner.invoke(app, ["start", "greet", "--input", '{"n": 1}', "--id", "cli-1", *conn])
    assert started.exit_code == 0, started.output
    assert started.stdout.strip() == "cli-1"

    missing = runner.invoke(app, ["status", "cli-1", "--scan", *conn])
    assert missing.exit_code == 1 and "no state for workflow instance 'cli-1'" in missing.stderr

    _write_states(producer, config.names.state, _state("cli-1", Status.COMPLETED, 3, result={"n": 1}),
                  _state("cli-2", Status.FAILED, 2, error=("Boom", "it broke")),
                  _state("cli-3", Status.RUNNING, 1))
    shown = runner.invoke(app, ["status", "cli-1", "--scan", *conn], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    for text in ("COMPLETED", "greet@3", '{"n": 1}'):
        assert text in shown.stdout
    raw = runner.invoke(app, ["status", "cli-3", "--json", "--scan", *conn])
    assert raw.exit_code == 0 and '"status": "RUNNING"' in raw.stdout

    ok = runner.invoke(app, ["result", "cli-1", "--timeout", "10", *conn])
    assert (ok.exit_code, ok.stdout.strip()) == (0, '{"n": 1}')
    failed = runner.invoke(app, ["result", "cli-2", "--timeout", "10", *conn])
    assert failed.exit_code == 1 and failed.stdout == ""
    assert failed.stderr.strip() == "error: workflow cli-2 failed: Boom: it broke"
    slow = runner.invoke(app, ["result", "cli-3", "--timeout", "1", *conn])
    assert slow.exit_code == 2 and "did not finish within 1s" in slow.stderr

    signalled = runner.invoke(app, ["signal", "cli-3", "go", "--data", "[1, 2]", *conn])
    cancelled = runner.invoke(app, ["cancel", "cli-3", "--reason", "enough", *conn])
    assert signalled.exit_code == 0 and cancelled.exit_code == 0
    cmds = [decode_command(m.value()) for m in _read_all(config, config.names.commands, 3) if m.key() == b"cli-3"]
    assert [(c.type, c.data) for c in cmds] == [("SignalWorkflow", {"name": "go", "data": [1, 2]}),
                                                   ("CancelWorkflow", {"reason": "enough"})]
