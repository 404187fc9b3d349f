"""Authorization: a YAML policy of roles, bindings and grants, and the one order it is evaluated in.

A permission is a verb over a resource type (``instance:Execute``). A policy declares roles
(name → permissions, ``definition:*`` for every verb), binds principals to roles per tenant, and
grants permissions to principals directly (``instance:Execute``) or on one resource only
(``instance:Manage:order-42``; an operation name from :data:`ACTIONS` may stand for its
permission, as in ``instance:cancel:order-42``). :func:`evaluate` answers in exactly this order:

1. role ``system_admin`` allows everything, in every tenant;
2. tenant isolation denies acting on another tenant's resource;
3. the owner of a resource holds every permission on it;
4. role grants; 5. direct grants; 6. resource-specific grants;
7. otherwise deny.

Evaluation is pure and total over valid inputs; a policy that does not validate is refused as a
whole by :func:`parse_policy` / :func:`load_policy` with every problem listed at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    ValidationError,
)

from kflow.model.errors import KflowError
from kflow.security.principal import DEFAULT_TENANT, SYSTEM_ADMIN, Principal

__all__ = [
    "ACTIONS",
    "RESOURCE_TYPES",
    "VERBS",
    "Grant",
    "Permission",
    "Policy",
    "PolicyError",
    "Principal",
    "Resource",
    "Verdict",
    "evaluate",
    "load_policy",
    "parse_grant",
    "parse_policy",
    "permission_for",
]

#: Permission verbs, in the order the documentation lists them.
VERBS = ("View", "Create", "Edit", "Delete", "Execute", "Manage", "Admin")
#: Kinds of resource a permission applies to.
RESOURCE_TYPES = ("definition", "instance", "activity", "system")
_WILDCARD = "*"
_VERB_BY_LOWER = {v.lower(): v for v in VERBS}


@dataclass(frozen=True, slots=True)
class Permission:
    """One verb over one resource type, written ``instance:Execute``."""

    resource_type: str
    verb: str

    def __str__(self) -> str:
        return f"{self.resource_type}:{self.verb}"


#: The permission each operation needs. ``deploy`` is deploying a new definition,
#: ``deploy_version`` a new version of an existing one.
ACTIONS: Mapping[str, Permission] = MappingProxyType({
    "deploy": Permission("definition", "Create"),
    "deploy_version": Permission("definition", "Edit"),
    "start": Permission("definition", "Execute"),
    "signal": Permission("instance", "Execute"),
    "update": Permission("instance", "Execute"),
    "query": Permission("instance", "Execute"),
    "status": Permission("instance", "View"),
    "list": Permission("instance", "View"),
    "history": Permission("instance", "View"),
    "cancel": Permission("instance", "Manage"),
    "terminate": Permission("instance", "Manage"),
    "suspend": Permission("instance", "Manage"),
    "resume": Permission("instance", "Manage"),
    "retry": Permission("instance", "Manage"),
    "dlq_replay": Permission("system", "Admin"),
    "policy_apply": Permission("system", "Admin"),
    "limits_apply": Permission("system", "Admin"),
})


@dataclass(frozen=True, slots=True)
class Grant:
    """A permission (``*`` for every resource type or verb), optionally on one resource only."""

    resource_type: str
    verb: str
    resource_id: str | None = None

    def covers(self, perm: Permission) -> bool:
        """Whether this grant includes ``perm`` (whatever resource it is limited to)."""
        return self.resource_type in (_WILDCARD, perm.resource_type) and self.verb in (_WILDCARD, perm.verb)

    def __str__(self) -> str:
        base = f"{self.resource_type}:{self.verb}"
        return base if self.resource_id is None else f"{base}:{self.resource_id}"


@dataclass(frozen=True, slots=True)
class Resource:
    """What an operation acts on.

    Attributes:
        type: One of :data:`RESOURCE_TYPES`.
        id: The definition name, instance id, activity id, or the system object (``dlq``, ``policy``).
        tenant: The tenant it belongs to.
        owner: The principal that deployed (definition) or started (instance) it, if known.
    """

    type: str
    id: str
    tenant: str = DEFAULT_TENANT
    owner: str | None = None

    def __post_init__(self) -> None:
        if self.type not in RESOURCE_TYPES:
            raise ValueError(f"expected a resource type in {', '.join(RESOURCE_TYPES)}, but got {self.type!r}")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer of :func:`evaluate`: allowed or not, and the rule that decided, in words."""

    allowed: bool
    reason: str


# --------------------------------------------------------------------------- grammar


def parse_grant(text: str) -> Grant:
    """Parse ``TYPE:VERB`` or ``TYPE:VERB:ID``; VERB may be ``*``, any case, or an operation of :data:`ACTIONS`.

    Raises:
        ValueError: what is wrong with ``text``.
    """
    parts = text.split(":", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"expected TYPE:VERB or TYPE:VERB:ID (e.g. 'instance:Execute'), but got {text!r}")
    rtype, word = parts[0].lower(), parts[1]
    rid = parts[2] if len(parts) == 3 else None
    if rtype != _WILDCARD and rtype not in RESOURCE_TYPES:
        raise ValueError(f"{text!r}: unknown resource type {parts[0]!r} (expected {', '.join(RESOURCE_TYPES)} or *)")
    if rid is not None and rid in ("", _WILDCARD):
        raise ValueError(f"{text!r}: a resource id must be named; '{rtype}:{word}' already covers every resource")
    verb = _WILDCARD if word == _WILDCARD else _VERB_BY_LOWER.get(word.lower())
    if verb is None:
        action = ACTIONS.get(word)
        if action is None:
            raise ValueError(f"{text!r}: unknown verb or operation {word!r} (verbs: {', '.join(VERBS)}, *; "
                             f"operations: {', '.join(ACTIONS)})")
        if rtype != action.resource_type:
            raise ValueError(f"{text!r}: operation {word!r} acts on {action.resource_type} resources, not on {rtype!r}")
        verb = action.verb
    return Grant(rtype, verb, rid)


def permission_for(action: str, resource_type: str) -> Permission:
    """The permission ``action`` needs on a resource of ``resource_type``.

    ``action`` is an operation of :data:`ACTIONS` or a permission written ``TYPE:VERB``.

    Raises:
        ValueError: an unknown action, or one that does not act on ``resource_type``.
    """
    perm = ACTIONS.get(action)
    if perm is None:
        try:
            grant = parse_grant(action)
        except ValueError:
            grant = None
        if grant is None or grant.resource_id is not None or _WILDCARD in (grant.resource_type, grant.verb):
            raise ValueError(f"unknown action {action!r} (expected one of {', '.join(ACTIONS)}, or TYPE:VERB "
                             f"such as 'instance:View')") from None
        perm = Permission(grant.resource_type, grant.verb)
    if perm.resource_type != resource_type:
        raise ValueError(f"action {action!r} acts on {perm.resource_type} resources, but the resource is of type "
                         f"{resource_type!r}")
    return perm


# --------------------------------------------------------------------------- the policy


def _any_grant(value: Any) -> Grant:
    if isinstance(value, Grant):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a permission string like 'instance:Execute', but got {type(value).__name__}")
    return parse_grant(value)


def _role_grant(value: Any) -> Grant:
    grant = _any_grant(value)
    if grant.resource_id is not None:
        raise ValueError(f"{str(grant)!r}: a role grants a permission over a resource type; grant one resource "
                         "to a principal under 'grants'")
    return grant


_Name = Annotated[str, StringConstraints(min_length=1)]
_AnyGrant = Annotated[Grant, PlainValidator(_any_grant), PlainSerializer(str)]
_RoleGrant = Annotated[Grant, PlainValidator(_role_grant), PlainSerializer(str)]


class Policy(BaseModel):
    """A policy file: roles, per-tenant bindings, per-tenant grants.

    Example (YAML)::

        roles:
          operator: [instance:View, instance:Manage]
          developer: [definition:*]
        bindings:            # tenant -> principal -> roles
          acme: {alice: [operator], ci: [developer]}
        grants:              # tenant -> principal -> permissions
          acme: {bob: [instance:Execute, instance:cancel:order-42]}
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    roles: dict[_Name, tuple[_RoleGrant, ...]] = {}
    """Role name → the permissions it grants (over resource types, never one resource)."""
    bindings: dict[_Name, dict[_Name, tuple[_Name, ...]]] = {}
    """Tenant → principal → role names (declared roles or ``system_admin``)."""
    grants: dict[_Name, dict[_Name, tuple[_AnyGrant, ...]]] = {}
    """Tenant → principal → permissions granted directly, or on one resource (``TYPE:VERB:ID``)."""

    def roles_of(self, principal: Principal) -> frozenset[str]:
        """The principal's roles: those its token carries plus those bound to it in its tenant."""
        bound = self.bindings.get(principal.tenant, {}).get(principal.name, ())
        return principal.roles.union(bound)

    def grants_of(self, principal: Principal) -> tuple[Grant, ...]:
        """The permissions granted to the principal in its tenant."""
        return self.grants.get(principal.tenant, {}).get(principal.name, ())


class PolicyError(KflowError):
    """A policy does not validate; ``problems`` lists every problem, each as ``where: what``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        super().__init__(f"invalid policy {source} ({count}): " + "; ".join(problems))


def parse_policy(data: Any, source: str = "policy") -> Policy:
    """Validate a policy document (the YAML's data); an empty document is the deny-all policy.

    Raises:
        PolicyError: listing every problem, including bindings to undeclared roles.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(source, [f"expected a mapping with roles, bindings and grants, but got {type(data).__name__}"])
    problems: list[str] = []
    policy = None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        problems += [_describe(err) for err in exc.errors()]
    problems += _reference_problems(data)
    if problems or policy is None:
        raise PolicyError(source, problems)
    return policy


def load_policy(path: str | Path) -> Policy:
    """Read and validate a YAML policy file.

    Raises:
        PolicyError: the file is not YAML or does not validate (every problem listed).
        OSError: the file cannot be read.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise PolicyError(str(path), [f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"]) from None
    return parse_policy(data, str(path))


#: Plainer words for the pydantic errors a hand-written policy file meets most.
_MESSAGES = {"tuple_type": "expected a list", "list_type": "expected a list", "dict_type": "expected a mapping",
             "string_type": "expected a string", "string_too_short": "expected a non-empty name"}


def _describe(err: Any) -> str:
    """One pydantic error as ``roles.operator[1]: what``."""
    where = "".join(_loc_part(p) for p in err["loc"]).lstrip(".") or "policy"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown field (expected {', '.join(Policy.model_fields)})"
    msg = _MESSAGES.get(err["type"]) or err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}"


def _loc_part(part: Any) -> str:
    """A list index as ``[i]``, a name as ``.name`` (an empty one as ``.""``); pydantic's ``[key]`` marker adds nothing."""
    if isinstance(part, int):
        return f"[{part}]"
    if part == "[key]":
        return ""
    return f".{part}" if part else '.""'


def _reference_problems(data: dict[str, Any]) -> list[str]:
    """Role names used wrongly: redefining ``system_admin``, binding an undeclared role.

    Checked on the raw document, so they are reported even when other parts fail to validate.
    """
    roles, bindings = data.get("roles"), data.get("bindings")
    declared = set(roles) if isinstance(roles, dict) else set()
    out = []
    if SYSTEM_ADMIN in declared:
        out.append(f"roles.{SYSTEM_ADMIN}: role {SYSTEM_ADMIN!r} is built in (it allows everything) and cannot "
                   "be redefined")
    declared.add(SYSTEM_ADMIN)
    for tenant, principals in (bindings.items() if isinstance(bindings, dict) else ()):
        for name, names in (principals.items() if isinstance(principals, dict) else ()):
            for i, role in enumerate(names if isinstance(names, list) else ()):
                if isinstance(role, str) and role and role not in declared:
                    out.append(f"bindings.{tenant}.{name}[{i}]: unknown role {role!r} "
                               f"(declared: {', '.join(sorted(declared))})")
    return out


# --------------------------------------------------------------------------- evaluation


def evaluate(policy: Policy, principal: Principal, action: str, resource: Resource) -> Verdict:
    """Whether ``principal`` may perform ``action`` on ``resource``, and the rule that decided.

    Args:
        policy: The policy in force.
        principal: Who acts (its token roles count, plus its bindings in ``policy``).
        action: An operation of :data:`ACTIONS` (``cancel``) or a permission (``instance:Manage``).
        resource: What it acts on.

    Raises:
        ValueError: an unknown action, or one that does not act on this type of resource.
    """
    perm = permission_for(action, resource.type)
    what = f"{resource.type} {resource.id!r}"
    roles = policy.roles_of(principal)
    if SYSTEM_ADMIN in roles:
        return Verdict(True, f"role {SYSTEM_ADMIN!r} allows everything")
    if resource.tenant != principal.tenant:
        return Verdict(False, f"tenant isolation: {principal.name!r} of tenant {principal.tenant!r} cannot act on "
                              f"{what} of tenant {resource.tenant!r}")
    if resource.owner and resource.owner == principal.name:
        return Verdict(True, f"{principal.name!r} owns {what}")
    for role in sorted(roles):
        for grant in policy.roles.get(role, ()):
            if grant.covers(perm):
                return Verdict(True, f"role {role!r} grants {grant}")
    grants = policy.grants_of(principal)
    for grant in grants:
        if grant.resource_id is None and grant.covers(perm):
            return Verdict(True, f"direct grant {grant}")
    for grant in grants:
        if grant.resource_id == resource.id and grant.covers(perm):
            return Verdict(True, f"grant {grant} on {what}")
    return Verdict(False, f"expected a role, grant or ownership giving {perm} on {what}, but {principal.name!r} "
                          f"of tenant {principal.tenant!r} has none")
