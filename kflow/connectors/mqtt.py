"""The MQTT device connector: commands to devices with correlated responses, device state, and publishing.

One connector holds one MQTT connection (aiomqtt) supervised by a task that reconnects with
exponential backoff and, after every (re)connect, subscribes again to the fleet's status and
response topics and re-publishes every command still in flight under its original correlation id,
so a broker restart never silently loses a command: it is answered after the reconnect or the
operation times out with a retryable ``DeviceTimeout``.

Topic layout (every template is a setting)::

    {prefix}/devices/{device_id}/commands/{command}            connector -> device  {correlation_id, command, args, reply_to}
    {prefix}/devices/{device_id}/responses/{correlation_id}    device -> connector  result JSON, or {"error": {type, message, retryable?}}
    {prefix}/devices/{device_id}/status                        device, retained     {"online": true, ...}; last will {"online": false}

Correlation ids are derived from the running task (``<instance hash>-<activity id>-<attempt>``), so
a re-delivered task or a retry is recognisable by the device. A command still in flight is also
sent again when its device announces itself online (a live, not retained, status message), since a
device that was away may have missed it; devices must subscribe before announcing themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import orjson

try:
    import aiomqtt
except ModuleNotFoundError as exc:  # name the extra to install rather than the missing module
    raise ModuleNotFoundError("the MQTT connector needs the mqtt extra: pip install 'kflow[mqtt]'",
                              name=exc.name) from exc

from kflow.connectors.base import (
    Connector,
    ConnectorConfigError,
    ConnectorError,
    ConnectorSpec,
    Operation,
    connector_type,
)
from kflow.model.spec import parse_duration_ms

__all__ = ["DEFAULT_TOPICS", "MqttConnector", "MqttSettings", "mqtt_client_kwargs", "parse_mqtt_url"]

log = logging.getLogger("kflow.connectors.mqtt")

#: The default topic templates; ``{prefix}`` is the ``prefix`` setting.
DEFAULT_TOPICS = {
    "command_topic": "{prefix}/devices/{device_id}/commands/{command}",
    "response_topic": "{prefix}/devices/{device_id}/responses/{correlation_id}",
    "status_topic": "{prefix}/devices/{device_id}/status",
}
_SETTINGS = frozenset({"host", "port", "url", "username", "password", "tls", "client_id", "prefix", "qos",
                       "keepalive", "connect_timeout", "reconnect_min", "reconnect_max", "state_wait",
                       *DEFAULT_TOPICS})
_TLS_KEYS = frozenset({"ca_file", "cert", "key", "insecure"})
_OP_KEYS = {
    "command": frozenset({"kind", "command", "timeout", "offline", "qos"}),
    "query_state": frozenset({"kind", "wait"}),
    "publish": frozenset({"kind", "topic", "qos", "retain"}),
}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host:port`` (or ``mqtts://``, or ``host:port``) -> ``(host, port, tls)``."""
    tls = url.startswith("mqtts://")
    rest = url.split("://", 1)[1] if "://" in url else url
    rest = rest.rstrip("/")
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host:
        raise ValueError(f"expected an MQTT URL like mqtt://host:1883, but got {url!r}")
    try:
        return host, int(port) if port else (8883 if tls else 1883), tls
    except ValueError:
        raise ValueError(f"expected a numeric port in MQTT URL {url!r}") from None


def _duration_s(value: Any, what: str) -> float:
    try:
        return parse_duration_ms(value) / 1000
    except ValueError as exc:
        raise ConnectorConfigError(f"{what}: {exc}") from None


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """The validated connection settings of an MQTT connector (see docs/connectors.md, MQTT devices)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: Optional[str] = None
    password: Optional[str] = None
    tls: Optional[dict[str, Any]] = None
    client_id: str = ""
    prefix: str = "kflow"
    qos: int = 1
    keepalive: int = 30
    connect_timeout: float = 10.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    state_wait: float = 1.0
    topics: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TOPICS))

    @classmethod
    def parse(cls, name: str, settings: dict[str, Any]) -> MqttSettings:
        """Validate a connector's ``settings`` mapping; every problem is reported at once."""
        problems = [f"unknown setting '{k}' (expected one of {', '.join(sorted(_SETTINGS))})"
                    for k in settings if k not in _SETTINGS]
        kw: dict[str, Any] = {}
        if "url" in settings:
            try:
                host, port, tls = parse_mqtt_url(str(settings["url"]))
            except ValueError as exc:
                problems.append(str(exc))
            else:
                kw.update(host=host, port=port, tls={} if tls else None)
        if "host" in settings:
            kw["host"] = str(settings["host"])
        if "port" in settings:
            try:
                kw["port"] = int(settings["port"])
            except (TypeError, ValueError):
                problems.append(f"port must be an integer, but is {settings['port']!r}")
        for key in ("username", "password", "client_id", "prefix"):
            if settings.get(key) is not None:
                kw[key] = str(settings[key])
        tls_conf = settings.get("tls")
        if tls_conf is not None:
            if tls_conf is True:
                tls_conf = {}
            if not isinstance(tls_conf, dict):
                problems.append(f"tls must be a mapping with {', '.join(sorted(_TLS_KEYS))}, but is {tls_conf!r}")
            else:
                problems += [f"unknown tls setting '{k}'" for k in tls_conf if k not in _TLS_KEYS]
                kw["tls"] = dict(tls_conf)
        if "qos" in settings:
            if settings["qos"] not in (0, 1, 2):
                problems.append(f"qos must be 0, 1 or 2, but is {settings['qos']!r}")
            else:
                kw["qos"] = int(settings["qos"])
        if "keepalive" in settings:
            try:
                kw["keepalive"] = int(settings["keepalive"])
            except (TypeError, ValueError):
                problems.append(f"keepalive must be an integer number of seconds, but is {settings['keepalive']!r}")
        for key in ("connect_timeout", "reconnect_min", "reconnect_max", "state_wait"):
            if key in settings:
                try:
                    kw[key] = parse_duration_ms(settings[key]) / 1000
                except ValueError as exc:
                    problems.append(f"{key}: {exc}")
        topics = dict(DEFAULT_TOPICS)
        for key, required in (("command_topic", {"device_id", "command"}),
                              ("response_topic", {"device_id", "correlation_id"}),
                              ("status_topic", {"device_id"})):
            if key in settings:
                topics[key] = str(settings[key])
            names = set(_PLACEHOLDER.findall(topics[key]))
            allowed = required | {"prefix", "command"} if key == "command_topic" else required | {"prefix"}
            if not required <= names:
                problems.append(f"{key} {topics[key]!r} must contain {', '.join('{' + n + '}' for n in sorted(required))}")
            if names - allowed:
                problems.append(f"{key} {topics[key]!r} uses unknown placeholder(s) {sorted(names - allowed)}")
        kw["topics"] = topics
        if problems:
            raise ConnectorConfigError(f"connector '{name}' (mqtt): " + "; ".join(problems))
        return cls(**kw)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`aiomqtt.Client` (host, credentials, TLS)."""
        kw: dict[str, Any] = {"hostname": self.host, "port": self.port, "keepalive": self.keepalive,
                              "timeout": self.connect_timeout}
        if self.username is not None:
            kw["username"] = self.username
            kw["password"] = self.password
        if self.tls is not None:
            kw["tls_params"] = aiomqtt.TLSParameters(
                ca_certs=self.tls.get("ca_file"), certfile=self.tls.get("cert"), keyfile=self.tls.get("key"),
                cert_reqs=ssl.CERT_NONE if self.tls.get("insecure") else ssl.CERT_REQUIRED)
            kw["tls_insecure"] = bool(self.tls.get("insecure"))
        return kw

    def topic(self, key: str, **values: str) -> str:
        """Fill the template ``key`` (``command_topic``, ...)."""
        return self.topics[key].format(prefix=self.prefix, **values)

    def subscription(self, key: str) -> str:
        """The template ``key`` as a subscription: every placeholder but ``{prefix}`` becomes ``+``."""
        return _PLACEHOLDER.sub(lambda m: self.prefix if m.group(1) == "prefix" else "+", self.topics[key])

    def pattern(self, key: str) -> re.Pattern[str]:
        """A regex matching topics of template ``key``, one named group per placeholder."""
        parts = re.split(r"(\{\w+\})", self.topics[key])
        out = []
        for part in parts:
            m = _PLACEHOLDER.fullmatch(part)
            if m is None:
                out.append(re.escape(part))
            elif m.group(1) == "prefix":
                out.append(re.escape(self.prefix))
            else:
                out.append(f"(?P<{m.group(1)}>[^/]+)")
        return re.compile("^" + "".join(out) + "$")


def mqtt_client_kwargs(url: str) -> dict[str, Any]:
    """aiomqtt keyword arguments for a bare ``mqtt://host:port`` URL."""
    host, port, tls = parse_mqtt_url(url)
    return MqttSettings(host=host, port=port, tls={} if tls else None).client_kwargs()


@dataclass(eq=False, slots=True)
class _InFlight:
    """A command published (or waiting for a connection) whose response has not arrived yet."""

    correlation_id: str
    device_id: str
    command: str
    topic: str
    payload: bytes
    qos: int
    future: asyncio.Future[Any]
    generation: int = -1  # the connection generation it was last published on


@connector_type
class MqttConnector(Connector):
    """Devices behind an MQTT broker: ``command``, ``query_state`` and ``publish`` operations.

    Device presence is tracked from the retained status topics (``{"online": bool}``, with a last
    will of ``{"online": false}``). A command to a device whose status says offline fails with
    ``DeviceOffline`` at once: non-retryable with ``offline: fail`` (the default), retryable with
    ``offline: wait`` so the engine's retry policy tries again (its backoff is a durable timer; the
    worker is not blocked) until the device is back or the step's ``schedule_to_close`` passes.
    """

    type = "mqtt"

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        self.settings = MqttSettings.parse(spec.name, spec.settings)
        self._ops = self._parse_operations()
        self._client: Optional[aiomqtt.Client] = None
        self._connected: Optional[asyncio.Event] = None
        self._generation = 0
        self._supervisor: Optional[asyncio.Task[None]] = None
        self._closing = False
        self._last_error = ""
        self._inflight: dict[str, _InFlight] = {}
        self._presence: dict[str, dict[str, Any]] = {}
        self._presence_changed: Optional[asyncio.Condition] = None
        self._response_re = self.settings.pattern("response_topic")
        self._status_re = self.settings.pattern("status_topic")
        self._client_id = self.settings.client_id or f"kflow-{spec.name}-{uuid.uuid4().hex[:8]}"

    # -- declaration -------------------------------------------------------------------------

    def _parse_operations(self) -> dict[str, dict[str, Any]]:
        problems: list[str] = []
        out: dict[str, dict[str, Any]] = {}
        for op_name, decl in self.spec.operations.items():
            where = f"operation '{op_name}'"
            if not isinstance(decl, dict):
                problems.append(f"{where}: expected a mapping with 'kind', but got {decl!r}")
                continue
            kind = decl.get("kind", "command")
            if kind not in _OP_KEYS:
                problems.append(f"{where}: kind must be one of {', '.join(sorted(_OP_KEYS))}, but is {kind!r}")
                continue
            unknown = sorted(set(decl) - _OP_KEYS[kind])
            if unknown:
                problems.append(f"{where}: unknown key(s) {unknown} for kind '{kind}'")
            op: dict[str, Any] = {"kind": kind, "qos": decl.get("qos", self.settings.qos)}
            if op["qos"] not in (0, 1, 2):
                problems.append(f"{where}: qos must be 0, 1 or 2, but is {op['qos']!r}")
            try:
                if kind == "command":
                    op["command"] = str(decl.get("command", op_name))
                    if any(c in op["command"] for c in "/+#"):
                        problems.append(f"{where}: command {op['command']!r} must not contain '/', '+' or '#'")
                    op["timeout"] = _duration_s(decl.get("timeout", "30s"), f"{where}: timeout")
                    op["offline"] = decl.get("offline", "fail")
                    if op["offline"] not in ("fail", "wait"):
                        problems.append(f"{where}: offline must be 'fail' or 'wait', but is {op['offline']!r}")
                elif kind == "query_state":
                    op["wait"] = _duration_s(decl["wait"], f"{where}: wait") if "wait" in decl else None
                else:
                    if not decl.get("topic"):
                        problems.append(f"{where}: a publish operation needs a 'topic' template")
                    op["topic"] = str(decl.get("topic", ""))
                    op["retain"] = bool(decl.get("retain", False))
            except ConnectorConfigError as exc:
                problems.append(str(exc))
            out[op_name] = op
        if problems:
            raise ConnectorConfigError(f"connector '{self.name}' (mqtt): " + "; ".join(problems))
        return out

    def operations(self) -> dict[str, Operation]:
        ops: dict[str, Operation] = {}
        for op_name, op in self._ops.items():
            if op["kind"] == "command":
                ops[op_name] = self._command_op(op_name, op)
            elif op["kind"] == "query_state":
                ops[op_name] = self._state_op(op)
            else:
                ops[op_name] = self._publish_op(op)
        return ops

    # -- connection --------------------------------------------------------------------------

    async def connect(self) -> None:
        """Start the supervised connection and wait until the broker accepted it (or raise)."""
        if self._supervisor is not None:
            await self.disconnect()
        self._closing = False
        # Kept across reconnects: commands in flight wait on these objects.
        if self._connected is None or self._presence_changed is None:
            self._connected = asyncio.Event()
            self._presence_changed = asyncio.Condition()
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(self._supervise(first), name=f"kflow-mqtt-{self.name}")
        try:
            await asyncio.wait_for(asyncio.shield(first), self.settings.connect_timeout + 1)
        except BaseException as exc:
            await self.disconnect()
            if isinstance(exc, asyncio.TimeoutError):
                raise ConnectionError(f"MQTT broker {self.settings.host}:{self.settings.port} did not accept a "
                                      f"connection within {self.settings.connect_timeout:g}s"
                                      + (f": {self._last_error}" if self._last_error else "")) from None
            raise

    async def disconnect(self) -> None:
        """Stop the connection; commands in flight keep waiting for a reconnect or their timeout."""
        self._closing = True
        task, self._supervisor = self._supervisor, None
        if task is not None:
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - closing must not raise
                pass
        # Commands in flight stay registered: a later connect() re-publishes them, and each one
        # that gets no answer ends with DeviceTimeout when its own timeout passes.

    async def health(self) -> bool:
        return self._connected is not None and self._connected.is_set()

    async def _supervise(self, first: asyncio.Future[None]) -> None:
        s = self.settings
        delay = s.reconnect_min
        while not self._closing:
            try:
                async with aiomqtt.Client(identifier=self._client_id, clean_session=True, **s.client_kwargs()) as client:
                    await client.subscribe(s.subscription("status_topic"), qos=1)
                    await client.subscribe(s.subscription("response_topic"), qos=max(s.qos, 1))
                    self._generation += 1
                    self._client = client
                    assert self._connected is not None
                    self._connected.set()
                    if not first.done():
                        first.set_result(None)
                    else:
                        log.info("connector %s: reconnected to MQTT %s:%d; re-publishing %d in-flight command(s)",
                                 self.name, s.host, s.port, len(self._inflight))
                    delay = s.reconnect_min
                    for f in list(self._inflight.values()):
                        await self._publish(f)
                    async for message in client.messages:
                        self._on_message(message)
                    raise aiomqtt.MqttError("the message stream ended")
            except (aiomqtt.MqttError, OSError) as exc:
                self._last_error = str(exc)
                log.warning("connector %s: MQTT %s:%d unavailable (%s); reconnecting in %.1fs",
                            self.name, s.host, s.port, exc, delay)
            finally:
                self._client = None
                if self._connected is not None:
                    self._connected.clear()
            if self._closing:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, s.reconnect_max)

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        raw = message.payload if isinstance(message.payload, (bytes, bytearray)) else str(message.payload or "").encode()
        m = self._response_re.match(topic)
        if m is not None:
            f = self._inflight.get(m.group("correlation_id"))
            if f is None or f.future.done():
                log.debug("connector %s: response %s matches no command in flight", self.name, topic)
                return
            try:
                f.future.set_result(orjson.loads(raw) if raw else None)
            except orjson.JSONDecodeError as exc:
                f.future.set_exception(ConnectorError("InvalidResponse", f"device {f.device_id} answered "
                                                      f"{f.command!r} with invalid JSON: {exc}", retryable=False))
            return
        m = self._status_re.match(topic)
        if m is not None:
            device = m.group("device_id")
            if not raw:
                self._presence.pop(device, None)  # retained status cleared
            else:
                try:
                    status = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    log.debug("connector %s: ignoring non-JSON status on %s", self.name, topic)
                    return
                if not isinstance(status, dict):
                    status = {"online": bool(status)}
                self._presence[device] = status
                if status.get("online") is True and not message.retain:
                    # The device (re)connected just now and subscribed before announcing itself:
                    # commands it may have missed while away are sent again, same correlation ids.
                    for f in self._inflight.values():
                        if f.device_id == device and not f.future.done():
                            asyncio.get_running_loop().create_task(self._publish(f, force=True))
            asyncio.get_running_loop().create_task(self._notify_presence())

    async def _notify_presence(self) -> None:
        assert self._presence_changed is not None
        async with self._presence_changed:
            self._presence_changed.notify_all()

    async def _publish(self, f: _InFlight, force: bool = False) -> None:
        """Publish ``f`` once per connection generation (``force``: again); a lost connection leaves it
        for the reconnect."""
        client = self._client
        if client is None or (f.generation == self._generation and not force):
            return
        generation = self._generation
        try:
            await client.publish(f.topic, f.payload, qos=f.qos)
        except aiomqtt.MqttError as exc:
            log.info("connector %s: publishing command %s failed (%s); it is re-published on reconnect",
                     self.name, f.correlation_id, exc)
            return
        f.generation = generation

    async def _wait_connected(self, timeout: float) -> bool:
        if self._connected is None:
            raise ConnectorError("NotConnected", f"connector '{self.name}' is not connected (connect() not called)")
        try:
            await asyncio.wait_for(self._connected.wait(), max(timeout, 0.001))
        except TimeoutError:
            return False
        return True

    async def status(self, device_id: str, wait: Optional[float] = None) -> Optional[dict[str, Any]]:
        """The device's last retained status, waiting up to ``wait`` seconds for a first one."""
        wait = self.settings.state_wait if wait is None else wait
        if device_id in self._presence:
            return self._presence[device_id]
        deadline = time.monotonic() + wait
        await self._wait_connected(wait)
        assert self._presence_changed is not None
        async with self._presence_changed:
            while device_id not in self._presence:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    await asyncio.wait_for(self._presence_changed.wait(), left)
                except TimeoutError:
                    return None
        return self._presence.get(device_id)

    # -- operations --------------------------------------------------------------------------

    @staticmethod
    def _device_id(op_name: str, value: Any) -> str:
        if not isinstance(value, dict) or not isinstance(value.get("device_id"), str) or not value["device_id"]:
            raise ConnectorError("InvalidInput", f"operation '{op_name}' expects an object with a 'device_id' string, "
                                 f"but got {orjson.dumps(value).decode()[:200]}", retryable=False)
        device_id: str = value["device_id"]
        if any(c in device_id for c in "/+#"):
            raise ConnectorError("InvalidInput", f"device_id {device_id!r} must not contain '/', '+' or '#'",
                                 retryable=False)
        return device_id

    def _correlation_id(self) -> str:
        from kflow.worker import NotInActivityError, current_task

        try:
            task = current_task()
        except NotInActivityError:
            return uuid.uuid4().hex
        instance = hashlib.sha1(task.instance_id.encode()).hexdigest()[:10]
        return f"{instance}-{task.activity_id}-{task.attempt}".replace("/", "_").replace("+", "_").replace("#", "_")

    def _command_op(self, op_name: str, op: dict[str, Any]) -> Operation:
        async def command(value: Any) -> Any:
            return await self.send_command(op_name, op, value)

        command.__name__ = f"{self.name}.{op_name}"
        return command

    async def send_command(self, op_name: str, op: dict[str, Any], value: Any) -> Any:
        """Publish a command and await its correlated response (see the class docstring)."""
        device_id = self._device_id(op_name, value)
        started = time.monotonic()
        timeout: float = op["timeout"]
        status = await self.status(device_id, min(self.settings.state_wait, timeout))
        if status is not None and status.get("online") is False:
            retryable = op["offline"] == "wait"
            raise ConnectorError("DeviceOffline", f"device {device_id} is offline (its retained status says so); "
                                 + ("retrying per the step's retry policy" if retryable else "offline: fail"),
                                 retryable=retryable)
        cid = self._correlation_id()
        existing = self._inflight.get(cid)
        if existing is not None and not existing.future.done():
            flight = existing  # a duplicate delivery of the same attempt: share its response
        else:
            response_topic = self.settings.topic("response_topic", device_id=device_id, correlation_id=cid)
            args = {k: v for k, v in value.items() if k != "device_id"}
            payload = orjson.dumps({"correlation_id": cid, "command": op["command"], "args": args,
                                    "reply_to": response_topic})
            topic = self.settings.topic("command_topic", device_id=device_id, command=op["command"])
            flight = _InFlight(cid, device_id, op["command"], topic, payload, op["qos"],
                               asyncio.get_running_loop().create_future())
            self._inflight[cid] = flight
            await self._publish(flight)
        try:
            left = timeout - (time.monotonic() - started)
            result = await asyncio.wait_for(asyncio.shield(flight.future), max(left, 0.001))
        except TimeoutError:
            lost = "" if self._connected is not None and self._connected.is_set() else " (the MQTT broker connection is down)"
            raise ConnectorError("DeviceTimeout", f"device {device_id} did not answer {op['command']!r} "
                                 f"(correlation id {cid}) within {timeout:g}s{lost}") from None
        finally:
            if self._inflight.get(cid) is flight:
                del self._inflight[cid]
        if isinstance(result, dict) and isinstance(result.get("error"), (dict, str)):
            err = result["error"]
            if isinstance(err, str):
                err = {"message": err}
            raise ConnectorError(str(err.get("type") or "DeviceError"), str(err.get("message") or ""),
                                 retryable=bool(err.get("retryable", False)))
        return result

    def _state_op(self, op: dict[str, Any]) -> Operation:
        async def query_state(value: Any) -> Any:
            device_id = self._device_id("query_state", value)
            status = await self.status(device_id, op["wait"])
            if status is None:
                return {"device_id": device_id, "online": False, "known": False}
            return {"device_id": device_id, **status, "known": True}

        return query_state

    def _publish_op(self, op: dict[str, Any]) -> Operation:
        async def publish(value: Any) -> Any:
            fields = value if isinstance(value, dict) else {}
            try:
                topic = op["topic"].format(prefix=self.settings.prefix, **{k: v for k, v in fields.items()
                                                                            if isinstance(v, (str, int))})
            except (KeyError, IndexError) as exc:
                raise ConnectorError("InvalidInput", f"topic template {op['topic']!r} needs field {exc} in the "
                                     "input", retryable=False) from None
            body = fields.get("payload", value) if isinstance(value, dict) else value
            if not await self._wait_connected(self.settings.connect_timeout) or self._client is None:
                raise ConnectorError("MqttUnavailable", f"not connected to MQTT {self.settings.host}:{self.settings.port}")
            try:
                await self._client.publish(topic, orjson.dumps(body), qos=op["qos"], retain=op["retain"])
            except aiomqtt.MqttError as exc:
                raise ConnectorError("MqttUnavailable", f"publishing to {topic} failed: {exc}") from None
            return {"topic": topic, "published": True}

        return publish
