"""``kflow dev --demo iot``: a firmware rollout over a simulated device fleet, end to end.

On top of the dev stack (broker + engine) it runs, in this process: an MQTT broker when none
answers at ``KFLOW_MQTT_URL`` (Mosquitto if installed, else amqtt), a simulated fleet of devices
(some fail their update, one is offline, one never confirms), a worker serving the MQTT connector
``fleet`` (bundled ``iot_connectors.yaml``), and the trigger runner turning the devices'
``telemetry/updated`` messages into ``updated`` signals (bundled ``iot_triggers.yaml``). It then
deploys ``fleet.device-update`` and ``fleet.rollout``, runs one rollout and prints its summary.
"""

from __future__ import annotations

import logging
import uuid
from importlib import resources
from typing import TYPE_CHECKING, Any, Optional

import yaml
from rich.console import Console
from rich.table import Table

from kflow.config import KafkaConfig, TriggerConfig, WorkerConfig, load_config
from kflow.model.errors import KflowError

if TYPE_CHECKING:
    from kflow.dev.stack import DevStack

log = logging.getLogger("kflow.dev")


def _bundled(name: str) -> str:
    return resources.files("kflow.dev").joinpath(name).read_text()


def iot_files(host: str, port: int, prefix: str, confirm_timeout: Optional[str] = None) -> dict[str, Any]:
    """The bundled connectors, triggers and definitions, pointed at ``host:port`` and topic ``prefix``."""
    connectors = yaml.safe_load(_bundled("iot_connectors.yaml"))
    connectors["connectors"][0]["settings"].update(host=host, port=port, prefix=prefix)
    triggers = yaml.safe_load(_bundled("iot_triggers.yaml"))
    triggers["triggers"][0]["source"]["mqtt"]["topic"] = f"{prefix}/devices/+/telemetry/updated"
    child = yaml.safe_load(_bundled("iot_device_update.yaml"))
    if confirm_timeout:
        for step in child["steps"]:
            if step["id"] == "confirm":
                step["wait"]["timeout"] = confirm_timeout
    return {"connectors": yaml.safe_dump(connectors), "triggers": yaml.safe_dump(triggers), "device_update": child,
            "rollout": yaml.safe_load(_bundled("iot_rollout.yaml"))}


def run_iot_demo(stack: DevStack, console: Console, count: int = 20) -> None:
    """Run one firmware rollout over ``count`` simulated devices and print the summary."""
    from kflow.connectors.config import load_connectors
    from kflow.connectors.host import ConnectorHost
    from kflow.connectors.mqtt import parse_mqtt_url
    from kflow.connectors.simulator import DeviceFleet, LocalMqttBroker, mqtt_reachable
    from kflow.connectors.triggers import TriggerRunner, load_triggers
    from kflow.worker import Worker

    assert stack.bootstrap is not None
    url = load_config(TriggerConfig).mqtt_url
    host, port, _tls = parse_mqtt_url(url)
    broker: Optional[LocalMqttBroker] = None
    closers: list[Any] = []
    try:
        if not mqtt_reachable(host, port):
            broker = LocalMqttBroker().start()
            closers.append(broker.stop)
            host, port = broker.host, broker.port
            console.print(f"  mqtt    started {broker.kind} on {broker.url} (nothing answered at {url})")
        else:
            console.print(f"  mqtt    using {url}")
        topic_prefix = f"fleet-{uuid.uuid4().hex[:6]}"
        files = iot_files(host, port, topic_prefix, confirm_timeout="5s")
        devices = [f"dev-{i:03d}" for i in range(count)]
        fleet = DeviceFleet(host=host, port=port, prefix=topic_prefix, delay=0.2, ids=devices).start()
        closers.append(fleet.stop)
        # a realistic mix: two updates fail, one device never confirms, one is offline
        fleet.fail_next(devices[3], "UpdateFailed", "flash write error", command="update")
        fleet.fail_next(devices[11], "UpdateFailed", "checksum mismatch", command="update")
        fleet.mute_telemetry(devices[7])
        fleet.set_online(devices[15], False)
        console.print(f"  devices {count} simulated on topics {topic_prefix}/devices/*")

        kafka = dict(bootstrap=stack.bootstrap, topic_prefix=stack.prefix, partitions=stack.partitions,
                     dev_tuning=True, metrics_port=0)
        connectors = ConnectorHost(load_connectors(files["connectors"]))
        if not connectors.start(wait=20):
            raise KflowError("the MQTT connector did not connect: " + "; ".join(connectors.describe()))
        closers.append(connectors.stop)
        worker = Worker(load_config(WorkerConfig, **kafka), connectors.activities())
        worker.start_in_thread()
        closers.append(worker.stop)
        triggers = TriggerRunner(load_triggers(files["triggers"]), load_config(KafkaConfig, **kafka),
                                 mqtt_url=f"mqtt://{host}:{port}")
        triggers.start()
        closers.append(triggers.stop)
        if not triggers.ready(30) or not worker.wait_assigned(60):
            raise KflowError("the trigger runner or the connector worker did not start in time")
        console.print("  worker  MQTT connector 'fleet' (queue fleet) · triggers: firmware-updated")

        rollout_id = uuid.uuid4().hex[:6]
        with stack.client() as client:
            client.deploy(files["device_update"])
            client.deploy(files["rollout"])
            console.print(f"rolling out firmware 2.0.0 to {count} devices (rollout {rollout_id}) …")
            summary = client.start("fleet.rollout", {"rollout_id": rollout_id, "version": "2.0.0",
                                                     "devices": devices},
                                   id=f"rollout-{rollout_id}").result(timeout=180)
        table = Table(title=f"fleet.rollout {rollout_id}: firmware 2.0.0")
        table.add_column("outcome")
        table.add_column("devices")
        for key in ("updated", "rolled_back", "failed"):
            table.add_row(key, f"{len(summary[key])}: " + ", ".join(summary[key]))
        Console().print(table)
        expected = {"rolled_back": sorted([devices[3], devices[7], devices[11]]), "failed": [devices[15]]}
        if summary["rolled_back"] != expected["rolled_back"] or summary["failed"] != expected["failed"]:
            raise KflowError(f"rollout finished with unexpected outcomes: {summary}")
        console.print(f"[green]demo complete:[/] {len(summary['updated'])} updated, "
                      f"{len(summary['rolled_back'])} rolled back, {len(summary['failed'])} failed (offline)")
    finally:
        for close in reversed(closers):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - shut everything down, report the rest
                log.warning("iot demo shutdown: %s", exc)
