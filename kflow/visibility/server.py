"""Runs the read side in one process: the projection on a thread and the API/console under uvicorn.

:class:`VisibilityServer` is what ``kflow visibility`` and ``kflow dev`` run, and what tests
start in the background (:meth:`VisibilityServer.start`); :attr:`url` is the console's address
once it listens (port 0 picks a free one).

With ``KFLOW_AUTH=on`` it also reads the ``policies`` topic (the policy the API enforces, as the
engines do), writes the API's audit records to the ``audit`` topic, and produces each caller's
actions through a client of its own that signs them as that caller (the server mints its
principal token with ``KFLOW_JWT_SECRET`` or ``KFLOW_SIGNING_KEY``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Optional

try:
    import uvicorn
except ModuleNotFoundError as exc:  # name the extra to install rather than the missing module
    raise ModuleNotFoundError("the visibility server needs the visibility extra: pip install 'kflow[visibility]'",
                              name=exc.name) from exc

from pydantic import SecretStr

from kflow.config import VisibilityConfig
from kflow.model.errors import KflowError
from kflow.security.audit import AuditRecord, encode_audit
from kflow.security.http import HttpAuth
from kflow.security.principal import Principal
from kflow.security.tokens import issue
from kflow.visibility.access import Access
from kflow.visibility.api import create_app
from kflow.visibility.audit_log import read_audit
from kflow.visibility.deliveries import SubscriptionsView, parse_urls
from kflow.visibility.live import Changes
from kflow.visibility.projection import LAG, ProjectionProcessor
from kflow.visibility.store import VisibilityStore

__all__ = ["VisibilityServer"]

log = logging.getLogger("kflow.visibility")

#: Most per-caller clients kept open (the least recently used is closed first).
CALLER_CLIENTS = 32
#: Lifetime of the principal token a per-caller client signs with; renewed at half of it.
CALLER_TOKEN_TTL_S = 12 * 3600.0


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
        self._callers: OrderedDict[Principal, tuple[Any, float]] = OrderedDict()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.policies: Any = None
        self._audit_producer: Any = None
        access = None
        if config.auth:
            access = self._auth_access()
        subscriptions = SubscriptionsView(config, parse_urls(config.subscriptions_url))
        self.app = create_app(self.store, self._actions, changes=self.changes, ready=self._ready, lag=self._lag,
                              access=access, audit_reader=self._read_audit if config.auth else None,
                              max_body_bytes=config.max_body_bytes, subscriptions=subscriptions.read)
        self._server: Optional[uvicorn.Server] = None
        self.failure: Optional[BaseException] = None

    def _auth_access(self) -> Access:
        """Credentials, the policies table (polled on a thread) and the audit producer."""
        from confluent_kafka import Producer

        from kflow.streams.policies import PolicyTable

        cfg = self.config
        auth = HttpAuth.from_config(cfg)
        keys = auth.keys
        self.policies = PolicyTable(cfg.consumer_conf("kflow-policies"), cfg.names.policies, keys)
        self._audit_producer = Producer(cfg.producer_conf(**{"acks": "all", "client.id": "kflow-visibility-audit"}))
        table = self.policies

        def poll() -> None:
            while not self._stop.is_set():
                try:
                    table.poll(0.5)
                except Exception:  # the policy in force stays; the log says why it is not refreshed
                    log.exception("reading the policies topic failed")
                    self._stop.wait(1.0)

        t = threading.Thread(target=poll, name="kflow-visibility-policies", daemon=True)
        t.start()
        self._threads.append(t)
        return Access(auth, policy=lambda: table.policy, catch_up=lambda: table.catch_up(2.0), audit=self._audit)

    def _audit(self, record: AuditRecord) -> None:
        producer = self._audit_producer
        producer.produce(self.config.names.audit, encode_audit(record), record.resource_id.encode("utf-8"))
        producer.poll(0)

    def _read_audit(self, *, since_ms: Optional[int] = None, principal: Optional[str] = None,
                    outcome: Optional[str] = None) -> list[AuditRecord]:
        if self._audit_producer is not None:
            self._audit_producer.flush(5)  # this server's own records count
        return read_audit(self.config, since_ms=since_ms, principal=principal, outcome=outcome)

    # -- wiring ------------------------------------------------------------------------------

    def _actions(self, who: Optional[Principal] = None) -> Any:
        """The client producing actions: one shared (auth off), or one per caller signing as it."""
        from kflow.client import Client

        with self._client_lock:
            if who is None:
                if self._client is None:
                    self._client = Client(self.config.bootstrap, config=self.config)
                return self._client
            now = time.time()
            found = self._callers.get(who)
            if found is not None and found[1] > now:
                self._callers.move_to_end(who)
                return found[0]
            if found is not None:
                found[0].close()
            token = issue(who.name, who.tenant, who.roles, CALLER_TOKEN_TTL_S, self.config.keys(), now=now)
            client = Client(config=self.config.model_copy(update={"token": SecretStr(token)}))
            self._callers[who] = (client, now + CALLER_TOKEN_TTL_S / 2)
            while len(self._callers) > CALLER_CLIENTS:
                _, (old, _exp) = self._callers.popitem(last=False)
                old.close()
            return client

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
        for client, _ in self._callers.values():
            client.close()
        self._callers.clear()
        if self._audit_producer is not None:
            self._audit_producer.flush(10)
        if self.policies is not None:
            self.policies.close()
        self.store.close()
