"""``kflow triggers run``: start and signal workflows from Kafka records and MQTT messages."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, fail, setup_logging

app = typer.Typer(help="Start and signal workflows from Kafka and MQTT messages.", no_args_is_help=True)


@app.command("run")
def run(
    path: Annotated[str, typer.Argument(metavar="TRIGGERS.yaml", help="The triggers file.")],
    mqtt_url: Annotated[Optional[str], typer.Option("--mqtt-url", metavar="URL",
                                                    help="Default MQTT broker (KFLOW_MQTT_URL).")] = None,
    group: Annotated[Optional[str], typer.Option("--group", help="Consumer group of the Kafka sources "
                                                                 "(KFLOW_TRIGGER_GROUP).")] = None,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Run the triggers of TRIGGERS.yaml until SIGINT or SIGTERM.

    Each trigger reads a Kafka topic or an MQTT topic filter and, for every message its CEL
    `when` accepts, starts a workflow (instance id from `id`; a redelivered message never starts
    a second one) or signals the instance named by `instance`. Unmatched and failing messages go
    to the dlq topic with the reason.

    Example: kflow triggers run triggers.yaml --mqtt-url mqtt://broker:1883
    """
    setup_logging(verbose)
    from kflow._cli.processes import run_until_signalled
    from kflow.config import TriggerConfig, fit_to_cluster, load_config
    from kflow.connectors.triggers import TriggerConfigError, TriggerRunner, load_triggers

    overrides = {k: v for k, v in (("bootstrap", bootstrap), ("topic_prefix", prefix), ("mqtt_url", mqtt_url),
                                   ("trigger_group", group)) if v is not None}
    config = fit_to_cluster(load_config(TriggerConfig, **overrides))
    try:
        triggers = load_triggers(path)
    except TriggerConfigError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    runner = TriggerRunner(triggers, config, mqtt_url=config.mqtt_url, group_id=config.trigger_group or None)
    run_until_signalled(runner.run, "triggers")
