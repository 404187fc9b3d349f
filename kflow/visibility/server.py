"""Runs the read side in one process: the projection on a thread and the API/console under uvicorn.

:class:`VisibilityServer` is what ``kflow visibility`` and ``kflow dev`` run, and what tests
start in the background (:meth:`VisibilityServer.start`); :attr:`url` is the console's address
once it listens (port 0 picks a free one).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

try:
    import uvicorn
except ModuleNotFoundError as exc:  # name the extra to install rather than the missing module
    raise ModuleNotFoundError("the visibility server needs the visibility extra: pip install 'kflow[visibility]'",
                              name=exc.name) from exc

from kflow.config import VisibilityConfig
from kflow.model.errors import KflowError
from kflow.visibility.api import create_app
from kflow.visibility.live import Changes
from kflow.visibility.projection import LAG, ProjectionProcessor
from kflow.visibility.store import VisibilityStore

__all__ = ["VisibilityServer"]

log = logging.getLogger("kflow.visibility")


class VisibilityServer:
    """Projection + API + console over one store.

    Args:
        config: The settings; ``store_url()`` names the store.
        project: Run the projection (False serves an existing store read-only to Kafka).
    """

    def __init__(self, config: VisibilityConfig, *, project: bool = True) -> None:
        self.config = config
        self.store = VisibilityStore(config.store_url())
        self.changes = Changes()
        self.projection: Optional[ProjectionProcessor] = None
        if project:
            self.projection = ProjectionProcessor(config, self.store, group_id=config.visibility_group,
                                                  on_change=self.changes.publish)
        self._client: Any = None
        self._client_lock = threading.Lock()
        self.app = create_app(self.store, self._actions, changes=self.changes, ready=self._ready, lag=self._lag)
        self._server: Optional[uvicorn.Server] = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.failure: Optional[BaseException] = None

    # -- wiring ------------------------------------------------------------------------------

    def _actions(self) -> Any:
        with self._client_lock:
            if self._client is None:
                from kflow.client import Client

                self._client = Client(self.config.bootstrap, config=self.config)
            return self._client

    def _ready(self) -> bool:
        return self.projection is None or self.projection.ready.is_set()

    @staticmethod
    def _lag() -> int:
        total = 0
        for metric in LAG.collect():
            for sample in metric.samples:
                total += int(sample.value)
        return total

    @property
    def url(self) -> str:
        """``http://host:port`` of the API and console (the bound port once started)."""
        port = self.config.visibility_port
        server = self._server
        if server is not None and server.started and server.servers:
            port = server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.config.visibility_host}:{port}"

    # -- running -----------------------------------------------------------------------------

    def _run_projection(self) -> None:
        assert self.projection is not None
        try:
            self.projection.run(self._stop)
        except BaseException as exc:  # surfaces through readyz and the log; the API keeps serving
            self.failure = exc
            log.exception("visibility projection stopped")

    def start(self, timeout: float = 30.0) -> None:
        """Start projection and HTTP server on daemon threads; returns once the server listens."""
        if self.projection is not None:
            t = threading.Thread(target=self._run_projection, name="kflow-visibility-projection", daemon=True)
            t.start()
            self._threads.append(t)
        config = uvicorn.Config(self.app, host=self.config.visibility_host, port=self.config.visibility_port,
                                log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        t = threading.Thread(target=self._server.run, name="kflow-visibility-http", daemon=True)
        t.start()
        self._threads.append(t)
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not t.is_alive():
                raise KflowError(f"the visibility server could not listen on {self.config.visibility_host}:"
                                 f"{self.config.visibility_port} (set KFLOW_VISIBILITY_PORT to another port)")
            if time.monotonic() > deadline:
                raise KflowError(f"the visibility server did not start within {timeout:g}s")
            time.sleep(0.02)
        log.debug("kflow console on %s (API docs at %s/docs)", self.url, self.url)

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set (starting first unless :meth:`start` was called), then shut down."""
        if self._server is None:
            self.start()
        try:
            while not stop.wait(0.5):
                if self.failure is not None:
                    raise KflowError(f"the visibility projection failed: {self.failure}") from self.failure
        finally:
            self.close()

    def close(self) -> None:
        """Stop the projection and the HTTP server; close the store and the client."""
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        for t in self._threads:
            t.join(10)
        if self._client is not None:
            self._client.close()
        self.store.close()
