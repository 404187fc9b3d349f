"""The MQTT device connector end to end: engine + worker (connector host) + a real MQTT broker + simulated devices.

Covers command/response, error responses, timeouts, the offline policies (fail fast, and wait via
the engine's durable retries), a broker restart during a command, telemetry turned into a signal by
a trigger, and the firmware rollout example over 50 devices.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from importlib import resources
from typing import Any

import pytest
import yaml

from kflow.config import TriggerConfig
from kflow.connectors.base import ConnectorError, ConnectorSpec
from kflow.connectors.config import load_connectors
from kflow.connectors.host import ConnectorHost
from kflow.connectors.mqtt import MqttConnector
from kflow.connectors.simulator import DeviceFleet, LocalMqttBroker
from kflow.connectors.triggers import TriggerRunner, load_triggers
from kflow.model.errors import WorkflowFailedError
from kflow.testing import assert_eventually
from tests import mqtt_fixtures
from tests.integration.conftest import PARTITIONS, xfail_where_tansu_skips
from tests.mqtt_fixtures import events_of, unique_prefix

mqtt_broker = mqtt_fixtures.mqtt_broker  # the session's MQTT broker fixture

ROLLOUT_DEVICES = [f"r-{i:02d}" for i in range(50)]
MISC_DEVICES = ["ok-1", "err-1", "mute-1", "off-1", "off-2", "tele-1"]


def bundled(name: str) -> str:
    return resources.files("kflow.dev").joinpath(name).read_text()


def uid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def prefix() -> str:
    return unique_prefix("mqttc")


@pytest.fixture(scope="module")
def fleet(mqtt_broker, prefix) -> Any:
    with DeviceFleet(host=mqtt_broker.host, port=mqtt_broker.port, prefix=prefix, delay=0.05,
                     ids=ROLLOUT_DEVICES + MISC_DEVICES) as f:
        yield f


CONNECTORS = """
connectors:
  - name: fleet
    type: mqtt
    queue: fleet
    settings: {{host: {host}, port: {port}, prefix: {prefix}, state_wait: 2s}}
    operations:
      state: {{kind: query_state}}
      update: {{kind: command, command: update, timeout: 10s, offline: fail}}
      rollback: {{kind: command, command: rollback, timeout: 10s, offline: wait}}
      reboot: {{kind: command, command: reboot, timeout: 5s, offline: fail}}
      reboot_when_online: {{kind: command, command: reboot, timeout: 5s, offline: wait}}
      quick: {{kind: command, command: ping, timeout: 1s}}
"""


@pytest.fixture(scope="module")
def fleet_worker(stack, fleet, mqtt_broker, prefix) -> Any:
    host = ConnectorHost(load_connectors(CONNECTORS.format(host=mqtt_broker.host, port=mqtt_broker.port,
                                                           prefix=prefix)))
    assert host.start(wait=20), host.describe()
    stack.start_worker(host.activities())
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="module")
def triggers(stack, mqtt_broker, prefix) -> Any:
    text = bundled("iot_triggers.yaml").replace("fleet/devices/", f"{prefix}/devices/")
    runner = TriggerRunner(load_triggers(text), stack.kafka_config(TriggerConfig), mqtt_url=mqtt_broker.url)
    runner.start()
    assert runner.ready(20)
    try:
        yield runner
    finally:
        runner.stop()


def one_task(c, name: str, task: str, *, retry: dict | None = None, timeout: dict | None = None) -> None:
    step: dict[str, Any] = {"id": "call", "task": task, "queue": "fleet", "input": "input", "output": "answer"}
    if retry:
        step["retry"] = retry
    if timeout:
        step["timeout"] = timeout
    c.deploy({"name": name, "version": 1, "steps": [step, {"id": "done", "succeed": "answer"}]})


def test_command_round_trip_and_error_response(stack, fleet, fleet_worker):
    c = stack.client
    one_task(c, "mq.reboot", "fleet.reboot", retry={"initial": "100ms", "max_attempts": 3})
    result = c.start("mq.reboot", {"device_id": "ok-1", "mode": "soft"}, id=uid("rb")).result(timeout=60)
    assert result["ok"] is True and result["device_id"] == "ok-1" and result["command"] == "reboot"
    [received] = fleet.received("ok-1")
    assert received["args"] == {"mode": "soft"}
    # the correlation id is derived from the task: <instance hash>-<activity id>-<attempt>
    assert received["correlation_id"] == result["correlation_id"] and received["correlation_id"].endswith("-1")

    fleet.fail_next("err-1", "Overheated", "temperature 93C")
    with pytest.raises(WorkflowFailedError) as ei:
        c.start("mq.reboot", {"device_id": "err-1"}, id=uid("rb")).result(timeout=60)
    assert ei.value.error_type == "Overheated" and "temperature 93C" in ei.value.message
    assert fleet.commands_received("err-1") == 1  # the device said non-retryable: no second attempt


def test_no_response_is_a_retryable_device_timeout(stack, fleet, fleet_worker):
    c = stack.client
    one_task(c, "mq.quick", "fleet.quick", retry={"initial": "100ms", "max_attempts": 2})
    fleet.mute("mute-1")
    with pytest.raises(WorkflowFailedError) as ei:
        c.start("mq.quick", {"device_id": "mute-1"}, id=uid("q")).result(timeout=60)
    assert ei.value.error_type == "DeviceTimeout" and "did not answer 'ping'" in ei.value.message
    cids = [r["correlation_id"] for r in fleet.received("mute-1")]
    assert len(cids) == 2 and cids[0].endswith("-1") and cids[1].endswith("-2")  # retried, recognisably


def test_offline_device_fails_fast(stack, fleet, fleet_worker):
    c = stack.client
    one_task(c, "mq.reboot", "fleet.reboot", retry={"initial": "100ms", "max_attempts": 3})
    fleet.set_online("off-1", False)
    with pytest.raises(WorkflowFailedError) as ei:
        c.start("mq.reboot", {"device_id": "off-1"}, id=uid("rb")).result(timeout=60)
    assert ei.value.error_type == "DeviceOffline"
    assert fleet.commands_received("off-1") == 0


def test_offline_wait_retries_until_the_device_is_back(stack, fleet, fleet_worker):
    c = stack.client
    one_task(c, "mq.reboot-wait", "fleet.reboot_when_online",
             retry={"initial": "200ms", "backoff": 1.5, "max_interval": "1s", "max_attempts": 0},
             timeout={"schedule_to_close": "60s"})
    fleet.set_online("off-2", False)
    h = c.start("mq.reboot-wait", {"device_id": "off-2"}, id=uid("rw"))
    topic, parts = c.config.names.events, PARTITIONS

    def offline_attempts() -> int:
        return sum(1 for e in events_of(stack.bootstrap, topic, parts, h.id)
                   if e.type == "ActivityFailed" and e.data["error_type"] == "DeviceOffline" and e.data["retryable"])

    assert_eventually(lambda: offline_attempts() >= 2, timeout=30)  # durable retries, worker not blocked
    assert fleet.commands_received("off-2") == 0
    fleet.set_online("off-2", True)
    result = h.result(timeout=60)
    assert result["ok"] is True and fleet.commands_received("off-2") == 1


def test_broker_restart_during_a_command_republishes_it(tmp_path):
    """A private broker is killed while a command is in flight; after the restart the connector
    re-publishes it under the same correlation id and the device's answer completes it."""
    broker = LocalMqttBroker().start()
    try:
        prefix = unique_prefix("restart")
        with DeviceFleet(host=broker.host, port=broker.port, prefix=prefix, delay=2.5, ids=["d-1"]) as fleet:
            spec = ConnectorSpec("plant", "mqtt", settings={"host": broker.host, "port": broker.port, "prefix": prefix,
                                                             "reconnect_min": "100ms", "reconnect_max": "500ms"},
                                 operations={"reboot": {"kind": "command", "timeout": "30s"}})
            host = ConnectorHost([spec], health_interval=0.5)
            assert host.start(wait=10), host.describe()
            try:
                outcome: dict[str, Any] = {}

                def call() -> None:
                    try:
                        outcome["result"] = host.call("plant", "reboot", {"device_id": "d-1"}, timeout=60)
                    except ConnectorError as exc:
                        outcome["error"] = exc

                t = threading.Thread(target=call)
                t.start()
                assert_eventually(lambda: fleet.commands_received("d-1") == 1, timeout=10)
                broker.kill()  # the device is still "working" on it: its answer cannot get out
                broker.start()
                t.join(60)
                assert "error" not in outcome, outcome
                assert outcome["result"]["ok"] is True
                cids = {r["correlation_id"] for r in fleet.received("d-1")}
                assert fleet.commands_received("d-1") >= 2 and len(cids) == 1  # same command, re-published
                assert_eventually(lambda: host.healthy()["plant"], timeout=15)
            finally:
                host.stop()
    finally:
        broker.stop()


def test_connector_rejects_bad_declarations():
    with pytest.raises(Exception) as ei:
        MqttConnector(ConnectorSpec("bad", "mqtt", settings={"qos": 3, "hots": "x"},
                                    operations={"a": {"kind": "command", "offline": "later"},
                                                "b": {"kind": "publish"}}))
    msg = str(ei.value)
    assert "qos must be 0, 1 or 2" in msg and "unknown setting 'hots'" in msg
    with pytest.raises(Exception) as ei:
        MqttConnector(ConnectorSpec("bad", "mqtt", operations={"a": {"kind": "command", "offline": "later"},
                                                               "b": {"kind": "publish"}}))
    assert "offline must be 'fail' or 'wait'" in str(ei.value) and "needs a 'topic'" in str(ei.value)


_CHILD_VERSIONS = itertools.count(100)


def deploy_rollout(c, confirm_timeout: str = "3s") -> None:
    """Deploy the rollout and, as the latest version of its child, the device update with ``confirm_timeout``.

    A deployed version never changes, so each call deploys the child under a new version; the
    rollout starts the latest one."""
    child = yaml.safe_load(bundled("iot_device_update.yaml"))
    for step in child["steps"]:
        if step["id"] == "confirm":
            step["wait"]["timeout"] = confirm_timeout
    child["version"] = next(_CHILD_VERSIONS)
    c.deploy(child)
    c.deploy(yaml.safe_load(bundled("iot_rollout.yaml")))


def test_telemetry_signals_the_waiting_instance_through_a_trigger(stack, fleet, fleet_worker, triggers):
    c = stack.client
    deploy_rollout(c, confirm_timeout="30s")
    rid = uid("t")
    result = c.start("fleet.device-update", {"device_id": "tele-1", "version": "9.9", "rollout_id": rid},
                     id=f"rollout-{rid}-tele-1").result(timeout=60)
    assert result == {"device_id": "tele-1", "outcome": "updated", "version": "9.9"}  # version from the telemetry
    assert fleet.version("tele-1") == "9.9"


def _result_while_progressing(c, h, rid, step=20, limit=300):
    """The rollout's result, waited for in rounds of ``step`` seconds for as long as some device's
    instance moves on (50 devices with 3 s confirm waits: up to ``limit`` on a loaded machine), so a
    stall costs two rounds, not the whole budget.

    Raises:
        TimeoutError: a whole round passed with no device's instance moving, or ``limit`` passed.
    """
    deadline = time.monotonic() + limit
    seen = None
    while True:
        try:
            return h.result(timeout=step)
        except TimeoutError:
            now = tuple((c.status(f"rollout-{rid}-{d}") or {}).get("seq") for d in ROLLOUT_DEVICES)
            if now == seen or time.monotonic() > deadline:
                raise
            seen = now


@pytest.mark.timeout(420)  # above the result's own timeout, so a stalled run reports what it waits for
def test_firmware_rollout_over_50_devices(stack, fleet, fleet_worker, triggers, kafka_flavor, request):
    # devices, connectors, the trigger runner and the engine all write commands at once: seen under the
    # parallel full run as children that never start or finish (the failure message lists what each waits for)
    xfail_where_tansu_skips(request, kafka_flavor, "a child's start or a device's report never reaches the engine "
                                                   "(likely: the failure message tells)")
    c = stack.client
    deploy_rollout(c)
    for d in ("r-03", "r-17", "r-31"):
        fleet.fail_next(d, "UpdateFailed", "flash write error", command="update")
    for d in ("r-08", "r-22"):
        fleet.mute_telemetry(d)  # updates, but never confirms: the wait times out -> rollback
    fleet.fail_next("r-40", "UpdateFailed", command="update")
    fleet.fail_next("r-40", "RollbackFailed", command="rollback")
    fleet.set_online("r-45", False)
    rid = uid("roll")
    h = c.start("fleet.rollout", {"rollout_id": rid, "version": "2.0.0", "devices": ROLLOUT_DEVICES},
                id=f"rollout-{rid}")
    try:
        summary = _result_while_progressing(c, h, rid)
    except TimeoutError:
        lines = []
        for d in ROLLOUT_DEVICES:
            st = c.status(f"rollout-{rid}-{d}")
            if st is None or st["status"] != "COMPLETED":
                internal = (st or {}).get("internal") or {}
                lines.append(f"{d}: {st and st['status']} seq={st and st['seq']} activities={internal.get('activities')}"
                             f" timers={internal.get('timers')} commands_received={fleet.commands_received(d)}")
        parent = (c.status(h.id) or {}).get("internal") or {}
        raise AssertionError(f"rollout did not finish; parent children={parent.get('children')}\n"
                             + "\n".join(lines)) from None
    rolled_back = ["r-03", "r-08", "r-17", "r-22", "r-31"]
    failed = ["r-40", "r-45"]
    assert summary["rolled_back"] == rolled_back
    assert summary["failed"] == failed
    assert summary["updated"] == [d for d in ROLLOUT_DEVICES if d not in rolled_back + failed]
    assert all(fleet.version(d) == "2.0.0" for d in summary["updated"])
    assert all(fleet.version(d) == "1.0.0" for d in rolled_back)
    assert fleet.commands_received("r-45") == 0
