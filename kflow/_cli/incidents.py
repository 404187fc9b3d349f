"""The operator commands: ``incidents`` (open incidents), ``incident resolve`` and ``graph``.

``incidents`` reads the compacted ``state`` topic and lists the incidents the instances have open
(a step whose retries were exhausted under ``on_failure: {incident: ...}``); ``incident resolve``
checks with the engine that owns the instance that the incident is open, then sends
``ResolveIncident``; ``graph`` draws a spec definition, or an instance's path through it with the
state of each step, as DOT, Mermaid or SVG text.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, dump_json, fail, parse_json, setup_logging

__all__ = ["FORMATS", "app", "graph", "graph_text", "incident_steps", "list_incidents", "open_incidents"]

app = typer.Typer(help="Resolve the incidents of workflow instances (see also `kflow incidents`).",
                  no_args_is_help=True)

#: Output formats of ``kflow graph``.
FORMATS = ("dot", "mermaid", "svg")


# --------------------------------------------------------------------------- incidents


def open_incidents(states: Iterable[dict[str, Any]], workflow: Optional[str] = None,
                   role: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per open incident of the public state records ``states`` (their ``incidents`` summary), oldest first.

    ``workflow`` keeps the incidents of that workflow's instances; ``role`` those whose step names
    that role.
    """
    rows = []
    for st in states:
        if workflow and st["workflow"] != workflow:
            continue
        for incident_id, inc in (st.get("incidents") or {}).items():
            if role and inc.get("role") != role:
                continue
            err = inc.get("error") or {}
            rows.append({"instance_id": st["instance_id"], "workflow": st["workflow"], "version": st["version"],
                         "status": st["status"], "incident_id": incident_id, "step": inc.get("step"),
                         "role": inc.get("role"), "error_type": err.get("type"), "message": err.get("message"),
                         "instructions": inc.get("instructions") or "", "attempts": inc.get("attempts"),
                         "raised_ms": inc.get("raised_ms")})
    rows.sort(key=lambda r: (r["raised_ms"] or 0, r["instance_id"], r["incident_id"]))
    return rows


def _when(ms: Optional[int]) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def list_incidents(
    workflow: Annotated[Optional[str], typer.Option("--workflow", "-w", help="Only instances of this workflow.")] = None,
    role: Annotated[Optional[str], typer.Option("--role", help="Only incidents whose step names this role.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per incident per line.")] = False,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """List the open incidents: steps whose retries ran out and that wait for an operator.

    A task step with `on_failure: {incident: {role, instructions, timeout}}` keeps its instance
    open (status INCIDENT) once its retries are exhausted. Each row shows the instance, the
    incident id, the step, the role that may resolve it, the error and the instructions; resolve
    one with `kflow incident resolve ID INCIDENT_ID --retry | --skip | --fail`. Reads the state
    topic from Kafka (no engine needed).

    Example: kflow incidents --role ops --workflow order
    """
    from kflow._cli.visibility import _config, _latest_states

    setup_logging(verbose)
    rows = open_incidents(_latest_states(_config(bootstrap, prefix)).values(), workflow, role)
    if as_json:
        for r in rows:
            typer.echo(dump_json(r))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("instance", "incident", "step", "role", "raised", "error", "instructions")
    for r in rows:
        table.add_row(r["instance_id"], r["incident_id"], r["step"], r["role"] or "-", _when(r["raised_ms"]),
                      f"[red]{r['error_type']}[/]: {r['message']}", r["instructions"])
    Console(soft_wrap=False).print(table)
    if not rows:
        typer.echo("no open incidents", err=True)


@app.command("resolve")
def resolve(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    incident_id: Annotated[str, typer.Argument(metavar="INCIDENT_ID", help="The incident (see `kflow incidents`).")],
    retry: Annotated[bool, typer.Option("--retry", help="Run the step again, with a fresh retry policy.")] = False,
    skip: Annotated[bool, typer.Option("--skip", help="Skip the step; --output is its output.")] = False,
    fail_: Annotated[bool, typer.Option("--fail", help="Fail the workflow with the step's error.")] = False,
    input_patch: Annotated[Optional[str], typer.Option(
        "--input-patch", metavar="JSON", help="With --retry: a JSON object merged into the step's input, or @FILE.")] = None,
    output: Annotated[Optional[str], typer.Option(
        "--output", metavar="JSON", help="With --skip: the step's output as JSON, or @FILE (default null).")] = None,
    reason: Annotated[str, typer.Option("--reason", "-r", metavar="TEXT", help="Why (recorded in the event).")] = "",
    timeout: Annotated[float, typer.Option("--timeout", "-t", min=0.1, metavar="SECONDS",
                                           help="How long to wait for the engine to confirm the incident is open.")] = 10.0,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Resolve an open incident: retry its step, skip it with an output, or fail the workflow.

    Give exactly one of --retry, --skip and --fail. The engine that owns the instance is asked
    first whether the incident is open (an unknown instance or incident is an error and nothing
    is sent); then a ResolveIncident command goes to the commands topic and the engine records
    IncidentResolved with the action, who and why. With auth on, the sender needs the role the
    step names (or system_admin); otherwise the engine rejects the command and nothing changes.

    Example: kflow incident resolve order-42 charge-9 --retry --input-patch '{"card": "tok_2"}'
    """
    from kflow._cli.visibility import _ask_engine
    from kflow._cli.workflows import _operator
    from kflow.client import Client

    chosen = [name for name, on in (("retry", retry), ("skip", skip), ("fail", fail_)) if on]
    if len(chosen) != 1:
        fail(f"give exactly one of --retry, --skip and --fail (got {', '.join('--' + c for c in chosen) or 'none'})")
    action = chosen[0]
    patch = parse_json(input_patch, "--input-patch")
    if input_patch is not None and (action != "retry" or not isinstance(patch, dict)):
        fail("--input-patch takes a JSON object, and goes with --retry only")
    if output is not None and action != "skip":
        fail("--output goes with --skip only")
    value = parse_json(output, "--output")
    setup_logging(verbose)
    with Client(bootstrap, topic_prefix=prefix) as client:
        state = _ask_engine(lambda: client.status(id, timeout=timeout), timeout)
        if state is None:
            fail(f"no workflow instance '{id}'")
        incidents = (state.get("internal") or {}).get("incidents") or {}
        if incident_id not in incidents:
            fail(f"instance '{id}' ({state['status']}) has no open incident '{incident_id}' "
                 f"(open: {', '.join(sorted(incidents)) or 'none'})")
        client.resolve_incident(id, incident_id, action, output=value, input_patch=patch, reason=reason,
                                by=_operator())
    typer.echo(f"resolve ({action}) requested for {id} incident {incident_id}")


# --------------------------------------------------------------------------- graph


def incident_steps(steps: dict[str, str], internal: dict[str, Any]) -> dict[str, str]:
    """``steps`` with the steps that wait on an open incident of the state ``internal`` marked ``incident``."""
    out = dict(steps)
    for inc in (internal.get("incidents") or {}).values():
        if isinstance(inc, dict) and isinstance(inc.get("step"), str):
            out[inc["step"]] = "incident"
    return out


def graph_text(body: dict[str, Any], fmt: str, steps: Optional[dict[str, str]] = None, title: str = "") -> str:
    """The drawing of spec ``body`` (with step states when ``steps`` is given) in format ``fmt``.

    Raises:
        ValueError: ``fmt`` is not one of :data:`FORMATS`.
    """
    from kflow.visibility.graph import render_dot, render_mermaid, render_svg

    if fmt == "dot":
        return render_dot(body, steps, title)
    if fmt == "mermaid":
        return render_mermaid(body, steps)
    if fmt == "svg":
        return render_svg(body, steps, title)
    raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")


def graph(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Name of the deployed spec workflow.")],
    version: Annotated[Optional[int], typer.Option("--version", min=1, help="Definition version (default: latest, "
                                                   "or the instance's).")] = None,
    instance: Annotated[Optional[str], typer.Option("--instance", "-i", metavar="ID",
                                                    help="Colour the steps by this instance's path.")] = None,
    fmt: Annotated[Literal["dot", "mermaid", "svg"], typer.Option("--format", "-f", help="Output format.")] = "dot",
    out: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="FILE",
                                                help="Write to FILE instead of stdout.")] = None,
    scan: Annotated[bool, typer.Option("--scan", help="With --instance: read the topics instead of asking the "
                                                      "engine (no engine needed).")] = False,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Draw a spec workflow's graph, or an instance's path through it, as DOT, Mermaid or SVG.

    Boxes are steps; solid arrows the flow (branches, foreach bodies, joins), dashed arrows the
    jumps (goto, choice, catch). With --instance each step is coloured by what the instance did:
    grey pending, blue running, green done, red failed, orange waiting on an incident — worked
    out from its history, as the console's graph is. DOT renders with Graphviz (`dot -Tpng`),
    Mermaid in Markdown viewers; SVG is drawn directly and opens in a browser.

    Example: kflow graph order --instance order-42 --format svg -o order-42.svg
    """
    setup_logging(verbose)
    steps: Optional[dict[str, str]] = None
    if instance is not None:
        from kflow._cli.visibility import fetch_status

        state, found, body = fetch_status(instance, bootstrap, prefix, scan=scan)
        if state is None:
            fail(f"no workflow instance '{instance}'")
        if state["workflow"] != name or (version is not None and state["version"] != version):
            fail(f"instance '{instance}' runs {state['workflow']}@{state['version']}, not "
                 f"{name}{'' if version is None else f'@{version}'}")
        if body is None:
            fail(f"'{name}@{state['version']}' is a code workflow: graphs are drawn for spec workflows")
        steps = incident_steps(found, state.get("internal") or {})
        title = f"{name}@{state['version']} {instance} ({state['status']})"
    else:
        from kflow.client import Client

        with Client(bootstrap, topic_prefix=prefix) as client:
            definition = client.definition(name, version)
        if definition is None:
            fail(f"no deployed workflow '{name}{'' if version is None else f'@{version}'}'")
        if definition.kind != "spec":
            fail(f"'{definition.key}' is a code workflow: graphs are drawn for spec workflows")
        body, title = definition.body, definition.key
    text = graph_text(body, fmt, steps, title)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}", err=True)
