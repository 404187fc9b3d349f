"""Who acts, and how a refusal is reported: the two types every part of kflow's security shares.

A :class:`Principal` is what a verified token says about its bearer (name, tenant, roles); an
:class:`AuthError` is how authentication and authorization refuse, with a code the engine turns
into ``CommandRejected(code, reason)`` and an audit record, so callers branch on ``code`` and
never parse ``reason``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kflow.model.errors import KflowError

__all__ = ["DEFAULT_TENANT", "SYSTEM_ADMIN", "AuthCode", "AuthError", "Principal"]

#: The tenant of everything when auth is off, and of tokens minted without ``--tenant``.
DEFAULT_TENANT = "default"
#: The built-in role that is allowed everything, in every tenant.
SYSTEM_ADMIN = "system_admin"

#: ``Unauthenticated``: no valid proof of who sent it; ``Forbidden``: known, but not allowed.
AuthCode = Literal["Unauthenticated", "Forbidden"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated actor: a user, a service, a worker or a connector.

    Attributes:
        name: The principal's name (the token's ``sub``), unique within its tenant.
        tenant: The tenant it belongs to and may act in.
        roles: Role names the token carries; policy bindings may add more.
        on_behalf_of: Whom a service acts for (claim ``obo``): the engine signs the commands an
            instance causes (a child's start, say) as itself, on behalf of the instance's owner,
            so the child is owned by that owner. Honoured only for principals with role
            :data:`SYSTEM_ADMIN`.
    """

    name: str
    tenant: str = DEFAULT_TENANT
    roles: frozenset[str] = field(default_factory=frozenset)
    on_behalf_of: str | None = None


class AuthError(KflowError):
    """A request or command was refused; ``code`` says whether for identity or for permission.

    Attributes:
        code: ``Unauthenticated`` or ``Forbidden``.
        reason: What was wrong, in the form "expected ..., but ...", safe to log and to show the
            sender (it never contains a secret or a whole token).
    """

    def __init__(self, code: AuthCode, reason: str) -> None:
        self.code: AuthCode = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")
