"""The ``kflow`` command line: a typer app over the client, the engine, workers and the dev stack.

Commands live in :mod:`kflow._cli`; this module assembles them into :data:`app` and provides
:func:`main`, the console-script entry point.
"""

from __future__ import annotations

from typer import Typer

from kflow._cli import connect, devices, doctor, dlq, processes, replay, triggers, visibility, workflows
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


for _fn in (workflows.deploy, workflows.start, workflows.signal, workflows.cancel, workflows.terminate, workflows.status,
            workflows.result, processes.engine, processes.worker, processes.dev, processes.bench, replay.replay):
    app.command(_fn.__name__, cls=processes.DevCommand if _fn is processes.dev else None)(_fn)
app.command("query")(replay.query)
app.command("connect")(connect.connect)
app.command("doctor")(doctor.doctor)
app.command("visibility")(visibility.visibility)
app.command("list")(visibility.list_instances)
app.command("history")(visibility.history)
app.command("watch")(visibility.watch)
app.add_typer(dlq.app, name="dlq")
app.add_typer(devices.app, name="devices")
app.add_typer(triggers.app, name="triggers")


def main() -> None:
    """Console-script entry point (``kflow``); user modules import from the current folder, as with ``python -m``."""
    current_folder_on_path()
    app(prog_name="kflow")
