"""``kflow token issue`` and ``kflow policy check|validate``: mint tokens and try policies offline.

Nothing here talks to Kafka: a token is signed with the local keys (``KFLOW_JWT_SECRET`` or
``KFLOW_SIGNING_KEY``), and a policy is checked from its file exactly as the engines evaluate it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kflow._cli.common import Verbose, describe, fail, setup_logging
from kflow.model.errors import KflowError
from kflow.model.spec import parse_duration_ms
from kflow.security.policy import Policy, Resource, evaluate, load_policy
from kflow.security.principal import DEFAULT_TENANT, Principal
from kflow.security.tokens import Keys, issue

__all__ = ["policy_app", "token_app"]

#: Exit code of ``policy check`` when it cannot answer (0 is granted, 1 denied).
EXIT_CHECK_ERROR = 2

token_app = typer.Typer(help="Mint signed tokens for operators, services and tests.", no_args_is_help=True)
policy_app = typer.Typer(help="Validate policy files and check what they allow.", no_args_is_help=True)

PrincipalOpt = Annotated[str, typer.Option("--principal", "-p", help="The principal's name (the token's sub).")]
TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="The principal's tenant.")]
RolesOpt = Annotated[Optional[str], typer.Option("--roles", "-r", metavar="R[,R]", help="Comma-separated role names.")]


@token_app.callback()
def _token() -> None:
    """Mint signed tokens (needs KFLOW_JWT_SECRET or KFLOW_SIGNING_KEY)."""


@token_app.command("issue")
def issue_(principal: PrincipalOpt, tenant: TenantOpt = DEFAULT_TENANT, roles: RolesOpt = None,
           ttl: Annotated[str, typer.Option("--ttl", help="How long the token is valid: 30m, 1h, 7d.")] = "1h",
           verbose: Verbose = False) -> None:
    """Print a signed principal token (a JWT) to present as KFLOW_TOKEN or an HTTP bearer token.

    It is signed with KFLOW_SIGNING_KEY (an HS256 secret or a PEM private key file) or else
    KFLOW_JWT_SECRET (HS256), and names the principal, its tenant and roles.

    Example: kflow token issue --principal alice --tenant acme --roles operator --ttl 1h
    """
    setup_logging(verbose)
    try:
        token = issue(principal, tenant, _split(roles), parse_duration_ms(ttl) / 1000, Keys.from_env())
    except (KflowError, ValueError) as exc:
        fail(describe(exc))
    typer.echo(token)


@policy_app.command("check")
def check(file: Annotated[Path, typer.Option("--file", "-f", help="The policy YAML file.")],
          principal: PrincipalOpt,
          action: Annotated[str, typer.Option("--action", "-a", help="An operation (start, signal, cancel, deploy, "
                                                                     "dlq_replay, ...) or a permission TYPE:VERB.")],
          resource: Annotated[str, typer.Option("--resource", metavar="TYPE:ID",
                                                help="What it acts on, e.g. instance:order-42 or definition:order.")],
          tenant: TenantOpt = DEFAULT_TENANT, roles: RolesOpt = None,
          owner: Annotated[Optional[str], typer.Option("--owner", help="Who owns the resource.")] = None,
          resource_tenant: Annotated[Optional[str], typer.Option(
              "--resource-tenant", help="The resource's tenant (default: the principal's).")] = None,
          verbose: Verbose = False) -> None:
    """Say whether the policy grants ACTION on RESOURCE to PRINCIPAL, and which rule decided.

    Prints "granted: REASON" and exits 0, or "denied: REASON" and exits 1; exits 2 when it
    cannot answer (an invalid policy, action or resource).

    Example: kflow policy check --file policy.yaml --principal bob --tenant acme --action cancel --resource instance:order-42
    """
    setup_logging(verbose)
    try:
        policy = load_policy(file)
        rtype, sep, rid = resource.partition(":")
        if not sep or not rid:
            raise ValueError(f"expected --resource TYPE:ID (e.g. instance:order-42), but got {resource!r}")
        target = Resource(rtype, rid, resource_tenant or tenant, owner)
        verdict = evaluate(policy, Principal(principal, tenant, frozenset(_split(roles))), action, target)
    except (KflowError, ValueError, OSError) as exc:
        fail(describe(exc), EXIT_CHECK_ERROR)
    typer.echo(f"{'granted' if verdict.allowed else 'denied'}: {verdict.reason}")
    raise typer.Exit(0 if verdict.allowed else 1)


@policy_app.command("validate")
def validate(file: Annotated[Path, typer.Argument(help="The policy YAML file.")], verbose: Verbose = False) -> None:
    """Check a policy file and list every problem in it; exits 1 when there is any.

    Example: kflow policy validate policy.yaml
    """
    setup_logging(verbose)
    try:
        policy = load_policy(file)
    except (KflowError, OSError) as exc:
        fail(describe(exc))
    typer.echo(f"{file}: valid ({_summary(policy)})")


def _split(roles: Optional[str]) -> list[str]:
    return [r.strip() for r in (roles or "").split(",") if r.strip()]


def _summary(policy: Policy) -> str:
    bindings = sum(len(p) for p in policy.bindings.values())
    grants = sum(len(g) for principals in policy.grants.values() for g in principals.values())
    return f"{len(policy.roles)} role(s), {bindings} binding(s), {grants} grant(s)"
