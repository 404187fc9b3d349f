"""The ``sql`` connector: parameterised statements over a SQLAlchemy connection pool (PostgreSQL, SQLite, ...).

Settings: ``url`` (a SQLAlchemy URL; ``postgresql://`` means psycopg 3), an optional ``password``
(kept out of the URL, never logged), ``pool_size``, ``max_overflow``, ``pool_timeout`` and
``connect_timeout``. The pool and its blocking driver run in a small thread pool of the
connector's own, so the connector loop never blocks.

An operation is one ``statement`` with **named** bind parameters only (``:name``), each given by a
CEL expression over ``input`` in ``params``; it runs in its own transaction. Its result is
``{rows: [...], rowcount}`` for statements that return rows (each row a JSON object; dates and
times become ISO text, decimals numbers) and ``{rowcount}`` otherwise, or the value of its
``result`` expression over ``rows``, ``rowcount`` and ``input``. ``many: true`` runs the
statement once per element of ``items`` (a CEL expression, default ``input``) with ``item`` bound
to the element. Integrity, data and SQL errors are non-retryable; connection and timeout errors
are retryable.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import decimal
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

try:
    import sqlalchemy as sa
    from sqlalchemy import exc as sa_exc
except ModuleNotFoundError as exc:  # name the extra to install rather than the missing module
    raise ModuleNotFoundError("the SQL connector needs the sql extra: pip install 'kflow[sql]'",
                              name=exc.name) from exc

from kflow.connectors.base import (
    Connector,
    ConnectorConfigError,
    ConnectorError,
    ConnectorSpec,
    Operation,
    connector_type,
)
from kflow.connectors.config import Duration, Expr, parse_settings

__all__ = ["SqlConnector"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SqlSettings(_Model):
    """Settings of a ``sql`` connector."""

    url: str = Field(min_length=1)
    password: str | None = None
    pool_size: int = Field(5, ge=1, le=1000)
    max_overflow: int = Field(5, ge=0)
    pool_timeout: Duration = 10.0
    connect_timeout: Duration = 10.0


class _Operation(_Model):
    statement: str = Field(min_length=1)
    params: dict[str, str] = Field(default_factory=dict)
    many: bool = False
    items: str = "input"
    result: str | None = None


class _Compiled:
    def __init__(self, name: str, op: _Operation, where: str) -> None:
        self.name, self.op = name, op
        self.text = sa.text(op.statement)
        binds = set(self.text.compile().params)  # the :name parameters of the statement
        declared = set(op.params)
        if binds - declared:
            raise ConnectorConfigError(f"{where}: statement parameters without a value in params: "
                                       f"{', '.join(sorted(binds - declared))}")
        if declared - binds:
            raise ConnectorConfigError(f"{where}: params not used by the statement (expected :name placeholders): "
                                       f"{', '.join(sorted(declared - binds))}")
        self.params = {k: Expr(v, f"{where}.params.{k}") for k, v in op.params.items()}
        self.items = Expr(op.items, f"{where}.items") if op.many else None
        self.result = Expr(op.result, f"{where}.result") if op.result else None


def to_json(value: Any) -> Any:
    """A database value as JSON: ISO text for dates and times, numbers for decimals, text for uuids."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return str(value)
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return str(value)


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _map_error(e: Exception, what: str) -> ConnectorError:
    if isinstance(e, sa_exc.IntegrityError):
        return ConnectorError("SqlIntegrityError", f"{what}: {_first_line(e)}", retryable=False)
    if isinstance(e, sa_exc.DataError):
        return ConnectorError("SqlDataError", f"{what}: {_first_line(e)}", retryable=False)
    if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
        return ConnectorError("SqlConnectionError", f"{what}: {_first_line(e)}", retryable=True)
    if isinstance(e, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError)):
        return ConnectorError("SqlConnectionError", f"{what}: {_first_line(e)}", retryable=True)
    return ConnectorError("SqlError", f"{what}: {_first_line(e)}", retryable=False)


@connector_type
class SqlConnector(Connector):
    """Parameterised SQL statements, one transaction each, against one database."""

    type = "sql"

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__(spec)
        self.settings: SqlSettings = parse_settings(SqlSettings, spec.settings, spec)
        try:
            url = sa.make_url(str(self.settings.url))
        except sa_exc.ArgumentError:
            raise ConnectorConfigError(f"connector '{spec.name}' (sql): settings.url is not a database URL "
                                       "(expected e.g. postgresql://user@host/db or sqlite:///file.db)") from None
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        if self.settings.password is not None and url.get_backend_name() != "sqlite":
            url = url.set(password=str(self.settings.password))
        self.url = url
        try:  # the engine is lazy: it connects on first use, so a bad URL or driver fails here, at start-up
            self.engine: sa.Engine = sa.create_engine(url, **self._engine_options())
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError) as e:
            raise ConnectorConfigError(f"connector '{spec.name}' (sql): settings.url: "
                                       f"{str(e).splitlines()[0]}") from None
        self._connected = False
        self._pool = ThreadPoolExecutor(self.settings.pool_size + self.settings.max_overflow,
                                        thread_name_prefix=f"kflow-sql-{spec.name}")
        self._ops: dict[str, _Compiled] = {}
        for name, decl in spec.operations.items():
            op = parse_settings(_Operation, decl, spec, f"operation '{name}'")
            self._ops[name] = _Compiled(name, op, f"connector '{spec.name}' operation '{name}'")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _engine_options(self) -> dict[str, Any]:
        s = self.settings
        kw: dict[str, Any] = {"pool_pre_ping": True}
        if self.url.get_backend_name() == "sqlite":
            kw["connect_args"] = {"check_same_thread": False, "timeout": s.connect_timeout}
        else:
            kw.update(pool_size=s.pool_size, max_overflow=s.max_overflow, pool_timeout=s.pool_timeout)
            if self.url.get_backend_name() == "postgresql":
                kw["connect_args"] = {"connect_timeout": max(1, int(s.connect_timeout))}
        return kw

    async def connect(self) -> None:
        try:
            await self._run(self._ping)
        except sa_exc.SQLAlchemyError as e:
            raise ConnectorError("SqlConnectionError", _first_line(e)) from None
        self._connected = True

    def _ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    async def disconnect(self) -> None:
        self._connected = False
        await self._run(self.engine.dispose)  # closes pooled connections; the engine stays usable

    async def health(self) -> bool:
        if not self._connected:
            return False
        try:
            await self._run(self._ping)
        except sa_exc.SQLAlchemyError:
            return False
        return True

    def operations(self) -> dict[str, Operation]:
        return {name: self._operation(c) for name, c in self._ops.items()}

    def _operation(self, c: _Compiled) -> Operation:
        async def run(input: Any) -> Any:
            if not self._connected:
                raise ConnectorError("ConnectorUnavailable", f"connector '{self.name}' is not connected")
            scope = {"input": input}
            if c.items is not None:
                items = c.items.value(scope)
                if not isinstance(items, list):
                    raise ConnectorError("SqlDataError", f"operation '{c.name}': items must be a list, but is "
                                         f"{type(items).__name__}", retryable=False)
                params: Any = [{k: e.value({"input": input, "item": it}) for k, e in c.params.items()} for it in items]
                if not params:
                    return self._shape(c, None, 0, input)
            else:
                params = {k: e.value(scope) for k, e in c.params.items()}
            try:
                rows, rowcount = await self._run(self._execute, c, params)
            except sa_exc.SQLAlchemyError as e:
                raise _map_error(e, f"connector '{self.name}' operation '{c.name}'") from None
            return self._shape(c, rows, rowcount, input)

        return run

    def _execute(self, c: _Compiled, params: Any) -> tuple[list[dict[str, Any]] | None, int]:
        with self.engine.begin() as conn:  # one transaction: committed on success, rolled back on error
            result = conn.execute(c.text, params)
            rows = [{k: to_json(v) for k, v in m.items()} for m in result.mappings()] if result.returns_rows else None
            rowcount = result.rowcount
            return rows, len(rows) if rows is not None and rowcount < 0 else max(rowcount, 0)

    @staticmethod
    def _shape(c: _Compiled, rows: list[dict[str, Any]] | None, rowcount: int, input: Any) -> Any:
        out: dict[str, Any] = {"rowcount": rowcount} if rows is None else {"rows": rows, "rowcount": rowcount}
        if c.result is not None:
            return c.result.value({"rows": rows or [], "rowcount": rowcount, "input": input})
        return out
