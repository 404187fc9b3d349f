"""Every documented ``KFLOW_*`` variable has an effect, and a bad value fails start-up with a clear message.

Two tables: every row of the README's configuration table is set in the environment and must
change its settings object (a variable nobody reads fails here); the settings the shared
Kafka/telemetry layer and the engine consume are then followed to what they change — librdkafka
configurations, topic names and settings, the store, the log handler, the span exporter and the
operations endpoint.
"""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, get_args

import pytest
from typer.testing import CliRunner

from kflow import _tracing
from kflow._cli.common import setup_logging
from kflow._config_doc import PROCESSES, config_table
from kflow._log import ContextFilter, make_formatter
from kflow.cli import app
from kflow.config import (
    ConfigError,
    EngineConfig,
    KafkaConfig,
    TelemetryConfig,
    WorkerConfig,
    kafka_passthrough,
    load_config,
    redact,
)
from tests.net import free_port


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("KFLOW_") or key.startswith("OTEL_"):
            monkeypatch.delenv(key)


def _documented() -> list[str]:
    return [line.split("`")[1] for line in config_table().splitlines()[2:]]


def _candidates(field: Any) -> list[str]:
    """Environment strings to try for ``field``, the likeliest valid non-default value first."""
    default = field.default
    out = [c for c in get_args(field.annotation) if isinstance(c, str) and c != default]
    if isinstance(default, bool):
        out.append("false" if default else "true")
    elif isinstance(default, (int, float)):
        out += [str(default + 1), str(default - 1)]
    elif isinstance(default, str) and "://" in default:
        out.append(default.split("://", 1)[0] + "://other-host:1")
    return out + ["other-host:19092", "set-by-test", "1", "true", "http://other-host:1", '["x"]', '{"a": "b"}', '{"a": 2}']


CLASSES = {f"KFLOW_{name.upper()}": (cls, name) for cls, _ in reversed(PROCESSES) for name in cls.model_fields}


@pytest.mark.parametrize("variable", [v for v in _documented() if v != "KFLOW_KAFKA_*"])
def test_every_documented_variable_changes_its_settings(variable, monkeypatch):
    cls, name = CLASSES[variable]
    field = cls.model_fields[name]
    for raw in _candidates(field):
        monkeypatch.setenv(variable, raw)
        try:
            value = getattr(load_config(cls), name)
        except ConfigError:
            continue  # not a valid value of this setting: try the next
        shown = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        assert shown != field.default, f"{variable}={raw} did not change {cls.__name__}.{name}"
        return
    pytest.fail(f"no candidate value was accepted for {variable}; extend _candidates")


def test_the_table_documents_every_setting_and_the_passthrough():
    documented = set(_documented())
    assert "KFLOW_KAFKA_*" in documented
    for cls, _ in PROCESSES:
        for name in cls.model_fields:
            assert f"KFLOW_{name.upper()}" in documented



def _serves_metrics(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=")


def _metrics_port_effect(port_env: str) -> Callable[[Any], bool]:
    def check(cfg: Any) -> bool:
        from kflow._cli.processes import start_telemetry

        server = start_telemetry(cfg, "test", lambda: True)
        try:
            return server is None if port_env == "0" else _serves_metrics(int(port_env))
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
    return check


_PORT = str(free_port())

#: (variables, settings class, effect that must hold on the built settings object)
EFFECTS: list[tuple[dict[str, str], type, Callable[[Any], bool]]] = [
    ({"KFLOW_BOOTSTRAP": "k1:9093,k2:9093"}, KafkaConfig, lambda c: c.client_conf()["bootstrap.servers"] == "k1:9093,k2:9093"),
    ({"KFLOW_TOPIC_PREFIX": "prod."}, KafkaConfig, lambda c: c.names.commands == "prod.commands"),
    ({"KFLOW_PARTITIONS": "16"}, KafkaConfig, lambda c: c.topic_settings.partitions == 16),
    ({"KFLOW_REPLICATION": "3"}, KafkaConfig, lambda c: c.topic_settings.replication == 3),
    ({"KFLOW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, KafkaConfig,
     lambda c: c.producer_conf()["security.protocol"] == "SASL_SSL"),
    ({"KFLOW_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KFLOW_KAFKA_SASL_USERNAME": "app",
      "KFLOW_KAFKA_SASL_PASSWORD": "s3cret"}, KafkaConfig,
     lambda c: (c.consumer_conf("g")["sasl.mechanism"], c.consumer_conf("g")["sasl.username"],
                c.consumer_conf("g")["sasl.password"]) == ("SCRAM-SHA-512", "app", "s3cret")
     and "s3cret" not in repr(c) and "s3cret" not in str(redact(c.client_conf()))),
    ({"KFLOW_KAFKA_SSL_CA_LOCATION": "/etc/ca.pem", "KFLOW_KAFKA_SASL_OAUTHBEARER_METHOD": "oidc",
      "KFLOW_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "tok"}, WorkerConfig,
     lambda c: (c.producer_conf()["ssl.ca.location"], c.consumer_conf("g")["sasl.oauthbearer.method"])
     == ("/etc/ca.pem", "oidc") and redact(c.client_conf())["sasl.oauthbearer.client.secret"] == "***"),
    ({"KFLOW_FETCH_WAIT_MS": "250"}, KafkaConfig, lambda c: c.consumer_conf("g")["fetch.wait.max.ms"] == 250),
    ({"KFLOW_DEV_TUNING": "true"}, KafkaConfig, lambda c: c.consumer_conf("g")["session.timeout.ms"] == 6000),
    ({"KFLOW_DEV_TUNING": "false"}, KafkaConfig, lambda c: "session.timeout.ms" not in c.consumer_conf("g")),
    ({"KFLOW_METRICS_PORT": _PORT}, WorkerConfig, _metrics_port_effect(_PORT)),
    ({"KFLOW_METRICS_PORT": "0"}, WorkerConfig, _metrics_port_effect("0")),
    ({"KFLOW_ENGINE_ID": "engine-0"}, EngineConfig, lambda c: c.resolved_engine_id() == "engine-0"),
    ({"KFLOW_STATE_DIR": "/tmp/kflow-cfg-test"}, EngineConfig,
     lambda c: c.resolved_engine_id() != EngineConfig(state_dir="/tmp/other").resolved_engine_id()),
]


@pytest.mark.parametrize("env,cls,effect", EFFECTS, ids=lambda v: ",".join(v) if isinstance(v, dict) else "")
def test_setting_has_its_effect(env, cls, effect, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert effect(load_config(cls))


def test_engine_settings_reach_the_processor(monkeypatch, tmp_path):
    from kflow.streams.processor import EngineProcessor

    monkeypatch.setenv("KFLOW_STATE_DIR", str(tmp_path / "st"))
    monkeypatch.setenv("KFLOW_CACHE_SIZE", "123")
    proc = EngineProcessor(load_config(EngineConfig))
    assert proc.store.root == str(tmp_path / "st" / "state")
    assert proc.store.cache_size == 123


def test_engine_limits_reach_the_engine(monkeypatch):
    """The processor hands ``config.limits()`` to the definitions view the pure engine reads."""
    from kflow.engine.activity import limits_of

    for var, value in (("KFLOW_MAX_HISTORY_EVENTS", "1234"), ("KFLOW_MAX_PENDING_ACTIVITIES", "7"),
                       ("KFLOW_MAX_PENDING_TIMERS", "8"), ("KFLOW_MAX_PENDING_CHILDREN", "9"),
                       ("KFLOW_MAX_PAYLOAD_BYTES", "4096")):
        monkeypatch.setenv(var, value)
    class View:
        limits = load_config(EngineConfig).limits()

    lim = limits_of(View())
    assert (lim.max_history_events, lim.max_pending_activities, lim.max_pending_timers,
            lim.max_pending_children, lim.max_payload_bytes) == (1234, 7, 8, 9, 4096)


def test_log_level_and_format(monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        root.handlers = [h for h in root.handlers if not getattr(h, "_kflow", False)]
        monkeypatch.setenv("KFLOW_LOG_LEVEL", "warning")
        monkeypatch.setenv("KFLOW_LOG_FORMAT", "json")
        setup_logging()
        assert logging.getLogger("kflow").level == logging.WARNING
        handler = next(h for h in root.handlers if getattr(h, "_kflow", False))
        record = logging.LogRecord("kflow.x", logging.WARNING, __file__, 1, "sasl.password=%s", ("hunter2",), None)
        for f in handler.filters:
            f.filter(record)
        line = handler.format(record)
        assert line.startswith("{") and '"level": "WARNING"' in line and "hunter2" not in line
        assert '"instance_id"' not in line and "null" not in line  # unbound context fields are left out
    finally:
        root.handlers = saved
        logging.getLogger("kflow").setLevel(logging.NOTSET)


def test_text_format_on_a_terminal():
    class Tty:
        def isatty(self) -> bool:
            return True

    record = logging.LogRecord("kflow.x", logging.INFO, __file__, 1, "hello", None, None)
    ContextFilter().filter(record)
    assert make_formatter("auto", Tty()).format(record).endswith("kflow.x: hello")
    assert make_formatter("auto", object()).format(record).startswith("{")


def test_otlp_endpoint_and_service_name(monkeypatch):
    monkeypatch.setenv("KFLOW_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("KFLOW_SERVICE_NAME", "orders-engine")
    cfg = load_config(TelemetryConfig)
    saved = _tracing._provider
    try:
        assert _tracing.configure(cfg.service_name, cfg.otlp_endpoint)
        provider = _tracing._provider
        assert provider.resource.attributes["service.name"] == "orders-engine"
        provider.shutdown()
    finally:
        _tracing.use_provider(saved)
    assert not _tracing.configure("x", "")  # unset: no exporter, tracing stays a no-op


BAD = [
    ("KFLOW_PARTITIONS", "0", "greater than or equal to 1"),
    ("KFLOW_PARTITIONS", "many", "valid integer"),
    ("KFLOW_MAX_BATCH", "0", "greater than or equal to 1"),
    ("KFLOW_METRICS_PORT", "70000", "less than or equal to 65535"),
    ("KFLOW_LOG_LEVEL", "LOUD", "'DEBUG', 'INFO'"),
    ("KFLOW_LOG_FORMAT", "xml", "'auto', 'json' or 'text'"),
    ("KFLOW_BOOTSTRAP", "kafka:ninety", "expected host[:port]"),
    ("KFLOW_BOOTSTRAP", "k1:9092,,k2:9092", "expected host[:port]"),
    ("KFLOW_DEV_TUNING", "perhaps", "valid boolean"),
    ("KFLOW_KAFKA_SSL__CA", "x", "does not name a librdkafka setting"),
]


@pytest.mark.parametrize("variable,raw,message", BAD)
def test_bad_value_is_one_clear_error(variable, raw, message, monkeypatch):
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ConfigError) as info:
        load_config(EngineConfig)
    text = str(info.value)
    assert text.startswith("bad configuration: ") and variable in text and message in text
    assert "\n" not in text


def test_bad_value_fails_engine_start_up_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("KFLOW_MAX_BATCH", "0")
    result = CliRunner().invoke(app, ["engine", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: bad configuration: KFLOW_MAX_BATCH")
    assert "Traceback" not in result.output


def test_set_option_overrides_and_rejects_unknown_names(tmp_path):
    from kflow._cli.processes import parse_settings

    assert load_config(EngineConfig, **parse_settings(["KFLOW_MAX_BATCH=7", "cache_size=9"])).max_batch == 7
    result = CliRunner().invoke(app, ["worker", "-m", "json", "--set", "no_such=1"])
    assert result.exit_code == 1 and "KFLOW_NO_SUCH: no such setting of WorkerConfig" in result.output
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_settings(["oops"])


def test_passthrough_keeps_named_fields_first(monkeypatch):
    monkeypatch.setenv("KFLOW_KAFKA_BOOTSTRAP_SERVERS", "sneaky:1")
    monkeypatch.setenv("KFLOW_KAFKA_SASL_USERNAME", "named")  # a field of its own, not pass-through
    assert kafka_passthrough() == {"bootstrap.servers": "sneaky:1"}
    cfg = load_config(KafkaConfig, bootstrap="real:9092")
    assert cfg.client_conf()["bootstrap.servers"] == "real:9092"
    assert cfg.client_conf()["sasl.username"] == "named"


def test_log_records_carry_the_instance_context():
    from kflow._log import log_context
    from kflow._worker.context import ActivityContext, bind, unbind
    from kflow.model.messages import Task

    fmt = make_formatter("json")

    def line(**kw: Any) -> str:
        record = logging.LogRecord("kflow.worker", logging.INFO, __file__, 1, "hello", None, None)
        ContextFilter().filter(record)
        return fmt.format(record)

    with log_context(instance_id="order-7", workflow="order", tenant="acme"):
        out = line()
    assert '"instance_id": "order-7"' in out and '"workflow": "order"' in out and '"tenant": "acme"' in out
    task = Task("inv-9", "a1", 1, "charge", "default", None, "invoice", 0)
    token = bind(ActivityContext(task, lambda cmd: None))
    try:
        out = line()  # what an activity function logs while it runs in a worker
    finally:
        unbind(token)
    assert '"instance_id": "inv-9"' in out and '"workflow": "invoice"' in out
    assert '"instance_id"' not in line()  # outside the activity, nothing is bound


def test_readyz_needs_assigned_work_and_a_reachable_broker():
    from kflow._http import serve_operations
    from kflow.testing import assert_eventually

    def get(port: int, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    ready = {"v": False}
    with socket.socket() as listener:  # stands in for a reachable bootstrap server
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        good = serve_operations(0, lambda: ready["v"], host="127.0.0.1",
                                bootstrap=f"127.0.0.1:{listener.getsockname()[1]}")
        bad = serve_operations(0, lambda: True, host="127.0.0.1", bootstrap=f"127.0.0.1:{free_port()}")
        try:
            gport, bport = good.server_address[1], bad.server_address[1]
            assert get(gport, "/healthz") == (200, "ok\n")
            code, body = get(gport, "/readyz")
            assert code == 503 and "not assigned" in body
            ready["v"] = True
            assert_eventually(lambda: get(gport, "/readyz")[0] == 200, timeout=10, msg="ready with a broker")
            code, body = get(bport, "/readyz")
            assert code == 503 and "broker unreachable" in body
        finally:
            for s in (good, bad):
                s.shutdown()
                s.server_close()


def test_engine_worker_and_connect_default_to_different_metrics_ports(monkeypatch):
    """Started side by side on one host with no settings, they must not collide on one port."""
    monkeypatch.delenv("KFLOW_METRICS_PORT", raising=False)
    ports = {EngineConfig().metrics_port_for("engine"), WorkerConfig().metrics_port_for("worker"),
             WorkerConfig().metrics_port_for("connect")}
    assert len(ports) == 3
    monkeypatch.setenv("KFLOW_METRICS_PORT", "0")
    assert EngineConfig().metrics_port_for("engine") == 0 and WorkerConfig().metrics_port_for("worker") == 0
