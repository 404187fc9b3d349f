"""``kflow limits`` and ``kflow queues``: declare quotas and activity limits, and see what waits for them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, fail, setup_logging

if TYPE_CHECKING:
    from kflow.client import Client

__all__ = ["app", "queues"]

app = typer.Typer(
    help="Quotas and activity limits, counted by the engines across every worker and engine process: max running "
         "instances per tenant or workflow, starts per second, in-flight attempts and rates per activity type "
         "(optionally per key). See docs/limits.md.",
    no_args_is_help=True)

_LEVELS = {1: "critical", 2: "high", 3: "normal", 4: "low", 5: "background"}


def _client(bootstrap: Optional[str], prefix: Optional[str], verbose: bool) -> Client:
    setup_logging(verbose)
    from kflow.client import Client

    return Client(bootstrap, topic_prefix=prefix)


def _describe(spec: Any) -> str:
    what = {"activity": f"activity {spec.match}", "workflow": f"workflow {spec.match}",
            "tenant": "every tenant" if spec.match == "*" else f"tenant {spec.match}"}[spec.scope]
    if spec.per:
        what += f" per {spec.per}"
    bounds = []
    if spec.max_concurrent is not None:
        bounds.append(f"{'in flight' if spec.scope == 'activity' else 'running'} <= {spec.max_concurrent}")
    if spec.rate is not None:
        bounds.append(f"{spec.rate:g}/s (bucket {spec.capacity:g})")
    policy = spec.policy if spec.policy != "burst" else f"burst(x{spec.burst_factor:g} for {spec.burst_ms / 1000:g}s)"
    return f"{spec.name}: {what}: {', '.join(bounds)}; {policy}"


@app.command("apply")
def apply(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A YAML (or JSON) file with a top-level `limits:` list.")],
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Make FILE the set of limits in force on every engine (it replaces the previous set).

    The file is validated first: a negative or zero limit, an unknown field, a bad rate or policy
    is one error listing every problem, and nothing is applied. Engines pick the new set up live;
    a counter applies a changed limit from its next request or release. With auth on the record
    is signed as KFLOW_TOKEN's principal, who needs role system_admin (or system:Admin in the
    default tenant): engines ignore limits anyone else wrote. It is audited either way.

    Example limits.yaml:

        limits:
          - {name: erp, activity: erp.post, per: plant, max_in_flight: 5, rate: 10/s}
          - {name: tenants, tenant: "*", max_running: 100}
          - {name: orders, workflow: order, max_running: 50, policy: burst(1.5, 5m)}
          - {name: starts, tenant: "*", starts_per_second: 20, policy: reject}

    Example: kflow limits apply limits.yaml
    """
    import yaml

    from kflow.engine.limits import LimitSpecError

    try:
        doc = yaml.safe_load(file.read_text())
    except OSError as e:
        fail(f"cannot read {file}: {e.strerror or e}")
    except yaml.YAMLError as e:
        fail(f"{file} is not valid YAML: {e}")
    from kflow.engine.limits import parse_limits

    try:
        parse_limits(doc, str(file))  # before connecting: bad input never needs a broker
    except LimitSpecError as e:
        fail(str(e))
    with _client(bootstrap, prefix, verbose) as client:
        specs = client.apply_limits(doc, str(file))
        unsigned = client.config.auth and client.config.token is None
    typer.echo(f"applied {len(specs)} limit(s) from {file}")
    for spec in specs:
        typer.echo(f"  {_describe(spec)}")
    if unsigned:
        typer.echo("warning: not signed (KFLOW_TOKEN is not set): engines with auth on ignore it", err=True)


@app.command("show")
def show(
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Print the limits in force (as the engines read them from the limits topic).

    Example: kflow limits show
    """
    from kflow.config import KafkaConfig
    from kflow.streams.limits import read_limits

    setup_logging(verbose)
    overrides = {k: v for k, v in (("bootstrap", bootstrap), ("topic_prefix", prefix)) if v}
    table = read_limits(KafkaConfig(**overrides))
    try:
        specs = table.all()
    finally:
        table.close()
    if not specs:
        typer.echo("no limits declared")
    for spec in specs:
        typer.echo(_describe(spec))


def queues(
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Print the work waiting for quotas and limits: queued by priority level, and per limit key
    (per tenant for tenant quotas) the permits used and allowed.

    Read from the state of every limit counter (the `state` topic, keys `limit:...`).

    Example: kflow queues
    """
    from rich.console import Console
    from rich.table import Table

    from kflow.engine.limits import limit_view
    from kflow.streams.limits import read_limits

    with _client(bootstrap, prefix, verbose) as client:
        counters = client.limit_counters()
        table = read_limits(client.config)
    try:
        by_level: dict[int, int] = {}
        rows = []
        for key in sorted(counters):
            state = counters[key]
            view = limit_view(state, table.get(state["limit"]))
            for level, n in view["queued_by_level"].items():
                by_level[int(level)] = by_level.get(int(level), 0) + n
            allowed = "-" if view["max"] is None else str(view["max"])
            rate = "-" if view["rate"] is None else f"{view['rate']:g}/s"
            part = key[len("limit:") + len(state["limit"]) + 1:] or "-"
            rows.append((state["limit"], part, f"{view['in_use']}", allowed, rate, str(view["queued"]), str(view["granted"]),
                         str(view["refused"])))
    finally:
        table.close()
    console = Console()
    levels = Table(title="queued by level")
    levels.add_column("level")
    levels.add_column("queued", justify="right")
    for level in sorted(_LEVELS):
        levels.add_row(f"{level} {_LEVELS[level]}", str(by_level.get(level, 0)))
    console.print(levels)
    usage = Table(title="limits (tenant quotas count per tenant, keyed limits per key)")
    for col in ("limit", "tenant/key", "used", "allowed", "rate", "queued", "granted", "refused"):
        usage.add_column(col, justify="left" if col in ("limit", "tenant/key") else "right", no_wrap=True)
    for row in rows:
        usage.add_row(*row)
    if not rows:
        console.print("no limit has been used yet")
    else:
        console.print(usage)


def priority(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    level: Annotated[str, typer.Argument(metavar="LEVEL", help="critical, high, normal, low, background (or 1-5).")],
    reason: Annotated[str, typer.Option("--reason", "-r", metavar="TEXT", help="Why (recorded in the event).")] = "",
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Change the priority level of a running (or queued) instance: a `PriorityChanged` event.

    Work not dispatched yet moves to the new level: a start or activity waiting for a quota is
    re-queued at it, retries and later steps are dispatched on the new level's task topic. Tasks
    already on a task topic stay where they are. An unknown level is an error and nothing is sent.

    Example: kflow priority order-42 critical --reason "customer escalation"
    """
    from kflow.model.messages import priority_level

    try:
        number = priority_level(level if not level.isdigit() else int(level))
    except ValueError as e:
        fail(str(e))
    with _client(bootstrap, prefix, verbose) as client:
        client.set_priority(id, number or 3, reason)
    typer.echo(f"priority {_LEVELS[number or 3]} requested for {id}")
