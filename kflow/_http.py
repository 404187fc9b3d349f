"""The operations endpoint every long-running kflow process serves: ``/metrics``, ``/healthz``, ``/readyz``.

``/healthz`` answers 200 while the process runs; ``/readyz`` answers 200 only when the process
is ready to work (the engine: its partitions are assigned and restored; a worker: its partitions
are assigned) and a bootstrap server accepted a connection within the last
:data:`BROKER_CHECK_SECONDS` seconds, 503 with the reason otherwise; ``/metrics`` is the
Prometheus text format of every ``kflow_*`` metric in the process.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from kflow.model.errors import KflowError

log = logging.getLogger("kflow.http")

#: How old a successful broker connection may be for ``/readyz`` to answer 200.
BROKER_CHECK_SECONDS = 10.0


class BrokerProbe:
    """Whether a bootstrap server accepts TCP connections; checked every few seconds, off the request path."""

    def __init__(self, bootstrap: str, interval: float = BROKER_CHECK_SECONDS / 2) -> None:
        self.servers = [s.strip() for s in bootstrap.split(",") if s.strip()]
        self.interval = interval
        self.last_ok = 0.0
        self.error = "not checked yet"
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="kflow-broker-probe", daemon=True).start()

    def ok(self) -> bool:
        return time.monotonic() - self.last_ok < BROKER_CHECK_SECONDS

    def check(self) -> bool:
        for server in self.servers:
            host, _, port = server.rpartition(":")
            try:
                with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                    self.last_ok = time.monotonic()
                    return True
            except (OSError, ValueError) as e:
                self.error = f"{server}: {e}"
        return False

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval)


def serve_operations(port: int, ready: Callable[[], bool], host: str = "0.0.0.0",
                     status: Callable[[], list[str]] | None = None,
                     bootstrap: Optional[str] = None) -> ThreadingHTTPServer:
    """Start the endpoint on a daemon thread; raises KflowError if the port cannot be bound.

    Args:
        port: TCP port (0: any free port, see ``server.server_address``).
        ready: Whether the process has its work assigned (and restored).
        host: Interface to listen on.
        status: If given, returns extra lines (e.g. one per connector: up or down) appended to
            the bodies of ``/healthz`` and ``/readyz``.
        bootstrap: Kafka bootstrap servers; when given, ``/readyz`` also needs one reachable.
    """
    probe = BrokerProbe(bootstrap) if bootstrap else None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n" + self._status())
            elif path == "/readyz":
                if not ready():
                    self._send(503, b"not ready: partitions not assigned or not restored yet\n" + self._status())
                elif probe is not None and not probe.ok():
                    self._send(503, f"not ready: broker unreachable ({probe.error})\n".encode() + self._status())
                else:
                    self._send(200, b"ready\n" + self._status())
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _status(self) -> bytes:
            return "".join(f"{line}\n" for line in status()).encode() if status is not None else b""

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise KflowError(f"cannot serve metrics on port {port}: {e.strerror or e} "
                         "(set KFLOW_METRICS_PORT to another port, or 0 to disable)") from None
    server.daemon_threads = True
    if probe is not None:
        stop_serving = server.shutdown

        def shutdown() -> None:  # the probe thread ends with the server
            probe.close()
            stop_serving()

        server.shutdown = shutdown  # type: ignore[method-assign]
    threading.Thread(target=server.serve_forever, name="kflow-http", daemon=True).start()
    log.info("metrics and health on http://%s:%d/metrics (/healthz, /readyz)", host, server.server_address[1])
    return server


def healthcheck(argv: list[str]) -> int:
    """Container health check: 0 if ``/healthz`` on localhost answers 200.

    The port is the first argument, else ``$KFLOW_METRICS_PORT``, else 9464
    (``python -m kflow._http [PORT]``; the image's ``HEALTHCHECK`` runs it).
    """
    import os
    import urllib.request

    port = argv[0] if argv else os.environ.get("KFLOW_METRICS_PORT") or "9464"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{int(port)}/healthz", timeout=3) as r:
            return 0 if r.status == 200 else 1
    except (OSError, ValueError) as e:
        print(f"unhealthy: http://127.0.0.1:{port}/healthz: {e}")
        return 1


if __name__ == "__main__":
    import sys

    sys.exit(healthcheck(sys.argv[1:]))
