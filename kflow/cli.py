"""The ``kflow`` command line: a typer app over the client, the engine, workers and the dev stack.

Commands live in :mod:`kflow._cli`; this module assembles them into :data:`app` and provides
:func:`main`, the console-script entry point.
"""

from __future__ import annotations

from typing import Any

from typer import Typer

from kflow._cli import (
    batch,
    connect,
    devices,
    dlq,
    doctor,
    incidents,
    limits,
    migrate,
    processes,
    replay,
    schedules,
    schemas,
    security,
    subscriptions,
    topics,
    triggers,
    upgrade,
    visibility,
    workflows,
)
from kflow._cli.common import KflowGroup, Verbose, current_folder_on_path, setup_logging

__all__ = ["app", "main"]

app = Typer(
    name="kflow",
    cls=KflowGroup,
    help="kflow: durable workflows on Kafka. Deploy definitions, start and signal workflows, run engines and workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)


@app.callback()
def _root(verbose: Verbose = False) -> None:
    """kflow: durable workflows on Kafka.

    Every command reads --bootstrap from KFLOW_BOOTSTRAP and --prefix from KFLOW_TOPIC_PREFIX
    when they are not given.

    Example: kflow --help
    """
    setup_logging(verbose)


#: Commands in the order ``kflow --help`` shows them, grouped by what they act on.
_PANELS: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = (
    ("Instances", (("start", workflows.start), ("signal", workflows.signal), ("query", replay.query),
                   ("update", workflows.update),
                   ("cancel", workflows.cancel), ("terminate", workflows.terminate), ("suspend", workflows.suspend),
                   ("resume", workflows.resume), ("priority", limits.priority), ("retry", workflows.retry),
                   ("status", workflows.status),
                   ("result", workflows.result), ("history", visibility.history), ("list", visibility.list_instances),
                   ("watch", visibility.watch), ("incidents", incidents.list_incidents), ("migrate", migrate.migrate))),
    ("Definitions", (("deploy", workflows.deploy), ("replay", replay.replay), ("graph", incidents.graph))),
    ("Processes", (("engine", processes.engine), ("worker", processes.worker), ("connect", connect.connect),
                   ("visibility", visibility.visibility), ("dev", processes.dev))),
    ("Operations", (("doctor", doctor.doctor), ("bench", processes.bench), ("queues", limits.queues))),
)
for _panel, _commands in _PANELS:
    for _name, _fn in _commands:
        app.command(_name, rich_help_panel=_panel, cls=processes.DevCommand if _fn is processes.dev else None)(_fn)
app.add_typer(incidents.app, name="incident", rich_help_panel="Instances")
app.add_typer(topics.app, name="topics", rich_help_panel="Operations")
app.add_typer(dlq.app, name="dlq", rich_help_panel="Operations")
app.add_typer(security.token_app, name="token", rich_help_panel="Security")
app.add_typer(security.policy_app, name="policy", rich_help_panel="Security")
app.add_typer(security.audit_app, name="audit", rich_help_panel="Security")
app.add_typer(devices.app, name="devices", rich_help_panel="Processes")
app.add_typer(triggers.app, name="triggers", rich_help_panel="Processes")
app.add_typer(subscriptions.app, name="subscriptions", rich_help_panel="Processes")
app.add_typer(schedules.app, name="schedule", rich_help_panel="Definitions")
app.add_typer(batch.app, name="batch", rich_help_panel="Instances")
app.add_typer(limits.app, name="limits", rich_help_panel="Operations")
app.add_typer(schemas.app, name="schemas", rich_help_panel="Operations")
app.add_typer(upgrade.app, name="upgrade", rich_help_panel="Operations")

def main() -> None:
    """Console-script entry point (``kflow``); user modules import from the current folder, as with ``python -m``."""
    current_folder_on_path()
    app(prog_name="kflow")
