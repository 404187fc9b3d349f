"""A simulated device fleet on a real MQTT broker, for tests, demos and ``kflow devices simulate``.

Every simulated device holds its own MQTT connection (a clean session: a command published while
it is away is lost to it, and it is the connector that sends it again when the device announces
itself online), publishes a retained ``{"online": true, "version": ...}``
on its status topic with a last will of ``{"online": false}``, and answers each command on the
response topic after ``delay`` seconds — the same topic layout the MQTT connector uses. ``update``
commands change the device's version and are followed by an ``updated`` telemetry message on
``{prefix}/devices/{id}/telemetry/updated``; ``rollback`` restores the previous version. Random
failures and offline spells are drawn from a seeded generator per device, and tests steer single
devices with :meth:`DeviceFleet.set_online`, :meth:`DeviceFleet.fail_next`,
:meth:`DeviceFleet.mute` and :meth:`DeviceFleet.mute_telemetry`.

The fleet runs on its own event loop in a daemon thread; every public method is thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import orjson

try:
    import aiomqtt
except ModuleNotFoundError as exc:  # name the extra to install rather than the missing module
    raise ModuleNotFoundError("the MQTT device simulator needs the mqtt extra: pip install 'kflow[mqtt]'",
                              name=exc.name) from exc

__all__ = ["DeviceFleet", "LocalMqttBroker", "mqtt_reachable"]

log = logging.getLogger("kflow.connectors.simulator")

OFFLINE = orjson.dumps({"online": False})


@dataclass(eq=False)
class _Device:
    """One simulated device's state and controls (touched only on the fleet's loop)."""

    id: str
    rng: random.Random
    version: str
    previous: str = ""
    online: bool = True
    want_online: asyncio.Event = field(default_factory=asyncio.Event)
    want_offline: asyncio.Event = field(default_factory=asyncio.Event)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    failures: list[dict[str, Any]] = field(default_factory=list)
    muted: bool = False
    telemetry_muted: bool = False
    held: list[dict[str, Any]] = field(default_factory=list)


class DeviceFleet:
    """``count`` simulated devices named ``dev-000`` ... on ``host:port`` under topic ``prefix``.

    Example:
        >>> with DeviceFleet(20, prefix="fleet") as fleet:  # doctest: +SKIP
        ...     fleet.set_online("dev-003", False)
        ...     fleet.fail_next("dev-004", "UpdateFailed")

    Args:
        count: Number of devices.
        host: MQTT broker host.
        port: MQTT broker port.
        prefix: Topic prefix (the connector's ``prefix`` setting).
        delay: Seconds a device takes to answer a command.
        fail_rate: Probability that a command is answered with an error.
        offline_rate: Probability that a device goes offline on receiving a command (it answers
            after coming back, ``offline_for`` seconds later).
        offline_for: Seconds an offline spell lasts.
        seed: Seed of the per-device random generators (deterministic failures).
        version: The firmware version every device starts with.
        ids: Explicit device ids instead of ``dev-000`` ...
    """

    def __init__(self, count: int = 10, *, host: str = "127.0.0.1", port: int = 1883, prefix: str = "kflow",
                 delay: float = 0.05, fail_rate: float = 0.0, offline_rate: float = 0.0, offline_for: float = 1.0,
                 seed: Optional[int] = None, version: str = "1.0.0", ids: Optional[list[str]] = None) -> None:
        for name, rate in (("fail_rate", fail_rate), ("offline_rate", offline_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, but is {rate}")
        if count < 0 or delay < 0 or offline_for < 0:
            raise ValueError("count, delay and offline_for must be >= 0")
        self.host, self.port, self.prefix = host, port, prefix
        self.delay, self.fail_rate, self.offline_rate, self.offline_for = delay, fail_rate, offline_rate, offline_for
        self.seed = seed
        self.device_ids = list(ids) if ids is not None else [f"dev-{i:03d}" for i in range(count)]
        self._initial_version = version
        self._devices: dict[str, _Device] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping: Optional[asyncio.Event] = None
        self._lock = threading.Lock()
        self._commands: Counter[tuple[str, str]] = Counter()
        self._log: list[dict[str, Any]] = []
        self.error: Optional[BaseException] = None

    # -- topics ------------------------------------------------------------------------------

    def status_topic(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/status"

    def command_filter(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/commands/+"

    def response_topic(self, device_id: str, correlation_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/responses/{correlation_id}"

    def telemetry_topic(self, device_id: str, kind: str) -> str:
        return f"{self.prefix}/devices/{device_id}/telemetry/{kind}"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> DeviceFleet:
        """Connect every device and wait until all are online.

        Raises:
            TimeoutError: not every device connected within ``timeout`` seconds.
        """
        if self._thread is not None:
            raise RuntimeError("the fleet is already started")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name="kflow-device-fleet",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"the simulated fleet did not come online on MQTT {self.host}:{self.port} "
                               f"within {timeout:g}s" + (f": {self.error}" if self.error else ""))
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every device (their retained status says offline) and stop the thread."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> DeviceFleet:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def _thread_main(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))
        except BaseException as exc:  # reported by start() or visible on .error
            self.error = exc
            log.exception("device fleet failed")
            ready.set()

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for device_id in self.device_ids:
            rng = random.Random(f"{self.seed}-{device_id}") if self.seed is not None else random.Random()
            dev = _Device(device_id, rng, self._initial_version)
            dev.want_online.set()
            self._devices[device_id] = dev
        tasks = [asyncio.create_task(self._device_main(d), name=f"sim-{d.id}") for d in self._devices.values()]
        waiter = asyncio.gather(*(d.connected.wait() for d in self._devices.values()))
        done, _ = await asyncio.wait({waiter, asyncio.ensure_future(self._stopping.wait())},
                                     return_when=asyncio.FIRST_COMPLETED)
        ready.set()
        await self._stopping.wait()
        waiter.cancel()
        for d in self._devices.values():
            d.want_online.set()
            d.want_offline.set()
        await asyncio.wait(tasks, timeout=5)
        for t in tasks:
            t.cancel()

    # -- one device --------------------------------------------------------------------------

    async def _device_main(self, dev: _Device) -> None:
        assert self._stopping is not None
        backoff = 0.2
        while not self._stopping.is_set():
            await dev.want_online.wait()
            if self._stopping.is_set():
                return
            try:
                await self._session(dev)
                backoff = 0.2
            except aiomqtt.MqttError as exc:
                dev.connected.clear()
                log.debug("device %s: MQTT error %s; reconnecting in %.1fs", dev.id, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _session(self, dev: _Device) -> None:
        assert self._stopping is not None
        will = aiomqtt.Will(self.status_topic(dev.id), OFFLINE, qos=1, retain=True)
        async with aiomqtt.Client(self.host, self.port, identifier=f"sim-{self.prefix}-{dev.id}".replace("/", "_"),
                                  clean_session=True, will=will, keepalive=10, timeout=10) as client:
            await client.subscribe(self.command_filter(dev.id), qos=1)
            await self._publish_status(client, dev, True)
            dev.online = True
            dev.connected.set()
            for command in dev.held:
                await self._answer(client, dev, command)
            dev.held.clear()
            reader = asyncio.create_task(self._read(client, dev))
            offline = asyncio.create_task(dev.want_offline.wait())
            try:
                await asyncio.wait({reader, offline}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                reader.cancel()
                offline.cancel()
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]
            dev.want_offline.clear()
            dev.online = False
            dev.connected.clear()
            await self._publish_status(client, dev, False)

    async def _publish_status(self, client: aiomqtt.Client, dev: _Device, online: bool) -> None:
        body = {"online": online, "device_id": dev.id, "version": dev.version} if online else {"online": False}
        await client.publish(self.status_topic(dev.id), orjson.dumps(body), qos=1, retain=True)

    async def _read(self, client: aiomqtt.Client, dev: _Device) -> None:
        commands = self.command_filter(dev.id)
        async for message in client.messages:
            if not message.topic.matches(commands):
                continue  # only commands are answered, whatever else a broker delivers
            raw = message.payload if isinstance(message.payload, (bytes, bytearray)) else b""
            try:
                command = orjson.loads(raw)
                if not isinstance(command, dict):
                    raise ValueError("not an object")
            except ValueError:
                log.warning("device %s: ignoring malformed command on %s", dev.id, message.topic.value)
                continue
            command.setdefault("command", message.topic.value.rsplit("/", 1)[-1])
            with self._lock:
                self._commands[(dev.id, str(command.get("command")))] += 1
                self._log.append({"device_id": dev.id, **command})
            if self.offline_rate and dev.rng.random() < self.offline_rate:
                dev.held.append(command)
                assert self._loop is not None
                self._loop.create_task(self._offline_spell(dev, self.offline_for))
                return
            await self._answer(client, dev, command)

    async def _offline_spell(self, dev: _Device, seconds: float) -> None:
        dev.want_online.clear()
        dev.want_offline.set()
        await asyncio.sleep(seconds)
        dev.want_online.set()

    async def _answer(self, client: aiomqtt.Client, dev: _Device, command: dict[str, Any]) -> None:
        if dev.muted:
            return
        await asyncio.sleep(self.delay)
        cid = str(command.get("correlation_id", ""))
        name = str(command.get("command", ""))
        args = command.get("args") if isinstance(command.get("args"), dict) else {}
        reply_to = command.get("reply_to") or self.response_topic(dev.id, cid)
        failure = next((f for f in dev.failures if f["command"] in (None, name)), None)
        if failure is not None:
            dev.failures.remove(failure)
        elif self.fail_rate and dev.rng.random() < self.fail_rate:
            failure = {"type": "UpdateFailed" if name == "update" else "DeviceError",
                       "message": f"simulated failure of {name!r} on {dev.id}", "retryable": False}
        if failure is not None:
            error = {"type": failure["type"], "message": failure["message"], "retryable": failure["retryable"]}
            await client.publish(reply_to, orjson.dumps({"correlation_id": cid, "error": error}), qos=1)
            return
        result: dict[str, Any] = {"correlation_id": cid, "device_id": dev.id, "command": name, "ok": True}
        if name == "update":
            dev.previous, dev.version = dev.version, str(args.get("version", dev.version))
        elif name == "rollback":
            dev.version = str(args.get("version") or dev.previous or dev.version)
        result["version"] = dev.version
        await client.publish(reply_to, orjson.dumps(result), qos=1)
        if name in ("update", "rollback"):
            await self._publish_status(client, dev, True)
        if name == "update" and not dev.telemetry_muted:
            telemetry = {"device_id": dev.id, "version": dev.version, **{k: v for k, v in args.items() if k != "version"}}
            await client.publish(self.telemetry_topic(dev.id, "updated"), orjson.dumps(telemetry), qos=1)

    # -- controls (any thread) ---------------------------------------------------------------

    def _call(self, fn: Any, timeout: float = 10.0) -> Any:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the fleet is not started")

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def _device(self, device_id: str) -> _Device:
        try:
            return self._devices[device_id]
        except KeyError:
            raise KeyError(f"no simulated device {device_id!r}") from None

    def set_online(self, device_id: str, online: bool, wait: bool = True, timeout: float = 10.0) -> None:
        """Take a device offline (status offline, session closed) or bring it back.

        With ``wait`` the call returns once the device's status was published.
        """
        dev = self._device(device_id)

        def flip() -> None:
            if online:
                dev.want_online.set()
            else:
                dev.want_online.clear()
                dev.want_offline.set()

        self._call(flip)
        if wait:
            from kflow.testing import assert_eventually

            assert_eventually(lambda: self.is_online(device_id) == online, timeout=timeout)

    def is_online(self, device_id: str) -> bool:
        """True while the device is connected and has published its online status."""
        dev = self._device(device_id)
        return dev.online and dev.connected.is_set()

    def fail_next(self, device_id: str, type: str = "DeviceError", message: str = "", *, retryable: bool = False,
                  command: Optional[str] = None) -> None:
        """Answer the device's next command (or next ``command``) with ``{"error": {type, message, retryable}}``."""
        dev = self._device(device_id)
        failure = {"type": type, "message": message or f"simulated {type} on {device_id}", "retryable": retryable,
                   "command": command}
        self._call(lambda: dev.failures.append(failure))

    def mute(self, device_id: str, muted: bool = True) -> None:
        """A muted device receives commands but never answers them."""
        dev = self._device(device_id)
        self._call(lambda: setattr(dev, "muted", muted))

    def mute_telemetry(self, device_id: str, muted: bool = True) -> None:
        """A device with muted telemetry answers ``update`` but never reports ``updated``."""
        dev = self._device(device_id)
        self._call(lambda: setattr(dev, "telemetry_muted", muted))

    def version(self, device_id: str) -> str:
        """The device's current firmware version."""
        return self._device(device_id).version

    def commands_received(self, device_id: Optional[str] = None, command: Optional[str] = None) -> int:
        """How many commands were received (by one device and/or of one name)."""
        with self._lock:
            return sum(n for (d, c), n in self._commands.items()
                       if (device_id is None or d == device_id) and (command is None or c == command))

    def received(self, device_id: Optional[str] = None) -> list[dict[str, Any]]:
        """The commands received so far, oldest first (each with ``device_id``)."""
        with self._lock:
            return [dict(c) for c in self._log if device_id is None or c["device_id"] == device_id]


# --------------------------------------------------------------------------- a local broker


def mqtt_reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class LocalMqttBroker:
    """A private MQTT broker process on 127.0.0.1: Mosquitto when installed, otherwise amqtt (PyPI).

    Used by ``kflow dev --demo iot`` when no broker is reachable, and by tests that need a broker
    they can kill and restart (:meth:`kill`, :meth:`start` again on the same port).

    Args:
        port: The port; a free one is picked when omitted.
        prefer: ``"mosquitto"`` or ``"amqtt"``.
    """

    MOSQUITTO = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/local/bin/mosquitto")

    def __init__(self, port: Optional[int] = None, prefer: str = "mosquitto") -> None:
        import shutil
        import socket

        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
        self.host, self.port = "127.0.0.1", port
        found = [p for p in self.MOSQUITTO if shutil.which(p)] or ([shutil.which("mosquitto")] if shutil.which("mosquitto") else [])
        self.kind = "mosquitto" if found and prefer == "mosquitto" else "amqtt"
        self._mosquitto = found[0] if found else None
        self._proc: Any = None
        self._dir: Optional[str] = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        import os
        import sys
        import tempfile

        self._dir = self._dir or tempfile.mkdtemp(prefix="kflow-mqtt-")
        if self.kind == "mosquitto":
            conf = os.path.join(self._dir, "mosquitto.conf")
            with open(conf, "w") as f:
                f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
            return [str(self._mosquitto), "-c", conf]
        conf = os.path.join(self._dir, "amqtt.yaml")
        with open(conf, "w") as f:
            f.write(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{self.port}\nplugins:\n"
                    "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
        return [sys.executable, "-c", "from amqtt.scripts.broker_script import main; main()", "-c", conf]

    def start(self, timeout: float = 20.0) -> LocalMqttBroker:
        """Start the broker process and wait until it accepts connections."""
        import os
        import subprocess

        if self.kind == "amqtt":
            try:
                import amqtt  # noqa: F401
            except ImportError:
                raise RuntimeError("no MQTT broker available: install Mosquitto, or amqtt "
                                   "(pip install 'kflow[dev]')") from None
        cmd = self._command()
        log_path = os.path.join(str(self._dir), "broker.log")
        self._log = open(log_path, "ab")
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        from kflow.testing import assert_eventually

        def up() -> bool:
            if self._proc.poll() is not None:
                raise RuntimeError(f"MQTT broker ({self.kind}) exited with code {self._proc.returncode}; "
                                   f"see {log_path}")
            return mqtt_reachable(self.host, self.port, 0.5)

        assert_eventually(up, timeout=timeout)
        log.info("MQTT broker (%s) on %s (pid %d)", self.kind, self.url, self._proc.pid)
        return self

    def kill(self) -> None:
        """SIGKILL the broker process (a crash: no clean disconnects, no will messages sent on time)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

    def stop(self) -> None:
        """Terminate the broker process."""
        import subprocess

        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def __enter__(self) -> LocalMqttBroker:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()
