"""The HTTP API and web console over the visibility store (FastAPI; OpenAPI at ``/docs``).

Reads come from the store; actions (start, signal, cancel, terminate) produce commands to Kafka
through a :class:`~kflow.client.Client`, so they take effect when the engine decides them and
show up here once the projection has folded the resulting state. Every error is JSON
``{"error": "...", "status": N}``: malformed filters and bodies are 400, unknown ids 404.
``/api/stream`` is a server-sent-event stream of changed instance ids fed by the projection.

With auth on (an :class:`~kflow.visibility.access.Access` with credentials), every ``/api``
endpoint but the login needs a caller (401 otherwise), each operation the permission
:data:`~kflow.security.policy.ACTIONS` names for it on the resource (403 otherwise; lists are
limited to the caller's tenant), and the actions are signed as the caller, so the engine checks
them again. Bodies are bounded (:class:`~kflow.security.httplimits.BodyLimits`) whether auth is
on or off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional, Protocol

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field

try:
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ModuleNotFoundError as exc:  # name the extra to install rather than the missing module
    raise ModuleNotFoundError("the visibility API needs the visibility extra: pip install 'kflow[visibility]'",
                              name=exc.name) from exc

from kflow.client import ID_REUSE_POLICIES
from kflow.model.errors import KflowError
from kflow.model.messages import Event
from kflow.security.audit import AuditRecord
from kflow.security.http import SESSION_COOKIE, Caller, RateLimited
from kflow.security.httplimits import BodyLimits
from kflow.security.policy import Resource
from kflow.security.principal import DEFAULT_TENANT, AuthError, Principal
from kflow.streams.schedules import with_next_runs
from kflow.visibility.access import Access, ApiError
from kflow.visibility.graph import MAX_REPLAY_EVENTS, history_steps, layout, resolve_steps, step_index, succeed_steps
from kflow.visibility.live import Changes
from kflow.visibility.objects import incident_rows, limit_key_part, limit_rows, queued_by_level
from kflow.visibility.store import MAX_PAGE, STATUSES, FilterError, InstanceFilter, VisibilityStore

__all__ = ["ActionSink", "ApiError", "create_app", "parse_time"]

log = logging.getLogger("kflow.visibility")

STATIC = Path(__file__).with_name("static")
#: What pausing, unpausing or triggering a schedule needs: the engine checks schedule commands so.
SCHEDULE_PERMISSION = "system:Admin"


class ActionSink(Protocol):
    """What the API needs to act on instances: the methods of :class:`kflow.client.Client`."""

    def start(self, workflow: str, input: Any = None, *, id: Optional[str] = None, version: Optional[int] = None,
              id_reuse: Optional[str] = None) -> Any: ...

    def signal(self, id: str, name: str, data: Any = None) -> None: ...

    def cancel(self, id: str, reason: str = "") -> None: ...

    def terminate(self, id: str, reason: str = "") -> None: ...

    def schedules(self) -> dict[str, dict[str, Any]]: ...

    def pause_schedule(self, id: str, note: str = "") -> None: ...

    def unpause_schedule(self, id: str, note: str = "") -> None: ...

    def trigger_schedule(self, id: str, overlap: Optional[str] = None) -> None: ...

    def resolve_incident(self, id: str, incident_id: str, action: str, *, output: Any = None,
                         input_patch: Optional[dict[str, Any]] = None, reason: str = "", by: str = "") -> None: ...


class StartBody(BaseModel):
    """Start a workflow instance."""

    workflow: str = Field(min_length=1, description="The definition's name.")
    input: Any = Field(None, description="The workflow input, any JSON value.")
    id: Optional[str] = Field(None, min_length=1, description="The instance id; random when omitted.")
    version: Optional[int] = Field(None, ge=1, description="The version; the latest deployed when omitted.")
    id_reuse: Optional[str] = Field(None, description="reject_duplicate, allow_if_closed or return_existing.")


class SignalBody(BaseModel):
    """Send a signal."""

    name: str = Field(min_length=1, description="The signal name.")
    data: Any = Field(None, description="The signal data, any JSON value.")


class ReasonBody(BaseModel):
    """Cancel or terminate an instance."""

    reason: str = Field("", description="Why; recorded in the history.")


class ResolveBody(BaseModel):
    """Resolve an open incident."""

    action: str = Field(description="retry (run the step again), skip (go on with `output`) or fail.")
    output: Any = Field(None, description="The step's output, any JSON value (action skip).")
    input_patch: Optional[dict[str, Any]] = Field(None, description="Merged into the activity input (action retry).")
    reason: str = Field("", max_length=4096, description="Why; recorded in IncidentResolved.")


class NoteBody(BaseModel):
    """Pause or unpause a schedule."""

    note: str = Field("", max_length=4096, description="Why; shown with the schedule.")


class TriggerBody(BaseModel):
    """Start a run of a schedule now."""

    overlap: Optional[str] = Field(None, description="Overlap policy of this run; the schedule's when omitted.")


class BatchBody(BaseModel):
    """Create a batch: one operation on every instance a visibility query selects."""

    operation: str = Field(description="signal, cancel, terminate, suspend, resume or retry.")
    where: str = Field(min_length=1, description="The query, as `kflow batch --where` takes it, e.g. "
                                                 "\"workflow=order AND status=RUNNING\".")
    signal: Optional[str] = Field(None, min_length=1, description="The signal name (operation signal).")
    data: Any = Field(None, description="The signal data, any JSON value (operation signal).")
    reason: str = Field("", description="Why; recorded in each instance's history with the batch id.")
    from_step: Optional[str] = Field(None, description="Step to re-open at (operation retry).")
    input_patch: Optional[dict[str, Any]] = Field(None, description="Merged into the variables (operation retry).")
    force: bool = Field(False, description="Also re-open CANCELLED and TERMINATED instances (operation retry).")
    rate: str = Field("50/s", description="Most commands sent per second: 50/s, 600/m.")
    max: int = Field(100_000, ge=1, description="Refuse the batch if more instances than this match.")


class LoginBody(BaseModel):
    """Log in to the console."""

    username: str = Field(min_length=1, max_length=255, description="The user's name in the users file.")
    password: str = Field(min_length=1, max_length=1024, description="The user's password.")


def parse_time(value: Optional[str], name: str) -> Optional[int]:
    """Epoch milliseconds from ``value``: an integer (ms) or an ISO 8601 time (UTC when no zone).

    Raises:
        ApiError: 400 naming the parameter when the value is neither.
    """
    if value is None or value == "":
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"{name} must be epoch milliseconds or an ISO 8601 time like "
                            f"2024-05-01T12:00:00Z, but got {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _filter(status: Optional[str], workflow: Optional[str], version: Optional[int], tenant: Optional[str],
            started_after: Optional[str], started_before: Optional[str], closed_after: Optional[str],
            closed_before: Optional[str], search: list[str], id_prefix: Optional[str]) -> InstanceFilter:
    pairs = []
    for item in search:
        name, sep, value = item.partition(":")
        if not sep or not name:
            raise ApiError(400, f"search filters are name:value, but got {item!r}")
        pairs.append((name, value))
    try:
        return InstanceFilter(
            status=[s.strip().upper() for s in status.split(",") if s.strip()] if status else [],
            workflow=workflow or None, version=version, tenant=tenant or None,
            started_after=parse_time(started_after, "started_after"),
            started_before=parse_time(started_before, "started_before"),
            closed_after=parse_time(closed_after, "closed_after"),
            closed_before=parse_time(closed_before, "closed_before"),
            search=pairs, id_prefix=id_prefix or None)
    except FilterError as e:
        raise ApiError(400, str(e)) from None


def _history_events(store: VisibilityStore, instance_id: str) -> Optional[list[Event]]:
    """The stored history of an instance, oldest first; None when it is too long to replay."""
    out: list[Event] = []
    while len(out) <= MAX_REPLAY_EVENTS:
        page = store.history(instance_id, out[-1].seq if out else 0, MAX_PAGE)
        out += [Event(e["type"], e["instance_id"], e["seq"], e["ts"], e["data"]) for e in page]
        if len(page) < MAX_PAGE:
            return out
    return None


def _instance_view(row: dict[str, Any], definition: Optional[dict[str, Any]],
                   events: Optional[list[Event]] = None) -> dict[str, Any]:
    """The API shape of one instance: summary, variables and pending work from its state.

    A spec instance's step states come from replaying ``events`` (its history) when given and
    replayable, else from the step positions tracked over its state records.
    """
    internal = row.pop("internal")
    pending = [{"activity_id": aid, "name": a.get("name"), "step": a.get("step"), "queue": a.get("queue"),
                "attempt": a.get("attempt"), "phase": a.get("phase")}
               for aid, a in sorted((internal.get("activities") or {}).items())]
    timers = [{"timer_id": tid, "due_ms": t.get("due"), "purpose": t.get("purpose")}
              for tid, t in sorted((internal.get("timers") or {}).items())]
    children = sorted(set(row.pop("children_ids")) | set(internal.get("children") or {}))
    waiting = [w["name"] for th in (internal.get("threads") or {}).values()
               if isinstance(w := th.get("wait"), dict) and w.get("k") == "signal"]
    is_spec = definition is not None and definition["kind"] == "spec"
    if is_spec:
        body = definition["body"]  # type: ignore[index]
        replayed = history_steps(body, events) if events else None
        row["steps"] = (replayed if replayed is not None
                        else resolve_steps(row["steps"], step_index(body), row["status"], succeed_steps(body)))
    else:
        row["steps"] = {}
    return {**row, "input": internal.get("input"), "variables": internal.get("vars") or {},
            "pending_activities": pending, "timers": timers, "children": children, "waiting_for_signals": waiting,
            "graph": layout(definition["body"]) if is_spec else None,
            "state": internal}


def create_app(store: VisibilityStore, actions: Optional[Callable[[Optional[Principal]], ActionSink]] = None, *,
               changes: Optional[Changes] = None, ready: Callable[[], bool] = lambda: True,
               lag: Callable[[], int] = lambda: 0, access: Optional[Access] = None,
               audit_reader: Optional[Callable[..., list[AuditRecord]]] = None,
               max_body_bytes: int = 1_048_576,
               subscriptions: Optional[Callable[[], dict[str, Any]]] = None) -> FastAPI:
    """Build the application.

    Args:
        store: The store to read.
        actions: Returns the client that produces commands, signing them as the given principal
            (None when auth is off); None makes actions answer 503.
        changes: Fed by the projection; drives ``/api/stream``.
        ready: What ``/readyz`` reports.
        lag: Records not yet folded (shown in ``/api/stats``).
        access: Authentication, authorization and audit; default: auth off.
        audit_reader: Reads the audit trail (``since_ms``, ``principal``, ``outcome`` keywords)
            for ``/api/audit``; None makes it answer 503.
        max_body_bytes: Largest request body read (413 beyond).
        subscriptions: Reads the webhook subscriptions with their recent deliveries (see
            :class:`~kflow.visibility.deliveries.SubscriptionsView`); None makes
            ``/api/subscriptions`` answer 503.
    """
    changes = changes or Changes()
    access = access or Access()
    app = FastAPI(title="kflow visibility", version="1",
                  description="List, inspect and act on kflow workflow instances.")

    def _refused_body(scope: Any, status: int, message: str) -> None:
        access.refused(Request(scope), status, message)

    app.add_middleware(BodyLimits, max_bytes=max_body_bytes, on_refuse=_refused_body)

    def _answer(req: Request, status: int, message: str, headers: Optional[dict[str, str]] = None) -> JSONResponse:
        if status in (400, 413, 422) and req.url.path.startswith("/api/"):
            access.refused(req, status, message)
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(req: Request, exc: ApiError) -> JSONResponse:
        return _answer(req, exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(req: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path"))
            parts.append(f"{where or 'request'}: {err.get('msg')}")
        return _answer(req, 400, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else "no such endpoint"
        return _answer(req, exc.status_code, message)

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("visibility API: unexpected error")
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}", "status": 500}, status_code=500)

    def caller(request: Request) -> Caller:
        return access.caller(request)

    Who = Depends(caller)

    def act(who: Caller) -> ActionSink:
        if actions is None:
            raise ApiError(503, "actions are disabled: this server has no Kafka connection")
        try:
            return actions(who.principal if access.enabled else None)
        except KflowError as e:
            raise ApiError(503, f"cannot reach Kafka: {e}") from None

    def known(instance_id: str) -> None:
        if not store.has_instance(instance_id):
            raise ApiError(404, f"no workflow instance with id {instance_id!r}")

    def instance_resource(instance_id: str, row: Optional[dict[str, Any]] = None) -> Resource:
        """The instance as the policy sees it: its tenant and owner from its state."""
        if row is None and access.enabled:
            row = store.get_instance(instance_id)
        if row is None:
            return Resource("instance", instance_id, DEFAULT_TENANT)
        internal = row.get("internal") or {}
        owner = internal.get("owner")
        return Resource("instance", instance_id, row.get("tenant") or DEFAULT_TENANT,
                        owner if isinstance(owner, str) else None)

    def allowed(who: Caller, resource: Resource) -> dict[str, bool]:
        """Which actions ``who`` may take on an instance (for the console's buttons)."""
        return {a: access.verdict(who, a, resource, catch_up=False).allowed for a in ("signal", "cancel", "terminate")}

    def tenant_scope(request: Request, who: Caller, tenant: Optional[str]) -> Optional[str]:
        """The tenant a list is limited to: the caller's (any, for a system_admin); ``""`` lists nothing."""
        access.require(request, who, "list", Resource("instance", "*", who.principal.tenant))
        if access.is_admin(who):
            return tenant
        own = who.principal.tenant
        return own if tenant in (None, "", own) else ""

    def done(request: Request, who: Caller, action: str, resource: Resource, **details: Any) -> None:
        access.record(request, who, action, resource, "success", details)

    # -- session --------------------------------------------------------------------------------

    @app.get("/api/session", tags=["session"], summary="Who is logged in (401 when nobody)")
    def session(request: Request) -> dict[str, Any]:
        if not access.enabled:
            return {"auth": False, "principal": None, "tenant": DEFAULT_TENANT, "roles": [], "admin": True}
        who = access.caller(request, audit_missing=False)
        p = who.principal
        return {"auth": True, "principal": p.name, "tenant": p.tenant, "roles": sorted(p.roles), "via": who.method,
                "csrf": who.csrf, "admin": access.is_admin(who)}

    @app.post("/api/login", tags=["session"], summary="Console login: sets the session cookie")
    def login(request: Request, body: LoginBody) -> JSONResponse:
        if access.auth is None:
            raise ApiError(404, "login is not needed: auth is off on this server")
        ip = request.client.host if request.client else "?"
        target = Resource("system", f"user:{body.username[:64]}")
        try:
            who = access.auth.login(body.username, body.password, ip, access.clock())
        except RateLimited as e:
            access.record(request, None, "login", target, "denied", {"reason": str(e), "code": "RateLimited"})
            raise ApiError(429, str(e), {"Retry-After": str(e.retry_after_s)}) from None
        except AuthError as e:
            access.record(request, None, "login", target, "denied", {"reason": e.reason, "code": "Unauthenticated"})
            raise ApiError(401, f"unauthenticated: {e.reason}") from None
        cookie, csrf = access.auth.sessions.issue(who, access.clock())
        access.record(request, Caller(who, "password"), "login", Resource("system", f"user:{who.name}", who.tenant),
                      "success")
        res = JSONResponse({"auth": True, "principal": who.name, "tenant": who.tenant, "roles": sorted(who.roles),
                            "via": "session", "csrf": csrf})
        res.set_cookie(SESSION_COOKIE, cookie, max_age=int(access.auth.sessions.ttl_s), httponly=True,
                       samesite="strict", secure=request.url.scheme == "https", path="/")
        return res

    @app.post("/api/logout", tags=["session"], summary="End the console session")
    def logout() -> JSONResponse:
        res = JSONResponse({"auth": False})
        res.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return res

    # -- instances ----------------------------------------------------------------------------

    @app.get("/api/instances", tags=["instances"], summary="List instances (newest first, cursor-paged)")
    def list_instances(
        request: Request,
        status: Optional[str] = Query(None, description="Comma-separated statuses, e.g. RUNNING,FAILED."),
        workflow: Optional[str] = Query(None, description="Workflow name."),
        version: Optional[int] = Query(None, ge=1, description="Workflow version."),
        tenant: Optional[str] = Query(None, description="Tenant (state field or search attribute `tenant`)."),
        started_after: Optional[str] = Query(None, description="Epoch ms or ISO 8601, inclusive."),
        started_before: Optional[str] = Query(None, description="Epoch ms or ISO 8601, exclusive."),
        closed_after: Optional[str] = Query(None, description="Epoch ms or ISO 8601, inclusive."),
        closed_before: Optional[str] = Query(None, description="Epoch ms or ISO 8601, exclusive."),
        search: list[str] = Query([], description="Search attribute filter name:value (repeatable, ANDed)."),
        id_prefix: Optional[str] = Query(None, description="Instance ids starting with this."),
        limit: int = Query(50, ge=1, le=1000, description="Page size."),
        cursor: Optional[str] = Query(None, description="next_cursor of the previous page."),
        who: Caller = Who,
    ) -> dict[str, Any]:
        tenant = tenant_scope(request, who, tenant)
        f = _filter(status, workflow, version, tenant, started_after, started_before, closed_after, closed_before,
                    search, id_prefix)
        if tenant == "":
            return {"items": [], "next_cursor": None}
        try:
            page = store.list_instances(f, limit, cursor)
        except FilterError as e:
            raise ApiError(400, str(e)) from None
        return {"items": page.items, "next_cursor": page.next_cursor}

    @app.get("/api/instances/counts", tags=["instances"], summary="Instances per status")
    def counts(
        request: Request,
        workflow: Optional[str] = None, version: Optional[int] = Query(None, ge=1), tenant: Optional[str] = None,
        started_after: Optional[str] = None, started_before: Optional[str] = None,
        closed_after: Optional[str] = None, closed_before: Optional[str] = None,
        search: list[str] = Query([]), id_prefix: Optional[str] = None, who: Caller = Who,
    ) -> dict[str, Any]:
        tenant = tenant_scope(request, who, tenant)
        f = _filter(None, workflow, version, tenant, started_after, started_before, closed_after, closed_before,
                    search, id_prefix)
        by_status = store.counts(f) if tenant != "" else dict.fromkeys(STATUSES, 0)
        return {"counts": by_status, "total": sum(by_status.values())}

    @app.post("/api/instances", tags=["actions"], status_code=202, summary="Start an instance")
    def start(request: Request, body: StartBody, who: Caller = Who) -> dict[str, Any]:
        if body.id_reuse is not None and body.id_reuse not in ID_REUSE_POLICIES:
            raise ApiError(400, f"id_reuse must be one of {', '.join(sorted(ID_REUSE_POLICIES))}, "
                                f"not {body.id_reuse!r}")
        target = Resource("definition", body.workflow, who.principal.tenant)
        access.require(request, who, "start", target)
        d = store.definition(body.workflow, body.version)
        if d is None:
            what = body.workflow if body.version is None else f"{body.workflow}@{body.version}"
            raise ApiError(404, f"no deployed workflow named {what!r}")
        handle = act(who).start(body.workflow, body.input, id=body.id, version=body.version, id_reuse=body.id_reuse)
        done(request, who, "start", target, instance_id=handle.id)
        return {"id": handle.id, "workflow": body.workflow, "version": body.version}

    @app.get("/api/instances/{instance_id}", tags=["instances"], summary="One instance with its state")
    def get_instance(request: Request, instance_id: str, who: Caller = Who) -> dict[str, Any]:
        row = store.get_instance(instance_id)
        if row is None:
            raise ApiError(404, f"no workflow instance with id {instance_id!r}")
        resource = instance_resource(instance_id, row)
        access.require(request, who, "status", resource)
        definition = store.definition(row["workflow"], row["version"])
        spec = definition is not None and definition["kind"] == "spec"
        view = _instance_view(row, definition, _history_events(store, instance_id) if spec else None)
        view["allowed"] = allowed(who, resource)
        return view

    @app.get("/api/instances/{instance_id}/history", tags=["instances"], summary="Events of an instance (paged)")
    def history(request: Request, instance_id: str,
                after_seq: int = Query(0, ge=0, description="Return events after this seq."),
                limit: int = Query(100, ge=1, le=1000), who: Caller = Who) -> dict[str, Any]:
        known(instance_id)
        access.require(request, who, "history", instance_resource(instance_id))
        items = store.history(instance_id, after_seq, limit)
        return {"items": items, "next_after_seq": items[-1]["seq"] if len(items) == limit else None}

    @app.post("/api/instances/{instance_id}/signal", tags=["actions"], status_code=202, summary="Send a signal")
    def signal(request: Request, instance_id: str, body: SignalBody, who: Caller = Who) -> dict[str, Any]:
        known(instance_id)
        target = instance_resource(instance_id)
        access.require(request, who, "signal", target)
        act(who).signal(instance_id, body.name, body.data)
        done(request, who, "signal", target, signal=body.name)
        return {"id": instance_id, "signal": body.name, "accepted": True}

    @app.post("/api/instances/{instance_id}/cancel", tags=["actions"], status_code=202, summary="Cancel")
    def cancel(request: Request, instance_id: str, body: Optional[ReasonBody] = None,
               who: Caller = Who) -> dict[str, Any]:
        known(instance_id)
        target = instance_resource(instance_id)
        access.require(request, who, "cancel", target)
        act(who).cancel(instance_id, (body or ReasonBody()).reason)
        done(request, who, "cancel", target)
        return {"id": instance_id, "accepted": True}

    @app.post("/api/instances/{instance_id}/terminate", tags=["actions"], status_code=202, summary="Terminate")
    def terminate(request: Request, instance_id: str, body: Optional[ReasonBody] = None,
                  who: Caller = Who) -> dict[str, Any]:
        known(instance_id)
        target = instance_resource(instance_id)
        access.require(request, who, "terminate", target)
        act(who).terminate(instance_id, (body or ReasonBody()).reason)
        done(request, who, "terminate", target)
        return {"id": instance_id, "accepted": True}

    # -- batches --------------------------------------------------------------------------------

    batch_threads: dict[str, Any] = {}

    def batch_log(who: Caller) -> Any:
        from kflow.batch import BatchLog

        return BatchLog(getattr(act(who), "config"))  # noqa: B009 (a Client has it; ActionSink does not declare it)

    def batch_visible(who: Caller, header: dict[str, Any]) -> bool:
        return access.is_admin(who) or (header.get("tenant") or DEFAULT_TENANT) == who.principal.tenant

    @app.post("/api/batches", tags=["batches"], status_code=202,
              summary="Create and start a batch operation over the instances a query selects")
    def create_batch(request: Request, body: BatchBody, who: Caller = Who) -> dict[str, Any]:
        import threading

        from kflow.batch import BatchRunner, WhereError, new_batch, parse_rate, parse_where
        from kflow.batch.runner import check_operation

        args: dict[str, Any] = ({"name": body.signal, "data": body.data} if body.operation == "signal" else
                                {"from_step": body.from_step, "input_patch": body.input_patch, "force": body.force,
                                 "reason": body.reason} if body.operation == "retry" else {"reason": body.reason})
        try:
            check_operation(body.operation, args)
            where, rate = parse_where(body.where), parse_rate(body.rate)
        except WhereError as e:
            raise ApiError(400, str(e)) from None
        tenant = tenant_scope(request, who, where.tenant)
        f = _filter(",".join(where.status) or None, where.workflow, where.version, tenant, None, None, None, None,
                    [f"{n}:{v}" for n, v in where.search], where.id_prefix)
        f.started_after, f.started_before = where.started_after, where.started_before
        f.closed_after, f.closed_before = where.closed_after, where.closed_before
        rows: list[dict[str, Any]] = []
        cursor: Optional[str] = None
        while tenant != "":
            try:
                page = store.list_instances(f, MAX_PAGE, cursor)
            except FilterError as e:
                raise ApiError(400, str(e)) from None
            rows += page.items
            if len(rows) > body.max:
                raise ApiError(400, f"the query matches more than {body.max} instances: narrow it, or raise max "
                                    "(nothing was sent)")
            cursor = page.next_cursor
            if cursor is None:
                break
        if access.enabled:  # the operation's permission on every instance, or no batch at all
            for row in rows:
                access.require(request, who, body.operation, instance_resource(row["instance_id"]))
        ids = [r["instance_id"] for r in rows]
        client = act(who)
        log_ = batch_log(who)
        try:
            rec = new_batch(log_, body.operation, where, ids, args, rate, who.principal.name,
                            tenant=who.principal.tenant)
        except WhereError as e:
            log_.close()
            raise ApiError(400, str(e)) from None
        except KflowError as e:
            log_.close()
            raise ApiError(503, f"cannot record the batch: {e}") from None

        def run() -> None:
            try:
                BatchRunner(client, log_).run(rec.id)  # type: ignore[arg-type]
            except Exception:  # the batch stays RUNNING on its topic; `kflow batch continue` carries on
                log.exception("batch %s failed", rec.id)
            finally:
                log_.close()
                batch_threads.pop(rec.id, None)

        thread = threading.Thread(target=run, name=f"kflow-batch-{rec.id}", daemon=True)
        batch_threads[rec.id] = thread
        thread.start()
        done(request, who, body.operation, Resource("instance", "*", who.principal.tenant), batch_id=rec.id,
             instances=len(ids), where=where.text())
        return {"id": rec.id, "operation": body.operation, "where": where.text(), "total": len(ids),
                "status": rec.header["status"]}

    @app.get("/api/batches", tags=["batches"], summary="Batches, newest first, with their status and counts")
    def list_batches(request: Request, who: Caller = Who) -> dict[str, Any]:
        access.require(request, who, "list", Resource("instance", "*", who.principal.tenant))
        try:
            headers = batch_log(who).headers()
        except KflowError as e:
            raise ApiError(503, f"cannot read the batches: {e}") from None
        return {"items": [h for h in headers if batch_visible(who, h)]}

    @app.get("/api/batches/{batch_id}", tags=["batches"], summary="One batch with the outcome of each instance")
    def get_batch(request: Request, batch_id: str, offset: int = Query(0, ge=0, description="First instance shown."),
                  limit: int = Query(1000, ge=1, le=10_000, description="Instances shown."),
                  who: Caller = Who) -> dict[str, Any]:
        from kflow.batch import BatchNotFound

        access.require(request, who, "list", Resource("instance", "*", who.principal.tenant))
        try:
            rec = batch_log(who).load(batch_id)
        except BatchNotFound as e:
            raise ApiError(404, str(e)) from None
        except KflowError as e:
            raise ApiError(503, f"cannot read the batch: {e}") from None
        if not batch_visible(who, rec.header):
            raise ApiError(404, f"no batch with id {batch_id!r}")
        items = [{"instance_id": iid, **(rec.outcomes[iid].to_json() if iid in rec.outcomes else {"result": "pending"})}
                 for iid in rec.ids[offset:offset + limit]]
        return {**rec.header, "counts": rec.counts(), "instances": items,
                "next_offset": offset + limit if offset + limit < len(rec.ids) else None}

    # -- definitions --------------------------------------------------------------------------

    @app.get("/api/definitions", tags=["definitions"], summary="Deployed definitions and their versions")
    def list_definitions(request: Request, who: Caller = Who) -> dict[str, Any]:
        access.require(request, who, "definition:View", Resource("definition", "*", who.principal.tenant))
        return {"items": store.definitions()}

    @app.get("/api/definitions/{name}", tags=["definitions"], summary="The latest version of a definition")
    def latest_definition(request: Request, name: str, who: Caller = Who) -> dict[str, Any]:
        access.require(request, who, "definition:View", Resource("definition", name, who.principal.tenant))
        return _definition(name, None)

    @app.get("/api/definitions/{name}/{version}", tags=["definitions"], summary="One version of a definition")
    def get_definition(request: Request, name: str, version: int, who: Caller = Who) -> dict[str, Any]:
        access.require(request, who, "definition:View", Resource("definition", name, who.principal.tenant))
        return _definition(name, version)

    def _definition(name: str, version: Optional[int]) -> dict[str, Any]:
        d = store.definition(name, version)
        if d is None:
            what = name if version is None else f"{name}@{version}"
            raise ApiError(404, f"no deployed workflow named {what!r}")
        versions = next((x["versions"] for x in store.definitions() if x["name"] == name), [])
        return {**d, "versions": versions, "graph": layout(d["body"]) if d["kind"] == "spec" else None}

    # -- schedules ------------------------------------------------------------------------------

    @app.get("/api/schedules", tags=["schedules"], summary="Schedules with their next runs (read from Kafka)")
    def list_schedules(request: Request, next_runs: int = Query(5, alias="next", ge=0, le=100),
                       who: Caller = Who) -> dict[str, Any]:
        access.require(request, who, "definition:View", Resource("definition", "*", who.principal.tenant))
        try:
            table = act(who).schedules()
        except KflowError as e:
            raise ApiError(503, f"cannot read the schedules: {e}") from None
        now = int(datetime.now(UTC).timestamp() * 1000)
        may = access.verdict(who, SCHEDULE_PERMISSION, engine_resource(who), catch_up=False).allowed
        return {"items": [with_next_runs(table[sid], now, next_runs) for sid in sorted(table)],
                "allowed": dict.fromkeys(("pause", "unpause", "trigger"), may)}

    def engine_resource(who: Caller) -> Resource:
        """What the engine checks a schedule command against (``system:Admin`` on the engine)."""
        return Resource("system", "engine", who.principal.tenant)

    def schedule_action(request: Request, who: Caller, schedule_id: str, action: str,
                        call: Callable[[ActionSink], None], **details: Any) -> dict[str, Any]:
        access.require(request, who, SCHEDULE_PERMISSION, engine_resource(who))
        client = act(who)
        try:
            known_ids = client.schedules()
        except KflowError as e:
            raise ApiError(503, f"cannot read the schedules: {e}") from None
        if schedule_id not in known_ids:
            raise ApiError(404, f"no schedule {schedule_id!r}")
        try:
            call(client)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        except KflowError as e:
            raise ApiError(503, f"cannot send the command: {e}") from None
        done(request, who, f"schedule_{action}", Resource("system", f"schedule:{schedule_id}", who.principal.tenant),
             **details)
        return {"id": schedule_id, "action": action, "accepted": True}

    @app.post("/api/schedules/{schedule_id}/pause", tags=["schedules"], status_code=202, summary="Pause a schedule")
    def pause_schedule(request: Request, schedule_id: str, body: Optional[NoteBody] = None,
                       who: Caller = Who) -> dict[str, Any]:
        note = (body or NoteBody()).note
        return schedule_action(request, who, schedule_id, "pause", lambda c: c.pause_schedule(schedule_id, note),
                               note=note)

    @app.post("/api/schedules/{schedule_id}/unpause", tags=["schedules"], status_code=202,
              summary="Unpause a schedule")
    def unpause_schedule(request: Request, schedule_id: str, body: Optional[NoteBody] = None,
                         who: Caller = Who) -> dict[str, Any]:
        note = (body or NoteBody()).note
        return schedule_action(request, who, schedule_id, "unpause", lambda c: c.unpause_schedule(schedule_id, note),
                               note=note)

    @app.post("/api/schedules/{schedule_id}/trigger", tags=["schedules"], status_code=202,
              summary="Start a run of a schedule now")
    def trigger_schedule(request: Request, schedule_id: str, body: Optional[TriggerBody] = None,
                         who: Caller = Who) -> dict[str, Any]:
        overlap = (body or TriggerBody()).overlap
        return schedule_action(request, who, schedule_id, "trigger",
                               lambda c: c.trigger_schedule(schedule_id, overlap), overlap=overlap)

    # -- incidents ------------------------------------------------------------------------------

    def resolve_verdict(who: Caller, role: Optional[str], resource: Resource, *,
                        catch_up: bool = True) -> tuple[bool, str]:
        """Whether ``who`` may resolve an incident whose step names ``role`` (the engine's rule: that
        role in the instance's tenant, or system_admin; with no role, ``instance:Manage``)."""
        if not access.enabled:
            return True, "auth is off"
        if role:
            if access.is_admin(who):
                return True, "role 'system_admin' allows everything"
            if role in access.roles(who) and who.principal.tenant == resource.tenant:
                return True, f"role {role!r} resolves the incident"
            return False, (f"expected role {role!r} (named by the incident's step) or 'system_admin' to resolve "
                           f"incidents of {resource.id!r}, but {who.principal.name!r} of tenant "
                           f"{who.principal.tenant!r} has {', '.join(sorted(access.roles(who))) or 'no roles'}")
        verdict = access.verdict(who, "instance:Manage", resource, catch_up=catch_up)
        return verdict.allowed, verdict.reason

    @app.get("/api/incidents", tags=["incidents"], summary="Open incidents (oldest first)")
    def list_incidents(request: Request, workflow: Optional[str] = Query(None, description="Workflow name."),
                       role: Optional[str] = Query(None, description="Only incidents whose step names this role."),
                       tenant: Optional[str] = Query(None, description="Tenant."),
                       who: Caller = Who) -> dict[str, Any]:
        tenant = tenant_scope(request, who, tenant)
        if tenant == "":
            return {"items": []}
        states = store.incident_states(InstanceFilter(workflow=workflow or None, tenant=tenant or None))
        by_id = {st["instance_id"]: st for st in states}
        items = incident_rows(states, role or None)
        for row in items:
            st = by_id[row["instance_id"]]
            resource = instance_resource(row["instance_id"], st)
            row["allowed"] = resolve_verdict(who, row["role"], resource, catch_up=False)[0]
        return {"items": items}

    @app.post("/api/instances/{instance_id}/incidents/{incident_id}", tags=["incidents"], status_code=202,
              summary="Resolve an open incident: retry, skip or fail")
    def resolve_incident(request: Request, instance_id: str, incident_id: str, body: ResolveBody,
                         who: Caller = Who) -> dict[str, Any]:
        row = store.get_instance(instance_id)
        if row is None:
            raise ApiError(404, f"no workflow instance with id {instance_id!r}")
        target = instance_resource(instance_id, row)
        access.require(request, who, "status", target)
        open_ = (row.get("internal") or {}).get("incidents") or {}
        inc = open_.get(incident_id)
        if not isinstance(inc, dict):
            raise ApiError(404, f"instance {instance_id!r} ({row['status']}) has no open incident {incident_id!r} "
                                f"(open: {', '.join(sorted(open_)) or 'none'})")
        allowed_, reason = resolve_verdict(who, inc.get("role"), target)
        if not allowed_:
            access.record(request, who, "resolve_incident", target, "denied", {"reason": reason, "code": "Forbidden"})
            raise ApiError(403, f"forbidden: {reason}")
        by = who.principal.name if access.enabled else "console"
        try:
            act(who).resolve_incident(instance_id, incident_id, body.action, output=body.output,
                                      input_patch=body.input_patch, reason=body.reason, by=by)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        done(request, who, "resolve_incident", target, incident_id=incident_id, resolution=body.action)
        return {"id": instance_id, "incident_id": incident_id, "action": body.action, "accepted": True}

    # -- limits and queues ----------------------------------------------------------------------

    @app.get("/api/limits", tags=["limits"],
             summary="Quota and limit counters (in use / allowed / queued) and queued work by priority level")
    def list_limits(request: Request, who: Caller = Who) -> dict[str, Any]:
        access.require(request, who, "list", Resource("instance", "*", who.principal.tenant))
        states = store.objects("limit")
        if not access.is_admin(who):  # a tenant sees the counters keyed by its own name (its quotas)
            states = [st for st in states if limit_key_part(st) == who.principal.tenant]
        return {"levels": queued_by_level(states), "items": limit_rows(states)}

    # -- webhook subscriptions ------------------------------------------------------------------

    @app.get("/api/subscriptions", tags=["subscriptions"],
             summary="Webhook subscriptions with their recent deliveries (from the delivery processes)")
    def list_subscriptions(request: Request, who: Caller = Who) -> dict[str, Any]:
        access.require(request, who, "system:View", Resource("system", "subscriptions", who.principal.tenant))
        if subscriptions is None:
            raise ApiError(503, "this server does not read the subscriptions")
        try:
            return subscriptions()
        except KflowError as e:
            raise ApiError(503, f"cannot read the subscriptions: {e}") from None

    # -- audit ----------------------------------------------------------------------------------

    @app.get("/api/audit", tags=["audit"], summary="The audit trail (oldest first; the latest `limit` records)")
    def audit(request: Request,
              principal: Optional[str] = Query(None, description="Only this principal's records."),
              outcome: Optional[str] = Query(None, pattern="^(granted|denied|success)$",
                                             description="granted, denied or success."),
              action: Optional[str] = Query(None, description="Only this operation (start, cancel, login ...)."),
              resource_id: Optional[str] = Query(None, description="Only records on this resource id."),
              since: Optional[str] = Query(None, description="Epoch ms or ISO 8601: only records from then on."),
              limit: int = Query(200, ge=1, le=10_000), who: Caller = Who) -> dict[str, Any]:
        access.require(request, who, "system:View", Resource("system", "audit", who.principal.tenant))
        if audit_reader is None or not access.enabled:
            raise ApiError(503, "the audit trail is served only with auth on (KFLOW_AUTH=on)")
        since_ms = parse_time(since, "since")
        try:
            records = audit_reader(since_ms=since_ms, principal=principal or None, outcome=outcome)
        except KflowError as e:
            raise ApiError(503, f"cannot read the audit trail: {e}") from None
        admin = access.is_admin(who)
        items = [r.model_dump() for r in records
                 if (admin or r.tenant == who.principal.tenant) and (action is None or r.action == action)
                 and (resource_id is None or r.resource_id == resource_id)]
        return {"items": items[-limit:]}

    # -- live, stats, operations ----------------------------------------------------------------

    @app.get("/api/stream", tags=["live"], summary="Server-sent events: changed instance ids")
    async def stream(request: Request, instance: Optional[str] = None, who: Caller = Who) -> StreamingResponse:
        # another tenant's instance ids are not shown: a caller that may not see every tenant is
        # told that something changed (ids null), and refreshes what it may read
        show_ids = access.is_admin(who)

        async def gen() -> AsyncIterator[bytes]:
            seen = changes.version
            yield b"retry: 2000\n\n"
            idle = 0.0
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
                idle += 0.25
                current, ids = changes.since(seen)
                if current == seen:
                    if idle >= 15:
                        idle = 0.0
                        yield b": keep-alive\n\n"
                    continue
                seen, idle = current, 0.0
                if ids is not None and instance is not None and instance not in ids:
                    continue
                shown = None if ids is None or not show_ids else sorted(ids)[:200]
                payload = {"version": current, "ids": shown}
                yield b"event: change\ndata: " + orjson.dumps(payload) + b"\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/stats", tags=["live"], summary="Store size and projection lag")
    def stats(who: Caller = Who) -> dict[str, Any]:
        return {"instances": store.total(), "lag": lag(), "version": changes.version, "ready": ready()}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> PlainTextResponse:
        ok = ready()
        return PlainTextResponse("ready\n" if ok else "not ready\n", status_code=200 if ok else 503)

    # -- the console ----------------------------------------------------------------------------

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        # the console builds its pages from text nodes; the policy also refuses any script or
        # handler an injected string could smuggle in
        return FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'self'; object-src 'none'; "
                                       "base-uri 'none'; frame-ancestors 'none'; img-src 'self' data:; "
                                       "style-src 'self' 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    return app
