"""Real services for connector tests: PostgreSQL, RabbitMQ, an SMTP server and a scriptable HTTP service.

PostgreSQL and RabbitMQ are the local ones (127.0.0.1:5432 trust/``postgres``/``test``, and
127.0.0.1:5672 ``guest``/``guest``, overridable with ``KFLOW_TEST_POSTGRES_URL`` and
``KFLOW_TEST_AMQP_URL``); PostgreSQL falls back to a server started from the ``pgserver`` wheel, and a test that needs a
RabbitMQ that is not reachable is skipped with the reason. The SMTP server (aiosmtpd) and the HTTP service
(``http.server``) are started by the fixtures themselves on free ports.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

POSTGRES_URL = os.environ.get("KFLOW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("KFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def reachable(url: str, timeout: float = 1.0) -> bool:
    """True if a TCP connection to the URL's host and port succeeds."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL: the local one when it answers, otherwise one started from the pgserver wheel."""
    if _postgres_answers(POSTGRES_URL):
        yield POSTGRES_URL
        return
    import tempfile

    import pgserver  # a real PostgreSQL server from a wheel, for machines that run none

    server = pgserver.get_server(tempfile.mkdtemp(prefix="kflow-pg-"))
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def _postgres_answers(url: str) -> bool:
    if not reachable(url):
        return False
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"),
                                  connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except sa.exc.SQLAlchemyError:
        return False
    return True


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The local RabbitMQ's URL; skips the test when none is reachable."""
    if not reachable(AMQP_URL):
        pytest.skip(f"no RabbitMQ at {AMQP_URL} (set KFLOW_TEST_AMQP_URL)")
    return AMQP_URL


# -- SMTP ---------------------------------------------------------------------------------


@dataclass
class SmtpServer:
    """An aiosmtpd server; ``messages`` are the parsed messages it received."""

    host: str
    port: int
    messages: list[Message] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpServer]:
    from aiosmtpd.controller import Controller

    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every connection at INFO

    server = SmtpServer("127.0.0.1", free_port())

    class Handler:
        async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:  # noqa: N802
            server.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            server.messages.append(message_from_bytes(envelope.original_content or envelope.content))
            return "250 OK"

    controller = Controller(Handler(), hostname=server.host, port=server.port)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


# -- HTTP ---------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


Route = Callable[["HttpService", Seen], tuple[int, Any]]


class HttpService:
    """A small HTTP service in a thread: routes by path prefix, records every request it served."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.routes: dict[str, Route] = {}
        self.counters: dict[str, int] = {}
        self._lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode()
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with service._lock:
                    service.requests.append(seen)
                status, payload = service.dispatch(seen)
                out = json.dumps(payload).encode() if not isinstance(payload, str) else payload.encode()
                self.send_response(status)
                self.send_header("content-type", "application/json" if not isinstance(payload, str) else "text/plain")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="test-http", daemon=True).start()

    def count(self, key: str) -> int:
        """Increment and return the counter ``key``."""
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + 1
            return self.counters[key]

    def dispatch(self, seen: Seen) -> tuple[int, Any]:
        path = seen.path.split("?", 1)[0]
        for prefix in sorted(self.routes, key=len, reverse=True):
            if path.startswith(prefix):
                return self.routes[prefix](self, seen)
        return 404, {"error": f"no route for {path}"}

    def seen(self, prefix: str) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def post_json(url: str, body: Any) -> tuple[int, Any]:
    """POST ``body`` as JSON; returns ``(status, parsed body)`` for any status."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def http_service() -> Iterator[HttpService]:
    service = HttpService()
    try:
        yield service
    finally:
        service.close()
