"""The operations endpoint every long-running kflow process serves: ``/metrics``, ``/healthz``, ``/readyz``.

``/healthz`` answers 200 while the process runs; ``/readyz`` answers 200 only when the process
is ready to work (the engine: its partitions are assigned and restored), 503 otherwise;
``/metrics`` is the Prometheus text format of every ``kflow_*`` metric in the process.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from kflow.model.errors import KflowError

log = logging.getLogger("kflow.http")


def serve_operations(port: int, ready: Callable[[], bool], host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start the endpoint on a daemon thread; raises KflowError if the port cannot be bound."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                ok = ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

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
    threading.Thread(target=server.serve_forever, name="kflow-http", daemon=True).start()
    log.info("metrics and health on http://%s:%d/metrics (/healthz, /readyz)", host, server.server_address[1])
    return server
