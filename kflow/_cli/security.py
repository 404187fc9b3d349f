"""``kflow token issue|hash-password|apikey``, ``kflow policy check|validate|apply`` and ``kflow audit list``.

``token issue``, ``policy check`` and ``policy validate`` work offline: a token is signed with the
local keys (``KFLOW_JWT_SECRET`` or ``KFLOW_SIGNING_KEY``), and a policy is checked from its file
exactly as the engines evaluate it. ``policy apply`` produces a validated policy to the
``policies`` topic (signed with ``KFLOW_TOKEN``), where every engine picks it up; ``audit list``
reads the ``audit`` topic.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, describe, dump_json, fail, setup_logging
from kflow.config import KafkaConfig
from kflow.model.errors import KflowError
from kflow.model.spec import parse_duration_ms
from kflow.security.policy import Policy, Resource, evaluate, load_policy
from kflow.security.principal import DEFAULT_TENANT, Principal
from kflow.security.tokens import Keys, issue
from kflow.streams.policies import publish_policy
from kflow.visibility.audit_log import read_audit

__all__ = ["audit_app", "policy_app", "token_app"]

#: Exit code of ``policy check`` when it cannot answer (0 is granted, 1 denied).
EXIT_CHECK_ERROR = 2

token_app = typer.Typer(help="Mint signed tokens for operators, services and tests.", no_args_is_help=True)
policy_app = typer.Typer(help="Validate policy files, check what they allow, and apply them.", no_args_is_help=True)
audit_app = typer.Typer(help="Read the audit trail: who did what, granted or denied.", no_args_is_help=True)

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


@token_app.command("hash-password")
def hash_password_(password: Annotated[Optional[str], typer.Option(
        "--password", help="The password (default: asked for without echo; prefer that, it stays out of "
                           "the shell history).")] = None) -> None:
    """Print the argon2id hash of a console user's password, for the users file (KFLOW_USERS_FILE).

    The users file lists each user with this hash, its tenant and its roles:

        users:
          - {username: alice, password_hash: "$argon2id$...", tenant: acme, roles: [operator]}

    Example: kflow token hash-password
    """
    from kflow.security.http import hash_password

    if password is None:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        typer.echo(hash_password(password))
    except ValueError as exc:
        fail(describe(exc))


@token_app.command("apikey")
def apikey(principal: PrincipalOpt, tenant: TenantOpt = DEFAULT_TENANT, roles: RolesOpt = None) -> None:
    """Mint an API key: prints the key (hand it over; it is shown once) and the line for the API keys file.

    The API keys file (KFLOW_API_KEYS_FILE) holds only the key's SHA-256 hash; append the printed
    entry under `api_keys:`. Callers present the key in the X-API-Key header.

    Example: kflow token apikey --principal ci --tenant acme --roles deployer
    """
    from kflow.security.http import mint_api_key

    try:
        key, entry = mint_api_key(principal, tenant, _split(roles))
    except ValueError as exc:
        fail(describe(exc))
    typer.echo(f"key: {key}")
    typer.echo("api keys file entry (under api_keys:):")
    typer.echo("  - " + dump_json(entry))


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


@policy_app.command("apply")
def apply(file: Annotated[Path, typer.Argument(help="The policy YAML file.")], bootstrap: Bootstrap = None,
          prefix: Prefix = None, verbose: Verbose = False) -> None:
    """Validate a policy file and make it the policy every engine enforces, without a restart.

    It is produced to the policies topic with its audit record, signed as KFLOW_TOKEN's principal
    (engines with auth on accept it from role system_admin, or system:Admin in the default tenant).

    Example: kflow policy apply policy.yaml
    """
    setup_logging(verbose)
    try:
        policy = load_policy(file)
        config = _config(bootstrap, prefix)
        offset = publish_policy(config, policy, f"cli:{socket.gethostname()}")
    except (KflowError, OSError) as exc:
        fail(describe(exc))
    typer.echo(f"{file}: applied ({_summary(policy)}) at offset {offset}")
    if config.token is None:
        typer.echo("warning: not signed (KFLOW_TOKEN is not set): engines with auth on ignore it", err=True)


@audit_app.callback()
def _audit() -> None:
    """Read the audit trail (the audit topic): who did what, granted or denied."""


@audit_app.command("list")
def audit_list(principal: Annotated[Optional[str], typer.Option("--principal", "-p",
                                                                help="Only this principal's records.")] = None,
               since: Annotated[Optional[str], typer.Option("--since", metavar="DUR",
                                                            help="Only records of the last DUR: 30m, 24h, 7d.")] = None,
               outcome: Annotated[Optional[Literal["granted", "denied", "success"]], typer.Option(
                   "--outcome", "-o", help="Only the records with this outcome.")] = None,
               limit: Annotated[int, typer.Option("--limit", min=1, help="Most records to show (the latest).")] = 1000,
               as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
               bootstrap: Bootstrap = None, prefix: Prefix = None, verbose: Verbose = False) -> None:
    """List audit records, oldest first: time, outcome, principal, tenant, action, resource and why.

    Example: kflow audit list --outcome denied --since 1h
    """
    setup_logging(verbose)
    try:
        since_ms = int(time.time() * 1000) - parse_duration_ms(since) if since else None
        records = read_audit(_config(bootstrap, prefix), since_ms=since_ms, principal=principal, outcome=outcome)
    except (KflowError, ValueError) as exc:
        fail(describe(exc))
    for r in records[-limit:]:
        if as_json:
            typer.echo(dump_json(r.model_dump()))
            continue
        why = r.details.get("reason") or r.details.get("rule") or r.details.get("why") or ""
        typer.echo(f"{_when(r.time)}  {r.outcome:<7}  {r.principal or '-'}@{r.tenant}  {r.action} "
                   f"{r.resource_type}:{r.resource_id}  {why}")


def _config(bootstrap: Optional[str], prefix: Optional[str]) -> KafkaConfig:
    kw: dict[str, Any] = {}
    if bootstrap:
        kw["bootstrap"] = bootstrap
    if prefix:
        kw["topic_prefix"] = prefix
    return KafkaConfig(**kw)


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _split(roles: Optional[str]) -> list[str]:
    return [r.strip() for r in (roles or "").split(",") if r.strip()]


def _summary(policy: Policy) -> str:
    bindings = sum(len(p) for p in policy.bindings.values())
    grants = sum(len(g) for principals in policy.grants.values() for g in principals.values())
    return f"{len(policy.roles)} role(s), {bindings} binding(s), {grants} grant(s)"
