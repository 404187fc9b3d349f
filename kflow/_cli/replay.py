"""``kflow replay``: check recorded histories against the code workflows of a module, before deploying it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, dump_json, fail, parse_json, setup_logging
from kflow.model.errors import KflowError

__all__ = ["query", "replay"]


def _histories(doc: Any) -> list[dict[str, Any]]:
    """A file holds one history (a list of events, or ``{"events": [...], "state": {...}}``) or a list of them."""
    if isinstance(doc, dict):
        return [doc]
    if isinstance(doc, list) and doc and isinstance(doc[0], list):
        return [{"events": h} for h in doc]
    if isinstance(doc, list) and doc and isinstance(doc[0], dict) and "events" in doc[0]:
        return doc
    return [{"events": doc}]


def replay(
    workflows: Annotated[Optional[str], typer.Option("--workflows", metavar="MODS",
                                                     help="Comma-separated modules of code workflows (the new code).")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", metavar="FILE", exists=True, dir_okay=False,
                                                 help="JSON history: a list of events, {events, state}, or a list of those.")] = None,
    instances: Annotated[Optional[list[str]], typer.Option("--instance", "-i", metavar="ID",
                                                           help="Read this instance's history from the events topic (repeatable).")] = None,
    workflow: Annotated[Optional[str], typer.Option("--workflow", metavar="NAME[@VERSION]",
                                                    help="Replay with this workflow instead of the one the history started.")] = None,
    definition: Annotated[Optional[Path], typer.Option(
        "--definition", "-d", metavar="FILE", exists=True, dir_okay=False,
        help="A spec workflow version (YAML/JSON, not deployed) to replay the --where instances' histories on.")] = None,
    where: Annotated[Optional[str], typer.Option(
        "--where", "-q", metavar="QUERY", help="With --definition, or --workflows and --workflow: which instances "
                                               "(as for `kflow batch`; workflow= is the target's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --definition: one JSON report per instance.")] = False,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Replay recorded histories against code workflows, or a new spec version, and fail on non-determinism.

    With --definition FILE --where QUERY: each selected instance's history is re-interpreted with
    that spec version (its inputs fed to it, its consequences compared) and reported as
    "compatible" or with its first divergence (event index, expected vs got), plus the waiting
    positions the new version has no step for. Exit code 1 when any diverges. Nothing is deployed
    or sent: a test before `kflow deploy` and `kflow migrate`. With --workflows MODS --workflow
    NAME@VERSION --where QUERY the same for code: each selected history is replayed on that version's
    code and reported as compatible or with the first command it does not reproduce.

    Each history (from --file, or from the events topic for each --instance) is re-run with the
    code in --workflows; every command the code issues must equal the one recorded. Exit code 0
    when all histories replay, 1 (with the first mismatch) otherwise.

    Example: kflow replay --workflows shop.workflows --instance order-42 --instance order-43

    Example: kflow replay --definition order-v2.yaml --where "status=RUNNING"

    Example: kflow replay --workflows shop.workflows --workflow order@2 --where "status=RUNNING"
    """
    from kflow.authoring import code_definitions, default_registry
    from kflow.testing import replay as replay_history

    setup_logging(verbose)
    if definition is not None or (where is not None and not workflows):
        if definition is None or where is None or workflows or file is not None or instances:
            fail("--definition FILE goes with --where QUERY (and neither with --workflows, --file or --instance)")
        from kflow._cli.migrate import replay_definition

        replay_definition(definition, where, as_json, None, 100_000, bootstrap, prefix)
        return
    if where is not None:
        if not workflows or not workflow or file is not None or instances:
            fail("--where QUERY goes with --definition FILE (a spec version), or with --workflows MODS and "
                 "--workflow NAME[@VERSION] (a code version)")
        from kflow._cli.migrate import replay_code

        replay_code(workflows, workflow, where, as_json, None, 100_000, bootstrap, prefix)
        return
    if not workflows:
        fail("give --workflows MODS (code workflows) or --definition FILE --where QUERY (a spec version)")
    if (file is None) == (not instances):
        fail("give either --file FILE or one or more --instance ID")
    code_definitions(workflows)
    if file is not None:
        histories = _histories(json.loads(file.read_text()))
    else:
        from kflow.client import Client

        histories = []
        with Client(bootstrap, topic_prefix=prefix) as client:
            for iid in instances or []:
                events = client.history(iid)
                if not events:
                    fail(f"no events for instance '{iid}' on the events topic")
                histories.append({"events": [{"type": e.type, "instance_id": e.instance_id, "seq": e.seq,
                                              "ts": e.ts, "data": e.data} for e in events]})
    for i, h in enumerate(histories):
        events = h.get("events") or []
        started = next((e for e in events if e.get("type") == "WorkflowStarted"), None)
        name, _, version = (workflow or "").partition("@")
        if not name:
            if started is None:
                raise KflowError(f"history {i}: no WorkflowStarted event; pass --workflow NAME@VERSION")
            name, version = started["data"]["workflow"], str(started["data"]["version"])
        versions = default_registry.versions(name)
        v = int(version) if version else (max(versions) if versions else 0)
        definition = default_registry.get(name, v)
        if definition is None:
            raise KflowError(f"history {i}: code workflow '{name}@{v}' is not registered by {workflows}")
        replay_history(definition, events, state=h.get("state"))
        iid = events[0].get("instance_id", "?") if events else "?"
        typer.echo(f"ok {iid}: {len(events)} events replay on {name}@{v}")


def query(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    name: Annotated[str, typer.Argument(metavar="NAME", help="Query name (a spec workflow: a variable, or 'vars').")],
    args: Annotated[Optional[list[str]], typer.Argument(metavar="[ARG]...", help="Query arguments, each JSON.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", "-t", min=0, metavar="SECONDS", help="How long to wait.")] = 10.0,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Ask a running workflow a question; the engine that owns it answers from the live object.

    Code workflows answer with a @workflow.query method or ctx.set_query_handler; spec workflows
    answer with one of their variables ('vars' for all). Nothing is written to the history. The
    answer is printed as JSON on stdout; exit code 2 when no engine answers within --timeout, 1
    when the instance or the query does not exist.

    Example: kflow query approval-7 approved_by asks the documentation's approval workflow (a class with
    a @kflow.workflow.query method approved_by) who has approved so far; order-42 is a spec
    workflow answering with its variables:

        $ kflow query approval-7 approved_by
        ["ann", "bob"]
        $ kflow query order-42 vars
        {"r": {"ok": true, "sku": "A1"}, "paid": {"receipt": "rc-17"}}
        $ kflow query order-42 paid --timeout 30
        {"receipt": "rc-17"}
        $ kflow query approval-7 approvals_by '"ann"'
        1

    Each ARG is one JSON value passed to the query method (here approvals_by(self, who)), so a
    string needs its JSON quotes inside the shell quotes.
    """
    from kflow.client import Client

    setup_logging(verbose)
    values = [parse_json(a, f"argument {i + 1}") for i, a in enumerate(args or [])]
    with Client(bootstrap, topic_prefix=prefix) as client:
        try:
            answer = client.query(id, name, *values, timeout=timeout)
        except TimeoutError as exc:
            fail(str(exc), 2)
    typer.echo(dump_json(answer))
