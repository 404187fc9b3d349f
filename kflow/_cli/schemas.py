"""``kflow schemas check``: is every topic's value schema of this kflow BACKWARD compatible with what
is registered, and with the previous release's?

One line per check: each topic's subject (``<topic>-value``) against the latest version in the
Schema Registry (``--registry`` or ``KFLOW_SCHEMA_REGISTRY_URL``; skipped without one) and against
the previous release's ``.avsc`` files shipped with kflow (or ``--previous DIR``). Nothing is
registered. Exit 1 when any check finds an incompatibility, with one line per problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kflow._cli.common import Prefix, Verbose, fail, setup_logging

__all__ = ["app", "check"]

app = typer.Typer(help="Check kflow's Avro schemas against a Schema Registry and the previous release.",
                  no_args_is_help=True)


@app.command("check")
def check(registry: Annotated[Optional[str], typer.Option(
              "--registry", envvar="KFLOW_SCHEMA_REGISTRY_URL", show_envvar=True, metavar="URL",
              help="Schema Registry to compare with (its subjects' latest versions); none: only the previous release.")] = None,
          previous: Annotated[Optional[Path], typer.Option(
              "--previous", metavar="DIR", exists=True, file_okay=False,
              help="Folder of the previous release's .avsc files (default: the ones shipped with kflow).")] = None,
          prefix: Prefix = None, verbose: Verbose = False) -> None:
    """Check that each topic's current schema reads what the registered and the previous release's schemas wrote.

    Compatibility is BACKWARD (Avro's schema resolution: the current schema is the reader). Task
    topics are checked for every ``<prefix>tasks.*`` subject the registry has, and ``tasks.default``.

    Example: kflow schemas check --registry http://localhost:8081
    """
    setup_logging(verbose)
    from kflow.model.errors import KflowError
    from kflow.schemas.registry import PREVIOUS_RELEASE, client_for, compatibility_report, previous_schemas, topic_kinds
    from kflow.streams.topics import TopicNames

    names = TopicNames("kflow." if prefix is None else prefix)
    topics = [names.commands, names.events, names.state, names.engine_state, names.definitions, names.tasks("default")]
    try:
        if registry:
            task_prefix = f"{names.prefix}tasks."
            topics += sorted(s.removesuffix("-value") for s in client_for(registry).get_subjects()
                             if s.startswith(task_prefix) and s.endswith("-value"))
        lines = compatibility_report(registry or None, topic_kinds(names, dict.fromkeys(topics)),
                                     previous_schemas(previous or PREVIOUS_RELEASE))
    except KflowError as exc:
        fail(str(exc))
    except Exception as exc:  # the registry client's own errors (unreachable, refused)
        fail(f"Schema Registry {registry}: {type(exc).__name__}: {exc}")
    for line in lines:
        typer.echo(line.text())
    bad = sum(1 for line in lines if line.problem is not None)
    if bad:
        fail(f"{bad} incompatible schema(s): nothing was registered")
    typer.echo(f"{len(lines)} checks: every schema is BACKWARD compatible")
