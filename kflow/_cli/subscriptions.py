"""``kflow subscriptions``: declare webhook subscriptions to state changes, and run their delivery."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, dump_json, fail, setup_logging

__all__ = ["app"]

app = typer.Typer(help="Push state changes to HTTP endpoints (webhook subscriptions).", no_args_is_help=True)


def _config(bootstrap: Optional[str], prefix: Optional[str], **fields: Any) -> Any:
    from kflow.config import KafkaConfig, load_config

    given = {"bootstrap": bootstrap, "topic_prefix": prefix, **fields}
    overrides = {k: v for k, v in given.items() if v is not None}
    return load_config(KafkaConfig, **overrides)


@app.command("apply")
def apply(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The subscriptions file (YAML).")],
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Create or replace the subscriptions declared in FILE.

    Each subscription names an http(s) `url`, the environment variable holding its HMAC secret
    (`secret_env`, which must be set here too), an optional `filter` (workflows, statuses,
    tenant), `max_attempts`, `backoff` and `timeout`. Every problem of the file is reported at
    once, and then nothing is applied. Running delivery processes pick the change up at once.

    Example: kflow subscriptions apply subscriptions.yaml
    """
    setup_logging(verbose)
    from kflow.subscriptions import SubscriptionConfigError, apply_subscriptions, load_subscriptions

    try:
        subscriptions = load_subscriptions(file)
    except SubscriptionConfigError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")
    apply_subscriptions(_config(bootstrap, prefix), subscriptions)
    typer.echo(f"applied {len(subscriptions)} subscription(s): {', '.join(s.id for s in subscriptions)}")


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """List the subscriptions: where each one delivers, what it filters, where its secret comes from.

    Example: kflow subscriptions list --json
    """
    setup_logging(verbose)
    from kflow.subscriptions import read_subscriptions

    table = read_subscriptions(_config(bootstrap, prefix))
    for sid, sub in sorted(table.items()):
        if as_json:
            typer.echo(dump_json(sub.model_dump(mode="json")))
            continue
        f = sub.filter
        shown = [f"workflows={','.join(f.workflows)}" if f.workflows else "", f"statuses={','.join(f.statuses)}"
                 if f.statuses else "", f"tenant={f.tenant}" if f.tenant is not None else ""]
        typer.echo(f"{sid}  {sub.url}  {' '.join(s for s in shown if s) or 'every change'}  "
                   f"secret ${sub.secret_env}  max {sub.max_attempts} attempts")
    if not table and not as_json:
        typer.echo("no subscriptions")


@app.command("delete")
def delete(
    subscription_id: Annotated[str, typer.Argument(metavar="ID", help="The subscription's id.")],
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Delete the subscription ID: running delivery processes stop delivering to it at once.

    Example: kflow subscriptions delete orders-to-crm
    """
    setup_logging(verbose)
    from kflow.model.errors import KflowError
    from kflow.subscriptions import delete_subscription

    try:
        delete_subscription(_config(bootstrap, prefix), subscription_id)
    except KflowError as exc:
        fail(str(exc))
    typer.echo(f"deleted subscription {subscription_id}")


@app.command("run")
def run(
    group: Annotated[Optional[str], typer.Option(
        "--group", help="Consumer group on the state topic (default: the topic prefix and 'subscriptions', "
                        "e.g. kflow.subscriptions); processes sharing it share the partitions.")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(
        "--metrics-port", min=0, max=65535, envvar="KFLOW_METRICS_PORT", show_envvar=True, metavar="PORT",
        help="Port of /metrics, /healthz, /readyz and /subscriptions (default 9467; 0 disables).")] = None,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Deliver state changes to the subscriptions until SIGINT or SIGTERM.

    Every change a subscription matches is POSTed as JSON, signed (`X-Kflow-Signature: sha256=...`)
    and identified (`X-Kflow-Delivery`, the same on every retry): in order per instance, at least
    once, retried with backoff, and sent to the dlq topic after `max_attempts` failures.
    Subscriptions applied or deleted meanwhile take effect at once. `/subscriptions` on the
    operations port shows each subscription's last 100 deliveries.

    Example: kflow subscriptions run --metrics-port 9467
    """
    setup_logging(verbose)
    from kflow._cli.processes import run_until_signalled
    from kflow.config import fit_to_cluster
    from kflow.subscriptions import DEFAULT_METRICS_PORT, SubscriptionRunner, serve_operations

    config = fit_to_cluster(_config(bootstrap, prefix, metrics_port=metrics_port))
    runner = SubscriptionRunner(config, group_id=group)
    port = config.metrics_port if config.metrics_port is not None else DEFAULT_METRICS_PORT
    server = serve_operations(runner, port) if port else None
    try:
        run_until_signalled(runner.run, "subscriptions")
    finally:
        if server is not None:
            server.shutdown()
