"""Connector declarations: loading, validation errors, ``${ENV}`` resolution, secret redaction, templates."""

from __future__ import annotations

import logging

import pytest

from kflow._worker.output import result_command
from kflow.connectors.base import ConnectorConfigError, ConnectorError
from kflow.connectors.config import Template, load_connectors, redacted, scrub
from kflow.connectors.host import ConnectorHost
from kflow.model.messages import Task
from kflow.schemas.codec import decode_command
from kflow.testing import assert_eventually
from tests.net import free_port


def test_unknown_type_lists_the_known_types():
    with pytest.raises(ConnectorConfigError) as ei:
        load_connectors("connectors:\n  - {name: x, type: ftp}\n")
    msg = str(ei.value)
    assert "connector 'x': unknown type 'ftp'" in msg
    assert "http" in msg and "sql" in msg and "kafka" in msg


def test_missing_env_var_names_connector_setting_and_variable():
    text = "connectors:\n  - {name: orders, type: http, settings: {auth: {bearer: '${ORDERS_TOKEN}'}}}\n"
    with pytest.raises(ConnectorConfigError) as ei:
        load_connectors(text, env={})
    assert "connector 'orders'" in str(ei.value) and "'auth.bearer'" in str(ei.value)
    assert "ORDERS_TOKEN is not set" in str(ei.value)


def test_env_default_and_value_are_resolved_and_secret():
    text = """
connectors:
  - name: a
    type: http
    settings: {base_url: "http://${API_HOST:-localhost}:8080", headers: {x-plain: plain}}
    operations: {get: {url: /}}
"""
    [spec] = load_connectors(text, env={})
    assert spec.settings["base_url"] == "http://localhost:8080"
    assert "base_url" in spec.secrets and "headers.x-plain" not in spec.secrets
    [spec2] = load_connectors(text, env={"API_HOST": "api.internal"})
    assert spec2.settings["base_url"] == "http://api.internal:8080"


def test_duplicate_names_are_an_error():
    with pytest.raises(ConnectorConfigError, match="duplicate connector name 'a'"):
        load_connectors("connectors:\n  - {name: a, type: http}\n  - {name: a, type: sql}\n")


def test_shape_errors_name_the_connector():
    with pytest.raises(ConnectorConfigError) as ei:
        load_connectors("connectors:\n  - {name: a, type: http, setings: {}}\n")
    assert "connector 'a'" in str(ei.value) and "setings" in str(ei.value)
    with pytest.raises(ConnectorConfigError, match="top-level 'connectors:'"):
        load_connectors("- just a list\n- of things\n")


def test_secrets_are_redacted_in_repr_logs_and_messages():
    text = """
connectors:
  - name: a
    type: http
    settings:
      auth: {basic: {username: ann, password: hunter22}}
      headers: {x-token: tok-123456}
      api_key: {header: X-Key, value: key-abcdef}
      client_secret: "${SECRET}"
"""
    [spec] = load_connectors(text, env={"SECRET": "env-secret-9"})
    assert spec.secrets == {"auth.basic.password", "headers.x-token", "api_key.value", "client_secret"}
    shown = repr(spec) + str(redacted(spec))
    for value in ("hunter22", "tok-123456", "key-abcdef", "env-secret-9"):
        assert value not in shown
    assert redacted(spec)["auth"]["basic"] == {"username": "ann", "password": "***"}
    assert scrub("login failed for ann:hunter22 with env-secret-9", spec) == "login failed for ann:*** with ***"
    # the values themselves are still usable
    assert spec.settings["auth"]["basic"]["password"] == "hunter22"


def test_templates_interpolate_cel_and_escape_braces():
    t = Template("/orders/{input.id}/{{literal}}/{ {'a': input.n}.a + 1 }", "t")
    assert t.render({"input": {"id": "x7", "n": 1}}) == "/orders/x7/{literal}/2"
    assert Template("{input}", "t").render({"input": {"k": [1]}}) == '{"k":[1]}'
    with pytest.raises(ConnectorConfigError, match="unclosed"):
        Template("/orders/{input.id", "op.url")
    with pytest.raises(ConnectorConfigError, match="op.url"):
        Template("/orders/{input.}", "op.url")


def _host(text: str) -> ConnectorHost:
    return ConnectorHost(load_connectors(text))


def test_bad_operations_fail_at_construction_with_every_problem():
    with pytest.raises(ConnectorConfigError) as ei:
        _host("""
connectors:
  - name: db
    type: sql
    settings: {url: "sqlite://"}
    operations:
      q: {statement: "SELECT * FROM t WHERE id = :id AND k = :k", params: {id: input.id, extra: "1"}}
  - name: api
    type: http
    settings: {auth: {bearer: x, basic: {username: a, password: b}}}
    operations: {get: {url: "/x/{input.}"}}
  - name: db2
    type: sql
    settings: {url: "nosuchdb://x/y"}
    operations: {q: {statement: "SELECT 1"}}
""")
    msg = str(ei.value)
    assert "connector 'db2' (sql): settings.url" in msg
    assert "operation 'q'" in msg and "without a value in params: k" in msg
    assert "connector 'api'" in msg and "exactly one of bearer, basic, api_key" in msg


def test_failed_connection_is_retried_and_never_logs_the_password(caplog):
    caplog.set_level(logging.DEBUG, logger="kflow")
    host = _host(f"""
connectors:
  - name: db
    type: sql
    settings: {{url: "postgresql://ann@127.0.0.1:{free_port()}/x", password: "pw-SECRET-77", connect_timeout: 1}}
    operations: {{q: {{statement: "SELECT 1"}}}}
""")
    host.backoff_initial = host.backoff_max = 0.05
    host.start()
    try:
        assert_eventually(lambda: caplog.text.count("connection attempt") >= 2, timeout=20)
        assert host.healthy() == {"db": False}
    finally:
        host.stop()
    assert "pw-SECRET-77" not in caplog.text


def _task() -> Task:
    return Task("wf-1", "a1", 2, "api.get", "conn", None, "wf", 0)


def test_worker_reports_connector_error_type_and_retryability():
    value, outcome = result_command(_task(), error=ConnectorError("HttpTimeout", "slow", retryable=True))
    cmd = decode_command(value)
    assert cmd.type == "FailActivity"
    assert (cmd.data["error_type"], cmd.data["retryable"], cmd.data["message"]) == ("HttpTimeout", True, "slow")
    value, _ = result_command(_task(), error=ConnectorError("NotFound", "gone", retryable=False))
    assert decode_command(value).data["retryable"] is False


def test_cli_connector_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from kflow.cli import app

    runner = CliRunner()
    bad = tmp_path / "c.yaml"
    bad.write_text("connectors:\n  - {name: x, type: ftp}\n")
    for args, expected in ((["connect", str(bad)], "unknown type 'ftp'"),
                           (["connect", str(tmp_path / "missing.yaml")], "no such file"),
                           (["worker", "--connectors", str(bad)], "unknown type 'ftp'"),
                           (["worker"], "--connectors FILE")):
        result = runner.invoke(app, args)
        assert result.exit_code != 0 and "Traceback" not in result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and expected in errors[0], (args, result.stderr)


class _AnyEnv(dict):
    """An environment in which every variable is set."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        return f"value-of-{key}"


def test_readme_connector_examples_are_valid():
    import re

    from tests.docs import page

    section = page("connectors")
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", section, re.S) if b.startswith("connectors:\n  - name") and "{...}" not in b]
    assert len(blocks) >= 5
    types = set()
    for block in blocks:
        host = ConnectorHost(load_connectors(block, env=_AnyEnv()))
        types |= {c.spec.type for c in host.connectors.values()}
    assert types >= {"http", "sql", "amqp", "kafka", "email"}


def test_host_activities_merge_with_the_workers_own():
    from kflow.streams.activities import DuplicateActivityError
    from kflow.worker import activity

    host = _host("""
connectors:
  - name: lite
    type: sql
    queue: data
    settings: {url: "sqlite://"}
    operations: {one: {statement: "SELECT 1 AS one", result: "rows[0].one"}}
""")

    @activity("mine", queue="data")
    def mine(x):
        return x

    acts = host.activities([mine])
    assert sorted(acts["data"]) == ["lite.one", "mine"]

    @activity("lite.one", queue="data")
    def clash(x):
        return x

    with pytest.raises(DuplicateActivityError, match="lite.one"):
        host.activities([clash])


def test_dotted_setting_names_are_scrubbed_too():
    [spec] = load_connectors("""
connectors:
  - name: k
    type: kafka
    settings: {bootstrap: "b:9092", config: {sasl.username: u, sasl.password: pw-dotted-1}}
""")
    assert "config.sasl.password" in spec.secrets
    assert scrub("auth failed with pw-dotted-1", spec) == "auth failed with ***"
    assert redacted(spec)["config"]["sasl.password"] == "***"
