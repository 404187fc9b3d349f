"""Bounds on what an HTTP request body may be, enforced before any handler parses it.

:class:`BodyLimits` is an ASGI middleware: a body longer than ``max_bytes`` (by its
``Content-Length``, or counted as it streams in when there is none) is answered 413 without being
read further, and a JSON body nested deeper than ``max_depth`` is answered 422 before a JSON
parser can recurse into it. Each refusal is passed to ``on_refuse`` (the audit trail) and
answered as ``{"error": ..., "status": ...}``; the handler never runs, so nothing else happens.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Optional

import orjson

__all__ = ["MAX_JSON_DEPTH", "BodyLimits", "json_depth"]

#: The deepest a JSON request body may nest (objects and arrays).
MAX_JSON_DEPTH = 64

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def json_depth(body: bytes, limit: int) -> int:
    """How deep ``body`` nests, counting brackets outside strings; stops counting past ``limit``.

    Malformed JSON is not judged here (the parser reports it); only its nesting is measured.
    """
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b"", body)):
        if m.group() in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        else:
            depth = max(0, depth - 1)
    return deepest


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class BodyLimits:
    """ASGI middleware refusing request bodies that are too large (413) or JSON nested too deep (422).

    Args:
        app: The wrapped application.
        max_bytes: Largest body read.
        max_depth: Deepest JSON nesting accepted.
        on_refuse: Called with ``(scope, status, message)`` for every refusal.
    """

    def __init__(self, app: Any, max_bytes: int, max_depth: int = MAX_JSON_DEPTH,
                 on_refuse: Optional[Callable[[Scope, int, str], None]] = None) -> None:
        self.app, self.max_bytes, self.max_depth, self.on_refuse = app, max_bytes, max_depth, on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
            ctype = _header(scope, b"content-type")
            if body and (ctype is None or b"json" in ctype):
                depth = json_depth(body, self.max_depth)
                if depth > self.max_depth:
                    raise _Refused(422, f"request body: JSON nested more than {self.max_depth} levels deep")
        except _Refused as r:
            if self.on_refuse is not None:
                self.on_refuse(scope, r.status, r.message)
            await _answer(send, r.status, r.message)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        declared = _header(scope, b"content-length")
        too_big = f"request body larger than {self.max_bytes} bytes"
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    raise _Refused(413, too_big)
            except ValueError:
                raise _Refused(400, "request: Content-Length is not a number") from None
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _Refused(413, too_big)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> Optional[bytes]:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return bytes(v)
    return None


async def _answer(send: Send, status: int, message: str) -> None:
    body = orjson.dumps({"error": message, "status": status})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
