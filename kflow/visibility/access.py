"""Authentication, authorization and the audit trail of the visibility API, as FastAPI dependencies.

:class:`Access` is what every endpoint asks: who the caller is (:meth:`Access.caller`, 401 with
the reason when no valid credential is given; a cookie-authenticated POST must also bring its
CSRF token), whether the policy in force lets it perform an operation on a resource
(:meth:`Access.require`, 403 with the rule that denied), and what to write to the ``audit`` topic:
every denial and refusal, and every mutating operation that was carried out. With auth off,
every caller is the anonymous principal and is allowed everything, and nothing is audited: the
API behaves as it always has.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Optional

from kflow.security.audit import AuditOutcome, AuditRecord
from kflow.security.http import ANONYMOUS, CSRF_HEADER, Caller, HttpAuth
from kflow.security.policy import Policy, Resource, Verdict, evaluate
from kflow.security.principal import DEFAULT_TENANT, SYSTEM_ADMIN, AuthError

__all__ = ["Access", "ApiError"]

log = logging.getLogger("kflow.visibility")

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ApiError(Exception):
    """An error answered as ``{"error": message, "status": status}`` (with ``headers``, if any)."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def source_of(request: Any) -> str:
    """``http:<client ip> <user agent>`` of a request (for audit records)."""
    host = request.client.host if request.client else "?"
    agent = (request.headers.get("user-agent") or "")[:200]
    return f"http:{host} {agent}".rstrip()


class Access:
    """The auth decisions of one API server.

    Args:
        auth: The accepted credentials; None: auth is off.
        policy: Returns the policy in force.
        catch_up: Reads the policy table to its end (called once before a denial, so a grant
            applied just before the request counts).
        audit: Writes one audit record.
        clock: Epoch seconds.
    """

    def __init__(self, auth: Optional[HttpAuth] = None, policy: Callable[[], Policy] = Policy,
                 catch_up: Callable[[], Any] = lambda: None, audit: Callable[[AuditRecord], None] = lambda r: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.auth, self._policy, self._catch_up, self._audit, self.clock = auth, policy, catch_up, audit, clock

    @property
    def enabled(self) -> bool:
        return self.auth is not None

    # -- who ----------------------------------------------------------------------------------
    def caller(self, request: Any, *, audit_missing: bool = True) -> Caller:
        """The authenticated caller of ``request``.

        Raises:
            ApiError: 401 when the credentials are missing or do not verify; 403 when a
                cookie-authenticated POST lacks its CSRF token.
        """
        if self.auth is None:
            return ANONYMOUS
        try:
            caller = self.auth.authenticate(request.headers, request.cookies, self.clock())
        except AuthError as e:
            has_any = bool(request.headers.get("authorization") or request.headers.get("x-api-key")
                           or request.cookies)
            if audit_missing or has_any:
                self.record(request, None, "authenticate", Resource("system", "http"), "denied",
                            {"reason": e.reason, "code": "Unauthenticated"})
            raise ApiError(401, f"unauthenticated: {e.reason}", {"WWW-Authenticate": "Bearer"}) from None
        if caller.method == "session" and request.method not in _SAFE_METHODS:
            given = request.headers.get(CSRF_HEADER) or ""
            if not given or not hmac.compare_digest(given.encode("utf-8", "replace"),
                                                    (caller.csrf or "").encode("ascii")):
                reason = (f"expected the session's CSRF token in header {CSRF_HEADER}, but "
                          f"{'it is wrong' if given else 'there is none'}")
                self.record(request, caller, "csrf", Resource("system", "http", caller.principal.tenant), "denied",
                            {"reason": reason, "code": "Forbidden"})
                raise ApiError(403, f"forbidden: {reason}")
        return caller

    # -- may it ---------------------------------------------------------------------------------
    def is_admin(self, caller: Caller) -> bool:
        return self.auth is None or SYSTEM_ADMIN in self._policy().roles_of(caller.principal)

    def roles(self, caller: Caller) -> frozenset[str]:
        """The caller's roles: its credential's plus those the policy in force binds to it."""
        return frozenset() if self.auth is None else self._policy().roles_of(caller.principal)

    def verdict(self, caller: Caller, action: str, resource: Resource, *, catch_up: bool = True) -> Verdict:
        """Whether ``caller`` may ``action`` on ``resource`` (auth off: always).

        A denial is confirmed against the policies topic read to its end, unless ``catch_up`` is
        False (a hint, such as which buttons to show, where the policy in force is good enough).
        """
        if self.auth is None:
            return Verdict(True, "auth is off")
        verdict = evaluate(self._policy(), caller.principal, action, resource)
        if not verdict.allowed and catch_up:
            try:
                self._catch_up()
            except Exception:  # a policy table that cannot catch up leaves the policy in force as it is
                log.warning("cannot read the policies topic to its end", exc_info=True)
            verdict = evaluate(self._policy(), caller.principal, action, resource)
        return verdict

    def require(self, request: Any, caller: Caller, action: str, resource: Resource) -> Verdict:
        """The verdict allowing ``action``.

        Raises:
            ApiError: 403 with the reason (audited) when the policy denies it.
        """
        verdict = self.verdict(caller, action, resource)
        if not verdict.allowed:
            self.record(request, caller, action, resource, "denied", {"reason": verdict.reason, "code": "Forbidden"})
            raise ApiError(403, f"forbidden: {verdict.reason}")
        return verdict

    # -- the trail ------------------------------------------------------------------------------
    def record(self, request: Any, caller: Optional[Caller], action: str, resource: Resource, outcome: AuditOutcome,
               details: Optional[dict[str, Any]] = None) -> None:
        """Write an audit record of ``action`` by ``caller`` (None: nobody proven) on ``resource``."""
        if self.auth is None:
            return
        who = caller.principal if caller is not None else None
        record = AuditRecord(
            id=f"http:{uuid.uuid4().hex}", time=int(self.clock() * 1000), principal=who.name if who else "",
            tenant=who.tenant if who else resource.tenant, action=action, resource_type=resource.type,
            resource_id=resource.id, outcome=outcome,
            details={"method": request.method if request is not None else "",
                     "path": request.url.path if request is not None else "",
                     **({"via": caller.method} if caller is not None else {}), **(details or {})},
            source=source_of(request) if request is not None else "http")
        try:
            self._audit(record)
        except Exception:  # the answer goes out regardless; a lost record is logged loudly
            log.exception("cannot write the audit record %s", record.id)

    def refused(self, request: Any, status: int, message: str) -> None:
        """Audit a request refused for its input (400, 413, 422, 429) before any operation ran."""
        self.record(request, None, "request", Resource("system", "http", DEFAULT_TENANT), "denied",
                    {"reason": message, "status": status})
