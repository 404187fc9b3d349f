"""Webhook-completed activities: a one-time callback URL whose first POST is the activity's result.

An HTTP operation with ``webhook: {timeout: 5m}`` mints a one-time token, makes the callback URL
``<public_url>/callbacks/<token>`` available to its request templates (``callback_url``) and to
the engine (as the details of a heartbeat), sends its request, and then waits for the external
system to POST JSON to that URL. The first POST completes the activity with that JSON (200); a
second POST to the same URL answers 409, an unknown token 404, one that timed out 410, a body that
is not JSON 400. No callback within ``timeout`` fails the attempt with ``WebhookTimeout``.

One :class:`CallbackServer` (aiohttp) per bound address serves every webhook operation of the
process; it runs on the connector event loop, started by the first connector that needs it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections import OrderedDict
from typing import Any, ClassVar

import orjson

try:
    from aiohttp import web
except ModuleNotFoundError as exc:  # name the extra to install rather than the missing module
    raise ModuleNotFoundError("webhook operations of the HTTP connector need the http extra: pip install 'kflow[http]'",
                              name=exc.name) from exc

from kflow._worker.context import NotInActivityError, heartbeat
from kflow.connectors.base import ConnectorError

__all__ = ["CallbackServer", "Pending", "wait_for_callback"]

log = logging.getLogger("kflow.connectors.webhook")

#: Tokens remembered after use or expiry (to answer 409/410 rather than 404).
_REMEMBERED = 10_000


def _defaults() -> tuple[int, str]:
    """``(KFLOW_CONNECTOR_HTTP_PORT, KFLOW_CONNECTOR_PUBLIC_URL)`` (see :class:`kflow.config.WorkerConfig`)."""
    from kflow.config import WorkerConfig

    cfg = WorkerConfig()
    return cfg.connector_http_port, cfg.connector_public_url


class Pending:
    """One awaited callback: its token, URL and the future its POST completes."""

    __slots__ = ("future", "token", "url")

    def __init__(self, token: str, url: str, future: asyncio.Future[Any]) -> None:
        self.token, self.url, self.future = token, url, future


class CallbackServer:
    """The callback endpoint ``POST /callbacks/{token}``, shared per (host, port) within a process."""

    #: (event loop id, host, port) -> server: a server serves the connectors of one event loop.
    _servers: ClassVar[dict[tuple[int, str, int], CallbackServer]] = {}

    def __init__(self, host: str, port: int, public_url: str) -> None:
        self.host, self.requested_port, self._public_url = host, port, public_url
        self.port = port
        self.users = 0
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._closed: OrderedDict[str, int] = OrderedDict()  # token -> HTTP status for a late POST
        self._runner: web.AppRunner | None = None

    @classmethod
    async def acquire(cls, host: str = "0.0.0.0", port: int | None = None, public_url: str = "") -> CallbackServer:
        """The running server on ``host:port`` (started on first use); pair with :meth:`release`.

        ``port`` defaults to ``KFLOW_CONNECTOR_HTTP_PORT``; 0 picks a free port.
        """
        env_port, env_public_url = _defaults()
        port = env_port if port is None else port
        loop_id = id(asyncio.get_running_loop())
        server = cls._servers.get((loop_id, host, port)) if port else None
        if server is None:
            server = cls(host, port, public_url or env_public_url)
            await server._start()
            cls._servers[(loop_id, host, server.port)] = server
            if port:
                cls._servers[(loop_id, host, port)] = server
        server.users += 1
        return server

    async def release(self) -> None:
        """Drop one user; the last one stops the server."""
        self.users -= 1
        if self.users > 0:
            return
        for key in [k for k, v in self._servers.items() if v is self]:
            del self._servers[key]
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _start(self) -> None:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/callbacks/{token}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise ConnectorError("WebhookServerError", f"cannot serve webhook callbacks on {self.host}:{self.requested_port}: "
                                 f"{e.strerror or e} (set another port with KFLOW_CONNECTOR_HTTP_PORT or the "
                                 "connector's callback.port)") from None
        addresses = self._runner.addresses  # the bound (host, port, ...) of each listening socket
        self.port = int(addresses[0][1]) if addresses else self.requested_port
        log.info("webhook callbacks on http://%s:%d/callbacks/<token> (public base %s)", self.host, self.port,
                 self.public_url)

    @property
    def public_url(self) -> str:
        """Base URL external systems reach this server at (no trailing slash)."""
        if self._public_url:
            return self._public_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else socket.gethostname()
        return f"http://{host}:{self.port}"

    def register(self) -> Pending:
        """Mint a one-time token and start waiting for its callback."""
        token = secrets.token_urlsafe(24)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[token] = fut
        return Pending(token, f"{self.public_url}/callbacks/{token}", fut)

    def forget(self, pending: Pending) -> None:
        """Stop waiting for ``pending``: a late POST answers 410 (or 409 if it was already used)."""
        fut = self._pending.pop(pending.token, None)
        if fut is not None and not fut.done():
            fut.cancel()
            self._remember(pending.token, 410)

    def _remember(self, token: str, status: int) -> None:
        self._closed[token] = status
        while len(self._closed) > _REMEMBERED:
            self._closed.popitem(last=False)

    async def _handle(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        fut = self._pending.get(token)
        if fut is None or fut.done():
            status = self._closed.get(token, 404)
            why = {404: "unknown callback token", 409: "this callback was already used",
                   410: "this callback expired"}[status]
            return web.json_response({"error": why}, status=status)
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw.strip() else None
        except orjson.JSONDecodeError as e:
            return web.json_response({"error": f"the callback body is not JSON: {e}"}, status=400)
        if fut.done():  # completed while the body was read
            return web.json_response({"error": "this callback was already used"}, status=409)
        fut.set_result(body)
        del self._pending[token]
        self._remember(token, 409)
        return web.json_response({"ok": True})


async def wait_for_callback(pending: Pending, timeout: float, retryable: bool, what: str) -> Any:
    """Wait for ``pending``'s callback; ``WebhookTimeout`` after ``timeout`` seconds.

    Sends one heartbeat with ``{"callback_url": ...}`` first (when run as an activity); the
    worker keeps heartbeating with the same details while the wait lasts.
    """
    try:
        heartbeat({"callback_url": pending.url})
    except NotInActivityError:
        pass
    try:
        return await asyncio.wait_for(asyncio.shield(pending.future), timeout)
    except TimeoutError:
        raise ConnectorError("WebhookTimeout", f"{what}: no callback within {timeout:g}s",
                             retryable=retryable) from None
