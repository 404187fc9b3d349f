"""``kflow devices simulate``: run a simulated MQTT device fleet until Ctrl-C."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kflow._cli.common import Verbose, fail, setup_logging

app = typer.Typer(help="Simulated MQTT devices for trying the MQTT connector and triggers.", no_args_is_help=True)


@app.command("simulate")
def simulate(
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Number of devices (dev-000, dev-001, ...).")] = 10,
    prefix: Annotated[str, typer.Option("--prefix", help="Topic prefix ({prefix}/devices/{id}/...).")] = "kflow",
    host: Annotated[Optional[str], typer.Option("--host", help="MQTT broker host (default from KFLOW_MQTT_URL).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", min=1, max=65535, help="MQTT broker port.")] = None,
    delay: Annotated[float, typer.Option("--delay", min=0, help="Seconds a device takes to answer a command.")] = 0.2,
    fail_rate: Annotated[float, typer.Option("--fail-rate", min=0, max=1,
                                             help="Probability that a command is answered with an error.")] = 0.0,
    offline_rate: Annotated[float, typer.Option("--offline-rate", min=0, max=1,
                                                help="Probability that a device goes offline for a while on a command.")] = 0.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for reproducible failures.")] = None,
    verbose: Verbose = False,
) -> None:
    """Run COUNT simulated devices on an MQTT broker until SIGINT or SIGTERM.

    Each device publishes a retained online status (last will: offline), answers commands on
    {prefix}/devices/{id}/commands/+ after --delay seconds, fails some (--fail-rate), drops
    offline for a while on some (--offline-rate) and, after an `update`, reports
    {prefix}/devices/{id}/telemetry/updated.

    Example: kflow devices simulate --count 20 --prefix fleet --fail-rate 0.1 --seed 7
    """
    setup_logging(verbose)
    from kflow._cli.processes import run_until_signalled
    from kflow.config import TriggerConfig, load_config
    from kflow.connectors.mqtt import parse_mqtt_url
    from kflow.connectors.simulator import DeviceFleet

    default_host, default_port, _tls = parse_mqtt_url(load_config(TriggerConfig).mqtt_url)
    fleet = DeviceFleet(count, host=host or default_host, port=port or default_port, prefix=prefix, delay=delay,
                        fail_rate=fail_rate, offline_rate=offline_rate, seed=seed)
    try:
        fleet.start()
    except TimeoutError as exc:
        fail(str(exc))
    typer.echo(f"{count} devices online on mqtt://{fleet.host}:{fleet.port} under {prefix}/devices/; Ctrl-C stops",
               err=True)

    def run(stop) -> None:  # type: ignore[no-untyped-def]
        stop.wait()

    try:
        run_until_signalled(run, "devices")
    finally:
        fleet.stop()
        typer.echo(f"{fleet.commands_received()} command(s) received", err=True)
