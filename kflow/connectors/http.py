"""The ``http`` connector: REST calls through one pooled ``httpx.AsyncClient`` per connector.

Settings: ``base_url``, default ``headers``, ``auth`` (``bearer``, ``basic`` or ``api_key``), TLS
(``verify``, ``ca_file``, ``cert``/``key``), ``timeout``, ``max_connections``, an optional
``health_url`` and, for webhook operations, ``callback: {host, port, public_url}``.

An operation is ``method`` + ``url`` (a template: ``"/orders/{input.id}"``) with optional
``json`` (a CEL expression) or ``body`` (a template), ``headers`` and ``params`` (templates). Its
result is ``{status, headers, body}`` (``body`` parsed as JSON when it is JSON, else text) or the
value of its ``result`` expression over ``input`` and ``response``. Errors: a connection error or
timeout (``HttpTimeout``), 429 and 5xx are retryable ``HttpError``; any other 4xx is a
non-retryable ``HttpError``; ``errors: [{status: 404, type: NotFound, retryable: false}]`` rules
come first. With ``webhook: {timeout: 5m}`` the operation then waits for its callback
(:mod:`kflow.connectors.webhook`, which needs the ``http`` extra: plain REST calls do not).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any, Literal

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kflow.connectors.base import (
    Connector,
    ConnectorConfigError,
    ConnectorError,
    ConnectorSpec,
    Operation,
    connector_type,
)
from kflow.connectors.config import Duration, Expr, Template, parse_settings

if TYPE_CHECKING:
    from kflow.connectors.webhook import CallbackServer

__all__ = ["HttpConnector"]

_EXCERPT = 500


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Basic(_Model):
    username: str
    password: str


class _ApiKey(_Model):
    header: str = "X-API-Key"
    value: str


class _Auth(_Model):
    bearer: str | None = None
    basic: _Basic | None = None
    api_key: _ApiKey | None = None

    @model_validator(mode="after")
    def _one(self) -> _Auth:
        given = [k for k in ("bearer", "basic", "api_key") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of bearer, basic, api_key, but got {given or 'none'}")
        return self


class _Callback(_Model):
    host: str = "0.0.0.0"
    port: int | None = Field(None, ge=0, le=65535)
    public_url: str = ""


class HttpSettings(_Model):
    """Settings of an ``http`` connector."""

    base_url: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    auth: _Auth | None = None
    verify: bool = True
    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout: Duration = 30.0
    max_connections: int = Field(100, ge=1)
    health_url: str | None = None
    callback: _Callback = Field(default_factory=_Callback)


class _ErrorRule(_Model):
    status: int | list[int]
    type: str = Field(min_length=1)
    retryable: bool = False

    def matches(self, status: int) -> bool:
        return status in self.status if isinstance(self.status, list) else status == self.status


class _Webhook(_Model):
    timeout: Duration = 300.0
    retryable: bool = False
    result: str | None = None


class _Operation(_Model):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] = "GET"
    url: str = ""
    json_: str | None = Field(None, alias="json")
    body: str | None = None
    headers: dict[str, str | int | float] = Field(default_factory=dict)
    params: dict[str, str | int | float] = Field(default_factory=dict)
    timeout: Duration | None = None
    response_headers: list[str] = Field(default_factory=lambda: ["content-type"])
    result: str | None = None
    errors: list[_ErrorRule] = Field(default_factory=list)
    webhook: _Webhook | None = None

    @model_validator(mode="before")
    @classmethod
    def _upper(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            data = {**data, "method": data["method"].upper()}
        return data


class _Compiled:
    """One operation's declaration with its templates and expressions compiled."""

    def __init__(self, name: str, op: _Operation, where: str) -> None:
        self.name, self.op = name, op
        if op.json_ is not None and op.body is not None:
            raise ConnectorConfigError(f"{where}: give either json or body, not both")
        if not op.url and op.webhook is None:
            raise ConnectorConfigError(f"{where}: url is required")
        self.url = Template(op.url, f"{where}.url") if op.url else None
        self.json = Expr(op.json_, f"{where}.json") if op.json_ is not None else None
        self.body = Template(op.body, f"{where}.body") if op.body is not None else None
        self.headers = {k: Template(v, f"{where}.headers.{k}") for k, v in op.headers.items()}
        self.params = {k: Template(v, f"{where}.params.{k}") for k, v in op.params.items()}
        self.result = Expr(op.result, f"{where}.result") if op.result else None
        self.webhook_result = (Expr(op.webhook.result, f"{where}.webhook.result")
                               if op.webhook is not None and op.webhook.result else None)
        self.response_headers = [h.lower() for h in op.response_headers]


def _parse_body(resp: httpx.Response) -> Any:
    ctype = resp.headers.get("content-type", "")
    if "json" in ctype and resp.content:
        try:
            return orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            pass
    return resp.text


@connector_type
class HttpConnector(Connector):
    """REST calls (and webhook-completed calls) against one HTTP service."""

    type = "http"

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        self.settings: HttpSettings = parse_settings(HttpSettings, spec.settings, spec)
        self.client: httpx.AsyncClient | None = None
        self.callbacks: CallbackServer | None = None
        self._ops: dict[str, _Compiled] = {}
        for name, decl in spec.operations.items():
            where = f"connector '{spec.name}' operation '{name}'"
            op = parse_settings(_Operation, decl, spec, f"operation '{name}'")
            self._ops[name] = _Compiled(name, op, where)
        if any(c.op.webhook is not None for c in self._ops.values()):
            try:  # the callback server's aiohttp comes with the http extra: say so at start-up
                import kflow.connectors.webhook  # noqa: F401
            except ModuleNotFoundError as exc:
                raise ConnectorConfigError(f"connector '{spec.name}': {exc}") from None

    def _tls(self) -> ssl.SSLContext | bool:
        s = self.settings
        if not s.verify and not s.cert:
            return False
        ctx = ssl.create_default_context(cafile=s.ca_file)
        if not s.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if s.cert:
            ctx.load_cert_chain(s.cert, s.key)
        return ctx

    async def connect(self) -> None:
        s = self.settings
        headers = dict(s.headers)
        auth: httpx.Auth | None = None
        if s.auth is not None:
            if s.auth.bearer is not None:
                headers["Authorization"] = f"Bearer {s.auth.bearer}"
            elif s.auth.basic is not None:
                auth = httpx.BasicAuth(s.auth.basic.username, s.auth.basic.password)
            elif s.auth.api_key is not None:
                headers[s.auth.api_key.header] = s.auth.api_key.value
        limits = httpx.Limits(max_connections=s.max_connections, max_keepalive_connections=min(20, s.max_connections))
        self.client = httpx.AsyncClient(base_url=s.base_url, headers=headers, auth=auth, verify=self._tls(),
                                        timeout=s.timeout, limits=limits, follow_redirects=True)
        if any(c.op.webhook is not None for c in self._ops.values()) and self.callbacks is None:
            from kflow.connectors.webhook import CallbackServer

            cb = s.callback
            self.callbacks = await CallbackServer.acquire(cb.host, cb.port, cb.public_url)
        if s.health_url and not await self.health():
            raise ConnectorError("HttpError", f"health check {s.health_url} failed")

    async def disconnect(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()
        callbacks, self.callbacks = self.callbacks, None
        if callbacks is not None:
            await callbacks.release()

    async def health(self) -> bool:
        if self.client is None:
            return False
        if not self.settings.health_url:
            return True
        try:
            resp = await self.client.get(self.settings.health_url)
        except httpx.HTTPError:
            return False
        return resp.status_code < 500

    def operations(self) -> dict[str, Operation]:
        return {name: self._operation(c) for name, c in self._ops.items()}

    def _operation(self, c: _Compiled) -> Operation:
        async def run(input: Any) -> Any:
            if c.op.webhook is None:
                return await self.request(c, {"input": input})
            return await self._webhook(c, input)

        return run

    async def request(self, c: _Compiled, scope: dict[str, Any]) -> Any:
        """Send ``c``'s request with templates evaluated over ``scope``; map the response or error."""
        if self.client is None:
            raise ConnectorError("ConnectorUnavailable", f"connector '{self.name}' is not connected")
        assert c.url is not None
        url = c.url.render(scope)
        kwargs: dict[str, Any] = {}
        if c.json is not None:
            kwargs["content"] = orjson.dumps(c.json.value(scope))
            kwargs["headers"] = {"content-type": "application/json"}
        elif c.body is not None:
            kwargs["content"] = c.body.render(scope).encode()
        if c.headers:
            kwargs["headers"] = {**kwargs.get("headers", {}), **{k: t.render(scope) for k, t in c.headers.items()}}
        if c.params:
            kwargs["params"] = {k: t.render(scope) for k, t in c.params.items()}
        if c.op.timeout is not None:
            kwargs["timeout"] = c.op.timeout
        what = f"{c.op.method} {url}"
        try:
            resp = await self.client.request(c.op.method, url, **kwargs)
        except httpx.TimeoutException as e:
            raise ConnectorError("HttpTimeout", f"{what}: timed out ({type(e).__name__})", retryable=True) from None
        except httpx.HTTPError as e:
            raise ConnectorError("HttpError", f"{what}: {type(e).__name__}: {e}", retryable=True) from None
        body = _parse_body(resp)
        self._raise_for(c, what, resp, body)
        response = {"status": resp.status_code,
                    "headers": {h: resp.headers[h] for h in c.response_headers if h in resp.headers},
                    "body": body}
        if c.result is not None:
            return c.result.value({**scope, "response": response})
        return response

    @staticmethod
    def _raise_for(c: _Compiled, what: str, resp: httpx.Response, body: Any) -> None:
        status = resp.status_code
        if status < 400:
            return
        excerpt = (body if isinstance(body, str) else orjson.dumps(body).decode())[:_EXCERPT]
        message = f"{what} answered {status} {resp.reason_phrase}: {excerpt}".rstrip(": ")
        for rule in c.op.errors:
            if rule.matches(status):
                raise ConnectorError(rule.type, message, retryable=rule.retryable)
        raise ConnectorError("HttpError", message, retryable=status == 429 or status >= 500)

    async def _webhook(self, c: _Compiled, input: Any) -> Any:
        from kflow.connectors.webhook import wait_for_callback

        assert c.op.webhook is not None
        if self.callbacks is None:
            raise ConnectorError("ConnectorUnavailable", f"connector '{self.name}' is not connected")
        pending = self.callbacks.register()
        scope: dict[str, Any] = {"input": input, "callback_url": pending.url}
        try:
            response = await self.request(c, scope) if c.url is not None else None
            body = await wait_for_callback(pending, c.op.webhook.timeout, c.op.webhook.retryable,
                                           f"connector '{self.name}' operation '{c.name}'")
        finally:
            self.callbacks.forget(pending)
        if c.webhook_result is not None:
            return c.webhook_result.value({**scope, "callback": body, "response": response})
        return body
