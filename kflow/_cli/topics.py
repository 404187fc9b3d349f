"""``kflow topics ensure``: create kflow's topics (an operator's job: clients never create topics)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, setup_logging

app = typer.Typer(help="Create and check kflow's topics.", no_args_is_help=True)


@app.command("ensure")
def ensure(queue: Annotated[Optional[list[str]], typer.Option(
               "--queue", "-q", metavar="QUEUE", help="Also create the task topic of QUEUE (repeatable; `default` always).")] = None,
           partitions: Annotated[Optional[int], typer.Option(
               "--partitions", min=1, max=10_000, help="Partitions of instance-keyed topics (default KFLOW_PARTITIONS).")] = None,
           replication: Annotated[Optional[int], typer.Option(
               "--replication", min=1, help="Replication factor (default KFLOW_REPLICATION).")] = None,
           bootstrap: Bootstrap = None, prefix: Prefix = None, verbose: Verbose = False) -> None:
    """Create kflow's missing topics with their settings and check the existing ones.

    Engines do this at start-up; run it yourself where the engines, workers and clients run
    without the right to create topics (a Kafka ACL gives CREATE to the operator only). Existing
    topics are checked: a wrong partition count or cleanup policy is an error that says how to fix it.

    Example: kflow topics ensure --partitions 16 --queue payments
    """
    setup_logging(verbose)
    from kflow.config import KafkaConfig
    from kflow.streams.topics import ensure_topics, topic_specs

    overrides = {k: v for k, v in (("bootstrap", bootstrap), ("topic_prefix", prefix), ("partitions", partitions),
                                   ("replication", replication)) if v is not None}
    config = KafkaConfig(**overrides)
    queues = sorted({"default", *(queue or [])})
    ensure_topics(config.client_conf(), config.names, config.topic_settings, queues=queues)
    for spec in topic_specs(config.names, config.topic_settings, queues):
        typer.echo(f"{spec.name}: {spec.partitions} partitions, cleanup.policy={spec.cleanup_policy}")
