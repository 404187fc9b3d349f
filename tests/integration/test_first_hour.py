"""The first hour with the CLI on a real broker: processes started by hand, ``kflow dev``, late trigger topics.

Every process here is a real ``kflow`` child process (or a real trigger runner) against the
session's broker; the tests wait with ``assert_eventually`` on what a user would look at: log
lines, ``/readyz``, ``.kflow/dev.json`` and workflow status.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kflow.config import DEV_FILE, KafkaConfig, TriggerConfig, fit_to_cluster
from kflow.connectors.triggers import TriggerRunner, load_triggers
from kflow.streams.topics import PartitionCountMismatch, TopicNames, TopicSettings, ensure_topics
from kflow.testing import assert_eventually
from tests.net import free_port, http_get

ACTS = "from kflow import activity\n\n\n@activity(queue='fh')\ndef shout(text: str) -> str:\n    return text.upper()\n"


def _env(**extra: str) -> dict[str, str]:
    """The environment of a process a user starts by hand: no KFLOW_* settings but ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KFLOW_")}
    env.update({"KFLOW_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", **extra})
    return env


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start ``kflow ARGS`` in ``tmp_path`` with its output in a file; every child is stopped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], env: dict[str, str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(Path(sys.executable).with_name("kflow")), *args], cwd=tmp_path, env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc, log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _log_lines(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines()


def _logged(log: Path, pattern: str) -> bool:
    return any(re.search(pattern, line) for line in _log_lines(log))


def _create_instance_topics(bootstrap: str, prefix: str, partitions: int) -> None:
    ensure_topics({"bootstrap.servers": bootstrap}, TopicNames(prefix), TopicSettings(partitions=partitions),
                  queues=["default", "fh"])


# --------------------------------------------------------------------------- processes started by hand


def test_processes_started_by_hand_adopt_existing_topics_and_say_when_ready(
        kafka_bootstrap: str, tmp_path: Path, spawn: Any) -> None:
    """Topics with 4 partitions exist (as ``kflow dev`` makes them); an engine and a worker started with
    the default (8) adopt that count, import ``acts`` from the current folder, log one ready line
    and answer /readyz with 200, and librdkafka prints nothing raw."""
    prefix = f"fh{uuid.uuid4().hex[:8]}."
    _create_instance_topics(kafka_bootstrap, prefix, 4)
    (tmp_path / "acts.py").write_text(ACTS)
    ports = {"engine": free_port(), "worker": free_port()}
    common = {"KFLOW_BOOTSTRAP": kafka_bootstrap, "KFLOW_TOPIC_PREFIX": prefix}
    _, engine_log = spawn(["engine", "--state-dir", str(tmp_path / "state")],
                          _env(**common, KFLOW_METRICS_PORT=str(ports["engine"])), "engine")
    _, worker_log = spawn(["worker", "-m", "acts"], _env(**common, KFLOW_METRICS_PORT=str(ports["worker"])), "worker")

    def ready() -> bool:
        return (_logged(engine_log, r'"message": "ready: owns partitions \[[0-9, ]*\] of ' + re.escape(prefix))
                and _logged(worker_log, r'"message": "ready: consuming queues fh as group')
                and all(http_get(f"http://127.0.0.1:{p}/readyz")[0] == 200 for p in ports.values()))

    assert_eventually(ready, timeout=120, msg="engine and worker ready")
    for log in (engine_log, worker_log):
        text = log.read_text(errors="replace")
        assert "expected partitions" not in text
        raw = [line for line in text.splitlines() if re.match(r"^%\d\|", line)]
        assert not raw, f"raw librdkafka lines in {log.name}: {raw[:3]}"


def test_an_explicit_partition_count_that_differs_names_the_fix(kafka_bootstrap: str) -> None:
    prefix = f"fh{uuid.uuid4().hex[:8]}."
    _create_instance_topics(kafka_bootstrap, prefix, 4)
    config = fit_to_cluster(KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=8))
    assert config.partitions == 8  # explicit: kept
    with pytest.raises(PartitionCountMismatch) as info:
        ensure_topics(config.client_conf(), config.names, config.topic_settings)
    assert "set KFLOW_PARTITIONS=4" in str(info.value) and "another prefix" in str(info.value)
    assert "delete the topic" not in str(info.value)
    adopted = fit_to_cluster(KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix))
    assert adopted.partitions == 4


def test_group_settings_are_fast_on_the_embedded_broker(kafka_bootstrap: str, kafka_flavor: str) -> None:
    cluster_id = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).cluster_id or ""
    if not cluster_id.startswith("kflow-dev-"):
        pytest.skip("the broker under test is not the embedded one")
    conf = fit_to_cluster(KafkaConfig(bootstrap=kafka_bootstrap)).consumer_conf("g")
    assert (conf["session.timeout.ms"], conf["heartbeat.interval.ms"]) == (6000, 500)


# --------------------------------------------------------------------------- kflow dev


def test_kflow_dev_is_found_by_other_commands_and_cleans_up(tmp_path: Path, spawn: Any) -> None:
    """``kflow dev --port P --connectors FILE`` announces itself in .kflow/dev.json; a worker started in the
    same folder without any setting uses it; on SIGTERM the file and the temporary folder go away."""
    (tmp_path / "acts.py").write_text(ACTS)
    (tmp_path / "connectors.yaml").write_text(
        "connectors:\n  - name: fhapi\n    type: http\n    queue: fhconn\n"
        "    settings: {base_url: 'http://127.0.0.1:1'}\n    operations:\n      ping: {url: /ping}\n")
    port = free_port()
    dev, dev_log = spawn(["dev", "--port", str(port), "--connectors", "connectors.yaml"],
                         _env(KFLOW_VISIBILITY_PORT="0"), "dev")
    dev_file = tmp_path / DEV_FILE

    def announced() -> dict[str, Any]:
        assert dev.poll() is None, dev_log.read_text()
        # the file is written when the stack is up; the banner naming the temporary folder follows it
        assert "state and logs in" in dev_log.read_text()
        return json.loads(dev_file.read_text()) if dev_file.exists() else {}

    info = assert_eventually(announced, timeout=120, msg=".kflow/dev.json written")
    assert info["bootstrap"] == f"127.0.0.1:{port}" and info["partitions"] == 4 and info["pid"] == dev.pid
    root = Path(re.search(r"state and logs in (\S+)", dev_log.read_text()).group(1))  # type: ignore[union-attr]
    connectors_log = root / "logs" / "connectors.log"
    assert_eventually(lambda: connectors_log.exists() and _logged(connectors_log, "ready: consuming queues fhconn"),
                      timeout=120, msg="the connectors worker of the dev stack is ready")

    _, worker_log = spawn(["worker", "-m", "acts"], _env(KFLOW_METRICS_PORT="0"), "worker")
    assert_eventually(lambda: _logged(worker_log, "ready: consuming queues fh"), timeout=120, msg="worker ready")
    assert _logged(worker_log, rf"^using the dev stack at 127\.0\.0\.1:{port} \(topics kflow\.\*, 4 partitions")

    dev.send_signal(signal.SIGTERM)
    assert dev.wait(60) == 0, dev_log.read_text()
    assert not dev_file.exists()
    assert not root.exists(), f"{root} left behind"


def test_kflow_dev_runs_the_triggers_of_a_file(kafka_bootstrap: str, tmp_path: Path, spawn: Any) -> None:
    """``kflow dev --triggers FILE`` (here on the session broker) starts a workflow from a Kafka record."""
    prefix = f"fh{uuid.uuid4().hex[:8]}."
    source = f"{prefix}in"
    (tmp_path / "triggers.yaml").write_text(
        f"triggers:\n  - name: fh-start\n    source: {{kafka: {{topic: {source}}}}}\n    action: start\n"
        f"    workflow: fh.noop\n    id: \"'fh-' + message.n\"\n")
    dev, dev_log = spawn(["dev", "--bootstrap", kafka_bootstrap, "--prefix", prefix, "--triggers", "triggers.yaml"],
                         _env(KFLOW_VISIBILITY_PORT="0"), "dev")
    assert_eventually(lambda: _logged(dev_log, "triggers fh-start"), timeout=120, msg="dev stack up")
    config = KafkaConfig(bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=4, dev_tuning=True)
    _deploy_noop(config)
    _produce(kafka_bootstrap, source, {"n": "1"})
    _assert_started(config, "fh-1")
    assert dev.poll() is None, dev_log.read_text()


# --------------------------------------------------------------------------- triggers on late topics


def _deploy_noop(config: KafkaConfig) -> None:
    from kflow.client import Client

    with Client(config=config) as client:
        client.deploy({"name": "fh.noop", "version": 1, "steps": [{"id": "done", "succeed": "input"}]})


def _produce(bootstrap: str, topic: str, value: dict[str, Any]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, json.dumps(value).encode(), b"k")
    assert producer.flush(30) == 0


def _assert_started(config: KafkaConfig, instance_id: str) -> None:
    from kflow.client import Client

    with Client(config=config) as client:
        assert_eventually(lambda: (client.status(instance_id) or {}).get("status"), timeout=90,
                          msg=f"{instance_id} started")


def test_a_trigger_source_topic_created_after_start_is_read(stack: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The runner has looked for its source topic and found none; the topic is created later and read."""
    source = f"{stack.prefix}late-{uuid.uuid4().hex[:6]}"
    triggers = load_triggers(
        f"triggers:\n  - name: late\n    source: {{kafka: {{topic: {source}}}}}\n    action: start\n"
        f"    workflow: fh.noop\n    id: \"'late-' + message.n\"\n")
    config = stack.kafka_config(TriggerConfig)
    _deploy_noop(config)
    runner = TriggerRunner(triggers, config, group_id=f"{stack.prefix}late")
    with caplog.at_level(logging.DEBUG, logger="kflow.triggers"):
        runner.start()
        try:
            # the consumer has been told the topic is not there (before that, any subscription works)
            assert_eventually(lambda: "Subscribed topic not available" in caplog.text, timeout=60)
            admin = AdminClient({"bootstrap.servers": stack.bootstrap})
            admin.create_topics([NewTopic(source, 2, 1)])[source].result(30)
            _produce(stack.bootstrap, source, {"n": "7"})
            _assert_started(config, "late-7")
            assert runner.error is None
        finally:
            runner.stop()
