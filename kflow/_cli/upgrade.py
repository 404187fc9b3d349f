"""``kflow upgrade engine-state``: carry a deployment's data over to what this release reads."""

from __future__ import annotations

from typing import Annotated

import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, describe, fail, setup_logging
from kflow.model.errors import KflowError

app = typer.Typer(help="Carry a deployment's data over to what this release reads.", no_args_is_help=True)


@app.command("engine-state")
def engine_state(dry_run: Annotated[bool, typer.Option("--dry-run", help="Read and report what would be copied; write nothing.")] = False,
                 bootstrap: Bootstrap = None, prefix: Prefix = None, verbose: Verbose = False) -> None:
    """Copy the engine's state of the instances an earlier release kept in `state` to `engine-state`.

    Releases before `engine-state` kept the engine's whole state of each instance inside its
    `state` record (field `internal`). This reads `state` and `engine-state` to their ends, and
    writes the latest state of every instance that `engine-state` does not have yet, on the same
    partition, one transaction per partition. Instances already on `engine-state` are left alone,
    so a second run copies nothing. Run it after stopping the engines of the earlier release and
    before starting this release's (which refuse to start until it has run).

    Example: kflow upgrade engine-state --dry-run
    """
    setup_logging(verbose)
    from kflow.config import KafkaConfig
    from kflow.streams.restore import upgrade_engine_state

    overrides = {k: v for k, v in (("bootstrap", bootstrap), ("topic_prefix", prefix)) if v is not None}
    config = KafkaConfig(**overrides)
    config.producer_conf()  # with a Schema Registry: its ids known, so framed records decode
    try:
        s = upgrade_engine_state(config.consumer_conf("kflow-upgrade"), config.producer_conf, config.names,
                                 dry_run=dry_run, echo=typer.echo)
    except KflowError as exc:
        fail(describe(exc))
    verb = "would copy" if dry_run else "copied"
    typer.echo(f"{verb} {s.copied} instance(s) to {config.names.engine_state}; {s.present} already there, "
               f"{s.without_internal} record(s) without internal, {s.deleted} deleted")
