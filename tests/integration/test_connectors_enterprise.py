"""Enterprise connectors against real services: HTTP (and webhooks), SQL, AMQP, Kafka request/reply, SMTP.

One :class:`ConnectorHost` serves every connector of this module on queue ``conn``; a real engine
and worker (the ``stack`` fixture) run spec workflows whose tasks are ``<connector>.<operation>``.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client import REGISTRY

from kflow._http import serve_operations
from kflow.connectors.base import ConnectorError
from kflow.connectors.config import load_connectors
from kflow.connectors.host import ConnectorHost, ConnectorUnavailable
from kflow.connectors.kafka import CORRELATION_HEADER, REPLY_TOPIC_HEADER
from kflow.model.errors import NonRetryableError, WorkflowFailedError
from kflow.testing import assert_eventually
from tests.services import (  # noqa: F401  # noqa: F401
    AMQP_URL,
    HttpService,
    Seen,
    amqp_url,
    free_port,
    http_service,
    post_json,
    postgres_url,
    reachable,
    smtp_server,
)

Q = "conn"
TOKEN = "tok-" + uuid.uuid4().hex
RUN = uuid.uuid4().hex[:8]
TABLE = f"kflow_orders_{RUN}"


def uid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


# -- the external systems -------------------------------------------------------------------


def _routes(service: HttpService) -> None:
    def order(_s: HttpService, seen: Seen) -> tuple[int, Any]:
        return 200, {"id": int(seen.path.rsplit("/", 1)[-1]), "state": "open"}

    def status(_s: HttpService, seen: Seen) -> tuple[int, Any]:
        return int(seen.path.split("?")[0].rsplit("/", 1)[-1]), {"error": "as asked"}

    def flaky(s: HttpService, seen: Seen) -> tuple[int, Any]:
        n = s.count(seen.path)
        return (503, {"error": "busy"}) if n < 3 else (200, {"attempts": n})

    def job(_s: HttpService, seen: Seen) -> tuple[int, Any]:
        body = seen.body
        if body.get("complete"):  # the external system calls back later, from elsewhere
            threading.Timer(0.05, post_json, (body["callback"], {"job": body["n"], "status": "done"})).start()
        return 202, {"accepted": True}

    service.routes.update({"/orders/": order, "/status/": status, "/flaky/": flaky, "/jobs": job})


@pytest.fixture(scope="module")
def kafka_topics(kafka_bootstrap: str) -> tuple[str, str]:
    requests, replies = f"svc.requests.{RUN}", f"svc.replies.{RUN}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for f in admin.create_topics([NewTopic(requests, 2, 1), NewTopic(replies, 2, 1)]).values():
        f.result(30)
    return requests, replies


@pytest.fixture(scope="module")
def kafka_responder(kafka_bootstrap: str, kafka_topics: tuple[str, str]) -> Iterator[None]:
    """A service that answers every request with ``{"echo": value}`` on the reply topic it names."""
    requests, _ = kafka_topics
    stop = threading.Event()
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"responder-{RUN}",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
    consumer.subscribe([requests])

    def serve() -> None:
        while not stop.is_set():
            msg = consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            headers = dict(msg.headers() or [])
            if REPLY_TOPIC_HEADER not in headers:  # a plain notification: nothing to answer
                continue
            producer.produce(headers[REPLY_TOPIC_HEADER].decode(), orjson.dumps({"echo": orjson.loads(msg.value())}),
                             msg.key(), headers=[(CORRELATION_HEADER, headers[CORRELATION_HEADER])])
            producer.flush(5)
        consumer.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(10)


def _yaml(http: str, sql_url: str, sqlite_path: str, bootstrap: str, topics: tuple[str, str], smtp_port: int) -> str:
    requests, replies = topics
    return f"""
connectors:
  - name: api
    type: http
    queue: {Q}
    settings:
      base_url: {http}
      auth: {{bearer: "${{API_TOKEN}}"}}
      headers: {{x-client: kflow-tests, x-env: "${{KFLOW_TEST_UNSET_VAR:-fallback}}"}}
      timeout: 5s
      callback: {{host: 127.0.0.1, port: 0}}
    operations:
      get_order: {{url: "/orders/{{input.id}}", result: "response.body"}}
      status:
        url: "/status/{{input.code}}"
        params: {{k: "{{input.k}}"}}
        errors: [{{status: 404, type: NotFound, retryable: false}}]
      flaky: {{url: "/flaky/{{input}}", result: "response.body"}}
      start_job:
        method: post
        url: /jobs
        json: "{{'n': input.n, 'complete': input.complete, 'callback': callback_url}}"
        webhook: {{timeout: 20s}}
      short_job:
        method: post
        url: /jobs
        json: "{{'n': input, 'complete': false, 'callback': callback_url}}"
        webhook: {{timeout: 300ms}}
  - name: db
    type: sql
    queue: {Q}
    settings: {{url: "{sql_url}", pool_size: 2}}
    operations:
      create: {{statement: "CREATE TABLE {TABLE} (id integer PRIMARY KEY, sku text NOT NULL, price numeric(10,2), at date)"}}
      drop: {{statement: "DROP TABLE IF EXISTS {TABLE}"}}
      insert:
        statement: "INSERT INTO {TABLE} (id, sku, price, at) VALUES (:id, :sku, :price, :at)"
        params: {{id: input.id, sku: input.sku, price: input.price, at: "'2026-01-02'"}}
      insert_many:
        statement: "INSERT INTO {TABLE} (id, sku, price) VALUES (:id, :sku, 1.5)"
        many: true
        items: input.rows
        params: {{id: item.id, sku: item.sku}}
      get:
        statement: "SELECT id, sku, price, at FROM {TABLE} WHERE id = :id"
        params: {{id: input.id}}
        result: "rows[0]"
  - name: lite
    type: sql
    queue: {Q}
    settings: {{url: "sqlite:///{sqlite_path}"}}
    operations:
      create: {{statement: "CREATE TABLE IF NOT EXISTS kv (k text PRIMARY KEY, v integer)"}}
      put: {{statement: "INSERT INTO kv (k, v) VALUES (:k, :v)", params: {{k: input.k, v: input.v}}}}
      get: {{statement: "SELECT k, v FROM kv WHERE k = :k", params: {{k: input}}}}
  - name: mq
    type: amqp
    queue: {Q}
    settings: {{url: "{AMQP_URL}"}}
    operations:
      ask: {{action: request, routing_key: "kflow-test-{RUN}", body: "input", timeout: 10s}}
      ask_nobody: {{action: request, routing_key: "kflow-nobody-{RUN}", timeout: 300ms}}
      announce: {{action: publish, routing_key: "kflow-pub-{RUN}", body: "{{'order': input}}", headers: {{x-order: "{{input}}"}}}}
  - name: svc
    type: kafka
    queue: {Q}
    settings: {{bootstrap: "{bootstrap}", reply_topic: {replies}}}
    operations:
      ask: {{action: request, topic: {requests}, key: "{{input.id}}", value: "input", timeout: 20s}}
      notify: {{action: produce, topic: {requests}, key: "n-{{input}}", value: "{{'note': input}}"}}
  - name: mail
    type: email
    queue: {Q}
    settings: {{host: 127.0.0.1, port: {smtp_port}, from: "kflow <flows@example.com>"}}
    operations:
      send: {{to: "{{input.to}}", subject: "Order {{input.id}} shipped", body: "Hello {{input.name}}, order {{input.id}} is on its way."}}
"""


@pytest.fixture(scope="module")
def host(http_service, postgres_url, smtp_server, kafka_bootstrap, kafka_topics, tmp_path_factory) -> Iterator[ConnectorHost]:  # noqa: F811
    _routes(http_service)
    sqlite_path = tmp_path_factory.mktemp("sql") / "lite.db"
    sql_url = postgres_url
    text = _yaml(http_service.url, sql_url, str(sqlite_path), kafka_bootstrap, kafka_topics, smtp_server.port)
    specs = load_connectors(text, env={"API_TOKEN": TOKEN})
    h = ConnectorHost(specs, health_interval=1.0)
    expected = {"api", "db", "lite", "svc", "mail"} | ({"mq"} if reachable(AMQP_URL) else set())
    h.start()
    assert_eventually(lambda: {n for n, up in h.healthy().items() if up} >= expected, timeout=30,
                      msg=f"connectors up: {h.describe()}")
    h.call("db", "drop")
    h.call("db", "create")
    h.call("lite", "create")
    try:
        yield h
    finally:
        try:
            h.call("db", "drop")
        finally:
            h.stop()


@pytest.fixture(scope="module")
def worker(stack, host):
    w = stack.start_worker(host.activities())
    assert w.wait_assigned(60), "the connector worker got no partitions"
    return w


def _deploy_single(stack, name: str, task: str, input_expr: str = "input", **step: Any) -> None:
    stack.client.deploy({"name": name, "version": 1, "steps": [
        {"id": "call", "task": task, "queue": Q, "input": input_expr, "output": "out", **step},
        {"id": "done", "succeed": "out"}]})


# -- HTTP -----------------------------------------------------------------------------------


def test_http_operation_in_a_workflow_sends_auth_and_returns_the_body(stack, worker, http_service):  # noqa: F811 (a fixture imported above)
    _deploy_single(stack, "http-get", "api.get_order", "{'id': input}")
    assert stack.client.start("http-get", 42, id=uid("http")).result(timeout=60) == {"id": 42, "state": "open"}
    seen = http_service.seen("/orders/42")[-1]
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["x-client"] == "kflow-tests" and seen.headers["x-env"] == "fallback"


def test_http_5xx_is_retried_by_the_engine_until_it_succeeds(stack, worker, http_service):  # noqa: F811 (a fixture imported above)
    _deploy_single(stack, "http-flaky", "api.flaky", retry={"initial": "50ms", "max_attempts": 5})
    key = uid("f")
    assert stack.client.start("http-flaky", key, id=uid("flaky")).result(timeout=60) == {"attempts": 3}
    assert len(http_service.seen(f"/flaky/{key}")) == 3


def test_http_errors_fail_the_workflow_with_their_type(stack, worker, http_service):  # noqa: F811 (a fixture imported above)
    _deploy_single(stack, "http-400", "api.status", retry={"initial": "50ms", "max_attempts": 5})
    k = uid("k")
    with pytest.raises(WorkflowFailedError) as ei:
        stack.client.start("http-400", {"code": 400, "k": k}, id=uid("h400")).result(timeout=60)
    assert ei.value.error_type == "HttpError" and "400" in ei.value.message
    assert len([s for s in http_service.seen("/status/400") if k in s.path]) == 1
    # a retryable failure keeps its type too (here with no attempts left: the step has no retry policy)
    _deploy_single(stack, "http-503", "api.status")
    with pytest.raises(WorkflowFailedError) as ei2:
        stack.client.start("http-503", {"code": 503, "k": k}, id=uid("h503")).result(timeout=60)
    assert ei2.value.error_type == "HttpError" and "503" in ei2.value.message


def test_http_error_mapping(host):
    for code, etype, retryable in ((503, "HttpError", True), (429, "HttpError", True), (400, "HttpError", False),
                                   (404, "NotFound", False), (422, "HttpError", False)):
        with pytest.raises(ConnectorError) as ei:
            host.call("api", "status", {"code": code, "k": "x"})
        assert (ei.value.type, ei.value.retryable) == (etype, retryable), code
        assert str(code) in ei.value.message


def test_non_retryable_connector_error_becomes_a_non_retryable_activity_failure(host):
    fn = host.activities()[Q]["api.status"]
    with pytest.raises(NonRetryableError) as ei:
        asyncio.run(fn({"code": 404, "k": "y"}))
    assert ei.value.type == "NotFound"
    with pytest.raises(ConnectorError) as ei2:
        asyncio.run(fn({"code": 503, "k": "y"}))
    assert ei2.value.retryable and ei2.value.type == "HttpError"


# -- webhooks ---------------------------------------------------------------------------------


def test_webhook_completes_the_activity_in_a_workflow(stack, worker, http_service):  # noqa: F811 (a fixture imported above)
    _deploy_single(stack, "hook", "api.start_job", "{'n': input, 'complete': true}")
    assert stack.client.start("hook", 7, id=uid("hook")).result(timeout=60) == {"job": 7, "status": "done"}
    callback = [s for s in http_service.seen("/jobs") if s.body["n"] == 7][-1].body["callback"]
    assert "/callbacks/" in callback
    assert post_json(callback, {"again": True})[0] == 409  # a token completes exactly one activity
    assert post_json(callback.rsplit("/", 1)[0] + "/not-a-token", {})[0] == 404


def test_webhook_without_callback_times_out(host, http_service):  # noqa: F811 (a fixture imported above)
    with pytest.raises(ConnectorError) as ei:
        host.call("api", "short_job", 5)
    assert ei.value.type == "WebhookTimeout" and not ei.value.retryable
    callback = [s for s in http_service.seen("/jobs") if s.body["n"] == 5][-1].body["callback"]
    assert post_json(callback, {"late": True})[0] == 410


# -- SQL --------------------------------------------------------------------------------------


def test_sql_insert_and_select_in_a_workflow(stack, worker, host, postgres_url):  # noqa: F811
    stack.client.deploy({"name": "sql-order", "version": 1, "steps": [
        {"id": "ins", "task": "db.insert", "queue": Q, "input": "input", "output": "ins"},
        {"id": "get", "task": "db.get", "queue": Q, "input": "{'id': input.id}", "output": "row"},
        {"id": "done", "succeed": "{'ins': ins, 'row': row}"}]})
    out = stack.client.start("sql-order", {"id": 1, "sku": "A-1", "price": 9.5}, id=uid("sql")).result(timeout=60)
    assert out == {"ins": {"rowcount": 1}, "row": {"id": 1, "sku": "A-1", "price": 9.5, "at": "2026-01-02"}}


def test_sql_errors_and_executemany(host):
    assert host.call("db", "insert_many", {"rows": [{"id": 10, "sku": "b"}, {"id": 11, "sku": "c"}]}) == {"rowcount": 2}
    assert host.call("db", "get", {"id": 11})["price"] == 1.5
    with pytest.raises(ConnectorError) as ei:  # duplicate key: the transaction is rolled back, not retried
        host.call("db", "insert_many", {"rows": [{"id": 12, "sku": "d"}, {"id": 10, "sku": "dup"}]})
    assert ei.value.type == "SqlIntegrityError" and not ei.value.retryable
    with pytest.raises(ConnectorError):
        host.call("db", "get", {"id": 12})  # row 12 was rolled back with its transaction: rows[0] fails
    with pytest.raises(ConnectorError) as ei2:
        host.call("db", "insert", {"id": 13, "sku": None, "price": 1})
    assert ei2.value.type == "SqlIntegrityError"


def test_sqlite(host):
    assert host.call("lite", "put", {"k": "a", "v": 1}) == {"rowcount": 1}
    assert host.call("lite", "get", "a") == {"rows": [{"k": "a", "v": 1}], "rowcount": 1}


# -- AMQP, Kafka, SMTP ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def amqp_responder(amqp_url) -> Iterator[Any]:  # noqa: F811
    """Answers requests with ``{"echo": body}``; yields ``fetch()``, the next message published to kflow-pub-<run>."""
    import aio_pika

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    published: dict[str, Any] = {}

    async def serve() -> Any:
        conn = await aio_pika.connect_robust(amqp_url)
        ch = await conn.channel()
        published["queue"] = await ch.declare_queue(f"kflow-pub-{RUN}", auto_delete=True)
        queue = await ch.declare_queue(f"kflow-test-{RUN}", auto_delete=True)

        async def on_message(msg: Any) -> None:
            async with msg.process():
                reply = orjson.dumps({"echo": orjson.loads(msg.body)})
                await ch.default_exchange.publish(aio_pika.Message(reply, correlation_id=msg.correlation_id),
                                                  routing_key=msg.reply_to)

        await queue.consume(on_message)
        ready.set()
        return conn

    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    conn = asyncio.run_coroutine_threadsafe(serve(), loop).result(20)
    assert ready.wait(20)

    def fetch() -> Any:
        return asyncio.run_coroutine_threadsafe(published["queue"].get(timeout=5, no_ack=True), loop).result(10)

    yield fetch
    asyncio.run_coroutine_threadsafe(conn.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)


def test_amqp_request_reply_and_publish(host, amqp_responder):
    assert host.call("mq", "ask", {"q": 1}) == {"echo": {"q": 1}}
    with pytest.raises(ConnectorError) as ei:
        host.call("mq", "ask_nobody", {"q": 2})
    assert ei.value.type == "AmqpTimeout" and ei.value.retryable
    out = host.call("mq", "announce", 77)
    assert out["published"] is True
    msg = amqp_responder()
    assert orjson.loads(msg.body) == {"order": 77} and msg.headers["x-order"] == "77"
    assert msg.message_id == out["message_id"] and msg.delivery_mode == 2


def test_kafka_request_reply_in_a_workflow(stack, worker, host, kafka_responder):
    _deploy_single(stack, "kafka-ask", "svc.ask")
    out = stack.client.start("kafka-ask", {"id": 3, "x": "y"}, id=uid("kask")).result(timeout=60)
    assert out == {"echo": {"id": 3, "x": "y"}}
    produced = host.call("svc", "notify", "hello")
    assert produced["topic"].startswith("svc.requests.") and produced["offset"] >= 0


def test_email_is_delivered(host, smtp_server):  # noqa: F811
    out = host.call("mail", "send", {"to": "ann@example.com", "id": 12, "name": "Ann"})
    assert out["accepted"] == ["ann@example.com"]
    msg = assert_eventually(lambda: next((m for m in smtp_server.messages if m["Message-ID"] == out["message_id"]), None),
                            timeout=10)
    assert msg["Subject"] == "Order 12 shipped" and msg["To"] == "ann@example.com"
    assert "Hello Ann, order 12 is on its way." in msg.get_payload()


# -- health -------------------------------------------------------------------------------------


def _gauge(name: str, kind: str) -> float | None:
    return REGISTRY.get_sample_value("kflow_connector_up", {"connector": name, "type": kind})


def test_health_gauge_and_unavailable_connector(host):
    assert host.healthy()["api"] is True and _gauge("api", "http") == 1.0
    down = ConnectorHost(load_connectors(f"""
connectors:
  - name: down-db
    type: sql
    settings: {{url: "postgresql://postgres@127.0.0.1:{free_port()}/none", connect_timeout: 1}}
    operations: {{q: {{statement: "SELECT 1"}}}}
"""), backoff_initial=0.05, backoff_max=0.2)
    down.start()
    try:
        assert down.healthy() == {"down-db": False} and not down.ready()
        assert _gauge("down-db", "sql") == 0.0
        with pytest.raises(ConnectorUnavailable) as ei:
            down.call("down-db", "q")
        assert ei.value.retryable and ei.value.type == "ConnectorUnavailable"
        assert_eventually(lambda: "connection" in " ".join(down.describe()).lower(), timeout=10)
        server = serve_operations(0, down.ready, host="127.0.0.1", status=down.describe)
        try:
            with pytest.raises(urllib.error.HTTPError) as ei2:
                urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/readyz", timeout=10)
            assert ei2.value.code == 503 and "connector down-db (sql): down" in ei2.value.read().decode()
        finally:
            server.shutdown()
    finally:
        down.stop()


# -- the CLI ------------------------------------------------------------------------------------


def test_kflow_connect_serves_operations_and_reports_readiness(stack, tmp_path, http_service):  # noqa: F811 (a fixture imported above)
    import os
    import signal
    import subprocess
    import sys

    from tests.integration.conftest import PARTITIONS

    _routes(http_service)
    queue = f"cli{RUN}"
    conf = tmp_path / "connectors.yaml"
    conf.write_text(f"""
connectors:
  - name: cli-api
    type: http
    queue: {queue}
    settings: {{base_url: "{http_service.url}", auth: {{api_key: {{header: X-Key, value: "${{CLI_KEY}}"}}}}}}
    operations:
      order: {{url: "/orders/{{input}}", result: "response.body.id * 10"}}
""")
    port = free_port()
    env = {**os.environ, "KFLOW_PARTITIONS": str(PARTITIONS), "KFLOW_DEV_TUNING": "1", "CLI_KEY": "k-" + RUN,
           "KFLOW_LOG_FORMAT": "text"}
    proc = subprocess.Popen([sys.executable, "-m", "kflow", "connect", str(conf), "--bootstrap", stack.bootstrap,
                             "--prefix", stack.prefix, "--metrics-port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def ready() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    return resp.read().decode()
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                return None

        body = assert_eventually(ready, timeout=60, msg="kflow connect never became ready")
        assert "connector cli-api (http): up" in body
        stack.client.deploy({"name": "cli-order", "version": 1, "steps": [
            {"id": "o", "task": "cli-api.order", "queue": queue, "input": "input", "output": "x"}]})
        assert stack.client.start("cli-order", 4, id=uid("cli")).result(timeout=60) == {"x": 40}
        assert http_service.seen("/orders/4")[-1].headers["x-key"] == "k-" + RUN
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "k-" + RUN not in out  # the key is a secret: never logged
